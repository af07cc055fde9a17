using System.Text.Json;
using System.Text.Json.Serialization;
using Pipeline.Ingestion;
using Pipeline.Runs;

namespace Pipeline.Messaging;

/// <summary>
/// The envelope of every message the platform puts on a queue: references, never payloads.
/// <see cref="Body"/> is the type-specific part (see <see cref="MessageTypes"/>).
/// </summary>
public sealed record MessageEnvelope
{
    public const int CurrentSchemaVersion = 1;

    public int SchemaVersion { get; set; } = CurrentSchemaVersion;
    public required string Type { get; init; }
    public string? RunId { get; init; }
    public string? CorrelationId { get; init; }
    /// <summary>W3C trace context of the sender, so one run can be followed across stages.</summary>
    public string? TraceParent { get; init; }
    public int Attempt { get; set; } = 1;
    public JsonElement Body { get; init; }
}

public static class MessageTypes
{
    public const string Ingest = "ingest";
    public const string Preprocess = "preprocess";
    public const string PreprocessPartition = "preprocess-partition";
    public const string FineTune = "finetune";
    public const string Cancel = "cancel";
    public const string Inference = "inference";
    public const string Infer = "infer";
    public const string InferenceShard = "inference-shard";
    public const string RetryFailed = "retry-failed";
    public const string FineTuneMonitor = "finetune-monitor";
}

/// <summary>Body of an <c>ingest</c> command: a blob already in the account, and optionally a run spec.</summary>
public sealed record IngestCommand(string Blob, RunSpec? Spec = null);

/// <summary>Body of a <c>cancel</c> command: the run to stop, and why.</summary>
public sealed record CancelCommand(string RunId, string? Reason = null);

/// <summary>Body of a <c>preprocess</c> message: the dataset ingestion produced and the run spec to follow.</summary>
public sealed record PreprocessRequest(string DatasetId, string DatasetManifest, RunSpec? Spec = null);

/// <summary>An Event Grid <c>Microsoft.Storage.BlobCreated</c> event (Event Grid schema), as delivered to the blob-created queue.</summary>
public sealed record BlobCreatedEvent
{
    public const string EventTypeName = "Microsoft.Storage.BlobCreated";

    public string Id { get; set; } = "";
    public string? Topic { get; init; }
    public string Subject { get; set; } = "";
    public string EventType { get; set; } = "";
    public DateTimeOffset EventTime { get; init; }
    public BlobCreatedData Data { get; set; } = new();
    public string DataVersion { get; set; } = "";
    public string MetadataVersion { get; set; } = "1";

    /// <summary>Container and blob name from the subject <c>/blobServices/default/containers/{c}/blobs/{name}</c>.</summary>
    public (string Container, string Blob)? ParseSubject()
    {
        const string prefix = "/blobServices/default/containers/";
        if (!Subject.StartsWith(prefix, StringComparison.Ordinal))
        {
            return null;
        }

        var rest = Subject[prefix.Length..];
        var split = rest.IndexOf("/blobs/", StringComparison.Ordinal);
        return split <= 0 ? null : (rest[..split], rest[(split + "/blobs/".Length)..]);
    }
}

public sealed record BlobCreatedData
{
    public string Api { get; set; } = "PutBlob";
    public string? ClientRequestId { get; init; }
    public string? RequestId { get; init; }
    public string ETag { get; set; } = "";
    public string? ContentType { get; init; }
    public long ContentLength { get; init; }
    public string BlobType { get; set; } = "BlockBlob";
    public string Url { get; set; } = "";
    public string? Sequencer { get; init; }
}

[JsonSourceGenerationOptions(
    JsonSerializerDefaults.Web,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    WriteIndented = false)]
[JsonSerializable(typeof(MessageEnvelope))]
[JsonSerializable(typeof(IngestCommand))]
[JsonSerializable(typeof(PreprocessRequest))]
[JsonSerializable(typeof(BlobCreatedEvent))]
[JsonSerializable(typeof(BlobCreatedEvent[]))]
[JsonSerializable(typeof(RunEventData))]
[JsonSerializable(typeof(Dictionary<string, long>))]
[JsonSerializable(typeof(CancelCommand))]
[JsonSerializable(typeof(RunSpec))]
[JsonSerializable(typeof(DatasetManifest))]
[JsonSerializable(typeof(IngestReport))]
[JsonSerializable(typeof(RecordError))]
public sealed partial class PipelineJson : JsonSerializerContext;
