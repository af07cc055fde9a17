using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Inference;

namespace Pipeline.Hosting;

public static class InferenceServices
{
    public static IServiceCollection AddInference(this IServiceCollection services, IConfiguration configuration)
    {
        services.AddSingleton<InferenceHandler>();
        return services;
    }
}
