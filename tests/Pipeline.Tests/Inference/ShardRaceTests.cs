using System.Collections.Concurrent;
using System.Text;
using System.Text.Json;
using Azure;
using Microsoft.Extensions.Logging;
using Pipeline.Inference;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;
using Pipeline.Tests.Models;

namespace Pipeline.Tests.Inference;

/// <summary>
/// Two deliveries of one inference shard at the same moment (the queue delivers at least once; a message
/// whose visibility ran out is taken by a second instance while the first still scores it), on parallel
/// tasks against Azurite with the real pretrained starter encoder.
/// </summary>
public sealed class ShardRaceTests(Azurite azurite) : IClassFixture<Azurite>
{
    [Fact]
    public async Task Two_deliveries_of_one_shard_at_once_produce_one_result_set()
    {
        var scorings = new ShardScorings();
        using var pipeline = new TestPipeline(azurite, logs: scorings);
        await new ModelRegistry(pipeline.Storage).AddStarterAsync(StarterModelTests.PackagePath, CancellationToken.None);
        var sentences = InferenceStageTests.Sentences.Take(60).ToList();
        var name = $"race-{Guid.NewGuid():n}.jsonl";
        await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(InferenceStageTests.Jsonl(sentences))));
        var runId = await InferenceStageTests.SendInferAsync(pipeline, StarterModel.ModelId, $"{StorageNames.Containers.Incoming}/{name}", new InferenceOptions { RowsPerShard = 20 });
        var queue = pipeline.Storage.Queue(StorageNames.Queues.InferenceShard);
        var messages = (await queue.ReceiveMessagesAsync(32)).Value;
        Assert.Equal(3, messages.Length);
        var batchId = JsonDocument.Parse(messages[0].Body.ToString()).RootElement.GetProperty("body").GetProperty("batchId").GetString()!;
        var outputs = pipeline.Storage.Container(StorageNames.Containers.Outputs);

        // Each shard's message delivered twice at the same moment: the second as a redelivery (attempt 2).
        var start = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var deliveries = messages.SelectMany(m => new[] { 1, 2 }.Select(attempt => Task.Run(async () =>
        {
            await start.Task;
            try
            {
                await pipeline.StageMessages.InferenceShardAsync(m.Body.ToString(), attempt, CancellationToken.None);
                return (m, attempt, Busy: false);
            }
            catch (RunBusyException)
            {
                // What the host does with it: the message comes back later.
                return (m, attempt, Busy: true);
            }
        }))).ToList();
        start.SetResult();
        var outcomes = await Task.WhenAll(deliveries);

        // The deliveries put back come again, one after another, as the host would redeliver them.
        foreach (var (message, attempt, _) in outcomes.Where(o => o.Busy))
        {
            await pipeline.StageMessages.InferenceShardAsync(message.Body.ToString(), attempt + 1, CancellationToken.None);
        }

        // Every shard was scored once, whatever the interleaving.
        Assert.Equal([0, 1, 2], scorings.Of(batchId).Order());

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Succeeded, run.Status);
        Assert.Equal((60L, 60L, 3L), (run.GetCounts()["inferenceRowsDone"], run.GetCounts()["inferenceRowsSucceeded"], run.GetCounts()["inferenceShardsDone"]));
        var manifest = await InferenceStageTests.ManifestAsync(pipeline, run);
        Assert.Equal((60L, 0L, 3), (manifest.Rows, manifest.Failed, manifest.Shards));

        // One result set: each input row once, in order, with its own text's embedding; one ledger line per row.
        var results = await InferenceStageTests.LinesAsync(pipeline, manifest.Results);
        Assert.Equal(Enumerable.Range(0, 60).Select(i => (long)i), results.Select(r => r.GetProperty("row").GetInt64()));
        Assert.Equal(Enumerable.Range(0, 60).Select(i => $"r{i}"), results.Select(r => r.GetProperty("custom_id").GetString()));
        Assert.All(results, r => Assert.Equal(384, r.GetProperty("embedding").GetArrayLength()));
        var ledger = await InferenceStageTests.LinesAsync(pipeline, manifest.Ledger);
        Assert.Equal(Enumerable.Range(0, 60).Select(i => (long)i), ledger.Select(l => l.GetProperty("row").GetInt64()));

        // No torn shard: each shard's files and its done marker come from the one delivery that scored it.
        for (var shard = 0; shard < 3; shard++)
        {
            var done = (await BlobJson.ReadAsync(outputs.GetBlobClient($"{batchId}/done/{shard:D5}.json"), InferenceJson.Default.ShardOutcome, CancellationToken.None))!;
            var shardLedger = await pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs, $"{batchId}/shards/{shard:D5}/ledger.jsonl");
            Assert.Equal(20, shardLedger.Count);
            Assert.All(shardLedger, l => Assert.Equal(done.Attempt, l.GetProperty("attempts").GetInt32()));
            Assert.All(ledger.Skip(shard * 20).Take(20), l => Assert.Equal(done.Attempt, l.GetProperty("attempts").GetInt32()));
        }

        // Committed once: more deliveries of every shard, at once, change no committed blob.
        var committed = await ETagsAsync(outputs, batchId);
        await Task.WhenAll(messages.Select(m => Task.Run(async () =>
        {
            try
            {
                await pipeline.StageMessages.InferenceShardAsync(m.Body.ToString(), 5, CancellationToken.None);
            }
            catch (RunBusyException)
            {
            }
        })));
        Assert.Equal(committed, await ETagsAsync(outputs, batchId));
        Assert.Equal(3, scorings.Of(batchId).Count);
    }

    private static async Task<Dictionary<string, ETag>> ETagsAsync(Azure.Storage.Blobs.BlobContainerClient outputs, string batchId)
    {
        var tags = new Dictionary<string, ETag>();
        await foreach (var blob in outputs.GetBlobsAsync(Azure.Storage.Blobs.Models.BlobTraits.None, Azure.Storage.Blobs.Models.BlobStates.None, batchId + "/", default))
        {
            tags[blob.Name] = blob.Properties.ETag!.Value;
        }

        return tags;
    }

    /// <summary>The shards the scorer reported scoring (its "Shard {Shard} of {BatchId}: ..." line), per batch.</summary>
    private sealed class ShardScorings : ILoggerProvider
    {
        private readonly ConcurrentQueue<(string BatchId, int Shard)> _scored = new();

        public List<int> Of(string batchId) => [.. _scored.Where(s => s.BatchId == batchId).Select(s => s.Shard)];

        public ILogger CreateLogger(string categoryName) => new Logger(this);

        public void Dispose()
        {
        }

        private sealed class Logger(ShardScorings owner) : ILogger
        {
            public IDisposable? BeginScope<TState>(TState state)
                where TState : notnull => null;

            public bool IsEnabled(LogLevel logLevel) => true;

            public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
            {
                if (state is IReadOnlyList<KeyValuePair<string, object?>> values
                    && values.FirstOrDefault(v => v.Key == "{OriginalFormat}").Value is string format
                    && format.StartsWith("Shard {Shard} of {BatchId}: {Rows} rows", StringComparison.Ordinal))
                {
                    var named = values.ToDictionary(v => v.Key, v => v.Value);
                    owner._scored.Enqueue(((string)named["BatchId"]!, (int)named["Shard"]!));
                }
            }
        }
    }
}
