using Microsoft.Extensions.Configuration;
using Pipeline.Hosting;
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
        Assert.Equal("Pipeline.Functions", configuration["AzureFunctionsJobHost:customHandler:description:defaultExecutablePath"]);
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
    public void Publish_layout_has_host_json_and_one_folder_per_function()
    {
        var app = RepoPaths.FunctionApp;
        Assert.True(File.Exists(Path.Combine(app, "host.json")));
        Assert.True(File.Exists(Path.Combine(app, "Pipeline.Functions")), "the handler executable named in host.json");
        foreach (var function in Pipeline.Functions.QueueFunctions.Triggers.Keys)
        {
            Assert.True(File.Exists(Path.Combine(app, function, "function.json")), $"{function}/function.json");
        }
    }
}
