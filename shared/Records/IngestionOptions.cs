using Pipeline.Runs;

namespace Pipeline.Ingestion;

/// <summary>Ingestion limits and defaults (configuration section <c>Pipeline:Ingestion</c>). A run spec may override the per-file ones.</summary>
public sealed class IngestionOptions
{
    public const string Section = "Pipeline:Ingestion";

    /// <summary>Files larger than this are rejected before reading. Default 50 GiB.</summary>
    public long MaxFileBytes { get; set; } = 50L * 1024 * 1024 * 1024;

    /// <summary>Longest accepted record (line) in bytes. Default 1 MiB.</summary>
    public int MaxRecordBytes { get; set; } = 1024 * 1024;

    /// <summary>Reject a file when more than this fraction of its records is invalid. Default 0.01 (1%).</summary>
    public double MaxInvalidFraction { get; set; } = 0.01;

    /// <summary>How often a running ingestion writes its counts to the run. Default 2 s.</summary>
    public TimeSpan ProgressInterval { get; set; } = TimeSpan.FromSeconds(2);

    /// <summary>
    /// Records whose hashes are kept to count duplicates (8 bytes each, plus set overhead). Past this the
    /// count covers only the first records and the manifest says it is not exact; memory stays bounded.
    /// </summary>
    public int DuplicateTrackingLimit { get; set; } = 1_000_000;

    /// <summary>Invalid records quoted in the run's report (all are in errors.jsonl).</summary>
    public int ReportedErrors { get; set; } = 20;

    /// <summary>Block size for streaming uploads of the dataset blobs. Default 8 MiB.</summary>
    public int UploadBlockBytes { get; set; } = 8 * 1024 * 1024;

    public IngestSettings Resolve(IngestSpec? spec) => new(
        Format: spec?.Format is null or "auto" ? null : spec.Format,
        RecordKind: spec?.RecordKind is null or "auto" ? null : spec.RecordKind,
        HasHeader: spec?.HasHeader,
        Columns: spec?.Columns,
        TextField: spec?.TextField,
        LabelField: spec?.LabelField,
        MaxInvalidFraction: spec?.MaxInvalidFraction ?? MaxInvalidFraction,
        MaxRecordBytes: spec?.MaxRecordBytes ?? MaxRecordBytes);
}

/// <summary>The effective settings of one ingestion: options with the run spec's overrides applied.</summary>
public sealed record IngestSettings(
    string? Format,
    string? RecordKind,
    bool? HasHeader,
    string[]? Columns,
    string? TextField,
    string? LabelField,
    double MaxInvalidFraction,
    int MaxRecordBytes)
{
    /// <summary>The settings that change the records produced; part of the dataset id.</summary>
    public string Fingerprint() =>
        $"v1|format={Format}|kind={RecordKind}|header={HasHeader}|columns={(Columns is null ? "" : string.Join(',', Columns))}|text={TextField}|label={LabelField}|maxRecord={MaxRecordBytes}";
}
