using System.Text.Json;
using Pipeline.Hosting;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Functions;

/// <summary>
/// Maps each queue-triggered function (folder + function.json) to its stage handler, behind the
/// custom-handler contract: 200 acknowledges the message, 500 makes the host retry it.
/// </summary>
public static class QueueFunctions
{
    private const string Binding = "message";

    /// <summary>Where invalid Service Bus commands are recorded (partition of the poisonmessages table).</summary>
    public const string ServiceBusCommands = "servicebus-commands";

    private delegate Task Handler(IServiceProvider services, string message, InvocationRequest invocation, CancellationToken cancellationToken);

    /// <summary>
    /// A function: its trigger source (a queue, or the Service Bus label), the storage queue a busy delivery
    /// is put back on, and the stage handler it maps to.
    /// </summary>
    private sealed record QueueFunction(string Name, string Source, string RetryQueue, Handler Handle);

    private static readonly QueueFunction[] Functions =
    [
        new("Ingest", StorageNames.Queues.BlobCreated, StorageNames.Queues.BlobCreated,
            (services, message, invocation, ct) => services.GetRequiredService<IngestHandler>().HandleBlobCreatedAsync(message, invocation.GetDequeueCount(), ct)),
        new("Commands", StorageNames.Queues.Commands, StorageNames.Queues.Commands,
            (services, message, invocation, ct) => services.GetRequiredService<CommandRouter>().HandleAsync(message, invocation.GetDequeueCount(), ct)),
        // Service Bus commands take the storage commands' path; a busy one waits on the storage commands queue.
        new("CommandsServiceBus", ServiceBusCommands, StorageNames.Queues.Commands,
            (services, message, invocation, ct) => services.GetRequiredService<CommandRouter>().HandleAsync(message, invocation.GetDeliveryCount(), ct)),
        new("Preprocess", StorageNames.Queues.Preprocess, StorageNames.Queues.Preprocess,
            (services, message, invocation, ct) => services.GetRequiredService<StageMessages>().PreprocessAsync(message, invocation.GetDequeueCount(), ct)),
        new("FineTune", StorageNames.Queues.FineTune, StorageNames.Queues.FineTune,
            (services, message, invocation, ct) => services.GetRequiredService<StageMessages>().FineTuneAsync(message, invocation.GetDequeueCount(), ct)),
        new("FineTuneMonitor", StorageNames.Queues.FineTuneMonitor, StorageNames.Queues.FineTuneMonitor,
            (services, message, invocation, ct) => services.GetRequiredService<StageMessages>().FineTuneMonitorAsync(message, invocation.GetDequeueCount(), ct)),
        new("Inference", StorageNames.Queues.Inference, StorageNames.Queues.Inference,
            (services, message, invocation, ct) => services.GetRequiredService<StageMessages>().InferenceAsync(message, invocation.GetDequeueCount(), ct)),
        new("InferenceShard", StorageNames.Queues.InferenceShard, StorageNames.Queues.InferenceShard,
            (services, message, invocation, ct) => services.GetRequiredService<StageMessages>().InferenceShardAsync(message, invocation.GetDequeueCount(), ct)),
        Poison("IngestPoison", StorageNames.Queues.BlobCreated),
        Poison("CommandsPoison", StorageNames.Queues.Commands),
        Poison("PreprocessPoison", StorageNames.Queues.Preprocess),
        Poison("FineTunePoison", StorageNames.Queues.FineTune),
        Poison("FineTuneMonitorPoison", StorageNames.Queues.FineTuneMonitor),
        Poison("InferencePoison", StorageNames.Queues.Inference),
        Poison("InferenceShardPoison", StorageNames.Queues.InferenceShard),
    ];

    /// <summary>The queue-triggered functions this app serves and the queue each one's function.json must name.</summary>
    public static readonly IReadOnlyDictionary<string, string> Triggers =
        Functions.Where(f => f.Source != ServiceBusCommands).ToDictionary(f => f.Name, f => f.Source);

    public static void MapQueueFunctions(this WebApplication app)
    {
        foreach (var function in Functions)
        {
            app.MapQueueFunction(function);
        }
    }

    /// <summary>The handler of <c>&lt;queue&gt;-poison</c>: records the message with its run's last error.</summary>
    private static QueueFunction Poison(string name, string sourceQueue)
    {
        var poisonQueue = StorageNames.Queues.Poison(sourceQueue);
        return new(name, poisonQueue, poisonQueue,
            (services, message, invocation, ct) => services.GetRequiredService<FailedMessages>().RecordPoisonAsync(sourceQueue, message, invocation.GetMetadataText("Id"), ct));
    }

    private static void MapQueueFunction(this WebApplication app, QueueFunction function)
    {
        var (name, queue, retryQueue, handle) = function;
        app.MapPost($"/{name}", async (HttpContext http, IServiceProvider services, ILoggerFactory loggers, CancellationToken ct) =>
        {
            var logger = loggers.CreateLogger($"Function.{name}");
            var invocation = await JsonSerializer.DeserializeAsync(http.Request.Body, InvocationJson.Default.InvocationRequest, ct)
                ?? new InvocationRequest();
            var message = invocation.GetText(Binding);
            if (message is null)
            {
                return Respond(StatusCodes.Status400BadRequest, $"The invocation has no '{Binding}' binding data.");
            }

            try
            {
                await handle(services, message, invocation, ct);
                return Respond(StatusCodes.Status200OK, $"{name} completed");
            }
            catch (RunBusyException e)
            {
                // Not a failure: put the message back for later, without spending a delivery attempt.
                await services.GetRequiredService<StorageClients>().Queue(retryQueue).SendMessageAsync(message, RunLease.RetryAfter, cancellationToken: ct);
                return Respond(StatusCodes.Status200OK, $"{name}: {e.Message}");
            }
            catch (InvalidMessageException e)
            {
                // Can never succeed: record it with its reason and acknowledge, so it is not retried.
                await services.GetRequiredService<FailedMessages>().RecordInvalidAsync(queue, message, invocation.GetMetadataText("Id"), e.Message, ct);
                return Respond(StatusCodes.Status200OK, $"{name}: invalid message recorded: {e.Message}");
            }
            catch (Exception e) when (!ct.IsCancellationRequested)
            {
                logger.LogError(e, "{Function} failed; the host will retry the message", name);
                return Respond(StatusCodes.Status500InternalServerError, $"{name} failed: {e.GetType().Name}: {e.Message}");
            }
        });
    }

    private static IResult Respond(int status, string log) =>
        Results.Json(new InvocationResponse { Logs = [log] }, InvocationJson.Default.InvocationResponse, statusCode: status);
}
