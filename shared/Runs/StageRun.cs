using Microsoft.Extensions.Logging;

namespace Pipeline.Runs;

/// <summary>
/// Bad input: the stage can never succeed as asked, so the run fails with <see cref="Code"/> (machine-readable,
/// part of the run's contract) and the message (what the user should fix), and the message is not retried.
/// Each stage's own rejected exception derives from it.
/// </summary>
public class StageRejectedException(string code, string message) : Exception(message)
{
    public string Code { get; } = code;
}

/// <summary>
/// One delivery of a stage's message, as <see cref="RunTransitions.RunStageAsync"/> runs it: the run it
/// claims, and the few things a stage does beyond the common skeleton.
/// </summary>
public sealed record StageRun(RunRecord Initial, string Stage, int Attempt, ILogger Logger)
{
    public string RunId => Initial.RunId;

    /// <summary>Also set on the run when the stage starts (for example the dataset it works on).</summary>
    public Action<RunRecord>? OnStart { get; init; }

    /// <summary>Ends the run on bad input instead of a plain <see cref="RunTransitions.FailAsync"/> (ingestion quarantines the file first).</summary>
    public Func<StageRejectedException, TimeSpan, Task>? OnRejected { get; init; }

    /// <summary>Cleans up after the run was cancelled while the stage worked on it.</summary>
    public Func<Task>? OnCancelled { get; init; }

    /// <summary>What part of the stage this delivery is (for example one shard), named in the error kept on a transient failure.</summary>
    public string? Part { get; init; }
}
