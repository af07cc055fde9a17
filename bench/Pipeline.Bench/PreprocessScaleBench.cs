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
/// exact duplicates (re-spaced copies of earlier records, identical after normalization) are planned into
/// partitions of <see cref="PartitionRecords"/> records, each partition is built by a child process of
/// its own (so its peak working set is that of one instance doing one partition), and the partitions are
/// assembled into shards on disk. The stage's code does each step (<see cref="PreparedDatasetBuilder"/>);
/// queues and blobs are replaced by local files so the figures are the work's own.
/// </summary>
public static class PreprocessScaleBench
{
    /// <summary>Records per partition, the same at every size: the per-partition peak must not grow with the dataset.</summary>
    public const int PartitionRecords = 250_000;

    /// <summary>One record in this many is a planted exact duplicate of an earlier one.</summary>
    private const int DuplicateEvery = 50;

    private static readonly PreprocessRecipe Recipe = new() { ShardRecords = 100_000 };

    public static async Task RunAsync(int[] sizes)
    {
        var folder = Path.Combine(Path.GetTempPath(), $"preprocess-scale-{Environment.ProcessId}");
        Directory.CreateDirectory(folder);
        try
        {
            Console.WriteLine($"Preprocessing fan-out benchmark: labelled generated sentences, tiktoken cl100k_base, exact dedup, {PartitionRecords:N0} records per partition (at least 2), {Environment.ProcessorCount} cores;");
            Console.WriteLine("each partition is built by a child process (one at a time, all cores), whose peak working set is reported; plan and assembly run in this process, with files for blobs.");
            Console.WriteLine();
            Console.WriteLine("| records | partitions | plan s | partitions s | assemble s | wall s | records/s | peak MB per partition | exact duplicates found of planted |");
            Console.WriteLine("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
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
        var (planted, labels) = Generate(records, recordsPath);
        var dataset = Dataset(records, labels, recordsPath);
        var datasetPath = Path.Combine(folder, "dataset.json");
        await File.WriteAllTextAsync(datasetPath, JsonSerializer.Serialize(dataset, PipelineJson.Default.DatasetManifest));
        var partitions = Math.Max(2, (records + PartitionRecords - 1) / PartitionRecords);
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
            var outcomePath = Path.Combine(folder, $"{p:00000}.done.json");
            peak = Math.Max(peak, await RunChildAsync(p, inputs[p], Path.Combine(folder, $"{p:00000}.kept.bin"), outcomePath, datasetPath));
            outcomes.Add(JsonSerializer.Deserialize(await File.ReadAllTextAsync(outcomePath), PreprocessJson.Default.PartitionOutcome)!);
        }

        var built = wall.Elapsed - plan;
        var kept = Enumerable.Range(0, partitions).Select(p => (Stream)File.OpenRead(Path.Combine(folder, $"{p:00000}.kept.bin"))).ToList();
        var build = await builder.AssembleAsync(kept, outcomes, dataset, new FileShardSink(folder), "prepared/", CancellationToken.None);
        foreach (var stream in kept)
        {
            await stream.DisposeAsync();
        }

        var total = wall.Elapsed;
        var assembled = total - plan - built;
        var rate = records / total.TotalSeconds;
        var peakMb = peak / 1048576.0;
        var found = build.Stats.ExactDuplicatesRemoved;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| {records:N0} | {partitions} | {plan.TotalSeconds:F1} | {built.TotalSeconds:F1} | {assembled.TotalSeconds:F1} | {total.TotalSeconds:F1} | {rate:N0} | {peakMb:F0} | {found:N0} of {planted:N0} |"));
        Directory.Delete(folder, recursive: true);
        return (rate, peakMb, found, planted);
    }

    /// <summary>Builds one partition in a child process of this program; returns the child's peak working set in bytes.</summary>
    private static async Task<long> RunChildAsync(int partition, string input, string kept, string outcome, string dataset)
    {
        var self = Environment.ProcessPath!;
        var start = new ProcessStartInfo(self) { RedirectStandardOutput = true, UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
        {
            start.ArgumentList.Add(typeof(PreprocessScaleBench).Assembly.Location);
        }

        foreach (var argument in new[] { "preprocess-scale-partition", partition.ToString(CultureInfo.InvariantCulture), input, kept, outcome, dataset })
        {
            start.ArgumentList.Add(argument);
        }

        using var child = Process.Start(start)!;
        var output = await child.StandardOutput.ReadToEndAsync();
        await child.WaitForExitAsync();
        if (child.ExitCode != 0 || !output.StartsWith("peak ", StringComparison.Ordinal))
        {
            throw new InvalidOperationException($"The child process for partition {partition} failed ({child.ExitCode}): {output}");
        }

        return long.Parse(output["peak ".Length..].Trim(), CultureInfo.InvariantCulture);
    }

    /// <summary>The child's part: one partition built as a partition message builds it, with files for blobs.</summary>
    public static async Task PartitionAsync(string[] args)
    {
        var partition = int.Parse(args[0], CultureInfo.InvariantCulture);
        var dataset = JsonSerializer.Deserialize(await File.ReadAllTextAsync(args[4]), PipelineJson.Default.DatasetManifest)!;
        var tokenizers = await TokenizerSource.LoadAsync(null!, Recipe.Tokenizer, CancellationToken.None);
        var builder = new PreparedDatasetBuilder(Recipe, tokenizers, new PreprocessingOptions());
        PartitionOutcome outcome;
        await using (var input = File.OpenRead(args[1]))
        await using (var kept = new FileStream(args[2], FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16))
        {
            outcome = await builder.BuildPartitionAsync(partition, input, dataset, kept, null, CancellationToken.None);
        }

        await File.WriteAllTextAsync(args[3], JsonSerializer.Serialize(outcome, PreprocessJson.Default.PartitionOutcome));
        using var self = Process.GetCurrentProcess();
        self.Refresh();
        Console.Write($"peak {self.PeakWorkingSet64}");
    }

    /// <summary>
    /// Canonical records (as ingestion writes them) of generated sentences; one in <see cref="DuplicateEvery"/>
    /// is a copy of an earlier record with its white space changed. Returns the planted copies and the label counts.
    /// </summary>
    private static (long Planted, Dictionary<string, long> Labels) Generate(int records, string path)
    {
        var random = new Random(20261201);
        var words = Enumerable.Range(0, 5000).Select(i => Word(random)).ToArray();
        var recent = new List<(string Text, int Label)>(4096);
        var labels = new Dictionary<string, long> { ["0"] = 0, ["1"] = 0 };
        long planted = 0;
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
            output.Write(",\"line\":");
            output.Write(line);
            output.Write("}\n");
        }

        return (planted, labels);
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
