using Microsoft.Extensions.DependencyInjection;
using Pipeline.Messaging;
using Pipeline.Runs;

namespace Pipeline.Hosting;

public static class RunServices
{
    /// <summary>The run table, stage transitions, run events and the queue sender.</summary>
    public static IServiceCollection AddPipelineRuns(this IServiceCollection services)
    {
        services.AddSingleton<RunStore>();
        services.AddSingleton<RunTransitions>();
        services.AddSingleton<RunEvents>();
        services.AddSingleton<QueueSender>();
        return services;
    }
}
