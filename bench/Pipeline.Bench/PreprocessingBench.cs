using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Testing;

namespace Pipeline.Bench;

/// <summary>
/// End-to-end tokens per second of the preprocessing stage (blob in, shards out) against the same
/// tokenizer on the same texts in memory (the limit), on one core and on all cores.
/// </summary>
public static class PreprocessingBench
{
    public static async Task RunAsync(int records)
    {
        using var azurite = new AzuriteServer();
        await azurite.StartAsync();
        var texts = Texts(records);
        var content = new StringBuilder();
        for (var i = 0; i < texts.Count; i++)
        {
            content.Append(JsonSerializer.Serialize(new { text = texts[i], label = i % 2 })).Append('\n');
        }

        using var services = BenchServices.Create(azurite);
        var storage = services.GetRequiredService<StorageClients>();
        var runs = services.GetRequiredService<RunStore>();
        var blob = storage.Container(StorageNames.Containers.Incoming).GetBlobClient("bench-preprocess.jsonl");
        var etag = (await blob.UploadAsync(BinaryData.FromString(content.ToString()), overwrite: true)).Value.ETag.ToString().Trim('"');
        await services.GetRequiredService<IngestHandler>().IngestAsync(new IngestRequest(StorageNames.Containers.Incoming, blob.Name, etag, "bench-ingest", null), 1, CancellationToken.None);
        var datasetId = (await runs.GetAsync("bench-ingest"))!.DatasetId!;
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        var dataset = (await BlobJson.ReadAsync(datasets.GetBlobClient($"{datasetId}/manifest.json"), PipelineJson.Default.DatasetManifest, CancellationToken.None))!;
        var canonical = (await datasets.GetBlobClient(dataset.Records).DownloadContentAsync()).Value.Content.ToArray();

        var recipe = new PreprocessRecipe();
        var tokenizers = await TokenizerSource.LoadAsync(storage, recipe.Tokenizer, CancellationToken.None);
        var cleaner = new TextCleaner(recipe.Normalize, recipe.Redact);
        var cleaned = texts.Select(t => cleaner.Clean(t, new RedactionCounts())).ToArray();
        var cores = Environment.ProcessorCount;

        Console.WriteLine($"Preprocessing benchmark: {records:N0} records ({content.Length / 1e6:N1} MB) of labelled review sentences, tiktoken cl100k_base, exact dedup, {cores} cores;");
        Console.WriteLine("one core: the process pinned to core 0 (and Azurite to core 1) with preprocessing parallelism 1; all cores: nothing pinned, parallelism = cores.");
        Console.WriteLine();
        Console.WriteLine("| Phase | cores | tokens/s (best of 5) | ratio to the in-memory tokenizer |");
        Console.WriteLine("| --- | --- | --- | --- |");
        var freeSink = new Dictionary<int, double>();
        var limits = new Dictionary<int, double>();
        // The stage's own CPU: records from memory, shards written (JSON, SHA-256) to a sink that costs nothing.
        Task<BuildResult> BuildToFreeSink(int parallelism) =>
            new PreparedDatasetBuilder(recipe, tokenizers, new PreprocessingOptions { Parallelism = parallelism })
                .BuildAsync(new MemoryStream(canonical, writable: false), dataset, DiscardingShardSink.Instance, "bench/", null, CancellationToken.None);

        foreach (var parallelism in cores > 1 ? new[] { 1, cores } : [1])
        {
            Pin(azurite, parallelism == 1);
            var tokens = 0L;
            var workers = Enumerable.Range(0, parallelism).Select(_ => tokenizers.Create()).ToArray();
            var builtTokens = 0L;
            Task Limit()
            {
                tokens = TokenizeInMemory(workers, cleaned, parallelism);
                return Task.CompletedTask;
            }

            async Task FreeSink()
            {
                var build = await BuildToFreeSink(parallelism);
                builtTokens = build.Stats.Train.Tokens + build.Stats.Validation.Tokens;
            }

            // What the stage must do for each record besides shards and dedup, in a plain loop on one thread: the
            // canonical line read, its text cleaned, then tokenized. The gap from here to the free-sink stage is
            // the batching, the bookkeeping per record, dedup and the shard JSON with its SHA-256.
            var lines = Encoding.UTF8.GetString(canonical).Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(Encoding.UTF8.GetBytes).ToArray();
            var plainTokens = 0L;
            Task PlainLoop()
            {
                var reader = new CanonicalRecordReader();
                var ids = new List<int>();
                var count = 0L;
                foreach (var line in lines)
                {
                    count += workers[0].Encode(cleaner.Clean(reader.Read(line).Text ?? "", new RedactionCounts()), ids).Count;
                }

                plainTokens = count;
                return Task.CompletedTask;
            }

            // Three warm-up rounds (the stage's methods are compiled again, optimized, by the tiered JIT on a
            // background thread, which on one core takes the measured core for the first seconds), then the
            // phases in turns (see Measure.BestOfInterleavedAsync).
            Func<Task>[] measured = parallelism == 1 ? [Limit, FreeSink, PlainLoop] : [Limit, FreeSink];
            for (var round = 0; round < 3; round++)
            {
                foreach (var phase in measured)
                {
                    await phase();
                }
            }

            var phases = await Measure.BestOfInterleavedAsync(5, measured);
            var (limit, built) = (phases[0].Seconds, phases[1].Seconds);
            limits[parallelism] = tokens / limit;
            freeSink[parallelism] = builtTokens / built;

            // The whole stage as the app runs it: the handler from the app's composition, blob in, shards and manifest out.
            using var stageServices = BenchServices.Create(azurite, new Dictionary<string, string?> { ["Pipeline:Preprocessing:Parallelism"] = parallelism.ToString(CultureInfo.InvariantCulture) });
            var handler = stageServices.GetRequiredService<PreprocessHandler>();
            var attempt = 0;
            var stageTokens = 0L;
            var stage = BestOf(3, () =>
            {
                // A new seed each time: a new prepared id, so every repetition does the whole work.
                var spec = RunSpec.Parse(Encoding.UTF8.GetBytes("{\"preprocess\":{\"seed\":" + (++attempt + (parallelism * 100)) + "}}"), "bench");
                var runId = $"bench-pre-{parallelism}-{attempt}";
                handler.HandleAsync(new PreprocessRequest(datasetId, "", spec), runId, 1, CancellationToken.None).GetAwaiter().GetResult();
                var counts = runs.GetAsync(runId).GetAwaiter().GetResult()!.GetCounts();
                stageTokens = counts["trainTokens"] + counts["validationTokens"];
            });
            Console.WriteLine($"| tokenizer alone, texts in memory (limit) | {parallelism} | {tokens / limit:N0} | 100% |");
            if (parallelism == 1)
            {
                Console.WriteLine($"| read + clean + tokenize each record in a plain loop (no batches, dedup or shards) | 1 | {plainTokens / phases[2].Seconds:N0} | {plainTokens / phases[2].Seconds / (tokens / limit):P0} |");
            }

            Console.WriteLine($"| preprocessing stage, records in memory, shards to a free sink (our code's cost) | {parallelism} | {builtTokens / built:N0} | {builtTokens / built / (tokens / limit):P0} |");
            Console.WriteLine($"| preprocessing stage, blob in to shards out on Azurite | {parallelism} | {stageTokens / stage:N0} | {stageTokens / stage / (tokens / limit):P0} |");
        }

        // The scaling bar: the free-sink stage on one core and on all cores measured in turns (each run pins
        // first, which takes a millisecond), so both bests come from the same minutes: this machine's speed
        // drifts between the blocks above, and a ratio of figures from two blocks carries that drift.
        var scaling = "n/a";
        if (cores > 1)
        {
            Func<Task> Build(int parallelism) => async () =>
            {
                Pin(azurite, parallelism == 1);
                await BuildToFreeSink(parallelism);
            };

            // The tokenizer's own scaling in the same turns: what two cores of this machine give at best.
            Func<Task> Tokenize(int parallelism)
            {
                var workers = Enumerable.Range(0, parallelism).Select(_ => tokenizers.Create()).ToArray();
                return () =>
                {
                    Pin(azurite, parallelism == 1);
                    TokenizeInMemory(workers, cleaned, parallelism);
                    return Task.CompletedTask;
                };
            }

            var turns = await Measure.BestOfInterleavedAsync(5, Build(1), Build(cores), Tokenize(1), Tokenize(cores));
            scaling = (turns[0].Seconds / turns[1].Seconds).ToString("F2", CultureInfo.InvariantCulture);
            Console.WriteLine();
            Console.WriteLine($"In turns (best of 5 each): free-sink stage one core {turns[0].Seconds:F3} s, {cores} cores {turns[1].Seconds:F3} s; " +
                $"tokenizer alone one core {turns[2].Seconds:F3} s, {cores} cores {turns[3].Seconds:F3} s ({(turns[2].Seconds / turns[3].Seconds).ToString("F2", CultureInfo.InvariantCulture)}x: what {cores} cores give here at best).");
        }

        Pin(azurite, oneCore: false);
        Console.WriteLine();
        Console.WriteLine($"stage/tokenizer: {(freeSink[1] / limits[1]).ToString("F2", CultureInfo.InvariantCulture)}x on 1 core; stage {cores} cores/1 core: {scaling}x (free sink)");
    }

