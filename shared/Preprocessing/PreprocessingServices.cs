using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Preprocessing;

namespace Pipeline.Hosting;

public static class PreprocessingServices
{
    public static IServiceCollection AddPreprocessing(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<PreprocessingOptions>(configuration.GetSection(PreprocessingOptions.Section));
        services.AddSingleton<PreprocessHandler>();
        return services;
    }
}
