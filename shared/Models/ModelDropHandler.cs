using System.Text.Json.Serialization;
using Azure;
using Microsoft.Extensions.Logging;
using Pipeline.Storage;

namespace Pipeline.Models;

/// <summary><c>models/&lt;folder&gt;/_registration.json</c>: the outcome of the last registration attempt of a dropped folder.</summary>
public sealed record ModelRegistration(string Folder, string Status, string? Reason, string? ModelId, DateTimeOffset At)
{
    public const string FileName = "_registration.json";
    /// <summary>Marks a folder Pipeline wrote (generated or fine-tuned): its model.json is authoritative.</summary>
    public const string ManagedMarker = "_managed";
    public const string Registered = "registered";
    public const string Refused = "refused";
}

[JsonSourceGenerationOptions(System.Text.Json.JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(ModelRegistration))]
public sealed partial class ModelRegistrationJson : JsonSerializerContext;

/// <summary>
/// Registers a model folder dropped into the <c>models</c> container (BlobCreated events, like data in
/// <c>incoming</c>). Files of a folder arrive one by one in any order, so every new file retries the
/// registration; the outcome (registered, or refused with the reason) is kept in <c>_registration.json</c>
/// and a folder whose <c>model.json</c> is newer than the file is left alone (generated and already
/// registered models are never re-derived).
/// </summary>
public sealed class ModelDropHandler(StorageClients storage, ModelRegistry registry, ILogger<ModelDropHandler> logger)
{
    public async Task HandleAsync(string blobName, CancellationToken cancellationToken)
    {
        var slash = blobName.IndexOf('/');
        var file = Path.GetFileName(blobName);
        if (slash <= 0 || file is ModelManifest.FileName or ModelRegistration.FileName or ModelRegistration.ManagedMarker)
        {
            return;
        }

        var folder = blobName[..slash];
        var models = storage.Container(StorageNames.Containers.Models);
        if (await models.GetBlobClient($"{folder}/{ModelRegistration.ManagedMarker}").ExistsAsync(cancellationToken))
        {
            return;
        }

        DateTimeOffset fileTime, registeredTime;
        try
        {
            fileTime = (await models.GetBlobClient(blobName).GetPropertiesAsync(cancellationToken: cancellationToken)).Value.LastModified;
            registeredTime = (await models.GetBlobClient($"{folder}/{ModelManifest.FileName}").GetPropertiesAsync(cancellationToken: cancellationToken)).Value.LastModified;
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            registeredTime = DateTimeOffset.MinValue;
            fileTime = DateTimeOffset.MaxValue;
        }

        if (registeredTime >= fileTime)
        {
            return;
        }

        ModelRegistration outcome;
        try
        {
            var manifest = await registry.RegisterHuggingFaceFolderAsync(folder, cancellationToken);
            outcome = new ModelRegistration(folder, ModelRegistration.Registered, null, manifest.ModelId, DateTimeOffset.UtcNow);
            logger.LogInformation("Registered model {ModelId} ({Task}) from models/{Folder}/", manifest.ModelId, manifest.Task, folder);
        }
        catch (Exception e) when (e is ModelRejectedException or System.Text.Json.JsonException or FormatException or InvalidOperationException or KeyNotFoundException or IndexOutOfRangeException or NullReferenceException)
        {
            // A folder that cannot be read is refused with the reason, never retried until poisoned.
            var reason = e is ModelRejectedException ? e.Message : $"models/{folder}/ cannot be read: {e.GetType().Name}: {e.Message}. Check config.json and tokenizer.json.";
            outcome = new ModelRegistration(folder, ModelRegistration.Refused, reason, null, DateTimeOffset.UtcNow);
            logger.LogWarning("models/{Folder}/ is not registered (yet): {Reason}", folder, reason);
        }

        await BlobJson.WriteAsync(models.GetBlobClient($"{folder}/{ModelRegistration.FileName}"), outcome, ModelRegistrationJson.Default.ModelRegistration, cancellationToken);
    }
}
