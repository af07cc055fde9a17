using System.Text.Json;
using System.Text.Json.Serialization;
using Pipeline.Messaging;

namespace Pipeline.Runs;

/// <summary>
/// What a run should do after ingestion and with which settings (schema version 1). Dropped beside the
/// data as <c>&lt;name&gt;.pipeline.json</c> or sent in a command. Unknown fields are errors, so a typo
/// never silently falls back to a default.
/// </summary>
[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record RunSpec
{
    public const int CurrentSchemaVersion = 1;
    public const string FileSuffix = ".pipeline.json";

    public int SchemaVersion { get; set; } = CurrentSchemaVersion;
    public IngestSpec? Ingest { get; init; }

    /// <summary>Settings of the later stages, validated by those stages.</summary>
    public JsonElement? Preprocess { get; init; }
    public JsonElement? FineTune { get; init; }
    public JsonElement? Inference { get; init; }

    /// <summary>Parses a run spec, throwing <see cref="RunSpecException"/> with a message a user can act on.</summary>
    public static RunSpec Parse(ReadOnlySpan<byte> json, string origin)
    {
        RunSpec? spec;
        try
        {
            spec = JsonSerializer.Deserialize(json, PipelineJson.Default.RunSpec);
        }
        catch (JsonException e)
        {
            throw new RunSpecException($"The run spec {origin} is not valid: {e.Message}");
        }

        if (spec is null)
        {
            throw new RunSpecException($"The run spec {origin} is empty (null).");
        }

        spec.Validate(origin);
        return spec;
    }

    public void Validate(string origin)
    {
        if (SchemaVersion != CurrentSchemaVersion)
        {
            throw new RunSpecException($"The run spec {origin} has schemaVersion {SchemaVersion}; this version of Pipeline reads schemaVersion {CurrentSchemaVersion}.");
        }

        Ingest?.Validate(origin);
    }

    /// <summary>For a data blob <c>dir/name.ext</c>, the spec names tried beside it, in order.</summary>
    public static IEnumerable<string> CandidateNamesFor(string blobName)
    {
        var slash = blobName.LastIndexOf('/');
        var dot = blobName.LastIndexOf('.');
        if (dot > slash + 1)
        {
            yield return blobName[..dot] + FileSuffix;
        }

        yield return blobName + FileSuffix;
    }
}

/// <summary>Ingestion settings. Every field is optional; defaults are in <see cref="Ingestion.IngestionOptions"/>.</summary>
[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record IngestSpec
{
    /// <summary><c>auto</c> (default), <c>jsonl</c>, <c>csv</c>, <c>tsv</c> or <c>text</c>.</summary>
    public string? Format { get; init; }
    /// <summary>For JSONL: <c>auto</c> (default), <c>chat</c>, <c>prompt_completion</c> or <c>text</c>.</summary>
    public string? RecordKind { get; init; }
    /// <summary>For CSV/TSV: whether the first row names the columns (default: detected).</summary>
    public bool? HasHeader { get; init; }
    /// <summary>For CSV/TSV without a header: the role of each column, <c>text</c>, <c>label</c>, <c>id</c> or <c>ignore</c>.</summary>
    public string[]? Columns { get; init; }
    /// <summary>The field (JSONL) or header (CSV/TSV) holding the text, when it is none of the usual names.</summary>
    public string? TextField { get; init; }
    /// <summary>The field or header holding the label, when it is none of the usual names.</summary>
    public string? LabelField { get; init; }
    /// <summary>Reject the file when more than this fraction of records is invalid (default 0.01).</summary>
    public double? MaxInvalidFraction { get; init; }
    /// <summary>Longest accepted record (line) in bytes (default 1 MiB).</summary>
    public int? MaxRecordBytes { get; init; }

    public static readonly string[] Formats = ["auto", "jsonl", "csv", "tsv", "text"];
    public static readonly string[] RecordKinds = ["auto", "chat", "prompt_completion", "text"];
    public static readonly string[] ColumnRoles = ["text", "label", "id", "ignore"];

    public void Validate(string origin)
    {
        if (Format is not null && !Formats.Contains(Format))
        {
            throw new RunSpecException($"The run spec {origin} has ingest.format '{Format}'; use one of: {string.Join(", ", Formats)}.");
        }

        if (RecordKind is not null && !RecordKinds.Contains(RecordKind))
        {
            throw new RunSpecException($"The run spec {origin} has ingest.recordKind '{RecordKind}'; use one of: {string.Join(", ", RecordKinds)}.");
        }

        if (Columns is not null)
        {
            foreach (var column in Columns)
            {
                if (!ColumnRoles.Contains(column))
                {
                    throw new RunSpecException($"The run spec {origin} has ingest.columns entry '{column}'; each entry must be one of: {string.Join(", ", ColumnRoles)}.");
                }
            }

            if (Columns.Count(c => c == "text") != 1)
            {
                throw new RunSpecException($"The run spec {origin} must name exactly one 'text' column in ingest.columns.");
            }
        }

        if (MaxInvalidFraction is < 0 or > 1)
        {
            throw new RunSpecException($"The run spec {origin} has ingest.maxInvalidFraction {MaxInvalidFraction}; use a fraction between 0 and 1.");
        }

        if (MaxRecordBytes is < 64 or > 64 * 1024 * 1024)
        {
            throw new RunSpecException($"The run spec {origin} has ingest.maxRecordBytes {MaxRecordBytes}; use a value between 64 and 67108864.");
        }
    }
}

/// <summary>A run spec that cannot be used; the message says what to fix.</summary>
public sealed class RunSpecException(string message) : Exception(message);
