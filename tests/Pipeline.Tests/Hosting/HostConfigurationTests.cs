using Microsoft.Extensions.Configuration;
using Pipeline.Hosting;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Hosting;

/// <summary>host.json is read as the Functions host reads it, and app settings override it the same way.</summary>
[Collection(LocalHostProcess.Collection)]
public sealed class HostConfigurationTests
{
    [Fact]
    public void Host_json_queue_settings_are_read_with_the_host_names()
    {
        var configuration = new ConfigurationBuilder().AddHostJson(RepoPaths.Root).Build();
        var options = QueuesOptions.From(configuration);
        Assert.Equal(16, options.BatchSize);
        Assert.Equal(8, options.EffectiveNewBatchThreshold);
        Assert.Equal(5, options.MaxDequeueCount);
        Assert.Equal(TimeSpan.FromSeconds(2), options.MaxPollingInterval);
        Assert.Equal(TimeSpan.FromSeconds(5), options.VisibilityTimeout);
        Assert.Equal(Azure.Storage.Queues.QueueMessageEncoding.Base64, options.QueueMessageEncoding);
        Assert.Null(configuration["AzureFunctionsJobHost:customHandler:description:defaultExecutablePath"]);
        Assert.Equal("", configuration["AzureFunctionsJobHost:extensions:http:routePrefix"]);
    }

    [Fact]
    public void App_settings_override_host_json_as_in_azure()
    {
        Environment.SetEnvironmentVariable("AzureFunctionsJobHost__extensions__queues__maxDequeueCount", "2");
        try
        {
            var options = QueuesOptions.From(new ConfigurationBuilder().AddHostJson(RepoPaths.Root).Build());
            Assert.Equal(2, options.MaxDequeueCount);
        }
        finally
        {
            Environment.SetEnvironmentVariable("AzureFunctionsJobHost__extensions__queues__maxDequeueCount", null);
        }
    }

    [Fact]
    public void Defaults_match_the_functions_host_when_host_json_is_silent()
    {
        var options = QueuesOptions.From(new ConfigurationBuilder().Build());
        Assert.Equal(16, options.BatchSize);
        Assert.Equal(5, options.MaxDequeueCount);
        Assert.Equal(TimeSpan.FromMinutes(1), options.MaxPollingInterval);
        Assert.Equal(TimeSpan.Zero, options.VisibilityTimeout);
        Assert.Equal(Environment.ProcessorCount * 8, options.EffectiveNewBatchThreshold);
    }

    [Fact]
    public void The_build_is_an_isolated_worker_app_the_functions_host_can_start()
    {
        var app = RepoPaths.FunctionApp;
        Assert.True(File.Exists(Path.Combine(app, "host.json")));
        Assert.Empty(Directory.GetFiles(app, "function.json", SearchOption.AllDirectories));
        var description = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(app, "worker.config.json")))!["description"]!;
        Assert.Equal("dotnet-isolated", description["language"]!.GetValue<string>());
        Assert.True(File.Exists(Path.Combine(app, description["defaultWorkerPath"]!.GetValue<string>())));
        var metadata = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(app, "functions.metadata")))!.AsArray();
        Assert.Contains(metadata, f => f!["name"]!.GetValue<string>() == "Ingest");
        var extensions = File.ReadAllText(Path.Combine(app, "extensions.json"));
        Assert.Contains("AzureStorageQueues", extensions);
        Assert.True(File.Exists(Path.Combine(app, ".azurefunctions", "Microsoft.Azure.WebJobs.Extensions.Storage.Queues.dll")), "the host-side queues extension in .azurefunctions/");
        var settings = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(RepoPaths.Root, "functions", "local.settings.example.json")))!;
        Assert.Equal("dotnet-isolated", settings["Values"]!["FUNCTIONS_WORKER_RUNTIME"]!.GetValue<string>());
    }
}
