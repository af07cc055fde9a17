using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.Storage;

namespace Pipeline.FineTuning;

/// <summary>Configuration section <c>Pipeline:FineTune</c> (environment: <c>Pipeline__FineTune__*</c>).</summary>
public sealed class FineTuneOptions
{
    public const string Section = "Pipeline:FineTune";

    /// <summary>The backend a run gets when its spec names none: <c>local</c>, <c>azureml</c> or <c>containerapps</c> (the templates set it).</summary>
    public string Backend { get; set; } = FineTuneBackends.Local;
    /// <summary>The trainer image (Container Apps executions; the templates set it).</summary>
    public string? TrainerImage { get; set; }
    /// <summary>The client id of the trainers' user-assigned identity: cloud trainers reach storage with it.</summary>
    public string? TrainerClientId { get; set; }

    /// <summary>First poll of a submitted job; polls back off by doubling to <see cref="MonitorMaxDelay"/>.</summary>
    public TimeSpan MonitorInitialDelay { get; set; } = TimeSpan.FromSeconds(2);
    public TimeSpan MonitorMaxDelay { get; set; } = TimeSpan.FromSeconds(30);
    /// <summary>How often trainers write status.json (written into the job spec).</summary>
    public double HeartbeatSeconds { get; set; } = 5;
    /// <summary>A job with no heartbeat for this long is lost: resubmitted, up to <see cref="MaxAttempts"/> submissions.</summary>
    public TimeSpan HeartbeatTimeout { get; set; } = TimeSpan.FromMinutes(2);
    /// <summary>How long a submitted trainer may take to write its first heartbeat (node start, image pull) before it is lost.</summary>
    public TimeSpan StartTimeout { get; set; } = TimeSpan.FromMinutes(15);
    public int MaxAttempts { get; set; } = 3;
    public LocalBackendOptions Local { get; set; } = new();
    public AzureMlOptions AzureMl { get; set; } = new();
    public ContainerAppsOptions ContainerApps { get; set; } = new();
    /// <summary>Retries, back-off and long-running operations of the cloud backends' ARM calls.</summary>
    public ArmOptions Arm { get; set; } = new();
    /// <summary>Environment variables every cloud trainer gets (for example <c>AzureWebJobsStorage__blobServiceUri</c>).</summary>
    public Dictionary<string, string> TrainerEnvironment { get; set; } = [];
}

public sealed class LocalBackendOptions
{
    /// <summary>Trainer processes this host runs at once; further jobs wait (queued) until one ends.</summary>
    public int MaxConcurrentJobs { get; set; } = 1;
    /// <summary>The trainer program (Pipeline.Trainer, or its .dll run with dotnet). Default: Pipeline.Trainer.dll beside the app.</summary>
    public string? TrainerPath { get; set; }
}

public sealed class AzureMlOptions
{
    public string Endpoint { get; set; } = "https://management.azure.com";
    public string ApiVersion { get; set; } = "2024-10-01";
    /// <summary>The workspace's ARM id (the templates set it); or the three parts below.</summary>
    public string? WorkspaceResourceId { get; set; }
    public string SubscriptionId { get; set; } = "";
    public string ResourceGroup { get; set; } = "";
    public string Workspace { get; set; } = "";
    /// <summary>The compute cluster's name (GPU).</summary>
    public string ComputeName { get; set; } = "";
    /// <summary>The ARM id of the environment version with the trainer image.</summary>
    public string EnvironmentId { get; set; } = "";
    /// <summary>The trainer's command; <c>{jobId}</c> is replaced.</summary>
    public string Command { get; set; } = "/app/Pipeline.Trainer --job {jobId}";
    public string ExperimentName { get; set; } = "pipeline-finetune";
}

