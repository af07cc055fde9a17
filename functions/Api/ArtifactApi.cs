using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Azure;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Azure.Storage.Sas;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.StaticFiles;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Functions.Api;

/// <summary>
/// What the dashboard reads and starts besides runs: artifact blobs (streamed from storage, or their first lines),
/// short-lived upload URLs (the browser writes the file straight to blob storage, never through this app) and
/// the <c>retry-failed</c> command of a batch.
/// </summary>
public static class ArtifactApi
{
    /// <summary>How long an upload URL is valid: long enough to start a large upload, short enough to be useless if leaked.</summary>
    public static readonly TimeSpan UploadUrlLifetime = TimeSpan.FromMinutes(30);

    /// <summary>The most lines <c>?lines=</c> returns.</summary>
    public const int MaxLines = 1000;

    private static readonly FileExtensionContentTypeProvider ContentTypes = CreateContentTypes();

    /// <summary>The body of <c>POST /api/uploads</c>: the file's name, and whether a run spec is uploaded beside it.</summary>
    public sealed record UploadRequest(string? Name, bool Spec = false);

    /// <summary>Where the browser puts the file (and its spec): blob paths and SAS URLs that allow create and write only.</summary>
    public sealed record UploadGrant(string Blob, string Url, string? SpecBlob, string? SpecUrl, DateTimeOffset ExpiresOn);

    /// <summary>One blob of a folder artifact.</summary>
    public sealed record ArtifactEntry(string Path, string Name, long Size, DateTimeOffset? LastModified);

    /// <summary>The blob path of <c>api/artifacts/{container}/{*path}</c> (the raw path, so that encoded slashes and dots survive).</summary>
    public static string PathAfter(PathString requestPath, string container)
    {
        var prefix = $"/api/artifacts/{container}/";
        var value = requestPath.Value ?? "";
        return value.StartsWith(prefix, StringComparison.Ordinal) ? Uri.UnescapeDataString(value[prefix.Length..]) : "";
    }

    /// <summary>
    /// A blob's content streamed from storage (<c>?download</c>: as an attachment), its first <c>?lines=N</c> lines as
    /// text, or, for a path ending in <c>/</c> (a folder artifact), the blobs under it as JSON.
    /// </summary>
    public static async Task<IResult> ReadAsync(StorageClients storage, string container, string path, string? lines, bool download, CancellationToken ct)
    {
        if (!StorageNames.Containers.All.Contains(container) || path.Length == 0 || path.Split('/').Contains(".."))
        {
            return PipelineApi.Problem(404, "artifact-not-found", "No such artifact", $"'{container}/{path}' is not an artifact path; artifacts are 'container/path' in one of {string.Join(", ", StorageNames.Containers.All)}, as a run's artifacts list them.");
        }

        var containerClient = storage.Container(container);
        if (path.EndsWith('/'))
        {
            var entries = new List<ArtifactEntry>();
            await foreach (var item in containerClient.GetBlobsAsync(BlobTraits.None, BlobStates.None, path, ct))
            {
                entries.Add(new ArtifactEntry($"{container}/{item.Name}", item.Name[path.Length..], item.Properties.ContentLength ?? 0, item.Properties.LastModified));
                if (entries.Count == MaxLines)
                {
                    break;
                }
            }

            return Results.Json(entries, ArtifactJson.Default.ListArtifactEntry);
        }

        var blob = containerClient.GetBlobClient(path);
        BlobDownloadStreamingResult content;
        try
        {
            content = (await blob.DownloadStreamingAsync(cancellationToken: ct)).Value;
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return PipelineApi.Problem(404, "artifact-not-found", "No such artifact", $"'{container}/{path}' does not exist (yet): a stage writes its artifacts as it works, and a run lists the ones it wrote.");
        }

        if (lines is not null)
        {
            if (!int.TryParse(lines, out var count) || count is < 1 or > MaxLines)
            {
                content.Dispose();
                return PipelineApi.Problem(400, "invalid-lines", "Invalid line count", $"'{lines}' is not a line count; use 1 to {MaxLines}.");
            }

            // Read only as far as the lines asked for: errors.jsonl can be as large as the input.
            using (content)
            {
                using var reader = new StreamReader(content.Content, Encoding.UTF8);
                var text = new StringBuilder();
                for (var i = 0; i < count && await reader.ReadLineAsync(ct) is { } line; i++)
                {
                    text.Append(line).Append('\n');
                }

                return Results.Text(text.ToString(), "text/plain; charset=utf-8");
            }
        }

        var name = path[(path.LastIndexOf('/') + 1)..];
        return Results.Stream(content.Content, ContentTypeOf(name), download ? name : null, content.Details.LastModified, enableRangeProcessing: false);
    }

