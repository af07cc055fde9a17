using System.Text.Json;
using System.Text.Json.Serialization;
using Pipeline.Messaging;
using Pipeline.Runs;

namespace Pipeline.Preprocessing;

/// <summary>One shard file of token ids (JSON Lines, see the README's shard format).</summary>
public sealed record ShardInfo(string Split, string Path, long Records, long Tokens, string Sha256);

/// <summary>Records, tokens and labels of one split.</summary>
public sealed record SplitStats
{
    public long Records { get; set; }
    public long Tokens { get; set; }
    public Dictionary<string, long> Labels { get; set; } = [];
}

/// <summary>Sequence lengths in tokens (after truncation).</summary>
public sealed record LengthPercentiles(int P50, int P90, int P95, int P99, int Max, double Mean);

/// <summary>A removed duplicate and the record it duplicates (source line numbers, text excerpts).</summary>
public sealed record DuplicatePair(long KeptLine, long RemovedLine, double Similarity, string Kept, string Removed);

/// <summary><c>stats.json</c>: everything a user needs to know before paying for a fine-tune.</summary>
public sealed record PreparedStats
{
    public int SchemaVersion { get; set; } = 1;
    public long RecordsRead { get; set; }
    public SplitStats Train { get; set; } = new();
    public SplitStats Validation { get; set; } = new();
    public required LengthPercentiles Lengths { get; init; }
    public long Truncated { get; set; }
    public double TruncatedFraction { get; set; }
    public long ExactDuplicatesRemoved { get; set; }
    public long NearDuplicatesRemoved { get; set; }
    public List<DuplicatePair> DuplicateSamples { get; set; } = [];
    public Dictionary<string, long> Redactions { get; set; } = [];
    /// <summary>Records ingestion found invalid (listed in the dataset's errors.jsonl), carried here.</summary>
    public long IngestInvalidRecords { get; set; }
    public int Epochs { get; set; }
    public long EstimatedTrainingTokens { get; set; }
    public double EstimatedCost { get; set; }
    public double CostPerMillionTokens { get; set; }
    /// <summary>Packed blocks written instead of records (when packing is on).</summary>
    public long PackedBlocks { get; set; }
}

/// <summary>One check of the validation report.</summary>
public sealed record ReportCheck(string Name, bool Passed, string Detail);

/// <summary><c>report.json</c>: the checks the run's thresholds ask for; a fine-tune is dispatched only when all pass.</summary>
public sealed record ValidationReport
{
    public int SchemaVersion { get; set; } = 1;
    public required string PreparedId { get; init; }
    public required bool Passed { get; init; }
    public required List<ReportCheck> Checks { get; init; }
    public required PreparedStats Stats { get; init; }
    /// <summary>Where ingestion listed the records it refused.</summary>
    public required string IngestErrors { get; init; }

    public string Summary() => Passed
        ? "All checks passed."
        : string.Join(" ", Checks.Where(c => !c.Passed).Select(c => $"{c.Name}: {c.Detail}"));
}

