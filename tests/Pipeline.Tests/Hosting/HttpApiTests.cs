using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Azure.Messaging.ServiceBus;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Hosting;

/// <summary>The HTTP API and the Service Bus command path, through the real executable in local mode.</summary>
[Collection(LocalHostProcess.Collection)]
public sealed class HttpApiTests : IAsyncLifetime
{
    private IsolatedStorage _storage = null!;
    private TestPipeline _pipeline = null!;
    private LocalHostProcess _host = null!;
    private HttpClient _http = null!;

    public async Task InitializeAsync()
    {
        // Storage of its own and a host without the blob watcher, so that runs start only through the API under test.
        _storage = await HostFixture.IsolatedAsync();
        _pipeline = _storage.Pipeline;
        _host = new LocalHostProcess(_storage.ConnectionString, new Dictionary<string, string> { ["Pipeline__LocalHost__WatchIncoming"] = "false" });
        _http = await _host.WaitUntilListeningAsync();
    }

    public async Task DisposeAsync()
    {
        _http.Dispose();
        _host.Dispose();
        await _storage.DisposeAsync();
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

        // Events leave the run's outbox shortly after the run's own update: wait for the last one to be published.
        var sequence = await Eventually.ReturnsAsync(async () =>
        {
            var events = JsonDocument.Parse(await _http.GetStringAsync($"/api/runs/{runId}/events")).RootElement.EnumerateArray();
            var published = events.Select(e => (e.GetProperty("type").GetString(), e.GetProperty("stage").GetString())).ToList();
            return published.Contains((RunEvents.Types.StageSucceeded, Stages.Preprocess)) ? published : null;
        }, TimeSpan.FromSeconds(30), "the run's last event to be published", () => _host.Output);
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

        // Its event (for that very blob version, so for this run) arrives afterwards: acknowledged, nothing ingested.
        var item = await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobsAsync(Azure.Storage.Blobs.Models.BlobTraits.None, Azure.Storage.Blobs.Models.BlobStates.None, "cancel/me.jsonl", default).FirstAsync();
        var message = Pipeline.LocalHost.Triggers.BlobCreatedWatcher.EventFor(_pipeline.Storage.Container(StorageNames.Containers.Incoming), item);
        Assert.Equal(runId, FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, message));
        var queue = _pipeline.Storage.Queue(StorageNames.Queues.BlobCreated);
        await queue.SendMessageAsync(message);
        // Counted with the invisible ones: zero once the host has taken the message and acknowledged it.
        await Eventually.ReturnsAsync(async () => (await queue.GetPropertiesAsync()).Value.ApproximateMessagesCount == 0 ? "" : null, TimeSpan.FromSeconds(60), "the blob-created message to be acknowledged");
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
        // The Azure build's [ServiceBusTrigger] functions hand ServiceBusReceivedMessage and the message actions to ServiceBusCommands.
        var commands = _pipeline.Services.GetRequiredService<ServiceBusCommands>();
        var settlement = new RecordingSettlement();
        await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("sb/data.jsonl").UploadAsync(BinaryData.FromString("{\"text\":\"from service bus\"}\n"), overwrite: true);
        var command = ServiceBusModelFactory.ServiceBusReceivedMessage(BinaryData.FromString("{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{\"blob\":\"incoming/sb/data.jsonl\"}}"), messageId: "sb-1", deliveryCount: 1);
        await commands.HandleAsync(command, settlement, CancellationToken.None);
        var etag = (await _pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("sb/data.jsonl").GetPropertiesAsync()).Value.ETag.ToString();
        var run = (await _pipeline.Runs.GetAsync(RunIds.ForBlob(StorageNames.Containers.Incoming, "sb/data.jsonl", etag)))!;
        Assert.Equal(RunStatus.Succeeded, run.GetStages()[Stages.Ingest]);
        Assert.Equal(["complete sb-1"], settlement.Actions);

        // A command that can never succeed: recorded with its reason, its run failed, dead-lettered with the reason.
        var invalid = ServiceBusModelFactory.ServiceBusReceivedMessage(BinaryData.FromString("{\"type\":\"explode\",\"runId\":\"run-sb-explode\"}"), messageId: "sb-2", deliveryCount: 1);
        await commands.HandleAsync(invalid, settlement, CancellationToken.None);
        var recorded = Assert.Single(await FailedMessages.ListAsync(_pipeline.Storage, ServiceBusCommands.Source, CancellationToken.None));
        Assert.Contains("Unknown command type 'explode'", recorded.Reason);
        Assert.Equal("sb-2", recorded.RowKey);
        Assert.StartsWith($"deadletter sb-2 {ServiceBusCommands.InvalidCommandReason} ", settlement.Actions[1]);
        Assert.Contains("Unknown command type 'explode'", settlement.Actions[1]);
        Assert.Equal(RunStatus.Failed, (await _pipeline.Runs.GetAsync("run-sb-explode"))!.Status);

