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

    public InferenceOptions Resolved(InferenceSettings settings) => new()
    {
        RowsPerShard = RowsPerShard ?? DefaultRowsPerShard,
        TextField = TextField,
        IdField = IdField,
        Normalize = Normalize,
        MaxTokensPerBatch = MaxTokensPerBatch ?? settings.MaxTokensPerBatch,
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

/// <summary>One shard of a batch: rows <c>[FirstRow, FirstRow + Rows)</c> of the input.</summary>
public sealed record ShardPlan(int Shard, long FirstRow, int Rows);

/// <summary>
/// <c>outputs/&lt;batchId&gt;/shards/NNNNN/plan.json</c> (one per shard, written before its message) and,
/// for the batch, <c>outputs/&lt;batchId&gt;/plan.json</c> once the input is fully split.
/// </summary>
public sealed record BatchPlan
{
    public int SchemaVersion { get; set; } = 1;
    public required string BatchId { get; init; }
    public required string RunId { get; init; }
    public required string ModelId { get; init; }
    /// <summary>The model version the batch was cut for (its model.json createdAt): every shard is scored by that version.</summary>
    public DateTimeOffset? ModelVersion { get; init; }
    public required string Input { get; init; }
    public required InferenceOptions Options { get; init; }
    public List<ShardPlan> Shards { get; init; } = [];
    public long Rows { get; init; }
    /// <summary>For a <c>retry-failed</c> batch: the batch whose results it merges into.</summary>
    public string? RetryOf { get; init; }
    /// <summary>Requests, when the input is in OpenAI's batch format (its output is then written in that format too).</summary>
    public long? OpenAiRequests { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
}

/// <summary>A row of a shard's input (<c>shards/NNNNN/input.jsonl</c>): text to score, or why the row cannot be scored.</summary>
public sealed record ShardInputRow
{
    public long Row { get; init; }
    [JsonPropertyName("custom_id")]
    public string? CustomId { get; init; }
    public string? Text { get; init; }
    public long Line { get; init; }
    public string? Code { get; init; }
    public string? Error { get; init; }
    /// <summary>Attempts the row had before this batch (a retry carries them over).</summary>
    public int PriorAttempts { get; init; }
    /// <summary>The request the row belongs to, when the input is in OpenAI's batch format.</summary>
    public OpenAiRequestItem? OpenAi { get; init; }
}

/// <summary><c>shards/NNNNN/done.json</c>: written last for a shard; its presence means the shard is finished.</summary>
public sealed record ShardOutcome
{
    public required int Shard { get; init; }
    public required int Rows { get; init; }
    public required int Succeeded { get; init; }
    public required int Failed { get; init; }
    /// <summary>Real tokens fed to the model.</summary>
    public required long Tokens { get; init; }
    /// <summary>Token slots fed, padding included.</summary>
    public required long Slots { get; init; }
    public required int Batches { get; init; }
    public required double TokenizeMs { get; init; }
    public required double InferenceMs { get; init; }
    public required double WallMs { get; init; }
    public required string ExecutionProvider { get; init; }
    public required int Attempt { get; init; }
    public Dictionary<string, long> ErrorCodes { get; init; } = [];
    public Dictionary<string, string> ErrorSamples { get; init; } = [];
    /// <summary>OpenAI-format requests of the shard, and how many have a failed item.</summary>
    public int? OpenAiRequests { get; init; }
    public int? OpenAiFailed { get; init; }
    public required DateTimeOffset FinishedAt { get; init; }
}

public static class BatchStatus
{
    public const string Completed = "completed";
    public const string CompletedWithFailures = "completed_with_failures";
}

/// <summary><c>outputs/&lt;batchId&gt;/manifest.json</c>: the commit of a batch, written after every output.</summary>
public sealed record InferenceManifest
{
    public int SchemaVersion { get; set; } = 1;
    public required string BatchId { get; init; }
    public required string RunId { get; init; }
    /// <summary><see cref="BatchStatus"/>.</summary>
    public required string Status { get; init; }
    public required string ModelId { get; init; }
    public required string Task { get; init; }
    public required string Input { get; init; }
    public required InferenceOptions Options { get; init; }
    public required long Rows { get; init; }
    public required long Succeeded { get; init; }
    public required long Failed { get; init; }
    /// <summary>The most common row error and how many rows had it, when some failed.</summary>
    public string? TopError { get; init; }
    public Dictionary<string, long> ErrorCodes { get; init; } = [];
    public required int Shards { get; init; }
    public required long Tokens { get; init; }
    public required double PaddingFraction { get; init; }
    /// <summary>Rows per second of the whole batch, from its start to its manifest.</summary>
    public required double RowsPerSecond { get; init; }
    public required double TokensPerSecond { get; init; }
    /// <summary>Rows per second of model time alone (sum over shards).</summary>
    public required double ModelRowsPerSecond { get; init; }
    public required string ExecutionProvider { get; init; }
    public required Dictionary<string, double> TimingsMs { get; init; }
    public required string Results { get; init; }
    public required string Errors { get; init; }
    public required string Ledger { get; init; }
    /// <summary>The <c>retry-failed</c> batches merged into this one, oldest first.</summary>
    public List<string> Retries { get; init; } = [];
    /// <summary>For an input in OpenAI's batch format: its requests, how many failed, and the output and error files in that format.</summary>
    public long? OpenAiRequests { get; init; }
    public long? OpenAiFailed { get; init; }
    public string? OpenAiOutput { get; init; }
    public string? OpenAiErrors { get; init; }
    public required DateTimeOffset StartedAt { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
}

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

/// <summary>Row-level error codes in <c>errors.jsonl</c> (besides ingestion's parse codes).</summary>
public static class RowErrorCodes
{
    public const string TextMissing = "text_missing";
    public const string ModelError = "model_error";
    public const string TokenizerError = "tokenizer_error";
}

/// <summary>A batch that can never succeed as asked: the run fails with <see cref="Code"/> and the message.</summary>
public sealed class InferenceRejectedException(string code, string message) : StageRejectedException(code, message);

[JsonSourceGenerationOptions(System.Text.Json.JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(InferenceRequest))]
[JsonSerializable(typeof(RetryFailedCommand))]
[JsonSerializable(typeof(InferenceShardRequest))]
[JsonSerializable(typeof(BatchPlan))]
[JsonSerializable(typeof(ShardInputRow))]
[JsonSerializable(typeof(ShardOutcome))]
[JsonSerializable(typeof(InferenceManifest))]
[JsonSerializable(typeof(List<InferenceManifest>))]
public sealed partial class InferenceJson : JsonSerializerContext;
