using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Inference;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.OpenAi;

/// <summary>
/// Inputs in OpenAI's batch format through the real inference stage (real ONNX Runtime sessions and tokenizers on
/// Azurite, shards delivered by the test): one output line per request, failed requests in the error file.
/// </summary>
public sealed class OpenAiBatchFormatTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static string Id(string prefix) => $"{prefix}-{Guid.NewGuid():n}"[..20];

    public static string Request(string customId, object input, string model, string url = OpenAiBatchFormat.Embeddings, Dictionary<string, object>? extra = null)
    {
        var body = new Dictionary<string, object> { ["model"] = model, ["input"] = input };
        foreach (var (key, value) in extra ?? [])
        {
            body[key] = value;
        }

        return JsonSerializer.Serialize(new Dictionary<string, object> { ["custom_id"] = customId, ["method"] = "POST", ["url"] = url, ["body"] = body });
    }

    private async Task<string> UploadAsync(string content)
    {
        // No extension, as the Files API stores them: the format is read from the first line.
        var name = $"openai-in/{Id("file")}";
        await azurite.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient(name).UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(content)), overwrite: true);
        return $"{StorageNames.Containers.Outputs}/{name}";
    }

    [Fact]
    public async Task Each_request_gets_one_output_line_and_each_failed_request_one_error_line()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("emb");
        await InferenceStageTests.EmbedderAsync(pipeline.Storage, modelId);
        string[] lines =
        [
            Request("a", "The food was great.", modelId),
            Request("b", new[] { "Never again.", "Fine, I guess.", "Loved the staff." }, modelId),
            Request("c", "Cold soup.", modelId, extra: new() { ["encoding_format"] = "base64" }),
            Request("d", "Right width.", modelId, extra: new() { ["dimensions"] = 8 }),
            Request("e", "Shorter, please.", modelId, extra: new() { ["dimensions"] = 4 }),
            Request("f", "Hello", modelId, url: "/v1/chat/completions"),
            Request("g", "Which label?", modelId, url: OpenAiBatchFormat.Classifications),
            Request("h", "Someone else's model.", "text-embedding-3-small"),
            Request("i", new[] { "fine", " " }, modelId),
            Request("j", "Tiny ints.", modelId, extra: new() { ["encoding_format"] = "int8" }),
            "{not json",
            Request("k", "The last one.", modelId),
        ];
        var input = await UploadAsync(string.Join('\n', lines) + "\n");

        var runId = await InferenceStageTests.SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 2 });
        await InferenceStageTests.DeliverShardsAsync(pipeline);

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.CompletedWithFailures, run.Status);
        var manifest = await InferenceStageTests.ManifestAsync(pipeline, run);
        Assert.Equal((12L, 7L), (manifest.OpenAiRequests, manifest.OpenAiFailed));
        Assert.Equal((12L, 7L), (run.GetCounts()["openAiRequests"], run.GetCounts()["openAiRequestsFailed"]));
        // Request b's three items (rows 1 to 3) are answered together: the shard cut due after row 1 waits for row 3.
        var plan = (await BlobJson.ReadAsync(pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient($"{manifest.BatchId}/plan.json"), InferenceJson.Default.BatchPlan, CancellationToken.None))!;
        Assert.Equal((0L, 4), (plan.Shards[0].FirstRow, plan.Shards[0].Rows));
        Assert.Equal(15, plan.Rows);

        var output = await InferenceStageTests.LinesAsync(pipeline, manifest.OpenAiOutput!);
        Assert.Equal(["a", "b", "c", "d", "k"], output.Select(o => o.GetProperty("custom_id").GetString()));
        var results = (await InferenceStageTests.LinesAsync(pipeline, manifest.Results)).ToDictionary(r => r.GetProperty("row").GetInt64());
        foreach (var line in output)
        {
            Assert.StartsWith("batch_req_", line.GetProperty("id").GetString());
            Assert.Equal(JsonValueKind.Null, line.GetProperty("error").ValueKind);
            var response = line.GetProperty("response");
            Assert.Equal(200, response.GetProperty("status_code").GetInt32());
            var body = response.GetProperty("body");
            Assert.Equal(("list", modelId), (body.GetProperty("object").GetString(), body.GetProperty("model").GetString()));
            Assert.True(body.GetProperty("usage").GetProperty("prompt_tokens").GetInt32() > 0);
            Assert.Equal(body.GetProperty("usage").GetProperty("prompt_tokens").GetInt32(), body.GetProperty("usage").GetProperty("total_tokens").GetInt32());
        }

        var b = output[1].GetProperty("response").GetProperty("body").GetProperty("data");
        Assert.Equal([0, 1, 2], b.EnumerateArray().Select(d => d.GetProperty("index").GetInt32()));
        Assert.All(b.EnumerateArray(), d => Assert.Equal("embedding", d.GetProperty("object").GetString()));
        for (var item = 0; item < 3; item++)
        {
            Assert.Equal(Floats(results[1 + item].GetProperty("embedding")), Floats(b[item].GetProperty("embedding")));
        }

        // base64: the float32 values' little-endian bytes, the same vector as the float form in Pipeline's results.
        var encoded = Convert.FromBase64String(output[2].GetProperty("response").GetProperty("body").GetProperty("data")[0].GetProperty("embedding").GetString()!);
        Assert.Equal(Floats(results[4].GetProperty("embedding")), MemoryMarshal.Cast<byte, float>(encoded).ToArray());
        Assert.Equal(8, output[3].GetProperty("response").GetProperty("body").GetProperty("data")[0].GetProperty("embedding").GetArrayLength());

        var errors = await InferenceStageTests.LinesAsync(pipeline, manifest.OpenAiErrors!);
        var byId = errors.ToDictionary(e => e.GetProperty("custom_id").GetString() ?? "(none)", e => e.GetProperty("error"));
        Assert.Equal(["e", "f", "g", "h", "i", "j", "(none)"], byId.Keys);
        Assert.All(errors, e => Assert.Equal(JsonValueKind.Null, e.GetProperty("response").ValueKind));
        Assert.Equal(OpenAiBatchFormat.Codes.UnsupportedDimensions, byId["e"].GetProperty("code").GetString());
        Assert.Contains("8 dimensions", byId["e"].GetProperty("message").GetString());
        Assert.Equal(OpenAiBatchFormat.Codes.UnsupportedUrl, byId["f"].GetProperty("code").GetString());
        Assert.Contains("/v1/embeddings", byId["f"].GetProperty("message").GetString());
        Assert.Equal(OpenAiBatchFormat.Codes.WrongEndpoint, byId["g"].GetProperty("code").GetString());
        Assert.Equal(OpenAiBatchFormat.Codes.ModelMismatch, byId["h"].GetProperty("code").GetString());
        Assert.Contains("text-embedding-3-small", byId["h"].GetProperty("message").GetString());
        Assert.Equal("empty_text", byId["i"].GetProperty("code").GetString());
        Assert.Contains("body.input[1]", byId["i"].GetProperty("message").GetString());
        Assert.Equal(OpenAiBatchFormat.Codes.InvalidEncodingFormat, byId["j"].GetProperty("code").GetString());
        Assert.Equal("malformed_json", byId["(none)"].GetProperty("code").GetString());
        Assert.StartsWith("line 11:", byId["(none)"].GetProperty("message").GetString());

        // Pipeline's own files stay beside them: a row per input item, failed rows in errors.jsonl.
        Assert.Equal(8, results.Count);
        Assert.Equal(7, (await InferenceStageTests.LinesAsync(pipeline, manifest.Errors)).Count);
    }

    private static float[] Floats(JsonElement array) => [.. array.EnumerateArray().Select(v => v.GetSingle())];

    [Fact]
    public async Task A_duplicate_custom_id_refuses_the_batch_naming_both_lines()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("emb");
        await InferenceStageTests.EmbedderAsync(pipeline.Storage, modelId);
        var input = await UploadAsync(string.Join('\n', Request("same", "one", modelId), Request("other", "two", modelId), "", Request("same", "three", modelId)));

        var run = (await pipeline.Runs.GetAsync(await InferenceStageTests.SendInferAsync(pipeline, modelId, input)))!;

        Assert.Equal(RunStatus.Failed, run.Status);
        Assert.Equal(InferenceErrorCodes.DuplicateCustomId, run.ErrorCode);
        Assert.Contains("custom_id 'same' on line 4 was already used on line 1", run.Error);
    }

    [Fact]
    public async Task Classifier_requests_are_answered_at_v1_classifications_and_retry_failed_completes_the_output()
    {
        using var pipeline = new TestPipeline(azurite);
        var modelId = Id("cls");
        // model.json says 64 tokens, but the graph has only 12 positions: long requests fail in the model.
        var shape = new EncoderShape(30522, 16, 1, 2, 32, 12);
        await InferenceStageTests.ClassifierAsync(pipeline.Storage, modelId, maxSequenceLength: 64, shape: shape);
        var sentences = InferenceStageTests.Sentences.Take(12).ToList();
        var requests = sentences.Select((s, i) => Request($"q{i}", i == 5 ? new[] { s, "short" } : s, modelId, OpenAiBatchFormat.Classifications)).ToList();
        var input = await UploadAsync(string.Join('\n', requests));
        var runId = await InferenceStageTests.SendInferAsync(pipeline, modelId, input, new InferenceOptions { RowsPerShard = 4 });
        await InferenceStageTests.DeliverShardsAsync(pipeline);

        var run = (await pipeline.Runs.GetAsync(runId))!;
        var first = await InferenceStageTests.ManifestAsync(pipeline, run);
        Assert.InRange(first.OpenAiFailed!.Value, 1, 11);
        Assert.All(await InferenceStageTests.LinesAsync(pipeline, first.OpenAiErrors!), e => Assert.Equal(RowErrorCodes.ModelError, e.GetProperty("error").GetProperty("code").GetString()));

        await InferenceStageTests.ClassifierAsync(pipeline.Storage, modelId, maxSequenceLength: 12, shape: shape);
        var command = JsonSerializer.Serialize(new MessageEnvelope
        {
            Type = MessageTypes.RetryFailed,
            RunId = Id("run"),
            Body = JsonSerializer.SerializeToElement(new RetryFailedCommand(first.BatchId), InferenceJson.Default.RetryFailedCommand),
        }, PipelineJson.Default.MessageEnvelope);
        await pipeline.Commands.HandleAsync(command, 1, CancellationToken.None);
        await InferenceStageTests.DeliverShardsAsync(pipeline);

        var merged = await InferenceStageTests.ManifestAsync(pipeline, (await pipeline.Runs.GetAsync(runId))!);
        Assert.Equal((12L, 0L), (merged.OpenAiRequests, merged.OpenAiFailed));
        Assert.Empty(await InferenceStageTests.LinesAsync(pipeline, merged.OpenAiErrors!));
        var output = await InferenceStageTests.LinesAsync(pipeline, merged.OpenAiOutput!);
        Assert.Equal(Enumerable.Range(0, 12).Select(i => $"q{i}"), output.Select(o => o.GetProperty("custom_id").GetString()));
        var data = output[5].GetProperty("response").GetProperty("body").GetProperty("data");
        Assert.Equal(2, data.GetArrayLength());
        foreach (var item in data.EnumerateArray())
        {
            Assert.Equal("classification", item.GetProperty("object").GetString());
            var probabilities = item.GetProperty("probabilities").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetSingle());
            Assert.Equal(["negative", "positive"], probabilities.Keys);
            Assert.Equal(1f, probabilities.Values.Sum(), 3);
            Assert.Equal(probabilities.MaxBy(p => p.Value).Key, item.GetProperty("label").GetString());
        }
    }

    [Fact]
    public void Api_keys_are_checked_as_bearer_tokens_and_required_unless_anonymous_is_allowed()
    {
        Assert.Null(OpenAiApiKeys.Check(null, allowAnonymous: true, authorization: null));
        Assert.Equal("api_keys_not_configured", OpenAiApiKeys.Check(null, allowAnonymous: false, "Bearer anything")!.Code);
        Assert.Null(OpenAiApiKeys.Check("old-key; sk-live", allowAnonymous: false, "Bearer sk-live"));
        Assert.Null(OpenAiApiKeys.Check("sk-live", allowAnonymous: false, null, "sk-live"));
        Assert.Equal("invalid_api_key", OpenAiApiKeys.Check("sk-live", allowAnonymous: true, "Bearer sk-wrong")!.Code);
        Assert.Equal(401, OpenAiApiKeys.Check("sk-live", allowAnonymous: true, null, null, null)!.Status);
        Assert.Equal("missing_api_key", OpenAiApiKeys.Check("sk-live", allowAnonymous: true, "Basic abc")!.Code);
        // A key that is a prefix of the real one, or the real one with more after it, is not it.
        Assert.Equal("invalid_api_key", OpenAiApiKeys.Check("sk-live", allowAnonymous: false, "Bearer sk-liv")!.Code);
        Assert.Equal("invalid_api_key", OpenAiApiKeys.Check("sk-live", allowAnonymous: false, "Bearer sk-live2")!.Code);
    }

    [Fact]
    public void Plain_records_with_url_and_body_fields_are_not_taken_for_batch_requests()
    {
        Assert.True(OpenAiBatchFormat.IsRequestLine("""{"custom_id":"r1","method":"POST","url":"/v1/embeddings","body":{"input":"x"}}"""));
        // A scraped page: its url is a web address and its body is the text to score.
        Assert.False(OpenAiBatchFormat.IsRequestLine("""{"id":"1","url":"https://example.com/a","body":"article text"}"""));
        Assert.False(OpenAiBatchFormat.IsRequestLine("""{"custom_id":"r1","url":"/v1/embeddings","body":"text"}"""));
        Assert.False(OpenAiBatchFormat.IsRequestLine("""{"url":"/v1/embeddings","body":{"input":"x"}}"""));
    }
}
