using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.ML.OnnxRuntime;
using Pipeline.FineTuning;
using Pipeline.Inference;
using Pipeline.Models;
using Pipeline.Models.Quantization;
using Pipeline.Preprocessing;
using Pipeline.Storage;
using Pipeline.Testing;

namespace Pipeline.Bench;

/// <summary>
/// Dynamic int8 against fp32 on the real all-MiniLM-L6-v2 classifier, side by side in one process: the classifier is
/// trained by the built-in trainer on yelp + amazon (frozen starter encoder, <c>fineTune.quantize: true</c>), so its
/// int8 copy and the agreement on the validation split come from the product's own path; a second int8 scheme
/// (uint8 weights) is quantized from it with <see cref="ModelQuantizer"/>. Embedding cosine: the starter encoder
/// quantized the same ways, on the same validation split. Speed: ONNX Runtime alone on pre-tokenized, length-sorted
/// batches (the limit) and the stage blob in to results out, best of 3, 2 intra-op threads; then model load and
/// first batch with and without ONNX Runtime's optimized-model file, and a per-operator profile of each model.
/// </summary>
public static class QuantizeBench
{
    private const string Fp32 = "bench-quantize";
    private const string Int8 = Fp32 + ModelQuantizer.DefaultSuffix;
    private const string Signed = Fp32 + "-s8";
    private const string FullRange = Fp32 + "-s8-full";
    private const int Threads = 2;

    private sealed record Row(string Name, string ModelId, ModelQuantization? Quantization, double? Cosine, double LimitRate, double? StageRate, double Accuracy);

