using System.Text.Json;
using Pipeline.Functions;
using Pipeline.Hosting;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Infra;

/// <summary>The names the code and function.json use must be the ones the Bicep templates create (infra/names.json).</summary>
public sealed class InfraNamesTests
{
    private static readonly JsonElement Names = JsonDocument.Parse(File.ReadAllText(Path.Combine(RepoPaths.Root, "infra", "names.json"))).RootElement;

    private static string[] List(string property) => [.. Names.GetProperty(property).EnumerateArray().Select(e => e.GetString()!)];

    private static List<FunctionDefinition> Functions() =>
        FunctionDefinitions.Load(Path.Combine(RepoPaths.Root, "functions"), new Microsoft.Extensions.Configuration.ConfigurationBuilder().Build());

    [Fact]
    public void Every_container_queue_and_table_in_the_code_is_created_by_the_templates()
    {
        Assert.Equal(StorageNames.Containers.All.Order(), List("containers").Order());
        Assert.Equal(StorageNames.Queues.All.Order(), List("queues").Order());
        Assert.Equal(StorageNames.Tables.All.Order(), List("tables").Order());
    }

    [Fact]
    public void Every_function_trigger_names_a_queue_and_connection_the_templates_create()
    {
        var functions = Functions();
        Assert.NotEmpty(functions);
        var settings = List("appSettings");
        foreach (var function in functions)
        {
            if (function.TriggerType == "queueTrigger")
            {
                Assert.Contains(function.QueueName, List("queues"));
            }
            else if (function.TriggerType == "serviceBusTrigger")
            {
                Assert.Contains(function.QueueName, List("serviceBusQueues"));
            }

            if (function.Connection is { } connection)
            {
                // Identity-based connections: <connection>__accountName or __fullyQualifiedNamespace.
                Assert.Contains(settings, s => s.StartsWith(connection + "__", StringComparison.Ordinal));
            }
        }
    }

    [Fact]
    public void Every_queue_function_is_served_by_the_handler_and_declared_by_function_json()
    {
        var declared = Functions().Where(f => f.TriggerType == "queueTrigger").ToDictionary(f => f.Name, f => f.QueueName);
        Assert.Equal(QueueFunctions.Triggers.OrderBy(t => t.Key), declared.OrderBy(t => t.Key)!);
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
