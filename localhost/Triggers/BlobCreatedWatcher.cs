using System.Text.Json;
using System.Text.Json.Nodes;
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
/// As the WebJobs blob trigger does, a scan considers only blobs modified since the shared high-water mark
/// (<c>azure-webjobs-hosts/blobscaninfo/&lt;container&gt;</c>, the start of the last full scan, less an overlap for
/// writes committed while it listed): a new host does not revisit old blobs, and this one remembers only the
/// blobs inside the overlap (bounded memory). Idle scans back off from the scan interval to <see cref="MaxScanInterval"/>.
/// </summary>
public sealed class BlobCreatedWatcher(StorageClients storage, TimeSpan scanInterval, ILogger logger, TimeSpan? overlap = null)
{
    public const string ReceiptsContainer = "azure-webjobs-hosts";
    private static readonly TimeSpan AbandonedReceipt = TimeSpan.FromMinutes(1);
    /// <summary>Idle scans double their interval up to this (a new blob resets it).</summary>
    public static readonly TimeSpan MaxScanInterval = TimeSpan.FromSeconds(10);
    /// <summary>Blobs modified this long before the mark are still looked at (a write committed while the previous scan listed past its name).</summary>
    public static readonly TimeSpan DefaultOverlap = TimeSpan.FromMinutes(1);
    private readonly TimeSpan _overlap = overlap ?? DefaultOverlap;
    private readonly Dictionary<string, (ETag ETag, DateTimeOffset Modified)> _handled = new(StringComparer.Ordinal);

    /// <summary>The containers Event Grid delivers BlobCreated events for (see infra/modules/eventgrid.bicep).</summary>
    public static readonly string[] WatchedContainers = [StorageNames.Containers.Incoming, StorageNames.Containers.Models];

    /// <summary>Blob versions this watcher remembers (those inside the overlap): bounded by the write rate, not the account's size.</summary>
    public int Remembered => _handled.Count;

    public async Task RunAsync(CancellationToken stopping)
    {
        var receipts = storage.Container(ReceiptsContainer);
        await receipts.CreateIfNotExistsAsync(cancellationToken: stopping);
        var watched = WatchedContainers.Select(storage.Container).ToList();
        foreach (var container in watched)
        {
            await container.CreateIfNotExistsAsync(cancellationToken: stopping);
        }

        var interval = scanInterval;
        while (!stopping.IsCancellationRequested)
        {
            var found = 0;
            foreach (var container in watched)
            {
                try
                {
                    found += await ScanAsync(container, receipts, stopping);
                }
                catch (Exception e) when (e is RequestFailedException or HttpRequestException && !stopping.IsCancellationRequested)
                {
                    logger.LogWarning(e, "Scanning {Container} failed; retrying", container.Name);
                }
            }

            interval = found > 0 ? scanInterval : TimeSpan.FromTicks(Math.Min(Math.Max(scanInterval.Ticks, MaxScanInterval.Ticks), interval.Ticks * 2));
            await Task.Delay(interval, stopping).ContinueWith(_ => { }, TaskScheduler.Default);
        }
    }

    /// <summary>One scan: an event for each blob version modified since the mark and not yet claimed; returns how many were enqueued.</summary>
    public async Task<int> ScanAsync(BlobContainerClient container, BlobContainerClient receipts, CancellationToken cancellationToken)
    {
        // The storage service's clock (the mark read's Date), not this host's: the mark is compared with the blobs'
        // LastModified, and a host whose clock ran ahead by more than the overlap would skip blobs for good.
        var mark = receipts.GetBlobClient($"blobscaninfo/{container.Name}");
        var (latestScan, markETag, scanStarted) = await ReadMarkAsync(mark, cancellationToken);
        var since = latestScan - _overlap;
        var enqueued = 0;
        await foreach (var blob in container.GetBlobsAsync(cancellationToken: cancellationToken))
        {
            var modified = blob.Properties.LastModified ?? scanStarted;
            if (modified < since)
            {
                continue;
            }

            var etag = blob.Properties.ETag ?? default;
            var key = $"{container.Name}/{blob.Name}";
            if (_handled.TryGetValue(key, out var known) && known.ETag == etag)
            {
                continue;
            }

            if (await ClaimAsync(receipts.GetBlobClient($"blobreceipts/{StorageNames.Queues.BlobCreated}/{etag.ToString().Trim('"')}/{key}"), scanStarted, cancellationToken) is { } claim)
            {
                await storage.Queue(StorageNames.Queues.BlobCreated).SendMessageAsync(EventFor(container, blob), cancellationToken);
                await claim.SetMetadataAsync(new Dictionary<string, string> { ["status"] = "enqueued" }, cancellationToken: cancellationToken);
                logger.LogInformation("New blob {Container}/{Blob}: BlobCreated event enqueued", container.Name, blob.Name);
                enqueued++;
            }

            _handled[key] = (etag, modified);
        }

        // Forget what the next scan will not look at: memory holds the overlap's blobs only.
        var forget = scanStarted - _overlap;
        foreach (var (key, value) in _handled.Where(h => h.Value.Modified < forget).ToList())
        {
            _handled.Remove(key);
        }

        await AdvanceMarkAsync(mark, latestScan, markETag, scanStarted, cancellationToken);
        return enqueued;
    }

    private static readonly DateTimeOffset Beginning = DateTimeOffset.UnixEpoch;

    /// <summary>
    /// The shared mark (the start of the latest complete scan by any host; the minimum time when there is none yet), and
    /// the storage service's time of the read (its Date header: truncated to the second, so never later than the
    /// service's clock; this host's when it sends none).
    /// </summary>
    private static async Task<(DateTimeOffset LatestScan, ETag? ETag, DateTimeOffset Now)> ReadMarkAsync(BlobClient mark, CancellationToken cancellationToken)
    {
        try
        {
            var content = await mark.DownloadContentAsync(cancellationToken);
            var latest = JsonNode.Parse(content.Value.Content.ToString())?["latestScan"]?.GetValue<DateTimeOffset>();
            return (latest ?? Beginning, content.Value.Details.ETag, content.GetRawResponse().Headers.Date ?? DateTimeOffset.UtcNow);
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return (Beginning, null, e.GetRawResponse()?.Headers.Date ?? DateTimeOffset.UtcNow);
        }
    }

    /// <summary>Moves the mark forward to this scan's start (conditionally: a host that scanned later keeps its newer mark).</summary>
    private static async Task AdvanceMarkAsync(BlobClient mark, DateTimeOffset previous, ETag? etag, DateTimeOffset scanStarted, CancellationToken cancellationToken)
    {
        if (scanStarted <= previous)
        {
            return;
        }

        try
        {
            await mark.UploadAsync(BinaryData.FromString(new JsonObject { ["latestScan"] = scanStarted }.ToJsonString()), new BlobUploadOptions
            {
                Conditions = etag is { } current ? new BlobRequestConditions { IfMatch = current } : new BlobRequestConditions { IfNoneMatch = ETag.All },
            }, cancellationToken);
        }
        catch (RequestFailedException e) when (e.Status is 409 or 412)
        {
            // Another host moved it meanwhile.
        }
    }

    /// <summary>Takes the receipt for one blob version: true for the first claimant, or when an earlier claim was abandoned.</summary>
    private static async Task<BlobClient?> ClaimAsync(BlobClient receipt, DateTimeOffset now, CancellationToken cancellationToken)
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
            if ((properties.Metadata.TryGetValue("status", out var status) ? status : null) != "claimed" || now - properties.LastModified < AbandonedReceipt)
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
