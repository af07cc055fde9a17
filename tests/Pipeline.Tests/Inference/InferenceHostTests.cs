using System.Text;
using System.Text.Json;
using Google.Protobuf;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Inference;

/// <summary>Batch inference end to end through the function app in local host mode, on Azurite: commands, queues, fan-out, assembly.</summary>
[Collection(LocalHostProcess.Collection)]
public sealed class InferenceHostTests(HostFixture fixture)
{
    private readonly TestPipeline _pipeline = fixture.Pipeline;

    private Task<RunRecord> FinishedAsync(string runId, LocalHostProcess host) =>
        Eventually.ReturnsAsync(async () => await _pipeline.Runs.GetAsync(runId) is { } run && RunStatus.IsFinal(run.Status) ? run : null,
            TimeSpan.FromSeconds(120), $"run {runId} to finish", () => host.Output);

    private async Task<string> UploadAsync(string container, string name, byte[] content)
    {
        await _pipeline.Storage.Container(container).GetBlobClient(name).UploadAsync(new BinaryData(content), overwrite: true);
        return $"{container}/{name}";
    }

    private static string Envelope<T>(string type, string runId, T body, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> info) =>
        JsonSerializer.Serialize(new MessageEnvelope { Type = type, RunId = runId, Body = JsonSerializer.SerializeToElement(body, info) }, PipelineJson.Default.MessageEnvelope);

