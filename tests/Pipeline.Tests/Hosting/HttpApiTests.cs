using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Functions;
using Pipeline.Hosting;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Hosting;

/// <summary>The HTTP API and the Service Bus command path, through the real executable in local mode.</summary>
[Collection(LocalHostProcess.Collection)]
public sealed class HttpApiTests : IAsyncLifetime
{
    private readonly Azurite _azurite = new();
    private TestPipeline _pipeline = null!;
    private LocalHostProcess _host = null!;
    private HttpClient _http = null!;

    public async Task InitializeAsync()
    {
        await _azurite.InitializeAsync();
        _pipeline = new TestPipeline(_azurite);
        // Without the blob watcher, so that runs start only through the API under test.
        _host = new LocalHostProcess(_azurite.ConnectionString, new Dictionary<string, string> { ["Pipeline__LocalHost__WatchIncoming"] = "false" });
        _http = await _host.WaitUntilListeningAsync();
    }

    public async Task DisposeAsync()
    {
        _http.Dispose();
        _host.Dispose();
        _pipeline.Dispose();
        await _azurite.DisposeAsync();
    }

    private static async Task<JsonElement> ProblemAsync(HttpResponseMessage response, HttpStatusCode status, string code)
    {
        Assert.Equal(status, response.StatusCode);
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        var problem = JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement;
        Assert.Equal($"urn:pipeline:problem:{code}", problem.GetProperty("type").GetString());
        Assert.Equal((int)status, problem.GetProperty("status").GetInt32());
        Assert.False(string.IsNullOrWhiteSpace(problem.GetProperty("detail").GetString()));
        return problem;
    }

    [Fact]
    public async Task Unknown_runs_and_bad_requests_get_problem_details()
    {
        await ProblemAsync(await _http.GetAsync("/api/runs/run-nope"), HttpStatusCode.NotFound, "run-not-found");
        await ProblemAsync(await _http.GetAsync("/api/runs/run-nope/events"), HttpStatusCode.NotFound, "run-not-found");
        await ProblemAsync(await _http.PostAsync("/api/runs/run-nope/cancel", null), HttpStatusCode.NotFound, "run-not-found");
        await ProblemAsync(await _http.GetAsync("/api/runs?status=sleeping"), HttpStatusCode.BadRequest, "invalid-status");
        await ProblemAsync(await _http.PostAsync("/api/runs", new StringContent("{not json", Encoding.UTF8, "application/json")), HttpStatusCode.BadRequest, "invalid-body");
        await ProblemAsync(await _http.PostAsJsonAsync("/api/runs", new { }), HttpStatusCode.BadRequest, "invalid-body");
        await ProblemAsync(await _http.PostAsJsonAsync("/api/runs", new { blob = "incoming/missing.csv" }), HttpStatusCode.BadRequest, "blob-not-found");

        await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("spec.jsonl").UploadAsync(BinaryData.FromString("{\"text\":\"a\"}\n"), overwrite: true);
        var problem = await ProblemAsync(await _http.PostAsJsonAsync("/api/runs", new { blob = "incoming/spec.jsonl", spec = new { ingest = new { fromat = "csv" } } }), HttpStatusCode.BadRequest, "invalid-spec");
        Assert.Contains("fromat", problem.GetProperty("detail").GetString());
    }

