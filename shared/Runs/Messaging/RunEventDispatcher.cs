using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace Pipeline.Messaging;

/// <summary>
/// Publishes the run events that their transitions saved but did not publish (the events queue failed, or the
/// process stopped between the two), every <see cref="RunEventsOptions.DispatchInterval"/>. Runs in the function app.
/// </summary>
public sealed class RunEventDispatcher(RunEvents events, IOptions<RunEventsOptions> options, ILogger<RunEventDispatcher> logger) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        using var timer = new PeriodicTimer(options.Value.DispatchInterval);
        while (await timer.WaitForNextTickAsync(stoppingToken))
        {
            try
            {
                if (await events.DispatchPendingAsync(stoppingToken) is > 0 and var published)
                {
                    logger.LogInformation("Published {Count} run events left over by their transitions", published);
                }
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                // Listing the outbox failed (storage unavailable): the next tick tries again.
                logger.LogWarning(e, "Run events could not be dispatched: {Error}", e.Message);
            }
        }
    }
}
