using System.Text.Json.Serialization;
using Pipeline.Runs;

namespace Pipeline.Cli;

/// <summary>A run as the CLI prints it with <c>--output json</c> (stable shape, schema version 1).</summary>
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
    string? Error,
    string? ErrorCode,
    string? ReportPath,
    int Attempt,
    string? LastError,
    DateTimeOffset CreatedAt,
    DateTimeOffset UpdatedAt)
{
    public static RunView From(RunRecord run) => new(
        1, run.RunId, run.Status, run.Stage, run.Source, run.DatasetId, run.GetStages(), run.GetCounts(), run.GetArtifacts(), run.GetTimings(),
        run.Error, run.ErrorCode, run.ReportPath, run.Attempt, run.LastError, run.CreatedAt, run.UpdatedAt);
}

[JsonSourceGenerationOptions(System.Text.Json.JsonSerializerDefaults.Web, WriteIndented = true)]
[JsonSerializable(typeof(RunView))]
[JsonSerializable(typeof(List<RunView>))]
[JsonSerializable(typeof(List<PoisonView>))]
internal sealed partial class CliJson : JsonSerializerContext;

public sealed record PoisonView(string Queue, string Id, string Kind, string? RunId, string Reason, int Attempts, DateTimeOffset RecordedAt, string Message);
