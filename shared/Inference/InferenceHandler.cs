using System.Diagnostics;
using System.Text.Json;
using Azure;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// The batch inference stage. An <c>inference</c> message (or <c>infer</c> command) splits its input into
/// shards as it streams in and fans out one <c>inference-shard</c> message per shard; each shard is scored
/// and committed on its own (a failed shard is retried alone), and the last one to finish assembles
/// <c>outputs/&lt;batchId&gt;/</c>. <c>retry-failed</c> rescores only a finished batch's failed rows and
/// commits them, with every earlier result, as the batch's next version (committed files are never rewritten). See <see cref="BatchFiles"/> for the layout.
/// </summary>
public sealed class InferenceHandler
{
    private readonly StorageClients storage;
    private readonly RunStore runs;
    private readonly RunTransitions transitions;
    private readonly ModelSessions models;
    private readonly ILogger logger;
    public const string RowsFailedCode = "RowsFailed";
    private readonly BatchAssembler assembler;
    private readonly BatchSplitter splitter;
    private readonly BatchRetry retry;
    private readonly ShardScorer scorer;

    public InferenceHandler(
        StorageClients storage,
        RunStore runs,
        RunTransitions transitions,
        QueueSender sender,
        ModelSessions models,
        ILogger<InferenceHandler> logger)
    {
        this.storage = storage;
        this.runs = runs;
        this.transitions = transitions;
        this.models = models;
        this.logger = logger;
        retry = new BatchRetry(storage, runs, models);
        assembler = new BatchAssembler(storage, runs, transitions, models, retry, logger);
        splitter = new BatchSplitter(storage, runs, transitions, sender, assembler, logger);
        scorer = new ShardScorer(models, logger);
    }

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

    private Task RunStageAsync(RunRecord initial, int dequeueCount, Func<CancellationToken, Task> stage, CancellationToken cancellationToken) =>
        transitions.RunStageAsync(new StageRun(initial, Stages.Inference, dequeueCount, logger), (_, token) => stage(token), cancellationToken);

    private async Task StartBatchAsync(InferenceRequest request, string runId, CancellationToken cancellationToken)
    {
        request.Options?.Validate();
        var model = await models.GetAsync(request.ModelId, cancellationToken);
        var options = (request.Options ?? new InferenceOptions()).Resolved(models.Settings.MaxTokensPerBatch);
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
        if (await splitter.ResumeAsync(batch, runId, cancellationToken))
        {
            return;
        }

        // A conditional read: if the input changes while it is read, the read fails rather than mixing versions.
        var download = await input.DownloadStreamingAsync(new BlobDownloadOptions { Conditions = new BlobRequestConditions { IfMatch = properties.ETag } }, cancellationToken);
        await using var stream = download.Value.Content;
        await splitter.SplitAsync(batch, InferenceInput.ReadAsync(stream, request.Input, options, models.Settings.MaxRowBytes, cancellationToken), cancellationToken);
    }

    private async Task StartRetryAsync(RetryFailedCommand command, string runId, CancellationToken cancellationToken)
    {
        // A redelivery (after this run waited for another run's retry of the same rows) resumes the retry batch it
        // planned, even once that batch is merged: it is not planned again from the version the merge committed.
        if ((await runs.GetAsync(runId, cancellationToken))?.GetArtifacts().GetValueOrDefault("batch") is { } planned
            && await BlobJson.ReadAsync(new BatchFiles(storage, planned[(StorageNames.Containers.Outputs.Length + 1)..].TrimEnd('/')).Batch, InferenceJson.Default.BatchPlan, cancellationToken) is { RetryOf: not null } resumed
            && await splitter.ResumeAsync(resumed, runId, cancellationToken))
        {
            return;
        }

        var (batch, rows) = await retry.PlanAsync(command, runId, cancellationToken);
        if (await splitter.ResumeAsync(batch, runId, cancellationToken))
        {
            return;
        }

        await splitter.SplitAsync(batch, rows, cancellationToken);
    }

    /// <summary>Handles an <c>inference-shard</c> message: scores one shard and commits it with its done marker.</summary>
    public async Task HandleShardAsync(InferenceShardRequest request, int dequeueCount, CancellationToken cancellationToken)
    {
        var files = new BatchFiles(storage, request.BatchId);
        var batch = await BlobJson.ReadAsync(files.Batch, InferenceJson.Default.BatchPlan, cancellationToken)
            ?? throw new InvalidMessageException($"The inference-shard message names batch {request.BatchId}, which has no batch.json.");
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["RunId"] = batch.RunId, ["BatchId"] = batch.BatchId, ["Shard"] = request.Shard });
        // Under the shard's own lease, so two deliveries of it at once never score it side by side: the second is
        // busy (put back), and once it holds the lease it finds the first one's commit.
        var part = new StageRun(new RunRecord { RunId = batch.RunId }, Stages.Inference, dequeueCount, logger) { Part = $"Shard {request.Shard} of {batch.BatchId}" };
        switch (await transitions.RunPartOnceAsync(part, batch.BatchId, $"shard-{request.Shard:D5}", files.Done(request.Shard),
            (_, token) => scorer.ScoreAsync(files, batch, request.Shard, dequeueCount, token), cancellationToken))
        {
            case PartOutcome.Stopped:
                return;
            case PartOutcome.Done:
                // The progress report has just read the plan and the done markers: assembly decides from the same.
                var (plan, doneShards) = await assembler.ReportProgressAsync(files, batch, cancellationToken);
                await assembler.AssembleIfCompleteAsync(files, plan, doneShards, cancellationToken);
                return;
        }

        await assembler.TryAssembleAsync(files, cancellationToken);
    }
}
