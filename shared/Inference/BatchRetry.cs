using System.Text.Json;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// <c>retry-failed</c>: plans a new small batch of a finished batch's failed rows and, once it is scored,
/// merges its rows back into the batch it retried.
/// </summary>
internal sealed class BatchRetry(StorageClients storage, RunStore runs, ModelSessions models)
{
    /// <summary>The retry batch of a finished batch's failed rows, and those rows (read as the batch is split).</summary>
    public async Task<(BatchPlan Batch, IAsyncEnumerable<ShardInputRow> Rows)> PlanAsync(RetryFailedCommand command, string runId, CancellationToken cancellationToken)
    {
        // A retry batch's rows belong to the batch it retried: retrying it again retries that batch's failed rows.
        if ((await BlobJson.ReadAsync(new BatchFiles(storage, command.BatchId).Plan, InferenceJson.Default.BatchPlan, cancellationToken))?.RetryOf is { } retried)
        {
            command = command with { BatchId = retried };
        }

        var original = new BatchFiles(storage, command.BatchId);
        var manifest = await BlobJson.ReadAsync(original.Manifest, InferenceJson.Default.InferenceManifest, cancellationToken)
            ?? throw new InferenceRejectedException(InferenceErrorCodes.BatchNotFound, $"Batch {command.BatchId} has no manifest: it does not exist or has not finished. Wait for it to finish (pipeline status <runId>), then retry its failed rows.");
        var failed = new Dictionary<long, int>();
        await foreach (var line in BatchFiles.ReadLinesAsync(original.Ledger, cancellationToken))
        {
            using var entry = JsonDocument.Parse(line);
            if (entry.RootElement.GetProperty("status").GetString() == "failed")
            {
                failed[entry.RootElement.GetProperty("row").GetInt64()] = entry.RootElement.GetProperty("attempts").GetInt32();
            }
        }

        if (failed.Count == 0)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.NothingToRetry, $"Batch {command.BatchId} has no failed rows; every row has a result in {manifest.Results}.");
        }

        var batch = new BatchPlan
        {
            BatchId = "bt-" + RunIds.Hash($"{command.BatchId}|retry|{manifest.Retries.Count}|{string.Join(',', failed.Keys.Order())}", 24),
            RunId = runId,
            ModelId = manifest.ModelId,
            Input = manifest.Input,
            Options = manifest.Options,
            RetryOf = command.BatchId,
            CreatedAt = DateTimeOffset.UtcNow,
        };
        batch = batch with { ModelVersion = (await models.GetAsync(manifest.ModelId, cancellationToken)).Manifest.CreatedAt };
        return (batch, FailedRowsAsync(original, failed, cancellationToken));
    }

    /// <summary>The failed rows of a batch, from its shards' inputs, carrying the attempts they had.</summary>
    private static async IAsyncEnumerable<ShardInputRow> FailedRowsAsync(BatchFiles batch, Dictionary<long, int> failed, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
    {
        foreach (var (shard, _, failedRows) in (await batch.ListDoneAsync(cancellationToken)).OrderBy(d => d.Shard))
        {
            if (failedRows == 0)
            {
                continue;
            }

            foreach (var row in await batch.ReadInputAsync(shard, cancellationToken))
            {
                if (failed.TryGetValue(row.Row, out var attempts))
                {
                    yield return row with { PriorAttempts = attempts };
                }
            }
        }
    }

    /// <summary>
    /// Merges a finished retry into the batch it retried: each touched shard's results, errors and ledger
    /// are rewritten with the retried rows in place (every earlier success kept), then the batch is
    /// reassembled and its manifest rewritten, naming the retry.
    /// </summary>
    public async Task MergeAsync(BatchFiles original, BatchFiles retry, BatchAssembler assembler, CancellationToken cancellationToken)
    {
        var plan = await BlobJson.ReadAsync(original.Plan, InferenceJson.Default.BatchPlan, cancellationToken)
            ?? throw new InvalidOperationException($"Batch {original.BatchId} has no plan.json.");
        var previous = (await BlobJson.ReadAsync(original.Manifest, InferenceJson.Default.InferenceManifest, cancellationToken))!;
        async Task<Dictionary<long, string>> ByRowAsync(Azure.Storage.Blobs.BlobClient blob)
        {
            var lines = new Dictionary<long, string>();
            await foreach (var line in BatchFiles.ReadLinesAsync(blob, cancellationToken))
            {
                lines[BatchFiles.RowOf(line)] = line;
            }

            return lines;
        }

        var newResults = await ByRowAsync(retry.Results);
        var newErrors = await ByRowAsync(retry.Errors);
        var newLedger = await ByRowAsync(retry.Ledger);
        foreach (var shard in plan.Shards)
        {
            if (shard.Rows == 0 || !newLedger.Keys.Any(row => row >= shard.FirstRow && row < shard.FirstRow + shard.Rows))
            {
                continue;
            }

            var outcome = (await BlobJson.ReadAsync(original.Done(shard.Shard), InferenceJson.Default.ShardOutcome, cancellationToken))!;
            var results = new SortedDictionary<long, string>(await ByRowAsync(original.ShardResults(shard.Shard)));
            var errors = new SortedDictionary<long, string>(await ByRowAsync(original.ShardErrors(shard.Shard)));
            var ledger = new SortedDictionary<long, string>(await ByRowAsync(original.ShardLedger(shard.Shard)));
            foreach (var (row, line) in newLedger.Where(l => l.Key >= shard.FirstRow && l.Key < shard.FirstRow + shard.Rows))
            {
                ledger[row] = line;
                errors.Remove(row);
                if (newResults.TryGetValue(row, out var result))
                {
                    results[row] = result;
                }
                else if (newErrors.TryGetValue(row, out var error))
                {
                    errors[row] = error;
                }
            }

            await original.ShardResults(shard.Shard).UploadAsync(Lines(results.Values), overwrite: true, cancellationToken);
            await original.ShardErrors(shard.Shard).UploadAsync(Lines(errors.Values), overwrite: true, cancellationToken);
            await original.ShardLedger(shard.Shard).UploadAsync(Lines(ledger.Values), overwrite: true, cancellationToken);
            int? requests = null, failedRequests = null;
            if (plan.OpenAiRequests is not null)
            {
                var input = await original.ReadInputAsync(shard.Shard, cancellationToken);
                var outcomes = input.Select(r => OpenAiBatchFormat.OutcomeOf(results.GetValueOrDefault(r.Row), errors.GetValueOrDefault(r.Row))).ToList();
                (requests, failedRequests) = await ShardScorer.WriteOpenAiShardAsync(original, shard.Shard, input, outcomes, (await models.GetAsync(plan.ModelId, cancellationToken)).Manifest, cancellationToken);
            }

            var codes = new Dictionary<string, long>();
            var samples = new Dictionary<string, string>();
            foreach (var line in errors.Values)
            {
                using var error = JsonDocument.Parse(line);
                var code = error.RootElement.GetProperty("code").GetString()!;
                codes[code] = codes.GetValueOrDefault(code) + 1;
                samples.TryAdd(code, error.RootElement.GetProperty("error").GetString()!);
            }

            await ShardScorer.WriteDoneAsync(original, outcome with
            {
                Succeeded = results.Count,
                Failed = errors.Count,
                ErrorCodes = codes,
                ErrorSamples = samples,
                OpenAiRequests = requests ?? outcome.OpenAiRequests,
                OpenAiFailed = failedRequests ?? outcome.OpenAiFailed,
            }, cancellationToken);
        }

        var retries = previous.Retries.Contains(retry.BatchId) ? previous.Retries : [.. previous.Retries, retry.BatchId];
        var merged = await assembler.AssembleAsync(original, plan, retries, write: false, cancellationToken);
        // Keep the original batch's own timing figures: the retry's are in its manifest.
        merged = merged with
        {
            StartedAt = previous.StartedAt,
            RowsPerSecond = previous.RowsPerSecond,
            TokensPerSecond = previous.TokensPerSecond,
            ModelRowsPerSecond = previous.ModelRowsPerSecond,
            TimingsMs = previous.TimingsMs,
            Tokens = previous.Tokens,
            PaddingFraction = previous.PaddingFraction,
        };
        await BlobJson.WriteAsync(original.Manifest, merged, InferenceJson.Default.InferenceManifest, cancellationToken);
        if (await runs.GetAsync(previous.RunId, cancellationToken) is not null)
        {
            await assembler.FinishRunAsync(previous.RunId, original, merged, cancellationToken);
        }
    }

    private static BinaryData Lines(IEnumerable<string> lines)
    {
        var writer = new BatchLineWriter();
        foreach (var line in lines)
        {
            writer.Raw(line);
        }

        return writer.ToBinaryData();
    }
}
