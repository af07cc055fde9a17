using Microsoft.Extensions.DependencyInjection;
using Pipeline.Messaging;
using Pipeline.Runs;

namespace Pipeline.Hosting;

public static class RunServices
{
    /// <summary>The run table, stage transitions, run events (and the dispatcher of any left unsent) and the queue sender.</summary>
    public static IServiceCollection AddPipelineRuns(this IServiceCollection services)
    {
        services.AddSingleton<RunStore>();
        services.AddSingleton<RunTransitions>();
        services.AddSingleton<RunEvents>();
        services.AddOptions<RunEventsOptions>().BindConfiguration(RunEventsOptions.Section);
        services.AddHostedService<RunEventDispatcher>();
        services.AddSingleton<QueueSender>();
        return services;
    }
}
