using Microsoft.Extensions.Logging;
using Pipeline.Functions.Telemetry;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Functions;

/// <summary>
/// What every queue-triggered function does around its stage handler: the run id as the log scope and on
/// the invocation's spans; a busy run puts the message back for later (no attempt spent); a message that
/// can never succeed is recorded with its reason and acknowledged. Anything else fails the invocation, so
/// the host retries it and, after maxDequeueCount, moves it to the poison queue.
/// </summary>
public sealed class QueueInvocation(FailedMessages failed, ILogger<QueueInvocation> logger)
{
    public async Task RunAsync(string queue, string message, string? messageId, Func<CancellationToken, Task> handle, CancellationToken cancellationToken)
    {
        var runId = FailedMessages.RunIdOf(queue, message);
        using var scope = RunTelemetry.BeginRun(logger, runId);
        try
        {
            await handle(cancellationToken);
        }
        catch (Exception e) when (e is RunBusyException or LeaseLostException)
        {
            // Busy, or this instance lost the stage's lease mid-way (whoever holds it now carries on): try again later, a bounded number of times.
            await failed.DeferAsync(queue, message, messageId, e, cancellationToken);
        }
        catch (InvalidMessageException e)
        {
            await failed.RecordInvalidAsync(queue, message, messageId, e.Message, cancellationToken);
        }
    }
}
