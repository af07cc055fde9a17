using Azure.Messaging.ServiceBus;
using Microsoft.Extensions.Logging;
using Pipeline.Ingestion;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>How a Service Bus command is settled (the trigger's <c>ServiceBusMessageActions</c> in Azure).</summary>
public interface IServiceBusSettlement
{
    Task CompleteAsync(ServiceBusReceivedMessage message, CancellationToken cancellationToken);
    Task DeadLetterAsync(ServiceBusReceivedMessage message, string reason, string description, CancellationToken cancellationToken);
}

/// <summary>
/// Commands from the Service Bus <c>commands</c> queue take the storage <c>commands</c> queue's route
/// (<see cref="CommandRouter"/>). A command that can never succeed is recorded in <c>poisonmessages</c>
/// (partition <see cref="Source"/>), its run failed, and the message dead-lettered with the reason; a busy
/// run's command waits on the storage commands queue; any other failure is left unsettled, so Service Bus
/// redelivers it and, after the queue's max delivery count, dead-letters it, where
/// <see cref="RecordDeadLetterAsync"/> records it and fails its run.
/// </summary>
public sealed class ServiceBusCommands(CommandRouter router, FailedMessages failed, ILogger<ServiceBusCommands> logger)
{
    /// <summary>Where Service Bus commands are recorded (partition of the poisonmessages table).</summary>
    public const string Source = "servicebus-commands";
    /// <summary>The dead-letter reason of a command refused as invalid.</summary>
    public const string InvalidCommandReason = "InvalidCommand";
    private const int MaxDescription = 4096;

    public async Task HandleAsync(ServiceBusReceivedMessage message, IServiceBusSettlement settlement, CancellationToken cancellationToken)
    {
        var text = message.Body.ToString();
        try
        {
            await router.HandleAsync(text, message.DeliveryCount, cancellationToken);
        }
        catch (RunBusyException e)
        {
            await failed.DeferAsync(StorageNames.Queues.Commands, text, message.MessageId, e, cancellationToken);
            logger.LogInformation("Service Bus command {MessageId}: {Reason}; it waits on the storage commands queue", message.MessageId, e.Message);
        }
        catch (InvalidMessageException e)
        {
            await failed.RecordInvalidAsync(Source, text, message.MessageId, e.Message, cancellationToken);
            await settlement.DeadLetterAsync(message, InvalidCommandReason, e.Message.Length > MaxDescription ? e.Message[..MaxDescription] : e.Message, cancellationToken);
            return;
        }

        await settlement.CompleteAsync(message, cancellationToken);
    }

    /// <summary>A message on the dead-letter queue: recorded with Service Bus's reason unless it was refused (and recorded) here.</summary>
    public async Task RecordDeadLetterAsync(ServiceBusReceivedMessage message, IServiceBusSettlement settlement, CancellationToken cancellationToken)
    {
        if (message.DeadLetterReason != InvalidCommandReason)
        {
            var reason = $"Service Bus dead-lettered the command after {message.DeliveryCount} delivery attempt(s): {message.DeadLetterReason}"
                + (string.IsNullOrEmpty(message.DeadLetterErrorDescription) ? "" : $" ({message.DeadLetterErrorDescription})");
            await failed.RecordDeadLetteredAsync(Source, message.Body.ToString(), message.MessageId, reason, message.DeliveryCount, cancellationToken);
        }

        await settlement.CompleteAsync(message, cancellationToken);
    }
}
