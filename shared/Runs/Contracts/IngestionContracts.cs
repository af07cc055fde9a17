using Pipeline.Runs;

namespace Pipeline.Ingestion;

/// <summary>Detected or chosen file format.</summary>
public static class DataFormats
{
    public const string Jsonl = "jsonl";
    public const string Csv = "csv";
    public const string Tsv = "tsv";
    /// <summary>Plain text or Markdown document: one record per paragraph.</summary>
    public const string Text = "text";
}

/// <summary>The canonical record shapes a dataset holds (one per dataset).</summary>
public static class RecordKinds
{
    /// <summary><c>{"messages":[{"role","content"}],"id"?,"line"}</c></summary>
    public const string Chat = "chat";
    /// <summary><c>{"prompt","completion","id"?,"line"}</c></summary>
    public const string PromptCompletion = "prompt_completion";
    /// <summary><c>{"text","label"?,"id"?,"line"}</c></summary>
    public const string Text = "text";
}

/// <summary>One invalid record, as written to <c>errors.jsonl</c>: where it is and why it was refused.</summary>
public sealed record RecordError(long Line, string Code, string Message);

public static class RecordErrorCodes
{
    public const string InvalidUtf8 = "invalid_utf8";
    public const string MalformedJson = "malformed_json";
    public const string NotAnObject = "not_an_object";
    public const string MissingField = "missing_field";
    public const string WrongType = "wrong_type";
    public const string EmptyText = "empty_text";
    public const string UnknownRole = "unknown_role";
    public const string RecordTooLarge = "record_too_large";
    public const string InconsistentLabelType = "inconsistent_label_type";
    public const string WrongColumnCount = "wrong_column_count";
    public const string UnterminatedQuote = "unterminated_quote";
}

/// <summary>Why a whole file was rejected (the run's <c>ErrorCode</c>).</summary>
public static class RejectionCodes
{
    public const string EmptyFile = "EmptyFile";
    public const string BinaryFile = "BinaryFile";
    public const string Utf16File = "Utf16Encoding";
    public const string FileTooLarge = "FileTooLarge";
    public const string UnknownFormat = "UnknownFormat";
    public const string TooManyInvalidRecords = "TooManyInvalidRecords";
    public const string NoValidRecords = "NoValidRecords";
    public const string InvalidRunSpec = "InvalidRunSpec";
    public const string SourceNotFound = "SourceNotFound";
    public const string SourceChanged = "SourceChanged";
    public const string InvalidMessage = "InvalidMessage";
}

/// <summary>A permanent problem with the input: the run fails with this code and message, and is not retried.</summary>
public sealed class IngestionRejectedException(string code, string message) : StageRejectedException(code, message);

/// <summary>Counts of one ingestion, as recorded in the manifest and on the run.</summary>
public sealed record IngestCounts
{
    /// <summary>Physical lines in the source.</summary>
    public long Lines { get; init; }
    /// <summary>Records read (blank lines, and a header row, are not records).</summary>
    public long Read { get; init; }
    public long Valid { get; init; }
    public long Invalid { get; init; }
    /// <summary>Valid records identical to an earlier one (kept; preprocessing decides what to remove).</summary>
    public long Duplicates { get; init; }
    public long BlankLines { get; init; }
    public long HeaderRows { get; init; }
    public long Bytes { get; init; }

    public Dictionary<string, long> ToDictionary() => new()
    {
        ["lines"] = Lines,
        ["read"] = Read,
        ["valid"] = Valid,
        ["invalid"] = Invalid,
        ["duplicates"] = Duplicates,
        ["blankLines"] = BlankLines,
        ["headerRows"] = HeaderRows,
        ["bytes"] = Bytes,
    };
}

/// <summary>
/// <c>datasets/&lt;datasetId&gt;/manifest.json</c>, written last: its presence is the commit of the dataset.
/// Readers trust only datasets that have one.
/// </summary>
public sealed record DatasetManifest
{
    public const int CurrentSchemaVersion = 1;

    public int SchemaVersion { get; set; } = CurrentSchemaVersion;
    public required string DatasetId { get; init; }
    public required string Format { get; init; }
    /// <summary>Why this format was chosen: the run spec, the extension, or the content.</summary>
    public required string FormatReason { get; init; }
    public required string RecordKind { get; init; }
    /// <summary>For text records: <c>string</c>, <c>number</c>, <c>boolean</c>, or null when unlabelled.</summary>
    public string? LabelType { get; init; }
    /// <summary>Records per label (at most 1,000 distinct labels are counted).</summary>
    public Dictionary<string, long>? LabelCounts { get; init; }
    /// <summary>For CSV/TSV: whether a header row was read, and the column roles used.</summary>
    public bool? HasHeader { get; init; }
    public string[]? Columns { get; init; }
    public required IngestCounts Counts { get; init; }
    /// <summary>Whether <see cref="IngestCounts.Duplicates"/> is exact (it is approximate past the tracking limit).</summary>
    public bool DuplicatesExact { get; set; } = true;
    /// <summary>SHA-256 of the source bytes, hex.</summary>
    public required string Sha256 { get; init; }
    public required string SourceBlob { get; init; }
    public required string SourceETag { get; init; }
    public required string RunId { get; init; }
    /// <summary>Blob paths (in the datasets container) of the records and the errors.</summary>
    public required string Records { get; init; }
    public required string Errors { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
    public required Dictionary<string, double> TimingsMs { get; init; }
    /// <summary>The ingest settings that shaped the records; with the content hash they make the dataset id.</summary>
    public required string SettingsFingerprint { get; init; }
}

/// <summary>The report kept with a rejected file in quarantine, and referenced from its run.</summary>
public sealed record IngestReport
{
    public int SchemaVersion { get; set; } = 1;
    public required string RunId { get; init; }
    public required string SourceBlob { get; init; }
    public string? SourceETag { get; init; }
    public required string Code { get; init; }
    public required string Message { get; init; }
    public string? Format { get; init; }
    public string? RecordKind { get; init; }
    public IngestCounts? Counts { get; init; }
    /// <summary>The first invalid records; all of them are in <c>errors.jsonl</c> beside this report.</summary>
    public RecordError[]? FirstErrors { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
}