public sealed class ContainerAppsOptions
{
    public string Endpoint { get; set; } = "https://management.azure.com";
    public string ApiVersion { get; set; } = "2025-07-01";
    /// <summary>The Container Apps job's ARM id (the templates set it); or the three parts below.</summary>
    public string? JobResourceId { get; set; }
    public string SubscriptionId { get; set; } = "";
    public string ResourceGroup { get; set; } = "";
    /// <summary>The Container Apps job (on a GPU workload profile) whose executions run trainers.</summary>
    public string JobName { get; set; } = "";
    /// <summary>The job template's container name and image (overrides must repeat both).</summary>
    public string ContainerName { get; set; } = "trainer";
    /// <summary>Default: <see cref="FineTuneOptions.TrainerImage"/>.</summary>
    public string Image { get; set; } = "";
    public double Cpu { get; set; } = 8;
    public string Memory { get; set; } = "56Gi";
    public string[] Command { get; set; } = ["/app/Pipeline.Trainer"];
    /// <summary>
    /// How long a start claimed for a job's attempt may go without its execution appearing in the executions list
    /// before another submission starts the attempt again (the claimer died, or its start was lost). ARM accepts a
    /// start asynchronously and may list the execution minutes later, so this is long; never shorter than the
    /// claimer's own start may take (<see cref="ArmOptions.NetworkTimeout"/> plus <see cref="ArmOptions.OperationTimeout"/>).
    /// </summary>
    public TimeSpan ClaimStaleAfter { get; set; } = TimeSpan.FromMinutes(30);
}

/// <summary>What a backend says about a job (the trainer's heartbeat says more).</summary>
public sealed record BackendState(string State, string? Message = null);

/// <summary>A place trainers run. Submissions must be idempotent per job id and attempt.</summary>
public interface IFineTuneBackend
{
    string Name { get; }
    /// <summary>Starts the trainer for <paramref name="job"/>; returns its handle, or null when there is no capacity now (try again later).</summary>
    Task<string?> SubmitAsync(JobSpec job, int attempt, CancellationToken cancellationToken);
    /// <summary>Queued, running, or an end state of the backend's own (failed, cancelled, succeeded); unknown when it cannot tell.</summary>
    Task<BackendState> GetStateAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken);
    Task CancelAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken);
}

/// <summary>
/// The embedded default: the trainer runs as a separate process on this machine (the Pipeline.Trainer
/// program), a configurable number at a time. It survives a host restart: the heartbeat rules
/// decide, not the process handle.
/// </summary>
public sealed class LocalProcessBackend(IOptions<FineTuneOptions> options, IConfiguration configuration, ILogger<LocalProcessBackend> logger) : IFineTuneBackend
{
    private static readonly ConcurrentDictionary<string, Process> Running = new();

    /// <summary>The state reported when the trainer's process has ended (its heartbeat says how).</summary>
    public const string Exited = "exited";

    public string Name => FineTuneBackends.Local;

    /// <summary>The trainer's assembly (trainer/Pipeline.Trainer.csproj), looked for beside the app when no path is set.</summary>
    public const string TrainerAssembly = "Pipeline.Trainer.dll";

    public Task<string?> SubmitAsync(JobSpec job, int attempt, CancellationToken cancellationToken)
    {
        foreach (var (id, process) in Running)
        {
            if (process.HasExited)
            {
                Running.TryRemove(id, out _);
                process.Dispose();
            }
        }

        if (Running.Count >= Math.Max(1, options.Value.Local.MaxConcurrentJobs))
        {
            return Task.FromResult<string?>(null);
        }

        var start = TrainerStart(job.JobId, options.Value.Local.TrainerPath);
        // The storage settings reach the trainer: a connection string, or the identity-based settings (inherited from this process's environment).
        foreach (var (key, value) in configuration.AsEnumerable().Where(c => c.Value is not null && (c.Key == StorageClients.ConnectionSetting || c.Key.StartsWith(StorageClients.ConnectionSetting + ":", StringComparison.Ordinal))))
        {
            start.Environment[key.Replace(":", "__", StringComparison.Ordinal)] = value;
        }

        foreach (var (key, value) in options.Value.TrainerEnvironment)
        {
            start.Environment[key] = value;
        }

        var trainer = Process.Start(start) ?? throw new InvalidOperationException($"The trainer process for {job.JobId} did not start.");
        trainer.OutputDataReceived += (_, e) => { if (e.Data is not null) { logger.LogInformation("[trainer {JobId}] {Line}", job.JobId, e.Data); } };
        trainer.ErrorDataReceived += (_, e) => { if (e.Data is not null) { logger.LogWarning("[trainer {JobId}] {Line}", job.JobId, e.Data); } };
        trainer.BeginOutputReadLine();
        trainer.BeginErrorReadLine();
        Running[$"{job.JobId}#{attempt}"] = trainer;
        logger.LogInformation("Started trainer process {Pid} for job {JobId} (attempt {Attempt})", trainer.Id, job.JobId, attempt);
        return Task.FromResult<string?>(trainer.Id.ToString(System.Globalization.CultureInfo.InvariantCulture));
    }