    public static async Task RunAsync(int rows)
    {
        using var azurite = new AzuriteServer();
        await azurite.StartAsync();
        using var services = await FineTuneBench.ServicesAsync(azurite, new Dictionary<string, string?> { [$"{InferenceSettings.Section}:IntraOpThreads"] = $"{Threads}" });
        var storage = services.GetRequiredService<StorageClients>();
        var settings = services.GetRequiredService<ModelSessions>().Settings;
        var fineTune = new JsonObject { ["baseModel"] = StarterModel.ModelId, ["outputModelId"] = Fp32, ["quantize"] = true };
        var (datasetId, preparedId, prepared, spec) = await FineTuneBench.PrepareSentimentAsync(services, storage, fineTune, generated: false);
        var (_, metrics, trainSeconds) = await FineTuneBench.TrainAsync(services, storage, new FineTuneRequest(datasetId, preparedId, prepared, spec), "bench-quantize-run");
        var signedOptions = new QuantizationOptions { UnsignedWeights = false };
        var quantizer = new ModelQuantizer(storage, settings);
        await quantizer.QuantizeAsync(Fp32, Signed, null, signedOptions, CancellationToken.None);
        // int8 weights in full 8 bits: exact on CPUs with VNNI (one instruction a 4-way product sum, no 16-bit step).
        var fullRangeOptions = new QuantizationOptions { UnsignedWeights = false, ReduceRange = false };
        await quantizer.QuantizeAsync(Fp32, FullRange, null, fullRangeOptions, CancellationToken.None);
        // The encoder alone: cosine of its pooled sentence embeddings to fp32's, on the same validation rows.
        var cosine = (await quantizer.QuantizeAsync(StarterModel.ModelId, "bench-encoder-int8", prepared, null, CancellationToken.None)).Quantization!.Agreement;
        var signedCosine = (await quantizer.QuantizeAsync(StarterModel.ModelId, "bench-encoder-s8", prepared, signedOptions, CancellationToken.None)).Quantization!.Agreement;
        var fullRangeCosine = (await quantizer.QuantizeAsync(StarterModel.ModelId, "bench-encoder-s8-full", prepared, fullRangeOptions, CancellationToken.None)).Quantization!.Agreement;
        // ONNX Runtime's guidance: int8 weights in full range where the CPU has VNNI, else uint8 (or 7-bit int8) weights.
        var vnni = HasVnni();
        var forThisCpu = vnni ? FullRange : Int8;

        var sentences = Directory.GetFiles(Path.Combine(InferenceBench.SharedData, "sentiment"), "*_labelled.txt").Order().SelectMany(File.ReadLines).Select(l => l.Split('\t')[0]).ToList();
        var texts = Enumerable.Range(0, rows).Select(i => sentences[i % sentences.Count]).ToList();
        var sessions = services.GetRequiredService<ModelSessions>();
        var fp32Runtime = await sessions.GetAsync(Fp32, CancellationToken.None);
        var tokenizer = fp32Runtime.RentTokenizer();
        var tokenized = texts.Select(t => tokenizer.Encode(t, []).ToArray()).ToList();
        fp32Runtime.ReturnTokenizer(tokenizer);
        Console.WriteLine($"Quantization benchmark: the real all-MiniLM-L6-v2 classifier ({StarterModel.Citation}; frozen encoder + mean pooling, L2 norm and a head trained on yelp + amazon in {trainSeconds:N0} s),");
        Console.WriteLine($"{rows:N0} sentences from ../shared/data/sentiment ({tokenized.Average(t => t.Length):N1} tokens per row), ONNX Runtime {OrtEnv.Instance().GetVersionString()}, {Threads} intra-op threads, best of 3; load {LoadAverage()}.");
        Console.WriteLine();

        var results = new List<Row>();
        foreach (var (name, id, agreement) in new[]
        {
            ("fp32", Fp32, (QuantizationAgreement?)null), ("**int8**, uint8 weights per channel (the default)", Int8, cosine),
            ("int8, int8 weights in 7 bits per channel (`--signed`)", Signed, signedCosine),
            ("int8, int8 weights in 8 bits per channel (`--signed --full-range`, for VNNI)", FullRange, fullRangeCosine),
        })
        {
            var runtime = await sessions.GetAsync(id, CancellationToken.None);
            InferenceBench.RunBatches(runtime, [.. tokenized.Take(256)], 16, sorted: true);
            var limit = Enumerable.Range(0, 3).Select(_ => InferenceBench.Time(() => InferenceBench.RunBatches(runtime, tokenized, 16, sorted: true))).MinBy(t => t.Seconds);
            // The stage for fp32, the default and the scheme for this CPU; the others at the limit only.
            double? stage = id == Fp32 || id == Int8 || id == forThisCpu ? rows / (await InferenceBench.StageAsync(services, storage, texts, repetitions: 3, id)).Seconds : null;
            results.Add(new Row(name, id, runtime.Manifest.Quantization, agreement?.MeanCosine, rows / limit.Seconds, stage,
                runtime.Manifest.Quantization?.Agreement.QuantizedAccuracy ?? metrics["validationAccuracy"]));
        }

        var baseline = results[0];
        Console.WriteLine("| Model | limit rows/s | stage rows/s | limit vs fp32 | stage vs fp32 | validation accuracy | points vs fp32 | labels changed | encoder cosine to fp32 | model.onnx |");
        Console.WriteLine("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        foreach (var r in results)
        {
            var q = r.Quantization;
            Console.WriteLine($"| {r.Name} | {r.LimitRate:N0} | {(r.StageRate is { } s ? s.ToString("N0") : "-")} | {r.LimitRate / baseline.LimitRate:N2}x | {(r.StageRate is { } t ? $"{t / baseline.StageRate!.Value:N2}x" : "-")} | {r.Accuracy:P1} | "
                + $"{(q is null ? "-" : q.Agreement.AccuracyPoints!.Value.ToString("+0.0;-0.0;0.0"))} | {(q is null ? "-" : q.Agreement.LabelChangedFraction!.Value.ToString("P1"))} | {(r.Cosine is { } c ? c.ToString("N4") : "-")} | {(q?.QuantizedBytes ?? SourceBytes(results, q)) / 1e6:N1} MB |");
        }

        var validationRows = results[1].Quantization!.Agreement.Rows;
        Console.WriteLine();
        Console.WriteLine($"Accuracy on the {validationRows:N0}-row validation split (fineTune.quantize measured it; the fp32 model's own figure {metrics["validationAccuracy"]:P1}). Cosine: the starter encoder's mean-pooled, L2-normalised sentence embeddings, int8 vs fp32, on the same rows (min {cosine.MinCosine:N4}; int8 weights in 7 bits: min {signedCosine.MinCosine:N4}; in 8 bits: min {fullRangeCosine.MinCosine:N4}).");
        Console.WriteLine();
        await LoadTimesAsync(storage, settings, [.. tokenized.OrderBy(t => t.Length).Take(16)]);
        Console.WriteLine();
        foreach (var id in new[] { Fp32, Int8 })
        {
            Console.WriteLine($"Where the time goes, {id} (ONNX Runtime profiler, 1,000 rows in sorted batches of 16, share of kernel time): {await ProfileAsync(storage, settings, id, [.. tokenized.Take(1000)])}");
        }

        // The bar's line is for the scheme this CPU should use: the default without VNNI, full-range int8 weights with it.
        var best = results.Single(r => r.ModelId == forThisCpu);
        var ratio = Math.Min(best.LimitRate / baseline.LimitRate, best.StageRate!.Value / baseline.StageRate!.Value);
        Console.WriteLine();
        Console.WriteLine($"This CPU {(vnni ? "has" : "has no")} VNNI, so its scheme is {best.Name.Replace("**", "")} ({best.Quantization!.Weights}).");
        Console.WriteLine($"int8 vs fp32: {ratio:N2}x rows/s, accuracy {best.Quantization!.Agreement.AccuracyPoints!.Value:+0.0;-0.0;0.0} points, cosine {best.Cosine!.Value:N4}");
    }

    /// <summary>AVX-VNNI (.NET reports it), or AVX-512 VNNI (from /proc/cpuinfo: .NET has no flag for it).</summary>
    private static bool HasVnni() => System.Runtime.Intrinsics.X86.AvxVnni.IsSupported
        || (OperatingSystem.IsLinux() && File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("flags", StringComparison.Ordinal))?.Split(' ').Contains("avx512_vnni") == true);

