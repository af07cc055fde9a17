using System.Text;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging.Abstractions;
using Pipeline.LocalHost.Triggers;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Hosting;

/// <summary>The local host's bounds: host.json functionTimeout on invocations, and the blob watcher's state and scans.</summary>
[Collection(LocalHostProcess.Collection)]
public sealed class LocalHostLimitsTests(Azurite azurite) : IClassFixture<Azurite>
{
    private StorageClients Storage() => StorageClients.FromConfiguration(new ConfigurationBuilder()
        .AddInMemoryCollection(new Dictionary<string, string?> { [StorageClients.ConnectionSetting] = azurite.ConnectionString }).Build(), Azure.Storage.Queues.QueueMessageEncoding.Base64);

    [Fact]
    public async Task A_second_watcher_does_not_re_emit_blobs_older_than_the_shared_high_water_mark_and_memory_holds_only_the_overlap()
    {
        var storage = Storage();
        var container = storage.Container("watched-" + Guid.NewGuid().ToString("n")[..8]);
        await container.CreateIfNotExistsAsync();
        var receipts = storage.Container(BlobCreatedWatcher.ReceiptsContainer);
        await receipts.CreateIfNotExistsAsync();
        var events = storage.Queue(StorageNames.Queues.BlobCreated);
        await events.CreateIfNotExistsAsync();
        await events.ClearMessagesAsync();
        var overlap = TimeSpan.FromSeconds(1);

        for (var i = 0; i < 20; i++)
        {
            await container.GetBlobClient($"old/{i}.jsonl").UploadAsync(BinaryData.FromString("{\"text\":\"x\"}\n"));
        }

        // Older than the overlap by the time of the first scan (last-modified has one-second resolution).
        await Task.Delay(overlap * 2);
        var first = new BlobCreatedWatcher(storage, TimeSpan.FromMilliseconds(300), NullLogger.Instance, overlap);
        Assert.Equal(20, await first.ScanAsync(container, receipts, CancellationToken.None));

        // The receipts are gone (cleaned up, or never shared): only the mark keeps a new host from re-emitting the old blobs.
        await foreach (var receipt in receipts.GetBlobsAsync(BlobTraits.None, BlobStates.None, $"blobreceipts/{StorageNames.Queues.BlobCreated}/", CancellationToken.None))
        {
            await receipts.DeleteBlobAsync(receipt.Name);
        }

        var second = new BlobCreatedWatcher(storage, TimeSpan.FromMilliseconds(300), NullLogger.Instance, overlap);
        Assert.Equal(0, await second.ScanAsync(container, receipts, CancellationToken.None));
        Assert.Equal(0, second.Remembered);

        await container.GetBlobClient("new.jsonl").UploadAsync(BinaryData.FromString("{\"text\":\"y\"}\n"));
        Assert.Equal(1, await second.ScanAsync(container, receipts, CancellationToken.None));
        Assert.Equal(0, await first.ScanAsync(container, receipts, CancellationToken.None));
        // The first watcher forgot the old blobs once they fell behind the overlap.
        Assert.True(first.Remembered <= 1, $"{first.Remembered} remembered");
        Assert.Equal(21, (await events.GetPropertiesAsync()).Value.ApproximateMessagesCount);
    }

    [Fact]
    public async Task An_invocation_past_host_json_function_timeout_is_cancelled_fails_and_its_message_is_retried_then_poisoned()
    {
        var settings = new Dictionary<string, string>
        {
            ["AzureFunctionsJobHost__functionTimeout"] = "00:00:00.001",
            ["AzureFunctionsJobHost__extensions__queues__maxDequeueCount"] = "2",
            ["AzureWebJobs__IngestPoison__Disabled"] = "true",
        };
        using var host = new LocalHostProcess(azurite.ConnectionString, settings);
        await host.WaitUntilListeningAsync();
        var storage = Storage();
        var name = $"timeout-{Guid.NewGuid():n}.jsonl";
        await storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).UploadAsync(new BinaryData(Encoding.UTF8.GetBytes("{\"text\":\"slow\"}\n")));

        var poison = storage.Queue(StorageNames.Queues.Poison(StorageNames.Queues.BlobCreated));
        var poisoned = await Eventually.ReturnsAsync(async () => (await poison.ExistsAsync()).Value ? (await poison.PeekMessagesAsync(32)).Value.FirstOrDefault(m => m.Body.ToString().Contains(name, StringComparison.Ordinal)) : null,
            TimeSpan.FromSeconds(90), "the timed-out message to reach blob-created-poison", () => host.Output);
        Assert.Contains("Timeout value of 00:00:00.0010000 exceeded", host.Output, StringComparison.Ordinal);
        Assert.Contains("attempt 2 of 2", host.Output, StringComparison.Ordinal);
    }
}
