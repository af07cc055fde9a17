using System.Text;
using System.Text.Json;
using Azure.Storage.Blobs.Specialized;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;
using Microsoft.ML.OnnxRuntime;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Inference;

/// <summary>
/// The batch inference stage with its real handlers, real ONNX Runtime sessions and real tokenizers on
/// Azurite; shard messages are delivered by the test, so redeliveries and failures happen on cue.
/// </summary>
public sealed class InferenceStageTests(Azurite azurite) : IClassFixture<Azurite>, IAsyncLifetime
{
    /// <summary>Each test starts with no shard message of an earlier one left in the class's queue (one that failed midway leaves some).</summary>
    public async Task InitializeAsync() => await azurite.Storage.Queue(StorageNames.Queues.InferenceShard).ClearMessagesAsync();

    public Task DisposeAsync() => Task.CompletedTask;

    private static readonly EncoderShape Tiny = new(30522, 16, 1, 2, 32, 64);

    private static byte[] Vocabulary => File.ReadAllBytes(RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt"));

    public static string[] Sentences => [.. File.ReadLines(RepoPaths.RequireSharedData("sentiment/yelp_labelled.txt")).Select(l => l.Split('\t')[0]).Take(120)];

    public static async Task<ModelManifest> ClassifierAsync(StorageClients storage, string id, int maxSequenceLength = 64, EncoderShape? shape = null)
    {
        var encoder = shape ?? Tiny;
        var weights = new ModelGenerator.Weights(7, 0.5f);
        var model = ModelGenerator.WithClassificationHead(ModelGenerator.Bert(encoder, 3), weights.Normal(2 * encoder.Hidden), [0.1f, -0.1f], 2);
        return await new ModelRegistry(storage).WriteAsync(id, model, Vocabulary, ModelTasks.Classification, ["negative", "positive"], maxSequenceLength,
            new ModelLineage { BaseModel = "generated:bert-tiny" }, CancellationToken.None);
    }

    public static async Task<ModelManifest> EmbedderAsync(StorageClients storage, string id) =>
        await new ModelRegistry(storage).WriteAsync(id, ModelGenerator.BagOfEmbeddings(30522, 8, 5), Vocabulary, ModelTasks.Embedding, [], 64,
            new ModelLineage { BaseModel = "generated:bag-of-embeddings" }, CancellationToken.None);

    public static string Jsonl(IEnumerable<string> texts) =>
        string.Join('\n', texts.Select((t, i) => JsonSerializer.Serialize(new Dictionary<string, string> { ["custom_id"] = $"r{i}", ["text"] = t }))) + "\n";

    private static string Id(string prefix) => $"{prefix}-{Guid.NewGuid():n}"[..20];

    private async Task<string> UploadAsync(string name, string content)
    {
        await azurite.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(content)), overwrite: true);
        return $"{StorageNames.Containers.Incoming}/{name}";
    }

    public static async Task<string> SendInferAsync(TestPipeline pipeline, string modelId, string input, InferenceOptions? options = null, string? runId = null)
    {
        runId ??= Id("run");
        var body = JsonSerializer.SerializeToElement(new InferenceRequest(modelId, input, options), InferenceJson.Default.InferenceRequest);
        var command = JsonSerializer.Serialize(new MessageEnvelope { Type = MessageTypes.Infer, RunId = runId, Body = body }, PipelineJson.Default.MessageEnvelope);
        await pipeline.Commands.HandleAsync(command, 1, CancellationToken.None);
        return runId;
    }

    /// <summary>
    /// Delivers every queued inference-shard message once (as the host would), those queued while it runs too;
    /// returns how many failed. A failed message is visible again when this returns (not before: each message is
    /// delivered once per call, however long the others take), for the next call to deliver.
    /// </summary>
    public static async Task<int> DeliverShardsAsync(TestPipeline pipeline)
    {
        var queue = pipeline.Storage.Queue(StorageNames.Queues.InferenceShard);
        var failed = new List<(string Id, string PopReceipt)>();
        while (true)
        {
            var messages = (await queue.ReceiveMessagesAsync(32, TimeSpan.FromMinutes(5))).Value;
            if (messages.Length == 0)
            {
                foreach (var (id, popReceipt) in failed)
                {
                    await queue.UpdateMessageAsync(id, popReceipt, visibilityTimeout: TimeSpan.Zero);
                }

                return failed.Count;
            }

            foreach (var message in messages)
            {
                try
                {
                    await pipeline.StageMessages.InferenceShardAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                    await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
                }
                catch (Exception) when (message.DequeueCount < 5)
                {
                    failed.Add((message.MessageId, message.PopReceipt));
                }
            }
        }
    }

    public static async Task<InferenceManifest> ManifestAsync(TestPipeline pipeline, RunRecord run)
    {
        var path = run.GetArtifacts()["inferenceManifest"];
        return (await BlobJson.ReadAsync(pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient(path[(StorageNames.Containers.Outputs.Length + 1)..]),
            InferenceJson.Default.InferenceManifest, CancellationToken.None))!;
    }

    public static Task<List<JsonElement>> LinesAsync(TestPipeline pipeline, string path) =>
        pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs, path[(StorageNames.Containers.Outputs.Length + 1)..]);

    [Fact]
    public async Task Batched_padded_scoring_equals_one_row_at_a_time()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        await ClassifierAsync(pipeline.Storage, modelId);
        var settings = new InferenceSettings { ChunkRows = 37, MaxBatchRows = 16, MaxTokensPerBatch = 256 };
        var sessions = new ModelSessions(pipeline.Storage, Options.Create(settings), pipeline.Services.GetRequiredService<Microsoft.Extensions.Logging.ILogger<ModelSessions>>());
        var model = await sessions.GetAsync(modelId, CancellationToken.None);

        var (batched, stats) = await new BatchScorer(model, settings, 256, normalize: false).ScoreAsync(Sentences, CancellationToken.None);
        var oneByOne = new BatchScorer(model, settings with { MaxBatchRows = 1 }, 256, normalize: false);

        Assert.True(stats.Batches < Sentences.Length / 2, $"{stats.Batches} batches for {Sentences.Length} rows");
        Assert.True((double)stats.Tokens / stats.Slots >= 0.9, $"padding {1 - (double)stats.Tokens / stats.Slots:P1} after sorting by length");
        for (var i = 0; i < Sentences.Length; i++)
        {
            var (single, _) = await oneByOne.ScoreAsync([Sentences[i]], CancellationToken.None);
            Assert.Equal(2, batched[i].Values!.Length);
            Assert.Equal(single[0].Values![1], batched[i].Values![1], 4);
            Assert.Equal(1f, batched[i].Values!.Sum(), 4);
        }
    }

    [Fact]
    public async Task Classification_results_keep_input_order_across_shards_and_bad_rows_fail_alone()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        await ClassifierAsync(pipeline.Storage, modelId);
        var lines = Jsonl(Sentences).Split('\n', StringSplitOptions.RemoveEmptyEntries).ToList();
        lines[10] = """{"custom_id":"no-text","score":1}""";
        lines[50] = "{not json";
        lines[77] = """{"custom_id":"empty","text":"  "}""";
        var input = await UploadAsync($"{Id("in")}.jsonl", string.Join('\n', lines) + "\n");

        var runId = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 25 });
        Assert.Equal(0, await DeliverShardsAsync(pipeline));

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.CompletedWithFailures, run.Status);
        Assert.Equal(InferenceHandler.RowsFailedCode, run.ErrorCode);
        Assert.Contains("3 of 120 rows failed", run.Error);
        var manifest = await ManifestAsync(pipeline, run);
        Assert.Equal((5, 120L, 117L, 3L), (manifest.Shards, manifest.Rows, manifest.Succeeded, manifest.Failed));
        Assert.Equal(BatchStatus.CompletedWithFailures, manifest.Status);
        Assert.StartsWith("CPUExecutionProvider", manifest.ExecutionProvider);
        Assert.True(manifest.PaddingFraction <= 0.1, $"padding {manifest.PaddingFraction}");

        var results = await LinesAsync(pipeline, manifest.Results);
        Assert.Equal(117, results.Count);
        Assert.Equal(results.Select(r => r.GetProperty("row").GetInt64()).Order(), results.Select(r => r.GetProperty("row").GetInt64()));
        Assert.Equal("r0", results[0].GetProperty("custom_id").GetString());
        Assert.Equal("r119", results[^1].GetProperty("custom_id").GetString());
        Assert.All(results, r => Assert.Contains(r.GetProperty("label").GetString(), new[] { "negative", "positive" }));
        Assert.All(results, r => Assert.Equal(1.0, r.GetProperty("probabilities").GetProperty("negative").GetDouble() + r.GetProperty("probabilities").GetProperty("positive").GetDouble(), 4));

        var errors = await LinesAsync(pipeline, manifest.Errors);
        Assert.Equal([10L, 50L, 77L], errors.Select(e => e.GetProperty("row").GetInt64()));
        Assert.Equal([RowErrorCodes.TextMissing, "malformed_json", "empty_text"], errors.Select(e => e.GetProperty("code").GetString()));
        Assert.Equal(11, errors[0].GetProperty("line").GetInt64());
        var ledger = await LinesAsync(pipeline, manifest.Ledger);
        Assert.Equal(120, ledger.Count);
        Assert.Equal(3, ledger.Count(l => l.GetProperty("status").GetString() == "failed"));
    }

    [Fact]
    public async Task Embeddings_from_csv_are_pooled_and_normalized_when_asked()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("emb");
        await EmbedderAsync(pipeline.Storage, modelId);
        var input = await UploadAsync($"{Id("in")}.csv", "id,sentence\n1,\"Good food, \"\"great\"\" service\"\n2,\"two\nlines\"\n3,Terrible\n");

        var runId = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { Normalize = true });
        await DeliverShardsAsync(pipeline);

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Succeeded, run.Status);
        var results = await LinesAsync(pipeline, run.GetArtifacts()["results"]);
        Assert.Equal(["1", "2", "3"], results.Select(r => r.GetProperty("custom_id").GetString()));
        foreach (var result in results)
        {
            var vector = result.GetProperty("embedding").EnumerateArray().Select(v => v.GetDouble()).ToArray();
            Assert.Equal(8, vector.Length);
            Assert.Equal(1.0, Math.Sqrt(vector.Sum(v => v * v)), 4);
        }

        // The pooled vector is the masked mean of the token embeddings ONNX Runtime gives for the row alone.
        var manifest = (await new ModelRegistry(pipeline.Storage).ListAsync(CancellationToken.None)).Single(m => m.ModelId == modelId);
        var onnx = (await pipeline.Storage.Container(StorageNames.Containers.Models).GetBlobClient($"{modelId}/model.onnx").DownloadContentAsync()).Value.Content.ToArray();
        using var session = new InferenceSession(onnx);
        var tokenizer = (await Pipeline.Preprocessing.TokenizerSource.LoadAsync(pipeline.Storage, manifest.Tokenizer, CancellationToken.None)).Create();
        var ids = tokenizer.Encode("Terrible", []).Select(i => (long)i).ToArray();
        using var idsValue = OrtValue.CreateTensorValueFromMemory(ids, [1, ids.Length]);
        using var mask = OrtValue.CreateTensorValueFromMemory(Enumerable.Repeat(1L, ids.Length).ToArray(), [1, ids.Length]);
        using var outputs = session.Run(new RunOptions(), new Dictionary<string, OrtValue> { ["input_ids"] = idsValue, ["attention_mask"] = mask }, ["last_hidden_state"]);
        var hidden = outputs[0].GetTensorDataAsSpan<float>().ToArray();
        var mean = Enumerable.Range(0, 8).Select(h => Enumerable.Range(0, ids.Length).Average(t => hidden[t * 8 + h])).ToArray();
        var norm = Math.Sqrt(mean.Sum(v => v * v));
        var expected = mean.Select(v => v / norm).ToArray();
        var actual = results[2].GetProperty("embedding").EnumerateArray().Select(v => v.GetDouble()).ToArray();
        for (var h = 0; h < 8; h++)
        {
            Assert.Equal(expected[h], actual[h], 4);
        }
    }

    [Fact]
    public async Task Redelivered_messages_do_no_work_twice()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        await ClassifierAsync(pipeline.Storage, modelId);
        var input = await UploadAsync($"{Id("in")}.jsonl", Jsonl(Sentences.Take(40)));
        var runId = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 10 });

        // Every shard message delivered twice: the second delivery finds the shard done.
        var queue = pipeline.Storage.Queue(StorageNames.Queues.InferenceShard);
        var messages = (await queue.ReceiveMessagesAsync(32)).Value;
        Assert.Equal(4, messages.Length);
        foreach (var message in messages.Concat(messages))
        {
            await pipeline.StageMessages.InferenceShardAsync(message.Body.ToString(), 1, CancellationToken.None);
        }

        var run = (await pipeline.Runs.GetAsync(runId))!;
        var manifest = await ManifestAsync(pipeline, run);
        var manifestBlob = pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient($"{manifest.BatchId}/manifest.json");
        var committed = (await manifestBlob.GetPropertiesAsync()).Value.ETag;

        // The same command again (same model, same input, same options): same batch, nothing new.
        var again = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 10 }, Id("run"));
        Assert.Empty((await queue.PeekMessagesAsync(32)).Value);
        Assert.Equal(committed, (await manifestBlob.GetPropertiesAsync()).Value.ETag);
        var second = (await pipeline.Runs.GetAsync(again))!;
        Assert.Equal(RunStatus.Succeeded, second.Status);
        Assert.Equal(run.GetArtifacts()["results"], second.GetArtifacts()["results"]);
        Assert.Equal(40, (await LinesAsync(pipeline, manifest.Results)).Count);
    }

    [Fact]
    public async Task A_batch_left_by_a_cancelled_run_is_taken_over_by_the_next_run_that_asks()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        await ClassifierAsync(pipeline.Storage, modelId);
        var input = await UploadAsync($"{Id("in")}.jsonl", Jsonl(Sentences.Take(30)));
        var first = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 10 });
        var queue = pipeline.Storage.Queue(StorageNames.Queues.InferenceShard);

        // One shard is scored, then the run is cancelled: its other shards are skipped.
        var messages = (await queue.ReceiveMessagesAsync(32)).Value;
        await pipeline.StageMessages.InferenceShardAsync(messages[0].Body.ToString(), 1, CancellationToken.None);
        var transitions = (RunTransitions)pipeline.Services.GetService(typeof(RunTransitions))!;
        await transitions.CancelAsync(first, "test");
        foreach (var message in messages)
        {
            await pipeline.StageMessages.InferenceShardAsync(message.Body.ToString(), 1, CancellationToken.None);
            await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
        }

        Assert.Equal(RunStatus.Cancelled, (await pipeline.Runs.GetAsync(first))!.Status);

        // The same request from another run: it takes the batch over, and only the unscored shards are sent again.
        var second = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 10 });
        Assert.Equal(2, (await queue.PeekMessagesAsync(32)).Value.Length);
        await DeliverShardsAsync(pipeline);

        var run = (await pipeline.Runs.GetAsync(second))!;
        Assert.Equal(RunStatus.Succeeded, run.Status);
        Assert.Equal(Enumerable.Range(0, 30).Select(i => (long)i), (await LinesAsync(pipeline, run.GetArtifacts()["results"])).Select(r => r.GetProperty("row").GetInt64()));
        Assert.Equal(RunStatus.Cancelled, (await pipeline.Runs.GetAsync(first))!.Status);
    }

    [Fact]
    public async Task Shards_are_never_scored_by_a_model_registered_again_after_the_batch_was_cut()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        await ClassifierAsync(pipeline.Storage, modelId);
        var input = await UploadAsync($"{Id("in")}.jsonl", Jsonl(Sentences.Take(20)));
        var runId = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 10 });

        await ClassifierAsync(pipeline.Storage, modelId);
        await DeliverShardsAsync(pipeline);

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal((RunStatus.Failed, InferenceErrorCodes.ModelChanged), (run.Status, run.ErrorCode));
        Assert.Contains("registered again", run.Error);
    }

    [Fact]
    public async Task A_failed_shard_is_retried_alone()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        var model = await ClassifierAsync(pipeline.Storage, modelId);
        var input = await UploadAsync($"{Id("in")}.jsonl", Jsonl(Sentences.Take(30)));
        var options = new InferenceOptions { RowsPerShard = 10 };
        var properties = (await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(input["incoming/".Length..]).GetPropertiesAsync()).Value;
        var batchId = InferenceHandler.BatchIdFor(modelId, model.CreatedAt, input, InferenceHandler.VersionOf(properties), options.Resolved(new InferenceSettings().MaxTokensPerBatch));

        // Storage refuses shard 1's results while another party holds a lease on the blob: that shard fails.
        var blocked = pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient($"{batchId}/shards/00001/results.jsonl");
        await blocked.UploadAsync(BinaryData.Empty, overwrite: true);
        var lease = blocked.GetBlobLeaseClient();
        await lease.AcquireAsync(TimeSpan.FromSeconds(-1));

        var runId = await SendInferAsync(pipeline, modelId, input, options);
        Assert.Equal(1, await DeliverShardsAsync(pipeline));
        var waiting = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Running, waiting.Status);
        Assert.Contains("Shard 1", waiting.LastError);
        Assert.Equal(20, waiting.GetCounts()["inferenceRowsDone"]);

        await lease.ReleaseAsync();
        Assert.Equal(0, await DeliverShardsAsync(pipeline));

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Succeeded, run.Status);
        var attempts = new List<int>();
        for (var shard = 0; shard < 3; shard++)
        {
            attempts.Add((await BlobJson.ReadAsync(pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient($"{batchId}/done/{shard:D5}.json"), InferenceJson.Default.ShardOutcome, CancellationToken.None))!.Attempt);
        }

        Assert.Equal([1, 2, 1], attempts);
        Assert.Equal(30, (await LinesAsync(pipeline, run.GetArtifacts()["results"])).Count);
    }

    [Fact]
    public async Task Retry_failed_rescores_only_the_failed_rows_and_merges_them_keeping_every_success()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        // model.json says 64 tokens, but the graph has only 12 positions: longer rows fail in the model.
        await ClassifierAsync(pipeline.Storage, modelId, maxSequenceLength: 64, shape: Tiny with { MaxPositions = 12 });
        var input = await UploadAsync($"{Id("in")}.jsonl", Jsonl(Sentences.Take(40)));
        var runId = await SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 15 });
        await DeliverShardsAsync(pipeline);

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.CompletedWithFailures, run.Status);
        var first = await ManifestAsync(pipeline, run);
        Assert.InRange(first.Failed, 1, 39);
        Assert.StartsWith(RowErrorCodes.ModelError, first.TopError);
        var before = (await LinesAsync(pipeline, first.Results)).ToDictionary(r => r.GetProperty("row").GetInt64(), r => r.GetRawText());

        // The model is registered again with the right length (rows are truncated to fit), and the failed rows retried.
        await ClassifierAsync(pipeline.Storage, modelId, maxSequenceLength: 12, shape: Tiny with { MaxPositions = 12 });
        var retryRun = Id("run");
        var command = JsonSerializer.Serialize(new MessageEnvelope
        {
            Type = MessageTypes.RetryFailed,
            RunId = retryRun,
            Body = JsonSerializer.SerializeToElement(new RetryFailedCommand(first.BatchId), InferenceJson.Default.RetryFailedCommand),
        }, PipelineJson.Default.MessageEnvelope);
        await pipeline.Commands.HandleAsync(command, 1, CancellationToken.None);
        await DeliverShardsAsync(pipeline);

        var retried = (await pipeline.Runs.GetAsync(retryRun))!;
        Assert.Equal(RunStatus.Succeeded, retried.Status);
        Assert.Equal(first.Failed, retried.GetCounts()["inferenceRows"]);
        // The original run now names the batch's new version; the version it supersedes is as it was.
        var merged = await ManifestAsync(pipeline, (await pipeline.Runs.GetAsync(runId))!);
        Assert.Equal((BatchStatus.Completed, 40L, 0L), (merged.Status, merged.Succeeded, merged.Failed));
        Assert.Equal((2, 1), (merged.Version, merged.Supersedes));
        Assert.Equal(JsonSerializer.Serialize(first, InferenceJson.Default.InferenceManifest), JsonSerializer.Serialize(await ManifestAsync(pipeline, run), InferenceJson.Default.InferenceManifest));
        Assert.Single(merged.Retries);
        var results = await LinesAsync(pipeline, merged.Results);
        Assert.Equal(Enumerable.Range(0, 40).Select(i => (long)i), results.Select(r => r.GetProperty("row").GetInt64()));
        Assert.All(before, kept => Assert.Equal(kept.Value, results[(int)kept.Key].GetRawText()));
        Assert.Empty(await LinesAsync(pipeline, merged.Errors));
        var ledger = await LinesAsync(pipeline, merged.Ledger);
        Assert.Equal(first.Failed, ledger.Count(l => l.GetProperty("attempts").GetInt32() == 2));
        Assert.Equal(RunStatus.Succeeded, (await pipeline.Runs.GetAsync(runId))!.Status);

        // Nothing is left to retry: the command is refused with the reason.
        var again = Id("run");
        await pipeline.Commands.HandleAsync(command.Replace(retryRun, again), 1, CancellationToken.None);
        Assert.Equal(InferenceErrorCodes.NothingToRetry, (await pipeline.Runs.GetAsync(again))!.ErrorCode);
    }

    public static TheoryData<string, string, string> BadInputs => new()
    {
        { "empty", "", InferenceErrorCodes.EmptyInput },
        { "blank-lines", "\n\n  \n", InferenceErrorCodes.EmptyInput },
        { "no-text-jsonl", "{\"custom_id\":\"a\",\"score\":3}\n", InferenceErrorCodes.NoTextField },
        { "no-text-csv", "id,score\n1,2\n", InferenceErrorCodes.NoTextField },
        { "missing", "", InferenceErrorCodes.InputNotFound },
    };

    [Theory]
    [MemberData(nameof(BadInputs))]
    public async Task Bad_inputs_fail_the_run_with_a_clear_reason(string name, string content, string code)
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        await ClassifierAsync(pipeline.Storage, modelId);
        var extension = name.EndsWith("csv", StringComparison.Ordinal) ? "csv" : "jsonl";
        var input = name == "missing" ? "incoming/never-uploaded.jsonl" : await UploadAsync($"{Id(name)}.{extension}", content);

        var run = (await pipeline.Runs.GetAsync(await SendInferAsync(pipeline, modelId, input)))!;

        Assert.Equal(RunStatus.Failed, run.Status);
        Assert.Equal(code, run.ErrorCode);
        Assert.Contains(input.Split('/')[1], run.Error);
        Assert.Empty((await pipeline.Storage.Queue(StorageNames.Queues.InferenceShard).PeekMessagesAsync(32)).Value);
    }

    [Fact]
    public async Task Bad_models_fail_the_run_with_a_clear_reason()
    {
        using var pipeline = new TestPipeline(azurite);
        var input = await UploadAsync($"{Id("in")}.jsonl", Jsonl(["fine"]));
        var models = pipeline.Storage.Container(StorageNames.Containers.Models);

        var unknown = (await pipeline.Runs.GetAsync(await SendInferAsync(pipeline, "no-such-model", input)))!;
        Assert.Equal(InferenceErrorCodes.ModelNotFound, unknown.ErrorCode);
        Assert.Contains("pipeline models", unknown.Error);

        var corrupt = Id("corrupt");
        await ClassifierAsync(pipeline.Storage, corrupt);
        await models.GetBlobClient($"{corrupt}/model.onnx").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes("this is not a model")), overwrite: true);
        var broken = (await pipeline.Runs.GetAsync(await SendInferAsync(pipeline, corrupt, input)))!;
        Assert.Equal(InferenceErrorCodes.ModelCorrupt, broken.ErrorCode);
        Assert.Contains("valid ONNX", broken.Error);

        var mismatch = Id("mismatch");
        await ClassifierAsync(pipeline.Storage, mismatch);
        await models.GetBlobClient($"{mismatch}/vocab.txt").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")), overwrite: true);
        var wrong = (await pipeline.Runs.GetAsync(await SendInferAsync(pipeline, mismatch, input)))!;
        Assert.Equal(InferenceErrorCodes.TokenizerMismatch, wrong.ErrorCode);
        Assert.Contains("5 tokens", wrong.Error);
    }
}
