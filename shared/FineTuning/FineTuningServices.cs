using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.FineTuning;

namespace Pipeline.Hosting;

public static class FineTuningServices
{
    public static IServiceCollection AddFineTuning(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<FineTuneOptions>(configuration.GetSection(FineTuneOptions.Section));
        services.AddSingleton<FineTuneHandler>();
        services.AddSingleton<Azure.Core.TokenCredential>(_ => new Azure.Identity.DefaultAzureCredential());
        services.AddSingleton<IFineTuneBackend, LocalProcessBackend>();
        services.AddSingleton(_ => new HttpClient { Timeout = TimeSpan.FromSeconds(100) });
        services.AddSingleton<AzureMlBackend>();
        services.AddSingleton<ContainerAppsBackend>();
        services.AddSingleton<IFineTuneBackend>(s => s.GetRequiredService<AzureMlBackend>());
        services.AddSingleton<IFineTuneBackend>(s => s.GetRequiredService<ContainerAppsBackend>());
        return services;
    }
}
