using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text.Json.Nodes;
using Azure.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Pipeline.FineTuning;
using Pipeline.Hosting;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>
/// The cloud backends through their real composition (AddFineTuning: the IHttpClientFactory client, the Azure.Core
/// pipeline with its bearer-token, retry and long-running-operation handling) against a local HTTPS server that
/// answers as ARM documents it: throttling with Retry-After, 201/202 with Azure-AsyncOperation or Location, the
/// Container Apps executions list. Claims live in Azurite.
/// </summary>
public sealed class ArmBackendTests(Azurite azurite) : IClassFixture<Azurite>
{
    private const string Workspace = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.MachineLearningServices/workspaces/ws-1";
    private const string JobPath = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.App/jobs/trainer-job";

    [Fact]
    public async Task The_azure_ml_backend_sends_the_documented_command_job_requests()
    {
        var state = "Running";
        var created = false;
        await using var server = await FakeArm.StartAsync(request =>
        {
            var path = request.Path;
            if (request.Query["api-version"] != "2024-10-01" || !path.StartsWith($"{Workspace}/jobs/", StringComparison.Ordinal))
            {
                return Reply.Json(404, """{"error":{"code":"NotFound","message":"no such workspace or api-version"}}""");
            }

            return request.Method switch
            {
                "GET" when !created => Reply.Json(404, """{"error":{"code":"UserError","message":"job not found"}}"""),
                "PUT" => Created(),
                "GET" => Reply.Json(200, "{\"name\":\"x\",\"properties\":{\"jobType\":\"Command\",\"status\":\"" + state + "\"}}"),
                "POST" when path.EndsWith("/cancel", StringComparison.Ordinal) => Reply.Json(202, ""),
                _ => Reply.Json(400, """{"error":{"code":"BadRequest","message":"unexpected request"}}"""),
            };

            Reply Created()
            {
                created = true;
                return Reply.Json(201, """{"name":"x","properties":{"jobType":"Command","status":"NotStarted"}}""");
            }
        });
        using var services = Services(server, new()
        {
            ["Pipeline:FineTune:AzureMl:WorkspaceResourceId"] = Workspace,
            ["Pipeline:FineTune:AzureMl:ComputeName"] = "gpu-a100",
            ["Pipeline:FineTune:AzureMl:EnvironmentId"] = $"{Workspace}/environments/trainer/versions/3",
            ["Pipeline:FineTune:TrainerEnvironment:AzureWebJobsStorage__blobServiceUri"] = "https://acct.blob.core.windows.net",
            ["Pipeline:FineTune:TrainerClientId"] = "11111111-2222-3333-4444-555555555555",
        });
        var backend = services.GetRequiredService<AzureMlBackend>();

        var handle = await backend.SubmitAsync(Job, 1, CancellationToken.None);
        // A redelivered submission finds the job by its name and does not PUT it again.
        Assert.Equal(handle, await backend.SubmitAsync(Job, 1, CancellationToken.None));
        Assert.Single(server.Requests, r => r.Method == "PUT");
        var submission = Submission(backend.Name, handle);
        Assert.Equal(JobStates.Running, (await backend.GetStateAsync(Job, submission, CancellationToken.None)).State);
        state = "Failed";
        Assert.Equal(JobStates.Failed, (await backend.GetStateAsync(Job, submission, CancellationToken.None)).State);
        state = "Queued";
        Assert.Equal(JobStates.Queued, (await backend.GetStateAsync(Job, submission, CancellationToken.None)).State);
        await backend.CancelAsync(Job, submission, CancellationToken.None);
        Assert.Equal("job-0123456789abcdef01234567-a2", AzureMlBackend.JobName(Job.JobId, 2));

        var put = server.Requests.Single(r => r.Method == "PUT");
        Assert.Equal(($"{Workspace}/jobs/{Job.JobId}?api-version=2024-10-01", "Bearer test-token"), (put.PathAndQuery, put.Authorization));
        var properties = JsonNode.Parse(put.Body)!["properties"]!;
        Assert.Equal("Command", properties["jobType"]!.GetValue<string>());
        Assert.Equal($"/app/Pipeline.Trainer --job {Job.JobId}", properties["command"]!.GetValue<string>());
        Assert.Equal($"{Workspace}/environments/trainer/versions/3", properties["environmentId"]!.GetValue<string>());
        Assert.Equal($"{Workspace}/computes/gpu-a100", properties["computeId"]!.GetValue<string>());
        Assert.Equal(Job.JobId, properties["environmentVariables"]!["PIPELINE_JOB_ID"]!.GetValue<string>());
        Assert.Equal("https://acct.blob.core.windows.net", properties["environmentVariables"]!["AzureWebJobsStorage__blobServiceUri"]!.GetValue<string>());
        Assert.Equal("PT1H30M", properties["limits"]!["timeout"]!.GetValue<string>());
        Assert.Equal("11111111-2222-3333-4444-555555555555", properties["environmentVariables"]!["AzureWebJobsStorage__clientId"]!.GetValue<string>());
        Assert.Equal(("POST", $"{Workspace}/jobs/{Job.JobId}/cancel?api-version=2024-10-01", ""), (server.Requests[^1].Method, server.Requests[^1].PathAndQuery, server.Requests[^1].Body));
        Assert.All(server.Requests, r => Assert.Equal("Bearer test-token", r.Authorization));
    }

