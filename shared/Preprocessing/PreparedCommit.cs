using System.Text.Json;
using Microsoft.Extensions.Logging;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Preprocessing;

/// <summary>
/// The end of a build, whoever did it (the single pass, or the assembly of partitions): <c>stats.json</c>,
/// <c>report.json</c> and the manifest last, then the run: succeeded (and the fine-tune queued when the run
/// asks for one), or failed when the report does not pass and a fine-tune was asked for.
/// </summary>
internal sealed class PreparedCommit(StorageClients storage, RunStore runs, RunTransitions transitions, QueueSender sender, ILogger logger)
{
    /// <summary>Writes the statistics, the report and (once) the manifest of a finished build.</summary>
    public async Task<(PreparedManifest Manifest, ValidationReport Report)> WriteAsync(
        string runId, DatasetManifest dataset, PreprocessRecipe recipe, TokenizerSource tokenizer, string preparedId, BuildResult build, TimeSpan elapsed, CancellationToken cancellationToken)
    {
        if (build.Stats.Train.Records + build.Stats.Validation.Records == 0)
        {
            throw new PreprocessingRejectedException(PreprocessErrorCodes.NoRecordsLeft,
                $"No records are left after cleaning and deduplication ({build.Stats.RecordsRead} read). Check the recipe's dedup and normalize settings.");
        }

        var datasets = storage.Container(StorageNames.Containers.Datasets);
        var folder = PreparedPaths.Folder(dataset.DatasetId, preparedId);
        var report = Report(preparedId, build, recipe, dataset);
        await BlobJson.WriteAsync(datasets.GetBlobClient(folder + "stats.json"), build.Stats, PreprocessJson.Default.PreparedStats, cancellationToken);
        await BlobJson.WriteAsync(datasets.GetBlobClient(folder + "report.json"), report, PreprocessJson.Default.ValidationReport, cancellationToken);
        var probe = tokenizer.Probe;
        var manifest = new PreparedManifest
        {
            PreparedId = preparedId,
            DatasetId = dataset.DatasetId,
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
            TimingsMs = new() { ["preprocess"] = Math.Round(elapsed.TotalMilliseconds, 1) },
        };
        if (!await BlobJson.WriteOnceAsync(datasets.GetBlobClient(folder + "manifest.json"), manifest, PreprocessJson.Default.PreparedManifest, cancellationToken))
        {
            manifest = (await ReadAsync(dataset.DatasetId, preparedId, cancellationToken))!.Value.Manifest;
        }

        return (manifest, report);
    }

    /// <summary>A prepared dataset's manifest and report, or null when it has no manifest (not prepared, or not yet).</summary>
    public async Task<(PreparedManifest Manifest, ValidationReport Report)?> ReadAsync(string datasetId, string preparedId, CancellationToken cancellationToken)
    {
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        var folder = PreparedPaths.Folder(datasetId, preparedId);
        if (await BlobJson.ReadAsync(datasets.GetBlobClient(folder + "manifest.json"), PreprocessJson.Default.PreparedManifest, cancellationToken) is not { } manifest)
        {
            return null;
        }

        var report = (await BlobJson.ReadAsync(datasets.GetBlobClient(folder + "report.json"), PreprocessJson.Default.ValidationReport, cancellationToken))!;
        return (manifest, report);
    }

    /// <summary>The stage ends on the run: its counts and artifacts, and the fine-tune when asked for and the report passes.</summary>
    public async Task FinishRunAsync(PreprocessRequest request, string runId, PreparedManifest manifest, ValidationReport report, TimeSpan elapsed, CancellationToken cancellationToken)
    {
        var preparedId = manifest.PreparedId;
        var folder = PreparedPaths.Folder(request.DatasetId, preparedId);
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
            r.SetTiming(Stages.Preprocess, elapsed);
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
                $"The validation report did not pass, so no fine-tune was started: {report.Summary()} See {manifest.Report}.", elapsed,
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
