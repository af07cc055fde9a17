using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Inference;
using Pipeline.Models;

namespace Pipeline.Hosting;

public static class ModelServices
{
    /// <summary>The model registry, model drops, and the ONNX Runtime sessions every stage that scores shares.</summary>
    public static IServiceCollection AddPipelineModels(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<InferenceSettings>(configuration.GetSection(InferenceSettings.Section));
        services.AddSingleton<ModelRegistry>();
        services.AddSingleton<ModelDropHandler>();
        services.AddSingleton<ModelSessions>();
        return services;
    }
}