    [Fact]
    public async Task A_run_submitted_over_http_can_be_followed_to_the_end()
    {
        await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("api/reviews.tsv").UploadAsync(BinaryData.FromString("text\tlabel\nGood\t1\nBad\t0\nFine\t1\n"), overwrite: true);
        var submitted = await _http.PostAsJsonAsync("/api/runs", new { blob = "incoming/api/reviews.tsv", spec = new { preprocess = new { validationFraction = 0 } } });
        Assert.Equal(HttpStatusCode.Accepted, submitted.StatusCode);
        var runId = JsonDocument.Parse(await submitted.Content.ReadAsStringAsync()).RootElement.GetProperty("runId").GetString()!;

        var text = await Eventually.ReturnsAsync(async () =>
        {
            var body = await _http.GetStringAsync($"/api/runs/{runId}");
            return JsonDocument.Parse(body).RootElement.GetProperty("status").GetString() is RunStatus.Succeeded or RunStatus.Failed ? body : null;
        }, TimeSpan.FromSeconds(60), "the submitted run to end", () => _host.Output);

        var view = JsonDocument.Parse(text).RootElement;
        Assert.Equal(RunStatus.Succeeded, view.GetProperty("status").GetString());
        Assert.Equal(3, view.GetProperty("counts").GetProperty("trainRecords").GetInt64());
        var datasetId = view.GetProperty("datasetId").GetString();

        var events = JsonDocument.Parse(await _http.GetStringAsync($"/api/runs/{runId}/events")).RootElement.EnumerateArray().ToList();
        var sequence = events.Select(e => (e.GetProperty("type").GetString(), e.GetProperty("stage").GetString())).ToList();
        Assert.Contains((RunEvents.Types.StageStarted, Stages.Ingest), sequence);
        Assert.Contains((RunEvents.Types.StageStarted, Stages.Preprocess), sequence);
        Assert.Equal(RunEvents.Types.StageSucceeded, sequence[^1].Item1);
        Assert.True(sequence.IndexOf((RunEvents.Types.StageStarted, Stages.Ingest)) < sequence.IndexOf((RunEvents.Types.StageStarted, Stages.Preprocess)));

        var runs = JsonDocument.Parse(await _http.GetStringAsync("/api/runs?status=succeeded")).RootElement;
        Assert.Contains(runs.EnumerateArray(), r => r.GetProperty("runId").GetString() == runId);
        var datasets = JsonDocument.Parse(await _http.GetStringAsync("/api/datasets")).RootElement;
        Assert.Contains(datasets.EnumerateArray(), d => d.GetProperty("datasetId").GetString() == datasetId && d.GetProperty("records").GetInt64() == 3);
        Assert.Equal(JsonValueKind.Array, JsonDocument.Parse(await _http.GetStringAsync("/api/models")).RootElement.ValueKind);
        Assert.Equal(JsonValueKind.Array, JsonDocument.Parse(await _http.GetStringAsync("/api/batches")).RootElement.ValueKind);

        // A finished run cannot be cancelled.
        await ProblemAsync(await _http.PostAsync($"/api/runs/{runId}/cancel", null), HttpStatusCode.Conflict, "run-finished");
    }

    [Fact]
    public async Task A_cancelled_run_is_not_worked_on()
    {
        await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("cancel/me.jsonl").UploadAsync(BinaryData.FromString("{\"text\":\"a\"}\n"), overwrite: true);
        var blob = _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("cancel/me.jsonl");
        var etag = (await blob.GetPropertiesAsync()).Value.ETag.ToString();
        var runId = RunIds.ForBlob(StorageNames.Containers.Incoming, "cancel/me.jsonl", etag);
        await _pipeline.Runs.GetOrCreateAsync(new RunRecord { RunId = runId, Source = "incoming/cancel/me.jsonl" });

        var cancelled = await _http.PostAsync($"/api/runs/{runId}/cancel?reason=changed%20my%20mind", null);
        Assert.Equal(HttpStatusCode.Accepted, cancelled.StatusCode);

        // Its event arrives afterwards: acknowledged, nothing ingested.
        var message = await _pipeline.DropAsync("cancel/me.jsonl", "{\"text\":\"a\"}\n");
        await _pipeline.Storage.Queue(StorageNames.Queues.BlobCreated).SendMessageAsync(message);
        await Task.Delay(3000);
        var run = (await _pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Cancelled, run.Status);
        Assert.Equal("Cancelled: changed my mind", run.Error);
        Assert.Null(run.DatasetId);
        var events = await _pipeline.Services.GetRequiredService<RunEvents>().ListAsync(runId);
        Assert.Contains(events, e => e.Type == RunEvents.Types.RunCancelled);
    }