    /// <summary>The trainer program with <c>--job &lt;jobId&gt;</c> (under <c>dotnet</c> when it is a .dll).</summary>
    /// <exception cref="InvalidOperationException">No trainer is configured and none is beside this app.</exception>
    public static ProcessStartInfo TrainerStart(string jobId, string? trainerPath = null)
    {
        var path = trainerPath is { Length: > 0 } ? trainerPath : Path.Combine(AppContext.BaseDirectory, TrainerAssembly);
        if (!File.Exists(path))
        {
            throw new InvalidOperationException($"The local fine-tune backend found no trainer at {path}. Build trainer/ (Pipeline.Trainer) and set Pipeline__FineTune__Local__TrainerPath to its Pipeline.Trainer.dll or executable.");
        }

        var start = new ProcessStartInfo(path) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        if (path.EndsWith(".dll", StringComparison.OrdinalIgnoreCase))
        {
            start.FileName = "dotnet";
            start.ArgumentList.Add(path);
        }

        start.ArgumentList.Add("--job");
        start.ArgumentList.Add(jobId);
        return start;
    }

    public Task<BackendState> GetStateAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken)
    {
        if (submission.Handle is null)
        {
            return Task.FromResult(new BackendState(JobStates.Queued, "waiting for a free trainer slot"));
        }

        try
        {
            using var process = Process.GetProcessById(int.Parse(submission.Handle, System.Globalization.CultureInfo.InvariantCulture));
            return Task.FromResult(new BackendState(process.HasExited ? Exited : JobStates.Running));
        }
        catch (ArgumentException)
        {
            return Task.FromResult(new BackendState(Exited, $"trainer process {submission.Handle} is gone"));
        }
    }

    public Task CancelAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken)
    {
        // The trainer stops itself at its next heartbeat once cancel.json exists; this only frees the slot sooner.
        foreach (var (id, process) in Running.Where(r => r.Key.StartsWith(job.JobId + "#", StringComparison.Ordinal)))
        {
            if (!process.HasExited && !process.WaitForExit(TimeSpan.FromSeconds(10)))
            {
                process.Kill(entireProcessTree: true);
            }

            Running.TryRemove(id, out _);
        }

        return Task.CompletedTask;
    }
}

/// <summary>
/// Shared by the cloud backends: ARM requests through <see cref="ArmClient"/> (bearer token from Azure.Identity,
/// managed identity in Azure; retries, <c>Retry-After</c>, long-running operations) and the trainer's environment.
/// </summary>
public abstract class ArmBackend(ArmClient arm)
{
    public const string ArmScope = ArmClient.ArmScope;

    protected ArmClient Arm => arm;

    protected Task<JsonNode?> SendAsync(HttpMethod method, string url, JsonNode? body, CancellationToken cancellationToken, params HttpStatusCode[] accepted) =>
        arm.SendAsync(method, url, body, cancellationToken, true, accepted);

    /// <summary>The trainer's environment: where the job is, plus the configured settings (storage account, identity).</summary>
    protected static Dictionary<string, string> TrainerEnvironment(JobSpec job, FineTuneOptions options)
    {
        var environment = new Dictionary<string, string>(options.TrainerEnvironment)
        {
            ["PIPELINE_JOB_ID"] = job.JobId,
            ["PIPELINE_JOB_SPEC"] = $"{StorageNames.Containers.Jobs}/{job.JobId}/spec.json",
        };
        if (options.TrainerClientId is { Length: > 0 } clientId)
        {
            // The trainers' user-assigned identity reaches storage (AzureWebJobsStorage__clientId) and anything else (AZURE_CLIENT_ID).
            environment.TryAdd("AZURE_CLIENT_ID", clientId);
            environment.TryAdd($"{StorageClients.ConnectionSetting}__clientId", clientId);
        }

        return environment;
    }

