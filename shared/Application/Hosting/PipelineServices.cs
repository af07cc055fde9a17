using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Messaging;

namespace Pipeline.Hosting;

/// <summary>
/// The composition of the platform, in layer order: storage, runs, models, the four stages, then the routing of
/// commands, stage messages and poisoned messages. Each layer's <c>AddXxx</c> lives in its own project.
/// </summary>
public static class PipelineServices
{
    public static IServiceCollection AddPipeline(this IServiceCollection services, IConfiguration configuration) => services
        .AddPipelineStorage(configuration)
        .AddPipelineRuns()
        .AddPipelineModels(configuration)
        .AddIngestion(configuration)
        .AddPreprocessing(configuration)
        .AddInference(configuration)
        .AddFineTuning(configuration)
        .AddPipelineRouting();

    /// <summary>What routes commands, stage messages and poisoned messages to the stages.</summary>
    public static IServiceCollection AddPipelineRouting(this IServiceCollection services)
    {
        services.AddSingleton<FailedMessages>();
        services.AddSingleton<CommandRouter>();
        services.AddSingleton<BlobDrops>();
        services.AddSingleton<ServiceBusCommands>();
        services.AddSingleton<StageMessages>();
        return services;
    }
}
