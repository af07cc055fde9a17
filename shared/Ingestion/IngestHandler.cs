using System.Diagnostics;
using System.Text.Json;
using Azure;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Ingestion;

/// <summary>A source to ingest: one version (ETag) of one blob.</summary>
public sealed record IngestRequest(string Container, string Blob, string ETag, string RunId, RunSpec? Spec);

/// <summary>
/// The ingestion stage: turns a dropped file into <c>datasets/&lt;datasetId&gt;/</c> (records, errors,
/// manifest last), records the run, and hands the dataset to preprocessing. Bad input fails the run with a
/// precise reason and a quarantined copy; infrastructure failures are thrown so the host retries.
/// </summary>
public sealed class IngestHandler(
    StorageClients storage,
    RunEvents events,
    RunTransitions transitions,
    QueueSender sender,
    BlobCopier copier,
    IOptions<IngestionOptions> options,
    ILogger<IngestHandler> logger)
{
    public const string StagingPrefix = "_staging";
    private readonly IngestionOptions _options = options.Value;

    public static string StagingPath(string runId, string file) => $"{StagingPrefix}/{runId}/{file}";

    /// <summary>Handles an <c>ingest</c> command naming a blob already in the account (<c>container/path</c>).</summary>
    public async Task HandleCommandAsync(IngestCommand command, string? runId, int dequeueCount, CancellationToken cancellationToken) =>
        await IngestAsync(await RequestForAsync(storage, command, runId, cancellationToken), dequeueCount, cancellationToken);

    /// <summary>
    /// What an <c>ingest</c> command asks for: the current version of the blob it names and its run, which is
    /// the run a drop of that version makes unless the command names one. A poisoned command finds its run here too.
    /// </summary>
    /// <exception cref="InvalidMessageException">The blob is not named as container/path, does not exist, or the spec is invalid.</exception>
    public static async Task<IngestRequest> RequestForAsync(StorageClients storage, IngestCommand command, string? runId, CancellationToken cancellationToken)
    {
        var slash = command.Blob.IndexOf('/');
        if (slash <= 0 || slash == command.Blob.Length - 1)
        {
            throw new InvalidMessageException($"The ingest command's blob '{command.Blob}' must be 'container/path', for example 'incoming/reviews.tsv'.");
        }

        var container = command.Blob[..slash];
        var name = command.Blob[(slash + 1)..];
        var blob = storage.Container(container).GetBlobClient(name);
        Response<BlobProperties> properties;
        try
        {
            properties = await blob.GetPropertiesAsync(cancellationToken: cancellationToken);
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            throw new InvalidMessageException($"The ingest command names '{command.Blob}', which does not exist in this storage account. Upload it first.");
        }

        try
        {
            command.Spec?.Validate("in the ingest command");
        }
        catch (RunSpecException e)
        {
            throw new InvalidMessageException(e.Message);
        }

        var etag = properties.Value.ETag.ToString().Trim('"');
        return new IngestRequest(container, name, etag, runId ?? RunIds.ForBlob(container, name, etag), command.Spec);
    }

    public async Task IngestAsync(IngestRequest request, int dequeueCount, CancellationToken cancellationToken)
    {
        var source = $"{request.Container}/{request.Blob}";
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["Source"] = source });
        var stage = new StageRun(new RunRecord { RunId = request.RunId, Source = source, SourceETag = request.ETag, Stage = Stages.Ingest }, Stages.Ingest, dequeueCount, logger)
        {
            OnRejected = (e, elapsed) => RejectAsync(request, e.Code, e.Message, result: null, elapsed, cancellationToken),
            OnCancelled = () => DeleteStagingAsync(request.RunId, CancellationToken.None),
        };
        await transitions.RunStageAsync(stage, async (clock, token) =>
        {
            try
            {
                await RunIngestionAsync(request, clock, token);
            }
            catch (RunSpecException e)
            {
                throw new IngestionRejectedException(RejectionCodes.InvalidRunSpec, e.Message);
            }
        }, cancellationToken);
    }

    private async Task RunIngestionAsync(IngestRequest request, Stopwatch clock, CancellationToken cancellationToken)
    {
        var sourceBlob = storage.Container(request.Container).GetBlobClient(request.Blob);
        var properties = await SourcePropertiesAsync(sourceBlob, request, cancellationToken);
        var spec = request.Spec ?? await FindSpecAsync(request, cancellationToken);
        var settings = _options.Resolve(spec?.Ingest);
        if (properties.ContentLength > _options.MaxFileBytes)
        {
            throw new IngestionRejectedException(RejectionCodes.FileTooLarge,
                $"The file is {properties.ContentLength:N0} bytes, over the {_options.MaxFileBytes:N0} byte limit (Pipeline:Ingestion:MaxFileBytes). Split it into smaller files.");
        }

        var datasets = storage.Container(StorageNames.Containers.Datasets);
        var stagedRecords = datasets.GetBlobClient(StagingPath(request.RunId, "records.jsonl"));
        var stagedErrors = datasets.GetBlobClient(StagingPath(request.RunId, "errors.jsonl"));
        IngestResult result;
        var download = await sourceBlob.DownloadStreamingAsync(
            new BlobDownloadOptions { Conditions = new BlobRequestConditions { IfMatch = new ETag(request.ETag) } }, cancellationToken);
        await using (var sourceStream = download.Value.Content)
        await using (var recordsStream = await OpenWriteAsync(stagedRecords, cancellationToken))
        await using (var errorsStream = await OpenWriteAsync(stagedErrors, cancellationToken))
        {
            var ingestor = new DatasetIngestor(_options);
            result = await ingestor.RunAsync(sourceStream, request.Blob, properties.ContentLength, settings, recordsStream, errorsStream,
                counts => new ValueTask(transitions.ProgressAsync(request.RunId, r => r.SetCounts(counts.ToDictionary()), cancellationToken)),
                cancellationToken);
        }

        if (result.Rejection(settings) is { } rejection)
        {
            await RejectAsync(request, rejection.Code, rejection.Message, result, clock.Elapsed, cancellationToken);
            return;
        }

        var fingerprint = settings.Fingerprint();
        var datasetId = "ds-" + RunIds.Hash($"{result.Sha256}|{fingerprint}", 24);
        var manifestBlob = datasets.GetBlobClient($"{datasetId}/manifest.json");
        // A manifest already there is another run's dataset (the same content), or this run's own from a delivery that
        // stopped before its success was saved: that one is still announced.
        var existing = await BlobJson.ReadAsync(manifestBlob, PipelineJson.Default.DatasetManifest, cancellationToken);
        var created = existing?.RunId == request.RunId;
        if (existing is null)
        {
            await CopyOnceAsync(stagedRecords, datasets.GetBlobClient($"{datasetId}/records.jsonl"), datasetId, cancellationToken);
            await CopyOnceAsync(stagedErrors, datasets.GetBlobClient($"{datasetId}/errors.jsonl"), datasetId, cancellationToken);
            var manifest = new DatasetManifest
            {
                DatasetId = datasetId,
                Format = result.Detected.Format,
                FormatReason = result.Detected.Reason,
                RecordKind = result.Detected.RecordKind,
                LabelType = result.LabelType,
                LabelCounts = result.LabelCounts.Count > 0 ? result.LabelCounts : null,
                HasHeader = result.Detected.HasHeader,
                Columns = result.Detected.Columns,
                Counts = result.Counts,
                DuplicatesExact = result.DuplicatesExact,
                Sha256 = result.Sha256,
                SourceBlob = $"{request.Container}/{request.Blob}",
                SourceETag = request.ETag,
                RunId = request.RunId,
                Records = $"{datasetId}/records.jsonl",
                Errors = $"{datasetId}/errors.jsonl",
                CreatedAt = DateTimeOffset.UtcNow,
                TimingsMs = new() { ["ingest"] = Math.Round(clock.Elapsed.TotalMilliseconds, 1) },
                SettingsFingerprint = fingerprint,
            };
            created = await BlobJson.WriteOnceAsync(manifestBlob, manifest, PipelineJson.Default.DatasetManifest, cancellationToken);
        }

        await DeleteStagingAsync(request.RunId, cancellationToken);
        await sender.SendAsync(StorageNames.Queues.Preprocess, MessageTypes.Preprocess, request.RunId,
            new PreprocessRequest(datasetId, $"{StorageNames.Containers.Datasets}/{datasetId}/manifest.json", spec),
            PipelineJson.Default.PreprocessRequest, cancellationToken: cancellationToken);

        // Cancelled while this delivery ingested: the dataset is kept (content-addressed), the run stays as it is.
        // A dataset this run created is announced with the run's success, in the same table transaction.
        IReadOnlyList<string> announced = created ? [RunEvents.Types.DatasetCreated, RunEvents.Types.StageSucceeded] : [RunEvents.Types.StageSucceeded];
        var (run, changed) = await transitions.SucceedAsync(request.RunId, announced, r =>
        {
            r.DatasetId = datasetId;
            r.Stage = Stages.Preprocess;
            r.SetStage(Stages.Ingest, RunStatus.Succeeded);
            r.SetStage(Stages.Preprocess, RunStatus.Queued);
            r.SetCounts(result.Counts.ToDictionary());
            r.SetArtifact("dataset", $"{StorageNames.Containers.Datasets}/{datasetId}/");
            r.SetArtifact("manifest", $"{StorageNames.Containers.Datasets}/{datasetId}/manifest.json");
            r.SetArtifact("records", $"{StorageNames.Containers.Datasets}/{datasetId}/records.jsonl");
            r.SetArtifact("errors", $"{StorageNames.Containers.Datasets}/{datasetId}/errors.jsonl");
            r.SetTiming(Stages.Ingest, clock.Elapsed);
            r.SpecJson = spec is null ? null : JsonSerializer.Serialize(spec, PipelineJson.Default.RunSpec);
            r.LastError = null;
        }, cancellationToken);
        if (!changed)
        {
            // Cancelled meanwhile: the dataset it created is still announced (it exists, and others may take it).
            if (created)
            {
                await events.PublishAsync(RunEvents.Types.DatasetCreated, run, cancellationToken);
            }

            return;
        }

        logger.LogInformation("Ingested {Source} into {DatasetId}: {Valid} valid, {Invalid} invalid of {Read} records ({Reuse})",
            run.Source, datasetId, result.Counts.Valid, result.Counts.Invalid, result.Counts.Read, created ? "new dataset" : "dataset already existed");
    }

    /// <summary>
    /// A dataset's files are written once (If-None-Match: *): a run ingesting the same content at the same moment
    /// never rewrites what another wrote and may have committed. Its copy complete, the loser adopts it; still
    /// copying, the loser waits (busy) and its redelivery takes the winner's manifest.
    /// </summary>
    private async Task CopyOnceAsync(BlobClient staged, BlobClient destination, string datasetId, CancellationToken cancellationToken)
    {
        try
        {
            await copier.CopyAsync(staged, destination, cancellationToken, new BlobRequestConditions { IfNoneMatch = ETag.All });
        }
        catch (RequestFailedException e) when (e.Status is 409 or 412)
        {
            var existing = (await destination.GetPropertiesAsync(cancellationToken: cancellationToken)).Value;
            if (existing.CopyStatus is CopyStatus.Pending)
            {
                throw new RunBusyException($"Dataset {datasetId} (the same content) is being written by another run; this delivery takes it once it is committed.");
            }

            if (existing.CopyStatus is CopyStatus.Failed or CopyStatus.Aborted)
            {
                // A dead copy is never committed (the manifest comes after the copies): remove it, only if it is still
                // that copy, so the retry copies afresh instead of finding it in the way forever.
                await destination.DeleteIfExistsAsync(conditions: new BlobRequestConditions { IfMatch = existing.ETag }, cancellationToken: cancellationToken);
                throw new IOException($"The copy into {destination.Name} by another run ended {existing.CopyStatus}; it was removed and this delivery will be retried.");
            }
        }
    }

    private static async Task<BlobProperties> SourcePropertiesAsync(BlobClient blob, IngestRequest request, CancellationToken cancellationToken)
    {
        try
        {
            var properties = (await blob.GetPropertiesAsync(cancellationToken: cancellationToken)).Value;
            if (properties.ETag.ToString().Trim('"') != request.ETag)
            {
                throw new IngestionRejectedException(RejectionCodes.SourceChanged,
                    $"The blob {request.Container}/{request.Blob} was overwritten after this version was uploaded; the newer version is ingested by its own run.");
            }

            return properties;
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            throw new IngestionRejectedException(RejectionCodes.SourceNotFound,
                $"The blob {request.Container}/{request.Blob} no longer exists; it was deleted before it could be ingested.");
        }
    }

    private async Task<RunSpec?> FindSpecAsync(IngestRequest request, CancellationToken cancellationToken)
    {
        var container = storage.Container(request.Container);
        foreach (var name in RunSpec.CandidateNamesFor(request.Blob))
        {
            try
            {
                var content = await container.GetBlobClient(name).DownloadContentAsync(cancellationToken);
                return RunSpec.Parse(content.Value.Content.ToMemory().Span, $"{request.Container}/{name}");
            }
            catch (RequestFailedException e) when (e.Status == 404)
            {
            }
        }

        return null;
    }

    private Task<Stream> OpenWriteAsync(BlobClient blob, CancellationToken cancellationToken) =>
        blob.OpenWriteAsync(overwrite: true, new BlobOpenWriteOptions { BufferSize = _options.UploadBlockBytes }, cancellationToken);

    private async Task RejectAsync(IngestRequest request, string code, string message, IngestResult? result, TimeSpan elapsed, CancellationToken cancellationToken)
    {
        var quarantine = storage.Container(StorageNames.Containers.Quarantine);
        var folder = request.RunId;
        var source = storage.Container(request.Container).GetBlobClient(request.Blob);
        if (code is not (RejectionCodes.SourceNotFound or RejectionCodes.SourceChanged) && await source.ExistsAsync(cancellationToken))
        {
            await copier.CopyAsync(source, quarantine.GetBlobClient($"{folder}/{Path.GetFileName(request.Blob)}"), cancellationToken);
        }

        var stagedErrors = storage.Container(StorageNames.Containers.Datasets).GetBlobClient(StagingPath(request.RunId, "errors.jsonl"));
        if (await stagedErrors.ExistsAsync(cancellationToken))
        {
            await copier.CopyAsync(stagedErrors, quarantine.GetBlobClient($"{folder}/errors.jsonl"), cancellationToken);
        }

        var report = new IngestReport
        {
            RunId = request.RunId,
            SourceBlob = $"{request.Container}/{request.Blob}",
            SourceETag = request.ETag,
            Code = code,
            Message = message,
            Format = result?.Detected.Format,
            RecordKind = result?.Detected.RecordKind,
            Counts = result?.Counts,
            FirstErrors = result?.FirstErrors,
            CreatedAt = DateTimeOffset.UtcNow,
        };
        var reportPath = $"{folder}/report.json";
        await BlobJson.WriteAsync(quarantine.GetBlobClient(reportPath), report, PipelineJson.Default.IngestReport, cancellationToken);
        await DeleteStagingAsync(request.RunId, cancellationToken);

        var run = await transitions.FailAsync(request.RunId, Stages.Ingest, code, message, elapsed, r =>
        {
            r.ReportPath = $"{StorageNames.Containers.Quarantine}/{reportPath}";
            r.SetArtifact("quarantine", $"{StorageNames.Containers.Quarantine}/{folder}/");
            if (result is not null)
            {
                r.SetCounts(result.Counts.ToDictionary());
            }
        }, cancellationToken);
        logger.LogWarning("Rejected {Source}: {Code}: {Message}", run.Source, code, message);
    }

    private async Task DeleteStagingAsync(string runId, CancellationToken cancellationToken)
    {
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        foreach (var file in (string[])["records.jsonl", "errors.jsonl"])
        {
            await datasets.GetBlobClient(StagingPath(runId, file)).DeleteIfExistsAsync(cancellationToken: cancellationToken);
        }
    }
}
