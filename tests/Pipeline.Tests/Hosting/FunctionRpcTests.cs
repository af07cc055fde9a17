using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Pipeline.Ingestion;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Hosting;

/// <summary>
/// The host side of FunctionRpc against the real isolated worker: start-up arguments, init, worker indexing,
/// load, invocations, and what happens when the worker crashes or never starts.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class FunctionRpcTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static readonly Dictionary<string, string> NoWatcher = new() { ["Pipeline__LocalHost__WatchIncoming"] = "false" };

    [Fact]
    public async Task The_worker_is_initialized_and_indexes_and_loads_its_own_functions()
    {
        using var host = new LocalHostProcess(azurite.ConnectionString, NoWatcher);
        using var http = await host.WaitUntilListeningAsync();

        var state = (await http.GetFromJsonAsync<JsonObject>("/admin/host/status"))!;
        Assert.Equal("running", state["state"]!.GetValue<string>());
        Assert.StartsWith("2.", state["worker"]!["version"]!.GetValue<string>());
        // The worker answered WorkerInitRequest with the capabilities of ASP.NET Core integration.
        Assert.Matches("capabilities .*HttpUri", host.Output);

        // FunctionsMetadataRequest: the list and the bindings come from the worker (functions.metadata it wrote), not from the host.
        var functions = (await http.GetFromJsonAsync<JsonArray>("/admin/functions"))!.Select(f => f!.AsObject()).ToList();
        var written = JsonNode.Parse(await File.ReadAllTextAsync(Path.Combine(RepoPaths.FunctionApp, "functions.metadata")))!.AsArray();
        Assert.Equal(written.Select(f => f!["name"]!.GetValue<string>()).Order(), functions.Select(f => f["name"]!.GetValue<string>()).Order());
        Assert.Equal(36, functions.Count);
        Assert.Contains(functions, f => f["name"]!.GetValue<string>() == "PreprocessPartition");
        var ingest = functions.Single(f => f["name"]!.GetValue<string>() == "Ingest");
        Assert.Equal("Pipeline.Functions.Triggers.StageFunctions.IngestAsync", ingest["entryPoint"]!.GetValue<string>());
        Assert.False(string.IsNullOrEmpty(ingest["functionId"]!.GetValue<string>()));
        var trigger = ingest["bindings"]![0]!;
        Assert.Equal("queueTrigger", trigger["type"]!.GetValue<string>());
        Assert.Equal(StorageNames.Queues.BlobCreated, trigger["queueName"]!.GetValue<string>());
        Assert.Equal("message", trigger["name"]!.GetValue<string>());
        // One FunctionLoadRequest per function, each loaded.
        Assert.Contains("indexed and loaded 36 functions", host.Output);
    }

    [Fact]
    public async Task A_crashed_worker_is_restarted_and_its_in_flight_message_is_delivered_again()
    {
        using var host = new LocalHostProcess(azurite.ConnectionString, new Dictionary<string, string>(NoWatcher) { ["Pipeline__Ingestion__ProgressInterval"] = "00:00:00.050" });
        using var http = await host.WaitUntilListeningAsync();
        var (firstWorker, starts) = await host.WorkerAsync(http);
        Assert.Equal(1, starts);

        using var pipeline = new TestPipeline(azurite);
        var content = new StringBuilder();
        for (var i = 0; content.Length < 40_000_000; i++)
        {
            content.Append("{\"text\":\"crash test record ").Append(i).Append(" with a few more words in it\",\"label\":").Append(i % 2).Append("}\n");
        }

        var message = await pipeline.DropAsync("crash/large.jsonl", content.ToString());
        var runId = FailedMessagesRunId(message);
        await pipeline.Storage.Queue(StorageNames.Queues.BlobCreated).SendMessageAsync(message);
        await Eventually.ReturnsAsync(async () => await pipeline.Runs.GetAsync(runId) is { } r && r.GetCounts().GetValueOrDefault("read") > 0 ? r : null,
            TimeSpan.FromSeconds(60), "ingestion to make progress", () => host.Output);

        // The worker dies mid-invocation; the host stays up.
        System.Diagnostics.Process.GetProcessById(firstWorker).Kill();
        var restarted = await Eventually.ReturnsAsync(async () =>
        {
            try
            {
                return await host.WorkerAsync(http) is var worker && worker.WorkerProcessId != firstWorker ? new[] { worker.WorkerProcessId, worker.Starts } : null;
            }
            catch (HttpRequestException)
            {
                return null;
            }
        }, TimeSpan.FromSeconds(60), "a new worker", () => host.Output);
        var (secondWorker, restarts) = (restarted[0], restarted[1]);
        Assert.Equal(2, restarts);
        Assert.NotEqual(firstWorker, secondWorker);
        Assert.False(host.HasExited);

        // The invocation the dead worker held failed, so its message came back and the new worker finished it.
        var run = await Eventually.ReturnsAsync(async () => await pipeline.Runs.GetAsync(runId) is { } r && r.GetStages().GetValueOrDefault(Stages.Ingest) == RunStatus.Succeeded ? r : null,
            TimeSpan.FromSeconds(120), "the redelivered message to complete ingestion", () => host.Output);
        // The host saw the invocation end without a response, then the message came back (the run's lease, still held by the
        // dead invocation, may first put it back for later: no attempt is spent on that).
        Assert.Contains("did not run message", host.Output);
        Assert.Contains("starting a new one", host.Output);
        var manifest = (await pipeline.ManifestAsync(run.DatasetId!))!;
        Assert.Equal(content.ToString().Count(c => c == '\n'), manifest.Counts.Valid);
    }

    [Theory]
    [InlineData("{\"description\":{\"defaultExecutablePath\":\"dotnet\",\"defaultWorkerPath\":\"NoSuchWorker.dll\"}}", "exited with code")]
    [InlineData("{\"description\":{\"defaultExecutablePath\":\"bash\",\"arguments\":[\"-c\",\"sleep 600\"]}}", "did not connect")]
    public async Task A_worker_that_never_starts_stops_the_host_with_the_reason(string workerConfig, string reason)
    {
        var app = Directory.CreateTempSubdirectory("pipeline-bad-app-").FullName;
        try
        {
            File.Copy(Path.Combine(RepoPaths.Root, "host.json"), Path.Combine(app, "host.json"));
            await File.WriteAllTextAsync(Path.Combine(app, "worker.config.json"), workerConfig);
            using var host = new LocalHostProcess(azurite.ConnectionString, new Dictionary<string, string>(NoWatcher)
            {
                ["Pipeline__LocalHost__WorkerStartTimeout"] = "00:00:03",
                ["Pipeline__LocalHost__WorkerStartAttempts"] = "2",
            }, app);
            await Eventually.ReturnsAsync(() => Task.FromResult(host.HasExited ? "exited" : null), TimeSpan.FromSeconds(60), "the host to give up", () => host.Output);
            Assert.Equal(3, host.ExitCode);
            Assert.Contains(reason, host.Output);
            Assert.Contains("The worker never became ready in 2 attempt(s)", host.Output);
        }
        finally
        {
            Directory.Delete(app, recursive: true);
        }
    }

    private static string FailedMessagesRunId(string blobCreatedEvent) =>
        Pipeline.Messaging.FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, blobCreatedEvent);
}
