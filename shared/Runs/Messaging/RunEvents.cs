using System.Text.Json;
using Azure.Messaging;
using Microsoft.Extensions.Logging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>The data of every run CloudEvent (type <c>pipeline.run.*</c>), schema version 1.</summary>
public sealed record RunEventData(
    int SchemaVersion,
    string RunId,
    string Stage,
    string Status,
    Dictionary<string, long>? Counts = null,
    Dictionary<string, string>? Artifacts = null,
    string? Error = null,
    string? ErrorCode = null);

/// <summary>Publishes each run transition as a CloudEvent 1.0 (structured JSON) on the <c>events</c> queue.</summary>
public sealed class RunEvents(StorageClients storage, ILogger<RunEvents> logger)
{
    public const string Source = "/pipeline";

    public static class Types
    {
        public const string StageStarted = "pipeline.run.stage.started";
        public const string StageSucceeded = "pipeline.run.stage.succeeded";
        /// <summary>Batch inference finished with some rows failed (the run's status is <c>completed_with_failures</c>).</summary>
        public const string StageCompletedWithFailures = "pipeline.run.stage.completed_with_failures";
        public const string RunFailed = "pipeline.run.failed";
        public const string StageRetrying = "pipeline.run.stage.retrying";
        public const string DatasetCreated = "pipeline.dataset.created";
        public const string RunCancelled = "pipeline.run.cancelled";
        /// <summary>A fine-tune finished an epoch (the data carries the latest metrics).</summary>
        public const string FineTuneProgress = "pipeline.run.finetune.progress";
    }

    /// <summary>A run's recorded transitions, oldest first.</summary>
    public async Task<List<RunEventView>> ListAsync(string runId, CancellationToken cancellationToken = default)
    {
        var events = new List<RunEventView>();
        var filter = Azure.Data.Tables.TableClient.CreateQueryFilter($"PartitionKey eq {runId}");
        await foreach (var e in storage.Table(StorageNames.Tables.RunEvents).QueryAsync<RunEventEntity>(filter, cancellationToken: cancellationToken))
        {
            events.Add(new RunEventView(e.EventId, e.Type, e.Time, e.Stage, e.Status,
                JsonSerializer.Deserialize(e.CountsJson ?? "null", PipelineJson.Default.DictionaryStringInt64), e.Error, e.ErrorCode));
        }

        return events;
    }

    public async Task PublishAsync(string type, RunRecord run, CancellationToken cancellationToken = default)
    {
        var data = new RunEventData(1, run.RunId, run.Stage, run.Status, run.GetCounts(), run.GetArtifacts(), run.Error, run.ErrorCode);
        var cloudEvent = new CloudEvent(Source, type, BinaryData.FromBytes(JsonSerializer.SerializeToUtf8Bytes(data, PipelineJson.Default.RunEventData)), "application/json", CloudEventDataFormat.Json)
        {
            Subject = $"runs/{run.RunId}",
            Time = DateTimeOffset.UtcNow,
        };
        cloudEvent.ExtensionAttributes["runid"] = run.RunId;
        var json = JsonSerializer.Serialize(cloudEvent);
        await storage.Queue(StorageNames.Queues.Events).SendMessageAsync(json, cancellationToken);
        await storage.Table(StorageNames.Tables.RunEvents).AddEntityAsync(new RunEventEntity
        {
            PartitionKey = run.RunId,
            RowKey = $"{cloudEvent.Time:yyyyMMddHHmmssfffffff}-{cloudEvent.Id[..8]}",
            EventId = cloudEvent.Id,
            Type = type,
            Stage = run.Stage,
            Status = run.Status,
            CountsJson = JsonSerializer.Serialize(data.Counts, PipelineJson.Default.DictionaryStringInt64),
            Error = run.Error,
            ErrorCode = run.ErrorCode,
            Time = cloudEvent.Time ?? DateTimeOffset.UtcNow,
        }, cancellationToken);
        logger.LogInformation("Run {RunId}: {EventType} (stage {Stage}, status {Status})", run.RunId, type, run.Stage, run.Status);
    }
}

/// <summary>A run transition as kept in the <c>runevents</c> table (partition = run id, row = time).</summary>
public sealed class RunEventEntity : Azure.Data.Tables.ITableEntity
{
    public string PartitionKey { get; set; } = "";
    public string RowKey { get; set; } = "";
    public DateTimeOffset? Timestamp { get; set; }
    public Azure.ETag ETag { get; set; }
    public string EventId { get; set; } = "";
    public string Type { get; set; } = "";
    public string Stage { get; set; } = "";
    public string Status { get; set; } = "";
    public string? CountsJson { get; set; }
    public string? Error { get; set; }
    public string? ErrorCode { get; set; }
    public DateTimeOffset Time { get; set; }
}