    /// <summary>
    /// Upload URLs for a new file under <c>incoming/uploads/</c> (and its <c>.pipeline.json</c> beside it): a user
    /// delegation SAS from the app's identity in Azure, an account-key SAS where the connection has the key (Azurite).
    /// </summary>
    public static async Task<IResult> CreateUploadAsync(HttpRequest request, StorageClients storage, CancellationToken ct)
    {
        UploadRequest? body;
        try
        {
            body = await JsonSerializer.DeserializeAsync(request.Body, ArtifactJson.Default.UploadRequest, ct);
        }
        catch (JsonException e)
        {
            return PipelineApi.Problem(400, "invalid-body", "The request body is not valid JSON", e.Message);
        }

        var fileName = Path.GetFileName(body?.Name ?? "").Trim();
        if (fileName.Length is 0 or > 200 || fileName.EndsWith(RunSpec.FileSuffix, StringComparison.OrdinalIgnoreCase))
        {
            return PipelineApi.Problem(400, "invalid-body", "A file name is required", $"Send {{\"name\": \"reviews.tsv\", \"spec\": true}}: the data file's name (1-200 characters, not a {RunSpec.FileSuffix} spec), and whether a run spec goes beside it.");
        }

        var now = DateTimeOffset.UtcNow;
        var expires = now + UploadUrlLifetime;
        var blobName = $"uploads/{now:yyyyMMdd-HHmmss}-{Guid.NewGuid().ToString("N")[..8]}/{fileName}";
        var incoming = storage.Container(StorageNames.Containers.Incoming);
        var specName = body!.Spec ? RunSpec.CandidateNamesFor(blobName).First() : null;
        UserDelegationKey? key = null;
        if (!incoming.CanGenerateSasUri)
        {
            key = (await storage.Blobs.GetUserDelegationKeyAsync(now.AddMinutes(-5), expires, ct)).Value;
        }
        else
        {
            await AllowBrowserOriginAsync(storage.Blobs, request.Headers.Origin.FirstOrDefault(), ct);
        }

        string Url(string name)
        {
            var sas = new BlobSasBuilder(BlobSasPermissions.Create | BlobSasPermissions.Write, expires)
            {
                BlobContainerName = incoming.Name,
                BlobName = name,
                Resource = "b",
                StartsOn = now.AddMinutes(-5),
            };
            var blob = incoming.GetBlobClient(name);
            return key is null
                ? blob.GenerateSasUri(sas).ToString()
                : new BlobUriBuilder(blob.Uri) { Sas = sas.ToSasQueryParameters(key, storage.Blobs.AccountName) }.ToUri().ToString();
        }

        var grant = new UploadGrant($"{incoming.Name}/{blobName}", Url(blobName), specName is null ? null : $"{incoming.Name}/{specName}", specName is null ? null : Url(specName), expires);
        return Results.Json(grant, ArtifactJson.Default.UploadGrant);
    }

    /// <summary>
    /// Local mode only (an account-key connection: Azurite): lets a loopback page write to the emulator's blob
    /// endpoint with the upload URL (a CORS rule for its origin). In Azure the storage account's CORS rules are
    /// configuration (see the README's dashboard section).
    /// </summary>
    private static async Task AllowBrowserOriginAsync(BlobServiceClient blobs, string? origin, CancellationToken ct)
    {
        if (origin is null || !Uri.TryCreate(origin, UriKind.Absolute, out var uri) || !uri.IsLoopback)
        {
            return;
        }

        var properties = (await blobs.GetPropertiesAsync(ct)).Value;
        if (properties.Cors.Any(rule => rule.AllowedOrigins.Split(',').Contains(origin)))
        {
            return;
        }

        properties.Cors.Add(new BlobCorsRule { AllowedOrigins = origin, AllowedMethods = "PUT", AllowedHeaders = "*", ExposedHeaders = "*", MaxAgeInSeconds = 600 });
        await blobs.SetPropertiesAsync(properties, ct);
    }

    /// <summary>Queues the <c>retry-failed</c> command of a batch (its failed rows scored again and merged) as a new run.</summary>
    public static async Task<IResult> RetryFailedAsync(StorageClients storage, RunStore runs, QueueSender sender, string batchId, CancellationToken ct)
    {
        // The batch's newest committed version: the rows still failed are those of the last retry merged in.
        if (await new BatchFiles(storage, batchId).NewestAsync(ct) is not (var manifest, _))
        {
            return PipelineApi.Problem(404, "batch-not-found", "No such batch", $"There is no finished batch '{batchId}'. List batches with GET /api/batches.");
        }

        if (manifest.Failed == 0)
        {
            return PipelineApi.Problem(409, "nothing-to-retry", "No row of this batch failed", $"Batch {batchId} scored all {manifest.Rows} rows; there is nothing to retry.");
        }

        var runId = RunIds.ForRetry(batchId);
        var run = await runs.GetOrCreateAsync(new RunRecord { RunId = runId, Source = $"{StorageNames.Containers.Outputs}/{batchId}/", Stage = Stages.Inference }, ct);
        await sender.SendAsync(StorageNames.Queues.Commands, MessageTypes.RetryFailed, runId, new RetryFailedCommand(batchId), InferenceJson.Default.RetryFailedCommand, cancellationToken: ct);
        return Results.Json(RunView.From(run), ViewJson.Default.RunView, statusCode: StatusCodes.Status202Accepted);
    }

    private static string ContentTypeOf(string name) =>
        ContentTypes.TryGetContentType(name, out var type) ? type : "application/octet-stream";

    private static FileExtensionContentTypeProvider CreateContentTypes()
    {
        var provider = new FileExtensionContentTypeProvider();
        provider.Mappings[".jsonl"] = "application/x-ndjson";
        provider.Mappings[".tsv"] = "text/tab-separated-values";
        provider.Mappings[".onnx"] = "application/octet-stream";
        return provider;
    }
}

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web)]
[JsonSerializable(typeof(ArtifactApi.UploadRequest))]
[JsonSerializable(typeof(ArtifactApi.UploadGrant))]
[JsonSerializable(typeof(List<ArtifactApi.ArtifactEntry>))]
internal sealed partial class ArtifactJson : JsonSerializerContext;
