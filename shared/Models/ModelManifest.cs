using System.Text.Json;
using System.Text.Json.Serialization;
using Pipeline.Preprocessing;

namespace Pipeline.Models;

public static class ModelTasks
{
    public const string Classification = "classification";
    public const string Embedding = "embedding";
}

/// <summary>What the model was made from: every step back to the data, for <c>pipeline lineage</c>.</summary>
public sealed record ModelLineage
{
    public string? DatasetId { get; set; }
    public string? PreparedId { get; set; }
    public string? BaseModel { get; set; }
    public string? Source { get; set; }
    public JsonElement? Hyperparameters { get; set; }
    public Dictionary<string, double>? Metrics { get; set; }
}

/// <summary>
/// <c>models/&lt;modelId&gt;/model.json</c>: what a model folder holds and how to run it. Written last, after
/// <c>model.onnx</c> and the tokenizer files; readers trust only folders that have one.
/// </summary>
public sealed record ModelManifest
{
    public const int CurrentSchemaVersion = 1;
    public const string FileName = "model.json";
    public const string OnnxFile = "model.onnx";

    public int SchemaVersion { get; set; } = CurrentSchemaVersion;
    public required string ModelId { get; init; }
    /// <summary><see cref="ModelTasks.Classification"/> or <see cref="ModelTasks.Embedding"/>.</summary>
    public required string Task { get; init; }
    /// <summary>Label names by output index (classification).</summary>
    public List<string> Labels { get; init; } = [];
    public required TokenizerSpec Tokenizer { get; init; }
    /// <summary>The graph's inputs, in the Hugging Face names (<c>input_ids</c>, <c>attention_mask</c>, <c>token_type_ids</c>).</summary>
    public required List<string> Inputs { get; init; }
    /// <summary>The output the stage reads: <c>probabilities</c>, <c>logits</c>, <c>sentence_embedding</c>, <c>last_hidden_state</c> or <c>token_embeddings</c>.</summary>
    public required string Output { get; init; }
    public required int MaxSequenceLength { get; init; }
    /// <summary>How token vectors (<c>last_hidden_state</c>, <c>token_embeddings</c>) become a sentence vector: <c>mean</c> (over the mask), <c>cls</c> or <c>max</c>.</summary>
    public string Pooling { get; init; } = Models.Pooling.Mean;
    /// <summary>L2-normalise the sentence vector (sentence-transformers models with a Normalize module). Default false.</summary>
    public bool Normalize { get; init; }
    public required long VocabularySize { get; init; }
    /// <summary>Path of the ONNX file inside the folder (<c>model.onnx</c> or <c>onnx/model.onnx</c>).</summary>
    public string OnnxPath { get; init; } = OnnxFile;
    public required ModelLineage Lineage { get; init; }
    /// <summary>Set on a quantized copy of another model (<c>pipeline models quantize</c>, <c>fineTune.quantize</c>): how, from what, and how well it agrees.</summary>
    public ModelQuantization? Quantization { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }

    /// <summary>The pooling the model was trained with (<see cref="Pooling"/> and <see cref="Normalize"/>).</summary>
    [JsonIgnore]
    public Pooling SentencePooling => new(Pooling, Normalize);
}

/// <summary>How a model folder was quantized from its source, and what that cost on the source's validation split.</summary>
public sealed record ModelQuantization
{
    public int SchemaVersion { get; set; } = 1;
    /// <summary><c>dynamic-int8</c>: int8 weights, activations quantized at run time.</summary>
    public required string Scheme { get; init; }
    public required string Weights { get; init; }
    public required string Activations { get; init; }
    /// <summary>The MatMul and Gemm nodes whose weights are int8, by their names in the source graph.</summary>
    public required List<string> QuantizedNodes { get; init; }
    /// <summary>MatMul nodes kept fp32: both operands are activations (attention scores and context).</summary>
    public required List<string> FloatMatMuls { get; init; }
    public required string SourceModel { get; init; }
    /// <summary>The source's <c>model.json</c> <c>createdAt</c>: which registration of the source id was quantized.</summary>
    public required DateTimeOffset SourceCreatedAt { get; init; }
    public required long SourceBytes { get; init; }
    public required long QuantizedBytes { get; init; }
    public required QuantizationAgreement Agreement { get; init; }
}

/// <summary>
/// The quantized model against its source, row by row on a validation split: accuracy of both and the rows whose
/// predicted label changed (classification), the cosine similarity of their vectors (embeddings: the pooled
/// sentence vectors; classification: the probability vectors).
/// </summary>
public sealed record QuantizationAgreement
{
    /// <summary>The prepared dataset whose validation split was scored (<c>datasets/.../manifest.json</c>).</summary>
    public required string PreparedManifest { get; init; }
    public required int Rows { get; init; }
    public double? SourceAccuracy { get; init; }
    public double? QuantizedAccuracy { get; init; }
    /// <summary>100 x (quantized - source accuracy).</summary>
    public double? AccuracyPoints { get; init; }
    public double? LabelChangedFraction { get; init; }
    public required double MeanCosine { get; init; }
    public required double MinCosine { get; init; }
}

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(ModelManifest))]
[JsonSerializable(typeof(List<ModelManifest>))]
public sealed partial class ModelJson : JsonSerializerContext;
