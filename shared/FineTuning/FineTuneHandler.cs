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
        var job = await PlanAsync(request, runId, cancellationToken);
        var jobId = job.JobId;
        var files = new JobFiles(storage, jobId);
        var submission = await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken);
        if (job.RunId != runId && submission is null)
        {
            // A job planned for another run that was never submitted (its dispatch gave up): this run takes it.
            job = job with { RunId = runId };
            await BlobJson.WriteAsync(files.Spec, job, FineTuneJson.Default.JobSpec, cancellationToken);
        }
        else if (job.RunId != runId && submission is not null)
        {
            // The same job (same data, base model and settings) was asked for by another run.
            switch (submission.Outcome)
            {
                case JobStates.Succeeded:
                    // Its model exists: this run reuses it, nothing is trained twice.
                    var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken))!;
                    await SucceededAsync(job with { RunId = runId }, status, TimeSpan.Zero, cancellationToken);
                    return;
                case null:
                    // It is training for another run: this run waits on it and the monitor finishes it with that run.
                    await files.Waiting(runId).UploadAsync(BinaryData.Empty, overwrite: true, cancellationToken);
                    if ((await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken))?.Outcome is not null)
                    {
                        // It ended while this run signed up: the redelivery takes the outcome.
                        throw new RunBusyException($"Job {jobId} ended while run {runId} asked for it.");
                    }

                    await RecordJobAsync(runId, job, files, RunStatus.Running, $"Job {jobId} is training for run {job.RunId}; this run takes its model when it ends.", cancellationToken);
                    return;
                default:
                    // It ended without a model (failed, cancelled, timed out, lost): this run trains it again, as the
                    // next attempt (a new cloud job name), from a fresh chain of polls.
                    job = job with { RunId = runId, CreatedAt = DateTimeOffset.UtcNow };
                    await BlobJson.WriteAsync(files.Spec, job, FineTuneJson.Default.JobSpec, cancellationToken);
                    await files.Cancel.DeleteIfExistsAsync(cancellationToken: cancellationToken);
                    await files.Status.DeleteIfExistsAsync(cancellationToken: cancellationToken);
                    var attempt = submission.Attempt + 1;
                    var now = DateTimeOffset.UtcNow;
                    await UpdateSubmissionAsync(files, s => s with { Attempt = attempt, Handle = null, Outcome = null, FirstSubmittedAt = now, SubmittedAt = now }, cancellationToken);
                    var handle = await Backend(job.Backend).SubmitAsync(job, attempt, cancellationToken);
                    await UpdateSubmissionAsync(files, s => s with { Handle = handle }, cancellationToken);
                    submission = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken))!;
                    break;
            }
        }

        if (submission is null)
        {
            // Submissions are idempotent per job (a second trainer waits for the first one's lease, a cloud job has the job's name).
            var handle = await Backend(job.Backend).SubmitAsync(job, 1, cancellationToken);
            var now = DateTimeOffset.UtcNow;
            submission = new JobSubmission { JobId = jobId, Backend = job.Backend, Attempt = 1, Handle = handle, FirstSubmittedAt = now, SubmittedAt = now };
            if (!await BlobJson.WriteOnceAsync(files.Submission, submission, FineTuneJson.Default.JobSubmission, cancellationToken))
            {
                submission = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken))!;
            }
        }

        await RecordJobAsync(runId, job, files, submission.Handle is null ? RunStatus.Queued : RunStatus.Running, null, cancellationToken);
        // The next tick after the last processed one: a redelivered dispatch joins (never duplicates) the chain of polls.
        await ScheduleAsync(jobId, runId, submission.Tick + 1, cancellationToken);
        logger.LogInformation("Fine-tune job {JobId} submitted to {Backend} (base {BaseModel}, {Epochs} epochs, {Trainable})", jobId, job.Backend, job.BaseModel, job.Hyperparameters.Epochs, job.Hyperparameters.Trainable);
    }

    /// <summary>The run is on the fine-tune stage with this job: its status, the job and model paths, and a note while it waits.</summary>
    private async Task RecordJobAsync(string runId, JobSpec job, JobFiles files, string stageStatus, string? note, CancellationToken cancellationToken)
    {
        var run = await runs.UpdateAsync(runId, r =>
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
        await events.PublishAsync(RunEvents.Types.StageStarted, run, cancellationToken);
    }

    private Task ScheduleAsync(string jobId, string runId, int tick, CancellationToken cancellationToken)
    {
        // Back off by doubling from the first delay to the maximum as the job runs on.
        var delay = TimeSpan.FromTicks(Math.Min(Options.MonitorMaxDelay.Ticks, Options.MonitorInitialDelay.Ticks * (1L << Math.Min(20, Math.Max(0, tick - 1)))));
        return sender.SendAsync(StorageNames.Queues.FineTuneMonitor, MessageTypes.FineTuneMonitor, runId, new FineTuneMonitorRequest(jobId, tick),
            FineTuneJson.Default.FineTuneMonitorRequest, delay, cancellationToken);
    }
}
