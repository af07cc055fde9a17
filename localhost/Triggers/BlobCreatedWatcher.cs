using System.Text.Json;
using Azure;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Pipeline.Messaging;
using Pipeline.Storage;

namespace Pipeline.LocalHost.Triggers;

/// <summary>
/// Local host mode's stand-in for the Event Grid subscriptions: each new blob version in <c>incoming</c>
/// (data to ingest) and <c>models</c> (model folders to register) becomes one <c>Microsoft.Storage.BlobCreated</c> event on the <c>blob-created</c> queue. A receipt blob
/// (created only if absent) makes several hosts watching one account enqueue each version once.
/// </summary>
public sealed class BlobCreatedWatcher(StorageClients storage, TimeSpan scanInterval, ILogger logger)
{
    public const string ReceiptsContainer = "azure-webjobs-hosts";
    private static readonly TimeSpan AbandonedReceipt = TimeSpan.FromMinutes(1);
    private readonly Dictionary<string, ETag> _handled = new(StringComparer.Ordinal);

    /// <summary>The containers Event Grid delivers BlobCreated events for (see infra/modules/eventgrid.bicep).</summary>
    public static readonly string[] WatchedContainers = [StorageNames.Containers.Incoming, StorageNames.Containers.Models];

    public async Task RunAsync(CancellationToken stopping)
    {
        var receipts = storage.Container(ReceiptsContainer);
        await receipts.CreateIfNotExistsAsync(cancellationToken: stopping);
        var watched = WatchedContainers.Select(storage.Container).ToList();
        foreach (var container in watched)
        {
            await container.CreateIfNotExistsAsync(cancellationToken: stopping);
        }

        while (!stopping.IsCancellationRequested)
        {
            foreach (var container in watched)
            {
                try
                {
                    await ScanAsync(container, receipts, stopping);
                }
                catch (Exception e) when (e is RequestFailedException or HttpRequestException && !stopping.IsCancellationRequested)
                {
                    logger.LogWarning(e, "Scanning {Container} failed; retrying", container.Name);
                }
            }

            await Task.Delay(scanInterval, stopping).ContinueWith(_ => { }, TaskScheduler.Default);
        }
    }

    public async Task ScanAsync(BlobContainerClient container, BlobContainerClient receipts, CancellationToken cancellationToken)
    {
        await foreach (var blob in container.GetBlobsAsync(cancellationToken: cancellationToken))
        {
            var etag = blob.Properties.ETag ?? default;
            var key = $"{container.Name}/{blob.Name}";
            if (_handled.TryGetValue(key, out var known) && known == etag)
            {
                continue;
            }

            if (await ClaimAsync(receipts.GetBlobClient($"blobreceipts/{StorageNames.Queues.BlobCreated}/{etag.ToString().Trim('"')}/{key}"), cancellationToken) is { } claim)
            {
                await storage.Queue(StorageNames.Queues.BlobCreated).SendMessageAsync(EventFor(container, blob), cancellationToken);
                await claim.SetMetadataAsync(new Dictionary<string, string> { ["status"] = "enqueued" }, cancellationToken: cancellationToken);
                logger.LogInformation("New blob {Container}/{Blob}: BlobCreated event enqueued", container.Name, blob.Name);
            }

            _handled[key] = etag;
        }
    }

    /// <summary>Takes the receipt for one blob version: true for the first claimant, or when an earlier claim was abandoned.</summary>
    private static async Task<BlobClient?> ClaimAsync(BlobClient receipt, CancellationToken cancellationToken)
    {
        try
        {
            await receipt.UploadAsync(BinaryData.Empty, new BlobUploadOptions
            {
                Conditions = new BlobRequestConditions { IfNoneMatch = ETag.All },
                Metadata = new Dictionary<string, string> { ["status"] = "claimed" },
            }, cancellationToken);
            return receipt;
        }
        catch (RequestFailedException e) when (e.Status is 409 or 412)
        {
            var properties = (await receipt.GetPropertiesAsync(cancellationToken: cancellationToken)).Value;
            if ((properties.Metadata.TryGetValue("status", out var status) ? status : null) != "claimed" || DateTimeOffset.UtcNow - properties.LastModified < AbandonedReceipt)
            {
                return null;
            }

            try
            {
                // The claimant died before enqueuing: take over, once.
                await receipt.SetMetadataAsync(new Dictionary<string, string> { ["status"] = "claimed" }, new BlobRequestConditions { IfMatch = properties.ETag }, cancellationToken);
                return receipt;
            }
            catch (RequestFailedException again) when (again.Status == 412)
            {
                return null;
            }
        }
    }

    public static string EventFor(BlobContainerClient container, BlobItem blob)
    {
        var url = container.GetBlobClient(blob.Name).Uri;
        var blobEvent = new BlobCreatedEvent
        {
            Id = Guid.NewGuid().ToString(),
            Topic = $"/subscriptions/local/resourceGroups/local/providers/Microsoft.Storage/storageAccounts/{container.AccountName}",
            Subject = $"/blobServices/default/containers/{container.Name}/blobs/{blob.Name}",
            EventType = BlobCreatedEvent.EventTypeName,
            EventTime = blob.Properties.LastModified ?? DateTimeOffset.UtcNow,
            Data = new BlobCreatedData
            {
                Api = "PutBlob",
                ETag = blob.Properties.ETag?.ToString() ?? "",
                ContentType = blob.Properties.ContentType,
                ContentLength = blob.Properties.ContentLength ?? 0,
                BlobType = "BlockBlob",
                Url = url.GetLeftPart(UriPartial.Path),
                Sequencer = blob.Properties.LastModified?.UtcTicks.ToString("x16"),
            },
        };
        return JsonSerializer.Serialize(blobEvent, PipelineJson.Default.BlobCreatedEvent);
    }
}
