using System.Text.Json;
using System.Text.Json.Serialization;

namespace Pipeline.Preprocessing;

/// <summary>
/// How a dataset becomes training-ready shards: the <c>preprocess</c> section of a run spec (schema 1).
/// Every field has a default; unknown fields are errors. The recipe (with the tokenizer's fingerprint
/// and the dataset id) makes the prepared id, so the same recipe on the same data is done once.
/// </summary>
[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record PreprocessRecipe
{
    public NormalizeOptions Normalize { get; set; } = new();
    public RedactOptions Redact { get; set; } = new();
    public DedupOptions Dedup { get; set; } = new();
    public TokenizerSpec Tokenizer { get; set; } = new();
    /// <summary>How chat records become text: <c>chatml</c> (default) or <c>plain</c> ("role: content" lines).</summary>
    public string ChatTemplate { get; set; } = ChatTemplates.ChatMl;
    /// <summary>Longest sequence in tokens; longer ones are truncated (and counted). Default 512.</summary>
    public int MaxSequenceLength { get; set; } = 512;
    /// <summary>For unlabelled text: concatenate sequences into blocks of exactly maxSequenceLength. Default false.</summary>
    public bool Packing { get; set; }
    /// <summary>Share of records held out for validation. Default 0.2.</summary>
    public double ValidationFraction { get; set; } = 0.2;
    /// <summary>Seed of the train/validation split. Default 42.</summary>
    public int Seed { get; set; } = 42;
    /// <summary>Records per shard file. Default 100,000.</summary>
    public int ShardRecords { get; set; } = 100_000;
    /// <summary>Epochs the fine-tune will run (for the training-token and cost estimate). Default 3.</summary>
    public int Epochs { get; set; } = 3;
    /// <summary>Price per million training tokens, for the estimate (illustrative default 3.00).</summary>
    public double CostPerMillionTokens { get; set; } = 3.0;
    /// <summary>What the report must pass before any GPU time is spent.</summary>
    public ReportThresholds Thresholds { get; set; } = new();
    /// <summary>
    /// Records per partition: a dataset with more is prepared by <c>ceil(records / partitionRecords)</c>
    /// partitions on any instances (see the README's fan-out). Default 1,000,000. Not part of the prepared id:
    /// the output is the same at any number of partitions.
    /// </summary>
    public int? PartitionRecords { get; set; }
    /// <summary>Forces this many partitions whatever the dataset's size (1 = the single pass). Not part of the prepared id.</summary>
    public int? Partitions { get; set; }

    public const int DefaultPartitionRecords = 1_000_000;

    /// <summary>The partitions a dataset of <paramref name="records"/> records is prepared in (1: the single pass).</summary>
    public int PartitionsFor(long records) =>
        Partitions ?? (int)Math.Clamp((records + (PartitionRecords ?? DefaultPartitionRecords) - 1) / (PartitionRecords ?? DefaultPartitionRecords), 1, MaxPartitions);

    public const int MaxPartitions = 1000;

    public static PreprocessRecipe From(JsonElement? section)
    {
        if (section is not { ValueKind: JsonValueKind.Object } json)
        {
            return new PreprocessRecipe();
        }

        try
        {
            var recipe = json.Deserialize(PreprocessJson.Default.PreprocessRecipe) ?? new PreprocessRecipe();
            recipe.Validate();
            return recipe;
        }
        catch (JsonException e)
        {
            throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidRecipe, $"The preprocess recipe is not valid: {e.Message}");
        }
    }

    public void Validate()
    {
        static void Check(bool ok, string message)
        {
            if (!ok)
            {
                throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidRecipe, "The preprocess recipe is not valid: " + message);
            }
        }

        Check(Normalize.Unicode is "NFC" or "NFKC" or "none", $"normalize.unicode is '{Normalize.Unicode}'; use NFC, NFKC or none.");
        Check(DedupModes.All.Contains(Dedup.Mode), $"dedup.mode is '{Dedup.Mode}'; use one of: {string.Join(", ", DedupModes.All)}.");
        Check(Dedup.Threshold is > 0 and <= 1, $"dedup.threshold is {Dedup.Threshold}; use a Jaccard similarity in (0, 1].");
        Check(Dedup.Shingle is >= 1 and <= 16, $"dedup.shingle is {Dedup.Shingle}; use 1 to 16 words.");
        Check(Dedup.Permutations is >= 16 and <= 512 && Dedup.Permutations % 8 == 0, $"dedup.permutations is {Dedup.Permutations}; use a multiple of 8 from 16 to 512.");
        Check(TokenizerKinds.All.Contains(Tokenizer.Kind), $"tokenizer.kind is '{Tokenizer.Kind}'; use one of: {string.Join(", ", TokenizerKinds.All)}.");
        Check(Tokenizer.Kind != TokenizerKinds.Tiktoken || Tokenizer.Encoding is null || TokenizerKinds.Encodings.Contains(Tokenizer.Encoding),
            $"tokenizer.encoding is '{Tokenizer.Encoding}'; use one of: {string.Join(", ", TokenizerKinds.Encodings)}.");
        Check(Tokenizer.Kind == TokenizerKinds.Tiktoken || Tokenizer.Files is { Length: > 0 } && Tokenizer.Files.Contains('/'),
            $"tokenizer.kind '{Tokenizer.Kind}' needs tokenizer.files: the folder with its files, as container/path/ (for example models/bert-base-uncased/).");
        Check(ChatTemplates.All.Contains(ChatTemplate), $"chatTemplate is '{ChatTemplate}'; use one of: {string.Join(", ", ChatTemplates.All)}.");
        Check(MaxSequenceLength is >= 8 and <= 1_048_576, $"maxSequenceLength is {MaxSequenceLength}; use 8 to 1048576.");
        Check(ValidationFraction is >= 0 and < 1, $"validationFraction is {ValidationFraction}; use a fraction from 0 to below 1.");
        Check(ShardRecords is >= 100 and <= 10_000_000, $"shardRecords is {ShardRecords}; use 100 to 10000000.");
        Check(Epochs is >= 1 and <= 100, $"epochs is {Epochs}; use 1 to 100.");
        Check(CostPerMillionTokens >= 0, "costPerMillionTokens must not be negative.");
        Check(Thresholds.MaxTruncatedFraction is >= 0 and <= 1, $"thresholds.maxTruncatedFraction is {Thresholds.MaxTruncatedFraction}; use 0 to 1.");
        Check(PartitionRecords is null or >= 1000, $"partitionRecords is {PartitionRecords}; use at least 1000 records per partition.");
        Check(Partitions is null or (>= 1 and <= MaxPartitions), $"partitions is {Partitions}; use 1 to {MaxPartitions}.");
        Check(Thresholds.MinExamplesPerLabel >= 0 && Thresholds.MinTrainRecords >= 0, "thresholds must not be negative.");
    }

    /// <summary>
    /// Canonical JSON of the recipe (every default spelled out): with the dataset and tokenizer, the prepared id.
    /// The partitioning settings are left out: they change how the work is shared, never the output.
    /// </summary>
    public string Canonical() => JsonSerializer.Serialize(this with { PartitionRecords = null, Partitions = null }, PreprocessJson.Default.PreprocessRecipe);
}

