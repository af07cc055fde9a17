using Microsoft.Azure.Functions.Worker;
using Pipeline.Messaging;
using Queues = Pipeline.Storage.StorageNames.Queues;

namespace Pipeline.Functions.Triggers;

/// <summary>
/// One function per <c>&lt;queue&gt;-poison</c> queue: a message the host gave up on is recorded in
/// <c>poisonmessages</c> with its run's last error, and the run is failed with that reason.
/// </summary>
public sealed class PoisonFunctions(FailedMessages failed)
{
    [Function("IngestPoison")]
    public Task IngestPoisonAsync([QueueTrigger(Queues.BlobCreated + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.BlobCreated, message, id, cancellationToken);

    [Function("CommandsPoison")]
    public Task CommandsPoisonAsync([QueueTrigger(Queues.Commands + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.Commands, message, id, cancellationToken);

    [Function("PreprocessPoison")]
    public Task PreprocessPoisonAsync([QueueTrigger(Queues.Preprocess + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.Preprocess, message, id, cancellationToken);

    [Function("PreprocessPartitionPoison")]
    public Task PreprocessPartitionPoisonAsync([QueueTrigger(Queues.PreprocessPartition + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.PreprocessPartition, message, id, cancellationToken);

    [Function("FineTunePoison")]
    public Task FineTunePoisonAsync([QueueTrigger(Queues.FineTune + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.FineTune, message, id, cancellationToken);

    [Function("FineTuneMonitorPoison")]
    public Task FineTuneMonitorPoisonAsync([QueueTrigger(Queues.FineTuneMonitor + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.FineTuneMonitor, message, id, cancellationToken);

    [Function("InferencePoison")]
    public Task InferencePoisonAsync([QueueTrigger(Queues.Inference + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.Inference, message, id, cancellationToken);

    [Function("InferenceShardPoison")]
    public Task InferenceShardPoisonAsync([QueueTrigger(Queues.InferenceShard + Queues.PoisonSuffix)] string message, string id, CancellationToken cancellationToken) =>
        failed.RecordPoisonAsync(Queues.InferenceShard, message, id, cancellationToken);
}
