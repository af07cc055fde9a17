using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
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
public sealed class StageMessages(PreprocessHandler preprocess, InferenceHandler inference)
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

    public Task InferenceAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var envelope = Open(message, MessageTypes.Inference);
        return InferenceAsync(envelope, RunIds.ForMessage(StorageNames.Queues.Inference, message), dequeueCount, cancellationToken);
    }

    /// <summary>An inference message or <c>infer</c> command; a command without a run id gets one derived from its text.</summary>
    public Task InferenceAsync(MessageEnvelope envelope, string fallbackRunId, int dequeueCount, CancellationToken cancellationToken)
    {
        var body = Body(envelope, InferenceJson.Default.InferenceRequest);
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