        // Its copy on the dead-letter queue is not recorded twice; one Service Bus gave up on is recorded and fails its run.
        var refused = ServiceBusModelFactory.ServiceBusReceivedMessage(invalid.Body, messageId: "sb-2", deliveryCount: 1, properties: DeadLetter(ServiceBusCommands.InvalidCommandReason, "refused"));
        await commands.RecordDeadLetterAsync(refused, settlement, CancellationToken.None);
        var exhausted = ServiceBusModelFactory.ServiceBusReceivedMessage(BinaryData.FromString("{\"schemaVersion\":1,\"type\":\"cancel\",\"runId\":\"run-sb-exhausted\",\"body\":{\"runId\":\"run-sb-exhausted\"}}"),
            messageId: "sb-3", deliveryCount: 10, properties: DeadLetter("MaxDeliveryCountExceeded", "Message could not be consumed after 10 delivery attempts."));
        await commands.RecordDeadLetterAsync(exhausted, settlement, CancellationToken.None);
        var records = await FailedMessages.ListAsync(_pipeline.Storage, ServiceBusCommands.Source, CancellationToken.None);
        Assert.Equal(2, records.Count);
        var poisoned = Assert.Single(records, r => r.RowKey == "sb-3");
        Assert.Contains("MaxDeliveryCountExceeded", poisoned.Reason);
        Assert.Contains("after 10 delivery attempt(s)", poisoned.Reason);
        var failed = (await _pipeline.Runs.GetAsync("run-sb-exhausted"))!;
        Assert.Equal(RunStatus.Failed, failed.Status);
        Assert.Equal(FailedMessages.PoisonErrorCode, failed.ErrorCode);
        Assert.Equal(["complete sb-2", "complete sb-3"], settlement.Actions[2..]);
    }

    /// <summary>Service Bus sets a dead letter's reason and description as these application properties.</summary>
    private static Dictionary<string, object> DeadLetter(string reason, string description) =>
        new() { ["DeadLetterReason"] = reason, ["DeadLetterErrorDescription"] = description };

    private sealed class RecordingSettlement : IServiceBusSettlement
    {
        public List<string> Actions { get; } = [];

        public Task CompleteAsync(ServiceBusReceivedMessage message, CancellationToken cancellationToken)
        {
            Actions.Add($"complete {message.MessageId}");
            return Task.CompletedTask;
        }

        public Task DeadLetterAsync(ServiceBusReceivedMessage message, string reason, string description, CancellationToken cancellationToken)
        {
            Actions.Add($"deadletter {message.MessageId} {reason} {description}");
            return Task.CompletedTask;
        }
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
    public async Task Every_http_function_the_worker_reports_is_served_with_function_level_auth()
    {
        var functions = (await _http.GetFromJsonAsync<JsonElement>("/admin/functions")).EnumerateArray()
            .Select(f => (Name: f.GetProperty("name").GetString(), Trigger: f.GetProperty("bindings")[0])).Where(f => f.Trigger.GetProperty("type").GetString() == "httpTrigger").ToList();
        Assert.Equal(20, functions.Count);
        foreach (var (name, trigger) in functions)
        {
            if (name!.StartsWith("OpenAi", StringComparison.Ordinal))
            {
                // OpenAI's Files and Batches routes check the SDKs' Bearer key themselves (the host reads no Bearer token as a function key).
                Assert.StartsWith("v1/", trigger.GetProperty("route").GetString());
                Assert.Equal("Anonymous", trigger.GetProperty("authLevel").GetString());
                continue;
            }

            if (name == "Dashboard")
            {
                // The dashboard's static files (no data) at the root, as a catch-all: anonymous.
                Assert.Equal(("{*path}", "Anonymous"), (trigger.GetProperty("route").GetString(), trigger.GetProperty("authLevel").GetString()));
                continue;
            }

            var route = "/" + trigger.GetProperty("route").GetString()!.Replace("{runId}", "run-none").Replace("{batchId}", "bt-none").Replace("{container}/{*path}", "jobs/none.json");
            Assert.StartsWith("/api/", route);
            var method = new HttpMethod(trigger.GetProperty("methods")[0].GetString()!.ToUpperInvariant());
            using var response = await _http.SendAsync(new HttpRequestMessage(method, route) { Content = method == HttpMethod.Post ? JsonContent.Create(new { }) : null });
            // Every route answers data or a problem document; a route no function serves is the no-route problem.
            Assert.True(response.IsSuccessStatusCode || response.Content.Headers.ContentType?.MediaType == "application/problem+json", $"{method} {route}: {response.StatusCode}");
            Assert.DoesNotContain("no-route", await response.Content.ReadAsStringAsync());
            Assert.Equal("Function", trigger.GetProperty("authLevel").GetString());
        }

        await ProblemAsync(await _http.GetAsync("/api/nothing-here"), HttpStatusCode.NotFound, "no-route");
    }
}
