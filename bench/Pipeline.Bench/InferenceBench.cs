using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.ML.OnnxRuntime;
using Pipeline.Hosting;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Testing;

namespace Pipeline.Bench;

/// <summary>
/// Batch inference rows per second on a classifier: a generated encoder with the shape of all-MiniLM-L6-v2
/// plus a head, or (<c>real</c>) the real pretrained all-MiniLM-L6-v2 export from the starter package with
/// a head merged the way the trainer merges it (mean pooling, L2 normalisation). One ONNX Runtime call per
/// row (naive), batches of 32 in input order, the stage as users run it (blob in, results out, through the
/// real handlers and queues), and the limit: ONNX Runtime alone on pre-tokenized, length-sorted batches in
/// memory. All in one process, one session.
/// </summary>
public static class InferenceBench
{
    private const string ModelId = "bench-minilm-classifier";

    public static async Task RunAsync(int rows, bool real = false)
    {
        using var azurite = new AzuriteServer();
        await azurite.StartAsync();
        using var services = BenchServices.Create(azurite);
        var storage = services.GetRequiredService<StorageClients>();
        await storage.EnsureCreatedAsync();

        var shape = EncoderShape.MiniLm;
        var weights = new ModelGenerator.Weights(17, 0.05f);
        Pipeline.Models.Onnx.Proto.ModelProto model;
        byte[] vocabulary;
        string description;
        if (real)
        {
            var files = StarterModel.Files(StarterModel.LocatePackage(null, typeof(InferenceBench).Assembly));
            model = EncoderHead.Classifier(Pipeline.Models.Onnx.Proto.ModelProto.Parser.ParseFrom(files["model.onnx"]), new Pooling(Pooling.Mean, Normalize: true), weights.Normal(2 * shape.Hidden), [0f, 0f], 2);
            vocabulary = files["vocab.txt"];
            description = $"the real pretrained all-MiniLM-L6-v2 ({StarterModel.Citation}) + mean pooling, L2 norm and a classification head, merged as the trainer merges it";
        }
        else
        {
            model = ModelGenerator.WithClassificationHead(ModelGenerator.Bert(shape, 3), weights.Normal(2 * shape.Hidden), [0f, 0f], 2);
            vocabulary = File.ReadAllBytes(Path.Combine(SharedData, "tokenizers", "bert-base-uncased", "vocab.txt"));
            description = "a generated encoder of all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, vocabulary 30,522) + classification head";
        }

        await new ModelRegistry(storage).WriteAsync(ModelId, model, vocabulary, ModelTasks.Classification, ["negative", "positive"], 128, new ModelLineage { BaseModel = real ? StarterModel.ModelId : "generated:minilm-shape" }, CancellationToken.None);
        var sessions = services.GetRequiredService<ModelSessions>();
        var runtime = await sessions.GetAsync(ModelId, CancellationToken.None);

        var sentences = Directory.GetFiles(Path.Combine(SharedData, "sentiment"), "*_labelled.txt").Order().SelectMany(File.ReadLines).Select(l => l.Split('\t')[0]).ToList();
        var texts = Enumerable.Range(0, rows).Select(i => sentences[i % sentences.Count]).ToList();
        var tokenizer = runtime.RentTokenizer();
        var tokenized = texts.Select(t => tokenizer.Encode(t, []).ToArray()).ToList();
        var realTokens = tokenized.Sum(t => (long)t.Length);
        Console.WriteLine($"Inference benchmark: {rows:N0} sentences from ../shared/data/sentiment ({(double)realTokens / rows:N1} tokens per row with [CLS]/[SEP]),");
        Console.WriteLine($"{description},");
        Console.WriteLine($"ONNX Runtime {OrtEnv.Instance().GetVersionString()}, {runtime.ExecutionProvider}, {Environment.ProcessorCount} intra-op threads.");
        Console.WriteLine();

        // Warm-up: first calls allocate arenas and pick kernels.
        RunBatches(runtime, [.. tokenized.Take(256)], 16, sorted: true);

        var naiveRows = Math.Min(rows, 5_000);
        var naive = Time(() => RunBatches(runtime, [.. texts.Take(naiveRows).Select(t => tokenizer.Encode(t, []).ToArray())], 1, sorted: false));
        var inputOrder = Time(() => RunBatches(runtime, tokenized, 32, sorted: false));
        var limits = new[] { 8, 16, 32 }.Select(size => (Size: size, Result: Time(() => RunBatches(runtime, tokenized, size, sorted: true)))).ToList();
        var limit = limits.MinBy(l => l.Result.Seconds);
        runtime.ReturnTokenizer(tokenizer);

        var stage = await StageAsync(services, storage, texts, repetitions: 2);

        var limitRate = rows / limit.Result.Seconds;
        Console.WriteLine("| How | rows/s | tokens/s | padding | ratio to the limit |");
        Console.WriteLine("| --- | --- | --- | --- | --- |");
        void Row(string how, double rate, double tokensPerSecond, double padding) =>
            Console.WriteLine($"| {how} | {rate:N0} | {tokensPerSecond:N0} | {padding:P1} | {rate / limitRate:P0} |");
        Row($"naive: one ONNX Runtime call per row (first {naiveRows:N0} rows)", naiveRows / naive.Seconds, naive.Tokens / naive.Seconds, 0);
        Row("batches of 32 in input order", rows / inputOrder.Seconds, inputOrder.Tokens / inputOrder.Seconds, inputOrder.Padding);
        Row("**the stage**, blob in to results out (best of 2)", rows / stage.Seconds, stage.Tokens / stage.Seconds, stage.Padding);
        Row($"limit: ONNX Runtime alone, pre-tokenized, sorted by length, batches of {limit.Size}, in memory", limitRate, limit.Result.Tokens / limit.Result.Seconds, limit.Result.Padding);
        Console.WriteLine();
        Console.WriteLine($"Stage / naive: {rows / stage.Seconds / (naiveRows / naive.Seconds):N2}x; stage / limit: {rows / stage.Seconds / limitRate:P0}. " +
            $"Other batch sizes for the limit: {string.Join(", ", limits.Select(l => $"{l.Size}: {rows / l.Result.Seconds:N0} rows/s"))}.");
    }

