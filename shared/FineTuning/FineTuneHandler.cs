using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.FineTuning.Trainer;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.FineTuning;

/// <summary>
/// The fine-tune stage. A <c>finetune</c> message (from preprocessing, or a command) writes
/// <c>jobs/&lt;jobId&gt;/spec.json</c>, submits it to the configured backend and returns; delayed
/// <c>finetune-monitor</c> messages then poll the backend and the trainer's heartbeat until the job ends:
/// succeeded (the model folder is checked and registered, and inference queued when the run asks),
/// failed, cancelled, timed out, or lost (no heartbeat: resubmitted up to a limit). No function waits on training.
/// </summary>
public sealed partial class FineTuneHandler(
    StorageClients storage,
    RunStore runs,
    RunEvents events,
    RunTransitions transitions,
    QueueSender sender,
    ModelRegistry registry,
    ModelSessions sessions,
    IEnumerable<IFineTuneBackend> backends,
    IOptions<FineTuneOptions> options,
    ILogger<FineTuneHandler> logger)
{
    private FineTuneOptions Options => options.Value;

    private IFineTuneBackend Backend(string name) => backends.FirstOrDefault(b => b.Name == name)
        ?? throw new FineTuneRejectedException(FineTuneErrorCodes.BackendRejected, $"The '{name}' backend is not configured in this app.");

    /// <summary>The job id: the prepared data, the base model (and its version), and every training setting.</summary>
    public static string JobIdFor(string preparedId, string baseModel, DateTimeOffset baseCreatedAt, Hyperparameters hyper, string backend, string? outputModelId, double maxDurationMinutes, bool quantize = false) =>
        "job-" + RunIds.Hash($"{preparedId}|{baseModel}@{baseCreatedAt:O}|{JsonSerializer.Serialize(hyper, FineTuneJson.Default.Hyperparameters)}|{backend}|{outputModelId}|{maxDurationMinutes}{(quantize ? "|int8" : "")}", 24);

    /// <summary>Handles a <c>finetune</c> message or command.</summary>
    public async Task HandleAsync(FineTuneRequest request, string runId, int dequeueCount, CancellationToken cancellationToken)
    {
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["PreparedId"] = request.PreparedId });
        var initial = new RunRecord { RunId = runId, Source = $"prepared:{request.PreparedId}", DatasetId = request.DatasetId, Stage = Stages.FineTune, SpecJson = request.Spec is null ? null : JsonSerializer.Serialize(request.Spec, PipelineJson.Default.RunSpec) };
        var stage = new StageRun(initial, Stages.FineTune, dequeueCount, logger)
        {
            OnStart = r =>
            {
                r.DatasetId ??= request.DatasetId;
                r.SpecJson ??= initial.SpecJson;
            },
        };
        await transitions.RunStageAsync(stage, (_, token) => DispatchAsync(request, runId, token), cancellationToken);
    }

    private async Task DispatchAsync(FineTuneRequest request, string runId, CancellationToken cancellationToken)
    {
        var planned = await PlanAsync(request, runId, cancellationToken);
        var jobId = planned.JobId;
        var files = new JobFiles(storage, jobId);
        while (true)
        {
            var (submission, etag) = await ReadSubmissionAsync(files, cancellationToken);
            if (submission?.Outcome == JobStates.Succeeded)
            {
                // Its model exists: this run reuses it, nothing is trained twice.
                var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken))!;
                await SucceededAsync(planned with { RunId = runId }, status, TimeSpan.Zero, cancellationToken);
                return;
            }

            if (submission is { Outcome: null } && TrainsFor(submission, planned) != runId)
            {
                // The same job (same data, base model and settings) is training for another run: this run waits on it.
                await WaitOnAsync(runId, planned, files, TrainsFor(submission, planned), cancellationToken);
                return;
            }

            // Nothing submitted yet, or the job ended without a model (failed, cancelled, timed out, lost, poisoned) and
            // this run trains it again as the next attempt (a new cloud job name, a fresh chain of polls). The attempt
            // is claimed on submission.json under its ETag before anything is submitted: of runs asking at once, one
            // claims it and submits, the others find it claimed and wait on it. A redelivery finds its own claim.
            var now = DateTimeOffset.UtcNow;
            var claim = submission switch
            {
                null => new JobSubmission { JobId = jobId, Backend = planned.Backend, Attempt = 1, RunId = runId, FirstSubmittedAt = now, SubmittedAt = now },
                { Outcome: not null } ended => ended with { Attempt = ended.Attempt + 1, RunId = runId, Handle = null, Outcome = null, FirstSubmittedAt = now, SubmittedAt = now },
                _ => null,
            };
            if (claim is not null && !await TrySaveAsync(files, claim, submission is null ? null : etag, cancellationToken))
            {
                continue;
            }

            var job = planned;
            if (job.RunId != runId || submission?.Outcome is not null)
            {
                // The spec names this run (the trainer and the monitor read it), and what the last attempt left goes.
                job = planned with { RunId = runId, CreatedAt = now };
                await BlobJson.WriteAsync(files.Spec, job, FineTuneJson.Default.JobSpec, cancellationToken);
                await files.Cancel.DeleteIfExistsAsync(cancellationToken: cancellationToken);
                await files.Status.DeleteIfExistsAsync(cancellationToken: cancellationToken);
            }

            submission = claim ?? submission!;
            if (claim is not null)
            {
                // Submissions are idempotent per job and attempt (a second trainer waits for the first one's lease, a cloud
                // job has the job's name, an execution is keyed by job and attempt). A redelivery leaves a claim without a
                // handle to the monitor, which submits when the handle is missing.
                if (await Backend(job.Backend).SubmitAsync(job, claim.Attempt, cancellationToken) is { } handle)
                {
                    await UpdateSubmissionAsync(files, s => s with { Handle = handle }, cancellationToken);
                    submission = submission with { Handle = handle };
                }
            }

            await RecordJobAsync(runId, job, files, submission.Handle is null ? RunStatus.Queued : RunStatus.Running, null, cancellationToken);
            // The next tick after the last processed one: a redelivered dispatch joins (never duplicates) the chain of polls.
            await ScheduleAsync(jobId, runId, submission.Tick + 1, cancellationToken);
            logger.LogInformation("Fine-tune job {JobId} attempt {Attempt} submitted to {Backend} for run {RunId} (base {BaseModel}, {Epochs} epochs, {Trainable})",
                jobId, submission.Attempt, job.Backend, runId, job.BaseModel, job.Hyperparameters.Epochs, job.Hyperparameters.Trainable);
            return;
        }
    }

    /// <summary>The run the job's current attempt trains for (submissions written before they named it: the spec's).</summary>
    private static string TrainsFor(JobSubmission submission, JobSpec job) => submission.RunId ?? job.RunId;

    /// <summary>This run signs up for a job training for <paramref name="owner"/>; the monitor ends it with the job.</summary>
    private async Task WaitOnAsync(string runId, JobSpec job, JobFiles files, string owner, CancellationToken cancellationToken)
    {
        var waiting = files.Waiting(runId);
        await waiting.UploadAsync(BinaryData.Empty, overwrite: true, cancellationToken);
        if ((await ReadSubmissionAsync(files, cancellationToken)).Submission?.Outcome is not null)
        {
            // It ended while this run signed up: the redelivery takes the outcome.
            await waiting.DeleteIfExistsAsync(cancellationToken: cancellationToken);
            throw new RunBusyException($"Job {job.JobId} ended while run {runId} asked for it.");
        }

        await RecordJobAsync(runId, job, files, RunStatus.Running, $"Job {job.JobId} is training for run {owner}; this run takes its model when it ends.", cancellationToken);
    }

    /// <summary>The run is on the fine-tune stage with this job: its status, the job and model paths, and a note while it waits.</summary>
    private async Task RecordJobAsync(string runId, JobSpec job, JobFiles files, string stageStatus, string? note, CancellationToken cancellationToken)
    {
        // Saved with its event in one transaction: a crash between the two cannot lose the event.
        await events.TransitionAsync(runId, RunEvents.Types.StageStarted, r =>
        {
            r.Stage = Stages.FineTune;
            r.SetStage(Stages.FineTune, stageStatus);
            r.SetArtifact("job", $"{StorageNames.Containers.Jobs}/{job.JobId}/");
            r.SetArtifact("jobSpec", files.SpecPath);
            r.SetArtifact("model", job.OutputModelFolder);
            if (job.QuantizedModelId is { } quantized)
            {
                r.SetArtifact("quantizedModel", $"{StorageNames.Containers.Models}/{quantized}/");
            }
            r.LastError = note;
            return true;
        }, cancellationToken);
    }

    private Task ScheduleAsync(string jobId, string runId, int tick, CancellationToken cancellationToken)
    {
        // Back off by doubling from the first delay to the maximum as the job runs on.
        var delay = TimeSpan.FromTicks(Math.Min(Options.MonitorMaxDelay.Ticks, Options.MonitorInitialDelay.Ticks * (1L << Math.Min(20, Math.Max(0, tick - 1)))));
        return sender.SendAsync(StorageNames.Queues.FineTuneMonitor, MessageTypes.FineTuneMonitor, runId, new FineTuneMonitorRequest(jobId, tick),
            FineTuneJson.Default.FineTuneMonitorRequest, delay, cancellationToken);
    }
}
