using System.Text.Json.Serialization;

namespace Pipeline.Runs;

/// <summary>A run as the HTTP API returns it and the CLI prints it with <c>--output json</c> (stable shape, schema version 1).</summary>
public sealed record RunView(
    int SchemaVersion,
    string RunId,
    string Status,
    string Stage,
    string Source,
    string? DatasetId,
    Dictionary<string, string> Stages,
    Dictionary<string, long> Counts,
    Dictionary<string, string> Artifacts,
    Dictionary<string, double> TimingsMs,
    Dictionary<string, double> Metrics,
    string? Error,
    string? ErrorCode,
    string? ReportPath,
    int Attempt,
    string? LastError,
    DateTimeOffset CreatedAt,
    DateTimeOffset UpdatedAt)
{
    public static RunView From(RunRecord run) => new(
        1, run.RunId, run.Status, run.Stage, run.Source, run.DatasetId, run.GetStages(), run.GetCounts(), run.GetArtifacts(), run.GetTimings(), run.GetMetrics(),
        run.Error, run.ErrorCode, run.ReportPath, run.Attempt, run.LastError, run.CreatedAt, run.UpdatedAt);
}

/// <summary>A message given up on, as the API and CLI show it.</summary>
public sealed record PoisonView(string Queue, string Id, string Kind, string? RunId, string Reason, int Attempts, DateTimeOffset RecordedAt, DateTimeOffset? ReplayedAt, string Message);

/// <summary>One recorded run transition (the CloudEvent's type and data), as the API and CLI show it.</summary>
public sealed record RunEventView(string Id, string Type, DateTimeOffset Time, string Stage, string Status, Dictionary<string, long>? Counts, string? Error, string? ErrorCode);

/// <summary>A dataset, as the API and CLI list it (from its manifest).</summary>
public sealed record DatasetView(string DatasetId, string Format, string RecordKind, long Records, long Invalid, string? LabelType, string SourceBlob, string RunId, DateTimeOffset CreatedAt, string Manifest);

[JsonSourceGenerationOptions(System.Text.Json.JsonSerializerDefaults.Web, WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(RunView))]
[JsonSerializable(typeof(List<RunView>))]
[JsonSerializable(typeof(List<PoisonView>))]
[JsonSerializable(typeof(List<RunEventView>))]
[JsonSerializable(typeof(List<DatasetView>))]
public sealed partial class ViewJson : JsonSerializerContext;
