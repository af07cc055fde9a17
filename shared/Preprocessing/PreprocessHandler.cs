using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Preprocessing;

/// <summary>
/// The preprocessing stage: a dataset and a recipe become
/// <c>datasets/&lt;datasetId&gt;/prepared/&lt;preparedId&gt;/</c> (train and validation shards,
/// <c>stats.json</c>, <c>report.json</c>, <c>manifest.json</c> last). A dataset of more than
/// <c>partitionRecords</c> records (or a recipe that asks) is fanned out over partitions
/// (<see cref="PartitionedBuild"/>); a smaller one is prepared in a single pass. A fine-tune is queued
/// only when the run asks for one and the report passes its thresholds.
/// </summary>
public sealed class PreprocessHandler
{
    private readonly StorageClients storage;
    private readonly RunTransitions transitions;
    private readonly PreprocessingOptions options;
    private readonly IngestionOptions ingestionOptions;
    private readonly ILogger logger;
    private readonly PreparedCommit commit;
    private readonly PartitionedBuild partitioned;

    public PreprocessHandler(
        StorageClients storage,
        RunStore runs,
        RunTransitions transitions,
        QueueSender sender,
        IOptions<PreprocessingOptions> options,
        IOptions<IngestionOptions> ingestionOptions,
        ILogger<PreprocessHandler> logger)
    {
        this.storage = storage;
        this.transitions = transitions;
        this.options = options.Value;
        this.ingestionOptions = ingestionOptions.Value;
        this.logger = logger;
        commit = new PreparedCommit(storage, runs, transitions, sender, logger);
        partitioned = new PartitionedBuild(storage, runs, transitions, sender, commit, this.options, this.ingestionOptions.ProgressInterval, logger);
    }

    public static string Folder(string datasetId, string preparedId) => PreparedPaths.Folder(datasetId, preparedId);

    /// <summary>The prepared id: the dataset, the recipe (without its partitioning settings) and the tokenizer's fingerprint.</summary>
    public static string PreparedIdFor(string datasetId, PreprocessRecipe recipe, TokenizerSource tokenizer) =>
        "pp-" + RunIds.Hash($"{datasetId}|{recipe.Canonical()}|{tokenizer.Fingerprint}{FormatVersion(recipe)}", 24);

    /// <summary>
    /// Output format versions, so a prepared dataset made by older code is not taken for a new one. Near
    /// dedup 2 (2026-12-01): clusters of verified pairs, each keeping its first record, and exact duplicates
    /// counted as exact, the same at any number of partitions (version 1 kept a record unless it matched
    /// an earlier kept one). Exact and no dedup are unchanged (no suffix, the ids they always had).
    /// </summary>
    private static string FormatVersion(PreprocessRecipe recipe) => recipe.Dedup.Mode == DedupModes.Near ? "|near-dedup-2" : "";

    /// <summary>Handles a <c>preprocess</c> message (from ingestion, or a command).</summary>
    public async Task HandleAsync(PreprocessRequest request, string runId, int dequeueCount, CancellationToken cancellationToken)
    {
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["DatasetId"] = request.DatasetId });
        var initial = new RunRecord { RunId = runId, Source = $"dataset:{request.DatasetId}", DatasetId = request.DatasetId, Stage = Stages.Preprocess };
        var stage = new StageRun(initial, Stages.Preprocess, dequeueCount, logger) { OnStart = r => r.DatasetId = request.DatasetId };
        await transitions.RunStageAsync(stage, (clock, token) => PrepareAsync(request, runId, clock, token), cancellationToken);
    }

    /// <summary>Handles a <c>preprocess-partition</c> message: one partition of a fanned-out build.</summary>
    public Task HandlePartitionAsync(PreprocessPartitionRequest request, int dequeueCount, CancellationToken cancellationToken) =>
        partitioned.HandlePartitionAsync(request, dequeueCount, cancellationToken);

    private async Task PrepareAsync(PreprocessRequest request, string runId, Stopwatch clock, CancellationToken cancellationToken)
    {
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        var dataset = await BlobJson.ReadAsync(datasets.GetBlobClient($"{request.DatasetId}/manifest.json"), PipelineJson.Default.DatasetManifest, cancellationToken)
            ?? throw new PreprocessingRejectedException(PreprocessErrorCodes.DatasetNotFound,
                $"Dataset {request.DatasetId} has no manifest: it was never ingested, or its ingestion did not finish. Ingest the file first (drop it into incoming).");
        var recipe = PreprocessRecipe.From(request.Spec?.Preprocess);
        var tokenizer = await TokenizerSource.LoadAsync(storage, recipe.Tokenizer, cancellationToken);
        var preparedId = PreparedIdFor(request.DatasetId, recipe, tokenizer);
        var folder = Folder(request.DatasetId, preparedId);

        if (await commit.ReadAsync(request.DatasetId, preparedId, cancellationToken) is { } existing)
        {
            await commit.FinishRunAsync(request, runId, existing.Manifest, existing.Report, clock.Elapsed, cancellationToken);
            return;
        }

        var partitions = recipe.PartitionsFor(dataset.Counts.Valid);

        if (partitions > 1)
        {
            await partitioned.PlanAsync(request, runId, dataset, recipe, tokenizer, preparedId, partitions, cancellationToken);
            return;
        }

        // Near dedup reads the records twice (signatures and clusters first), so the builder opens them itself.
        var records = datasets.GetBlobClient(dataset.Records);
        var builder = new PreparedDatasetBuilder(recipe, tokenizer, options);
        var lastProgress = Stopwatch.StartNew();
        var build = await builder.BuildAsync(async token => (await records.DownloadStreamingAsync(cancellationToken: token)).Value.Content, dataset, datasets, folder, async p =>
        {
            if (lastProgress.Elapsed >= ingestionOptions.ProgressInterval)
            {
                lastProgress.Restart();
                await transitions.ProgressAsync(runId,
                    r => r.SetCounts(new Dictionary<string, long> { ["preprocessRecords"] = p.Records, ["preprocessTokens"] = p.Tokens }), cancellationToken);
            }
        }, cancellationToken);

        var (manifest, report) = await commit.WriteAsync(runId, dataset, recipe, tokenizer, preparedId, build, clock.Elapsed, cancellationToken);
        await commit.FinishRunAsync(request, runId, manifest, report, clock.Elapsed, cancellationToken);
    }
}
