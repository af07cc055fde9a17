using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Pipeline.Messaging;
using Pipeline.Storage;

namespace Pipeline.Runs;

/// <summary>The run transitions every stage makes, each saved and published as a CloudEvent.</summary>
public sealed class RunTransitions(RunStore runs, RunEvents events, StorageClients storage)
{
    /// <summary>
    /// The skeleton every stage runs one delivery in: claims the run's stage (nothing to do when it is done or
    /// the run ended), runs the work under the stage's lease (its token is cancelled when the lease is lost),
    /// and ends it: bad input (<see cref="StageRejectedException"/>) fails the run, a cancelled run stops, a lost
    /// lease becomes <see cref="LeaseLostException"/>, anything else is kept on the run and thrown for the host to retry.
    /// </summary>
    public async Task RunStageAsync(StageRun stage, Func<Stopwatch, CancellationToken, Task> work, CancellationToken cancellationToken)
    {
        using var scope = stage.Logger.BeginScope(new Dictionary<string, object> { ["RunId"] = stage.RunId });
        await using var lease = await ClaimAsync(stage.Initial, stage.Stage, stage.Attempt, stage.OnStart, cancellationToken);
        if (lease is null)
        {
            stage.Logger.LogInformation("Run {RunId} has finished {Stage} already (or ended); nothing to do", stage.RunId, stage.Stage);
            return;
        }

        using var linked = lease.Link(cancellationToken);
        await AttemptAsync(stage, lease, work, linked.Token, cancellationToken);
    }

    /// <summary>
    /// The same ending for work that needs no claim of its own (one shard of a stage that holds the run):
    /// true when the work completed, false when it was rejected (the run failed) or the run was cancelled.
    /// </summary>
    public Task<bool> RunPartAsync(StageRun stage, Func<Stopwatch, CancellationToken, Task> work, CancellationToken cancellationToken) =>
        AttemptAsync(stage, null, work, cancellationToken, cancellationToken);

    /// <summary>
    /// The same, under a lease of the part's own (<paramref name="holder"/>.<paramref name="part"/>, for example a
    /// batch's shard): two deliveries of one part never work side by side. The second is busy
    /// (<see cref="RunBusyException"/>: its message is put back) and, once it holds the lease, finds what the first
    /// committed; a holder that loses the lease has its work's token cancelled (<see cref="LeaseLostException"/>).
    /// </summary>
    public async Task<bool> RunPartAsync(StageRun stage, string holder, string part, Func<Stopwatch, CancellationToken, Task> work, CancellationToken cancellationToken)
    {
        await using var lease = await RunLease.AcquireAsync(storage, holder, part, cancellationToken);
        using var linked = lease.Link(cancellationToken);
        return await AttemptAsync(stage, lease, work, linked.Token, cancellationToken);
    }

    /// <summary>
    /// One part of a fanned-out stage (an inference shard, a preprocessing partition), done once: nothing to do when
    /// its done marker exists (<see cref="PartOutcome.DoneBefore"/>) or its run has ended (<see cref="PartOutcome.Stopped"/>);
    /// otherwise <paramref name="work"/> runs under the part's own lease (as <see cref="RunPartAsync(StageRun, string, string, Func{Stopwatch, CancellationToken, Task}, CancellationToken)"/>),
    /// unless the marker appeared while the lease was being taken, and the outcome is <see cref="PartOutcome.Done"/>.
    /// </summary>
    public async Task<PartOutcome> RunPartOnceAsync(StageRun part, string holder, string name, Azure.Storage.Blobs.BlobClient done, Func<Stopwatch, CancellationToken, Task> work, CancellationToken cancellationToken)
    {
        if (await done.ExistsAsync(cancellationToken))
        {
            return PartOutcome.DoneBefore;
        }

        if ((await runs.GetAsync(part.RunId, cancellationToken))?.Status is RunStatus.Cancelled or RunStatus.Failed)
        {
            part.Logger.LogInformation("Run {RunId} has ended; {Part} is not done", part.RunId, part.Part);
            return PartOutcome.Stopped;
        }

        return await RunPartAsync(part, holder, name, async (clock, token) =>
        {
            if (!await done.ExistsAsync(token))
            {
                await work(clock, token);
            }
        }, cancellationToken) ? PartOutcome.Done : PartOutcome.Stopped;
    }

