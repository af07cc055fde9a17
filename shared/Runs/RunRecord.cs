using Azure;
using Azure.Data.Tables;

namespace Pipeline.Runs;

public static class RunStatus
{
    public const string Queued = "queued";
    public const string Running = "running";
    public const string Succeeded = "succeeded";
    public const string Failed = "failed";
    public const string Cancelled = "cancelled";
    /// <summary>Finished, but some rows failed (batch inference): the run names the most common error.</summary>
    public const string CompletedWithFailures = "completed_with_failures";

    public static bool IsFinal(string status) => status is Succeeded or Failed or Cancelled or CompletedWithFailures;
}

public static class Stages
{
    public const string Ingest = "ingest";
    public const string Preprocess = "preprocess";
    public const string FineTune = "finetune";
    public const string Inference = "inference";
}

/// <summary>
/// One run as stored in the <c>runs</c> table (partition = run id). Structured fields are JSON strings
/// so the record stays one entity; <see cref="SchemaVersion"/> versions the shape.
/// </summary>
public sealed class RunRecord : ITableEntity
{
    public const int CurrentSchemaVersion = 1;
    public const string RowKeyValue = "run";

    public string PartitionKey { get; set; } = "";
    public string RowKey { get; set; } = RowKeyValue;
    public DateTimeOffset? Timestamp { get; set; }
    public ETag ETag { get; set; }

    public int SchemaVersion { get; set; } = CurrentSchemaVersion;
    public string RunId { get => PartitionKey; set => PartitionKey = value; }

    /// <summary><see cref="RunStatus"/> of the run as a whole.</summary>
    public string Status { get; set; } = RunStatus.Queued;

    /// <summary>The stage the run is in now (or ended in).</summary>
    public string Stage { get; set; } = Stages.Ingest;

    /// <summary>Where the run came from: <c>container/blob</c> of the source, or <c>command</c>.</summary>
    public string Source { get; set; } = "";
    public string? SourceETag { get; set; }
    public string? DatasetId { get; set; }

    /// <summary>Status per stage, as JSON: {"ingest":"succeeded","preprocess":"queued"}.</summary>
    public string StagesJson { get; set; } = "{}";
    /// <summary>Counts (records read, valid, invalid, ...), as JSON.</summary>
    public string CountsJson { get; set; } = "{}";
    /// <summary>Artifact paths by name, as JSON.</summary>
    public string ArtifactsJson { get; set; } = "{}";
    /// <summary>Milliseconds spent per stage, as JSON.</summary>
    public string TimingsJson { get; set; } = "{}";
    /// <summary>Model metrics (validation accuracy, macro-F1, loss, ...) as JSON, from fine-tuning.</summary>
    public string MetricsJson { get; set; } = "{}";
    /// <summary>The run spec as given (JSON), if any.</summary>
    public string? SpecJson { get; set; }

    /// <summary>A user-facing reason when the run failed.</summary>
    public string? Error { get; set; }
    /// <summary>A machine-readable code for <see cref="Error"/>, such as <c>TooManyInvalidRecords</c>.</summary>
    public string? ErrorCode { get; set; }
    /// <summary>The blob holding the detailed error report, if any.</summary>
    public string? ReportPath { get; set; }

    /// <summary>Delivery attempt of the message the current stage is working on.</summary>
    public int Attempt { get; set; }
    /// <summary>The last transient failure, kept so that a poisoned message can say why it gave up.</summary>
    public string? LastError { get; set; }

    /// <summary>How many changes have been saved: each saved change adds one. Its events are identified by it.</summary>
    public long Version { get; set; }

    public DateTimeOffset CreatedAt { get; set; }
    public DateTimeOffset UpdatedAt { get; set; }
    public DateTimeOffset? StartedAt { get; set; }
    public DateTimeOffset? EndedAt { get; set; }

    /// <summary>Whether <paramref name="other"/> holds the same run content (ignoring the version, the update time and the storage metadata).</summary>
    public bool SameContentAs(RunRecord other) => ContentProperties.All(p => Equals(p.GetValue(this), p.GetValue(other)));

    public RunRecord Copy() => (RunRecord)MemberwiseClone();

    // Every stored property but those a save itself changes: a new property is compared without being listed here.
    private static readonly System.Reflection.PropertyInfo[] ContentProperties = [.. typeof(RunRecord).GetProperties()
        .Where(p => p.CanWrite && p.Name is not (nameof(Timestamp) or nameof(ETag) or nameof(UpdatedAt) or nameof(Version) or nameof(RunId)))];

    public Dictionary<string, string> GetStages() => RunJson.ReadStrings(StagesJson);
    public Dictionary<string, long> GetCounts() => RunJson.ReadCounts(CountsJson);
    public Dictionary<string, string> GetArtifacts() => RunJson.ReadStrings(ArtifactsJson);
    public Dictionary<string, double> GetTimings() => RunJson.ReadTimings(TimingsJson);
    public Dictionary<string, double> GetMetrics() => RunJson.ReadTimings(MetricsJson);

    public void SetMetrics(IReadOnlyDictionary<string, double> metrics)
    {
        var all = GetMetrics();
        foreach (var (k, v) in metrics)
        {
            all[k] = Math.Round(v, 6);
        }

        MetricsJson = RunJson.Write(all);
    }

    public void SetStage(string stage, string status)
    {
        var stages = GetStages();
        stages[stage] = status;
        StagesJson = RunJson.Write(stages);
    }

    public void SetCounts(IReadOnlyDictionary<string, long> counts)
    {
        var all = GetCounts();
        foreach (var (k, v) in counts)
        {
            all[k] = v;
        }

        CountsJson = RunJson.Write(all);
    }

    public void SetArtifact(string name, string path)
    {
        var all = GetArtifacts();
        all[name] = path;
        ArtifactsJson = RunJson.Write(all);
    }

    public void SetTiming(string stage, TimeSpan elapsed)
    {
        var all = GetTimings();
        all[stage] = Math.Round(elapsed.TotalMilliseconds, 1);
        TimingsJson = RunJson.Write(all);
    }
}
