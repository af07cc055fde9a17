using System.ClientModel;
using System.ClientModel.Primitives;
using System.Net;
using System.Text;
using System.Text.Json;
using OpenAI;
using OpenAI.Batch;
using OpenAI.Files;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Inference;
using Pipeline.Tests.Infrastructure;
using Pipeline.Tests.Models;

#pragma warning disable OPENAI001 // The SDK marks its Batch client experimental.

namespace Pipeline.Tests.OpenAi;

/// <summary>One Azurite and one local host (with an API key set) for the SDK tests, the starter encoder registered.</summary>
public sealed class OpenAiHost : IAsyncLifetime
{
    public const string Key = "sk-pipeline-test-key";
    private readonly Azurite _azurite = new();

    public TestPipeline Pipeline { get; private set; } = null!;
    public string ConnectionString => _azurite.ConnectionString;
    public LocalHostProcess Host { get; private set; } = null!;
    public HttpClient Http { get; private set; } = null!;

    public async Task InitializeAsync()
    {
        await _azurite.InitializeAsync();
        Pipeline = new TestPipeline(_azurite);
        await Pipeline.Storage.EnsureCreatedAsync();
        await new ModelRegistry(Pipeline.Storage).AddStarterAsync(StarterModelTests.PackagePath, CancellationToken.None);
        Host = new LocalHostProcess(_azurite.ConnectionString, new Dictionary<string, string> { ["Pipeline__LocalHost__WatchIncoming"] = "false", ["Pipeline__OpenAi__ApiKeys"] = Key });
        Http = await Host.WaitUntilListeningAsync();
    }

    public async Task DisposeAsync()
    {
        Http.Dispose();
        Host.Dispose();
        Pipeline.Dispose();
        await _azurite.DisposeAsync();
    }
}