    /// <summary>The parts of an ARM id: <c>/subscriptions/{s}/resourceGroups/{g}/providers/{namespace}/{type}/{name}</c>.</summary>
    public static (string Subscription, string ResourceGroup, string Name) ParseResourceId(string id)
    {
        var parts = id.Trim('/').Split('/');
        return parts.Length >= 8 && parts[0].Equals("subscriptions", StringComparison.OrdinalIgnoreCase) && parts[2].Equals("resourceGroups", StringComparison.OrdinalIgnoreCase)
            ? (parts[1], parts[3], parts[^1])
            : throw new InvalidOperationException($"'{id}' is not an ARM resource id (/subscriptions/.../resourceGroups/.../providers/...).");
    }
}

/// <summary>
/// Azure Machine Learning: a command job per attempt through the workspace REST API (job name = jobId, or
/// jobId-aN for resubmissions), its status from GET, cancel by POST .../cancel. Untested against Azure.
/// </summary>
public sealed class AzureMlBackend(ArmClient arm, IOptions<FineTuneOptions> options) : ArmBackend(arm), IFineTuneBackend
{
    public string Name => FineTuneBackends.AzureMl;

    private AzureMlOptions Settings => options.Value.AzureMl;

    private string Workspace => Settings.WorkspaceResourceId is { Length: > 0 } id
        ? "/" + id.Trim('/')
        : $"/subscriptions/{Settings.SubscriptionId}/resourceGroups/{Settings.ResourceGroup}/providers/Microsoft.MachineLearningServices/workspaces/{Settings.Workspace}";

    public static string JobName(string jobId, int attempt) => attempt <= 1 ? jobId : $"{jobId}-a{attempt}";

    private string JobUrl(string name, string suffix = "") => $"{Settings.Endpoint.TrimEnd('/')}{Workspace}/jobs/{name}{suffix}?api-version={Settings.ApiVersion}";

    public async Task<string?> SubmitAsync(JobSpec job, int attempt, CancellationToken cancellationToken)
    {
        var name = JobName(job.JobId, attempt);
        var environment = new JsonObject();
        foreach (var (key, value) in TrainerEnvironment(job, options.Value))
        {
            environment[key] = value;
        }

        var body = new JsonObject
        {
            ["properties"] = new JsonObject
            {
                ["jobType"] = "Command",
                ["displayName"] = $"pipeline {job.JobId}",
                ["experimentName"] = Settings.ExperimentName,
                ["command"] = Settings.Command.Replace("{jobId}", job.JobId, StringComparison.Ordinal),
                ["environmentId"] = Settings.EnvironmentId,
                ["computeId"] = $"{Workspace}/computes/{Settings.ComputeName}",
                ["environmentVariables"] = environment,
                ["resources"] = new JsonObject { ["instanceCount"] = 1 },
                ["limits"] = new JsonObject { ["jobLimitsType"] = "Command", ["timeout"] = System.Xml.XmlConvert.ToString(TimeSpan.FromMinutes(Math.Ceiling(job.MaxDurationMinutes))) },
                ["tags"] = new JsonObject { ["pipeline.jobId"] = job.JobId, ["pipeline.runId"] = job.RunId },
            },
        };
        // The job's name is its key: a redelivered or concurrent submission finds the same job (looked up first:
        // an existing job's PUT would be an update; a concurrent creation answers 409).
        try
        {
            await SendAsync(HttpMethod.Get, JobUrl(name), null, cancellationToken, HttpStatusCode.OK);
            return name;
        }
        catch (HttpRequestException e) when (e.StatusCode == HttpStatusCode.NotFound)
        {
        }

        try
        {
            await SendAsync(HttpMethod.Put, JobUrl(name), body, cancellationToken, HttpStatusCode.OK, HttpStatusCode.Created);
        }
        catch (HttpRequestException e) when (e.StatusCode == HttpStatusCode.Conflict)
        {
        }

        return name;
    }

    public async Task<BackendState> GetStateAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken)
    {
        var response = await SendAsync(HttpMethod.Get, JobUrl(submission.Handle ?? JobName(job.JobId, submission.Attempt)), null, cancellationToken, HttpStatusCode.OK);
        var status = response?["properties"]?["status"]?.GetValue<string>() ?? "Unknown";
        return status switch
        {
            "Completed" => new BackendState(JobStates.Succeeded, status),
            "Failed" => new BackendState(JobStates.Failed, $"Azure ML reports the job {status}"),
            "Canceled" => new BackendState(JobStates.Cancelled, status),
            "NotStarted" or "Starting" or "Provisioning" or "Preparing" or "Queued" => new BackendState(JobStates.Queued, status),
            _ => new BackendState(JobStates.Running, status),
        };
    }

    public Task CancelAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken) =>
        SendAsync(HttpMethod.Post, JobUrl(submission.Handle ?? JobName(job.JobId, submission.Attempt), "/cancel"), null, cancellationToken, HttpStatusCode.OK, HttpStatusCode.Accepted);
}

