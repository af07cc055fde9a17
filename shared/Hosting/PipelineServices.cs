using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Pipeline.FineTuning;
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
        // The local fine-tune backend passes the storage setting on to trainer processes.
        services.TryAddSingleton(configuration);
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
        services.AddSingleton<ServiceBusCommands>();
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

    public static IServiceCollection AddFineTuning(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<FineTuneOptions>(configuration.GetSection(FineTuneOptions.Section));
        services.AddSingleton<FineTuneHandler>();
        services.AddSingleton<Azure.Core.TokenCredential>(_ => new Azure.Identity.DefaultAzureCredential());
        services.AddSingleton<IFineTuneBackend, LocalProcessBackend>();
        // The ARM pipeline's own NetworkTimeout and retries govern; the factory's client only carries the requests.
        services.AddHttpClient(ArmClient.HttpClientName, http => http.Timeout = Timeout.InfiniteTimeSpan);
        services.AddSingleton(s => new ArmClient(s.GetRequiredService<IHttpClientFactory>(), s.GetRequiredService<Azure.Core.TokenCredential>(), s.GetRequiredService<Microsoft.Extensions.Options.IOptions<FineTuneOptions>>()));
        services.AddSingleton<AzureMlBackend>();
        services.AddSingleton<ContainerAppsBackend>();
        services.AddSingleton<IFineTuneBackend>(s => s.GetRequiredService<AzureMlBackend>());
        services.AddSingleton<IFineTuneBackend>(s => s.GetRequiredService<ContainerAppsBackend>());
        return services;
    }
}
