using System.Net;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Azure.Core;
using Microsoft.Extensions.Options;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>
/// Fine-tune dispatch and monitoring with the real handlers on Azurite and a real trainer process (the function
/// app's <c>train</c> verb); monitor messages are delivered by the test, so redeliveries happen on cue. The cloud
/// backends are checked against a local HTTP server that holds each request to the documented REST shape.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class FineTuneStageTests(Azurite azurite) : IClassFixture<Azurite>
{
    public static string Reviews => File.ReadAllText(Path.Combine(RepoPaths.Root, "samples", "reviews.txt"));

    public const string PrepareSpec = """{"ingest":{"format":"tsv","columns":["text","label"],"maxInvalidFraction":0.01},"preprocess":{"tokenizer":{"kind":"tiktoken","encoding":"cl100k_base"},"validationFraction":0.2,"seed":42}}""";

    private TestPipeline Pipeline() => new(azurite, settings: new Dictionary<string, string?>
    {
        ["Pipeline:FineTune:Local:TrainerPath"] = RepoPaths.Trainer,
        ["Pipeline:FineTune:MonitorInitialDelay"] = "00:00:00.200",
        ["Pipeline:FineTune:MonitorMaxDelay"] = "00:00:00.500",
        ["Pipeline:FineTune:HeartbeatSeconds"] = "0.5",
    });

    /// <summary>Ingests and preprocesses the sample reviews; returns the dataset id and the prepared manifest path.</summary>
    public static async Task<(string DatasetId, string PreparedId, string Manifest)> PrepareAsync(TestPipeline pipeline, string name)
    {
        var ingested = await pipeline.IngestAsync(name, Reviews, PrepareSpec);
        var runId = "prep-" + Guid.NewGuid().ToString("n")[..8];
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(ingested.DatasetId!, "", RunSpec.Parse(Encoding.UTF8.GetBytes(PrepareSpec), "test")), runId, 1, CancellationToken.None);
        var manifest = (await pipeline.Runs.GetAsync(runId))!.GetArtifacts()["preparedManifest"];
        return (ingested.DatasetId!, manifest.Split('/')[3], manifest);
    }

    public static string FineTuneCommand(string runId, string datasetId, string fineTune) =>
        JsonSerializer.Serialize(new MessageEnvelope
        {
            Type = MessageTypes.FineTune,
            RunId = runId,
            Body = JsonSerializer.SerializeToElement(new FineTuneCommand(datasetId, null, JsonDocument.Parse(fineTune).RootElement.Clone()), FineTuneJson.Default.FineTuneCommand),
        }, PipelineJson.Default.MessageEnvelope);

    /// <summary>Delivers finetune-monitor messages as they become visible until the run ends; returns how many were delivered.</summary>
    private static async Task<(RunRecord Run, int Delivered)> MonitorUntilEndAsync(TestPipeline pipeline, string runId, TimeSpan timeout)
    {
        var queue = pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var delivered = 0;
        while (clock.Elapsed < timeout)
        {
            foreach (var message in (await queue.ReceiveMessagesAsync(16)).Value)
            {
                await pipeline.StageMessages.FineTuneMonitorAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
                delivered++;
            }

            if (await pipeline.Runs.GetAsync(runId) is { } run && RunStatus.IsFinal(run.Status))
            {
                return (run, delivered);
            }

            await Task.Delay(100);
        }

        throw new TimeoutException($"Run {runId} did not end within {timeout}.");
    }

    [Fact]
    public async Task Redelivered_dispatch_and_monitor_messages_start_one_job_and_one_chain_of_polls()
    {
        using var pipeline = Pipeline();
        var (datasetId, _, _) = await PrepareAsync(pipeline, "ft-redelivery.tsv");
        var command = FineTuneCommand("run-ft-redelivery", datasetId, """{"epochs":3,"outputModelId":"ft-redelivery"}""");

        await pipeline.Commands.HandleAsync(command, 1, CancellationToken.None);
        await pipeline.Commands.HandleAsync(command, 2, CancellationToken.None);
        // Another run asks for the same job while it trains: it waits on it, nothing is submitted for it.
        await pipeline.Commands.HandleAsync(command.Replace("run-ft-redelivery", "run-ft-waiting"), 1, CancellationToken.None);
        Assert.Equal(RunStatus.Running, (await pipeline.Runs.GetAsync("run-ft-waiting"))!.Status);

        var run = (await pipeline.Runs.GetAsync("run-ft-redelivery"))!;
        var jobId = run.GetArtifacts()["job"].Split('/')[1];
        var files = new JobFiles(pipeline.Storage, jobId);
        Assert.Equal(1, (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!.Attempt);

        // Both dispatches scheduled tick 1; the second delivery of it finds the tick taken and schedules nothing.
        var queue = pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor);
        await Task.Delay(400);
        var ticks = (await queue.ReceiveMessagesAsync(16)).Value;
        Assert.Equal(2, ticks.Length);
        foreach (var tick in ticks)
        {
            await pipeline.StageMessages.FineTuneMonitorAsync(tick.Body.ToString(), (int)tick.DequeueCount, CancellationToken.None);
            await queue.DeleteMessageAsync(tick.MessageId, tick.PopReceipt);
        }

        // Counted with the invisible ones: the next tick is scheduled with a visibility delay.
        Assert.Equal(1, await MessagesAsync(queue));

        var (finished, _) = await MonitorUntilEndAsync(pipeline, "run-ft-redelivery", TimeSpan.FromSeconds(90));
        Assert.Equal(RunStatus.Succeeded, finished.Status);
        var waited = (await pipeline.Runs.GetAsync("run-ft-waiting"))!;
        Assert.Equal((RunStatus.Succeeded, "models/ft-redelivery/"), (waited.Status, waited.GetArtifacts()["model"]));
        Assert.Equal("models/ft-redelivery/", finished.GetArtifacts()["model"]);
        var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
        Assert.Equal((JobStates.Succeeded, 1), (status.State, status.Attempt));
        Assert.Equal(3, (await pipeline.ReadAsync(StorageNames.Containers.Jobs, $"{jobId}/metrics.jsonl")).Split('\n', StringSplitOptions.RemoveEmptyEntries).Length);

        // The same command once the job has ended: the run has finished the stage; nothing is submitted again.
        await pipeline.Commands.HandleAsync(command, 3, CancellationToken.None);
        Assert.Equal(0, await MessagesAsync(queue));

        // Another run asking for the same job (same data, base and settings) gets its model without training.
        await pipeline.Commands.HandleAsync(command.Replace("run-ft-redelivery", "run-ft-same-job"), 1, CancellationToken.None);
        var reused = (await pipeline.Runs.GetAsync("run-ft-same-job"))!;
        Assert.Equal((RunStatus.Succeeded, "models/ft-redelivery/"), (reused.Status, reused.GetArtifacts()["model"]));
        Assert.Equal(finished.GetMetrics()["validationAccuracy"], reused.GetMetrics()["validationAccuracy"]);
        Assert.Equal(0, await MessagesAsync(queue));
        Assert.Equal(1, (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!.Attempt);
    }

    /// <summary>Every message in the queue, visible or not (a peek sees only the visible ones).</summary>
    private static async Task<int> MessagesAsync(Azure.Storage.Queues.QueueClient queue) => (await queue.GetPropertiesAsync()).Value.ApproximateMessagesCount;

    [Fact]
    public async Task Bad_hyperparameters_are_rejected_before_anything_is_submitted()
    {
        using var pipeline = Pipeline();
        var (datasetId, _, _) = await PrepareAsync(pipeline, "ft-bad.tsv");

        await pipeline.Commands.HandleAsync(FineTuneCommand("run-ft-bad", datasetId, """{"epochs":0,"learningRate":-1,"backend":"gpu-cluster"}"""), 1, CancellationToken.None);
        var run = (await pipeline.Runs.GetAsync("run-ft-bad"))!;
        Assert.Equal((RunStatus.Failed, FineTuneErrorCodes.InvalidHyperparameters), (run.Status, run.ErrorCode));
        Assert.Contains("epochs is 0", run.Error);
        Assert.Contains("learningRate is -1", run.Error);
        Assert.Contains("backend is 'gpu-cluster'", run.Error);

        await pipeline.Commands.HandleAsync(FineTuneCommand("run-ft-typo", datasetId, """{"epoch":5}"""), 1, CancellationToken.None);
        var typo = (await pipeline.Runs.GetAsync("run-ft-typo"))!;
        Assert.Equal(FineTuneErrorCodes.InvalidHyperparameters, typo.ErrorCode);
        Assert.Contains("epoch", typo.Error);

        await pipeline.Commands.HandleAsync(FineTuneCommand("run-ft-nobase", datasetId, """{"baseModel":"not-registered"}"""), 1, CancellationToken.None);
        Assert.Equal(FineTuneErrorCodes.BaseModelNotFound, (await pipeline.Runs.GetAsync("run-ft-nobase"))!.ErrorCode);
        Assert.Empty((await pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor).PeekMessagesAsync(16)).Value);
    }

    [Fact]
    public async Task The_trained_model_is_deterministic_for_a_seed_and_beats_the_majority_baseline()
    {
        using var pipeline = Pipeline();
        var (datasetId, preparedId, manifest) = await PrepareAsync(pipeline, "ft-determinism.tsv");
        var handler = pipeline.Services.GetService(typeof(FineTuneHandler)) as FineTuneHandler;
        var trainer = new JobTrainer(pipeline.Storage, Options.Create(new Pipeline.Inference.InferenceSettings()), Microsoft.Extensions.Logging.Abstractions.NullLogger<JobTrainer>.Instance);
        var outputs = new List<string>();
        foreach (var model in new[] { "ft-seeded-a", "ft-seeded-b" })
        {
            var spec = RunSpec.Parse(Encoding.UTF8.GetBytes("{\"fineTune\":{\"epochs\":4,\"outputModelId\":\"" + model + "\"}}"), "test");
            var job = await handler!.PlanAsync(new FineTuneRequest(datasetId, preparedId, manifest, spec), "run-" + model, CancellationToken.None);
            Assert.Equal(0, await trainer.RunAsync(job.JobId, CancellationToken.None));
            var status = (await BlobJson.ReadAsync(new JobFiles(pipeline.Storage, job.JobId).Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
            Assert.True(status.Metrics["accuracyPointsOverBaseline"] >= 20, $"{status.Metrics["validationAccuracy"]:P1} vs baseline {status.Metrics["majorityBaselineAccuracy"]:P1}");
            var onnx = (await pipeline.Storage.Container(StorageNames.Containers.Models).GetBlobClient($"{model}/model.onnx").DownloadContentAsync()).Value.Content.ToArray();
            outputs.Add(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(onnx)));
        }

        Assert.Equal(outputs[0], outputs[1]);
    }

    private sealed class ArmServer : IDisposable
    {
        private readonly HttpListener _listener = new();
        private readonly Task _loop;

        public ArmServer(Func<HttpListenerRequest, string, (int Status, string Body)> respond)
        {
            Port = Azurite.FreePort();
            _listener.Prefixes.Add($"http://127.0.0.1:{Port}/");
            _listener.Start();
            _loop = Task.Run(async () =>
            {
                while (_listener.IsListening)
                {
                    HttpListenerContext context;
                    try
                    {
                        context = await _listener.GetContextAsync();
                    }
                    catch (Exception e) when (e is HttpListenerException or ObjectDisposedException)
                    {
                        return;
                    }

                    var body = await new StreamReader(context.Request.InputStream).ReadToEndAsync();
                    Requests.Add((context.Request.HttpMethod, context.Request.Url!.PathAndQuery, context.Request.Headers["Authorization"], body));
                    var (status, reply) = respond(context.Request, body);
                    context.Response.StatusCode = status;
                    context.Response.ContentType = "application/json";
                    var bytes = Encoding.UTF8.GetBytes(reply);
                    await context.Response.OutputStream.WriteAsync(bytes);
                    context.Response.Close();
                }
            });
        }

        public int Port { get; }
        public List<(string Method, string Path, string? Authorization, string Body)> Requests { get; } = [];

        public void Dispose()
        {
            _listener.Stop();
            _listener.Close();
            _loop.Wait(TimeSpan.FromSeconds(5));
        }
    }

    private static readonly TokenCredential Token = DelegatedTokenCredential.Create((context, _) =>
    {
        Assert.Equal([ArmBackend.ArmScope], context.Scopes);
        return new AccessToken("test-token", DateTimeOffset.UtcNow.AddHours(1));
    });

    private static JobSpec Job => new()
    {
        JobId = "job-0123456789abcdef01234567",
        RunId = "run-cloud",
        Task = "classification",
        BaseModel = "base",
        BaseModelFolder = "models/base/",
        PreparedManifest = "datasets/ds-1/prepared/pp-1/manifest.json",
        DatasetId = "ds-1",
        PreparedId = "pp-1",
        Labels = ["0", "1"],
        Hyperparameters = new Hyperparameters { Epochs = 3, LearningRate = 0.01, BatchSize = 32, WeightDecay = 0, WarmupFraction = 0, Seed = 1, EarlyStoppingPatience = 0, Trainable = "head", ClassWeights = true },
        OutputModelId = "ft-1",
        OutputModelFolder = "models/ft-1/",
        Backend = FineTuneBackends.AzureMl,
        MaxDurationMinutes = 90,
        HeartbeatSeconds = 5,
        CreatedAt = DateTimeOffset.UtcNow,
    };

    [Fact]
    public async Task The_azure_ml_backend_sends_the_documented_command_job_requests()
    {
        const string workspace = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.MachineLearningServices/workspaces/ws-1";
        var state = "Running";
        using var server = new ArmServer((request, body) =>
        {
            var path = request.Url!.AbsolutePath;
            if (request.QueryString["api-version"] != "2024-10-01" || !path.StartsWith($"{workspace}/jobs/", StringComparison.Ordinal))
            {
                return (404, """{"error":{"code":"NotFound","message":"no such workspace or api-version"}}""");
            }

            return request.HttpMethod switch
            {
                "PUT" => (201, """{"name":"x","properties":{"jobType":"Command","status":"NotStarted"}}"""),
                "GET" => (200, "{\"name\":\"x\",\"properties\":{\"jobType\":\"Command\",\"status\":\"" + state + "\"}}"),
                "POST" when path.EndsWith("/cancel", StringComparison.Ordinal) => (202, ""),
                _ => (400, """{"error":{"code":"BadRequest","message":"unexpected request"}}"""),
            };
        });
        var options = Options.Create(new FineTuneOptions
        {
            AzureMl = new AzureMlOptions { Endpoint = $"http://127.0.0.1:{server.Port}", WorkspaceResourceId = workspace, ComputeName = "gpu-a100", EnvironmentId = $"{workspace}/environments/trainer/versions/3" },
            TrainerEnvironment = new() { ["AzureWebJobsStorage__blobServiceUri"] = "https://acct.blob.core.windows.net" },
            TrainerClientId = "11111111-2222-3333-4444-555555555555",
        });
        using var http = new HttpClient();
        var backend = new AzureMlBackend(http, Token, options);

        var handle = await backend.SubmitAsync(Job, 1, CancellationToken.None);
        var submission = new JobSubmission { JobId = Job.JobId, Backend = backend.Name, Attempt = 1, Handle = handle, FirstSubmittedAt = DateTimeOffset.UtcNow, SubmittedAt = DateTimeOffset.UtcNow };
        Assert.Equal(JobStates.Running, (await backend.GetStateAsync(Job, submission, CancellationToken.None)).State);
        state = "Failed";
        Assert.Equal(JobStates.Failed, (await backend.GetStateAsync(Job, submission, CancellationToken.None)).State);
        state = "Queued";
        Assert.Equal(JobStates.Queued, (await backend.GetStateAsync(Job, submission, CancellationToken.None)).State);
        await backend.CancelAsync(Job, submission, CancellationToken.None);
        Assert.Equal("job-0123456789abcdef01234567-a2", AzureMlBackend.JobName(Job.JobId, 2));

        var put = server.Requests[0];
        Assert.Equal(("PUT", $"{workspace}/jobs/{Job.JobId}?api-version=2024-10-01", "Bearer test-token"), (put.Method, put.Path, put.Authorization));
        var properties = JsonNode.Parse(put.Body)!["properties"]!;
        Assert.Equal("Command", properties["jobType"]!.GetValue<string>());
        Assert.Equal($"/app/Pipeline.Trainer --job {Job.JobId}", properties["command"]!.GetValue<string>());
        Assert.Equal($"{workspace}/environments/trainer/versions/3", properties["environmentId"]!.GetValue<string>());
        Assert.Equal($"{workspace}/computes/gpu-a100", properties["computeId"]!.GetValue<string>());
        Assert.Equal(Job.JobId, properties["environmentVariables"]!["PIPELINE_JOB_ID"]!.GetValue<string>());
        Assert.Equal("https://acct.blob.core.windows.net", properties["environmentVariables"]!["AzureWebJobsStorage__blobServiceUri"]!.GetValue<string>());
        Assert.Equal("PT1H30M", properties["limits"]!["timeout"]!.GetValue<string>());
        Assert.Equal("11111111-2222-3333-4444-555555555555", properties["environmentVariables"]!["AzureWebJobsStorage__clientId"]!.GetValue<string>());
        Assert.Equal(("POST", $"{workspace}/jobs/{Job.JobId}/cancel?api-version=2024-10-01", ""), (server.Requests[^1].Method, server.Requests[^1].Path, server.Requests[^1].Body));
        Assert.All(server.Requests.Skip(1).SkipLast(1), r => Assert.Equal("GET", r.Method));

        // ARM errors surface with ARM's message.
        var refused = new AzureMlBackend(http, Token, Options.Create(new FineTuneOptions { AzureMl = new AzureMlOptions { Endpoint = $"http://127.0.0.1:{server.Port}/nowhere" } }));
        await Assert.ThrowsAsync<HttpRequestException>(() => refused.SubmitAsync(Job, 1, CancellationToken.None));
    }

    [Fact]
    public async Task The_container_apps_backend_starts_reads_and_stops_executions_as_documented()
    {
        const string jobPath = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.App/jobs/trainer-job";
        using var server = new ArmServer((request, body) =>
        {
            var path = request.Url!.AbsolutePath;
            return (request.HttpMethod, path, request.QueryString["api-version"]) switch
            {
                ("POST", $"{jobPath}/start", "2025-07-01") => (200, $$"""{"name":"trainer-job-x1y2z3","id":"{{jobPath}}/executions/trainer-job-x1y2z3"}"""),
                ("GET", $"{jobPath}/executions/trainer-job-x1y2z3", "2025-07-01") => (200, """{"name":"trainer-job-x1y2z3","properties":{"status":"Succeeded","startTime":"2026-11-26T10:00:00+00:00"}}"""),
                ("POST", $"{jobPath}/executions/trainer-job-x1y2z3/stop", "2025-07-01") => (200, ""),
                _ => (404, """{"error":{"code":"NotFound","message":"no such resource"}}"""),
            };
        });
        var options = Options.Create(new FineTuneOptions
        {
            ContainerApps = new ContainerAppsOptions { Endpoint = $"http://127.0.0.1:{server.Port}", JobResourceId = jobPath },
            TrainerImage = "acr.azurecr.io/pipeline:1",
        });
        using var http = new HttpClient();
        var backend = new ContainerAppsBackend(http, Token, options);

        var handle = await backend.SubmitAsync(Job, 1, CancellationToken.None);
        Assert.Equal("trainer-job-x1y2z3", handle);
        var submission = new JobSubmission { JobId = Job.JobId, Backend = backend.Name, Attempt = 1, Handle = handle, FirstSubmittedAt = DateTimeOffset.UtcNow, SubmittedAt = DateTimeOffset.UtcNow };
        Assert.Equal(JobStates.Succeeded, (await backend.GetStateAsync(Job, submission, CancellationToken.None)).State);
        await backend.CancelAsync(Job, submission, CancellationToken.None);

        var start = JsonNode.Parse(server.Requests[0].Body)!;
        Assert.Null(start["template"]);
        var container = start["containers"]![0]!;
        Assert.Equal(("trainer", "acr.azurecr.io/pipeline:1"), (container["name"]!.GetValue<string>(), container["image"]!.GetValue<string>()));
        Assert.Equal(["--job", Job.JobId], container["args"]!.AsArray().Select(a => a!.GetValue<string>()));
        Assert.Contains(container["env"]!.AsArray(), e => e!["name"]!.GetValue<string>() == "PIPELINE_JOB_SPEC" && e["value"]!.GetValue<string>() == $"jobs/{Job.JobId}/spec.json");
        Assert.Equal("Bearer test-token", server.Requests[0].Authorization);
        Assert.Equal(("POST", $"{jobPath}/executions/trainer-job-x1y2z3/stop?api-version=2025-07-01"), (server.Requests[^1].Method, server.Requests[^1].Path));
    }
}