    /// <summary>Shards that cost nothing to store: every byte is still formatted and hashed by the stage.</summary>
    private sealed class DiscardingShardSink : ShardSink
    {
        public static readonly DiscardingShardSink Instance = new();

        public override string Container => "discarded";

        public override ValueTask<Stream> OpenAsync(string path, CancellationToken cancellationToken) => ValueTask.FromResult(Stream.Null);
    }

    private static void Pin(AzuriteServer azurite, bool oneCore)
    {
        if (!OperatingSystem.IsLinux() || Environment.ProcessorCount < 2)
        {
            return;
        }

        CpuAffinity.Pin(azurite.Process, oneCore ? 2UL : CpuAffinity.All);
        CpuAffinity.Pin(Process.GetCurrentProcess(), oneCore ? 1UL : CpuAffinity.All);
    }

    /// <summary>The limit: each worker's own tokenizer (built before the clock starts) over its share of the cleaned texts.</summary>
    private static long TokenizeInMemory(TextTokenizer[] workers, string[] texts, int parallelism)
    {
        var total = 0L;
        Parallel.For(0, parallelism, new ParallelOptions { MaxDegreeOfParallelism = parallelism }, worker =>
        {
            var tokenizer = workers[worker];
            var ids = new List<int>();
            var count = 0L;
            for (var i = worker; i < texts.Length; i += parallelism)
            {
                count += tokenizer.Encode(texts[i], ids).Count;
            }

            Interlocked.Add(ref total, count);
        });
        return total;
    }

    private static double BestOf(int repetitions, Action action)
    {
        action();
        var best = double.MaxValue;
        for (var i = 0; i < repetitions; i++)
        {
            var clock = Stopwatch.StartNew();
            action();
            best = Math.Min(best, clock.Elapsed.TotalSeconds);
        }

        return best;
    }

    /// <summary>The sentiment sentences (from ../shared/data when present, else generated), made unique by a counter.</summary>
    private static List<string> Texts(int records)
    {
        var shared = Path.GetFullPath(Path.Combine(AzuriteServer.RepoRoot, "..", "shared", "data", "sentiment"));
        var sentences = Directory.Exists(shared)
            ? Directory.GetFiles(shared, "*_labelled.txt").SelectMany(File.ReadLines).Select(l => l.Split('\t')[0]).ToList()
            : [.. Enumerable.Range(0, 2000).Select(i => $"The service was {(i % 2 == 0 ? "great" : "slow")} and the food was {(i % 3 == 0 ? "cold" : "lovely")} on visit {i}.")];
        return [.. Enumerable.Range(0, records).Select(i => $"{sentences[i % sentences.Count]} #{i / sentences.Count}")];
    }
}
