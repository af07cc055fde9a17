using System.Text.Json;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// <c>retry-failed</c>: plans a new small batch of a finished batch's failed rows (those of its newest version)
/// and, once it is scored, merges its rows back as the next version of the batch it retried. Committed files
/// are never rewritten: the new version has its own folder and its manifest is written once.
/// </summary>
internal sealed class BatchRetry(StorageClients storage, RunStore runs, ModelSessions models)
{
    private const string VersionLock = "version";

    /// <summary>The retry batch of a finished batch's failed rows, and those rows (read as the batch is split).</summary>
    public async Task<(BatchPlan Batch, IAsyncEnumerable<ShardInputRow> Rows)> PlanAsync(RetryFailedCommand command, string runId, CancellationToken cancellationToken)
    {
        // A retry batch's rows belong to the batch it retried: retrying it again retries that batch's failed rows.
        if ((await BlobJson.ReadAsync(new BatchFiles(storage, command.BatchId).Plan, InferenceJson.Default.BatchPlan, cancellationToken))?.RetryOf is { } retried)
        {
            command = command with { BatchId = retried };
        }

        var original = new BatchFiles(storage, command.BatchId);
        var (manifest, newest) = await original.NewestAsync(cancellationToken)
            ?? throw new InferenceRejectedException(InferenceErrorCodes.BatchNotFound, $"Batch {command.BatchId} has no manifest: it does not exist or has not finished. Wait for it to finish (pipeline status <runId>), then retry its failed rows.");
        var plan = await BlobJson.ReadAsync(original.Plan, InferenceJson.Default.BatchPlan, cancellationToken)
            ?? throw new InvalidOperationException($"Batch {command.BatchId} has a manifest but no plan.json.");
        var failed = new Dictionary<long, int>();
        await foreach (var line in BatchFiles.ReadLinesAsync(newest.Ledger, cancellationToken))
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
        return (batch, FailedRowsAsync(original, plan, failed, cancellationToken));
    }

