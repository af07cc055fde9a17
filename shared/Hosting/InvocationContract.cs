using System.Text.Json;
using System.Text.Json.Serialization;

namespace Pipeline.Hosting;

/// <summary>
/// What the Functions host POSTs to a custom handler at <c>/{FunctionName}</c>: input binding data keyed
/// by binding name, and trigger metadata (for queues: DequeueCount, Id, InsertionTime, PopReceipt, sys).
/// </summary>
public sealed record InvocationRequest
{
    public Dictionary<string, JsonElement> Data { get; init; } = [];
    public Dictionary<string, JsonElement> Metadata { get; init; } = [];

    /// <summary>The trigger payload as text (the host sends queue messages as JSON strings; objects are taken raw).</summary>
    public string? GetText(string bindingName) => Data.TryGetValue(bindingName, out var value)
        ? value.ValueKind == JsonValueKind.String ? value.GetString() : value.GetRawText()
        : null;

    public int GetDequeueCount() => Metadata.TryGetValue("DequeueCount", out var value)
        ? value.ValueKind == JsonValueKind.Number ? value.GetInt32() : int.TryParse(value.GetString(), out var n) ? n : 1
        : 1;

    /// <summary>Service Bus trigger metadata calls the attempt DeliveryCount; queues call it DequeueCount.</summary>
    public int GetDeliveryCount() => Metadata.ContainsKey("DeliveryCount")
        ? Metadata["DeliveryCount"].ValueKind == JsonValueKind.Number ? Metadata["DeliveryCount"].GetInt32() : 1
        : GetDequeueCount();

    public string? GetMetadataText(string name) => Metadata.TryGetValue(name, out var value)
        ? value.ValueKind == JsonValueKind.String ? value.GetString() : value.GetRawText()
        : null;
}

/// <summary>What a custom handler answers: output bindings, log lines for the host, and a return value.</summary>
public sealed record InvocationResponse
{
    public Dictionary<string, JsonElement> Outputs { get; init; } = [];
    public List<string> Logs { get; init; } = [];
    public JsonElement? ReturnValue { get; init; }
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.Unspecified, PropertyNameCaseInsensitive = true)]
[JsonSerializable(typeof(InvocationRequest))]
[JsonSerializable(typeof(InvocationResponse))]
public sealed partial class InvocationJson : JsonSerializerContext;
