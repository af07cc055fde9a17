#if SERVICEBUS
using Azure.Messaging.ServiceBus;
using Microsoft.Azure.Functions.Worker;
using Pipeline.Messaging;

namespace Pipeline.Functions.Triggers;

/// <summary>
/// The Service Bus <c>commands</c> queue (the Azure build only: <c>-p:ServiceBus=true</c>, where the worker's
/// Service Bus extension can be restored). Routing and settlement are <see cref="ServiceBusCommands"/>'s.
/// </summary>
public sealed class ServiceBusFunctions(ServiceBusCommands commands)
{
    private const string Queue = "commands";
    private const string Connection = "ServiceBusConnection";

    [Function("CommandsServiceBus")]
    public Task CommandsAsync(
        [ServiceBusTrigger(Queue, Connection = Connection, AutoCompleteMessages = false)] ServiceBusReceivedMessage message,
        ServiceBusMessageActions actions,
        CancellationToken cancellationToken) =>
        commands.HandleAsync(message, new Settlement(actions), cancellationToken);

    [Function("CommandsServiceBusDeadLetter")]
    public Task DeadLetterAsync(
        [ServiceBusTrigger(Queue + "/$deadletterqueue", Connection = Connection, AutoCompleteMessages = false)] ServiceBusReceivedMessage message,
        ServiceBusMessageActions actions,
        CancellationToken cancellationToken) =>
        commands.RecordDeadLetterAsync(message, new Settlement(actions), cancellationToken);

    private sealed class Settlement(ServiceBusMessageActions actions) : IServiceBusSettlement
    {
        public Task CompleteAsync(ServiceBusReceivedMessage message, CancellationToken cancellationToken) =>
            actions.CompleteMessageAsync(message, cancellationToken);

        public Task DeadLetterAsync(ServiceBusReceivedMessage message, string reason, string description, CancellationToken cancellationToken) =>
            actions.DeadLetterMessageAsync(message, deadLetterReason: reason, deadLetterErrorDescription: description, cancellationToken: cancellationToken);
    }
}
#endif
