using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Preprocessing;

namespace Pipeline.Bench;

/// <summary>
/// Preprocessing fanned out over partitions, at growing sizes: generated labelled records with planted
/// exact duplicates (re-spaced copies of earlier records, identical after normalization) and near
/// duplicates (copies with a word added) are planned into partitions of <see cref="PartitionRecords"/>
/// records; each partition, and each part of the near-dedup steps (buckets, attach, verify), is done by a
/// child process of its own (so its peak working set is that of one instance doing one part), and the
/// clusters and the assembly write the shards to disk. The stage's code does each step
/// (<see cref="PreparedDatasetBuilder"/>, <see cref="NearDedupSteps"/>); queues and blobs are replaced by
/// local files so the figures are the work's own.
/// </summary>
public static class PreprocessScaleBench
{
    /// <summary>Records per partition, the same at every size: the per-partition peak must not grow with the dataset.</summary>
    public const int PartitionRecords = 250_000;

    /// <summary>One record in this many is a planted exact duplicate of an earlier one, and one more a planted near duplicate.</summary>
    private const int DuplicateEvery = 50;

    private static readonly PreprocessRecipe Recipe = new() { ShardRecords = 100_000, Dedup = new DedupOptions { Mode = DedupModes.Near } };

    public static async Task RunAsync(int[] sizes)
    {
        var folder = Path.Combine(Path.GetTempPath(), $"preprocess-scale-{Environment.ProcessId}");
        Directory.CreateDirectory(folder);
        try
        {
            var hasher = new MinHasher(Recipe.Dedup);
            Console.WriteLine($"Preprocessing fan-out benchmark: labelled generated sentences, tiktoken cl100k_base, near dedup (threshold {hasher.Threshold}, {hasher.Bands} bands of {hasher.Rows}) with exact dedup, {PartitionRecords:N0} records per partition (at least 2), {Environment.ProcessorCount} cores;");
            Console.WriteLine("each partition and each near-dedup part is done by a child process (one at a time, all cores), whose peak working set is reported; plan, clusters and assembly run in this process, with files for blobs.");
            Console.WriteLine();
            Console.WriteLine("| records | partitions | near-dedup parts | plan s | partitions s | near-dedup steps s | assemble s | wall s | records/s | peak MB per partition | peak MB per near-dedup part | exact duplicates found | near duplicates found |");
            Console.WriteLine("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
            var last = (Rate: 0.0, PeakMb: 0.0, Found: 0L, Planted: 0L);
            foreach (var size in sizes)
            {
                last = await RunSizeAsync(size, folder);
            }

            Console.WriteLine();
            Console.WriteLine($"preprocess scale: {last.Rate:F0} records/s, peak {last.PeakMb:F0} MB per partition, duplicates found {last.Found} of {last.Planted}");
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    private static async Task<(double Rate, double PeakMb, long Found, long Planted)> RunSizeAsync(int records, string root)
    {
        var folder = Path.Combine(root, records.ToString(CultureInfo.InvariantCulture));
        Directory.CreateDirectory(folder);
        var recordsPath = Path.Combine(folder, "records.jsonl");
        var (plantedExact, plantedNear, labels) = Generate(records, recordsPath);
        var dataset = Dataset(records, labels, recordsPath);
        var datasetPath = Path.Combine(folder, "dataset.json");
        await File.WriteAllTextAsync(datasetPath, JsonSerializer.Serialize(dataset, PipelineJson.Default.DatasetManifest));
        var partitions = Math.Max(2, (records + PartitionRecords - 1) / PartitionRecords);
        var buckets = NearDedupSteps.BucketsFor(partitions, new MinHasher(Recipe.Dedup));
        var tokenizers = await TokenizerSource.LoadAsync(null!, Recipe.Tokenizer, CancellationToken.None);
        var builder = new PreparedDatasetBuilder(Recipe, tokenizers, new PreprocessingOptions());

        var wall = Stopwatch.StartNew();
        var inputs = Enumerable.Range(0, partitions).Select(p => Path.Combine(folder, $"{p:00000}.input.jsonl")).ToList();
        var streams = inputs.Select(p => (Stream)new FileStream(p, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16)).ToList();
        await using (var input = File.OpenRead(recordsPath))
        {
            await builder.PartitionAsync(input, streams, null, CancellationToken.None);
        }

        foreach (var stream in streams)
        {
            await stream.DisposeAsync();
        }

        var plan = wall.Elapsed;
        var peak = 0L;
        var outcomes = new List<PartitionOutcome>();
        for (var p = 0; p < partitions; p++)
        {
            peak = Math.Max(peak, await RunChildAsync("partition", p, folder, partitions, buckets));
            outcomes.Add(JsonSerializer.Deserialize(await File.ReadAllTextAsync(Path.Combine(folder, $"{p:00000}.done.json")), PreprocessJson.Default.PartitionOutcome)!);
        }

        var built = wall.Elapsed - plan;
        var nearPeak = 0L;
        foreach (var (step, parts) in new[] { (NearDedupSteps.Buckets, buckets), (NearDedupSteps.Attach, partitions), (NearDedupSteps.Verify, partitions) })
        {
            for (var part = 0; part < parts; part++)
            {
                nearPeak = Math.Max(nearPeak, await RunChildAsync(step, part, folder, partitions, buckets));
            }
        }

        var nearSteps = wall.Elapsed - plan - built;
        var near = await NearDedupSteps.ClusterAsync(new FilePartStore(folder), partitions, new PreprocessingOptions().DuplicateSamples, CancellationToken.None);
        var kept = Enumerable.Range(0, partitions).Select(p => (Stream)File.OpenRead(Path.Combine(folder, $"{p:00000}.kept.bin"))).ToList();
        var build = await builder.AssembleAsync(kept, outcomes, near, dataset, new FileShardSink(folder), "prepared/", CancellationToken.None);
        foreach (var stream in kept)
        {
            await stream.DisposeAsync();
        }

        var total = wall.Elapsed;
        var assembled = total - plan - built - nearSteps;
        var rate = records / total.TotalSeconds;
        var peakMb = Math.Max(peak, nearPeak) / 1048576.0;
        var (exact, nearFound) = (build.Stats.ExactDuplicatesRemoved, build.Stats.NearDuplicatesRemoved);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| {records:N0} | {partitions} | {buckets} + {partitions} + {partitions} | {plan.TotalSeconds:F1} | {built.TotalSeconds:F1} | {nearSteps.TotalSeconds:F1} | {assembled.TotalSeconds:F1} | {total.TotalSeconds:F1} | {rate:N0} | {peak / 1048576.0:F0} | {nearPeak / 1048576.0:F0} | {exact:N0} of {plantedExact:N0} | {nearFound:N0} of {plantedNear:N0} |"));
        Directory.Delete(folder, recursive: true);
        // Found: planted duplicates removed, counting no more than were planted of each kind.
        return (rate, peakMb, Math.Min(exact, plantedExact) + Math.Min(nearFound, plantedNear), plantedExact + plantedNear);
    }

    /// <summary>Does one part of one step in a child process of this program; returns the child's peak working set in bytes.</summary>
    private static async Task<long> RunChildAsync(string step, int part, string folder, int partitions, int buckets)
    {
        var self = Environment.ProcessPath!;
        var start = new ProcessStartInfo(self) { RedirectStandardOutput = true, UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
        {
            start.ArgumentList.Add(typeof(PreprocessScaleBench).Assembly.Location);
        }

        foreach (var argument in new[] { "preprocess-scale-partition", step, part.ToString(CultureInfo.InvariantCulture), folder, partitions.ToString(CultureInfo.InvariantCulture), buckets.ToString(CultureInfo.InvariantCulture) })
        {
            start.ArgumentList.Add(argument);
        }

        using var child = Process.Start(start)!;
        var output = await child.StandardOutput.ReadToEndAsync();
        await child.WaitForExitAsync();
        if (child.ExitCode != 0 || !output.StartsWith("peak ", StringComparison.Ordinal))
        {
            throw new InvalidOperationException($"The child process for {step} {part} failed ({child.ExitCode}): {output}");
        }

        return long.Parse(output["peak ".Length..].Trim(), CultureInfo.InvariantCulture);
    }

    /// <summary>The child's part: one partition, or one part of a near-dedup step, done as its message does it, with files for blobs.</summary>
    public static async Task PartitionAsync(string[] args)
    {
        var (step, part, folder) = (args[0], int.Parse(args[1], CultureInfo.InvariantCulture), args[2]);
        var (partitions, buckets) = (int.Parse(args[3], CultureInfo.InvariantCulture), int.Parse(args[4], CultureInfo.InvariantCulture));
        var store = new FilePartStore(folder);
        var hasher = new MinHasher(Recipe.Dedup);
        switch (step)
        {
            case "partition":
                var dataset = JsonSerializer.Deserialize(await File.ReadAllTextAsync(Path.Combine(folder, "dataset.json")), PipelineJson.Default.DatasetManifest)!;
                var tokenizers = await TokenizerSource.LoadAsync(null!, Recipe.Tokenizer, CancellationToken.None);
                var builder = new PreparedDatasetBuilder(Recipe, tokenizers, new PreprocessingOptions());
                PartitionOutcome outcome;
                await using (var input = File.OpenRead(Path.Combine(folder, $"{part:00000}.input.jsonl")))
                await using (var kept = new FileStream(Path.Combine(folder, $"{part:00000}.kept.bin"), FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16))
                await using (var near = await NearDedupSteps.PartitionWriter.CreateAsync(store, hasher, part, buckets, CancellationToken.None))
                {
                    outcome = await builder.BuildPartitionAsync(part, input, dataset, kept, near, null, CancellationToken.None);
                }

                await File.WriteAllTextAsync(Path.Combine(folder, $"{part:00000}.done.json"), JsonSerializer.Serialize(outcome, PreprocessJson.Default.PartitionOutcome));
                break;
            case NearDedupSteps.Buckets:
                await NearDedupSteps.BucketAsync(store, part, partitions, CancellationToken.None);
                break;
            case NearDedupSteps.Attach:
                await NearDedupSteps.AttachAsync(store, part, hasher.Permutations, CancellationToken.None);
                break;
            default:
                await NearDedupSteps.VerifyAsync(store, part, hasher, CancellationToken.None);
                break;
        }

        using var self = Process.GetCurrentProcess();
        self.Refresh();
        Console.Write($"peak {self.PeakWorkingSet64}");
    }

    /// <summary>
    /// Canonical records (as ingestion writes them) of generated sentences; one in <see cref="DuplicateEvery"/>
    /// is a copy of an earlier record with its white space changed. Returns the planted copies and the label counts.
    /// </summary>
    /// <summary>
    /// <c>generate-scale &lt;records&gt; &lt;path&gt;</c>: the same generated records as a file to drop into <c>incoming</c>
    /// (<c>{"text","label"}</c> lines, no line numbers), for <c>scripts/scale-check.sh</c>.
    /// </summary>
    public static void GenerateFile(int records, string path)
    {
        var (exact, near, _) = Generate(records, path, canonical: false);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{records} records, {new FileInfo(path).Length} bytes, {exact} planted exact duplicates, {near} planted near duplicates"));
    }

    private static (long PlantedExact, long PlantedNear, Dictionary<string, long> Labels) Generate(int records, string path, bool canonical = true)
    {
        var random = new Random(20261201);
        var words = Enumerable.Range(0, 5000).Select(i => Word(random)).ToArray();
        var recent = new List<(string Text, int Label)>(4096);
        var labels = new Dictionary<string, long> { ["0"] = 0, ["1"] = 0 };
        long planted = 0, plantedNear = 0;
        using var output = new StreamWriter(path, false, new UTF8Encoding(false), 1 << 20);
        var text = new StringBuilder();
        for (var line = 1; line <= records; line++)
        {
            string sentence;
            int label;
            if (line % DuplicateEvery == 0 && recent.Count > 0)
            {
                (sentence, label) = recent[random.Next(recent.Count)];
                sentence = "  " + sentence.Replace(" ", "   ", StringComparison.Ordinal) + " ";
                planted++;
            }
            else if (line % DuplicateEvery == DuplicateEvery / 2 && recent.Count > 0 && recent[random.Next(recent.Count)] is var original && original.Text.Count(c => c == ' ') >= 11)
            {
                // A near duplicate: an earlier sentence of 12 words or more with a word of its own added (Jaccard of 3-word shingles 0.9 or more).
                sentence = original.Text + " w" + line.ToString(CultureInfo.InvariantCulture);
                label = original.Label;
                plantedNear++;
            }
            else
            {
                text.Clear();
                var length = 8 + random.Next(16);
                for (var w = 0; w < length; w++)
                {
                    text.Append(w == 0 ? "" : " ").Append(words[random.Next(words.Length)]);
                }

                sentence = text.Append('.').ToString();
                label = random.Next(2);
                if (recent.Count < 4096)
                {
                    recent.Add((sentence, label));
                }
                else
                {
                    recent[random.Next(recent.Count)] = (sentence, label);
                }
            }

            labels[label.ToString(CultureInfo.InvariantCulture)]++;
            output.Write("{\"text\":");
            output.Write(JsonSerializer.Serialize(sentence));
            output.Write(",\"label\":");
            output.Write(label);
            if (canonical)
            {
                output.Write(",\"line\":");
                output.Write(line);
            }

            output.Write("}\n");
        }

        return (planted, plantedNear, labels);
    }

    private static string Word(Random random)
    {
        const string letters = "abcdefghijklmnopqrstuvwxyz";
        var chars = new char[3 + random.Next(7)];
        for (var i = 0; i < chars.Length; i++)
        {
            chars[i] = letters[random.Next(letters.Length)];
        }

        return new string(chars);
    }

    private static DatasetManifest Dataset(int records, Dictionary<string, long> labels, string path) => new()
    {
        DatasetId = "ds-bench-scale",
        Format = "jsonl",
        FormatReason = "generated",
        RecordKind = RecordKinds.Text,
        LabelType = "number",
        LabelCounts = labels,
        Counts = new IngestCounts { Lines = records, Read = records, Valid = records },
        Sha256 = "",
        SourceBlob = path,
        SourceETag = "",
        RunId = "bench",
        Records = path,
        Errors = "",
        CreatedAt = DateTimeOffset.UtcNow,
        TimingsMs = [],
        SettingsFingerprint = "",
    };

    /// <summary>The near-dedup steps' files as local files under one folder.</summary>
    private sealed class FilePartStore(string folder) : PartStore
    {
        public override Task<Stream> CreateAsync(string name, int bufferBytes, CancellationToken cancellationToken)
        {
            var file = Path.Combine(folder, name);
            Directory.CreateDirectory(Path.GetDirectoryName(file)!);
            return Task.FromResult<Stream>(new FileStream(file, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16));
        }

        public override Task<Stream> OpenReadAsync(string name, CancellationToken cancellationToken) =>
            Task.FromResult<Stream>(File.OpenRead(Path.Combine(folder, name)));

        public override Task<long> SizeAsync(string name, CancellationToken cancellationToken) => Task.FromResult(new FileInfo(Path.Combine(folder, name)).Length);

        public override async IAsyncEnumerable<string> ListAsync(string prefix, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
        {
            await Task.CompletedTask;
            var directory = Path.Combine(folder, prefix);
            if (!Directory.Exists(directory))
            {
                yield break;
            }

            foreach (var file in Directory.EnumerateFiles(directory).Order(StringComparer.Ordinal))
            {
                yield return prefix + Path.GetFileName(file);
            }
        }
    }

    /// <summary>Shards written to local files, as the assembly writes them to blobs.</summary>
    private sealed class FileShardSink(string folder) : ShardSink
    {
        public override string Container => "files";

        public override ValueTask<Stream> OpenAsync(string path, CancellationToken cancellationToken)
        {
            var file = Path.Combine(folder, path);
            Directory.CreateDirectory(Path.GetDirectoryName(file)!);
            return ValueTask.FromResult<Stream>(new FileStream(file, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16));
        }
    }
}