    private async Task<bool> AttemptAsync(StageRun stage, RunLease? lease, Func<Stopwatch, CancellationToken, Task> work, CancellationToken workToken, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        try
        {
            await work(clock, workToken);
            return true;
        }
        catch (OperationCanceledException) when (lease is not null && lease.Lost.IsCancellationRequested && !cancellationToken.IsCancellationRequested)
        {
            throw new LeaseLostException(lease.Holds, lease.LostReason);
        }
        catch (RunCancelledException)
        {
            stage.Logger.LogInformation("Run {RunId} was cancelled during {Stage}; stopping", stage.RunId, stage.Stage);
            if (stage.OnCancelled is { } cleanUp)
            {
                await cleanUp();
            }

            return false;
        }
        catch (StageRejectedException e)
        {
            await (stage.OnRejected is { } reject
                ? reject(e, clock.Elapsed)
                : FailAsync(stage.RunId, stage.Stage, e.Code, e.Message, clock.Elapsed, cancellationToken: cancellationToken));
            return false;
        }
        catch (Exception e) when (e is not RunBusyException && !cancellationToken.IsCancellationRequested)
        {
            // Transient: record why, then let the host retry (and poison the message after maxDequeueCount).
            stage.Logger.LogWarning(e, "{Stage} of run {RunId} ({Part}) failed on attempt {Attempt}; the host will retry", stage.Stage, stage.RunId, stage.Part ?? "the whole stage", stage.Attempt);
            await RetryingAsync(stage.RunId, stage.Attempt, stage.Part is null ? e : new InvalidOperationException($"{stage.Part}: {e.Message}", e));
            throw;
        }
    }

    /// <summary>
    /// A progress update on a running stage (counts, a heartbeat). Throws <see cref="RunCancelledException"/>
    /// when the run was cancelled, so the stage stops at its next update.
    /// </summary>
    public Task<RunRecord> ProgressAsync(string runId, Action<RunRecord> update, CancellationToken cancellationToken) =>
        runs.UpdateAsync(runId, r =>
        {
            if (r.Status == RunStatus.Cancelled)
            {
                throw new RunCancelledException(r.RunId);
            }

            update(r);
            return true;
        }, cancellationToken);

    /// <summary>
    /// A stage's success saved on the run and published as <paramref name="eventType"/>. A run that has ended
    /// (cancelled, or finished by another delivery) is left as it is and no event is sent; with
    /// <paramref name="reopenFinished"/> only a cancelled one is (a finished batch's run takes its merged retry).
    /// </summary>
    public Task<(RunRecord Run, bool Changed)> SucceedAsync(string runId, string eventType, Action<RunRecord> record, CancellationToken cancellationToken, bool reopenFinished = false) =>
        SucceedAsync(runId, [eventType], record, cancellationToken, reopenFinished);

