using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Hosting;
using Pipeline.Storage;
using Pipeline.Testing;

namespace Pipeline.Bench;

/// <summary>
/// The platform's services composed as the function app composes them (functions/Program.cs: one
/// <c>AddXxx</c> per area), against the benchmark's Azurite: a benchmark never wires a handler by hand, so
/// a dependency a stage gains is one the benchmark gets too.
/// </summary>
public static class BenchServices
{
    /// <summary>The composed services; <paramref name="settings"/> are configuration keys as in local.settings.json (e.g. <c>Pipeline:Preprocessing:Parallelism</c>).</summary>
    public static ServiceProvider Create(AzuriteServer azurite, IDictionary<string, string?>? settings = null, Action<IServiceCollection>? more = null)
    {
        var configuration = new ConfigurationBuilder()
            .AddInMemoryCollection(new Dictionary<string, string?> { [StorageClients.ConnectionSetting] = azurite.ConnectionString })
            .AddInMemoryCollection(settings ?? new Dictionary<string, string?>())
            .Build();
        var services = new ServiceCollection().AddLogging()
            .AddPipeline(configuration);
        more?.Invoke(services);
        return services.BuildServiceProvider();
    }
}
