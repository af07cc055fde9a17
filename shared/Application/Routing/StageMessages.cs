using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Pipeline.FineTuning;
using Pipeline.Inference;
using Pipeline.Ingestion;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>
/// Opens the envelopes of stage messages (and of the matching commands) and hands their bodies to the
/// stage handlers. A message that cannot be read is invalid for good, never retried.
/// </summary>
public sealed class StageMessages(PreprocessHandler preprocess, InferenceHandler inference, FineTuneHandler fineTune, StorageClients storage)
{
    public Task PreprocessAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var envelope = Open(message, MessageTypes.Preprocess);
        return PreprocessAsync(envelope, RunIds.ForMessage(StorageNames.Queues.Preprocess, message), dequeueCount, cancellationToken);
    }

    /// <summary>A preprocess message or command; a command without a run id gets one derived from its text.</summary>
    public Task PreprocessAsync(MessageEnvelope envelope, string fallbackRunId, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(envelope, PipelineJson.Default.PreprocessRequest);
        if (string.IsNullOrWhiteSpace(body.DatasetId))
        {
            throw new InvalidMessageException("The preprocess message has no 'datasetId'. Name a dataset, for example \"ds-1755ccda47ec763297f29676\".");
        }

        try
        {
            body.Spec?.Validate("in the preprocess message");
        }
        catch (RunSpecException e)
        {
            throw new InvalidMessageException(e.Message);
        }

        return preprocess.HandleAsync(body, envelope.RunId ?? fallbackRunId, dequeueCount, cancellationToken);
    }

    public Task PreprocessPartitionAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(Open(message, MessageTypes.PreprocessPartition), PreprocessJson.Default.PreprocessPartitionRequest);
        if (string.IsNullOrWhiteSpace(body.DatasetId) || string.IsNullOrWhiteSpace(body.PreparedId))
        {
            throw new InvalidMessageException("The preprocess-partition message needs 'datasetId' and 'preparedId'.");
        }

        return preprocess.HandlePartitionAsync(body, dequeueCount, cancellationToken);
    }

    public Task InferenceAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var envelope = Open(message, MessageTypes.Inference);
        return InferenceAsync(envelope, RunIds.ForMessage(StorageNames.Queues.Inference, message), dequeueCount, cancellationToken);
    }

    /// <summary>An inference message or <c>infer</c> command; a command without a run id gets one derived from its text.</summary>
    public Task InferenceAsync(MessageEnvelope envelope, string fallbackRunId, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(envelope, InferenceCommandJson.Default.InferenceRequest);
        if (string.IsNullOrWhiteSpace(body.ModelId) || string.IsNullOrWhiteSpace(body.Input))
        {
            throw new InvalidMessageException($"The {envelope.Type} message needs 'modelId' and 'input', for example {{\"modelId\":\"sentiment-v1\",\"input\":\"incoming/to-score.jsonl\"}}.");
        }

        return inference.HandleAsync(body, envelope.RunId ?? fallbackRunId, dequeueCount, cancellationToken);
    }

    /// <summary>A <c>retry-failed</c> command: rescore the failed rows of a finished batch.</summary>
    public Task RetryFailedAsync(MessageEnvelope envelope, string fallbackRunId, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(envelope, InferenceJson.Default.RetryFailedCommand);
        if (string.IsNullOrWhiteSpace(body.BatchId))
        {
            throw new InvalidMessageException("The retry-failed command needs 'batchId', for example {\"batchId\":\"bt-0123456789abcdef01234567\"}.");
        }

        return inference.RetryFailedAsync(body, envelope.RunId ?? fallbackRunId, dequeueCount, cancellationToken);
    }

    public Task InferenceShardAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(Open(message, MessageTypes.InferenceShard), InferenceJson.Default.InferenceShardRequest);
        if (string.IsNullOrWhiteSpace(body.BatchId))
        {
            throw new InvalidMessageException("The inference-shard message has no 'batchId'.");
        }

        return inference.HandleShardAsync(body, dequeueCount, cancellationToken);
    }

    public Task FineTuneAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var envelope = Open(message, MessageTypes.FineTune);
        var body = Body(envelope, PreprocessJson.Default.FineTuneRequest);
        if (string.IsNullOrWhiteSpace(body.PreparedManifest))
        {
            throw new InvalidMessageException("The finetune message has no 'preparedManifest'.");
        }

        return fineTune.HandleAsync(body, envelope.RunId ?? RunIds.ForMessage(StorageNames.Queues.FineTune, message), dequeueCount, cancellationToken);
    }

    /// <summary>
    /// A <c>finetune</c> command: a dataset (and optionally which prepared version of it) and the fine-tune
    /// settings; without a prepared id, the dataset's newest prepared version is used.
    /// </summary>
    public async Task FineTuneCommandAsync(MessageEnvelope envelope, string fallbackRunId, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(envelope, FineTuneJson.Default.FineTuneCommand);
        if (string.IsNullOrWhiteSpace(body.DatasetId))
        {
            throw new InvalidMessageException("The finetune command needs 'datasetId' (and optionally 'preparedId' and a 'fineTune' object), for example {\"datasetId\":\"ds-1755ccda47ec763297f29676\",\"fineTune\":{\"epochs\":10}}.");
        }

        var preparedId = body.PreparedId ?? await NewestPreparedAsync(body.DatasetId, cancellationToken)
            ?? throw new InvalidMessageException($"Dataset {body.DatasetId} has no prepared version: preprocess it first (a preprocess command, or pipeline submit).");
        var spec = new RunSpec { FineTune = body.FineTune ?? JsonDocument.Parse("{}").RootElement.Clone() };
        var request = new FineTuneRequest(body.DatasetId, preparedId, $"{StorageNames.Containers.Datasets}/{PreparedPaths.Folder(body.DatasetId, preparedId)}manifest.json", spec);
        await fineTune.HandleAsync(request, envelope.RunId ?? fallbackRunId, dequeueCount, cancellationToken);
    }

    private async Task<string?> NewestPreparedAsync(string datasetId, CancellationToken cancellationToken)
    {
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        (string Id, DateTimeOffset At)? newest = null;
        await foreach (var blob in datasets.GetBlobsAsync(Azure.Storage.Blobs.Models.BlobTraits.None, Azure.Storage.Blobs.Models.BlobStates.None, $"{datasetId}/prepared/", cancellationToken))
        {
            if (blob.Name.EndsWith("/manifest.json", StringComparison.Ordinal) && blob.Properties.LastModified is { } at && (newest is null || at > newest.Value.At))
            {
                newest = (blob.Name.Split('/')[2], at);
            }
        }

        return newest?.Id;
    }

    public Task FineTuneMonitorAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(Open(message, MessageTypes.FineTuneMonitor), FineTuneJson.Default.FineTuneMonitorRequest);
        if (string.IsNullOrWhiteSpace(body.JobId))
        {
            throw new InvalidMessageException("The finetune-monitor message has no 'jobId'.");
        }

        return fineTune.MonitorAsync(body, dequeueCount, cancellationToken);
    }

    public static MessageEnvelope Open(string message, string? expectedType = null)
    {
        MessageEnvelope envelope;
        try
        {
            envelope = JsonSerializer.Deserialize(message, PipelineJson.Default.MessageEnvelope)
                ?? throw new InvalidMessageException("The message is empty (null).");
        }
        catch (JsonException e)
        {
            throw new InvalidMessageException($"The message is not a valid command document: {e.Message}. Expected {{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{{\"blob\":\"incoming/data.jsonl\"}}}}.");
        }

        if (envelope.SchemaVersion != MessageEnvelope.CurrentSchemaVersion)
        {
            throw new InvalidMessageException($"The message has schemaVersion {envelope.SchemaVersion}; this version of Pipeline reads schemaVersion {MessageEnvelope.CurrentSchemaVersion}.");
        }

        if (expectedType is not null && envelope.Type != expectedType)
        {
            throw new InvalidMessageException($"The {expectedType} queue received a '{envelope.Type}' message.");
        }

        return envelope;
    }

    public static T Body<T>(MessageEnvelope envelope, JsonTypeInfo<T> type)
    {
        try
        {
            return envelope.Body.ValueKind == JsonValueKind.Object
                ? envelope.Body.Deserialize(type) ?? throw new InvalidMessageException($"The {envelope.Type} message has an empty body.")
                : throw new InvalidMessageException($"The {envelope.Type} message needs a 'body' object.");
        }
        catch (JsonException e)
        {
            throw new InvalidMessageException($"The {envelope.Type} message's body is not valid: {e.Message}");
        }
    }
}
