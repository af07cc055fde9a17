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
    public required DateTimeOffset CreatedAt { get; init; }

    /// <summary>The pooling the model was trained with (<see cref="Pooling"/> and <see cref="Normalize"/>).</summary>
    [JsonIgnore]
    public Pooling SentencePooling => new(Pooling, Normalize);
}

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(ModelManifest))]
[JsonSerializable(typeof(List<ModelManifest>))]
public sealed partial class ModelJson : JsonSerializerContext;

/// <summary>A model folder that cannot be used; the message says what is missing or wrong.</summary>
public sealed class ModelRejectedException(string message) : Exception(message);
