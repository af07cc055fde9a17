using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Pipeline.Storage;

namespace Pipeline.Hosting;

public static class StorageServices
{
    /// <summary>The storage account's clients (from <c>AzureWebJobsStorage</c>) and the blob copier.</summary>
    public static IServiceCollection AddPipelineStorage(this IServiceCollection services, IConfiguration configuration)
    {
        // The local fine-tune backend passes the storage setting on to trainer processes.
        services.TryAddSingleton(configuration);
        services.AddSingleton(_ => StorageClients.FromConfiguration(configuration, QueuesOptions.From(configuration).QueueMessageEncoding));
        services.AddSingleton<BlobCopier>();
        return services;
    }
}
