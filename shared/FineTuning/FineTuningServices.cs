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
