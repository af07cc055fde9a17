using Pipeline.Messaging;
using Pipeline.Storage;

namespace Pipeline.Runs;

/// <summary>The run transitions every stage makes, each saved and published as a CloudEvent.</summary>
public sealed class RunTransitions(RunStore runs, RunEvents events, StorageClients storage)
{
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
        var (run, changed) = await runs.TryUpdateAsync(runId, r =>
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
        if (changed)
        {
            await events.PublishAsync(RunEvents.Types.StageStarted, run, cancellationToken);
        }

        return run;
    }

    /// <summary>A transient failure: kept on the run so that, if the message is poisoned, the run says why.</summary>
    public async Task RetryingAsync(string runId, int attempt, Exception error)
    {
        var run = await runs.UpdateAsync(runId, r =>
        {
            r.LastError = Describe(error);
            r.Attempt = attempt;
            return true;
        }, CancellationToken.None);
        await events.PublishAsync(RunEvents.Types.StageRetrying, run, CancellationToken.None);
    }

    /// <summary>
    /// A permanent failure: the run ends with a user-facing reason and a machine-readable code. A run that has
    /// ended already (cancelled, or finished by another delivery) is left as it is, and no event is sent.
    /// </summary>
    public async Task<RunRecord> FailAsync(string runId, string stage, string code, string message, TimeSpan elapsed, Action<RunRecord>? also = null, CancellationToken cancellationToken = default)
    {
        var (run, changed) = await runs.TryUpdateAsync(runId, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            r.Status = RunStatus.Failed;
            r.Stage = stage;
            r.SetStage(stage, RunStatus.Failed);
            r.Error = message;
            r.ErrorCode = code;
            r.SetTiming(stage, elapsed);
            r.EndedAt = DateTimeOffset.UtcNow;
            also?.Invoke(r);
            return true;
        }, cancellationToken);
        if (changed)
        {
            await events.PublishAsync(RunEvents.Types.RunFailed, run, cancellationToken);
        }

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

        var (run, changed) = await runs.TryUpdateAsync(runId, r =>
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
        if (changed)
        {
            await events.PublishAsync(RunEvents.Types.RunCancelled, run, cancellationToken);
        }

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
