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

    public static void MapQueueFunctions(this WebApplication app)
    {
        app.MapQueueFunction("Ingest", StorageNames.Queues.BlobCreated,
            (services, message, invocation, ct) => services.GetRequiredService<IngestHandler>().HandleBlobCreatedAsync(message, invocation.GetDequeueCount(), ct));
        app.MapQueueFunction("Commands", StorageNames.Queues.Commands,
            (services, message, invocation, ct) => services.GetRequiredService<CommandRouter>().HandleAsync(message, invocation.GetDequeueCount(), ct));
        // Service Bus commands: the host's serviceBusTrigger hands the message body to the same router.
        app.MapQueueFunction("CommandsServiceBus", ServiceBusCommands,
            (services, message, invocation, ct) => services.GetRequiredService<CommandRouter>().HandleAsync(message, invocation.GetDeliveryCount(), ct));
        app.MapQueueFunction("Preprocess", StorageNames.Queues.Preprocess,
            (services, message, invocation, ct) => services.GetRequiredService<StageMessages>().PreprocessAsync(message, invocation.GetDequeueCount(), ct));
        app.MapQueueFunction("IngestPoison", StorageNames.Queues.Poison(StorageNames.Queues.BlobCreated),
            (services, message, invocation, ct) => services.GetRequiredService<FailedMessages>().RecordPoisonAsync(StorageNames.Queues.BlobCreated, message, invocation.GetMetadataText("Id"), ct));
        app.MapQueueFunction("CommandsPoison", StorageNames.Queues.Poison(StorageNames.Queues.Commands),
            (services, message, invocation, ct) => services.GetRequiredService<FailedMessages>().RecordPoisonAsync(StorageNames.Queues.Commands, message, invocation.GetMetadataText("Id"), ct));
        app.MapQueueFunction("PreprocessPoison", StorageNames.Queues.Poison(StorageNames.Queues.Preprocess),
            (services, message, invocation, ct) => services.GetRequiredService<FailedMessages>().RecordPoisonAsync(StorageNames.Queues.Preprocess, message, invocation.GetMetadataText("Id"), ct));
    }

    /// <summary>The functions this app serves and the queue each one's function.json must name.</summary>
    public static readonly IReadOnlyDictionary<string, string> Triggers = new Dictionary<string, string>
    {
        ["Ingest"] = StorageNames.Queues.BlobCreated,
        ["Commands"] = StorageNames.Queues.Commands,
        ["IngestPoison"] = StorageNames.Queues.Poison(StorageNames.Queues.BlobCreated),
        ["CommandsPoison"] = StorageNames.Queues.Poison(StorageNames.Queues.Commands),
        ["Preprocess"] = StorageNames.Queues.Preprocess,
        ["PreprocessPoison"] = StorageNames.Queues.Poison(StorageNames.Queues.Preprocess),
    };

    private static void MapQueueFunction(this WebApplication app, string name, string queue, Func<IServiceProvider, string, InvocationRequest, CancellationToken, Task> handle)
    {
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
                await services.GetRequiredService<StorageClients>().Queue(queue).SendMessageAsync(message, RunLease.RetryAfter, cancellationToken: ct);
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
