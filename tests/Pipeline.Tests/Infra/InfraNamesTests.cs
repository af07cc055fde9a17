using System.Net.Http.Json;
using System.Text.Json;
using Pipeline.Messaging;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Infra;

/// <summary>
/// The names the code uses, and the functions and bindings the worker reports to the host, must be the ones
/// the Bicep templates create (infra/names.json).
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class InfraNamesTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static readonly JsonElement Names = JsonDocument.Parse(File.ReadAllText(Path.Combine(RepoPaths.Root, "infra", "names.json"))).RootElement;

    private static string[] List(string property) => [.. Names.GetProperty(property).EnumerateArray().Select(e => e.GetString()!)];

    /// <summary>The worker's own index (FunctionsMetadataRequest), as the local host received it.</summary>
    private async Task<List<JsonElement>> WorkerFunctionsAsync()
    {
        using var host = new LocalHostProcess(azurite.ConnectionString, new Dictionary<string, string> { ["Pipeline__LocalHost__WatchIncoming"] = "false" });
        using var http = await host.WaitUntilListeningAsync();
        return [.. (await http.GetFromJsonAsync<JsonElement>("/admin/functions")).EnumerateArray().Select(f => f.Clone())];
    }

    [Fact]
    public void Every_container_queue_and_table_in_the_code_is_created_by_the_templates()
    {
        Assert.Equal(StorageNames.Containers.All.Order(), List("containers").Order());
        Assert.Equal(StorageNames.Queues.All.Order(), List("queues").Order());
        Assert.Equal(StorageNames.Tables.All.Order(), List("tables").Order());
    }

    [Fact]
    public async Task Every_function_the_worker_reports_triggers_on_a_queue_the_code_names_and_the_templates_create()
    {
        var functions = await WorkerFunctionsAsync();
        var settings = List("appSettings");
        var queueTriggers = new Dictionary<string, string>();
        foreach (var function in functions)
        {
            var name = function.GetProperty("name").GetString()!;
            var trigger = function.GetProperty("bindings").EnumerateArray().Single(b => b.GetProperty("type").GetString()!.EndsWith("Trigger", StringComparison.Ordinal));
            switch (trigger.GetProperty("type").GetString())
            {
                case "queueTrigger":
                    var queue = trigger.GetProperty("queueName").GetString()!;
                    Assert.Contains(queue, List("queues"));
                    queueTriggers[name] = queue;
                    break;
                case "httpTrigger":
                    break;
                default:
                    Assert.Fail($"{name}: trigger {trigger.GetProperty("type")} is not one the templates provision");
                    break;
            }

            // Identity-based connections: <connection>__accountName or __fullyQualifiedNamespace (queues default to AzureWebJobsStorage).
            var connection = trigger.TryGetProperty("connection", out var c) ? c.GetString()! : StorageClients.ConnectionSetting;
            Assert.Contains(settings, s => s.StartsWith(connection + "__", StringComparison.Ordinal));
        }

        // Every stage queue, and its poison queue, has exactly one function.
        Assert.Equal(StorageNames.Queues.Triggers.Concat(StorageNames.Queues.Triggers.Select(StorageNames.Queues.Poison)).Order(), queueTriggers.Values.Order());
        Assert.Contains(ServiceBusCommands.Source.Split('-')[1], List("serviceBusQueues"));
    }

    [Fact]
    public void The_storage_connection_the_code_reads_is_configured_identity_based()
    {
        var settings = List("appSettings");
        Assert.Contains($"{StorageClients.ConnectionSetting}__accountName", settings);
        Assert.Contains($"{StorageClients.ConnectionSetting}__clientId", settings);
        Assert.DoesNotContain(StorageClients.ConnectionSetting, settings);
    }
}
