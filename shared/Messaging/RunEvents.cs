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
        public const string RunFailed = "pipeline.run.failed";
        public const string StageRetrying = "pipeline.run.stage.retrying";
        public const string DatasetCreated = "pipeline.dataset.created";
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
        logger.LogInformation("Run {RunId}: {EventType} (stage {Stage}, status {Status})", run.RunId, type, run.Stage, run.Status);
    }
}