    [Fact]
    public async Task Service_bus_commands_take_the_same_path_as_storage_commands()
    {
        await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("sb/data.jsonl").UploadAsync(BinaryData.FromString("{\"text\":\"from service bus\"}\n"), overwrite: true);
        var command = "{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{\"blob\":\"incoming/sb/data.jsonl\"}}";
        // The host's serviceBusTrigger payload: the message body under the binding name, DeliveryCount and MessageId in metadata.
        var response = await _http.PostAsJsonAsync("/CommandsServiceBus", new
        {
            Data = new { message = command },
            Metadata = new { DeliveryCount = 1, MessageId = "sb-1", ContentType = "application/json" },
        });
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        var etag = (await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("sb/data.jsonl").GetPropertiesAsync()).Value.ETag.ToString();
        var run = (await _pipeline.Runs.GetAsync(RunIds.ForBlob(StorageNames.Containers.Incoming, "sb/data.jsonl", etag)))!;
        Assert.Equal(RunStatus.Succeeded, run.GetStages()[Stages.Ingest]);

        var invalid = await _http.PostAsJsonAsync("/CommandsServiceBus", new { Data = new { message = "{\"type\":\"explode\"}" }, Metadata = new { DeliveryCount = 1 } });
        Assert.Equal(HttpStatusCode.OK, invalid.StatusCode);
        var recorded = Assert.Single(await FailedMessages.ListAsync(_pipeline.Storage, QueueFunctions.ServiceBusCommands, CancellationToken.None));
        Assert.Contains("Unknown command type 'explode'", recorded.Reason);
    }

    [Fact]
    public async Task Commands_on_the_storage_queue_are_picked_up_by_the_host()
    {
        await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("queued/data.jsonl").UploadAsync(BinaryData.FromString("{\"text\":\"from the commands queue\"}\n"), overwrite: true);
        await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync("{\"schemaVersion\":1,\"type\":\"ingest\",\"runId\":\"run-queued-command\",\"body\":{\"blob\":\"incoming/queued/data.jsonl\"}}");
        await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync("{\"schemaVersion\":1,\"type\":\"cancel\",\"body\":{\"runId\":\"run-never-existed\"}}");

        var run = await Eventually.ReturnsAsync(async () => await _pipeline.Runs.GetAsync("run-queued-command") is { Status: RunStatus.Succeeded } r ? r : null,
            TimeSpan.FromSeconds(60), "the queued ingest command's run to finish", () => _host.Output);
        Assert.NotNull(run.DatasetId);
        var invalid = await Eventually.ReturnsAsync(async () => (await FailedMessages.ListAsync(_pipeline.Storage, StorageNames.Queues.Commands, CancellationToken.None)).FirstOrDefault(),
            TimeSpan.FromSeconds(30), "the invalid cancel command to be recorded", () => _host.Output);
        Assert.Contains("run-never-existed", invalid.Reason);
        Assert.Equal(0, (await _pipeline.Storage.Queue(StorageNames.Queues.Poison(StorageNames.Queues.Commands)).GetPropertiesAsync()).Value.ApproximateMessagesCount);
    }

    [Fact]
    public async Task Every_http_function_declared_in_function_json_is_served()
    {
        var functions = FunctionDefinitions.Load(Path.Combine(RepoPaths.Root, "functions"), new Microsoft.Extensions.Configuration.ConfigurationBuilder().Build())
            .Where(f => f.TriggerType == "httpTrigger").ToList();
        Assert.Equal(8, functions.Count);
        foreach (var function in functions)
        {
            using var document = JsonDocument.Parse(await File.ReadAllTextAsync(Path.Combine(RepoPaths.Root, "functions", function.Name, "function.json")));
            var trigger = document.RootElement.GetProperty("bindings")[0];
            var route = "/api/" + trigger.GetProperty("route").GetString()!.Replace("{runId}", "run-none");
            var method = new HttpMethod(trigger.GetProperty("methods")[0].GetString()!.ToUpperInvariant());
            using var response = await _http.SendAsync(new HttpRequestMessage(method, route) { Content = method == HttpMethod.Post ? JsonContent.Create(new { }) : null });
            // A route that is not served answers a bare 404; ours answer data or a problem document.
            Assert.True(response.StatusCode != HttpStatusCode.NotFound || response.Content.Headers.ContentType?.MediaType == "application/problem+json", $"{method} {route}: {response.StatusCode}");
            Assert.Equal("function", trigger.GetProperty("authLevel").GetString());
        }
    }
}
