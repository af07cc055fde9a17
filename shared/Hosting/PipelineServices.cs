using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Inference;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Hosting;

/// <summary>The composition of the platform: one call per area, read top to bottom.</summary>
public static class PipelineServices
{
    public static IServiceCollection AddPipelineStorage(this IServiceCollection services, IConfiguration configuration)
    {
        services.AddSingleton(_ => StorageClients.FromConfiguration(configuration, QueuesOptions.From(configuration).QueueMessageEncoding));
        services.AddSingleton<BlobCopier>();
        return services;
    }

    public static IServiceCollection AddPipelineRuns(this IServiceCollection services)
    {
        services.AddSingleton<RunStore>();
        services.AddSingleton<RunTransitions>();
        services.AddSingleton<RunEvents>();
        services.AddSingleton<QueueSender>();
        services.AddSingleton<FailedMessages>();
        services.AddSingleton<CommandRouter>();
        return services;
    }

    public static IServiceCollection AddIngestion(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<IngestionOptions>(configuration.GetSection(IngestionOptions.Section));
        services.AddSingleton<IngestHandler>();
        services.AddSingleton<Models.ModelRegistry>();
        services.AddSingleton<Models.ModelDropHandler>();
        return services;
    }

    public static IServiceCollection AddPreprocessing(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<PreprocessingOptions>(configuration.GetSection(PreprocessingOptions.Section));
        services.AddSingleton<PreprocessHandler>();
        services.AddSingleton<StageMessages>();
        return services;
    }

    public static IServiceCollection AddInference(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<InferenceSettings>(configuration.GetSection(InferenceSettings.Section));
        services.AddSingleton<ModelSessions>();
        services.AddSingleton<InferenceHandler>();
        return services;
    }
}
