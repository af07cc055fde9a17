using System.Diagnostics;
using System.Text.Json;
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
/// <c>stats.json</c>, <c>report.json</c>, <c>manifest.json</c> last). A fine-tune is queued only when the
/// run asks for one and the report passes its thresholds.
/// </summary>
public sealed class PreprocessHandler(
    StorageClients storage,
    RunStore runs,
    RunTransitions transitions,
    QueueSender sender,
    IOptions<PreprocessingOptions> options,
    IOptions<IngestionOptions> ingestionOptions,
    ILogger<PreprocessHandler> logger)
{
    public static string Folder(string datasetId, string preparedId) => PreparedPaths.Folder(datasetId, preparedId);

    /// <summary>Handles a <c>preprocess</c> message (from ingestion, or a command).</summary>
    public async Task HandleAsync(PreprocessRequest request, string runId, int dequeueCount, CancellationToken cancellationToken)
    {
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["DatasetId"] = request.DatasetId });
        var initial = new RunRecord { RunId = runId, Source = $"dataset:{request.DatasetId}", DatasetId = request.DatasetId, Stage = Stages.Preprocess };
        var stage = new StageRun(initial, Stages.Preprocess, dequeueCount, logger) { OnStart = r => r.DatasetId = request.DatasetId };
        await transitions.RunStageAsync(stage, (clock, token) => PrepareAsync(request, runId, clock, token), cancellationToken);
    }

    private async Task PrepareAsync(PreprocessRequest request, string runId, Stopwatch clock, CancellationToken cancellationToken)
    {
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        var dataset = await BlobJson.ReadAsync(datasets.GetBlobClient($"{request.DatasetId}/manifest.json"), PipelineJson.Default.DatasetManifest, cancellationToken)
            ?? throw new PreprocessingRejectedException(PreprocessErrorCodes.DatasetNotFound,
                $"Dataset {request.DatasetId} has no manifest: it was never ingested, or its ingestion did not finish. Ingest the file first (drop it into incoming).");
        var recipe = PreprocessRecipe.From(request.Spec?.Preprocess);
        var tokenizer = await TokenizerSource.LoadAsync(storage, recipe.Tokenizer, cancellationToken);
        var preparedId = "pp-" + RunIds.Hash($"{request.DatasetId}|{recipe.Canonical()}|{tokenizer.Fingerprint}", 24);
        var folder = Folder(request.DatasetId, preparedId);

        var manifest = await BlobJson.ReadAsync(datasets.GetBlobClient(folder + "manifest.json"), PreprocessJson.Default.PreparedManifest, cancellationToken);
        ValidationReport report;
        if (manifest is null)
        {
            var download = await datasets.GetBlobClient(dataset.Records).DownloadStreamingAsync(cancellationToken: cancellationToken);
            BuildResult build;
            await using (var records = download.Value.Content)
            {
                var builder = new PreparedDatasetBuilder(recipe, tokenizer, options.Value);
                var lastProgress = Stopwatch.StartNew();
                build = await builder.BuildAsync(records, dataset, datasets, folder, async p =>
                {
                    if (lastProgress.Elapsed >= ingestionOptions.Value.ProgressInterval)
                    {
                        lastProgress.Restart();
                        await transitions.ProgressAsync(runId,
                            r => r.SetCounts(new Dictionary<string, long> { ["preprocessRecords"] = p.Records, ["preprocessTokens"] = p.Tokens }), cancellationToken);
                    }
                }, cancellationToken);
            }

            if (build.Stats.Train.Records + build.Stats.Validation.Records == 0)
            {
                throw new PreprocessingRejectedException(PreprocessErrorCodes.NoRecordsLeft,
                    $"No records are left after cleaning and deduplication ({build.Stats.RecordsRead} read). Check the recipe's dedup and normalize settings.");
            }

            report = Report(preparedId, build, recipe, dataset);
            await BlobJson.WriteAsync(datasets.GetBlobClient(folder + "stats.json"), build.Stats, PreprocessJson.Default.PreparedStats, cancellationToken);
            await BlobJson.WriteAsync(datasets.GetBlobClient(folder + "report.json"), report, PreprocessJson.Default.ValidationReport, cancellationToken);
            var probe = tokenizer.Probe;
            manifest = new PreparedManifest
            {
                PreparedId = preparedId,
                DatasetId = request.DatasetId,
                RecordKind = dataset.RecordKind,
                Labels = build.Labels,
                Tokenizer = tokenizer.Spec,
                TokenizerFingerprint = tokenizer.Fingerprint,
                PaddingId = probe.Padding,
                EndOfTextId = probe.EndOfText,
                MaxSequenceLength = recipe.MaxSequenceLength,
                Packed = build.Packed,
                Shards = build.Shards,
                Stats = $"{StorageNames.Containers.Datasets}/{folder}stats.json",
                Report = $"{StorageNames.Containers.Datasets}/{folder}report.json",
                ReportPassed = report.Passed,
                Recipe = JsonDocument.Parse(recipe.Canonical()).RootElement.Clone(),
                RunId = runId,
                CreatedAt = DateTimeOffset.UtcNow,
                TimingsMs = new() { ["preprocess"] = Math.Round(clock.Elapsed.TotalMilliseconds, 1) },
            };
            if (!await BlobJson.WriteOnceAsync(datasets.GetBlobClient(folder + "manifest.json"), manifest, PreprocessJson.Default.PreparedManifest, cancellationToken))
            {
                manifest = (await BlobJson.ReadAsync(datasets.GetBlobClient(folder + "manifest.json"), PreprocessJson.Default.PreparedManifest, cancellationToken))!;
            }
        }
        else
        {
            report = (await BlobJson.ReadAsync(datasets.GetBlobClient(folder + "report.json"), PreprocessJson.Default.ValidationReport, cancellationToken))!;
        }

        var wantsFineTune = request.Spec?.FineTune is { ValueKind: JsonValueKind.Object };
        var stats = report.Stats;
        void Record(RunRecord r)
        {
            r.SetStage(Stages.Preprocess, RunStatus.Succeeded);
            r.SetCounts(new Dictionary<string, long>
            {
                ["trainRecords"] = stats.Train.Records,
                ["validationRecords"] = stats.Validation.Records,
                ["trainTokens"] = stats.Train.Tokens,
                ["validationTokens"] = stats.Validation.Tokens,
                ["truncated"] = stats.Truncated,
                ["duplicatesRemoved"] = stats.ExactDuplicatesRemoved + stats.NearDuplicatesRemoved,
                ["redactions"] = stats.Redactions.Values.Sum(),
                ["estimatedTrainingTokens"] = stats.EstimatedTrainingTokens,
            });
            r.SetArtifact("prepared", $"{StorageNames.Containers.Datasets}/{folder}");
            r.SetArtifact("preparedManifest", $"{StorageNames.Containers.Datasets}/{folder}manifest.json");
            r.SetArtifact("stats", manifest.Stats);
            r.SetArtifact("report", manifest.Report);
            r.SetTiming(Stages.Preprocess, clock.Elapsed);
            r.LastError = null;
        }

        if (wantsFineTune && !report.Passed)
        {
            await runs.UpdateAsync(runId, r =>
            {
                Record(r);
                return true;
            }, cancellationToken);
            await transitions.FailAsync(runId, Stages.Preprocess, PreprocessErrorCodes.ValidationReportFailed,
                $"The validation report did not pass, so no fine-tune was started: {report.Summary()} See {manifest.Report}.", clock.Elapsed,
                r => r.ReportPath = manifest.Report, cancellationToken);
            return;
        }

        if (wantsFineTune)
        {
            await sender.SendAsync(StorageNames.Queues.FineTune, MessageTypes.FineTune, runId,
                new FineTuneRequest(request.DatasetId, preparedId, $"{StorageNames.Containers.Datasets}/{folder}manifest.json", request.Spec),
                PreprocessJson.Default.FineTuneRequest, cancellationToken: cancellationToken);
        }

        // Cancelled (or ended by another delivery) while this one prepared: the run stays as it is.
        var (_, changed) = await transitions.SucceedAsync(runId, RunEvents.Types.StageSucceeded, r =>
        {
            Record(r);
            RunTransitions.QueueNextOrEnd(r, wantsFineTune ? Stages.FineTune : null);
        }, cancellationToken);
        if (!changed)
        {
            return;
        }

        logger.LogInformation("Prepared {PreparedId}: {Train} train / {Validation} validation records, {Tokens} tokens; report {Report}",
            preparedId, stats.Train.Records, stats.Validation.Records, stats.Train.Tokens + stats.Validation.Tokens, report.Passed ? "passed" : "did not pass");
    }

    private static ValidationReport Report(string preparedId, BuildResult build, PreprocessRecipe recipe, DatasetManifest dataset)
    {
        var stats = build.Stats;
        var thresholds = recipe.Thresholds;
        var checks = new List<ReportCheck>
        {
            new("minTrainRecords", stats.Train.Records >= thresholds.MinTrainRecords,
                $"{stats.Train.Records} training records (at least {thresholds.MinTrainRecords} required)"),
            new("maxTruncatedFraction", stats.TruncatedFraction <= thresholds.MaxTruncatedFraction,
                $"{stats.TruncatedFraction:P1} of records truncated to {recipe.MaxSequenceLength} tokens (at most {thresholds.MaxTruncatedFraction:P1} allowed)"),
        };
        foreach (var label in build.Labels)
        {
            var count = stats.Train.Labels.GetValueOrDefault(label);
            checks.Add(new ReportCheck($"minExamplesPerLabel[{label}]", count >= thresholds.MinExamplesPerLabel,
                $"label '{label}' has {count} training examples (at least {thresholds.MinExamplesPerLabel} required)"));
        }

        return new ValidationReport
        {
            PreparedId = preparedId,
            Passed = checks.All(c => c.Passed),
            Checks = checks,
            Stats = stats,
            IngestErrors = $"{StorageNames.Containers.Datasets}/{dataset.Errors}",
        };
    }
}
