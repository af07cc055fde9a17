using System.Text;
using System.Text.Json;
using Azure;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;
using Pipeline.Tests.OpenAi;

namespace Pipeline.Tests.Inference;

/// <summary>
/// Committed means immutable: <c>retry-failed</c> writes a new version of the batch beside the committed one,
/// every reader takes the newest, and two retries of one batch at the same moment write one version.
/// Real handlers, ONNX Runtime and tokenizers on Azurite; the CLI as its own process.
/// </summary>
public sealed class BatchVersionTests(Azurite azurite) : IClassFixture<Azurite>, IAsyncLifetime
{
    public async Task InitializeAsync() => await azurite.Storage.Queue(StorageNames.Queues.InferenceShard).ClearMessagesAsync();

    public Task DisposeAsync() => Task.CompletedTask;

    // model.json says 64 tokens, but the graph has only 12 positions: longer rows fail in the model until it is registered again with 12.
    private static readonly EncoderShape Short = new(30522, 16, 1, 2, 32, 12);

    private static string Id(string prefix) => $"{prefix}-{Guid.NewGuid():n}"[..20];

    private static string RetryCommand(string batchId, string runId) => JsonSerializer.Serialize(new MessageEnvelope
    {
        Type = MessageTypes.RetryFailed,
        RunId = runId,
        Body = JsonSerializer.SerializeToElement(new RetryFailedCommand(batchId), InferenceJson.Default.RetryFailedCommand),
    }, PipelineJson.Default.MessageEnvelope);

