using System.Net;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Azure.Storage.Blobs.Specialized;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Hosting;

/// <summary>
/// Local host mode and the isolated worker, as separate processes against a fresh Azurite each: queue
/// triggers with their metadata, the blob watcher, retries, poison queues, crashes and competing hosts.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class LocalHostTests : IAsyncLifetime
{
    // Every test runs hosts of its own (other settings, killed or competing hosts): storage of its own, so the shared host takes none of its messages.
    private IsolatedStorage _storage = null!;
    private TestPipeline _pipeline = null!;

    public async Task InitializeAsync()
    {
        _storage = await HostFixture.IsolatedAsync();
        _pipeline = _storage.Pipeline;
    }

    public async Task DisposeAsync() => await _storage.DisposeAsync();

    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(90);

    private Task<RunRecord> RunReachesAsync(string runId, Func<RunRecord, bool> condition, string what, params LocalHostProcess[] hosts) =>
        Eventually.ReturnsAsync(async () => await _pipeline.Runs.GetAsync(runId) is { } run && condition(run) ? run : null, Patience, what,
            () => string.Join("\n---\n", hosts.Select(h => h.Output)));

    private async Task<string> UploadAsync(string name, string content)
    {
        var blob = _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name);
        var uploaded = await blob.UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(content)), overwrite: true);
        return RunIds.ForBlob(StorageNames.Containers.Incoming, name, uploaded.Value.ETag.ToString());
    }

    [Fact]
    public async Task A_file_dropped_into_incoming_becomes_a_dataset_and_then_training_shards()
    {
        using var host = new LocalHostProcess(_storage.ConnectionString);
        var runId = await UploadAsync("dropped.tsv", "text\tlabel\nGreat place\t1\nAwful\t0\n");

        var run = await RunReachesAsync(runId, r => RunStatus.IsFinal(r.Status), "the dropped file to be ingested and preprocessed", host);

        Assert.Equal(RunStatus.Succeeded, run.Status);
        var manifest = (await _pipeline.ManifestAsync(run.DatasetId!))!;
        Assert.Equal(2, manifest.Counts.Valid);
        Assert.True(manifest.HasHeader);
        Assert.Equal(2, run.GetCounts()["trainRecords"] + run.GetCounts()["validationRecords"]);
        Assert.EndsWith("/manifest.json", run.GetArtifacts()["preparedManifest"]);
        Assert.Contains("Function Ingest: queueTrigger on blob-created", host.Output);
        Assert.Contains("Function Preprocess: queueTrigger on preprocess", host.Output);
    }

    [Fact]
    public async Task A_queue_invocation_carries_the_message_and_the_trigger_metadata_the_stages_use()
    {
        // Without the blob watcher: this test plays Event Grid and puts the event on the queue itself.
        using var host = new LocalHostProcess(_storage.ConnectionString, new Dictionary<string, string> { ["Pipeline__LocalHost__WatchIncoming"] = "false" });
        using var http = await host.WaitUntilListeningAsync();

        var name = "metadata.jsonl";
        var runId = await UploadAsync(name, "{\"text\":\"through the queue trigger\"}\n");
        var blob = _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name);
        var etag = (await blob.GetPropertiesAsync()).Value.ETag.ToString();
        await _pipeline.Storage.Queue(StorageNames.Queues.BlobCreated).SendMessageAsync(JsonSerializer.Serialize(new BlobCreatedEvent
        {
            Id = "1",
            Subject = $"/blobServices/default/containers/incoming/blobs/{name}",
            EventType = BlobCreatedEvent.EventTypeName,
            Data = new BlobCreatedData { ETag = etag },
        }, PipelineJson.Default.BlobCreatedEvent));
        var run = await RunReachesAsync(runId, r => r.GetStages().GetValueOrDefault(Stages.Ingest) == RunStatus.Succeeded, "the queued event to be ingested", host);
        // DequeueCount reached the stage as its attempt number.
        Assert.Equal(1, run.Attempt);

        // A message that can never succeed is acknowledged and recorded under its queue message Id, with its reason.
        var sent = await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync("{\"type\":");
        var recorded = await Eventually.ReturnsAsync(async () => (await FailedMessages.ListAsync(_pipeline.Storage, StorageNames.Queues.Commands, CancellationToken.None)).FirstOrDefault(),
            Patience, "the invalid command to be recorded", () => host.Output);
        Assert.Equal(sent.Value.MessageId, recorded.RowKey);
        Assert.Equal(FailedMessages.InvalidKind, recorded.Kind);
        Assert.Contains("not a valid command document", recorded.Reason);
        // The record is written first, then the run is failed.
        var failed = await RunReachesAsync(recorded.RunId!, r => r.Status == RunStatus.Failed, "the invalid command's run to fail", host);
        Assert.Equal(RejectionCodes.InvalidMessage, failed.ErrorCode);
        Assert.Equal(0, (await _pipeline.Storage.Queue(StorageNames.Queues.Poison(StorageNames.Queues.Commands)).GetPropertiesAsync()).Value.ApproximateMessagesCount);
        // The worker's logs reach the host (RpcLog) with their category.
        Assert.Contains("Worker:Pipeline.Ingestion.IngestHandler", host.Output);
    }

    [Fact]
    public async Task A_message_that_fails_every_time_lands_in_the_poison_queue_and_the_run_shows_why()
    {
        const int maxDequeueCount = 3;
        var runId = await UploadAsync("stuck.jsonl", "{\"text\":\"never lands\"}\n");
        // Another process holds a lease on the stage's staging blob: every write fails, every attempt.
        var staged = _pipeline.Storage.Container(StorageNames.Containers.Datasets).GetBlobClient(IngestHandler.StagingPath(runId, "records.jsonl"));
        await staged.UploadAsync(BinaryData.FromString("held"), overwrite: true);
        await staged.GetBlobLeaseClient().AcquireAsync(TimeSpan.FromSeconds(-1));

        var settings = new Dictionary<string, string>
        {
            ["AzureFunctionsJobHost__extensions__queues__maxDequeueCount"] = maxDequeueCount.ToString(),
            ["AzureWebJobs__IngestPoison__Disabled"] = "true",
        };
        using (var host = new LocalHostProcess(_storage.ConnectionString, settings))
        {
            var poison = _pipeline.Storage.Queue(StorageNames.Queues.Poison(StorageNames.Queues.BlobCreated));
            var poisoned = await Eventually.ReturnsAsync(async () => (await poison.PeekMessagesAsync(1)).Value.FirstOrDefault(), Patience, "the message to reach blob-created-poison", () => host.Output);
            Assert.Equal(runId, FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, poisoned.Body.ToString()));
            var retrying = (await _pipeline.Runs.GetAsync(runId))!;
            Assert.Equal(maxDequeueCount, retrying.Attempt);
            Assert.Contains("lease", retrying.LastError, StringComparison.OrdinalIgnoreCase);
            Assert.Equal(RunStatus.Running, retrying.Status);
        }

        // With the poison handler running, the run fails with the reason, and the message is kept with it.
        using var second = new LocalHostProcess(_storage.ConnectionString);
        var failed = await RunReachesAsync(runId, r => r.Status == RunStatus.Failed, "the poison handler to fail the run", second);
        Assert.Equal(FailedMessages.PoisonErrorCode, failed.ErrorCode);
        Assert.Contains($"Gave up after {maxDequeueCount} attempt(s)", failed.Error);
        Assert.Contains("blob-created-poison", failed.Error);
        Assert.Contains("lease", failed.Error, StringComparison.OrdinalIgnoreCase);
        var kept = Assert.Single(await FailedMessages.ListAsync(_pipeline.Storage, StorageNames.Queues.BlobCreated, CancellationToken.None));
        Assert.Equal(FailedMessages.PoisonedKind, kept.Kind);
        Assert.Equal(runId, kept.RunId);
        Assert.Contains("stuck.jsonl", kept.Message);

        // Once the cause is fixed, a replay puts the message back and the run completes.
        await staged.GetBlobLeaseClient().BreakAsync(TimeSpan.Zero);
        var replayed = Assert.Single(await FailedMessages.ReplayAsync(_pipeline.Storage, null, CancellationToken.None));
        Assert.NotNull(replayed.ReplayedAt);
        var recovered = await RunReachesAsync(runId, r => r.GetStages().GetValueOrDefault(Stages.Ingest) == RunStatus.Succeeded, "the replayed message to complete ingestion", second);
        Assert.NotNull(recovered.DatasetId);
        Assert.Empty(await FailedMessages.ReplayAsync(_pipeline.Storage, null, CancellationToken.None));
    }

    [Fact]
    public async Task A_host_killed_mid_ingestion_leaves_no_manifest_and_the_redelivered_message_completes_the_dataset()
    {
        var content = new StringBuilder();
        for (var i = 0; content.Length < 60_000_000; i++)
        {
            content.Append("{\"text\":\"record number ").Append(i).Append(" with some words to make it longer than a few bytes\",\"label\":").Append(i % 3).Append("}\n");
        }

        var text = content.ToString();
        var datasetId = "ds-" + RunIds.Hash($"{Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text)))}|{new IngestionOptions().Resolve(null).Fingerprint()}", 24);
        var fast = new Dictionary<string, string>
        {
            ["Pipeline__LocalHost__MessageLease"] = "00:00:04",
            ["Pipeline__Ingestion__ProgressInterval"] = "00:00:00.050",
        };
        var first = new LocalHostProcess(_storage.ConnectionString, fast);
        var runId = await UploadAsync("large.jsonl", text);
        await RunReachesAsync(runId, r => r.GetCounts().GetValueOrDefault("read") > 0, "ingestion to make progress", first);
        first.Kill();
        var output = first.Output;
        first.Dispose();

        var interrupted = (await _pipeline.Runs.GetAsync(runId))!;
        Assert.True(interrupted.GetStages()[Stages.Ingest] != RunStatus.Succeeded, $"the killed host finished the stage\n{output}");
        Assert.Null(await _pipeline.ManifestAsync(datasetId));

        using var second = new LocalHostProcess(_storage.ConnectionString, fast);
        var run = await RunReachesAsync(runId, r => r.GetStages().GetValueOrDefault(Stages.Ingest) == RunStatus.Succeeded, "the redelivered message to complete the dataset", second);
        Assert.Equal(datasetId, run.DatasetId);
        var manifest = (await _pipeline.ManifestAsync(datasetId))!;
        Assert.Equal(text.Count(c => c == '\n'), manifest.Counts.Valid);
    }

    [Fact]
    public async Task Two_hosts_ingest_a_burst_of_100_files_with_each_dataset_produced_exactly_once()
    {
        using var a = new LocalHostProcess(_storage.ConnectionString);
        using var b = new LocalHostProcess(_storage.ConnectionString);
        var runIds = await Task.WhenAll(Enumerable.Range(0, 100).Select(i => UploadAsync($"burst/file-{i:000}.jsonl", $"{{\"text\":\"file {i}\",\"label\":{i % 2}}}\n{{\"text\":\"second row of {i}\",\"label\":0}}\n")));

        var runs = new List<RunRecord>();
        foreach (var runId in runIds)
        {
            runs.Add(await RunReachesAsync(runId, r => r.GetStages().GetValueOrDefault(Stages.Ingest) == RunStatus.Succeeded, $"run {runId} to be ingested", a, b));
        }

        Assert.True(100 == runs.Select(r => r.DatasetId).Distinct().Count(), a.Output + b.Output);
        Assert.All(runs, r => Assert.Equal(1, r.Attempt));
        var manifests = (await _pipeline.ListAsync(StorageNames.Containers.Datasets)).Where(n => n.EndsWith("/manifest.json") && n.Count(c => c == '/') == 1).ToList();
        Assert.Equal(100, manifests.Count);

        // Every ingestion started once and created its dataset once, whichever host ran it.
        var events = await DrainEventsAsync();
        Assert.Equal(100, events.Count(e => e.Type == RunEvents.Types.DatasetCreated));
        var ingestStarts = events.Where(e => e.Type == RunEvents.Types.StageStarted && e.Stage == Stages.Ingest).ToList();
        Assert.Equal(100, ingestStarts.Count);
        Assert.Equal(100, ingestStarts.Select(e => e.RunId).Distinct().Count());
        Assert.Contains("Ingested", a.Output + b.Output);
    }

    private async Task<List<(string Type, string RunId, string Stage)>> DrainEventsAsync()
    {
        var queue = _pipeline.Storage.Queue(StorageNames.Queues.Events);
        var events = new List<(string, string, string)>();
        while (true)
        {
            var batch = (await queue.ReceiveMessagesAsync(32, TimeSpan.FromMinutes(5))).Value;
            if (batch.Length == 0)
            {
                return events;
            }

            foreach (var message in batch)
            {
                using var document = JsonDocument.Parse(message.Body.ToString());
                var root = document.RootElement;
                events.Add((root.GetProperty("type").GetString()!, root.GetProperty("runid").GetString()!, root.GetProperty("data").GetProperty("stage").GetString()!));
            }
        }
    }
}