/// <summary>
/// The official OpenAI .NET SDK against the local host's <c>/v1</c>: files uploaded, batches created, polled,
/// cancelled and listed, outputs downloaded, on the real starter encoder (all-MiniLM-L6-v2) through the real
/// worker, compared with the same rows scored through the inference stage's own JSONL input.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class OpenAiSdkTests(OpenAiHost fixture) : IClassFixture<OpenAiHost>
{
    private const string Key = OpenAiHost.Key;
    private readonly TestPipeline _pipeline = fixture.Pipeline;
    private readonly LocalHostProcess _host = fixture.Host;
    private readonly HttpClient _http = fixture.Http;
    private readonly string _connectionString = fixture.ConnectionString;
    private readonly OpenAIFileClient _files = Client(fixture.Host.Port, Key).GetOpenAIFileClient();
    private readonly BatchClient _batches = Client(fixture.Host.Port, Key).GetBatchClient();

    /// <summary>The SDK as a user configures it for Pipeline: the API key, and the base URL of the app's /v1.</summary>
    private static OpenAIClient Client(int port, string key) =>
        new(new ApiKeyCredential(key), new OpenAIClientOptions { Endpoint = new Uri($"http://127.0.0.1:{port}/v1"), RetryPolicy = new ClientRetryPolicy(0) });

    private static string Embedding(string customId, object input, Dictionary<string, object>? extra = null) =>
        OpenAiBatchFormatTests.Request(customId, input, StarterModel.ModelId, extra: extra);

    private async Task<string> UploadAsync(IEnumerable<string> lines) =>
        (await _files.UploadFileAsync(BinaryData.FromString(string.Join('\n', lines) + "\n"), "requests.jsonl", FileUploadPurpose.Batch)).Value.Id;

    private static BinaryContent CreateBody(string fileId, string endpoint = OpenAiBatchFormat.Embeddings, object? metadata = null) =>
        BinaryContent.Create(BinaryData.FromObjectAsJson(new { input_file_id = fileId, endpoint, completion_window = "24h", metadata }));

    private static JsonElement Json(ClientResult result) => JsonDocument.Parse(result.GetRawResponse().Content.ToString()).RootElement.Clone();

    /// <summary>Polls the batch with the SDK until it reaches a final status; returns the batch object.</summary>
    private async Task<JsonElement> CompletedAsync(CreateBatchOperation operation)
    {
        await Eventually.ReturnsAsync(async () =>
        {
            await operation.UpdateStatusAsync();
            return operation.HasCompleted ? "" : null;
        }, TimeSpan.FromSeconds(180), $"batch {operation.BatchId} to end", () => _host.Output);
        return Json(await operation.GetBatchAsync(new RequestOptions()));
    }

    private static List<JsonElement> Lines(BinaryData content) =>
        [.. content.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement.Clone())];

    private static float[] Floats(JsonElement array) => [.. array.EnumerateArray().Select(v => v.GetSingle())];

    /// <summary>Every embedding of an output file in order, base64 ones decoded.</summary>
    private static List<float[]> VectorsOf(List<JsonElement> output) =>
        [.. output.SelectMany(line => line.GetProperty("response").GetProperty("body").GetProperty("data").EnumerateArray()).Select(item =>
            item.GetProperty("embedding").ValueKind == JsonValueKind.String
                ? System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(Convert.FromBase64String(item.GetProperty("embedding").GetString()!)).ToArray()
                : Floats(item.GetProperty("embedding")))];

    [Fact]
    public async Task A_batch_submitted_with_the_sdk_returns_the_embeddings_the_inference_stage_computes()
    {
        var sentences = File.ReadLines(RepoPaths.RequireSharedData("sentiment/amazon_cells_labelled.txt")).Select(l => l.Split('\t')[0]).Take(24).ToList();
        var requests = sentences.Take(20).Select((s, i) => Embedding($"request-{i}", s)).ToList();
        requests.Add(Embedding("request-array", sentences.Skip(20).Take(3).ToArray()));
        requests.Add(Embedding("request-base64", sentences[23], new() { ["encoding_format"] = "base64" }));
        var fileId = await UploadAsync(requests);

        var file = (await _files.GetFileAsync(fileId)).Value;
        Assert.Equal(("requests.jsonl", FilePurpose.Batch), (file.Filename, file.Purpose));
        Assert.Equal(Encoding.UTF8.GetByteCount(string.Join('\n', requests) + "\n"), file.SizeInBytes);

        var operation = await _batches.CreateBatchAsync(CreateBody(fileId, metadata: new { team = "search" }), waitUntilCompleted: false);
        Assert.StartsWith("batch_", operation.BatchId);
        var batch = await CompletedAsync(operation);

        Assert.Equal("completed", batch.GetProperty("status").GetString());
        var counts = batch.GetProperty("request_counts");
        Assert.Equal((22, 22, 0), (counts.GetProperty("total").GetInt32(), counts.GetProperty("completed").GetInt32(), counts.GetProperty("failed").GetInt32()));
        Assert.Equal(JsonValueKind.Null, batch.GetProperty("error_file_id").ValueKind);
        Assert.Equal("search", batch.GetProperty("metadata").GetProperty("team").GetString());
        Assert.True(batch.GetProperty("completed_at").GetInt64() >= batch.GetProperty("created_at").GetInt64());
        var outputFileId = batch.GetProperty("output_file_id").GetString()!;
        Assert.Equal(FilePurpose.BatchOutput, (await _files.GetFileAsync(outputFileId)).Value.Purpose);
        var output = Lines((await _files.DownloadFileAsync(outputFileId)).Value);

        // The same sentences scored by `pipeline infer` from a plain JSONL (custom_id, text), and the very same request file.
        var work = Directory.CreateTempSubdirectory("pipeline-openai-").FullName;
        var plainFile = Path.Combine(work, "rows.jsonl");
        var requestFile = Path.Combine(work, "requests.jsonl");
        await File.WriteAllTextAsync(plainFile, InferenceStageTests.Jsonl(sentences));
        await File.WriteAllTextAsync(requestFile, string.Join('\n', requests) + "\n");
        var plain = await Cli.CliTests.RunAsync(_connectionString, "infer", "--model", StarterModel.ModelId, plainFile, "--wait", "--timeout", "150", "-o", "json");
        Assert.True(plain.ExitCode == 0, plain.Output + plain.Error);
        var plainRun = JsonDocument.Parse(plain.Output).RootElement;
        var expected = (await _pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs, plainRun.GetProperty("artifacts").GetProperty("results").GetString()!["outputs/".Length..]))
            .ToDictionary(r => r.GetProperty("custom_id").GetString()!, r => Floats(r.GetProperty("embedding")));
        var same = await Cli.CliTests.RunAsync(_connectionString, "infer", "--model", StarterModel.ModelId, requestFile, "--wait", "--timeout", "150", "-o", "json");
        Assert.True(same.ExitCode == 0, same.Output + same.Error);
        var sameOutput = await _pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs,
            JsonDocument.Parse(same.Output).RootElement.GetProperty("artifacts").GetProperty("openAiOutput").GetString()!["outputs/".Length..]);
        Directory.Delete(work, recursive: true);
        Assert.Equal(output.Select(o => o.GetProperty("custom_id").GetString()), sameOutput.Select(o => o.GetProperty("custom_id").GetString()));
        Assert.Equal(output.Select(o => o.GetProperty("response").GetProperty("body").GetProperty("usage").GetRawText()),
            sameOutput.Select(o => o.GetProperty("response").GetProperty("body").GetProperty("usage").GetRawText()));
        var sameVectors = VectorsOf(sameOutput);

        Assert.Equal(requests.Count, output.Count);
        Assert.Equal([.. Enumerable.Range(0, 20).Select(i => $"request-{i}"), "request-array", "request-base64"], output.Select(o => o.GetProperty("custom_id").GetString()));
        foreach (var line in output)
        {
            var response = line.GetProperty("response");
            Assert.Equal(200, response.GetProperty("status_code").GetInt32());
            Assert.Equal(StarterModel.ModelId, response.GetProperty("body").GetProperty("model").GetString());
            Assert.True(response.GetProperty("body").GetProperty("usage").GetProperty("prompt_tokens").GetInt32() > 0);
        }

        var vectors = VectorsOf(output);
        Assert.Equal(sentences.Count, vectors.Count);
        for (var i = 0; i < sentences.Count; i++)
        {
            var want = expected[$"r{i}"];
            Assert.Equal(384, vectors[i].Length);
            // Rows share padded batches differently in the two runs: the same vector to float rounding.
            Assert.True(want.Zip(vectors[i]).Max(p => Math.Abs(p.First - p.Second)) < 1e-4, $"sentence {i} differs from the inference stage's embedding");
            Assert.Equal(1.0, Math.Sqrt(vectors[i].Sum(v => (double)v * v)), 3);
            Assert.True(sameVectors[i].Zip(vectors[i]).Max(p => Math.Abs(p.First - p.Second)) < 1e-5, $"sentence {i}: `pipeline infer` on the same file gives another vector");
        }

        // Pipeline's own view of the same batch: its run and inference batch, for `pipeline status` and `--retry-failed`.
        var pipeline = batch.GetProperty("pipeline");
        Assert.Equal(operation.BatchId, pipeline.GetProperty("run_id").GetString());
        Assert.Equal(outputFileId, OpenAiFiles.OutputFileId(pipeline.GetProperty("batch_id").GetString()!));
    }

    [Fact]
    public async Task A_file_with_one_bad_line_completes_with_its_error_line_and_one_failed_request()
    {
        var fileId = await UploadAsync([
            Embedding("good-1", "The battery lasts all day."),
            Embedding("good-2", "It broke after a week."),
            OpenAiBatchFormatTests.Request("chat-1", "Hello there", "gpt-4o-mini", url: "/v1/chat/completions"),
            Embedding("good-3", "Works as described."),
        ]);

        var batch = await CompletedAsync(await _batches.CreateBatchAsync(CreateBody(fileId), waitUntilCompleted: false));

        Assert.Equal("completed", batch.GetProperty("status").GetString());
        var counts = batch.GetProperty("request_counts");
        Assert.Equal((4, 3, 1), (counts.GetProperty("total").GetInt32(), counts.GetProperty("completed").GetInt32(), counts.GetProperty("failed").GetInt32()));
        var errors = Lines((await _files.DownloadFileAsync(batch.GetProperty("error_file_id").GetString()!)).Value);
        var error = Assert.Single(errors);
        Assert.Equal("chat-1", error.GetProperty("custom_id").GetString());
        Assert.Equal("unsupported_url", error.GetProperty("error").GetProperty("code").GetString());
        Assert.Contains("/v1/embeddings", error.GetProperty("error").GetProperty("message").GetString());
        var output = Lines((await _files.DownloadFileAsync(batch.GetProperty("output_file_id").GetString()!)).Value);
        Assert.Equal(["good-1", "good-2", "good-3"], output.Select(o => o.GetProperty("custom_id").GetString()));

        // The run behind it ended completed_with_failures, and its failed rows can be retried as any batch's.
        var run = (await _pipeline.Runs.GetAsync(batch.GetProperty("id").GetString()!))!;
        Assert.Equal(RunStatus.CompletedWithFailures, run.Status);
        Assert.Contains("--retry-failed", run.Error);
    }

    [Fact]
    public async Task Cancel_moves_a_batch_to_cancelled_and_it_stays_there()
    {
        var sentences = File.ReadLines(RepoPaths.RequireSharedData("sentiment/yelp_labelled.txt")).Select(l => l.Split('\t')[0]).ToList();
        var fileId = await UploadAsync(Enumerable.Range(0, 2000).Select(i => Embedding($"c{i}", sentences[i % sentences.Count])));
        var operation = await _batches.CreateBatchAsync(CreateBody(fileId), waitUntilCompleted: false);

        var cancelled = Json(await operation.CancelAsync(new RequestOptions()));

        Assert.Equal("cancelled", cancelled.GetProperty("status").GetString());
        Assert.NotEqual(JsonValueKind.Null, cancelled.GetProperty("cancelled_at").ValueKind);
        var batch = await CompletedAsync(operation);
        Assert.Equal("cancelled", batch.GetProperty("status").GetString());
        await Task.Delay(TimeSpan.FromSeconds(3));
        batch = Json(await operation.GetBatchAsync(new RequestOptions()));
        Assert.Equal(("cancelled", JsonValueKind.Null), (batch.GetProperty("status").GetString(), batch.GetProperty("output_file_id").ValueKind));

        // A batch that has ended cannot be cancelled again into another state: an OpenAI-shaped 409 says why.
        var finished = await _batches.CreateBatchAsync(CreateBody(await UploadAsync([Embedding("one", "Just one.")])), waitUntilCompleted: false);
        await CompletedAsync(finished);
        var refusal = await Assert.ThrowsAsync<ClientResultException>(() => finished.CancelAsync(new RequestOptions()));
        Assert.Equal(409, refusal.Status);
        Assert.Equal("batch_not_cancellable", OpenAiErrorOf(refusal).GetProperty("code").GetString());
    }

    private static JsonElement OpenAiErrorOf(ClientResultException e) =>
        JsonDocument.Parse(e.GetRawResponse()!.Content.ToString()).RootElement.GetProperty("error").Clone();

    [Fact]
    public async Task Unknown_models_unserved_endpoints_and_bad_keys_get_openai_shaped_errors()
    {
        var unknown = await UploadAsync([OpenAiBatchFormatTests.Request("x", "text", "text-embedding-3-large")]);
        var model = await Assert.ThrowsAsync<ClientResultException>(() => _batches.CreateBatchAsync(CreateBody(unknown), waitUntilCompleted: false));
        Assert.Equal(404, model.Status);
        var error = OpenAiErrorOf(model);
        Assert.Equal(("model_not_found", "model"), (error.GetProperty("code").GetString(), error.GetProperty("param").GetString()));
        Assert.Contains("text-embedding-3-large", error.GetProperty("message").GetString());

        var served = await UploadAsync([Embedding("y", "text")]);
        var chat = await Assert.ThrowsAsync<ClientResultException>(() => _batches.CreateBatchAsync(CreateBody(served, "/v1/chat/completions"), waitUntilCompleted: false));
        Assert.Equal(400, chat.Status);
        Assert.Equal("unsupported_endpoint", OpenAiErrorOf(chat).GetProperty("code").GetString());
        Assert.Contains("/v1/embeddings", OpenAiErrorOf(chat).GetProperty("message").GetString());

        var missingFile = await Assert.ThrowsAsync<ClientResultException>(() => _files.GetFileAsync("file-0000"));
        Assert.Equal(404, missingFile.Status);
        Assert.Equal("file_not_found", OpenAiErrorOf(missingFile).GetProperty("code").GetString());

        var wrongKey = await Assert.ThrowsAsync<ClientResultException>(() => Client(_host.Port, "sk-wrong").GetOpenAIFileClient().GetFileAsync(unknown));
        Assert.Equal(401, wrongKey.Status);
        Assert.Equal("invalid_api_key", OpenAiErrorOf(wrongKey).GetProperty("code").GetString());
        var noKey = await _http.GetAsync($"/v1/files/{unknown}");
        Assert.Equal(HttpStatusCode.Unauthorized, noKey.StatusCode);
        Assert.Equal("missing_api_key", JsonDocument.Parse(await noKey.Content.ReadAsStringAsync()).RootElement.GetProperty("error").GetProperty("code").GetString());

        var deleted = (await _files.DeleteFileAsync(unknown)).Value;
        Assert.True(deleted.Deleted);
        Assert.Equal(404, (await Assert.ThrowsAsync<ClientResultException>(() => _files.DownloadFileAsync(unknown))).Status);
    }

    [Fact]
    public async Task A_file_larger_than_the_servers_default_body_limit_streams_to_storage_intact()
    {
        // 40 MB of requests: past ASP.NET Core's default 30 MB request body limit.
        var line = Encoding.UTF8.GetBytes(Embedding("big-000000", new string('x', 180)) + "\n");
        var content = new byte[40 * 1024 * 1024 / line.Length * line.Length];
        for (var offset = 0; offset < content.Length; offset += line.Length)
        {
            line.CopyTo(content, offset);
        }

        var file = (await _files.UploadFileAsync(new MemoryStream(content), "big.jsonl", FileUploadPurpose.Batch)).Value;

        Assert.Equal(content.Length, file.SizeInBytes);
        var stored = (await _files.DownloadFileAsync(file.Id)).Value.ToArray();
        Assert.Equal(System.Security.Cryptography.SHA256.HashData(content), System.Security.Cryptography.SHA256.HashData(stored));
        Assert.True((await _files.DeleteFileAsync(file.Id)).Value.Deleted);
    }

    [Fact]
    public async Task Batches_are_listed_newest_first_in_pages()
    {
        var fileId = await UploadAsync([Embedding("p", "Paged.")]);
        var ids = new List<string>();
        for (var i = 0; i < 3; i++)
        {
            ids.Add((await _batches.CreateBatchAsync(CreateBody(fileId), waitUntilCompleted: false)).BatchId);
        }

        ids.Reverse();
        using var response = await _http.SendAsync(new HttpRequestMessage(HttpMethod.Get, "/v1/batches?limit=2") { Headers = { { "Authorization", $"Bearer {Key}" } } });
        var firstPage = JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement;
        Assert.Equal("list", firstPage.GetProperty("object").GetString());
        Assert.Equal(ids[..2], firstPage.GetProperty("data").EnumerateArray().Select(b => b.GetProperty("id").GetString()!));
        Assert.True(firstPage.GetProperty("has_more").GetBoolean());

        // The SDK's own paging (after = the last id of a page) walks the rest.
        var listed = new List<string>();
        await foreach (var page in _batches.GetBatchesAsync(after: ids[1], limit: 1, new RequestOptions()).GetRawPagesAsync())
        {
            listed.AddRange(JsonDocument.Parse(page.GetRawResponse().Content.ToString()).RootElement.GetProperty("data").EnumerateArray().Select(b => b.GetProperty("id").GetString()!));
        }

        Assert.Equal(ids[2..], listed.Take(1));
    }
}