    /// <summary>A finished batch with failed rows: its run and manifest.</summary>
    private async Task<(string RunId, InferenceManifest Manifest)> FailedBatchAsync(TestPipeline pipeline, string modelId, string content, string extension)
    {
        await InferenceStageTests.ClassifierAsync(pipeline.Storage, modelId, maxSequenceLength: 64, shape: Short);
        var name = $"{Id("in")}.{extension}";
        await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(content)));
        var runId = await InferenceStageTests.SendInferAsync(pipeline, modelId, $"{StorageNames.Containers.Incoming}/{name}", new InferenceOptions { RowsPerShard = 4 });
        Assert.Equal(0, await InferenceStageTests.DeliverShardsAsync(pipeline));
        var manifest = await InferenceStageTests.ManifestAsync(pipeline, (await pipeline.Runs.GetAsync(runId))!);
        Assert.InRange(manifest.Failed, 1, manifest.Rows - 1);
        // The model is registered again with the length its graph takes: the failed rows now score (truncated).
        await InferenceStageTests.ClassifierAsync(pipeline.Storage, modelId, maxSequenceLength: 12, shape: Short);
        return (runId, manifest);
    }

    private static async Task<Dictionary<string, (ETag ETag, string Content)>> BlobsAsync(BlobContainerClient outputs, string prefix)
    {
        var blobs = new Dictionary<string, (ETag, string)>();
        await foreach (var blob in outputs.GetBlobsAsync(BlobTraits.None, BlobStates.None, prefix, default))
        {
            blobs[blob.Name] = (blob.Properties.ETag!.Value, (await outputs.GetBlobClient(blob.Name).DownloadContentAsync()).Value.Content.ToString());
        }

        return blobs;
    }

    [Fact]
    public async Task Retry_failed_writes_a_new_version_that_every_reader_takes_and_leaves_the_committed_one_as_it_was()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        var sentences = InferenceStageTests.Sentences.Take(12).ToList();
        var requests = sentences.Select((s, i) => OpenAiBatchFormatTests.Request($"q{i}", i == 5 ? new[] { s, "short" } : s, modelId, OpenAiBatchFormat.Classifications));
        var (runId, first) = await FailedBatchAsync(pipeline, modelId, string.Join('\n', requests) + "\n", "jsonl");
        var outputs = pipeline.Storage.Container(StorageNames.Containers.Outputs);
        var committed = await BlobsAsync(outputs, first.BatchId + "/");
        Assert.DoesNotContain(committed.Keys, name => name.Contains("/versions/", StringComparison.Ordinal));

        var retryRun = Id("run");
        await pipeline.Commands.HandleAsync(RetryCommand(first.BatchId, retryRun), 1, CancellationToken.None);
        Assert.Equal(0, await InferenceStageTests.DeliverShardsAsync(pipeline));
        Assert.Equal(RunStatus.Succeeded, (await pipeline.Runs.GetAsync(retryRun))!.Status);

        // Every blob of version 1 is byte for byte what was committed (same ETags); what is new is under versions/00002/.
        var after = await BlobsAsync(outputs, first.BatchId + "/");
        foreach (var (name, blob) in committed)
        {
            Assert.True(after.TryGetValue(name, out var now), $"{name} was deleted");
            Assert.Equal(blob.ETag, now.ETag);
            Assert.Equal(blob.Content, now.Content);
        }

        var added = after.Keys.Except(committed.Keys).ToList();
        Assert.NotEmpty(added);
        Assert.All(added, name => Assert.StartsWith($"{first.BatchId}/versions/00002/", name));

        var files = new BatchFiles(pipeline.Storage, first.BatchId);
        var (newest, newestFiles) = (await files.NewestAsync(CancellationToken.None))!.Value;
        Assert.Equal((2, 1, 0L, 0L), (newest.Version, newest.Supersedes, newest.Failed, newest.OpenAiFailed));
        Assert.Equal($"{StorageNames.Containers.Outputs}/{first.BatchId}/versions/00002/results.jsonl", newest.Results);
        Assert.Equal(newestFiles.Version, newest.Version);
        Assert.NotNull(newest.ShardVersions);
        Assert.All(newest.ShardVersions!.Values, v => Assert.Equal(2, v));

        // The original run names the new version.
        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Succeeded, run.Status);
        Assert.Equal(newest.Results, run.GetArtifacts()["results"]);
        Assert.Equal($"{StorageNames.Containers.Outputs}/{first.BatchId}/versions/00002/manifest.json", run.GetArtifacts()["inferenceManifest"]);

        // The batch list (GET /api/batches, pipeline batches) shows the new version.
        var listed = (await BatchCatalog.ListAsync(pipeline.Storage, CancellationToken.None)).Single(b => b.BatchId == first.BatchId);
        Assert.Equal((2, 0L), (listed.Version, listed.Failed));

        // OpenAI's output file (GET /v1/files/file-<batch>-output/content) is the new version's: every request answered.
        var openAi = new OpenAiFiles(pipeline.Storage);
        using (var output = new StreamReader((await openAi.OpenReadAsync(OpenAiFiles.OutputFileId(first.BatchId), CancellationToken.None))!))
        {
            var lines = (await output.ReadToEndAsync()).Split('\n', StringSplitOptions.RemoveEmptyEntries);
            Assert.Equal(Enumerable.Range(0, 12).Select(i => $"q{i}"), lines.Select(l => JsonDocument.Parse(l).RootElement.GetProperty("custom_id").GetString()));
        }

        using (var errors = new StreamReader((await openAi.OpenReadAsync(OpenAiFiles.ErrorFileId(first.BatchId), CancellationToken.None))!))
        {
            Assert.Equal("", await errors.ReadToEndAsync());
        }

        // The CLI, as its own process: the batch list and the lineage name version 2.
        var (code, json, error) = await Cli.CliTests.RunAsync(azurite.ConnectionString, "batches", "-o", "json");
        Assert.True(code == 0, error);
        var batch = JsonDocument.Parse(json).RootElement.EnumerateArray().Single(b => b.GetProperty("batchId").GetString() == first.BatchId);
        Assert.Equal((2, 0), (batch.GetProperty("version").GetInt32(), batch.GetProperty("failed").GetInt32()));
        (code, json, error) = await Cli.CliTests.RunAsync(azurite.ConnectionString, "lineage", first.BatchId, "-o", "json");
        Assert.True(code == 0, error);
        var lineage = JsonDocument.Parse(json).RootElement.GetProperty("batch");
        Assert.Equal($"{StorageNames.Containers.Outputs}/{first.BatchId}/versions/00002/manifest.json", lineage.GetProperty("manifest").GetString());
        Assert.Equal((0, newest.Results), (lineage.GetProperty("failed").GetInt32(), lineage.GetProperty("results").GetString()));

        // Nothing is left to retry in the newest version: the command is refused with the reason.
        var again = Id("run");
        await pipeline.Commands.HandleAsync(RetryCommand(first.BatchId, again), 1, CancellationToken.None);
        Assert.Equal(InferenceErrorCodes.NothingToRetry, (await pipeline.Runs.GetAsync(again))!.ErrorCode);
    }

    [Fact]
    public async Task Two_retry_failed_commands_for_one_batch_at_once_write_one_new_version()
    {
        using var pipeline = new TestPipeline(azurite);
        var (runId, first) = await FailedBatchAsync(pipeline, Id("cls"), InferenceStageTests.Jsonl(InferenceStageTests.Sentences.Take(24)), "jsonl");
        var outputs = pipeline.Storage.Container(StorageNames.Containers.Outputs);
        var committed = await BlobsAsync(outputs, first.BatchId + "/");

        // Two retry-failed commands for the batch (two users, or the API and the CLI), released together.
        var runs = new[] { Id("run"), Id("run") };
        var start = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var sent = runs.Select(r => Task.Run(async () =>
        {
            await start.Task;
            try
            {
                await pipeline.Commands.HandleAsync(RetryCommand(first.BatchId, r), 1, CancellationToken.None);
                return (r, Busy: false);
            }
            catch (RunBusyException)
            {
                return (r, Busy: true);
            }
        })).ToList();
        start.SetResult();
        var outcomes = await Task.WhenAll(sent);

        // The shards of the retry, delivered twice each at the same moment, then the busy command again, as the host would.
        var queue = pipeline.Storage.Queue(StorageNames.Queues.InferenceShard);
        var messages = (await queue.ReceiveMessagesAsync(32)).Value;
        Assert.NotEmpty(messages);
        await Task.WhenAll(messages.Concat(messages).Select(m => Task.Run(async () =>
        {
            try
            {
                await pipeline.StageMessages.InferenceShardAsync(m.Body.ToString(), 1, CancellationToken.None);
            }
            catch (RunBusyException)
            {
            }
        })));
        foreach (var message in messages)
        {
            await pipeline.StageMessages.InferenceShardAsync(message.Body.ToString(), 2, CancellationToken.None);
            await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
        }

        foreach (var (busyRun, _) in outcomes.Where(o => o.Busy))
        {
            await pipeline.Commands.HandleAsync(RetryCommand(first.BatchId, busyRun), 2, CancellationToken.None);
        }

        // Both runs end with the one retry; the batch has exactly one new version.
        var ended = await Task.WhenAll(runs.Select(async r => (await pipeline.Runs.GetAsync(r))!));
        Assert.All(ended, r => Assert.Equal(RunStatus.Succeeded, r.Status));
        Assert.Single(ended.Select(r => r.GetArtifacts()["results"]).Distinct());
        var after = await BlobsAsync(outputs, first.BatchId + "/");
        Assert.Equal([$"{first.BatchId}/versions/00002/manifest.json"], after.Keys.Where(n => n.EndsWith("/manifest.json", StringComparison.Ordinal) && n.Contains("/versions/", StringComparison.Ordinal)));
        Assert.All(committed, c => Assert.Equal(c.Value.ETag, after[c.Key].ETag));
        var newest = (await new BatchFiles(pipeline.Storage, first.BatchId).NewestAsync(CancellationToken.None))!.Value.Manifest;
        Assert.Equal((2, 0L, 24L), (newest.Version, newest.Failed, newest.Succeeded));
        Assert.Single(newest.Retries);
        var results = await InferenceStageTests.LinesAsync(pipeline, newest.Results);
        Assert.Equal(Enumerable.Range(0, 24).Select(i => (long)i), results.Select(r => r.GetProperty("row").GetInt64()));
        var ledger = await InferenceStageTests.LinesAsync(pipeline, newest.Ledger);
        Assert.Equal(first.Failed, ledger.Count(l => l.GetProperty("attempts").GetInt32() == 2));
        Assert.Equal(RunStatus.Succeeded, (await pipeline.Runs.GetAsync(runId))!.Status);
    }
}
