using System.Diagnostics;

namespace Pipeline.Bench;

/// <summary>Wall time and peak working set of the process during one phase (sampled every 20 ms).</summary>
public static class Measure
{
    public readonly record struct Result(double Seconds, long PeakBytes);

    public static async Task<Result> BestOfAsync(int repetitions, Func<Task> phase)
    {
        var best = new Result(double.MaxValue, 0);
        for (var i = 0; i < repetitions; i++)
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
            var result = new Result(seconds, peak);
            best = result.Seconds < best.Seconds ? result : best;
        }

        return best;
    }
}
