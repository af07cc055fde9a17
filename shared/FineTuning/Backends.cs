using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Azure.Core;
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
/// Shared by the cloud backends: ARM requests with a bearer token from Azure.Identity (managed identity in
/// Azure) for <c>https://management.azure.com/.default</c>, and errors that carry ARM's message.
/// </summary>
public abstract class ArmBackend(HttpClient http, TokenCredential credential)
{
    public const string ArmScope = "https://management.azure.com/.default";

    protected async Task<JsonNode?> SendAsync(HttpMethod method, string url, JsonNode? body, CancellationToken cancellationToken, params HttpStatusCode[] accepted)
    {
        var token = await credential.GetTokenAsync(new TokenRequestContext([ArmScope]), cancellationToken);
        using var request = new HttpRequestMessage(method, url);
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token.Token);
        if (body is not null)
        {
            request.Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json");
        }

        using var response = await http.SendAsync(request, cancellationToken);
        var text = await response.Content.ReadAsStringAsync(cancellationToken);
        if (!accepted.Contains(response.StatusCode))
        {
            var message = text.Length > 0 && JsonNode.Parse(text)?["error"]?["message"]?.GetValue<string>() is { } armMessage ? armMessage : text;
            throw new HttpRequestException($"{method} {url} answered {(int)response.StatusCode}: {message}", null, response.StatusCode);
        }

        return text.Length > 0 ? JsonNode.Parse(text) : null;
    }

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
public sealed class AzureMlBackend(HttpClient http, TokenCredential credential, IOptions<FineTuneOptions> options) : ArmBackend(http, credential), IFineTuneBackend
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
        // PUT is idempotent per job name: a redelivered submission finds the same job.
        await SendAsync(HttpMethod.Put, JobUrl(name), body, cancellationToken, HttpStatusCode.OK, HttpStatusCode.Created);
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
/// Azure Container Apps jobs on a GPU workload profile: an execution per attempt (start with the job id in the
/// container's environment), its status from GET .../executions/{name}, stop by POST .../stop. Untested against Azure.
/// </summary>
public sealed class ContainerAppsBackend(HttpClient http, TokenCredential credential, IOptions<FineTuneOptions> options) : ArmBackend(http, credential), IFineTuneBackend
{
    public string Name => FineTuneBackends.ContainerApps;

    private ContainerAppsOptions Settings => options.Value.ContainerApps;

    private string JobPath => Settings.JobResourceId is { Length: > 0 } id
        ? "/" + id.Trim('/')
        : $"/subscriptions/{Settings.SubscriptionId}/resourceGroups/{Settings.ResourceGroup}/providers/Microsoft.App/jobs/{Settings.JobName}";

    private string JobUrl(string suffix) => $"{Settings.Endpoint.TrimEnd('/')}{JobPath}{suffix}?api-version={Settings.ApiVersion}";

    public async Task<string?> SubmitAsync(JobSpec job, int attempt, CancellationToken cancellationToken)
    {
        var env = new JsonArray();
        foreach (var (key, value) in TrainerEnvironment(job, options.Value))
        {
            env.Add(new JsonObject { ["name"] = key, ["value"] = value });
        }

        var command = new JsonArray();
        foreach (var part in Settings.Command)
        {
            command.Add(part);
        }

        // The override repeats the template's container (name, image, resources): the API does not say whether it merges.
        var body = new JsonObject
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
        var response = await SendAsync(HttpMethod.Post, JobUrl("/start"), body, cancellationToken, HttpStatusCode.OK, HttpStatusCode.Accepted);
        return response?["name"]?.GetValue<string>()
            ?? throw new HttpRequestException("Container Apps accepted the start but returned no execution name (202 without a body); the next poll resubmits.");
    }

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