    private static long SourceBytes(List<Row> rows, ModelQuantization? q) => q?.SourceBytes ?? rows.Select(r => r.Quantization?.SourceBytes).FirstOrDefault(b => b is not null) ?? 0;

    private static string LoadAverage() => File.Exists("/proc/loadavg") ? "average " + string.Join(" ", File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "unknown";

    private static async Task<byte[]> OnnxAsync(StorageClients storage, string modelId) =>
        (await storage.Container(StorageNames.Containers.Models).GetBlobClient($"{modelId}/{ModelManifest.OnnxFile}").DownloadContentAsync()).Value.Content.ToArray();

    /// <summary>Session creation and the first batch, from the model's bytes and from ONNX Runtime's optimized-model file (written on a first load, read with optimizations off).</summary>
    private static async Task LoadTimesAsync(StorageClients storage, InferenceSettings settings, List<int[]> batch)
    {
        Console.WriteLine("| Model | load (session from model.onnx) | first batch | load from the optimized-model file | first batch |");
        Console.WriteLine("| --- | --- | --- | --- | --- |");
        foreach (var id in new[] { Fp32, Int8 })
        {
            var onnx = await OnnxAsync(storage, id);
            var cache = Path.Combine(Path.GetTempPath(), $"{id}-{Guid.NewGuid():n}.optimized.onnx");
            try
            {
                var plain = Enumerable.Range(0, 3).Select(i => LoadAndRun(settings, batch, o =>
                {
                    if (i == 0)
                    {
                        o.OptimizedModelFilePath = cache;
                    }
                }, o => new InferenceSession(onnx, o))).MinBy(t => t.Load);
                var cached = Enumerable.Range(0, 3).Select(_ => LoadAndRun(settings, batch, o => o.GraphOptimizationLevel = GraphOptimizationLevel.ORT_DISABLE_ALL, o => new InferenceSession(cache, o))).MinBy(t => t.Load);
                Console.WriteLine($"| {id} | {plain.Load:N0} ms | {plain.First:N0} ms | {cached.Load:N0} ms | {cached.First:N0} ms |");
            }
            finally
            {
                File.Delete(cache);
            }
        }
    }

    private static (double Load, double First) LoadAndRun(InferenceSettings settings, List<int[]> batch, Action<SessionOptions> configure, Func<SessionOptions, InferenceSession> open)
    {
        var (options, _) = ModelSessions.CreateOptions(settings);
        using (options)
        {
            // Saving an ORT_ENABLE_ALL graph warns that it is for this machine only: it is, it is a cache.
            options.LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR;
            configure(options);
            var clock = Stopwatch.StartNew();
            using var session = open(options);
            var load = clock.Elapsed.TotalMilliseconds;
            clock.Restart();
            RunOnce(session, batch);
            return (load, clock.Elapsed.TotalMilliseconds);
        }
    }

    private static void RunOnce(InferenceSession session, List<int[]> batch)
    {
        var sequence = batch.Max(r => r.Length);
        var ids = new long[batch.Count * sequence];
        var mask = new long[ids.Length];
        for (var r = 0; r < batch.Count; r++)
        {
            for (var t = 0; t < batch[r].Length; t++)
            {
                ids[r * sequence + t] = batch[r][t];
                mask[r * sequence + t] = 1;
            }
        }

        long[] shape = [batch.Count, sequence];
        using var idsValue = OrtValue.CreateTensorValueFromMemory(ids, shape);
        using var maskValue = OrtValue.CreateTensorValueFromMemory(mask, shape);
        using var typesValue = OrtValue.CreateTensorValueFromMemory(new long[ids.Length], shape);
        var inputs = new Dictionary<string, OrtValue> { [ModelGenerator.InputIds] = idsValue, [ModelGenerator.AttentionMask] = maskValue, [ModelGenerator.TokenTypeIds] = typesValue };
        using var runOptions = new RunOptions();
        using var results = session.Run(runOptions, inputs.Where(i => session.InputMetadata.ContainsKey(i.Key)).ToDictionary(), [ModelGenerator.Probabilities]);
    }

    /// <summary>ONNX Runtime's own profile of a model over some rows: kernel time per operator type, largest first.</summary>
    private static async Task<string> ProfileAsync(StorageClients storage, InferenceSettings settings, string modelId, List<int[]> rows)
    {
        var onnx = await OnnxAsync(storage, modelId);
        var (options, _) = ModelSessions.CreateOptions(settings);
        string path;
        using (options)
        {
            options.EnableProfiling = true;
            options.ProfileOutputPathPrefix = Path.Combine(Path.GetTempPath(), $"ort-profile-{modelId}-");
            using var session = new InferenceSession(onnx, options);
            foreach (var batch in rows.OrderBy(r => r.Length).Chunk(16))
            {
                RunOnce(session, [.. batch]);
            }

            path = session.EndProfiling();
        }

        var byOp = new Dictionary<string, double>();
        using (var profile = JsonDocument.Parse(await File.ReadAllTextAsync(path)))
        {
            foreach (var e in profile.RootElement.EnumerateArray())
            {
                if (e.GetProperty("cat").GetString() == "Node" && e.GetProperty("name").GetString()!.EndsWith("_kernel_time", StringComparison.Ordinal)
                    && e.TryGetProperty("args", out var args) && args.TryGetProperty("op_name", out var op))
                {
                    byOp[op.GetString()!] = byOp.GetValueOrDefault(op.GetString()!) + e.GetProperty("dur").GetDouble();
                }
            }
        }

        File.Delete(path);
        var total = byOp.Values.Sum();
        return $"{total / 1000:N0} ms in kernels: " + string.Join(", ", byOp.OrderByDescending(p => p.Value).Take(8).Select(p => $"{p.Key} {p.Value / total:P0}"));
    }
}