    /// <summary>The failed rows of a batch, from the inputs of the shards that hold them, carrying the attempts they had.</summary>
    private static async IAsyncEnumerable<ShardInputRow> FailedRowsAsync(BatchFiles batch, BatchPlan plan, Dictionary<long, int> failed, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
    {
        foreach (var shard in plan.Shards)
        {
            if (!failed.Keys.Any(row => row >= shard.FirstRow && row < shard.FirstRow + shard.Rows))
            {
                continue;
            }

            foreach (var row in await batch.ReadInputAsync(shard.Shard, cancellationToken))
            {
                if (failed.TryGetValue(row.Row, out var attempts))
                {
                    yield return row with { PriorAttempts = attempts };
                }
            }
        }
    }

    /// <summary>
    /// Merges a finished retry into the batch it retried as its next version, under the batch's version lease:
    /// each touched shard's results, errors, ledger (and OpenAI lines) are written into the new version's folder
    /// with the retried rows in place (every earlier success kept), the batch is assembled there, and the new
    /// manifest, naming the version it supersedes and the retry, is written once. A retry merged already is not
    /// merged again. The original run takes the new version.
    /// </summary>
    public async Task MergeAsync(BatchFiles original, BatchFiles retry, BatchAssembler assembler, CancellationToken cancellationToken)
    {
        await using var lease = await RunLease.AcquireAsync(storage, original.BatchId, VersionLock, cancellationToken);
        using var work = lease.Link(cancellationToken);
        cancellationToken = work.Token;
        var plan = await BlobJson.ReadAsync(original.Plan, InferenceJson.Default.BatchPlan, cancellationToken)
            ?? throw new InvalidOperationException($"Batch {original.BatchId} has no plan.json.");
        var (previous, previousFiles) = await original.NewestAsync(cancellationToken)
            ?? throw new InvalidOperationException($"Batch {original.BatchId} has no committed manifest to merge retry {retry.BatchId} into.");
        if (previous.Retries.Contains(retry.BatchId))
        {
            // Merged by an earlier delivery that stopped before committing the retry itself.
            await FinishOriginalRunAsync(previous, previousFiles, assembler, cancellationToken);
            return;
        }

        var next = original.AtVersion(previous.Version + 1);
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
        var shardVersions = new Dictionary<int, int>(previous.ShardVersions ?? []);
        foreach (var shard in plan.Shards)
        {
            if (shard.Rows == 0 || !newLedger.Keys.Any(row => row >= shard.FirstRow && row < shard.FirstRow + shard.Rows))
            {
                continue;
            }

            // The shard as the newest version has it; what is written goes to the new version's folder only.
            var from = original.OfShard(shard.Shard, shardVersions);
            var outcome = (await BlobJson.ReadAsync(from.Done(shard.Shard), InferenceJson.Default.ShardOutcome, cancellationToken))!;
            var results = new SortedDictionary<long, string>(await ByRowAsync(from.ShardResults(shard.Shard)));
            var errors = new SortedDictionary<long, string>(await ByRowAsync(from.ShardErrors(shard.Shard)));
            var ledger = new SortedDictionary<long, string>(await ByRowAsync(from.ShardLedger(shard.Shard)));
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

            await next.ShardResults(shard.Shard).UploadAsync(Lines(results.Values), overwrite: true, cancellationToken);
            await next.ShardErrors(shard.Shard).UploadAsync(Lines(errors.Values), overwrite: true, cancellationToken);
            await next.ShardLedger(shard.Shard).UploadAsync(Lines(ledger.Values), overwrite: true, cancellationToken);
            int? requests = null, failedRequests = null;
            if (plan.OpenAiRequests is not null)
            {
                var input = await original.ReadInputAsync(shard.Shard, cancellationToken);
                var outcomes = input.Select(r => OpenAiBatchFormat.OutcomeOf(results.GetValueOrDefault(r.Row), errors.GetValueOrDefault(r.Row))).ToList();
                (requests, failedRequests) = await ShardScorer.WriteOpenAiShardAsync(next, shard.Shard, input, outcomes, (await models.GetAsync(plan.ModelId, cancellationToken)).Manifest, cancellationToken);
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

            // Not yet committed (no manifest of this version exists, and the version lease is held): a rewrite after a crash is safe.
            await ShardScorer.WriteDoneAsync(next, outcome with
            {
                Succeeded = results.Count,
                Failed = errors.Count,
                ErrorCodes = codes,
                ErrorSamples = samples,
                OpenAiRequests = requests ?? outcome.OpenAiRequests,
                OpenAiFailed = failedRequests ?? outcome.OpenAiFailed,
            }, cancellationToken);
            shardVersions[shard.Shard] = next.Version;
        }

        var merged = await assembler.AssembleAsync(next, plan, shardVersions, [.. previous.Retries, retry.BatchId], cancellationToken);
        // Keep the original batch's own timing figures: the retry's are in its manifest.
        merged = merged with
        {
            RunId = previous.RunId,
            Supersedes = previous.Version,
            StartedAt = previous.StartedAt,
            RowsPerSecond = previous.RowsPerSecond,
            TokensPerSecond = previous.TokensPerSecond,
            ModelRowsPerSecond = previous.ModelRowsPerSecond,
            TimingsMs = previous.TimingsMs,
            Tokens = previous.Tokens,
            PaddingFraction = previous.PaddingFraction,
        };
        if (!await BlobJson.WriteOnceAsync(next.Manifest, merged, InferenceJson.Default.InferenceManifest, cancellationToken))
        {
            throw new InvalidOperationException($"Version {next.Version} of batch {original.BatchId} was committed by another writer while retry {retry.BatchId} was merged; the merge is tried again on the newest version.");
        }

        await FinishOriginalRunAsync(merged, next, assembler, cancellationToken);
    }

    private async Task FinishOriginalRunAsync(InferenceManifest manifest, BatchFiles files, BatchAssembler assembler, CancellationToken cancellationToken)
    {
        if (await runs.GetAsync(manifest.RunId, cancellationToken) is not null)
        {
            await assembler.FinishRunAsync(manifest.RunId, files, manifest, cancellationToken);
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
