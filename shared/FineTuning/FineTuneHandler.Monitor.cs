using System.Text.Json;
using Azure;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Pipeline.FineTuning.Trainer;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.FineTuning;

/// <summary>The job monitor: one poll per <c>finetune-monitor</c> tick, lost trainers resubmitted, waiting runs finished with the job.</summary>
public sealed partial class FineTuneHandler
{
    /// <summary>Handles a <c>finetune-monitor</c> message: one poll of a job, and the next one scheduled unless the job ended.</summary>
    public async Task MonitorAsync(FineTuneMonitorRequest request, int dequeueCount, CancellationToken cancellationToken)
    {
        var files = new JobFiles(storage, request.JobId);
        var job = await BlobJson.ReadAsync(files.Spec, FineTuneJson.Default.JobSpec, cancellationToken)
            ?? throw new InvalidMessageException($"The finetune-monitor message names job {request.JobId}, which has no spec.json.");
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["RunId"] = job.RunId, ["JobId"] = job.JobId });

        // Take this tick: a duplicate or stale message (an older chain) finds it taken and stops. The redelivery
        // of a tick whose poll failed after taking it (dequeueCount > 1) polls again, so the chain never dies.
        var response = await files.Submission.DownloadContentAsync(cancellationToken);
        var submission = JsonSerializer.Deserialize(response.Value.Content.ToMemory().Span, FineTuneJson.Default.JobSubmission)!;
        var retryOfTakenTick = request.Tick == submission.Tick && dequeueCount > 1;
        if (submission.Outcome is not null || (request.Tick <= submission.Tick && !retryOfTakenTick))
        {
            return;
        }

        if (!retryOfTakenTick)
        {
            submission = submission with { Tick = request.Tick };
            try
            {
                await SaveAsync(files, submission, response.Value.Details.ETag, cancellationToken);
            }
            catch (RequestFailedException e) when (e.Status == 412)
            {
                return;
            }
        }

        var outcome = await PollAsync(job, files, submission, cancellationToken);
        if (outcome is null)
        {
            await ScheduleAsync(job.JobId, job.RunId, request.Tick + 1, cancellationToken);
        }
        else
        {
            await UpdateSubmissionAsync(files, s => s with { Outcome = outcome }, cancellationToken);
            await FinishWaitingRunsAsync(job, files, outcome, cancellationToken);
        }
    }

    /// <summary>
    /// A <c>finetune-monitor</c> message was poisoned (its deliveries ran out), so its chain of polls died with it. Runs
    /// sharing a job do not poll it themselves (they wait on its one chain), so nothing watches the job any more: its
    /// trainer is stopped (cancel.json and the backend's cancel: the local process, the Container Apps execution, the
    /// Azure ML job), the job ends with <paramref name="code"/> (a later request trains it again), and its run and every
    /// run waiting on it fail with <paramref name="reason"/>. A poisoned tick older than the last one processed belongs to
    /// a chain that has moved on (a redelivered dispatch joined it, or a later attempt has its own): the job is still
    /// watched and keeps running. Returns false in that case only.
    /// </summary>
    public async Task<bool> StopUnwatchedAsync(FineTuneMonitorRequest request, string code, string reason, CancellationToken cancellationToken)
    {
        var files = new JobFiles(storage, request.JobId);
        if (await BlobJson.ReadAsync(files.Spec, FineTuneJson.Default.JobSpec, cancellationToken) is not { } job)
        {
            return true;
        }

        using var scope = logger.BeginScope(new Dictionary<string, object> { ["RunId"] = job.RunId, ["JobId"] = job.JobId });
        JobSubmission submission;
        while (true)
        {
            var (current, etag) = await ReadSubmissionAsync(files, cancellationToken);
            if (current is null)
            {
                return true;
            }

            if (current.Outcome is not null)
            {
                if (current.Outcome != code)
                {
                    // The job ended on its own (its runs have their outcome and may have moved on): nothing to stop or fail.
                    logger.LogInformation("Poisoned monitor tick {Tick} of job {JobId} came after the job ended ({Outcome}); nothing is stopped", request.Tick, job.JobId, current.Outcome);
                    return false;
                }

                // This poison's stop was saved before (a retry of the poison handler): finish failing the job's runs.
                submission = current;
                break;
            }

            if (current.Tick > request.Tick)
            {
                logger.LogInformation("Poisoned monitor tick {Tick} of job {JobId} is stale: tick {Current} watches the job, which goes on", request.Tick, job.JobId, current.Tick);
                return false;
            }

            // Stopped before the outcome is saved: a stop that fails leaves the job open, and the poison handler's retry stops it.
            await StopAsync(job, files, current, Backend(job.Backend), cancellationToken);
            if (await TrySaveAsync(files, current with { Outcome = code }, etag, cancellationToken))
            {
                submission = current;
                break;
            }
        }

        var status = await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken);
        await FailAsync(job, code, reason, DateTimeOffset.UtcNow - submission.FirstSubmittedAt, status, cancellationToken);
        await FinishWaitingRunsAsync(job, files, code, cancellationToken);
        logger.LogWarning("Job {JobId} lost its monitor (tick {Tick} poisoned): its trainer was stopped and its runs failed", job.JobId, request.Tick);
        return true;
    }

    /// <summary>Runs that asked for this job while it trained end with it: they get its model, or its failure.</summary>
    private async Task FinishWaitingRunsAsync(JobSpec job, JobFiles files, string outcome, CancellationToken cancellationToken)
    {
        var jobs = storage.Container(StorageNames.Containers.Jobs);
        await foreach (var blob in jobs.GetBlobsAsync(BlobTraits.None, BlobStates.None, files.WaitingPrefix, cancellationToken))
        {
            var runId = blob.Name[files.WaitingPrefix.Length..];
            if (outcome == JobStates.Succeeded)
            {
                var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken))!;
                await SucceededAsync(job with { RunId = runId }, status, TimeSpan.Zero, cancellationToken);
            }
            else
            {
                var reason = (await runs.GetAsync(job.RunId, cancellationToken))?.Error ?? outcome;
                var code = outcome switch { JobStates.Failed => FineTuneErrorCodes.TrainerFailed, JobStates.Cancelled => "Cancelled", _ => outcome };
                await transitions.FailAsync(runId, Stages.FineTune, code,
                    $"The fine-tune job {job.JobId}, shared with run {job.RunId}, ended {outcome}: {reason} Send the command again to train it anew.", TimeSpan.Zero, cancellationToken: cancellationToken);
            }

            await jobs.GetBlobClient(blob.Name).DeleteIfExistsAsync(cancellationToken: cancellationToken);
        }
    }

    private static Task SaveAsync(JobFiles files, JobSubmission submission, ETag etag, CancellationToken cancellationToken) =>
        files.Submission.UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(submission, FineTuneJson.Default.JobSubmission)),
            new BlobUploadOptions { Conditions = new BlobRequestConditions { IfMatch = etag } }, cancellationToken);

    /// <summary>Saves the submission if it is still the version read (<paramref name="etag"/>), or creates it when there was none (null); false when another writer came first.</summary>
    private static async Task<bool> TrySaveAsync(JobFiles files, JobSubmission submission, ETag? etag, CancellationToken cancellationToken)
    {
        if (etag is not { } ifMatch)
        {
            return await BlobJson.WriteOnceAsync(files.Submission, submission, FineTuneJson.Default.JobSubmission, cancellationToken);
        }

        try
        {
            await SaveAsync(files, submission, ifMatch, cancellationToken);
            return true;
        }
        catch (RequestFailedException e) when (e.Status == 412)
        {
            return false;
        }
    }

    /// <summary>The job's submission and its ETag, or null when nothing was claimed yet.</summary>
    private static async Task<(JobSubmission? Submission, ETag ETag)> ReadSubmissionAsync(JobFiles files, CancellationToken cancellationToken)
    {
        try
        {
            var response = await files.Submission.DownloadContentAsync(cancellationToken);
            return (JsonSerializer.Deserialize(response.Value.Content.ToMemory().Span, FineTuneJson.Default.JobSubmission), response.Value.Details.ETag);
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return (null, default);
        }
    }

    /// <summary>The trainer's heartbeat on the run (epoch, step, progress, metrics); a progress event when the epoch moved since the last look.</summary>
    private async Task RecordProgressAsync(JobSpec job, RunRecord run, JobStatus status, CancellationToken cancellationToken)
    {
        var previous = run.GetCounts().GetValueOrDefault("fineTuneEpoch");
        // The progress event is saved with the change it announces (one transaction): a crash cannot lose it.
        string[] types = status.Epoch != previous ? [RunEvents.Types.FineTuneProgress] : [];
        await events.TransitionAsync(job.RunId, types, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            r.SetStage(Stages.FineTune, RunStatus.Running);
            r.SetCounts(new Dictionary<string, long>
            {
                ["fineTuneEpoch"] = status.Epoch,
                ["fineTuneEpochs"] = status.Epochs,
                ["fineTuneStep"] = status.Step,
                ["fineTuneProgressPercent"] = (long)Math.Round(100 * status.Progress),
                ["fineTuneAttempt"] = status.Attempt,
            });
            r.SetMetrics(status.Metrics);
            return true;
        }, cancellationToken);
    }

    /// <summary>One look at the job; the outcome when it has ended (the run updated), or null while it goes on.</summary>
    private async Task<string?> PollAsync(JobSpec job, JobFiles files, JobSubmission submission, CancellationToken cancellationToken)
    {
        var run = await runs.GetAsync(job.RunId, cancellationToken);
        var backend = Backend(job.Backend);
        var status = await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken);
        var now = DateTimeOffset.UtcNow;
        var elapsed = now - submission.FirstSubmittedAt;

        if (run is null || run.Status == RunStatus.Cancelled)
        {
            await StopAsync(job, files, submission, backend, cancellationToken);
            return JobStates.Cancelled;
        }

        if (status is not null && status.Attempt == submission.Attempt)
        {
            switch (status.State)
            {
                case JobStates.Succeeded:
                    // A trainer faster than the polls ends before any poll saw it running: its epochs are still progress
                    // (once: a look after the stage has succeeded leaves the run as it is).
                    if (run.GetStages().GetValueOrDefault(Stages.FineTune) != RunStatus.Succeeded)
                    {
                        await RecordProgressAsync(job, run, status, cancellationToken);
                    }

                    return await SucceededAsync(job, status, elapsed, cancellationToken);
                case JobStates.Failed:
                    await FailAsync(job, FineTuneErrorCodes.TrainerFailed, $"The trainer failed: {status.Error}", elapsed, status, cancellationToken);
                    return JobStates.Failed;
                // A trainer stopped by a signal (its node shut down, its execution was stopped) did not cancel the run:
                // the backend's state and the heartbeat rules below decide, and a lost trainer is resubmitted.
                case JobStates.Cancelled when status.Error != JobTrainer.StoppedError:
                    await transitions.CancelAsync(job.RunId, "the trainer reported the job cancelled", cancellationToken);
                    return JobStates.Cancelled;
            }
        }

        if (submission.Handle is not null && elapsed > TimeSpan.FromMinutes(job.MaxDurationMinutes))
        {
            await StopAsync(job, files, submission, backend, cancellationToken);
            await FailAsync(job, FineTuneErrorCodes.TimedOut, $"The job ran longer than maxDurationMinutes ({job.MaxDurationMinutes:0.##} min) and was stopped at epoch {status?.Epoch ?? 0}. Raise fineTune.maxDurationMinutes or train fewer epochs.", elapsed, status, cancellationToken);
            return FineTuneErrorCodes.TimedOut;
        }

        if (submission.Handle is null)
        {
            // Waiting for capacity (local backend): try again.
            var handle = await backend.SubmitAsync(job, submission.Attempt, cancellationToken);
            if (handle is not null)
            {
                // The maximum duration counts from when the job got a trainer, not from the wait for one.
                await UpdateSubmissionAsync(files, s => s with { Handle = handle, SubmittedAt = now, FirstSubmittedAt = s.Attempt == 1 ? now : s.FirstSubmittedAt }, cancellationToken);
                await UpdateRunAsync(job, r => r.SetStage(Stages.FineTune, RunStatus.Running), cancellationToken);
            }

            return null;
        }

        var state = await backend.GetStateAsync(job, submission, cancellationToken);
        if (state.State == JobStates.Failed || (state.State == JobStates.Cancelled && status?.State != JobStates.Succeeded))
        {
            await FailAsync(job, FineTuneErrorCodes.TrainerFailed, $"The {job.Backend} backend reports the job {state.State}: {state.Message}", elapsed, status, cancellationToken);
            return JobStates.Failed;
        }

        // Before its first heartbeat a trainer may still be starting (a GPU node, an image pull): it gets StartTimeout,
        // unless the backend already says its process is gone.
        var beating = status is not null && status.Attempt == submission.Attempt;
        var silent = now - (beating ? status!.Time : submission.SubmittedAt);
        var limit = beating || state.State == LocalProcessBackend.Exited ? Options.HeartbeatTimeout : Options.StartTimeout;
        if (silent > limit && state.State != JobStates.Queued)
        {
            if (submission.Attempt >= Options.MaxAttempts)
            {
                await StopAsync(job, files, submission, backend, cancellationToken);
                await FailAsync(job, FineTuneErrorCodes.Lost, $"No heartbeat from the trainer for {silent.TotalSeconds:N0} s, after {submission.Attempt} submission(s); the job is given up. The backend said: {state.State} {state.Message}.", elapsed, status, cancellationToken);
                return FineTuneErrorCodes.Lost;
            }

            // Lost: submit again (a new attempt; the trainer restarts from the spec, deterministically).
            // The silent trainer is declared dead: its lease is broken so the new attempt starts at once.
            await backend.CancelAsync(job, submission, cancellationToken);
            await RunLease.BreakAsync(storage, job.JobId, JobTrainer.LeaseStage, cancellationToken);
            var attempt = submission.Attempt + 1;
            // The new attempt is recorded before its trainer starts, so the trainer reads its own attempt number.
            await UpdateSubmissionAsync(files, s => s with { Attempt = attempt, Handle = null, SubmittedAt = now }, cancellationToken);
            var handle = await backend.SubmitAsync(job, attempt, cancellationToken);
            await UpdateSubmissionAsync(files, s => s with { Handle = handle }, cancellationToken);
            await events.TransitionAsync(job.RunId, RunEvents.Types.StageRetrying, r =>
            {
                r.Attempt = attempt;
                r.LastError = $"No heartbeat from the trainer for {silent.TotalSeconds:N0} s (attempt {submission.Attempt}); resubmitted as attempt {attempt}.";
                return true;
            }, cancellationToken);
            logger.LogWarning("Job {JobId} lost its trainer (no heartbeat for {Seconds} s); resubmitted as attempt {Attempt}", job.JobId, silent.TotalSeconds, attempt);
            return null;
        }

        if (status is not null && status.Attempt == submission.Attempt)
        {
            await RecordProgressAsync(job, run, status, cancellationToken);
        }

        return null;
    }

    private async Task StopAsync(JobSpec job, JobFiles files, JobSubmission submission, IFineTuneBackend backend, CancellationToken cancellationToken)
    {
        await files.Cancel.UploadAsync(new BinaryData("{\"reason\":\"stopped by the platform\"}"u8.ToArray()), overwrite: true, cancellationToken);
        try
        {
            await backend.CancelAsync(job, submission, cancellationToken);
        }
        catch (Exception e) when (e is HttpRequestException or InvalidOperationException)
        {
            logger.LogWarning(e, "Cancelling job {JobId} on {Backend} failed; the trainer stops at its next heartbeat (cancel.json)", job.JobId, job.Backend);
        }
    }

    private async Task UpdateSubmissionAsync(JobFiles files, Func<JobSubmission, JobSubmission> change, CancellationToken cancellationToken)
    {
        var response = await files.Submission.DownloadContentAsync(cancellationToken);
        var current = JsonSerializer.Deserialize(response.Value.Content.ToMemory().Span, FineTuneJson.Default.JobSubmission)!;
        await SaveAsync(files, change(current), response.Value.Details.ETag, cancellationToken);
    }

}