[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record NormalizeOptions
{
    /// <summary><c>NFC</c> (default), <c>NFKC</c> or <c>none</c>.</summary>
    public string Unicode { get; set; } = "NFC";
    /// <summary>Remove control and format characters (keeping tabs and line breaks as white space). Default true.</summary>
    public bool StripControl { get; set; } = true;
    /// <summary>Collapse runs of white space to one space and trim. Default true.</summary>
    public bool CollapseWhitespace { get; set; } = true;
    /// <summary>Lower-case the text. Default false: uncased tokenizers lower-case themselves.</summary>
    public bool Lowercase { get; set; }
}

[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record RedactOptions
{
    public bool Emails { get; set; }
    public bool Phones { get; set; }
    public bool IpAddresses { get; set; }
}

[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record DedupOptions
{
    /// <summary><c>exact</c> (default: identical after normalization), <c>near</c> (MinHash + LSH) or <c>none</c>.</summary>
    public string Mode { get; set; } = DedupModes.Exact;
    /// <summary>For near: Jaccard similarity of word shingles at or above which a record is a duplicate. Default 0.8.</summary>
    public double Threshold { get; set; } = 0.8;
    /// <summary>For near: words per shingle. Default 3.</summary>
    public int Shingle { get; set; } = 3;
    /// <summary>For near: MinHash permutations. Default 128.</summary>
    public int Permutations { get; set; } = 128;
}

public static class DedupModes
{
    public const string None = "none";
    public const string Exact = "exact";
    public const string Near = "near";
    public static readonly string[] All = [None, Exact, Near];
}

public static class ChatTemplates
{
    public const string ChatMl = "chatml";
    public const string Plain = "plain";
    public static readonly string[] All = [ChatMl, Plain];
}

[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record ReportThresholds
{
    /// <summary>Every label needs at least this many training examples. Default 5.</summary>
    public int MinExamplesPerLabel { get; set; } = 5;
    /// <summary>At most this share of records may be truncated. Default 0.1.</summary>
    public double MaxTruncatedFraction { get; set; } = 0.1;
    /// <summary>At least this many training records. Default 10.</summary>
    public int MinTrainRecords { get; set; } = 10;
}