/// <summary>
/// <c>datasets/&lt;datasetId&gt;/prepared/&lt;preparedId&gt;/manifest.json</c>, written last: the commit
/// of a prepared dataset. Trainers read the shards it lists.
/// </summary>
public sealed record PreparedManifest
{
    public int SchemaVersion { get; set; } = 1;
    public required string PreparedId { get; init; }
    public required string DatasetId { get; init; }
    public required string RecordKind { get; init; }
    /// <summary>Label names by id (index = id), or empty for unlabelled data.</summary>
    public required List<string> Labels { get; init; }
    public required TokenizerSpec Tokenizer { get; init; }
    public required string TokenizerFingerprint { get; init; }
    public required int PaddingId { get; init; }
    public required int EndOfTextId { get; init; }
    public required int MaxSequenceLength { get; init; }
    public required bool Packed { get; init; }
    public required List<ShardInfo> Shards { get; init; }
    public required string Stats { get; init; }
    public required string Report { get; init; }
    public required bool ReportPassed { get; init; }
    public required JsonElement Recipe { get; init; }
    public required string RunId { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
    public required Dictionary<string, double> TimingsMs { get; init; }
}

/// <summary>Where a prepared dataset lives in the <c>datasets</c> container.</summary>
public static class PreparedPaths
{
    public static string Folder(string datasetId, string preparedId) => $"{datasetId}/prepared/{preparedId}/";
}

/// <summary>Body of a <c>preprocess-partition</c> message: one part of one step of a partitioned build (see <see cref="PartitionPlan"/>).
/// <see cref="Step"/> is null for a partition's build, or a near-dedup step: buckets, attach, verify.</summary>
public sealed record PreprocessPartitionRequest(string DatasetId, string PreparedId, int Partition, string? Step = null);

/// <summary>
/// <c>_partitions/plan.json</c> in a prepared folder: a build fanned out over partitions. Written once every
/// partition's input is complete, before the partition messages are sent; the request (with its run spec)
/// is what the assembly needs to finish the stage.
/// </summary>
public sealed record PartitionPlan
{
    public int SchemaVersion { get; set; } = 1;
    public required string RunId { get; init; }
    public required string DatasetId { get; init; }
    public required string PreparedId { get; init; }
    public required int Partitions { get; init; }
    /// <summary>Records of the dataset, and those each partition received.</summary>
    public required long Records { get; init; }
    public required List<long> PartitionRecords { get; init; }
    /// <summary>With near dedup: the buckets its band keys are shared out to (0: no near-dedup steps).</summary>
    public int NearBuckets { get; init; }
    public required PreprocessRequest Request { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
}

/// <summary>
/// <c>_partitions/done/NNNNN.json</c>: one partition's commit, written after its kept records. Counts of what
/// happened before a record was kept (the assembly counts the rest), and its first removed duplicates.
/// </summary>
public sealed record PartitionOutcome
{
    public int SchemaVersion { get; set; } = 1;
    public required int Partition { get; init; }
    public long RecordsRead { get; set; }
    public long Kept { get; set; }
    public long ExactDuplicatesRemoved { get; set; }
    public long Emails { get; set; }
    public long Phones { get; set; }
    public long IpAddresses { get; set; }
    public List<DuplicatePair> DuplicateSamples { get; set; } = [];
    public int Attempt { get; set; }
    public double WallMs { get; set; }
    public DateTimeOffset FinishedAt { get; set; }
}

/// <summary><c>_partitions/near/done/&lt;step&gt;/NNNNN.json</c>: one part of a near-dedup step, written after its files.</summary>
public sealed record NearStepOutcome(string Step, int Part, long Pairs, int Attempt, double WallMs, DateTimeOffset FinishedAt)
{
    public int SchemaVersion { get; init; } = 1;
}

/// <summary>Body of a <c>finetune</c> message: the prepared dataset and the run spec.</summary>
public sealed record FineTuneRequest(string DatasetId, string PreparedId, string PreparedManifest, RunSpec? Spec = null);

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(PreprocessRecipe))]
[JsonSerializable(typeof(PreparedManifest))]
[JsonSerializable(typeof(PreparedStats))]
[JsonSerializable(typeof(ValidationReport))]
[JsonSerializable(typeof(FineTuneRequest))]
[JsonSerializable(typeof(PreprocessPartitionRequest))]
[JsonSerializable(typeof(PartitionPlan))]
[JsonSerializable(typeof(PartitionOutcome))]
[JsonSerializable(typeof(NearStepOutcome))]
[JsonSerializable(typeof(CanonicalRecord))]
public sealed partial class PreprocessJson : JsonSerializerContext;

/// <summary>A record of a dataset's records.jsonl, any kind (see the ingestion contracts).</summary>
public sealed record CanonicalRecord
{
    public string? Text { get; set; }
    [JsonConverter(typeof(LabelAsStringConverter))]
    public string? Label { get; set; }
    public string? Prompt { get; set; }
    public string? Completion { get; set; }
    public List<ChatMessage>? Messages { get; set; }
    public long Line { get; set; }
}

public sealed record ChatMessage(string Role, string Content, string? Name = null);

/// <summary>Labels may be strings, numbers or booleans in records; they are names here.</summary>
public sealed class LabelAsStringConverter : JsonConverter<string?>
{
    public override string? Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) => reader.TokenType switch
    {
        JsonTokenType.String => reader.GetString(),
        JsonTokenType.Number => System.Text.Encoding.UTF8.GetString(reader.ValueSpan),
        JsonTokenType.True => "true",
        JsonTokenType.False => "false",
        _ => null,
    };

    public override void Write(Utf8JsonWriter writer, string? value, JsonSerializerOptions options) => writer.WriteStringValue(value);
}
