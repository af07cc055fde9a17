using System.Diagnostics;
using Pipeline.Preprocessing;

namespace Pipeline.Bench;

/// <summary>Near-duplicate detection time against record count: it should grow linearly (constant time per record).</summary>
public static class NearDuplicateBench
{
    public static void Run(int[] counts)
    {
        Console.WriteLine("Near-duplicate detection (MinHash, 128 permutations, 3-word shingles, threshold 0.8; 1% planted near-duplicates), one thread:");
        Console.WriteLine();
        Console.WriteLine("| records | seconds | µs per record | per-record time vs the smallest | duplicates found | peak working set |");
        Console.WriteLine("| --- | --- | --- | --- | --- | --- |");
        double? baseline = null;
        foreach (var count in counts)
        {
            var texts = Generate(count);
            GC.Collect();
            var hasher = new MinHasher(new DedupOptions { Mode = DedupModes.Near });
            var index = new NearDuplicateIndex(hasher);
            var clock = Stopwatch.StartNew();
            long line = 0;
            foreach (var text in texts)
            {
                index.Add(++line, hasher.Signature(text));
            }

            var found = index.Clusters.Removals().Count;

            var seconds = clock.Elapsed.TotalSeconds;
            var perRecord = seconds / count * 1e6;
            baseline ??= perRecord;
            Console.WriteLine($"| {count:N0} | {seconds:N2} | {perRecord:N2} | {perRecord / baseline:N2}x | {found:N0} | {Process.GetCurrentProcess().PeakWorkingSet64 / 1e6:N0} MB |");
        }
    }

    private static List<string> Generate(int count)
    {
        var random = new Random(count);
        var words = Enumerable.Range(0, 20_000).Select(i => "w" + i.ToString("x")).ToArray();
        var texts = new List<string>(count);
        for (var i = 0; i < count; i++)
        {
            if (i > 100 && i % 100 == 0)
            {
                // A near-duplicate of an earlier record: one word of about forty changed (Jaccard of 3-word shingles about 0.85).
                var parts = texts[random.Next(i)].Split(' ');
                parts[random.Next(parts.Length)] = "changed";
                texts.Add(string.Join(' ', parts));
                continue;
            }

            texts.Add(string.Join(" ", Enumerable.Range(0, 35 + random.Next(10)).Select(_ => words[random.Next(words.Length)])));
        }

        return texts;
    }
}
