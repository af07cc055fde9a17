using System.Buffers;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// Plans a batch: resumes one already split (or takes over one whose run ended), or cuts its rows into
/// shards as they stream in and fans out one <c>inference-shard</c> message per shard.
/// </summary>
internal sealed class BatchSplitter(StorageClients storage, RunStore runs, RunTransitions transitions, QueueSender sender, BatchAssembler assembler, ILogger logger)
{
    /// <summary>A redelivery of a batch already split (or finished): nothing is split twice.</summary>
    public async Task<bool> ResumeAsync(BatchPlan batch, string runId, CancellationToken cancellationToken)
    {
        var files = new BatchFiles(storage, batch.BatchId);
        await runs.UpdateAsync(runId, r =>
        {
            r.SetArtifact("batch", $"{StorageNames.Containers.Outputs}/{batch.BatchId}/");
            return true;
        }, cancellationToken);
        if (await files.NewestAsync(cancellationToken) is (var manifest, var newest))
        {
            await assembler.FinishRunAsync(runId, newest, manifest, cancellationToken);
            return true;
        }

        var plan = await BlobJson.ReadAsync(files.Plan, InferenceJson.Default.BatchPlan, cancellationToken);
        var existing = await BlobJson.ReadAsync(files.Batch, InferenceJson.Default.BatchPlan, cancellationToken);
        if (existing is null)
        {
            // The batch is claimed once: of two runs asking for it at the same moment, one splits it and the other waits for it.
            if (await BlobJson.WriteOnceAsync(files.Batch, batch, InferenceJson.Default.BatchPlan, cancellationToken))
            {
                return false;
            }

            existing = await BlobJson.ReadAsync(files.Batch, InferenceJson.Default.BatchPlan, cancellationToken);
        }

        if (existing is not null && existing.RunId != runId)
        {
            if (await runs.GetAsync(existing.RunId, cancellationToken) is { } other && !RunStatus.IsFinal(other.Status))
            {
                // Another run is producing this very batch (same model, input and options): this run waits for its manifest.
                throw new RunBusyException($"Batch {batch.BatchId} is being produced for run {existing.RunId}; run {runId} takes its results when it is done.") { WaitsOnLiveRun = true };
            }

            // The run that started it ended (cancelled, failed) before the batch did: this run takes the batch over.
            await BlobJson.WriteAsync(files.Batch, existing with { RunId = runId }, InferenceJson.Default.BatchPlan, cancellationToken);
            if (plan is null)
            {
                return false;
            }

            plan = plan with { RunId = runId };
            await BlobJson.WriteAsync(files.Plan, plan, InferenceJson.Default.BatchPlan, cancellationToken);
            var done = (await files.ListDoneAsync(cancellationToken)).Select(d => d.Shard).ToHashSet();
            foreach (var shard in plan.Shards.Where(s => !done.Contains(s.Shard)))
            {
                await sender.SendAsync(StorageNames.Queues.InferenceShard, MessageTypes.InferenceShard, runId, new InferenceShardRequest(batch.BatchId, shard.Shard),
                    InferenceJson.Default.InferenceShardRequest, cancellationToken: cancellationToken);
            }
        }

        if (plan is not null)
        {
            await assembler.TryAssembleAsync(files, cancellationToken);
            return true;
        }

        // This run's own batch, not fully split yet (an earlier delivery stopped): split it again.
        return false;
    }

    /// <summary>
    /// Cuts the rows into shards as they arrive, sending each shard's message as soon as its input is
    /// written (so workers start before the input is fully read), then writes <c>plan.json</c>.
    /// </summary>
    public async Task SplitAsync(BatchPlan batch, IAsyncEnumerable<ShardInputRow> rows, CancellationToken cancellationToken)
    {
        var files = new BatchFiles(storage, batch.BatchId);
        var rowsPerShard = batch.Options.RowsPerShard!.Value;
        var shards = new List<ShardPlan>();
        var buffer = new ArrayBufferWriter<byte>(1 << 20);
        long total = 0, first = 0, requests = 0;
        var count = 0;

        async Task FlushAsync()
        {
            var shard = new ShardPlan(shards.Count, first, count);
            await files.ShardInput(shard.Shard).UploadAsync(new BinaryData(buffer.WrittenMemory.ToArray()), overwrite: true, cancellationToken);
            await sender.SendAsync(StorageNames.Queues.InferenceShard, MessageTypes.InferenceShard, batch.RunId, new InferenceShardRequest(batch.BatchId, shard.Shard),
                InferenceJson.Default.InferenceShardRequest, cancellationToken: cancellationToken);
            shards.Add(shard);
            buffer.ResetWrittenCount();
            first += count;
            count = 0;
            await transitions.ProgressAsync(batch.RunId, r => r.SetCounts(new Dictionary<string, long> { ["inferenceRowsSplit"] = total, ["inferenceShards"] = shards.Count }), cancellationToken);
        }

        await using var writer = new Utf8JsonWriter(buffer);
        await foreach (var row in rows)
        {
            writer.Reset();
            JsonSerializer.Serialize(writer, row, InferenceJson.Default.ShardInputRow);
            buffer.Write("\n"u8);
            count++;
            total++;
            requests += row.OpenAi is { Item: 0 } ? 1 : 0;
            // A request of OpenAI's batch format is answered in one line: its items never straddle two shards.
            if (count >= rowsPerShard && row.OpenAi is not { IsLast: false })
            {
                await FlushAsync();
            }
        }

        if (count > 0)
        {
            await FlushAsync();
        }

        if (total == 0)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.EmptyInput, $"{batch.Input} has no rows to score. Upload a file with at least one row (JSONL objects with a text field, or CSV/TSV with a header and rows).");
        }

        await BlobJson.WriteAsync(files.Plan, batch with { Shards = shards, Rows = total, OpenAiRequests = requests > 0 ? requests : null }, InferenceJson.Default.BatchPlan, cancellationToken);
        await runs.UpdateAsync(batch.RunId, r =>
        {
            r.SetCounts(requests > 0
                ? new Dictionary<string, long> { ["inferenceRows"] = total, ["inferenceShards"] = shards.Count, ["openAiRequests"] = requests }
                : new Dictionary<string, long> { ["inferenceRows"] = total, ["inferenceShards"] = shards.Count });
            return true;
        }, cancellationToken);
        logger.LogInformation("Batch {BatchId}: {Rows} rows in {Shards} shards", batch.BatchId, total, shards.Count);
        await assembler.TryAssembleAsync(files, cancellationToken);
    }
}
