using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Pipeline.Bench;

/// <summary>
/// Pins every thread of a process to a set of cores. <see cref="Process.ProcessorAffinity"/> is not enough
/// on Linux: it calls <c>sched_setaffinity</c> on the process id, which moves only the main thread; the
/// thread pool's threads (where the measured code runs after its first await) keep every core. So each
/// thread in <c>/proc/&lt;pid&gt;/task</c> is pinned, and threads started later inherit a pinned creator's mask.
/// </summary>
public static partial class CpuAffinity
{
    /// <summary>Pins all threads of <paramref name="process"/> to the cores in <paramref name="mask"/> (bit i = core i); Linux only, elsewhere nothing.</summary>
    public static void Pin(Process process, ulong mask)
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }

        // Twice: a thread started while the first sweep ran may have copied an unpinned creator's mask.
        for (var sweep = 0; sweep < 2; sweep++)
        {
            foreach (var task in Directory.EnumerateDirectories($"/proc/{process.Id}/task"))
            {
                if (int.TryParse(Path.GetFileName(task), out var tid) && SchedSetAffinity(tid, (nuint)sizeof(ulong), ref mask) != 0)
                {
                    var errno = Marshal.GetLastPInvokeError();
                    if (Directory.Exists(task))
                    {
                        throw new InvalidOperationException($"sched_setaffinity({tid}) failed with errno {errno}.");
                    }
                }
            }
        }
    }

    /// <summary>All cores of this machine as a mask.</summary>
    public static ulong All => Environment.ProcessorCount >= 64 ? ulong.MaxValue : (1UL << Environment.ProcessorCount) - 1;

    [LibraryImport("libc", EntryPoint = "sched_setaffinity", SetLastError = true)]
    private static partial int SchedSetAffinity(int pid, nuint size, ref ulong mask);
}
