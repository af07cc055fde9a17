using System.Buffers;
using System.Diagnostics;
using System.Text.Json;
using Azure;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// The batch inference stage. An <c>inference</c> message (or <c>infer</c> command) splits its input into
/// shards as it streams in and fans out one <c>inference-shard</c> message per shard; each shard is scored
/// and committed on its own (a failed shard is retried alone), and the last one to finish assembles
/// <c>outputs/&lt;batchId&gt;/</c>. <c>retry-failed</c> rescores only a finished batch's failed rows and
/// merges them back. See <see cref="BatchFiles"/> for the layout.
/// </summary>
public sealed class InferenceHandler(
    StorageClients storage,
    RunStore runs,
    RunEvents events,
    RunTransitions transitions,
    QueueSender sender,
    ModelSessions models,
    ILogger<InferenceHandler> logger)
{
    public const string RowsFailedCode = "RowsFailed";
    private const string AssembleLock = "assemble";

    /// <summary>The batch id: the model (and its version), the input's content, and the options.</summary>
    public static string BatchIdFor(string modelId, DateTimeOffset modelCreatedAt, string input, string inputVersion, InferenceOptions resolved) =>
        "bt-" + RunIds.Hash($"{modelId}|{modelCreatedAt:O}|{input}|{inputVersion}|{JsonSerializer.Serialize(resolved, InferenceJson.Default.InferenceOptions)}", 24);

    /// <summary>A content version of a blob: its MD5 when the service keeps one, else its ETag.</summary>
    public static string VersionOf(BlobProperties properties) =>
        properties.ContentHash is { Length: > 0 } md5 ? "md5:" + Convert.ToHexStringLower(md5) : "etag:" + properties.ETag.ToString().Trim('"');

    /// <summary>Handles an <c>inference</c> message or <c>infer</c> command.</summary>
    public Task HandleAsync(InferenceRequest request, string runId, int dequeueCount, CancellationToken cancellationToken)
    {
        var initial = new RunRecord { RunId = runId, Source = request.Input, Stage = Stages.Inference };
        return RunStageAsync(initial, dequeueCount, token => StartBatchAsync(request, runId, token), cancellationToken);
    }

    /// <summary>Handles a <c>retry-failed</c> command: a new small batch of a finished batch's failed rows.</summary>
    public Task RetryFailedAsync(RetryFailedCommand command, string runId, int dequeueCount, CancellationToken cancellationToken)
    {
        var initial = new RunRecord { RunId = runId, Source = $"batch:{command.BatchId}", Stage = Stages.Inference };
        return RunStageAsync(initial, dequeueCount, token => StartRetryAsync(command, runId, token), cancellationToken);
    }

    private async Task RunStageAsync(RunRecord initial, int dequeueCount, Func<CancellationToken, Task> stage, CancellationToken cancellationToken)
    {
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["RunId"] = initial.RunId });
        await using var lease = await transitions.ClaimAsync(initial, Stages.Inference, dequeueCount, null, cancellationToken);
        if (lease is null)
        {
            logger.LogInformation("Run {RunId} has finished inference already (or ended); nothing to do", initial.RunId);
            return;
        }

        var clock = Stopwatch.StartNew();
        using var work = lease.Link(cancellationToken);
        try
        {
            await stage(work.Token);
        }
        catch (OperationCanceledException) when (lease.Lost.IsCancellationRequested && !cancellationToken.IsCancellationRequested)
        {
            throw new LeaseLostException(lease.Holds, lease.LostReason);
        }
        catch (RunCancelledException)
        {
            logger.LogInformation("Run {RunId} was cancelled while its input was split; stopping", initial.RunId);
        }
        catch (InferenceRejectedException e)
        {
            await transitions.FailAsync(initial.RunId, Stages.Inference, e.Code, e.Message, clock.Elapsed, cancellationToken: cancellationToken);
        }
        catch (RunBusyException)
        {
            throw;
        }
        catch (Exception e) when (!cancellationToken.IsCancellationRequested)
        {
            logger.LogWarning(e, "Inference of run {RunId} failed on attempt {Attempt}; the host will retry", initial.RunId, dequeueCount);
            await transitions.RetryingAsync(initial.RunId, dequeueCount, e);
            throw;
        }
    }

    private async Task StartBatchAsync(InferenceRequest request, string runId, CancellationToken cancellationToken)
    {
        request.Options?.Validate();
        var model = await models.GetAsync(request.ModelId, cancellationToken);
        var options = (request.Options ?? new InferenceOptions()).Resolved(models.Settings);
        var input = storage.BlobAt(request.Input)
            ?? throw new InferenceRejectedException(InferenceErrorCodes.InputNotFound, $"The input '{request.Input}' is not a blob path: name it as container/blob, for example \"incoming/to-score.jsonl\".");
        BlobProperties properties;
        try
        {
            properties = (await input.GetPropertiesAsync(cancellationToken: cancellationToken)).Value;
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.InputNotFound, $"The input {request.Input} does not exist. Upload it first, then send the command again.");
        }

        var batch = new BatchPlan
        {
            BatchId = BatchIdFor(request.ModelId, model.Manifest.CreatedAt, request.Input, VersionOf(properties), options),
            RunId = runId,
            ModelId = request.ModelId,
            ModelVersion = model.Manifest.CreatedAt,
            Input = request.Input,
            Options = options,
            CreatedAt = DateTimeOffset.UtcNow,
        };
        if (await ResumeAsync(batch, runId, cancellationToken))
        {
            return;
        }

        // A conditional read: if the input changes while it is read, the read fails rather than mixing versions.
        var download = await input.DownloadStreamingAsync(new BlobDownloadOptions { Conditions = new BlobRequestConditions { IfMatch = properties.ETag } }, cancellationToken);
        await using var stream = download.Value.Content;
        await SplitAsync(batch, InferenceInput.ReadAsync(stream, request.Input, options, cancellationToken), cancellationToken);
    }

    private async Task StartRetryAsync(RetryFailedCommand command, string runId, CancellationToken cancellationToken)
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
        if (await ResumeAsync(batch, runId, cancellationToken))
        {
            return;
        }

        await SplitAsync(batch, FailedRowsAsync(original, failed, cancellationToken), cancellationToken);
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

    /// <summary>A redelivery of a batch already split (or finished): nothing is split twice.</summary>
    private async Task<bool> ResumeAsync(BatchPlan batch, string runId, CancellationToken cancellationToken)
    {
        var files = new BatchFiles(storage, batch.BatchId);
        await runs.UpdateAsync(runId, r =>
        {
            r.SetArtifact("batch", $"{StorageNames.Containers.Outputs}/{batch.BatchId}/");
            return true;
        }, cancellationToken);
        if (await BlobJson.ReadAsync(files.Manifest, InferenceJson.Default.InferenceManifest, cancellationToken) is { } manifest)
        {
            await FinishRunAsync(runId, files, manifest, cancellationToken);
            return true;
        }

        var plan = await BlobJson.ReadAsync(files.Plan, InferenceJson.Default.BatchPlan, cancellationToken);
        if (await BlobJson.ReadAsync(files.Batch, InferenceJson.Default.BatchPlan, cancellationToken) is { } existing && existing.RunId != runId)
        {
            if (await runs.GetAsync(existing.RunId, cancellationToken) is { } other && !RunStatus.IsFinal(other.Status))
            {
                // Another run is producing this very batch (same model, input and options): this run waits for its manifest.
                throw new RunBusyException($"Batch {batch.BatchId} is being produced for run {existing.RunId}; run {runId} takes its results when it is done.");
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
            await TryAssembleAsync(files, cancellationToken);
            return true;
        }

        await BlobJson.WriteAsync(files.Batch, batch, InferenceJson.Default.BatchPlan, cancellationToken);
        return false;
    }

    /// <summary>
    /// Cuts the rows into shards as they arrive, sending each shard's message as soon as its input is
    /// written (so workers start before the input is fully read), then writes <c>plan.json</c>.
    /// </summary>
    private async Task SplitAsync(BatchPlan batch, IAsyncEnumerable<ShardInputRow> rows, CancellationToken cancellationToken)
    {
        var files = new BatchFiles(storage, batch.BatchId);
        var rowsPerShard = batch.Options.RowsPerShard!.Value;
        var shards = new List<ShardPlan>();
        var buffer = new System.Buffers.ArrayBufferWriter<byte>(1 << 20);
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
            await runs.UpdateAsync(batch.RunId, r =>
            {
                if (r.Status == RunStatus.Cancelled)
                {
                    throw new RunCancelledException(r.RunId);
                }

                r.SetCounts(new Dictionary<string, long> { ["inferenceRowsSplit"] = total, ["inferenceShards"] = shards.Count });
                return true;
            }, cancellationToken);
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
        await TryAssembleAsync(files, cancellationToken);
    }

    /// <summary>Handles an <c>inference-shard</c> message: scores one shard and commits it with its done marker.</summary>
    public async Task HandleShardAsync(InferenceShardRequest request, int dequeueCount, CancellationToken cancellationToken)
    {
        var files = new BatchFiles(storage, request.BatchId);
        var batch = await BlobJson.ReadAsync(files.Batch, InferenceJson.Default.BatchPlan, cancellationToken)
            ?? throw new InvalidMessageException($"The inference-shard message names batch {request.BatchId}, which has no batch.json.");
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["RunId"] = batch.RunId, ["BatchId"] = batch.BatchId, ["Shard"] = request.Shard });
        if (!await files.Done(request.Shard).ExistsAsync(cancellationToken))
        {
            if ((await runs.GetAsync(batch.RunId, cancellationToken))?.Status is RunStatus.Cancelled or RunStatus.Failed)
            {
                logger.LogInformation("Run {RunId} has ended; shard {Shard} is not scored", batch.RunId, request.Shard);
                return;
            }

            try
            {
                await ScoreShardAsync(files, batch, request.Shard, dequeueCount, cancellationToken);
            }
            catch (InferenceRejectedException e)
            {
                await transitions.FailAsync(batch.RunId, Stages.Inference, e.Code, e.Message, TimeSpan.Zero, cancellationToken: cancellationToken);
                return;
            }
            catch (Exception e) when (!cancellationToken.IsCancellationRequested)
            {
                logger.LogWarning(e, "Shard {Shard} of {BatchId} failed on attempt {Attempt}; the host will retry it", request.Shard, batch.BatchId, dequeueCount);
                await transitions.RetryingAsync(batch.RunId, dequeueCount, new InvalidOperationException($"Shard {request.Shard} of {batch.BatchId}: {e.Message}", e));
                throw;
            }

            // The progress report has just read the plan and the done markers: assembly decides from the same.
            var (plan, doneShards) = await ReportProgressAsync(files, batch, cancellationToken);
            await AssembleIfCompleteAsync(files, plan, doneShards, cancellationToken);
            return;
        }

        await TryAssembleAsync(files, cancellationToken);
    }

    private async Task ScoreShardAsync(BatchFiles files, BatchPlan batch, int shard, int attempt, CancellationToken cancellationToken)
    {
        var wall = Stopwatch.StartNew();
        var rows = await files.ReadInputAsync(shard, cancellationToken);
        var model = await models.GetAsync(batch.ModelId, cancellationToken);
        if (batch.ModelVersion is { } version && model.Manifest.CreatedAt != version)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.ModelChanged,
                $"Model '{batch.ModelId}' was registered again (version {model.Manifest.CreatedAt:O}) while batch {batch.BatchId} (version {version:O}) was being scored; its rows are not mixed across versions. Send the command again: the new version gets a new batch.");
        }

        // Requests of OpenAI's batch format that this model cannot answer fail before scoring.
        for (var i = 0; i < rows.Count; i++)
        {
            if (rows[i] is { Code: null, OpenAi: { } request } && OpenAiBatchFormat.Refusal(request, model.Manifest) is var (refusedCode, refusal))
            {
                rows[i] = rows[i] with { Code = refusedCode, Error = refusal };
            }
        }

        var scorer = new BatchScorer(model, models.Settings, batch.Options.MaxTokensPerBatch!.Value, batch.Options.Normalize ?? model.Manifest.Normalize);
        var (scored, stats) = await scorer.ScoreAsync([.. rows.Select(r => r.Code is null ? r.Text : null)], cancellationToken);
        var openAi = rows.Count > 0 && rows[0].OpenAi is not null ? new OpenAiBatchFormat.RowOutcome[rows.Count] : null;

        var results = new BatchLineWriter();
        var errors = new BatchLineWriter();
        var ledger = new BatchLineWriter();
        var codes = new Dictionary<string, long>();
        var samples = new Dictionary<string, string>();
        var succeeded = 0;
        for (var i = 0; i < rows.Count; i++)
        {
            var row = rows[i];
            var attempts = row.PriorAttempts + attempt;
            if (scored[i].Values is { } values && row.OpenAi is { } asked && OpenAiBatchFormat.Mismatch(asked, values.Length) is var (mismatchCode, mismatch))
            {
                scored[i] = new ScoredRow(null, mismatchCode, mismatch);
            }

            if (scored[i].Values is { } scoredValues)
            {
                results.Result(row, scoredValues, model.Manifest, row.OpenAi is null ? null : scored[i].Tokens);
                ledger.LedgerEntry(row, true, attempts, null, null);
                openAi?[i] = new OpenAiBatchFormat.RowOutcome(scoredValues, scored[i].Tokens, null, null);
                succeeded++;
                continue;
            }

            var code = row.Code ?? scored[i].Code ?? RowErrorCodes.ModelError;
            var error = row.Error ?? scored[i].Error ?? "The row produced no output.";
            openAi?[i] = new OpenAiBatchFormat.RowOutcome(null, 0, code, error);
            errors.Error(row, code, error);
            ledger.LedgerEntry(row, false, attempts, code, error);
            codes[code] = codes.GetValueOrDefault(code) + 1;
            samples.TryAdd(code, error);
        }

        await files.ShardResults(shard).UploadAsync(results.ToBinaryData(), overwrite: true, cancellationToken);
        await files.ShardErrors(shard).UploadAsync(errors.ToBinaryData(), overwrite: true, cancellationToken);
        await files.ShardLedger(shard).UploadAsync(ledger.ToBinaryData(), overwrite: true, cancellationToken);
        var (requests, failedRequests) = openAi is null ? (null, null) : await WriteOpenAiShardAsync(files, shard, rows, openAi, model.Manifest, cancellationToken);
        var outcome = new ShardOutcome
        {
            Shard = shard,
            Rows = rows.Count,
            Succeeded = succeeded,
            Failed = rows.Count - succeeded,
            Tokens = stats.Tokens,
            Slots = stats.Slots,
            Batches = stats.Batches,
            TokenizeMs = Math.Round(stats.TokenizeMs, 1),
            InferenceMs = Math.Round(stats.InferenceMs, 1),
            WallMs = Math.Round(wall.Elapsed.TotalMilliseconds, 1),
            ExecutionProvider = model.ExecutionProvider,
            Attempt = attempt,
            ErrorCodes = codes,
            ErrorSamples = samples,
            OpenAiRequests = requests,
            OpenAiFailed = failedRequests,
            FinishedAt = DateTimeOffset.UtcNow,
        };
        await WriteDoneAsync(files, outcome, cancellationToken);
        logger.LogInformation("Shard {Shard} of {BatchId}: {Rows} rows ({Failed} failed), {Tokens} tokens, padding {Padding:P1}, model {ModelMs} ms",
            shard, batch.BatchId, rows.Count, outcome.Failed, stats.Tokens, Padding(stats.Tokens, stats.Slots), outcome.InferenceMs);
    }

    /// <summary>A shard's lines in OpenAI's batch output format, written beside its own results before its done marker.</summary>
    private static async Task<(int?, int?)> WriteOpenAiShardAsync(BatchFiles files, int shard, IReadOnlyList<ShardInputRow> rows, IReadOnlyList<OpenAiBatchFormat.RowOutcome> outcomes, ModelManifest model, CancellationToken cancellationToken)
    {
        var (output, errors, requests, failed) = OpenAiBatchFormat.WriteShard(files.BatchId, rows, outcomes, model);
        await files.ShardOpenAiOutput(shard).UploadAsync(output, overwrite: true, cancellationToken);
        await files.ShardOpenAiErrors(shard).UploadAsync(errors, overwrite: true, cancellationToken);
        return (requests, failed);
    }

    private static Task WriteDoneAsync(BatchFiles files, ShardOutcome outcome, CancellationToken cancellationToken) =>
        files.Done(outcome.Shard).UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(outcome, InferenceJson.Default.ShardOutcome)), new BlobUploadOptions
        {
            Metadata = new Dictionary<string, string>
            {
                [BatchFiles.RowsMetadata] = outcome.Rows.ToString(System.Globalization.CultureInfo.InvariantCulture),
                [BatchFiles.FailedMetadata] = outcome.Failed.ToString(System.Globalization.CultureInfo.InvariantCulture),
            },
        }, cancellationToken);

    private static double Padding(long tokens, long slots) => slots == 0 ? 0 : 1 - (double)tokens / slots;

    /// <summary>Rows done of total, rows per second and an ETA on the run, from the done markers (so redeliveries never count twice).</summary>
    private async Task<(BatchPlan? Plan, int DoneShards)> ReportProgressAsync(BatchFiles files, BatchPlan batch, CancellationToken cancellationToken)
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
    private async Task TryAssembleAsync(BatchFiles files, CancellationToken cancellationToken)
    {
        if (await files.Manifest.ExistsAsync(cancellationToken))
        {
            return;
        }

        var plan = await BlobJson.ReadAsync(files.Plan, InferenceJson.Default.BatchPlan, cancellationToken);
        await AssembleIfCompleteAsync(files, plan, plan is null ? 0 : (await files.ListDoneAsync(cancellationToken)).Count, cancellationToken);
    }

    /// <summary>Assembles under the batch's lease when the input is fully split (a plan) and every shard is done.</summary>
    private async Task AssembleIfCompleteAsync(BatchFiles files, BatchPlan? plan, int doneShards, CancellationToken cancellationToken)
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

        // A retry's own manifest is its commit, so it is written only once its rows are merged back.
        var manifest = await AssembleAsync(files, plan, [], write: plan.RetryOf is null, cancellationToken);
        if (plan.RetryOf is { } original)
        {
            await MergeRetryAsync(new BatchFiles(storage, original), files, cancellationToken);
            await BlobJson.WriteAsync(files.Manifest, manifest, InferenceJson.Default.InferenceManifest, cancellationToken);
        }

        await FinishRunAsync(plan.RunId, files, manifest, cancellationToken);
    }

    private async Task<InferenceManifest> AssembleAsync(BatchFiles files, BatchPlan plan, List<string> retries, bool write, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        var outcomes = new List<ShardOutcome>();
        foreach (var shard in plan.Shards)
        {
            outcomes.Add(await BlobJson.ReadAsync(files.Done(shard.Shard), InferenceJson.Default.ShardOutcome, cancellationToken)
                ?? throw new InvalidOperationException($"Shard {shard.Shard} of {files.BatchId} has no done marker."));
        }

        var indexes = plan.Shards.Select(s => s.Shard).ToList();
        await BatchFiles.ConcatenateAsync(indexes.Select(files.ShardResults), files.Results, cancellationToken);
        await BatchFiles.ConcatenateAsync(indexes.Select(files.ShardErrors), files.Errors, cancellationToken);
        await BatchFiles.ConcatenateAsync(indexes.Select(files.ShardLedger), files.Ledger, cancellationToken);
        if (plan.OpenAiRequests is not null)
        {
            await BatchFiles.ConcatenateAsync(indexes.Select(files.ShardOpenAiOutput), files.OpenAiOutput, cancellationToken);
            await BatchFiles.ConcatenateAsync(indexes.Select(files.ShardOpenAiErrors), files.OpenAiErrors, cancellationToken);
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
            PaddingFraction = Math.Round(Padding(tokens, slots), 4),
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
        if (write)
        {
            await BlobJson.WriteAsync(files.Manifest, manifest, InferenceJson.Default.InferenceManifest, cancellationToken);
        }

        logger.LogInformation("Batch {BatchId} assembled: {Rows} rows, {Failed} failed, {RowsPerSecond} rows/s", files.BatchId, rows, failed, manifest.RowsPerSecond);
        return manifest;
    }

    /// <summary>
    /// Merges a finished retry into the batch it retried: each touched shard's results, errors and ledger
    /// are rewritten with the retried rows in place (every earlier success kept), then the batch is
    /// reassembled and its manifest rewritten, naming the retry.
    /// </summary>
    private async Task MergeRetryAsync(BatchFiles original, BatchFiles retry, CancellationToken cancellationToken)
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
                (requests, failedRequests) = await WriteOpenAiShardAsync(original, shard.Shard, input, outcomes, (await models.GetAsync(plan.ModelId, cancellationToken)).Manifest, cancellationToken);
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

            await WriteDoneAsync(original, outcome with
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
        var merged = await AssembleAsync(original, plan, retries, write: false, cancellationToken);
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
            await FinishRunAsync(previous.RunId, original, merged, cancellationToken);
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

    /// <summary>The run ends with the batch: succeeded, or completed_with_failures naming the most common row error.</summary>
    private async Task FinishRunAsync(string runId, BatchFiles files, InferenceManifest manifest, CancellationToken cancellationToken)
    {
        var status = manifest.Failed > 0 ? RunStatus.CompletedWithFailures : RunStatus.Succeeded;
        var (run, changed) = await runs.TryUpdateAsync(runId, r =>
        {
            if (r.Status == RunStatus.Cancelled)
            {
                return false;
            }

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
            r.ErrorCode = manifest.Failed > 0 ? RowsFailedCode : null;
            r.LastError = null;
            r.EndedAt = DateTimeOffset.UtcNow;
            return true;
        }, cancellationToken);
        if (changed)
        {
            await events.PublishAsync(status == RunStatus.Succeeded ? RunEvents.Types.StageSucceeded : RunEvents.Types.StageCompletedWithFailures, run, cancellationToken);
        }
    }
}
