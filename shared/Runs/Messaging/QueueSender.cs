using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>Puts enveloped messages on the stage queues.</summary>
public sealed class QueueSender(StorageClients storage)
{
    public async Task SendAsync<TBody>(
        string queue,
        string type,
        string? runId,
        TBody body,
        JsonTypeInfo<TBody> bodyType,
        TimeSpan? visibilityDelay = null,
        CancellationToken cancellationToken = default)
    {
        var envelope = new MessageEnvelope
        {
            Type = type,
            RunId = runId,
            CorrelationId = runId,
            TraceParent = Activity.Current?.Id,
            Body = JsonSerializer.SerializeToElement(body, bodyType),
        };
        var text = JsonSerializer.Serialize(envelope, PipelineJson.Default.MessageEnvelope);
        await storage.Queue(queue).SendMessageAsync(text, visibilityDelay, cancellationToken: cancellationToken);
    }
}