    [Fact]
    public async Task An_infer_command_scores_a_file_across_shards_in_input_order()
    {
        var host = await fixture.HostAsync();
        await InferenceStageTests.ClassifierAsync(_pipeline.Storage, "sentiment-tiny");
        var sentences = File.ReadLines(RepoPaths.RequireSharedData("sentiment/amazon_cells_labelled.txt")).Select(l => l.Split('\t')[0]).Take(300).ToList();
        var input = await UploadAsync(StorageNames.Containers.Incoming, "score-me.jsonl", Encoding.UTF8.GetBytes(InferenceStageTests.Jsonl(sentences)));

        await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync(
            Envelope(MessageTypes.Infer, "run-infer-host", new InferenceRequest("sentiment-tiny", input, new InferenceOptions { RowsPerShard = 70 }), InferenceJson.Default.InferenceRequest));
        var run = await FinishedAsync("run-infer-host", host);

        Assert.Equal(RunStatus.Succeeded, run.Status);
        Assert.Equal(5, run.GetCounts()["inferenceShards"]);
        Assert.Equal(300, run.GetCounts()["inferenceRowsSucceeded"]);
        var results = await _pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs, run.GetArtifacts()["results"]["outputs/".Length..]);
        Assert.Equal(Enumerable.Range(0, 300).Select(i => $"r{i}"), results.Select(r => r.GetProperty("custom_id").GetString()));
        var manifest = await _pipeline.ReadAsync(StorageNames.Containers.Outputs, run.GetArtifacts()["inferenceManifest"]["outputs/".Length..]);
        Assert.Contains("\"executionProvider\":\"CPUExecutionProvider\"", manifest);
    }

    [Fact]
    public async Task A_model_folder_dropped_into_models_is_registered_and_scores_embeddings_from_the_inference_queue()
    {
        var host = await fixture.HostAsync();
        var vocabulary = File.ReadAllBytes(RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt"));
        // A folder as Hugging Face tools export an embedding model; config.json arrives first, the graph later.
        await UploadAsync(StorageNames.Containers.Models, "minilm-export/config.json", JsonSerializer.SerializeToUtf8Bytes(new { architectures = new[] { "BertModel" }, vocab_size = 30522, max_position_embeddings = 64 }));
        await Eventually.ReturnsAsync(async () => await _pipeline.Storage.Container(StorageNames.Containers.Models).GetBlobClient("minilm-export/_registration.json").ExistsAsync() ? "" : null,
            TimeSpan.FromSeconds(60), "the incomplete folder's refusal to be recorded", () => host.Output);
        Assert.Contains("no model.onnx", await _pipeline.ReadAsync(StorageNames.Containers.Models, "minilm-export/_registration.json"));

        await UploadAsync(StorageNames.Containers.Models, "minilm-export/vocab.txt", vocabulary);
        await UploadAsync(StorageNames.Containers.Models, "minilm-export/onnx/model.onnx", ModelGenerator.Bert(new EncoderShape(30522, 16, 1, 2, 32, 64), 11).ToByteArray());
        var registered = await Eventually.ReturnsAsync(async () => await BlobJson.ReadAsync(
                _pipeline.Storage.Container(StorageNames.Containers.Models).GetBlobClient("minilm-export/model.json"), ModelJson.Default.ModelManifest, CancellationToken.None),
            TimeSpan.FromSeconds(60), "the dropped folder to be registered", () => host.Output);
        Assert.Equal(ModelTasks.Embedding, registered.Task);

        var input = await UploadAsync(StorageNames.Containers.Outputs, "to-embed/rows.tsv", Encoding.UTF8.GetBytes("key\ttext\na\tThe food was great\nb\t\nc\tNever again\n"));
        await _pipeline.Storage.Queue(StorageNames.Queues.Inference).SendMessageAsync(
            Envelope(MessageTypes.Inference, "run-embed-host", new InferenceRequest("minilm-export", input, new InferenceOptions { Normalize = true }), InferenceJson.Default.InferenceRequest));
        var run = await FinishedAsync("run-embed-host", host);

        Assert.Equal(RunStatus.CompletedWithFailures, run.Status);
        Assert.Contains("empty_text", run.Error);
        var results = await _pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs, run.GetArtifacts()["results"]["outputs/".Length..]);
        Assert.Equal(["a", "c"], results.Select(r => r.GetProperty("custom_id").GetString()));
        Assert.All(results, r => Assert.Equal(16, r.GetProperty("embedding").GetArrayLength()));
        var errors = await _pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs, run.GetArtifacts()["inferenceErrors"]["outputs/".Length..]);
        Assert.Equal("b", Assert.Single(errors).GetProperty("custom_id").GetString());
    }

    [Fact]
    public async Task Retry_failed_through_the_api_writes_a_new_version_that_the_api_then_serves()
    {
        var host = await fixture.HostAsync();
        var http = await fixture.HttpAsync();
        var modelId = $"short-{Guid.NewGuid():n}"[..16];
        // model.json says 64 tokens, the graph has 12 positions: long rows fail until it is registered again with 12.
        var shape = new EncoderShape(30522, 16, 1, 2, 32, 12);
        await InferenceStageTests.ClassifierAsync(_pipeline.Storage, modelId, maxSequenceLength: 64, shape: shape);
        var input = await UploadAsync(StorageNames.Containers.Incoming, $"{modelId}.jsonl", Encoding.UTF8.GetBytes(InferenceStageTests.Jsonl(InferenceStageTests.Sentences.Take(20))));
        var runId = $"run-{modelId}";
        await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync(
            Envelope(MessageTypes.Infer, runId, new InferenceRequest(modelId, input, new InferenceOptions { RowsPerShard = 5 }), InferenceJson.Default.InferenceRequest));
        var first = await FinishedAsync(runId, host);
        Assert.Equal(RunStatus.CompletedWithFailures, first.Status);
        var batchId = first.GetArtifacts()["batch"].Split('/')[1];
        await InferenceStageTests.ClassifierAsync(_pipeline.Storage, modelId, maxSequenceLength: 12, shape: shape);

        var accepted = await http.PostAsync($"/api/batches/{batchId}/retry-failed", null);
        Assert.Equal(System.Net.HttpStatusCode.Accepted, accepted.StatusCode);
        var retryRun = JsonDocument.Parse(await accepted.Content.ReadAsStringAsync()).RootElement.GetProperty("runId").GetString()!;
        Assert.Equal(RunStatus.Succeeded, (await FinishedAsync(retryRun, host)).Status);

        // GET /api/batches serves the new version; the batch's run names it; a second retry finds nothing left to retry.
        var listed = JsonDocument.Parse(await http.GetStringAsync("/api/batches")).RootElement.EnumerateArray().Single(b => b.GetProperty("batchId").GetString() == batchId);
        Assert.Equal((2, 1, 0), (listed.GetProperty("version").GetInt32(), listed.GetProperty("supersedes").GetInt32(), listed.GetProperty("failed").GetInt32()));
        Assert.Equal($"outputs/{batchId}/versions/00002/results.jsonl", (await _pipeline.Runs.GetAsync(runId))!.GetArtifacts()["results"]);
        Assert.Equal(System.Net.HttpStatusCode.Conflict, (await http.PostAsync($"/api/batches/{batchId}/retry-failed", null)).StatusCode);
        var v1 = await BlobJson.ReadAsync(_pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient($"{batchId}/manifest.json"), InferenceJson.Default.InferenceManifest, CancellationToken.None);
        Assert.Equal((1, first.GetCounts()["inferenceRowsFailed"]), (v1!.Version, v1.Failed));
    }
}
