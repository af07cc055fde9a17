using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// Reports a batch's progress from its done markers and, once every shard is done, assembles
/// <c>outputs/&lt;batchId&gt;/</c> (a retry is merged back as a new version of the batch it retried) and ends the run.
/// </summary>
internal sealed class BatchAssembler(StorageClients storage, RunStore runs, RunTransitions transitions, ModelSessions models, BatchRetry retry, ILogger logger)
{
    private const string AssembleLock = "assemble";

    /// <summary>Rows done of total, rows per second and an ETA on the run, from the done markers (so redeliveries never count twice).</summary>
    public async Task<(BatchPlan? Plan, int DoneShards)> ReportProgressAsync(BatchFiles files, BatchPlan batch, CancellationToken cancellationToken)
    {
        var done = await files.ListDoneAsync(cancellationToken);
        var plan = await BlobJson.ReadAsync(files.Plan, InferenceJson.Default.BatchPlan, cancellationToken);
        long rowsDone = done.Sum(d => d.Rows), failed = done.Sum(d => d.Failed);
        var seconds = Math.Max(0.001, (DateTimeOffset.UtcNow - batch.CreatedAt).TotalSeconds);
        var rate = rowsDone / seconds;
        await runs.UpdateAsync(batch.RunId, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            var total = plan?.Rows ?? r.GetCounts().GetValueOrDefault("inferenceRowsSplit");
            r.SetCounts(new Dictionary<string, long>
            {
                ["inferenceRowsDone"] = rowsDone,
                ["inferenceRowsFailed"] = failed,
                ["inferenceShardsDone"] = done.Count,
                ["inferenceRowsPerSecond"] = (long)rate,
                ["inferenceEtaSeconds"] = rate > 0 ? (long)Math.Ceiling(Math.Max(0, total - rowsDone) / rate) : -1,
            });
            return true;
        }, cancellationToken);
        return (plan, done.Count);
    }

    /// <summary>
    /// Assembles the batch when every shard is done and the input is fully split: whoever finishes last
    /// (a shard, or the split) does it, under a lease, and the manifest is written last.
    /// </summary>
    public async Task TryAssembleAsync(BatchFiles files, CancellationToken cancellationToken)
    {
        if (await files.Manifest.ExistsAsync(cancellationToken))
        {
            return;
        }

        var plan = await BlobJson.ReadAsync(files.Plan, InferenceJson.Default.BatchPlan, cancellationToken);
        await AssembleIfCompleteAsync(files, plan, plan is null ? 0 : (await files.ListDoneAsync(cancellationToken)).Count, cancellationToken);
    }

    /// <summary>Assembles under the batch's lease when the input is fully split (a plan) and every shard is done.</summary>
    public async Task AssembleIfCompleteAsync(BatchFiles files, BatchPlan? plan, int doneShards, CancellationToken cancellationToken)
    {
        if (plan is null || doneShards < plan.Shards.Count)
        {
            return;
        }

        await using var lease = await RunLease.AcquireAsync(storage, files.BatchId, AssembleLock, cancellationToken);
        using var work = lease.Link(cancellationToken);
        cancellationToken = work.Token;
        if (await files.Manifest.ExistsAsync(cancellationToken))
        {
            return;
        }

        // A retry's own manifest is its commit, so it is written only once its rows are merged back (as a new version of the batch it retried).
        var manifest = await AssembleAsync(files, plan, null, [], cancellationToken);
        if (plan.RetryOf is { } original)
        {
            await retry.MergeAsync(new BatchFiles(storage, original), files, this, cancellationToken);
        }

        if (!await BlobJson.WriteOnceAsync(files.Manifest, manifest, InferenceJson.Default.InferenceManifest, cancellationToken))
        {
            // Committed by a holder whose lease this one took over: the committed manifest stands.
            logger.LogWarning("Batch {BatchId} was committed by another instance; its manifest is kept", files.BatchId);
            manifest = (await BlobJson.ReadAsync(files.Manifest, InferenceJson.Default.InferenceManifest, cancellationToken))!;
        }

        await FinishRunAsync(plan.RunId, files, manifest, cancellationToken);
    }

    /// <summary>
    /// Concatenates the shards' files into <paramref name="files"/>' version (each shard taken from the version
    /// <paramref name="shardVersions"/> names, version 1 when it names none) and returns its manifest, not yet written.
    /// </summary>
    public async Task<InferenceManifest> AssembleAsync(BatchFiles files, BatchPlan plan, Dictionary<int, int>? shardVersions, List<string> retries, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        var outcomes = new List<ShardOutcome>();
        foreach (var shard in plan.Shards)
        {
            outcomes.Add(await BlobJson.ReadAsync(files.OfShard(shard.Shard, shardVersions).Done(shard.Shard), InferenceJson.Default.ShardOutcome, cancellationToken)
                ?? throw new InvalidOperationException($"Shard {shard.Shard} of {files.BatchId} has no done marker."));
        }

        var indexes = plan.Shards.Select(s => s.Shard).ToList();
        IEnumerable<Azure.Storage.Blobs.BlobClient> Parts(Func<BatchFiles, int, Azure.Storage.Blobs.BlobClient> file) => indexes.Select(i => file(files.OfShard(i, shardVersions), i));
        await BatchFiles.ConcatenateAsync(Parts((f, i) => f.ShardResults(i)), files.Results, cancellationToken);
        await BatchFiles.ConcatenateAsync(Parts((f, i) => f.ShardErrors(i)), files.Errors, cancellationToken);
        await BatchFiles.ConcatenateAsync(Parts((f, i) => f.ShardLedger(i)), files.Ledger, cancellationToken);
        if (plan.OpenAiRequests is not null)
        {
            await BatchFiles.ConcatenateAsync(Parts((f, i) => f.ShardOpenAiOutput(i)), files.OpenAiOutput, cancellationToken);
            await BatchFiles.ConcatenateAsync(Parts((f, i) => f.ShardOpenAiErrors(i)), files.OpenAiErrors, cancellationToken);
        }

        var model = await models.GetAsync(plan.ModelId, cancellationToken);
        var codes = new Dictionary<string, long>();
        foreach (var (code, n) in outcomes.SelectMany(o => o.ErrorCodes))
        {
            codes[code] = codes.GetValueOrDefault(code) + n;
        }

        long rows = outcomes.Sum(o => o.Rows), failed = outcomes.Sum(o => o.Failed), tokens = outcomes.Sum(o => o.Tokens), slots = outcomes.Sum(o => o.Slots);
        var top = codes.OrderByDescending(c => c.Value).ThenBy(c => c.Key, StringComparer.Ordinal).FirstOrDefault();
        var topSample = top.Key is null ? null : outcomes.Select(o => o.ErrorSamples.GetValueOrDefault(top.Key)).FirstOrDefault(s => s is not null);
        var elapsed = Math.Max(0.001, (DateTimeOffset.UtcNow - plan.CreatedAt).TotalSeconds);
        var modelSeconds = Math.Max(0.001, outcomes.Sum(o => o.InferenceMs) / 1000);
        var manifest = new InferenceManifest
        {
            BatchId = files.BatchId,
            Version = files.Version,
            ShardVersions = shardVersions,
            RunId = plan.RunId,
            Status = failed > 0 ? BatchStatus.CompletedWithFailures : BatchStatus.Completed,
            ModelId = plan.ModelId,
            Task = model.Manifest.Task,
            Input = plan.Input,
            Options = plan.Options,
            Rows = rows,
            Succeeded = rows - failed,
            Failed = failed,
            TopError = top.Key is null ? null : $"{top.Key} ({top.Value} of {failed} failed rows): {topSample}",
            ErrorCodes = codes,
            Shards = plan.Shards.Count,
            Tokens = tokens,
            PaddingFraction = Math.Round(ShardScorer.Padding(tokens, slots), 4),
            RowsPerSecond = Math.Round(rows / elapsed, 1),
            TokensPerSecond = Math.Round(tokens / elapsed, 1),
            ModelRowsPerSecond = Math.Round(rows / modelSeconds, 1),
            ExecutionProvider = string.Join("; ", outcomes.Select(o => o.ExecutionProvider).Distinct()),
            TimingsMs = new Dictionary<string, double>
            {
                ["total"] = Math.Round(elapsed * 1000, 1),
                ["tokenize"] = Math.Round(outcomes.Sum(o => o.TokenizeMs), 1),
                ["model"] = Math.Round(outcomes.Sum(o => o.InferenceMs), 1),
                ["shardsWall"] = Math.Round(outcomes.Sum(o => o.WallMs), 1),
                ["assemble"] = Math.Round(clock.Elapsed.TotalMilliseconds, 1),
            },
            Results = files.PathOf(files.Results),
            Errors = files.PathOf(files.Errors),
            Ledger = files.PathOf(files.Ledger),
            Retries = retries,
            OpenAiRequests = plan.OpenAiRequests is null ? null : outcomes.Sum(o => (long)(o.OpenAiRequests ?? 0)),
            OpenAiFailed = plan.OpenAiRequests is null ? null : outcomes.Sum(o => (long)(o.OpenAiFailed ?? 0)),
            OpenAiOutput = plan.OpenAiRequests is null ? null : files.PathOf(files.OpenAiOutput),
            OpenAiErrors = plan.OpenAiRequests is null ? null : files.PathOf(files.OpenAiErrors),
            StartedAt = plan.CreatedAt,
            CreatedAt = DateTimeOffset.UtcNow,
        };
        logger.LogInformation("Batch {BatchId} version {Version} assembled: {Rows} rows, {Failed} failed, {RowsPerSecond} rows/s", files.BatchId, files.Version, rows, failed, manifest.RowsPerSecond);
        return manifest;
    }

    /// <summary>The run ends with the batch: succeeded, or completed_with_failures naming the most common row error.</summary>
    public async Task FinishRunAsync(string runId, BatchFiles files, InferenceManifest manifest, CancellationToken cancellationToken)
    {
        var status = manifest.Failed > 0 ? RunStatus.CompletedWithFailures : RunStatus.Succeeded;
        // A cancelled run stays cancelled; a finished one takes its batch's merged retry.
        var eventType = status == RunStatus.Succeeded ? RunEvents.Types.StageSucceeded : RunEvents.Types.StageCompletedWithFailures;
        await transitions.SucceedAsync(runId, eventType, r =>
        {
            r.Status = status;
            r.Stage = Stages.Inference;
            r.SetStage(Stages.Inference, status);
            r.SetCounts(new Dictionary<string, long>
            {
                ["inferenceRows"] = manifest.Rows,
                ["inferenceRowsDone"] = manifest.Rows,
                ["inferenceRowsSucceeded"] = manifest.Succeeded,
                ["inferenceRowsFailed"] = manifest.Failed,
                ["inferenceShards"] = manifest.Shards,
                ["inferenceShardsDone"] = manifest.Shards,
                ["inferenceRowsPerSecond"] = (long)manifest.RowsPerSecond,
                ["inferenceTokens"] = manifest.Tokens,
                ["inferenceEtaSeconds"] = 0,
            });
            r.SetArtifact("batch", $"{StorageNames.Containers.Outputs}/{files.Prefix}");
            r.SetArtifact("results", manifest.Results);
            r.SetArtifact("inferenceErrors", manifest.Errors);
            r.SetArtifact("ledger", manifest.Ledger);
            r.SetArtifact("inferenceManifest", files.PathOf(files.Manifest));
            if (manifest.OpenAiOutput is not null)
            {
                r.SetCounts(new Dictionary<string, long> { ["openAiRequests"] = manifest.OpenAiRequests ?? 0, ["openAiRequestsFailed"] = manifest.OpenAiFailed ?? 0 });
                r.SetArtifact("openAiOutput", manifest.OpenAiOutput);
                r.SetArtifact("openAiErrors", manifest.OpenAiErrors!);
            }

            r.SetTiming(Stages.Inference, TimeSpan.FromMilliseconds(manifest.TimingsMs.GetValueOrDefault("total")));
            r.Error = manifest.Failed > 0 ? $"{manifest.Failed} of {manifest.Rows} rows failed; most common: {manifest.TopError}. See {manifest.Errors}; rescore them with `pipeline infer --retry-failed {manifest.BatchId}` once their cause is fixed." : null;
            r.ErrorCode = manifest.Failed > 0 ? InferenceHandler.RowsFailedCode : null;
            r.LastError = null;
            r.EndedAt = DateTimeOffset.UtcNow;
        }, cancellationToken, reopenFinished: true);
    }
}