    internal static string SharedData => Path.GetFullPath(Path.Combine(AzuriteServer.RepoRoot, "..", "shared", "data"));

    internal readonly record struct Timing(double Seconds, long Tokens, double Padding);

    internal static Timing Time(Func<(long Tokens, long Slots)> run)
    {
        var clock = Stopwatch.StartNew();
        var (tokens, slots) = run();
        return new Timing(clock.Elapsed.TotalSeconds, tokens, 1 - (double)tokens / slots);
    }

    /// <summary>ONNX Runtime alone over token ids, in batches of <paramref name="size"/> (optionally sorted by length).</summary>
    internal static (long Tokens, long Slots) RunBatches(ModelRuntime runtime, List<int[]> rows, int size, bool sorted)
    {
        var order = sorted ? [.. rows.OrderBy(r => r.Length)] : rows;
        long tokens = 0, slots = 0;
        string[] outputs = [runtime.Manifest.Output];
        for (var start = 0; start < order.Count; start += size)
        {
            var batch = order.Skip(start).Take(size).ToList();
            var sequence = batch.Max(r => r.Length);
            var ids = new long[batch.Count * sequence];
            var mask = new long[batch.Count * sequence];
            var types = new long[batch.Count * sequence];
            for (var r = 0; r < batch.Count; r++)
            {
                for (var t = 0; t < batch[r].Length; t++)
                {
                    ids[r * sequence + t] = batch[r][t];
                    mask[r * sequence + t] = 1;
                }

                tokens += batch[r].Length;
            }

            slots += ids.Length;
            long[] shape = [batch.Count, sequence];
            using var idsValue = OrtValue.CreateTensorValueFromMemory(ids, shape);
            using var maskValue = OrtValue.CreateTensorValueFromMemory(mask, shape);
            using var typesValue = OrtValue.CreateTensorValueFromMemory(types, shape);
            var inputs = new Dictionary<string, OrtValue> { ["input_ids"] = idsValue, ["attention_mask"] = maskValue, ["token_type_ids"] = typesValue };
            using var results = runtime.Session.Run(runtime.RunOptions, inputs, outputs);
        }

        return (tokens, slots);
    }