    /// <summary>As the single-event form, for a success announced by several events saved with it (in this order).</summary>
    public async Task<(RunRecord Run, bool Changed)> SucceedAsync(string runId, IReadOnlyList<string> eventTypes, Action<RunRecord> record, CancellationToken cancellationToken, bool reopenFinished = false)
    {
        return await events.TransitionAsync(runId, eventTypes, r =>
        {
            if (reopenFinished ? r.Status == RunStatus.Cancelled : RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            record(r);
            return true;
        }, cancellationToken);
    }

    /// <summary>
    /// Takes a run's stage for this delivery. Null when the stage is done already (or the run ended):
    /// there is nothing to do. Otherwise the run is marked started and the stage's lease is returned
    /// (dispose it when the stage ends). Throws <see cref="RunBusyException"/> when another instance holds it.
    /// </summary>
    public async Task<RunLease?> ClaimAsync(RunRecord initial, string stage, int attempt, Action<RunRecord>? also, CancellationToken cancellationToken)
    {
        var run = await runs.GetOrCreateAsync(initial, cancellationToken);
        if (IsDone(run, stage))
        {
            return null;
        }

        var lease = await RunLease.AcquireAsync(storage, initial.RunId, stage, cancellationToken);
        try
        {
            // Another instance may have finished the stage between the first look and the lease.
            if (IsDone(await runs.GetAsync(initial.RunId, cancellationToken) ?? run, stage))
            {
                await lease.DisposeAsync();
                return null;
            }

            if (IsDone(await StartAsync(initial.RunId, stage, attempt, also, cancellationToken), stage))
            {
                // Cancelled (or finished) between the look and the start: nothing to do.
                await lease.DisposeAsync();
                return null;
            }

            return lease;
        }
        catch
        {
            await lease.DisposeAsync();
            throw;
        }
    }

    public static bool IsDone(RunRecord run, string stage) =>
        run.GetStages().GetValueOrDefault(stage) == RunStatus.Succeeded || RunStatus.IsFinal(run.Status);

    /// <summary>The stage starts (or restarts on a redelivery).</summary>
    public async Task<RunRecord> StartAsync(string runId, string stage, int attempt, Action<RunRecord>? also = null, CancellationToken cancellationToken = default)
    {
        var (run, _) = await events.TransitionAsync(runId, RunEvents.Types.StageStarted, r =>
        {
            if (IsDone(r, stage))
            {
                // A delivery racing the stage's end must not reopen it.
                return false;
            }

            r.Status = RunStatus.Running;
            r.Stage = stage;
            r.SetStage(stage, RunStatus.Running);
            r.Attempt = attempt;
            r.StartedAt ??= DateTimeOffset.UtcNow;
            also?.Invoke(r);
            return true;
        }, cancellationToken);
        return run;
    }

    /// <summary>After a stage's success: the run moves on to <paramref name="next"/> (queued), or ends succeeded when there is none.</summary>
    public static void QueueNextOrEnd(RunRecord run, string? next)
    {
        if (next is not null)
        {
            run.Stage = next;
            run.SetStage(next, RunStatus.Queued);
            return;
        }

        run.Status = RunStatus.Succeeded;
        run.EndedAt = DateTimeOffset.UtcNow;
    }

    /// <summary>A transient failure: kept on the run so that, if the message is poisoned, the run says why.</summary>
    public async Task RetryingAsync(string runId, int attempt, Exception error)
    {
        await events.TransitionAsync(runId, RunEvents.Types.StageRetrying, r =>
        {
            r.LastError = Describe(error);
            r.Attempt = attempt;
            return true;
        }, CancellationToken.None);
    }

    /// <summary>
    /// A permanent failure: the run ends with a user-facing reason and a machine-readable code. A run that has
    /// ended already (cancelled, or finished by another delivery) is left as it is, and no event is sent.
    /// With no <paramref name="stage"/> the run's current stage fails; with no <paramref name="elapsed"/> no timing is kept.
    /// </summary>
    public async Task<RunRecord> FailAsync(string runId, string? stage, string code, string message, TimeSpan? elapsed, Action<RunRecord>? also = null, CancellationToken cancellationToken = default)
    {
        var (run, _) = await events.TransitionAsync(runId, RunEvents.Types.RunFailed, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            r.Status = RunStatus.Failed;
            r.Stage = stage ?? r.Stage;
            r.SetStage(r.Stage, RunStatus.Failed);
            r.Error = message;
            r.ErrorCode = code;
            if (elapsed is { } time)
            {
                r.SetTiming(r.Stage, time);
            }

            r.EndedAt = DateTimeOffset.UtcNow;
            also?.Invoke(r);
            return true;
        }, cancellationToken);
        return run;
    }

    /// <summary>
    /// Cancels a run that has not ended: stages check at start and at each progress update, stop, and
    /// acknowledge their messages. Returns null when there is no such run; a finished run is left as it is.
    /// </summary>
    public async Task<RunRecord?> CancelAsync(string runId, string? reason, CancellationToken cancellationToken = default)
    {
        if (await runs.GetAsync(runId, cancellationToken) is null)
        {
            return null;
        }

        var (run, _) = await events.TransitionAsync(runId, RunEvents.Types.RunCancelled, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            r.Status = RunStatus.Cancelled;
            r.SetStage(r.Stage, RunStatus.Cancelled);
            r.Error = reason is null ? "Cancelled." : $"Cancelled: {reason}";
            r.ErrorCode = "Cancelled";
            r.EndedAt = DateTimeOffset.UtcNow;
            return true;
        }, cancellationToken);
        return run;
    }

    public static string Describe(Exception error)
    {
        var text = $"{error.GetType().Name}: {error.Message}";
        return text.Length <= 4000 ? text : text[..4000];
    }
}

/// <summary>The run was cancelled while a stage worked on it: the stage stops and acknowledges its message.</summary>
public sealed class RunCancelledException(string runId) : Exception($"Run {runId} was cancelled.");

/// <summary>How one delivery of a part of a fanned-out stage ended (<see cref="RunTransitions.RunPartOnceAsync"/>).</summary>
public enum PartOutcome
{
    /// <summary>The part was done by an earlier delivery.</summary>
    DoneBefore,
    /// <summary>This delivery did it (or found it done once it held the part's lease).</summary>
    Done,
    /// <summary>The run ended (cancelled, failed, or this part's bad input failed it): nothing more to do.</summary>
    Stopped,
}
