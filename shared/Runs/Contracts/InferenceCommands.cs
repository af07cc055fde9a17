using System.Text.Json.Serialization;
using Pipeline.Runs;

namespace Pipeline.Inference;

/// <summary>How a batch is cut and scored; every field has a documented default (see the README).</summary>
public sealed record InferenceOptions
{
    /// <summary>Rows per shard: one <c>inference-shard</c> message each (default 5,000).</summary>
    public int? RowsPerShard { get; init; }
    /// <summary>The text field (JSONL) or column (CSV/TSV); default: the first of ingestion's text aliases.</summary>
    public string? TextField { get; init; }
    /// <summary>The id field or column; default: <c>custom_id</c>, <c>id</c>, <c>uid</c>, <c>key</c>.</summary>
    public string? IdField { get; init; }
    /// <summary>Embeddings: L2-normalize each vector (default: as the model was trained, model.json's <c>normalize</c>).</summary>
    public bool? Normalize { get; init; }
    /// <summary>Upper bound of a dynamic batch in tokens, padding included (default from configuration).</summary>
    public int? MaxTokensPerBatch { get; init; }

    public const int DefaultRowsPerShard = 5_000;

    public InferenceOptions Resolved(int defaultMaxTokensPerBatch) => new()
    {
        RowsPerShard = RowsPerShard ?? DefaultRowsPerShard,
        TextField = TextField,
        IdField = IdField,
        Normalize = Normalize,
        MaxTokensPerBatch = MaxTokensPerBatch ?? defaultMaxTokensPerBatch,
    };

    /// <summary>Throws <see cref="InferenceRejectedException"/> for values that cannot work.</summary>
    public void Validate()
    {
        if (RowsPerShard is < 1 or > 1_000_000)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.InvalidOptions, $"options.rowsPerShard is {RowsPerShard}; use 1 to 1,000,000 (default {DefaultRowsPerShard}).");
        }

        if (MaxTokensPerBatch is < 16 or > 1_000_000)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.InvalidOptions, $"options.maxTokensPerBatch is {MaxTokensPerBatch}; use 16 to 1,000,000.");
        }
    }
}

/// <summary>
/// Body of an <c>inference</c> message and of the <c>infer</c> command: score <see cref="Input"/>
/// (<c>container/blob</c>, JSONL or CSV/TSV or text) with a registered model.
/// </summary>
public sealed record InferenceRequest(string ModelId, string Input, InferenceOptions? Options = null);

/// <summary>Body of the <c>retry-failed</c> command: rescore only the failed rows of a finished batch.</summary>
public sealed record RetryFailedCommand(string BatchId);

/// <summary>Body of an <c>inference-shard</c> message: one shard of a batch.</summary>
public sealed record InferenceShardRequest(string BatchId, int Shard);

public static class InferenceErrorCodes
{
    public const string ModelNotFound = "ModelNotFound";
    public const string ModelCorrupt = "ModelCorrupt";
    public const string TokenizerMismatch = "TokenizerMismatch";
    public const string InputNotFound = "InputNotFound";
    public const string EmptyInput = "EmptyInput";
    public const string NoTextField = "NoTextField";
    public const string UnsupportedFormat = "UnsupportedFormat";
    public const string InvalidOptions = "InvalidOptions";
    public const string BatchNotFound = "BatchNotFound";
    public const string NothingToRetry = "NothingToRetry";
    public const string ModelChanged = "ModelChanged";
    public const string DuplicateCustomId = "DuplicateCustomId";
}

/// <summary>A batch that can never succeed as asked: the run fails with <see cref="Code"/> and the message.</summary>
public sealed class InferenceRejectedException(string code, string message) : StageRejectedException(code, message);

/// <summary>Row-level error codes in <c>errors.jsonl</c> (besides ingestion's parse codes).</summary>
public static class RowErrorCodes
{
    public const string TextMissing = "text_missing";
    public const string ModelError = "model_error";
    public const string TokenizerError = "tokenizer_error";
}

[JsonSourceGenerationOptions(System.Text.Json.JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(InferenceRequest))]
[JsonSerializable(typeof(RetryFailedCommand))]
[JsonSerializable(typeof(InferenceShardRequest))]
public sealed partial class InferenceCommandJson : JsonSerializerContext;