    [Fact]
    public async Task Arm_errors_surface_with_arms_message()
    {
        await using var server = await FakeArm.StartAsync(_ => Reply.Json(400, """{"error":{"code":"BadRequest","message":"computeId names no compute in this workspace"}}"""));
        using var services = Services(server, new() { ["Pipeline:FineTune:AzureMl:WorkspaceResourceId"] = Workspace });

        var error = await Assert.ThrowsAsync<ArmRefusedException>(() => services.GetRequiredService<AzureMlBackend>().SubmitAsync(Job, 1, CancellationToken.None));
        Assert.Contains("computeId names no compute in this workspace", error.Message, StringComparison.Ordinal);
        Assert.Equal(HttpStatusCode.BadRequest, error.StatusCode);
        Assert.Single(server.Requests);
    }

    [Fact]
    public async Task Throttled_and_unavailable_answers_are_retried_after_the_servers_retry_after()
    {
        var answers = new ConcurrentQueue<Reply>([
            Reply.Json(429, """{"error":{"code":"TooManyRequests","message":"throttled"}}""", ("Retry-After", "1")),
            Reply.Json(503, """{"error":{"code":"ServiceUnavailable","message":"busy"}}""", ("Retry-After", "1")),
        ]);
        await using var server = await FakeArm.StartAsync(_ => answers.TryDequeue(out var answer) ? answer : Reply.Json(200, """{"name":"x","properties":{"status":"Running"}}"""));
        // The configured back-off is 50 ms: only the server's Retry-After explains waiting a second per retry.
        using var services = Services(server, new() { ["Pipeline:FineTune:AzureMl:WorkspaceResourceId"] = Workspace });
        var backend = services.GetRequiredService<AzureMlBackend>();

        var clock = Stopwatch.StartNew();
        var state = await backend.GetStateAsync(Job, Submission(backend.Name, Job.JobId), CancellationToken.None);

        Assert.Equal(JobStates.Running, state.State);
        Assert.Equal(3, server.Requests.Count);
        Assert.True(server.Requests[2].At - server.Requests[0].At >= TimeSpan.FromSeconds(1.9), $"retried after {(server.Requests[2].At - server.Requests[0].At).TotalSeconds:N2} s, not after the two Retry-After seconds");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20));
    }

    [Fact]
    public async Task A_created_job_is_followed_through_its_azure_async_operation_and_a_failed_operation_fails_the_call()
    {
        var polls = 0;
        var outcome = "Succeeded";
        await using var server = await FakeArm.StartAsync(request => (request.Method, request.Path) switch
        {
            ("GET", "/operations/op-1") => Interlocked.Increment(ref polls) < 3
                ? Reply.Json(200, """{"status":"InProgress"}""")
                : Reply.Json(200, "{\"status\":\"" + outcome + "\",\"error\":{\"code\":\"QuotaExceeded\",\"message\":\"no GPU quota in this region\"}}"),
            ("GET", _) => Reply.Json(404, """{"error":{"code":"UserError","message":"job not found"}}"""),
            ("PUT", _) => Reply.Json(201, """{"name":"x","properties":{"status":"NotStarted"}}""", ("Azure-AsyncOperation", $"{request.Origin}/operations/op-1?api-version=2024-10-01")),
            _ => Reply.Json(400, "{}"),
        });
        using var services = Services(server, new() { ["Pipeline:FineTune:AzureMl:WorkspaceResourceId"] = Workspace });
        var backend = services.GetRequiredService<AzureMlBackend>();

        Assert.Equal(Job.JobId, await backend.SubmitAsync(Job, 1, CancellationToken.None));
        Assert.Equal(3, polls);

        polls = 0;
        outcome = "Failed";
        var error = await Assert.ThrowsAsync<HttpRequestException>(() => backend.SubmitAsync(Job, 2, CancellationToken.None));
        Assert.Contains("no GPU quota in this region", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_stop_answered_202_with_a_location_is_polled_until_it_is_done()
    {
        var polls = 0;
        await using var server = await FakeArm.StartAsync(request => (request.Method, request.Path) switch
        {
            ("POST", $"{JobPath}/executions/trainer-job-e1/stop") => Reply.Json(202, "", ("Location", $"{request.Origin}/operationResults/stop-1")),
            ("GET", "/operationResults/stop-1") => Interlocked.Increment(ref polls) < 2 ? Reply.Json(202, "") : Reply.Json(200, "{}"),
            _ => Reply.Json(400, "{}"),
        });
        using var services = Services(server, new() { ["Pipeline:FineTune:ContainerApps:JobResourceId"] = JobPath });
        var backend = services.GetRequiredService<ContainerAppsBackend>();

        await backend.CancelAsync(Job, Submission(backend.Name, "trainer-job-e1"), CancellationToken.None);

        Assert.Equal(2, polls);
    }

    [Fact]
    public async Task The_container_apps_backend_starts_reads_and_stops_executions_as_documented()
    {
        var arm = new ContainerAppsJob();
        await using var server = await FakeArm.StartAsync(arm.Answer);
        using var services = Services(server, ContainerApps("run-ca-shape"));
        var backend = services.GetRequiredService<ContainerAppsBackend>();
        var job = Job with { JobId = "job-ca-shape" };

        var handle = await backend.SubmitAsync(job, 1, CancellationToken.None);
        Assert.Equal("trainer-job-e1", handle);
        var submission = Submission(backend.Name, handle) with { JobId = job.JobId };
        Assert.Equal(JobStates.Running, (await backend.GetStateAsync(job, submission, CancellationToken.None)).State);
        await backend.CancelAsync(job, submission, CancellationToken.None);
        Assert.Equal(JobStates.Cancelled, (await backend.GetStateAsync(job, submission, CancellationToken.None)).State);

        var start = JsonNode.Parse(server.Requests.Single(r => r.Path == $"{JobPath}/start").Body)!;
        Assert.Null(start["template"]);
        var container = start["containers"]![0]!;
        Assert.Equal(("trainer", "acr.azurecr.io/pipeline:1"), (container["name"]!.GetValue<string>(), container["image"]!.GetValue<string>()));
        Assert.Equal(["--job", job.JobId], container["args"]!.AsArray().Select(a => a!.GetValue<string>()));
        Assert.Contains(container["env"]!.AsArray(), e => e!["name"]!.GetValue<string>() == "PIPELINE_JOB_SPEC" && e["value"]!.GetValue<string>() == $"jobs/{job.JobId}/spec.json");
        Assert.Contains(container["env"]!.AsArray(), e => e!["name"]!.GetValue<string>() == ContainerAppsBackend.AttemptVariable && e["value"]!.GetValue<string>() == "1");
        Assert.All(server.Requests, r => Assert.Equal("Bearer test-token", r.Authorization));
        Assert.All(server.Requests.Where(r => r.Path.StartsWith(JobPath, StringComparison.Ordinal)), r => Assert.Contains("api-version=2025-07-01", r.PathAndQuery, StringComparison.Ordinal));
        Assert.Contains(server.Requests, r => r.Method == "POST" && r.Path == $"{JobPath}/executions/trainer-job-e1/stop");
    }

    [Fact]
    public async Task Concurrent_and_repeated_submissions_of_one_attempt_start_one_execution()
    {
        var arm = new ContainerAppsJob { StartLatency = TimeSpan.FromMilliseconds(400) };
        await using var server = await FakeArm.StartAsync(arm.Answer);
        // Two hosts (each its own client and pipeline), three deliveries each, all at once.
        using var first = Services(server, ContainerApps("run-ca-race"));
        using var second = Services(server, ContainerApps("run-ca-race"));
        var job = Job with { JobId = "job-ca-race" };
        var backends = new[] { first, second }.Select(s => s.GetRequiredService<ContainerAppsBackend>()).ToArray();

        var handles = await Task.WhenAll(Enumerable.Range(0, 6).Select(i => Task.Run(() => backends[i % 2].SubmitAsync(job, 1, CancellationToken.None))));

        Assert.Single(handles.Distinct());
        Assert.Equal(1, arm.Starts);
        // A redelivery later (the claim's record, or the executions list) finds the same execution.
        Assert.Equal(handles[0], await backends[1].SubmitAsync(job, 1, CancellationToken.None));
        await ExecutionClaims(first).DeleteIfExistsAsync();
        Assert.Equal(handles[0], await backends[0].SubmitAsync(job, 1, CancellationToken.None));
        Assert.Equal(1, arm.Starts);
        // The next attempt is a new execution.
        Assert.NotEqual(handles[0], await backends[0].SubmitAsync(job, 2, CancellationToken.None));
        Assert.Equal(2, arm.Starts);

        Azure.Storage.Blobs.BlobClient ExecutionClaims(ServiceProvider services) =>
            services.GetRequiredService<StorageClients>().Container(StorageNames.Containers.Jobs).GetBlobClient($"{job.JobId}/executions/attempt-1.json");
    }

    [Fact]
    public async Task A_start_that_fails_is_not_repeated_blindly_and_the_next_submission_starts_it()
    {
        var arm = new ContainerAppsJob { FailStarts = 1 };
        await using var server = await FakeArm.StartAsync(arm.Answer);
        using var services = Services(server, ContainerApps("run-ca-fail"));
        var backend = services.GetRequiredService<ContainerAppsBackend>();
        var job = Job with { JobId = "job-ca-fail" };

        // ARM refused the start (409): nothing was started, so the claim is given up.
        var refused = await Assert.ThrowsAsync<ArmRefusedException>(() => backend.SubmitAsync(job, 1, CancellationToken.None));
        Assert.Equal(HttpStatusCode.Conflict, refused.StatusCode);
        Assert.Single(server.Requests, r => r.Path == $"{JobPath}/start");

        Assert.Equal("trainer-job-e1", await backend.SubmitAsync(job, 1, CancellationToken.None));
        Assert.Equal(1, arm.Starts);
    }

    [Fact]
    public async Task A_start_that_times_out_after_arm_accepted_it_never_starts_a_second_execution()
    {
        // ARM accepts the start, answers only after the client's 1-second timeout, and lists the execution 3 s later.
        var arm = new ContainerAppsJob { FirstStartReplyDelay = TimeSpan.FromSeconds(3), ListingLatency = TimeSpan.FromSeconds(3) };
        await using var server = await FakeArm.StartAsync(arm.Answer);
        var settings = ContainerApps("run-ca-timeout");
        settings["Pipeline:FineTune:Arm:NetworkTimeout"] = "00:00:01";
        using var first = Services(server, new(settings));
        using var second = Services(server, new(settings));
        var backends = new[] { first, second }.Select(s => s.GetRequiredService<ContainerAppsBackend>()).ToArray();
        var job = Job with { JobId = "job-ca-timeout" };

        var timedOut = await Assert.ThrowsAsync<HttpRequestException>(() => backends[0].SubmitAsync(job, 1, CancellationToken.None));
        Assert.Contains("ARM may have started it", timedOut.Message, StringComparison.Ordinal);
        Assert.Equal(1, arm.Starts);

        // Redeliveries on both hosts at once, before ARM lists the execution: none starts another; they answer "not yet".
        var handles = await Task.WhenAll(Enumerable.Range(0, 4).Select(i => Task.Run(() => backends[i % 2].SubmitAsync(job, 1, CancellationToken.None))));
        Assert.All(handles, h => Assert.Null(h));
        Assert.Single(server.Requests, r => r.Path == $"{JobPath}/start");

        // Once listed, it is found by its job id and attempt.
        var found = await Eventually.ReturnsAsync(() => backends[1].SubmitAsync(job, 1, CancellationToken.None), TimeSpan.FromSeconds(20), "the accepted execution to be found");
        Assert.Equal("trainer-job-e1", found);
        Assert.Equal(1, arm.Starts);
        Assert.Single(server.Requests, r => r.Path == $"{JobPath}/start");
    }

    [Fact]
    public async Task A_start_lost_without_an_execution_is_started_again_once_its_claim_is_stale()
    {
        // The first start never becomes an execution, and its answer comes after the timeout.
        var arm = new ContainerAppsJob { FirstStartReplyDelay = TimeSpan.FromSeconds(2), LoseFirstStart = true };
        await using var server = await FakeArm.StartAsync(arm.Answer);
        var settings = ContainerApps("run-ca-stale");
        settings["Pipeline:FineTune:Arm:NetworkTimeout"] = "00:00:01";
        settings["Pipeline:FineTune:Arm:OperationTimeout"] = "00:00:01";
        settings["Pipeline:FineTune:ContainerApps:ClaimStaleAfter"] = "00:00:04";
        using var services = Services(server, settings);
        var backend = services.GetRequiredService<ContainerAppsBackend>();
        var job = Job with { JobId = "job-ca-stale" };

        await Assert.ThrowsAsync<HttpRequestException>(() => backend.SubmitAsync(job, 1, CancellationToken.None));
        var clock = Stopwatch.StartNew();
        Assert.Null(await backend.SubmitAsync(job, 1, CancellationToken.None));

        // Nothing is listed for the attempt for ClaimStaleAfter: the next submission takes the claim over and starts it.
        var handle = await Eventually.ReturnsAsync(() => backend.SubmitAsync(job, 1, CancellationToken.None), TimeSpan.FromSeconds(20), "the stale claim to be taken over");
        Assert.True(clock.Elapsed >= TimeSpan.FromSeconds(2.5), $"started again after {clock.Elapsed.TotalSeconds:N1} s, before the claim was stale");
        Assert.Equal(("trainer-job-e1", 1), (handle, arm.Starts));
        Assert.Equal(2, server.Requests.Count(r => r.Path == $"{JobPath}/start"));
    }

    private static Dictionary<string, string?> ContainerApps(string name) => new()
    {
        ["Pipeline:FineTune:ContainerApps:JobResourceId"] = JobPath,
        ["Pipeline:FineTune:TrainerImage"] = "acr.azurecr.io/pipeline:1",
    };

    /// <summary>The platform's fine-tune composition, its ARM client trusting the fake's certificate and a test token.</summary>
    private ServiceProvider Services(FakeArm server, Dictionary<string, string?> settings)
    {
        settings[StorageClients.ConnectionSetting] = azurite.ConnectionString;
        settings["Pipeline:FineTune:AzureMl:Endpoint"] = server.Origin;
        settings["Pipeline:FineTune:ContainerApps:Endpoint"] = server.Origin;
        settings["Pipeline:FineTune:Arm:Delay"] = "00:00:00.050";
        settings["Pipeline:FineTune:Arm:OperationPollInterval"] = "00:00:00.100";
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(settings).Build();
        var services = new ServiceCollection().AddLogging().AddPipelineStorage(configuration).AddFineTuning(configuration);
        services.AddSingleton(Token);
        services.AddHttpClient(ArmClient.HttpClientName).ConfigurePrimaryHttpMessageHandler(() => new SocketsHttpHandler
        {
            SslOptions = { RemoteCertificateValidationCallback = (_, certificate, _, _) => certificate?.GetCertHashString() == server.Certificate.GetCertHashString() },
        });
        var provider = services.BuildServiceProvider();
        provider.GetRequiredService<StorageClients>().Container(StorageNames.Containers.Jobs).CreateIfNotExists();
        return provider;
    }

    private static readonly TokenCredential Token = DelegatedTokenCredential.Create((context, _) =>
    {
        Assert.Equal([ArmBackend.ArmScope], context.Scopes);
        return new AccessToken("test-token", DateTimeOffset.UtcNow.AddHours(1));
    });

    private static JobSubmission Submission(string backend, string? handle) =>
        new() { JobId = Job.JobId, Backend = backend, Attempt = 1, Handle = handle, FirstSubmittedAt = DateTimeOffset.UtcNow, SubmittedAt = DateTimeOffset.UtcNow };

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

    /// <summary>
    /// A Container Apps job as the REST API describes it: POST start answers 202 with the execution's name and an
    /// Azure-AsyncOperation to poll; GET executions lists them (two a page, nextLink), each with its template's env.
    /// </summary>
    private sealed class ContainerAppsJob
    {
        private readonly ConcurrentDictionary<string, (JsonNode Template, string Status, DateTimeOffset ListedFrom)> _executions = new();
        private int _starts;
        private int _startRequests;
        private int _failStarts;

        public TimeSpan StartLatency { get; init; } = TimeSpan.Zero;
        /// <summary>The first starts ARM refuses (409: the job is being updated), doing nothing.</summary>
        public int FailStarts { init => _failStarts = value; }
        /// <summary>How long the first start's answer takes, after ARM has accepted it (unless <see cref="LoseFirstStart"/>).</summary>
        public TimeSpan FirstStartReplyDelay { get; init; } = TimeSpan.Zero;
        /// <summary>The first start never becomes an execution (its answer, a 500, comes after <see cref="FirstStartReplyDelay"/>).</summary>
        public bool LoseFirstStart { get; init; }
        /// <summary>How long an accepted execution takes to appear in the executions list.</summary>
        public TimeSpan ListingLatency { get; init; } = TimeSpan.Zero;
        public int Starts => _starts;

        public Reply Answer(ArmRequest request)
        {
            switch (request.Method, request.Path)
            {
                case ("POST", $"{JobPath}/start"):
                    if (Interlocked.Decrement(ref _failStarts) >= 0)
                    {
                        return Reply.Json(409, """{"error":{"code":"Conflict","message":"the job is being updated; try later"}}""");
                    }

                    var first = Interlocked.Increment(ref _startRequests) == 1;
                    if (first && LoseFirstStart)
                    {
                        Thread.Sleep(FirstStartReplyDelay);
                        return Reply.Json(500, """{"error":{"code":"InternalServerError","message":"lost"}}""");
                    }

                    Thread.Sleep(StartLatency);
                    var name = $"trainer-job-e{Interlocked.Increment(ref _starts)}";
                    _executions[name] = (JsonNode.Parse(request.Body)!, "Running", DateTimeOffset.UtcNow + ListingLatency);
                    if (first)
                    {
                        Thread.Sleep(FirstStartReplyDelay);
                    }

                    return Reply.Json(202, $$"""{"name":"{{name}}","id":"{{JobPath}}/executions/{{name}}"}""", ("Azure-AsyncOperation", $"{request.Origin}/operations/start-{name}"));
                case ("GET", var path) when path.StartsWith("/operations/start-", StringComparison.Ordinal):
                    return Reply.Json(200, """{"status":"Succeeded"}""");
                case ("GET", $"{JobPath}/executions"):
                    var skip = int.TryParse(request.Query["skip"], out var s) ? s : 0;
                    var page = new JsonArray();
                    var listed = _executions.Where(e => e.Value.ListedFrom <= DateTimeOffset.UtcNow).OrderBy(e => e.Key, StringComparer.Ordinal).ToList();
                    foreach (var (key, execution) in listed.Skip(skip).Take(2))
                    {
                        page.Add(new JsonObject { ["name"] = key, ["properties"] = new JsonObject { ["status"] = execution.Status, ["template"] = execution.Template.DeepClone() } });
                    }

                    var list = new JsonObject { ["value"] = page };
                    if (skip + 2 < listed.Count)
                    {
                        list["nextLink"] = $"{request.Origin}{JobPath}/executions?api-version=2025-07-01&skip={skip + 2}";
                    }

                    return Reply.Json(200, list.ToJsonString());
                case ("GET", var path) when path.StartsWith($"{JobPath}/executions/", StringComparison.Ordinal) && _executions.TryGetValue(path[(JobPath.Length + 12)..], out var found):
                    return Reply.Json(200, "{\"name\":\"x\",\"properties\":{\"status\":\"" + found.Status + "\"}}");
                case ("POST", var path) when path.StartsWith($"{JobPath}/executions/", StringComparison.Ordinal) && path.EndsWith("/stop", StringComparison.Ordinal):
                    var stopped = path[(JobPath.Length + 12)..^5];
                    _executions[stopped] = _executions[stopped] with { Status = "Stopped" };
                    return Reply.Json(200, "");
                default:
                    return Reply.Json(404, """{"error":{"code":"NotFound","message":"no such resource"}}""");
            }
        }
    }

    private sealed record ArmRequest(string Method, string Path, string PathAndQuery, IQueryCollection Query, string? Authorization, string Body, string Origin, TimeSpan At);

    private sealed record Reply(int Status, string Body, (string Name, string Value)[] Headers)
    {
        public static Reply Json(int status, string body, params (string Name, string Value)[] headers) => new(status, body, headers);
    }

    /// <summary>Kestrel on a free loopback port with a self-signed certificate (the bearer-token policy sends tokens over TLS only).</summary>
    private sealed class FakeArm : IAsyncDisposable
    {
        private readonly WebApplication _app;
        private readonly Stopwatch _clock = Stopwatch.StartNew();
        private readonly List<ArmRequest> _requests = [];

        private FakeArm(WebApplication app, X509Certificate2 certificate)
        {
            _app = app;
            Certificate = certificate;
        }

        public X509Certificate2 Certificate { get; }
        public string Origin { get; private set; } = "";

        public IReadOnlyList<ArmRequest> Requests
        {
            get
            {
                lock (_requests)
                {
                    return [.. _requests];
                }
            }
        }

        public static async Task<FakeArm> StartAsync(Func<ArmRequest, Reply> respond)
        {
            var certificate = SelfSigned();
            var builder = WebApplication.CreateSlimBuilder();
            builder.Logging.ClearProviders();
            builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0, listen => listen.UseHttps(certificate)));
            var app = builder.Build();
            var fake = new FakeArm(app, certificate);
            app.Run(async context =>
            {
                var body = await new StreamReader(context.Request.Body).ReadToEndAsync();
                var request = new ArmRequest(context.Request.Method, context.Request.Path.Value!, context.Request.Path.Value + context.Request.QueryString.Value, context.Request.Query,
                    context.Request.Headers.Authorization.FirstOrDefault(), body, fake.Origin, fake._clock.Elapsed);
                lock (fake._requests)
                {
                    fake._requests.Add(request);
                }

                var reply = respond(request);
                context.Response.StatusCode = reply.Status;
                foreach (var (name, value) in reply.Headers)
                {
                    context.Response.Headers[name] = value;
                }

                if (reply.Body.Length > 0)
                {
                    context.Response.ContentType = "application/json";
                    await context.Response.WriteAsync(reply.Body);
                }
            });
            await app.StartAsync();
            var address = new Uri(app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First());
            fake.Origin = $"https://127.0.0.1:{address.Port}";
            return fake;
        }

        public async ValueTask DisposeAsync()
        {
            await _app.StopAsync();
            await _app.DisposeAsync();
            Certificate.Dispose();
        }

        private static X509Certificate2 SelfSigned()
        {
            using var key = RSA.Create(2048);
            var request = new CertificateRequest("CN=127.0.0.1", key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
            var names = new SubjectAlternativeNameBuilder();
            names.AddIpAddress(IPAddress.Loopback);
            request.CertificateExtensions.Add(names.Build());
            using var certificate = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddHours(1));
            return X509CertificateLoader.LoadPkcs12(certificate.Export(X509ContentType.Pfx), null);
        }
    }
}
