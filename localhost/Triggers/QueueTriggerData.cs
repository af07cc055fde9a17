using System.Diagnostics;
using System.Text.Json;
using Azure.Storage.Queues.Models;
using Pipeline.LocalHost.Rpc;
using Pipeline.LocalHost.Worker;

namespace Pipeline.LocalHost.Triggers;

/// <summary>
/// A queue message as the Functions host's queue extension hands it to a worker: the message text as the
/// trigger binding's data (JSON when it is a JSON document), and the trigger metadata (<c>QueueTrigger</c>,
/// <c>DequeueCount</c>, <c>Id</c>, <c>PopReceipt</c>, <c>InsertionTime</c>, <c>ExpirationTime</c>,
/// <c>NextVisibleTime</c>, <c>sys</c>) typed as the host types them: strings as strings, numbers and dates as JSON.
/// </summary>
public static class QueueTriggerData
{
    public static InvocationRequest Invocation(IndexedFunction function, QueueMessage message)
    {
        var text = message.Body.ToString();
        var request = new InvocationRequest
        {
            InvocationId = Guid.NewGuid().ToString(),
            FunctionId = function.FunctionId,
            TraceContext = TraceContext(),
        };
        request.InputData.Add(new ParameterBinding { Name = function.TriggerName, Data = IsJson(text) ? new TypedData { Json = text } : new TypedData { String = text } });
        request.TriggerMetadata["QueueTrigger"] = new TypedData { String = text };
        request.TriggerMetadata["DequeueCount"] = Json(message.DequeueCount);
        request.TriggerMetadata["Id"] = new TypedData { String = message.MessageId };
        request.TriggerMetadata["PopReceipt"] = new TypedData { String = message.PopReceipt };
        request.TriggerMetadata["InsertionTime"] = Json(message.InsertedOn);
        request.TriggerMetadata["ExpirationTime"] = Json(message.ExpiresOn);
        request.TriggerMetadata["NextVisibleTime"] = Json(message.NextVisibleOn);
        request.TriggerMetadata["sys"] = Sys(function.Name);
        return request;
    }

    /// <summary>The <c>sys</c> binding data every trigger carries.</summary>
    public static TypedData Sys(string functionName) => new()
    {
        Json = JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["MethodName"] = functionName,
            ["UtcNow"] = DateTimeOffset.UtcNow,
            ["RandGuid"] = Guid.NewGuid().ToString(),
        }),
    };

    /// <summary>A new W3C trace for the invocation (the worker's invocation span becomes its root).</summary>
    public static RpcTraceContext TraceContext()
    {
        var traceId = ActivityTraceId.CreateRandom();
        var spanId = ActivitySpanId.CreateRandom();
        return new RpcTraceContext { TraceParent = $"00-{traceId.ToHexString()}-{spanId.ToHexString()}-01" };
    }

    private static TypedData Json<T>(T value) => new() { Json = JsonSerializer.Serialize(value) };

    private static bool IsJson(string text)
    {
        var trimmed = text.AsSpan().TrimStart();
        if (trimmed.Length == 0 || (trimmed[0] != '{' && trimmed[0] != '['))
        {
            return false;
        }

        try
        {
            using var _ = JsonDocument.Parse(text);
            return true;
        }
        catch (JsonException)
        {
            return false;
        }
    }
}