/// <summary>
/// Azure Container Apps jobs on a GPU workload profile: an execution per attempt (start with the job id and attempt
/// in the container's environment), its status from GET .../executions/{name}, stop by POST .../stop. Untested against Azure.
/// Executions cannot be named by the caller, so a start is keyed by job id and attempt: the executions are listed
/// first (a redelivery, or a start whose reply was lost), and a claim blob (<c>jobs/{jobId}/executions/attempt-{n}.json</c>,
/// written once) lets exactly one of concurrent submissions start; the others wait for its execution's name.
/// </summary>
public sealed class ContainerAppsBackend(ArmClient arm, StorageClients storage, IOptions<FineTuneOptions> options) : ArmBackend(arm), IFineTuneBackend
{
    public string Name => FineTuneBackends.ContainerApps;

    private ContainerAppsOptions Settings => options.Value.ContainerApps;

    private string JobPath => Settings.JobResourceId is { Length: > 0 } id
        ? "/" + id.Trim('/')
        : $"/subscriptions/{Settings.SubscriptionId}/resourceGroups/{Settings.ResourceGroup}/providers/Microsoft.App/jobs/{Settings.JobName}";

    private string JobUrl(string suffix) => $"{Settings.Endpoint.TrimEnd('/')}{JobPath}{suffix}?api-version={Settings.ApiVersion}";

    /// <summary>The container environment variable that keys an execution to its attempt (with <c>PIPELINE_JOB_ID</c>).</summary>
    public const string AttemptVariable = "PIPELINE_JOB_ATTEMPT";

    public async Task<string?> SubmitAsync(JobSpec job, int attempt, CancellationToken cancellationToken)
    {
        var claim = ExecutionClaims.Blob(storage, job.JobId, attempt);
        var stale = ClaimStaleAfter;
        var waitUntil = DateTimeOffset.UtcNow + ClaimWait;
        while (true)
        {
            if (await FindExecutionAsync(job.JobId, attempt, cancellationToken) is { } existing)
            {
                return existing;
            }

            if (await BlobJson.WriteOnceAsync(claim, new ExecutionClaim(job.JobId, attempt, DateTimeOffset.UtcNow, null), ExecutionClaimJson.Default.ExecutionClaim, cancellationToken))
            {
                return await StartAsync(job, attempt, claim, cancellationToken);
            }

            // Another submission holds the claim: its execution, once it has one; the claim taken over once it is stale
            // (its submitter died between claim and start, or its start never showed up in the executions list); from
            // the top when it was given up (ARM refused its start).
            if (await ReadClaimAsync(claim, cancellationToken) is not var (current, etag))
            {
                continue;
            }

            if (current.Execution is { } name)
            {
                return name;
            }

            if (DateTimeOffset.UtcNow - current.ClaimedAt > stale)
            {
                if (await TakeOverAsync(claim, current, etag, cancellationToken))
                {
                    return await FindExecutionAsync(job.JobId, attempt, cancellationToken) ?? await StartAsync(job, attempt, claim, cancellationToken);
                }

                continue;
            }

            // A start whose outcome is unknown (ARM may have started it) is not repeated: nothing to hand back yet, the
            // monitor asks again (and finds it in the executions list once ARM lists it). Nor is a concurrent start waited on for long.
            if (current.Unresolved is not null || DateTimeOffset.UtcNow > waitUntil)
            {
                return null;
            }

            await Task.Delay(ClaimPollInterval, cancellationToken);
        }
    }

    /// <summary>
    /// How old a claim without an execution must be before another submission may start the attempt: at least as long
    /// as its holder's start may take (<see cref="ArmOptions.NetworkTimeout"/> and <see cref="ArmOptions.OperationTimeout"/>).
    /// </summary>
    private TimeSpan ClaimStaleAfter => TimeSpan.FromTicks(Math.Max(Settings.ClaimStaleAfter.Ticks, (options.Value.Arm.OperationTimeout + options.Value.Arm.NetworkTimeout).Ticks));

