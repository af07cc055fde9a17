using System.Text.Json.Nodes;
using Microsoft.Extensions.Configuration;
using Pipeline.LocalHost.Rpc;

namespace Pipeline.LocalHost.Worker;

/// <summary>A function as the worker indexed it: its id, its bindings as reported (raw JSON), and its trigger.</summary>
public sealed record IndexedFunction(string FunctionId, string Name, RpcFunctionMetadata Metadata, IReadOnlyList<JsonObject> Bindings)
{
    public JsonObject? Trigger => Bindings.FirstOrDefault(b => b["type"]?.GetValue<string>()?.EndsWith("Trigger", StringComparison.OrdinalIgnoreCase) == true);
    public string TriggerType => Trigger?["type"]?.GetValue<string>() ?? "";
    public string TriggerName => Trigger?["name"]?.GetValue<string>() ?? "";

    public bool IsQueueTrigger => TriggerType.Equals("queueTrigger", StringComparison.OrdinalIgnoreCase);
    public bool IsHttpTrigger => TriggerType.Equals("httpTrigger", StringComparison.OrdinalIgnoreCase);

    /// <summary>The trigger's queue, with <c>%Setting%</c> resolved as the host does.</summary>
    public string? QueueName(IConfiguration settings) => Trigger?["queueName"]?.GetValue<string>() is { } queue ? Resolve(queue, settings) : null;

    public string Route => Trigger?["route"]?.GetValue<string>() ?? Name;

    public IReadOnlyList<string> Methods => Trigger?["methods"] is JsonArray methods
        ? [.. methods.Select(m => m!.GetValue<string>().ToUpperInvariant())]
        : ["GET", "POST"];

    /// <summary>Builds the index from the worker's answer to <c>FunctionsMetadataRequest</c>.</summary>
    public static IndexedFunction From(RpcFunctionMetadata metadata)
    {
        var bindings = metadata.RawBindings.Select(raw => JsonNode.Parse(raw) as JsonObject ?? throw new InvalidOperationException($"Function {metadata.Name} reported a binding that is not a JSON object: {raw}")).ToList();
        var id = metadata.FunctionId is { Length: > 0 } reported ? reported : Guid.NewGuid().ToString();
        return new IndexedFunction(id, metadata.Name, metadata, bindings);
    }

    /// <summary>The <c>FunctionLoadRequest</c> the host sends: the metadata with each binding as <see cref="BindingInfo"/>.</summary>
    public FunctionLoadRequest LoadRequest()
    {
        var load = new RpcFunctionMetadata
        {
            Name = Name,
            FunctionId = FunctionId,
            Directory = Metadata.Directory,
            ScriptFile = Metadata.ScriptFile,
            EntryPoint = Metadata.EntryPoint,
            Language = Metadata.Language,
            IsProxy = false,
        };
        load.Properties.Add(Metadata.Properties);
        foreach (var binding in Bindings)
        {
            var info = new BindingInfo
            {
                Type = binding["type"]?.GetValue<string>() ?? "",
                Direction = (binding["direction"]?.GetValue<string>() ?? "in").ToLowerInvariant() switch
                {
                    "out" => BindingInfo.Types.Direction.Out,
                    "inout" => BindingInfo.Types.Direction.Inout,
                    _ => BindingInfo.Types.Direction.In,
                },
                DataType = (binding["dataType"]?.GetValue<string>() ?? "").ToLowerInvariant() switch
                {
                    "string" => BindingInfo.Types.DataType.String,
                    "binary" => BindingInfo.Types.DataType.Binary,
                    "stream" => BindingInfo.Types.DataType.Stream,
                    _ => BindingInfo.Types.DataType.Undefined,
                },
            };
            if (binding["properties"] is JsonObject properties)
            {
                foreach (var (key, value) in properties)
                {
                    info.Properties[key] = value is JsonValue v && v.TryGetValue<string>(out var text) ? text : value?.ToJsonString() ?? "";
                }
            }

            load.Bindings[binding["name"]?.GetValue<string>() ?? "$return"] = info;
        }

        return new FunctionLoadRequest { FunctionId = FunctionId, Metadata = load };
    }

    /// <summary>What <c>GET /admin/functions</c> shows: name, id and the bindings as the worker reported them.</summary>
    public JsonObject ToJson() => new()
    {
        ["name"] = Name,
        ["functionId"] = FunctionId,
        ["entryPoint"] = Metadata.EntryPoint,
        ["scriptFile"] = Metadata.ScriptFile,
        ["bindings"] = new JsonArray([.. Bindings.Select(b => b.DeepClone())]),
    };

    /// <summary>Resolves <c>%Setting%</c> references the way the host does.</summary>
    public static string Resolve(string value, IConfiguration settings) =>
        value.Length > 2 && value[0] == '%' && value[^1] == '%'
            ? settings[value[1..^1]] ?? throw new InvalidOperationException($"A binding refers to the app setting '{value[1..^1]}', which is not set.")
            : value;
}