    /// <summary>The stage through its real handlers: an infer command, the shard messages delivered by two workers (a host's concurrency), assembly.</summary>
    internal static async Task<Timing> StageAsync(ServiceProvider services, StorageClients storage, List<string> texts, int repetitions, string modelId = ModelId)
    {
        var content = Encoding.UTF8.GetBytes(string.Concat(texts.Select((t, i) => JsonSerializer.Serialize(new Dictionary<string, string> { ["custom_id"] = $"row-{i}", ["text"] = t }) + "\n")));
        var router = services.GetRequiredService<CommandRouter>();
        var stages = services.GetRequiredService<StageMessages>();
        var best = new Timing(double.MaxValue, 0, 0);
        for (var attempt = 0; attempt < repetitions; attempt++)
        {
            // A new input name each time: a new batch id, so every repetition does the whole work.
            var input = $"bench-infer-{modelId}-{attempt}.jsonl";
            await storage.Container(StorageNames.Containers.Incoming).GetBlobClient(input).UploadAsync(new BinaryData(content), overwrite: true);
            var runId = $"bench-infer-{modelId}-{attempt}";
            var command = JsonSerializer.Serialize(new MessageEnvelope
            {
                Type = MessageTypes.Infer,
                RunId = runId,
                Body = JsonSerializer.SerializeToElement(new InferenceRequest(modelId, $"{StorageNames.Containers.Incoming}/{input}"), InferenceJson.Default.InferenceRequest),
            }, PipelineJson.Default.MessageEnvelope);

            var clock = Stopwatch.StartNew();
            var split = router.HandleAsync(command, 1, CancellationToken.None);
            var workers = Enumerable.Range(0, 2).Select(_ => DeliverShardsAsync(storage, stages, split)).ToList();
            await split;
            await Task.WhenAll(workers);
            var seconds = clock.Elapsed.TotalSeconds;
            var run = (await services.GetRequiredService<RunStore>().GetAsync(runId))!;
            var manifestPath = run.GetArtifacts()["inferenceManifest"]["outputs/".Length..];
            var manifest = (await BlobJson.ReadAsync(storage.Container(StorageNames.Containers.Outputs).GetBlobClient(manifestPath), InferenceJson.Default.InferenceManifest, CancellationToken.None))!;
            if (manifest.Succeeded != texts.Count)
            {
                throw new InvalidOperationException($"The stage scored {manifest.Succeeded} of {texts.Count} rows.");
            }

            best = seconds < best.Seconds ? new Timing(seconds, manifest.Tokens, manifest.PaddingFraction) : best;
        }

        return best;
    }

    private static async Task DeliverShardsAsync(StorageClients storage, StageMessages stages, Task split)
    {
        var queue = storage.Queue(StorageNames.Queues.InferenceShard);
        while (true)
        {
            var message = (await queue.ReceiveMessageAsync(TimeSpan.FromMinutes(5))).Value;
            if (message is null)
            {
                if (split.IsCompleted && (await queue.GetPropertiesAsync()).Value.ApproximateMessagesCount == 0)
                {
                    return;
                }

                await Task.Delay(20);
                continue;
            }

            await stages.InferenceShardAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
            await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
        }
    }
}
