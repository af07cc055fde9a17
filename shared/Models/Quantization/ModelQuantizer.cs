using Azure;
using Google.Protobuf;
using Pipeline.Inference;
using Pipeline.Models.Onnx.Proto;
using Pipeline.Preprocessing;
using Pipeline.Storage;

namespace Pipeline.Models.Quantization;

/// <summary>
/// Makes an int8 model folder from a registered fp32 one (<see cref="Int8Quantizer"/>): scores the source's
/// validation split with both graphs in ONNX Runtime, records how well they agree in <c>model.json</c>'s
/// <c>quantization</c>, and writes an ordinary model folder (graph, tokenizer files, <c>model.json</c> last)
/// that the inference stage runs unchanged.
/// </summary>
public sealed class ModelQuantizer(StorageClients storage, InferenceSettings settings)
{
    public const string DefaultSuffix = "-int8";

    /// <summary>
    /// Quantizes <paramref name="sourceId"/> into <paramref name="outputId"/> (default: the source id + <c>-int8</c>).
    /// The agreement is measured on <paramref name="preparedManifest"/>'s validation split, by default the prepared
    /// dataset the source was trained on (its lineage).
    /// </summary>
    /// <exception cref="QuantizationRejectedException">The model does not exist, cannot be quantized, or has no validation data to measure on.</exception>
    public async Task<ModelManifest> QuantizeAsync(string sourceId, string? outputId, string? preparedManifest, QuantizationOptions? options, CancellationToken cancellationToken)
    {
        var models = storage.Container(StorageNames.Containers.Models);
        var source = await BlobJson.ReadAsync(models.GetBlobClient($"{sourceId}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, cancellationToken)
            ?? throw new QuantizationRejectedException(QuantizationErrorCodes.ModelNotFound, $"Model '{sourceId}' is not registered (models/{sourceId}/model.json does not exist). List models with `pipeline models`.");
        if (source.Quantization is { } done)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.AlreadyQuantized, $"Model '{sourceId}' is already an int8 copy of '{done.SourceModel}'. Quantize '{done.SourceModel}' instead.");
        }

        // The int8 copy never replaces its source, nor a model that is not an int8 copy of this source.
        var target = outputId ?? sourceId + DefaultSuffix;
        if (target == sourceId)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.OutputTaken, $"The int8 copy cannot replace its source '{sourceId}': choose another --output-model (default '{sourceId}{DefaultSuffix}').");
        }

        if (await BlobJson.ReadAsync(models.GetBlobClient($"{target}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, cancellationToken) is { } existing
            && existing.Quantization?.SourceModel != sourceId)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.OutputTaken, $"Model '{target}' is registered already and is not an int8 copy of '{sourceId}': choose another --output-model, or remove models/{target}/ first.");
        }

        var folder = source.Tokenizer.Files?.TrimEnd('/') is { Length: > 0 } files && files.StartsWith($"{StorageNames.Containers.Models}/", StringComparison.Ordinal)
            ? files[(StorageNames.Containers.Models.Length + 1)..]
            : sourceId;
        byte[] onnx;
        try
        {
            onnx = (await models.GetBlobClient($"{folder}/{source.OnnxPath}").DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.ModelNotFound, $"Model '{sourceId}' has a model.json but no models/{folder}/{source.OnnxPath}.");
        }

        Int8Quantizer.EnsureQuantizable(ModelProto.Parser.ParseFrom(onnx));
        var path = preparedManifest
            ?? (source.Lineage is { DatasetId: { } datasetId, PreparedId: { } preparedId } ? $"{StorageNames.Containers.Datasets}/{PreparedPaths.Folder(datasetId, preparedId)}manifest.json" : null)
            ?? throw new QuantizationRejectedException(QuantizationErrorCodes.NoValidationData,
                $"Model '{sourceId}' was not trained on a prepared dataset here, so there is no validation split to measure the int8 copy on. Pass --validation datasets/<datasetId>/prepared/<preparedId>/manifest.json (a dataset prepared with this model's tokenizer).");
        var prepared = (storage.BlobAt(path) is { } blob ? await BlobJson.ReadAsync(blob, PreprocessJson.Default.PreparedManifest, cancellationToken) : null)
            ?? throw new QuantizationRejectedException(QuantizationErrorCodes.NoValidationData, $"The prepared dataset {path} does not exist. Name a prepared manifest (datasets/<datasetId>/prepared/<preparedId>/manifest.json).");
        var tokenizer = await TokenizerSource.LoadAsync(storage, source.Tokenizer, cancellationToken);
        if (tokenizer.Fingerprint != prepared.TokenizerFingerprint)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.TokenizerMismatch,
                $"The prepared dataset {path} was tokenized with another tokenizer than model '{sourceId}' reads; its token ids mean other words to this model. Prepare the data with the model's tokenizer ({source.Tokenizer.Kind} {source.Tokenizer.Files ?? source.Tokenizer.Encoding}).");
        }

        // An embedding model needs no labels: every validation record is a row.
        var rows = await PreparedSplits.ReadAsync(storage, prepared, "validation", source.Task == ModelTasks.Classification ? source.Labels.Count : null, cancellationToken);
        if (rows.Count == 0)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.NoValidationData,
                $"The prepared dataset {path} has no labelled validation rows to measure on. Prepare it with a validationFraction above 0 (and labels for a classifier).");
        }

        return await QuantizeAsync(source, onnx, tokenizer, outputId ?? sourceId + DefaultSuffix, rows, path, options, cancellationToken);
    }

    /// <summary>Quantizes a model whose graph and validation rows are at hand (the trainer's, right after training) and writes the int8 folder.</summary>
    public async Task<ModelManifest> QuantizeAsync(ModelManifest source, byte[] onnx, TokenizerSource tokenizer, string outputId, LabelledRows validation, string preparedManifest,
        QuantizationOptions? options, CancellationToken cancellationToken)
    {
        options ??= new QuantizationOptions();
        if (validation.Count == 0)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.NoValidationData, $"{preparedManifest} has no validation rows to measure the int8 copy of '{source.ModelId}' on. Prepare the data with a validationFraction above 0.");
        }

        var quantized = Int8Quantizer.Quantize(ModelProto.Parser.ParseFrom(onnx), options);
        var bytes = quantized.Model.ToByteArray();
        var agreement = await MeasureAsync(source, onnx, bytes, tokenizer, validation, preparedManifest, cancellationToken);
        var record = new ModelQuantization
        {
            Scheme = Int8Quantizer.Scheme,
            Weights = options.Describe(),
            Activations = "uint8 asymmetric, per tensor, computed at run time (DynamicQuantizeLinear)",
            QuantizedNodes = quantized.QuantizedNodes,
            FloatMatMuls = quantized.FloatMatMuls,
            SourceModel = source.ModelId,
            SourceCreatedAt = source.CreatedAt,
            SourceBytes = onnx.Length,
            QuantizedBytes = bytes.Length,
            Agreement = agreement,
        };
        var files = await new ModelRegistry(storage).ReadTokenizerFilesAsync(source.Tokenizer, cancellationToken);
        var lineage = source.Lineage with { Source = $"{StorageNames.Containers.Models}/{source.ModelId}/", Metrics = Metrics(agreement) };
        return await new ModelRegistry(storage).WriteAsync(outputId, quantized.Model, source.Tokenizer, files, source.VocabularySize, source.Task, source.Labels, source.MaxSequenceLength,
            lineage, cancellationToken, m => m with { Pooling = source.Pooling, Normalize = source.Normalize, Quantization = record });
    }

    /// <summary>The agreement as lineage metrics (what <c>pipeline models</c> and the run show).</summary>
    private static Dictionary<string, double> Metrics(QuantizationAgreement a)
    {
        var metrics = new Dictionary<string, double> { ["int8MeanCosine"] = a.MeanCosine };
        if (a.QuantizedAccuracy is { } accuracy)
        {
            metrics["validationAccuracy"] = accuracy;
            metrics["int8AccuracyPoints"] = a.AccuracyPoints!.Value;
            metrics["int8LabelChangedFraction"] = a.LabelChangedFraction!.Value;
        }

        return metrics;
    }

    /// <summary>Scores the rows with both graphs (the stage's batching and pooling) and compares them row by row.</summary>
    private async Task<QuantizationAgreement> MeasureAsync(ModelManifest manifest, byte[] source, byte[] quantized, TokenizerSource tokenizer, LabelledRows rows, string preparedManifest, CancellationToken cancellationToken)
    {
        var sourceRows = await ScoreAsync(manifest, source, tokenizer, rows.Tokens, cancellationToken);
        var quantizedRows = await ScoreAsync(manifest, quantized, tokenizer, rows.Tokens, cancellationToken);
        double cosineSum = 0, minCosine = 1;
        int sourceRight = 0, quantizedRight = 0, changed = 0;
        for (var i = 0; i < rows.Count; i++)
        {
            var (a, b) = (sourceRows[i], quantizedRows[i]);
            var cosine = Cosine(a, b);
            cosineSum += cosine;
            minCosine = Math.Min(minCosine, cosine);
            if (manifest.Task == ModelTasks.Classification)
            {
                var (pa, pb) = (ArgMax(a), ArgMax(b));
                sourceRight += pa == rows.Labels[i] ? 1 : 0;
                quantizedRight += pb == rows.Labels[i] ? 1 : 0;
                changed += pa != pb ? 1 : 0;
            }
        }

        var classification = manifest.Task == ModelTasks.Classification;
        double? Fraction(int count) => classification ? Math.Round((double)count / rows.Count, 6) : null;
        return new QuantizationAgreement
        {
            PreparedManifest = preparedManifest,
            Rows = rows.Count,
            SourceAccuracy = Fraction(sourceRight),
            QuantizedAccuracy = Fraction(quantizedRight),
            AccuracyPoints = classification ? Math.Round(100.0 * (quantizedRight - sourceRight) / rows.Count, 3) : null,
            LabelChangedFraction = Fraction(changed),
            MeanCosine = Math.Round(cosineSum / rows.Count, 6),
            MinCosine = Math.Round(minCosine, 6),
        };
    }

    private async Task<float[][]> ScoreAsync(ModelManifest manifest, byte[] onnx, TokenizerSource tokenizer, List<int[]> tokens, CancellationToken cancellationToken)
    {
        using var runtime = ModelSessions.FromGraph(onnx, manifest, tokenizer, settings);
        var (scored, _) = await new BatchScorer(runtime, settings, settings.MaxTokensPerBatch, normalize: false).ScoreTokensAsync(tokens, cancellationToken);
        return [.. scored.Select((r, i) => r.Values ?? throw new InvalidOperationException($"Validation row {i} could not be scored: {r.Error}"))];
    }

    private static double Cosine(float[] a, float[] b)
    {
        double dot = 0, na = 0, nb = 0;
        for (var i = 0; i < a.Length; i++)
        {
            dot += (double)a[i] * b[i];
            na += (double)a[i] * a[i];
            nb += (double)b[i] * b[i];
        }

        return na == 0 || nb == 0 ? (na == nb ? 1 : 0) : dot / Math.Sqrt(na * nb);
    }

    private static int ArgMax(float[] values)
    {
        var best = 0;
        for (var i = 1; i < values.Length; i++)
        {
            best = values[i] > values[best] ? i : best;
        }

        return best;
    }
}