    private static readonly TimeSpan ClaimPollInterval = TimeSpan.FromMilliseconds(250);

    /// <summary>How long a submission waits for a concurrent one's execution before it answers "not yet" (null: asked again at the next poll).</summary>
    private static readonly TimeSpan ClaimWait = TimeSpan.FromSeconds(20);

    private static async Task<(ExecutionClaim Claim, Azure.ETag ETag)?> ReadClaimAsync(Azure.Storage.Blobs.BlobClient claim, CancellationToken cancellationToken)
    {
        try
        {
            var content = await claim.DownloadContentAsync(cancellationToken);
            return (JsonSerializer.Deserialize(content.Value.Content.ToMemory().Span, ExecutionClaimJson.Default.ExecutionClaim)!, content.Value.Details.ETag);
        }
        catch (Azure.RequestFailedException e) when (e.Status == 404)
        {
            return null;
        }
    }

    private static async Task<bool> TakeOverAsync(Azure.Storage.Blobs.BlobClient claim, ExecutionClaim current, Azure.ETag etag, CancellationToken cancellationToken)
    {
        try
        {
            await claim.UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(current with { ClaimedAt = DateTimeOffset.UtcNow, Unresolved = null }, ExecutionClaimJson.Default.ExecutionClaim)),
                new Azure.Storage.Blobs.Models.BlobUploadOptions { Conditions = new Azure.Storage.Blobs.Models.BlobRequestConditions { IfMatch = etag } }, cancellationToken);
            return true;
        }
        catch (Azure.RequestFailedException e) when (e.Status is 404 or 412)
        {
            return false;
        }
    }

    /// <summary>
    /// Starts the execution (a start is never retried blindly) and records its name in the claim. A start ARM refused
    /// (<see cref="ArmRefusedException"/>: nothing was started) gives the claim up; any other failure (a timeout, a 5xx,
    /// an operation that failed after ARM accepted the start) may have started it, so the claim is kept, marked
    /// unresolved: no second execution is started until the executions list shows none for <see cref="ContainerAppsOptions.ClaimStaleAfter"/>.
    /// </summary>
    private async Task<string> StartAsync(JobSpec job, int attempt, Azure.Storage.Blobs.BlobClient claim, CancellationToken cancellationToken)
    {
        var claimedAt = DateTimeOffset.UtcNow;
        string? name;
        try
        {
            var response = await Arm.SendAsync(HttpMethod.Post, JobUrl("/start"), StartBody(job, attempt), cancellationToken, retryAmbiguous: false, HttpStatusCode.OK, HttpStatusCode.Accepted);
            name = response?["name"]?.GetValue<string>() ?? await FindExecutionAsync(job.JobId, attempt, cancellationToken)
                ?? throw new HttpRequestException("Container Apps accepted the start but named no execution, and none is listed yet for this attempt; the next poll looks again.");
        }
        catch (ArmRefusedException)
        {
            // Nothing was started: the claim is given up, and a later submission claims again.
            await claim.DeleteIfExistsAsync(cancellationToken: CancellationToken.None);
            throw;
        }
        catch (Exception e)
        {
            await BlobJson.WriteAsync(claim, new ExecutionClaim(job.JobId, attempt, claimedAt, null, e.Message), ExecutionClaimJson.Default.ExecutionClaim, CancellationToken.None);
            if (cancellationToken.IsCancellationRequested)
            {
                throw;
            }

            throw new HttpRequestException($"The start of the Container Apps execution for job {job.JobId} attempt {attempt} did not answer clearly ({e.Message}); ARM may have started it. "
                + $"No second execution is started: later submissions look it up by the job id and attempt, and start it again only if none is listed {ClaimStaleAfter.TotalMinutes:N0} min after this start "
                + "(Pipeline__FineTune__ContainerApps__ClaimStaleAfter).", e);
        }

        await BlobJson.WriteAsync(claim, new ExecutionClaim(job.JobId, attempt, claimedAt, name), ExecutionClaimJson.Default.ExecutionClaim, cancellationToken);
        return name;
    }

    private JsonObject StartBody(JobSpec job, int attempt)
    {
        var env = new JsonArray();
        foreach (var (key, value) in TrainerEnvironment(job, options.Value))
        {
            env.Add(new JsonObject { ["name"] = key, ["value"] = value });
        }

        env.Add(new JsonObject { ["name"] = AttemptVariable, ["value"] = attempt.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        var command = new JsonArray();
        foreach (var part in Settings.Command)
        {
            command.Add(part);
        }

        // The override repeats the template's container (name, image, resources): the API does not say whether it merges.
        return new JsonObject
        {
            ["containers"] = new JsonArray
            {
                new JsonObject
                {
                    ["name"] = Settings.ContainerName,
                    ["image"] = Settings.Image is { Length: > 0 } image ? image : options.Value.TrainerImage,
                    ["command"] = command,
                    ["args"] = new JsonArray("--job", job.JobId),
                    ["env"] = env,
                    ["resources"] = new JsonObject { ["cpu"] = Settings.Cpu, ["memory"] = Settings.Memory },
                },
            },
        };
    }

    /// <summary>The execution started for this job and attempt (its container's environment says so), or null: the executions list, page by page.</summary>
    public async Task<string?> FindExecutionAsync(string jobId, int attempt, CancellationToken cancellationToken)
    {
        var attemptText = attempt.ToString(System.Globalization.CultureInfo.InvariantCulture);
        string? url = JobUrl("/executions");
        for (var page = 0; url is not null && page < MaxExecutionPages; page++)
        {
            var list = await SendAsync(HttpMethod.Get, url, null, cancellationToken, HttpStatusCode.OK);
            foreach (var execution in list?["value"]?.AsArray() ?? [])
            {
                var containers = execution?["properties"]?["template"]?["containers"]?.AsArray() ?? [];
                if (containers.Any(c => Variable(c, "PIPELINE_JOB_ID") == jobId && Variable(c, AttemptVariable) == attemptText)
                    && execution?["name"]?.GetValue<string>() is { } name)
                {
                    return name;
                }
            }

            url = list?["nextLink"]?.GetValue<string>();
        }

        return null;
    }

    /// <summary>Container Apps keeps a bounded execution history; more pages than this are not looked through.</summary>
    private const int MaxExecutionPages = 20;

    private static string? Variable(JsonNode? container, string name) =>
        (container?["env"]?.AsArray() ?? []).FirstOrDefault(e => e?["name"]?.GetValue<string>() == name)?["value"]?.GetValue<string>();

    public async Task<BackendState> GetStateAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken)
    {
        var response = await SendAsync(HttpMethod.Get, JobUrl($"/executions/{submission.Handle}"), null, cancellationToken, HttpStatusCode.OK);
        var status = response?["properties"]?["status"]?.GetValue<string>() ?? "Unknown";
        return status switch
        {
            "Succeeded" => new BackendState(JobStates.Succeeded, status),
            "Failed" => new BackendState(JobStates.Failed, $"Container Apps reports the execution {status}"),
            "Stopped" => new BackendState(JobStates.Cancelled, status),
            _ => new BackendState(JobStates.Running, status),
        };
    }

    public Task CancelAsync(JobSpec job, JobSubmission submission, CancellationToken cancellationToken) =>
        SendAsync(HttpMethod.Post, JobUrl($"/executions/{submission.Handle}/stop"), null, cancellationToken, HttpStatusCode.OK, HttpStatusCode.Accepted);
}

/// <summary>
/// One Container Apps start per job and attempt: when it was claimed, the execution once started, and, for a start
/// whose outcome is unknown (ARM may have started it), why. Schema 1 (<see cref="Unresolved"/> added, optional).
/// </summary>
public sealed record ExecutionClaim(string JobId, int Attempt, DateTimeOffset ClaimedAt, string? Execution, string? Unresolved = null, int SchemaVersion = 1);

internal static class ExecutionClaims
{
    public static Azure.Storage.Blobs.BlobClient Blob(StorageClients storage, string jobId, int attempt) =>
        storage.Container(StorageNames.Containers.Jobs).GetBlobClient($"{jobId}/executions/attempt-{attempt}.json");
}

[System.Text.Json.Serialization.JsonSourceGenerationOptions(PropertyNamingPolicy = System.Text.Json.Serialization.JsonKnownNamingPolicy.CamelCase)]
[System.Text.Json.Serialization.JsonSerializable(typeof(ExecutionClaim))]
internal sealed partial class ExecutionClaimJson : System.Text.Json.Serialization.JsonSerializerContext;
