using System.Text.Json;
using Microsoft.Extensions.Logging;
using Pipeline.Ingestion;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>
/// Routes the <c>blob-created</c> queue's Event Grid events by the container a blob was dropped into: a file in
/// <c>incoming</c> starts a run at ingestion, a model folder's files in <c>models</c> register the model. Run specs
/// are read with their data, and other containers are not drop zones.
/// </summary>
public sealed class BlobDrops(IngestHandler ingest, ModelDropHandler modelDrops, ILogger<BlobDrops> logger)
{
    /// <exception cref="InvalidMessageException">The message is not an Event Grid event.</exception>
    public async Task HandleAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        if (Parse(message) is not { } blobEvent || blobEvent.EventType != BlobCreatedEvent.EventTypeName || blobEvent.ParseSubject() is not { } target)
        {
            logger.LogInformation("Ignoring a blob-created message that is not a BlobCreated event: {Message}", message.Length > 200 ? message[..200] : message);
            return;
        }

        if (target.Container == StorageNames.Containers.Models)
        {
            await modelDrops.HandleAsync(target.Blob, cancellationToken);
            return;
        }

        if (target.Container != StorageNames.Containers.Incoming || target.Blob.EndsWith(RunSpec.FileSuffix, StringComparison.OrdinalIgnoreCase))
        {
            return;
        }

        var runId = RunIds.ForBlob(target.Container, target.Blob, blobEvent.Data.ETag);
        await ingest.IngestAsync(new IngestRequest(target.Container, target.Blob, blobEvent.Data.ETag.Trim('"'), runId, Spec: null), dequeueCount, cancellationToken);
    }

    private static BlobCreatedEvent? Parse(string message)
    {
        try
        {
            return message.TrimStart().StartsWith('[')
                ? JsonSerializer.Deserialize(message, PipelineJson.Default.BlobCreatedEventArray)?.FirstOrDefault()
                : JsonSerializer.Deserialize(message, PipelineJson.Default.BlobCreatedEvent);
        }
        catch (JsonException e)
        {
            throw new InvalidMessageException($"The blob-created message is not an Event Grid event: {e.Message}");
        }
    }
}
