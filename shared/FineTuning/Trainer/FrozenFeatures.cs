using System.Diagnostics;
using System.Runtime.InteropServices;
using Azure;
using Google.Protobuf;
using Pipeline.Inference;
using Pipeline.Models;
using Pipeline.Models.Onnx.Proto;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.FineTuning.Trainer;

/// <summary>A frozen encoder's pooled features of a prepared dataset's splits, and what getting them cost.</summary>
public sealed record FeatureSet(List<float[]> Train, List<float[]> Validation, bool CacheHit, double Seconds, string Blob)
{
    public int Hidden => Train.Count > 0 ? Train[0].Length : Validation.Count > 0 ? Validation[0].Length : 0;
}

/// <summary>
/// A frozen encoder's features, computed once per (base model version, pooling, prepared dataset) with the
/// inference stage's batching (length-sorted dynamic batches) on <see cref="EncoderHead.Features"/> (the graph the
/// fine-tuned model ships with), and cached in
/// <c>datasets/&lt;datasetId&gt;/prepared/&lt;preparedId&gt;/features/&lt;key&gt;.bin</c>: a second fine-tune of the
/// same data with other hyperparameters reads them instead of running the encoder again. The blob is written in
/// one upload, so a reader finds it whole or not at all.
/// </summary>
public sealed class FrozenFeatures(StorageClients storage, InferenceSettings settings)
{
    private const uint Magic = 0x31465450; // "PTF1"

    public static string Key(string baseModel, DateTimeOffset baseCreatedAt, Pooling pooling, int maxSequenceLength) =>
        RunIds.Hash($"{baseModel}@{baseCreatedAt:O}|{pooling}|{maxSequenceLength}", 24);

    public async Task<FeatureSet> GetAsync(JobSpec spec, ModelManifest baseManifest, ModelProto baseModel, Pooling pooling, List<int[]> train, List<int[]> validation, CancellationToken cancellationToken)
    {
        var path = $"{PreparedPaths.Folder(spec.DatasetId, spec.PreparedId)}features/{Key(spec.BaseModel, baseManifest.CreatedAt, pooling, baseManifest.MaxSequenceLength)}.bin";
        var blob = storage.Container(StorageNames.Containers.Datasets).GetBlobClient(path);
        var location = $"{StorageNames.Containers.Datasets}/{path}";
        var clock = Stopwatch.StartNew();
        try
        {
            var cached = (await blob.DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
            if (Read(cached, train.Count, validation.Count) is { } hit)
            {
                return new FeatureSet(hit.Train, hit.Validation, CacheHit: true, clock.Elapsed.TotalSeconds, location);
            }
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
        }

        var tokenizer = await TokenizerSource.LoadAsync(storage, baseManifest.Tokenizer, cancellationToken);
        var graph = EncoderHead.Features(baseModel, pooling).ToByteArray();
        var manifest = baseManifest with { Task = ModelTasks.Embedding, Output = EncoderHead.FeaturesOutput };
        using var runtime = ModelSessions.FromGraph(graph, manifest, tokenizer, settings);
        var scorer = new BatchScorer(runtime, settings, Math.Max(settings.MaxTokensPerBatch, 2048), normalize: false);
        var trainFeatures = await ScoreAsync(scorer, train, "training", cancellationToken);
        var validationFeatures = await ScoreAsync(scorer, validation, "validation", cancellationToken);
        await blob.UploadAsync(new BinaryData(Write(trainFeatures, validationFeatures)), overwrite: true, cancellationToken);
        return new FeatureSet(trainFeatures, validationFeatures, CacheHit: false, clock.Elapsed.TotalSeconds, location);
    }

    private static async Task<List<float[]>> ScoreAsync(BatchScorer scorer, List<int[]> tokens, string split, CancellationToken cancellationToken)
    {
        var (rows, _) = await scorer.ScoreTokensAsync(tokens, cancellationToken);
        return [.. rows.Select((r, i) => r.Values ?? throw new InvalidOperationException($"The base model failed on {split} example {i}: {r.Error}"))];
    }

    /// <summary>Header (magic, train rows, validation rows, width), then the vectors as little-endian float32.</summary>
    private static byte[] Write(List<float[]> train, List<float[]> validation)
    {
        var hidden = train.Concat(validation).FirstOrDefault()?.Length ?? 0;
        var bytes = new byte[16 + ((long)(train.Count + validation.Count) * hidden * sizeof(float))];
        var header = MemoryMarshal.Cast<byte, uint>(bytes.AsSpan(0, 16));
        header[0] = Magic;
        header[1] = (uint)train.Count;
        header[2] = (uint)validation.Count;
        header[3] = (uint)hidden;
        var offset = 16;
        foreach (var vector in train.Concat(validation))
        {
            MemoryMarshal.AsBytes(vector.AsSpan()).CopyTo(bytes.AsSpan(offset));
            offset += hidden * sizeof(float);
        }

        return bytes;
    }

    /// <summary>The cached vectors, or null when the blob is not for these splits (then they are computed again).</summary>
    private static (List<float[]> Train, List<float[]> Validation)? Read(byte[] bytes, int trainCount, int validationCount)
    {
        if (bytes.Length < 16)
        {
            return null;
        }

        var header = MemoryMarshal.Cast<byte, uint>(bytes.AsSpan(0, 16));
        var hidden = (int)header[3];
        if (header[0] != Magic || header[1] != trainCount || header[2] != validationCount || bytes.Length != 16 + ((long)(trainCount + validationCount) * hidden * sizeof(float)))
        {
            return null;
        }

        var vectors = new List<float[]>(trainCount + validationCount);
        for (var i = 0; i < trainCount + validationCount; i++)
        {
            vectors.Add(MemoryMarshal.Cast<byte, float>(bytes.AsSpan(16 + (i * hidden * sizeof(float)), hidden * sizeof(float))).ToArray());
        }

        return (vectors[..trainCount], vectors[trainCount..]);
    }
}
