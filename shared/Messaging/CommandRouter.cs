using System.Text.Json;
using Pipeline.Ingestion;

namespace Pipeline.Messaging;

/// <summary>
/// Routes command documents (the <c>commands</c> storage queue, and Service Bus through the host's binding)
/// to the stage that handles them. A command that can never succeed is recorded with its reason, not retried.
/// </summary>
public sealed class CommandRouter(IngestHandler ingest)
{
    public static readonly string[] SupportedTypes = [MessageTypes.Ingest];

    /// <exception cref="InvalidMessageException">The command is malformed or names something that does not exist.</exception>
    public async Task HandleAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        MessageEnvelope envelope;
        try
        {
            envelope = JsonSerializer.Deserialize(message, PipelineJson.Default.MessageEnvelope)
                ?? throw new InvalidMessageException("The command is empty (null).");
        }
        catch (JsonException e)
        {
            throw new InvalidMessageException($"The command is not a valid command document: {e.Message}. Expected {{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{{\"blob\":\"incoming/data.jsonl\"}}}}.");
        }

        if (envelope.SchemaVersion != MessageEnvelope.CurrentSchemaVersion)
        {
            throw new InvalidMessageException($"The command has schemaVersion {envelope.SchemaVersion}; this version of Pipeline reads schemaVersion {MessageEnvelope.CurrentSchemaVersion}.");
        }

        switch (envelope.Type)
        {
            case MessageTypes.Ingest:
                var command = Body(envelope, PipelineJson.Default.IngestCommand);
                if (string.IsNullOrWhiteSpace(command.Blob))
                {
                    throw new InvalidMessageException("The ingest command has no 'blob'. Name a blob already in the account, for example \"incoming/reviews.tsv\".");
                }

                await ingest.HandleCommandAsync(command, envelope.RunId, dequeueCount, cancellationToken);
                return;
            default:
                throw new InvalidMessageException($"Unknown command type '{envelope.Type}'. This version handles: {string.Join(", ", SupportedTypes)}.");
        }
    }

    private static T Body<T>(MessageEnvelope envelope, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> type)
    {
        try
        {
            return envelope.Body.ValueKind == JsonValueKind.Object
                ? envelope.Body.Deserialize(type) ?? throw new InvalidMessageException($"The {envelope.Type} command has an empty body.")
                : throw new InvalidMessageException($"The {envelope.Type} command needs a 'body' object.");
        }
        catch (JsonException e)
        {
            throw new InvalidMessageException($"The {envelope.Type} command's body is not valid: {e.Message}");
        }
        catch (Pipeline.Runs.RunSpecException e)
        {
            throw new InvalidMessageException(e.Message);
        }
    }
}
