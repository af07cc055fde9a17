using Microsoft.Azure.Functions.Worker;
using Pipeline.Messaging;
using Pipeline.Storage;

namespace Pipeline.Functions.Triggers;

/// <summary>
/// The queue-triggered stages. Each function hands its message to one stage handler; the attempt number
/// (<c>DequeueCount</c>) and message id come from the queue trigger's metadata.
/// </summary>
public sealed class StageFunctions(QueueInvocation invocation, BlobDrops drops, CommandRouter commands, StageMessages stages)
{
    [Function("Ingest")]
    public Task IngestAsync([QueueTrigger(StorageNames.Queues.BlobCreated)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.BlobCreated, message, id, ct => drops.HandleAsync(message, dequeueCount, ct), cancellationToken);

    [Function("Commands")]
    public Task CommandsAsync([QueueTrigger(StorageNames.Queues.Commands)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.Commands, message, id, ct => commands.HandleAsync(message, dequeueCount, ct), cancellationToken);

    [Function("Preprocess")]
    public Task PreprocessAsync([QueueTrigger(StorageNames.Queues.Preprocess)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.Preprocess, message, id, ct => stages.PreprocessAsync(message, dequeueCount, ct), cancellationToken);

    [Function("PreprocessPartition")]
    public Task PreprocessPartitionAsync([QueueTrigger(StorageNames.Queues.PreprocessPartition)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.PreprocessPartition, message, id, ct => stages.PreprocessPartitionAsync(message, dequeueCount, ct), cancellationToken);

    [Function("FineTune")]
    public Task FineTuneAsync([QueueTrigger(StorageNames.Queues.FineTune)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.FineTune, message, id, ct => stages.FineTuneAsync(message, dequeueCount, ct), cancellationToken);

    [Function("FineTuneMonitor")]
    public Task FineTuneMonitorAsync([QueueTrigger(StorageNames.Queues.FineTuneMonitor)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.FineTuneMonitor, message, id, ct => stages.FineTuneMonitorAsync(message, dequeueCount, ct), cancellationToken);

    [Function("Inference")]
    public Task InferenceAsync([QueueTrigger(StorageNames.Queues.Inference)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.Inference, message, id, ct => stages.InferenceAsync(message, dequeueCount, ct), cancellationToken);

    [Function("InferenceShard")]
    public Task InferenceShardAsync([QueueTrigger(StorageNames.Queues.InferenceShard)] string message, int dequeueCount, string id, CancellationToken cancellationToken) =>
        invocation.RunAsync(StorageNames.Queues.InferenceShard, message, id, ct => stages.InferenceShardAsync(message, dequeueCount, ct), cancellationToken);
}
