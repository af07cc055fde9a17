using Azure;
using Azure.Data.Tables;

namespace Pipeline.Runs;

/// <summary>
/// A run event not yet published: saved in the <c>runs</c> table beside the run (same partition), in the same
/// entity-group transaction as the change it announces, so a change is never saved without its event. The
/// dispatcher (<c>RunEvents</c>) publishes it and deletes it; until then it is retried. Its id, the run id, the
/// run's version and the type, is the CloudEvent id, so a retried publish carries the id of the first.
/// </summary>
public sealed class RunOutboxEntry : ITableEntity
{
    /// <summary>Row keys of pending events start with this and sort by version, so a run's events are published in order.</summary>
    public const string RowKeyPrefix = "event-";

    public string PartitionKey { get; set; } = "";
    public string RowKey { get; set; } = "";
    public DateTimeOffset? Timestamp { get; set; }
    public ETag ETag { get; set; }

    public string RunId { get => PartitionKey; set => PartitionKey = value; }
    /// <summary>The run's <see cref="RunRecord.Version"/> this event announces.</summary>
    public long Version { get; set; }
    public string Type { get; set; } = "";
    /// <summary>When the change was saved (the CloudEvent's time).</summary>
    public DateTimeOffset Time { get; set; }

    // The run as the change left it: the event's data, as it was at that version (not as it is when published).
    public string Stage { get; set; } = "";
    public string Status { get; set; } = "";
    public string CountsJson { get; set; } = "{}";
    public string ArtifactsJson { get; set; } = "{}";
    public string? Error { get; set; }
    public string? ErrorCode { get; set; }

    /// <summary>How many times a dispatcher took it after its transition did not publish it.</summary>
    public int Attempts { get; set; }

    /// <summary>The CloudEvent id: the same for every publish of this event.</summary>
    public string EventId => $"{RunId}:{Version}:{Type}";

    public Dictionary<string, long> GetCounts() => RunJson.ReadCounts(CountsJson);
    public Dictionary<string, string> GetArtifacts() => RunJson.ReadStrings(ArtifactsJson);

    public static string RowKeyFor(long version, string type) => $"{RowKeyPrefix}{version:D12}-{type}";

    /// <summary>The event of type <paramref name="type"/> that <paramref name="run"/>'s current version announces.</summary>
    public static RunOutboxEntry For(RunRecord run, string type) => new()
    {
        RunId = run.RunId,
        RowKey = RowKeyFor(run.Version, type),
        Version = run.Version,
        Type = type,
        Time = run.UpdatedAt,
        Stage = run.Stage,
        Status = run.Status,
        CountsJson = run.CountsJson,
        ArtifactsJson = run.ArtifactsJson,
        Error = run.Error,
        ErrorCode = run.ErrorCode,
    };

    /// <summary>The table filter that selects pending events (of one run, or of all).</summary>
    public static string Filter(string? runId = null)
    {
        // '.' follows '-' in ASCII: the range holds exactly the keys that start with the prefix.
        var range = TableClient.CreateQueryFilter($"RowKey ge {RowKeyPrefix} and RowKey lt {"event."}");
        return runId is null ? range : $"{TableClient.CreateQueryFilter($"PartitionKey eq {runId}")} and {range}";
    }
}
