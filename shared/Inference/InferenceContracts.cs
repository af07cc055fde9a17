using System.Text.Json.Serialization;

namespace Pipeline.Inference;

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

/// <summary>
/// <c>outputs/&lt;batchId&gt;/manifest.json</c>: the commit of a batch, written once after every output; and, for each
/// <c>retry-failed</c> merged into it, <c>outputs/&lt;batchId&gt;/versions/NNNNN/manifest.json</c>, the commit of that version.
/// </summary>
public sealed record InferenceManifest
{
    public int SchemaVersion { get; set; } = 1;
    public required string BatchId { get; init; }
    /// <summary>The batch's version: 1 when first assembled, one more for each <c>retry-failed</c> merged in. The newest committed version is the batch's result.</summary>
    public int Version { get; init; } = 1;
    /// <summary>The version this one supersedes (its files stay as they were committed); null for version 1.</summary>
    public int? Supersedes { get; init; }
    /// <summary>From version 2 on: the version whose <c>shards/NNNNN/</c> files and done marker hold each shard changed since version 1.</summary>
    public Dictionary<int, int>? ShardVersions { get; init; }
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
