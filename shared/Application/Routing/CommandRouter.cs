using Pipeline.Ingestion;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>
/// Routes command documents (the <c>commands</c> storage queue, and Service Bus through the host's binding)
/// to the stage that handles them. A command that can never succeed is recorded with its reason, not retried.
/// </summary>
public sealed class CommandRouter(IngestHandler ingest, StageMessages stages, RunTransitions transitions)
{
    public static readonly string[] SupportedTypes = [MessageTypes.Ingest, MessageTypes.Preprocess, MessageTypes.FineTune, MessageTypes.Infer, MessageTypes.RetryFailed, MessageTypes.Cancel];

    /// <exception cref="InvalidMessageException">The command is malformed or names something that does not exist.</exception>
    public async Task HandleAsync(string message, int dequeueCount, CancellationToken cancellationToken)
    {
        var envelope = StageMessages.Open(message);
        switch (envelope.Type)
        {
            case MessageTypes.Ingest:
                var command = StageMessages.Body(envelope, PipelineJson.Default.IngestCommand);
                if (string.IsNullOrWhiteSpace(command.Blob))
                {
                    throw new InvalidMessageException("The ingest command has no 'blob'. Name a blob already in the account, for example \"incoming/reviews.tsv\".");
                }

                await ingest.HandleCommandAsync(command, envelope.RunId, dequeueCount, cancellationToken);
                return;
            case MessageTypes.Preprocess:
                await stages.PreprocessAsync(envelope, RunIds.ForMessage(StorageNames.Queues.Commands, message), dequeueCount, cancellationToken);
                return;
            case MessageTypes.FineTune:
                await stages.FineTuneCommandAsync(envelope, RunIds.ForMessage(StorageNames.Queues.Commands, message), dequeueCount, cancellationToken);
                return;
            case MessageTypes.Infer or MessageTypes.Inference:
                await stages.InferenceAsync(envelope, RunIds.ForMessage(StorageNames.Queues.Commands, message), dequeueCount, cancellationToken);
                return;
            case MessageTypes.RetryFailed:
                await stages.RetryFailedAsync(envelope, RunIds.ForMessage(StorageNames.Queues.Commands, message), dequeueCount, cancellationToken);
                return;
            case MessageTypes.Cancel:
                var cancel = StageMessages.Body(envelope, PipelineJson.Default.CancelCommand);
                if (await transitions.CancelAsync(cancel.RunId ?? "", cancel.Reason, cancellationToken) is null)
                {
                    throw new InvalidMessageException($"The cancel command names run '{cancel.RunId}', which does not exist.");
                }

                return;
            default:
                throw new InvalidMessageException($"Unknown command type '{envelope.Type}'. This version handles: {string.Join(", ", SupportedTypes)}.");
        }
    }
}
