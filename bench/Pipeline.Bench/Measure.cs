using System.Diagnostics;

namespace Pipeline.Bench;

/// <summary>Wall time and peak working set of the process during one phase (sampled every 20 ms).</summary>
public static class Measure
{
    public readonly record struct Result(double Seconds, long PeakBytes);

    public static async Task<Result> BestOfAsync(int repetitions, Func<Task> phase) => (await BestOfInterleavedAsync(repetitions, phase))[0];

    /// <summary>
    /// The best of <paramref name="repetitions"/> for each phase, the phases run in turns (first, second, ...,
    /// first, ...). This machine's speed drifts by up to 2x within a minute (other tenants of the host), so a
    /// ratio between two phases is only fair when both bests were taken under the same conditions, which
    /// one block of repetitions after the other does not give.
    /// </summary>
    public static async Task<Result[]> BestOfInterleavedAsync(int repetitions, params Func<Task>[] phases)
    {
        var best = phases.Select(_ => new Result(double.MaxValue, 0)).ToArray();
        for (var i = 0; i < repetitions; i++)
        {
            for (var p = 0; p < phases.Length; p++)
            {
                best[p] = Min(best[p], await OnceAsync(phases[p]));
            }
        }

        return best;
    }

    private static Result Min(Result a, Result b) => b.Seconds < a.Seconds ? b : a;

    /// <summary>One timed run of <paramref name="phase"/> after a full collection, with the peak working set while it ran.</summary>
    private static async Task<Result> OnceAsync(Func<Task> phase)
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        var process = Process.GetCurrentProcess();
        process.Refresh();
        var peak = process.WorkingSet64;
        using var stop = new CancellationTokenSource();
        var sampler = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                process.Refresh();
                peak = Math.Max(peak, process.WorkingSet64);
                await Task.Delay(20).ConfigureAwait(false);
            }
        });
        var clock = Stopwatch.StartNew();
        await phase();
        var seconds = clock.Elapsed.TotalSeconds;
        stop.Cancel();
        await sampler;
        return new Result(seconds, peak);
    }
}
