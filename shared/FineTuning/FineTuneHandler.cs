using System.Diagnostics;
using System.Text.Json;
using Azure;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.FineTuning.Trainer;
using Pipeline.Inference;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.FineTuning;

/// <summary>
/// The fine-tune stage. A <c>finetune</c> message (from preprocessing, or a command) writes
/// <c>jobs/&lt;jobId&gt;/spec.json</c>, submits it to the configured backend and returns; delayed
/// <c>finetune-monitor</c> messages then poll the backend and the trainer's heartbeat until the job ends:
/// succeeded (the model folder is checked and registered, and inference queued when the run asks),
/// failed, cancelled, timed out, or lost (no heartbeat: resubmitted up to a limit). No function waits on training.
/// </summary>
public sealed class FineTuneHandler(
    StorageClients storage,
    RunStore runs,
    RunEvents events,
    RunTransitions transitions,
    QueueSender sender,
    ModelRegistry registry,
    ModelSessions sessions,
    IEnumerable<IFineTuneBackend> backends,
    IOptions<FineTuneOptions> options,
    ILogger<FineTuneHandler> logger)
{
    private FineTuneOptions Options => options.Value;

    private IFineTuneBackend Backend(string name) => backends.FirstOrDefault(b => b.Name == name)
        ?? throw new FineTuneRejectedException(FineTuneErrorCodes.BackendRejected, $"The '{name}' backend is not configured in this app.");

    /// <summary>The job id: the prepared data, the base model (and its version), and every training setting.</summary>
    public static string JobIdFor(string preparedId, string baseModel, DateTimeOffset baseCreatedAt, Hyperparameters hyper, string backend, string? outputModelId, double maxDurationMinutes, bool quantize = false) =>
        "job-" + RunIds.Hash($"{preparedId}|{baseModel}@{baseCreatedAt:O}|{JsonSerializer.Serialize(hyper, FineTuneJson.Default.Hyperparameters)}|{backend}|{outputModelId}|{maxDurationMinutes}{(quantize ? "|int8" : "")}", 24);

    /// <summary>Handles a <c>finetune</c> message or command.</summary>
    public async Task HandleAsync(FineTuneRequest request, string runId, int dequeueCount, CancellationToken cancellationToken)
    {
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["PreparedId"] = request.PreparedId });
        var initial = new RunRecord { RunId = runId, Source = $"prepared:{request.PreparedId}", DatasetId = request.DatasetId, Stage = Stages.FineTune, SpecJson = request.Spec is null ? null : JsonSerializer.Serialize(request.Spec, PipelineJson.Default.RunSpec) };
        var stage = new StageRun(initial, Stages.FineTune, dequeueCount, logger)
        {
            OnStart = r =>
            {
                r.DatasetId ??= request.DatasetId;
                r.SpecJson ??= initial.SpecJson;
            },
        };
        await transitions.RunStageAsync(stage, (_, token) => DispatchAsync(request, runId, token), cancellationToken);
    }

    private async Task DispatchAsync(FineTuneRequest request, string runId, CancellationToken cancellationToken)
    {
        var job = await PlanAsync(request, runId, cancellationToken);
        var jobId = job.JobId;
        var files = new JobFiles(storage, jobId);
        var submission = await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken);
        if (job.RunId != runId && submission is null)
        {
            // A job planned for another run that was never submitted (its dispatch gave up): this run takes it.
            job = job with { RunId = runId };
            await BlobJson.WriteAsync(files.Spec, job, FineTuneJson.Default.JobSpec, cancellationToken);
        }
        else if (job.RunId != runId && submission is not null)
        {
            // The same job (same data, base model and settings) was asked for by another run.
            switch (submission.Outcome)
            {
                case JobStates.Succeeded:
                    // Its model exists: this run reuses it, nothing is trained twice.
                    var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken))!;
                    await SucceededAsync(job with { RunId = runId }, status, TimeSpan.Zero, cancellationToken);
                    return;
                case null:
                    // It is training for another run: this run waits on it and the monitor finishes it with that run.
                    await files.Waiting(runId).UploadAsync(BinaryData.Empty, overwrite: true, cancellationToken);
                    if ((await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken))?.Outcome is not null)
                    {
                        // It ended while this run signed up: the redelivery takes the outcome.
                        throw new RunBusyException($"Job {jobId} ended while run {runId} asked for it.");
                    }

                    await RecordJobAsync(runId, job, files, RunStatus.Running, $"Job {jobId} is training for run {job.RunId}; this run takes its model when it ends.", cancellationToken);
                    return;
                default:
                    // It ended without a model (failed, cancelled, timed out, lost): this run trains it again, as the
                    // next attempt (a new cloud job name), from a fresh chain of polls.
                    job = job with { RunId = runId, CreatedAt = DateTimeOffset.UtcNow };
                    await BlobJson.WriteAsync(files.Spec, job, FineTuneJson.Default.JobSpec, cancellationToken);
                    await files.Cancel.DeleteIfExistsAsync(cancellationToken: cancellationToken);
                    await files.Status.DeleteIfExistsAsync(cancellationToken: cancellationToken);
                    var attempt = submission.Attempt + 1;
                    var now = DateTimeOffset.UtcNow;
                    await UpdateSubmissionAsync(files, s => s with { Attempt = attempt, Handle = null, Outcome = null, FirstSubmittedAt = now, SubmittedAt = now }, cancellationToken);
                    var handle = await Backend(job.Backend).SubmitAsync(job, attempt, cancellationToken);
                    await UpdateSubmissionAsync(files, s => s with { Handle = handle }, cancellationToken);
                    submission = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken))!;
                    break;
            }
        }

        if (submission is null)
        {
            // Submissions are idempotent per job (a second trainer waits for the first one's lease, a cloud job has the job's name).
            var handle = await Backend(job.Backend).SubmitAsync(job, 1, cancellationToken);
            var now = DateTimeOffset.UtcNow;
            submission = new JobSubmission { JobId = jobId, Backend = job.Backend, Attempt = 1, Handle = handle, FirstSubmittedAt = now, SubmittedAt = now };
            if (!await BlobJson.WriteOnceAsync(files.Submission, submission, FineTuneJson.Default.JobSubmission, cancellationToken))
            {
                submission = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, cancellationToken))!;
            }
        }

        await RecordJobAsync(runId, job, files, submission.Handle is null ? RunStatus.Queued : RunStatus.Running, null, cancellationToken);
        // The next tick after the last processed one: a redelivered dispatch joins (never duplicates) the chain of polls.
        await ScheduleAsync(jobId, runId, submission.Tick + 1, cancellationToken);
        logger.LogInformation("Fine-tune job {JobId} submitted to {Backend} (base {BaseModel}, {Epochs} epochs, {Trainable})", jobId, job.Backend, job.BaseModel, job.Hyperparameters.Epochs, job.Hyperparameters.Trainable);
    }

    /// <summary>The run is on the fine-tune stage with this job: its status, the job and model paths, and a note while it waits.</summary>
    private async Task RecordJobAsync(string runId, JobSpec job, JobFiles files, string stageStatus, string? note, CancellationToken cancellationToken)
    {
        var run = await runs.UpdateAsync(runId, r =>
        {
            r.Stage = Stages.FineTune;
            r.SetStage(Stages.FineTune, stageStatus);
            r.SetArtifact("job", $"{StorageNames.Containers.Jobs}/{job.JobId}/");
            r.SetArtifact("jobSpec", files.SpecPath);
            r.SetArtifact("model", job.OutputModelFolder);
            if (job.QuantizedModelId is { } quantized)
            {
                r.SetArtifact("quantizedModel", $"{StorageNames.Containers.Models}/{quantized}/");
            }
            r.LastError = note;
            return true;
        }, cancellationToken);
        await events.PublishAsync(RunEvents.Types.StageStarted, run, cancellationToken);
    }

    /// <summary>
    /// Checks the request (settings, prepared data, base model and its tokenizer) and writes the job's
    /// <c>spec.json</c> (once: the job id derives from its inputs). Nothing is submitted.
    /// </summary>
    public async Task<JobSpec> PlanAsync(FineTuneRequest request, string runId, CancellationToken cancellationToken)
    {
        var spec = FineTuneSpec.From(request.Spec?.FineTune);
        spec.Validate();
        var prepared = await ReadPreparedAsync(request.PreparedManifest, cancellationToken);
        if (prepared.RecordKind != RecordKinds.Text || prepared.Labels.Count < 2)
        {
            throw new FineTuneRejectedException(FineTuneErrorCodes.UnsupportedTask,
                $"The prepared dataset {prepared.PreparedId} holds {prepared.RecordKind} records with {prepared.Labels.Count} label(s); the built-in trainer fine-tunes sequence classification, which needs text with at least two labels.");
        }

        var baseModel = await BaseModelAsync(spec, prepared, cancellationToken);
        var bagOfEmbeddings = baseModel.Lineage.BaseModel?.StartsWith($"generated:{GeneratedModelSpec.BagOfEmbeddingsKind}", StringComparison.Ordinal) == true;
        var trainable = spec.Trainable ?? (bagOfEmbeddings ? FineTuneSpec.TrainHeadAndEmbeddings : FineTuneSpec.TrainHead);
        if (trainable == FineTuneSpec.TrainHeadAndEmbeddings && !bagOfEmbeddings)
        {
            throw new FineTuneRejectedException(FineTuneErrorCodes.InvalidHyperparameters, $"trainable '{trainable}' needs a generated bag-of-embeddings base; {baseModel.ModelId} is an encoder, so only its head can train (trainable 'head').");
        }

        var pooling = Pooling.TryParse(spec.Pooling) ?? baseModel.SentencePooling;
        if (trainable == FineTuneSpec.TrainHeadAndEmbeddings && pooling != Pooling.Default)
        {
            throw new FineTuneRejectedException(FineTuneErrorCodes.InvalidHyperparameters, $"trainable '{trainable}' trains the embedding table under mean pooling; pooling '{pooling}' needs trainable '{FineTuneSpec.TrainHead}'.");
        }

        var frozen = trainable == FineTuneSpec.TrainHead;
        var hyper = new Hyperparameters
        {
            // A head on frozen features: standardised inputs, many cheap epochs at a small rate, stronger decay (measured in bench/).
            Epochs = spec.Epochs ?? (frozen ? 60 : 12),
            LearningRate = spec.LearningRate ?? (frozen ? 0.0005 : 0.02),
            BatchSize = spec.BatchSize,
            WeightDecay = spec.WeightDecay ?? (frozen ? 0.05 : 0.0001),
            WarmupFraction = spec.WarmupFraction,
            Seed = spec.Seed,
            EarlyStoppingPatience = spec.EarlyStoppingPatience ?? (frozen ? 6 : 3),
            Trainable = trainable,
            ClassWeights = spec.ClassWeights,
            Pooling = pooling.ToString(),
        };
        var backend = spec.Backend ?? Options.Backend;
        var jobId = JobIdFor(prepared.PreparedId, baseModel.ModelId, baseModel.CreatedAt, hyper, backend, spec.OutputModelId, spec.MaxDurationMinutes, spec.Quantize);
        var outputModelId = spec.OutputModelId ?? "ft-" + jobId[4..20];
        var job = new JobSpec
        {
            JobId = jobId,
            RunId = runId,
            Task = ModelTasks.Classification,
            BaseModel = baseModel.ModelId,
            BaseModelFolder = $"{StorageNames.Containers.Models}/{baseModel.ModelId}/",
            PreparedManifest = request.PreparedManifest,
            DatasetId = prepared.DatasetId,
            PreparedId = prepared.PreparedId,
            Labels = prepared.Labels,
            Hyperparameters = hyper,
            OutputModelId = outputModelId,
            OutputModelFolder = $"{StorageNames.Containers.Models}/{outputModelId}/",
            QuantizedModelId = spec.Quantize ? outputModelId + Models.Quantization.ModelQuantizer.DefaultSuffix : null,
            Backend = backend,
            MaxDurationMinutes = spec.MaxDurationMinutes,
            HeartbeatSeconds = Options.HeartbeatSeconds,
            CreatedAt = DateTimeOffset.UtcNow,
        };
        var files = new JobFiles(storage, jobId);
        return await BlobJson.WriteOnceAsync(files.Spec, job, FineTuneJson.Default.JobSpec, cancellationToken)
            ? job
            : (await BlobJson.ReadAsync(files.Spec, FineTuneJson.Default.JobSpec, cancellationToken))!;
    }

    private async Task<PreparedManifest> ReadPreparedAsync(string path, CancellationToken cancellationToken)
    {
        var manifest = storage.BlobAt(path) is { } blob ? await BlobJson.ReadAsync(blob, PreprocessJson.Default.PreparedManifest, cancellationToken) : null;
        return manifest ?? throw new FineTuneRejectedException(FineTuneErrorCodes.PreparedDatasetNotFound,
            $"The prepared dataset {path} does not exist. Preprocess the dataset first (pipeline submit, or a preprocess command).");
    }

    /// <summary>The base model: a registered one whose tokenizer is the prepared data's, or the generated bag-of-embeddings over the data's encoding.</summary>
    private async Task<ModelManifest> BaseModelAsync(FineTuneSpec spec, PreparedManifest prepared, CancellationToken cancellationToken)
    {
        var models = storage.Container(StorageNames.Containers.Models);
        if (spec.BaseModel == FineTuneSpec.GeneratedBase)
        {
            if (prepared.Tokenizer.Kind != TokenizerKinds.Tiktoken)
            {
                throw new FineTuneRejectedException(FineTuneErrorCodes.TokenizerMismatch,
                    $"The generated base model reads a tiktoken encoding, but {prepared.PreparedId} was tokenized with {prepared.Tokenizer.Kind}. Preprocess with a tiktoken tokenizer, or name a baseModel whose tokenizer matches.");
            }

            var generated = new GeneratedModelSpec { Encoding = prepared.Tokenizer.Encoding ?? "cl100k_base", MaxSequenceLength = prepared.MaxSequenceLength };
            var id = $"base-boe-{generated.Encoding.Replace('_', '-')}-h{generated.Hidden}-s{generated.Seed}";
            return await BlobJson.ReadAsync(models.GetBlobClient($"{id}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, cancellationToken)
                ?? await registry.GenerateAsync(id, generated, cancellationToken);
        }

        var manifest = await BlobJson.ReadAsync(models.GetBlobClient($"{spec.BaseModel}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, cancellationToken)
            ?? throw new FineTuneRejectedException(FineTuneErrorCodes.BaseModelNotFound, $"The base model '{spec.BaseModel}' is not registered (models/{spec.BaseModel}/model.json). See `pipeline models`.");
        if (!EncoderHead.BaseOutputs.Contains(manifest.Output) && manifest.Output != ModelGenerator.Probabilities)
        {
            throw new FineTuneRejectedException(FineTuneErrorCodes.UnsupportedTask,
                $"The base model '{spec.BaseModel}' outputs {manifest.Output}; a base for fine-tuning outputs last_hidden_state or token_embeddings (an encoder), sentence_embedding, or logits (a classifier, whose head is replaced).");
        }

        var baseTokenizer = await TokenizerSource.LoadAsync(storage, manifest.Tokenizer, cancellationToken);
        if (baseTokenizer.Fingerprint != prepared.TokenizerFingerprint)
        {
            throw new FineTuneRejectedException(FineTuneErrorCodes.TokenizerMismatch,
                $"The base model '{spec.BaseModel}' reads tokens of {baseTokenizer.Fingerprint}, but {prepared.PreparedId} was tokenized with {prepared.TokenizerFingerprint}. Preprocess with the base model's tokenizer (preprocess.tokenizer.files = \"{manifest.Tokenizer.Files}\").");
        }

        return manifest;
    }

    private Task ScheduleAsync(string jobId, string runId, int tick, CancellationToken cancellationToken)
    {
        // Back off by doubling from the first delay to the maximum as the job runs on.
        var delay = TimeSpan.FromTicks(Math.Min(Options.MonitorMaxDelay.Ticks, Options.MonitorInitialDelay.Ticks * (1L << Math.Min(20, Math.Max(0, tick - 1)))));
        return sender.SendAsync(StorageNames.Queues.FineTuneMonitor, MessageTypes.FineTuneMonitor, runId, new FineTuneMonitorRequest(jobId, tick),
            FineTuneJson.Default.FineTuneMonitorRequest, delay, cancellationToken);
    }

    /// <summary>Handles a <c>finetune-monitor</c> message: one poll of a job, and the next one scheduled unless the job ended.</summary>
    public async Task MonitorAsync(FineTuneMonitorRequest request, int dequeueCount, CancellationToken cancellationToken)
    {
        var files = new JobFiles(storage, request.JobId);
        var job = await BlobJson.ReadAsync(files.Spec, FineTuneJson.Default.JobSpec, cancellationToken)
            ?? throw new InvalidMessageException($"The finetune-monitor message names job {request.JobId}, which has no spec.json.");
        using var scope = logger.BeginScope(new Dictionary<string, object> { ["RunId"] = job.RunId, ["JobId"] = job.JobId });

        // Take this tick: a duplicate or stale message (an older chain) finds it taken and stops. The redelivery
        // of a tick whose poll failed after taking it (dequeueCount > 1) polls again, so the chain never dies.
        var response = await files.Submission.DownloadContentAsync(cancellationToken);
        var submission = JsonSerializer.Deserialize(response.Value.Content.ToMemory().Span, FineTuneJson.Default.JobSubmission)!;
        var retryOfTakenTick = request.Tick == submission.Tick && dequeueCount > 1;
        if (submission.Outcome is not null || (request.Tick <= submission.Tick && !retryOfTakenTick))
        {
            return;
        }

        if (!retryOfTakenTick)
        {
            submission = submission with { Tick = request.Tick };
            try
            {
                await SaveAsync(files, submission, response.Value.Details.ETag, cancellationToken);
            }
            catch (RequestFailedException e) when (e.Status == 412)
            {
                return;
            }
        }

        var outcome = await PollAsync(job, files, submission, cancellationToken);
        if (outcome is null)
        {
            await ScheduleAsync(job.JobId, job.RunId, request.Tick + 1, cancellationToken);
        }
        else
        {
            await UpdateSubmissionAsync(files, s => s with { Outcome = outcome }, cancellationToken);
            await FinishWaitingRunsAsync(job, files, outcome, cancellationToken);
        }
    }

    /// <summary>Runs that asked for this job while it trained end with it: they get its model, or its failure.</summary>
    private async Task FinishWaitingRunsAsync(JobSpec job, JobFiles files, string outcome, CancellationToken cancellationToken)
    {
        var jobs = storage.Container(StorageNames.Containers.Jobs);
        await foreach (var blob in jobs.GetBlobsAsync(BlobTraits.None, BlobStates.None, files.WaitingPrefix, cancellationToken))
        {
            var runId = blob.Name[files.WaitingPrefix.Length..];
            if (outcome == JobStates.Succeeded)
            {
                var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken))!;
                await SucceededAsync(job with { RunId = runId }, status, TimeSpan.Zero, cancellationToken);
            }
            else
            {
                var reason = (await runs.GetAsync(job.RunId, cancellationToken))?.Error ?? outcome;
                var code = outcome switch { JobStates.Failed => FineTuneErrorCodes.TrainerFailed, JobStates.Cancelled => "Cancelled", _ => outcome };
                await transitions.FailAsync(runId, Stages.FineTune, code,
                    $"The fine-tune job {job.JobId}, shared with run {job.RunId}, ended {outcome}: {reason} Send the command again to train it anew.", TimeSpan.Zero, cancellationToken: cancellationToken);
            }

            await jobs.GetBlobClient(blob.Name).DeleteIfExistsAsync(cancellationToken: cancellationToken);
        }
    }

    private static Task SaveAsync(JobFiles files, JobSubmission submission, ETag etag, CancellationToken cancellationToken) =>
        files.Submission.UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(submission, FineTuneJson.Default.JobSubmission)),
            new BlobUploadOptions { Conditions = new BlobRequestConditions { IfMatch = etag } }, cancellationToken);

    /// <summary>The trainer's heartbeat on the run (epoch, step, progress, metrics); a progress event when the epoch moved since the last look.</summary>
    private async Task RecordProgressAsync(JobSpec job, RunRecord run, JobStatus status, CancellationToken cancellationToken)
    {
        var previous = run.GetCounts().GetValueOrDefault("fineTuneEpoch");
        var updated = await UpdateRunAsync(job, r =>
        {
            r.SetStage(Stages.FineTune, RunStatus.Running);
            r.SetCounts(new Dictionary<string, long>
            {
                ["fineTuneEpoch"] = status.Epoch,
                ["fineTuneEpochs"] = status.Epochs,
                ["fineTuneStep"] = status.Step,
                ["fineTuneProgressPercent"] = (long)Math.Round(100 * status.Progress),
                ["fineTuneAttempt"] = status.Attempt,
            });
            r.SetMetrics(status.Metrics);
        }, cancellationToken);
        if (status.Epoch != previous)
        {
            await events.PublishAsync(RunEvents.Types.FineTuneProgress, updated, cancellationToken);
        }
    }

    /// <summary>One look at the job; the outcome when it has ended (the run updated), or null while it goes on.</summary>
    private async Task<string?> PollAsync(JobSpec job, JobFiles files, JobSubmission submission, CancellationToken cancellationToken)
    {
        var run = await runs.GetAsync(job.RunId, cancellationToken);
        var backend = Backend(job.Backend);
        var status = await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, cancellationToken);
        var now = DateTimeOffset.UtcNow;
        var elapsed = now - submission.FirstSubmittedAt;

        if (run is null || run.Status == RunStatus.Cancelled)
        {
            await StopAsync(job, files, submission, backend, cancellationToken);
            return JobStates.Cancelled;
        }

        if (status is not null && status.Attempt == submission.Attempt)
        {
            switch (status.State)
            {
                case JobStates.Succeeded:
                    // A trainer faster than the polls ends before any poll saw it running: its epochs are still progress
                    // (once: a look after the stage has succeeded leaves the run as it is).
                    if (run.GetStages().GetValueOrDefault(Stages.FineTune) != RunStatus.Succeeded)
                    {
                        await RecordProgressAsync(job, run, status, cancellationToken);
                    }

                    return await SucceededAsync(job, status, elapsed, cancellationToken);
                case JobStates.Failed:
                    await FailAsync(job, FineTuneErrorCodes.TrainerFailed, $"The trainer failed: {status.Error}", elapsed, status, cancellationToken);
                    return JobStates.Failed;
                case JobStates.Cancelled:
                    await transitions.CancelAsync(job.RunId, "the trainer reported the job cancelled", cancellationToken);
                    return JobStates.Cancelled;
            }
        }

        if (submission.Handle is not null && elapsed > TimeSpan.FromMinutes(job.MaxDurationMinutes))
        {
            await StopAsync(job, files, submission, backend, cancellationToken);
            await FailAsync(job, FineTuneErrorCodes.TimedOut, $"The job ran longer than maxDurationMinutes ({job.MaxDurationMinutes:0.##} min) and was stopped at epoch {status?.Epoch ?? 0}. Raise fineTune.maxDurationMinutes or train fewer epochs.", elapsed, status, cancellationToken);
            return FineTuneErrorCodes.TimedOut;
        }

        if (submission.Handle is null)
        {
            // Waiting for capacity (local backend): try again.
            var handle = await backend.SubmitAsync(job, submission.Attempt, cancellationToken);
            if (handle is not null)
            {
                // The maximum duration counts from when the job got a trainer, not from the wait for one.
                await UpdateSubmissionAsync(files, s => s with { Handle = handle, SubmittedAt = now, FirstSubmittedAt = s.Attempt == 1 ? now : s.FirstSubmittedAt }, cancellationToken);
                await UpdateRunAsync(job, r => r.SetStage(Stages.FineTune, RunStatus.Running), cancellationToken);
            }

            return null;
        }

        var state = await backend.GetStateAsync(job, submission, cancellationToken);
        if (state.State == JobStates.Failed || (state.State == JobStates.Cancelled && status?.State != JobStates.Succeeded))
        {
            await FailAsync(job, FineTuneErrorCodes.TrainerFailed, $"The {job.Backend} backend reports the job {state.State}: {state.Message}", elapsed, status, cancellationToken);
            return JobStates.Failed;
        }

        // Before its first heartbeat a trainer may still be starting (a GPU node, an image pull): it gets StartTimeout,
        // unless the backend already says its process is gone.
        var beating = status is not null && status.Attempt == submission.Attempt;
        var silent = now - (beating ? status!.Time : submission.SubmittedAt);
        var limit = beating || state.State == LocalProcessBackend.Exited ? Options.HeartbeatTimeout : Options.StartTimeout;
        if (silent > limit && state.State != JobStates.Queued)
        {
            if (submission.Attempt >= Options.MaxAttempts)
            {
                await StopAsync(job, files, submission, backend, cancellationToken);
                await FailAsync(job, FineTuneErrorCodes.Lost, $"No heartbeat from the trainer for {silent.TotalSeconds:N0} s, after {submission.Attempt} submission(s); the job is given up. The backend said: {state.State} {state.Message}.", elapsed, status, cancellationToken);
                return FineTuneErrorCodes.Lost;
            }

            // Lost: submit again (a new attempt; the trainer restarts from the spec, deterministically).
            // The silent trainer is declared dead: its lease is broken so the new attempt starts at once.
            await backend.CancelAsync(job, submission, cancellationToken);
            await RunLease.BreakAsync(storage, job.JobId, JobTrainer.LeaseStage, cancellationToken);
            var attempt = submission.Attempt + 1;
            // The new attempt is recorded before its trainer starts, so the trainer reads its own attempt number.
            await UpdateSubmissionAsync(files, s => s with { Attempt = attempt, Handle = null, SubmittedAt = now }, cancellationToken);
            var handle = await backend.SubmitAsync(job, attempt, cancellationToken);
            await UpdateSubmissionAsync(files, s => s with { Handle = handle }, cancellationToken);
            var lost = await runs.UpdateAsync(job.RunId, r =>
            {
                r.Attempt = attempt;
                r.LastError = $"No heartbeat from the trainer for {silent.TotalSeconds:N0} s (attempt {submission.Attempt}); resubmitted as attempt {attempt}.";
                return true;
            }, cancellationToken);
            await events.PublishAsync(RunEvents.Types.StageRetrying, lost, cancellationToken);
            logger.LogWarning("Job {JobId} lost its trainer (no heartbeat for {Seconds} s); resubmitted as attempt {Attempt}", job.JobId, silent.TotalSeconds, attempt);
            return null;
        }

        if (status is not null && status.Attempt == submission.Attempt)
        {
            await RecordProgressAsync(job, run, status, cancellationToken);
        }

        return null;
    }

    private async Task StopAsync(JobSpec job, JobFiles files, JobSubmission submission, IFineTuneBackend backend, CancellationToken cancellationToken)
    {
        await files.Cancel.UploadAsync(new BinaryData("{\"reason\":\"stopped by the platform\"}"u8.ToArray()), overwrite: true, cancellationToken);
        try
        {
            await backend.CancelAsync(job, submission, cancellationToken);
        }
        catch (Exception e) when (e is HttpRequestException or InvalidOperationException)
        {
            logger.LogWarning(e, "Cancelling job {JobId} on {Backend} failed; the trainer stops at its next heartbeat (cancel.json)", job.JobId, job.Backend);
        }
    }

    private async Task UpdateSubmissionAsync(JobFiles files, Func<JobSubmission, JobSubmission> change, CancellationToken cancellationToken)
    {
        var response = await files.Submission.DownloadContentAsync(cancellationToken);
        var current = JsonSerializer.Deserialize(response.Value.Content.ToMemory().Span, FineTuneJson.Default.JobSubmission)!;
        await SaveAsync(files, change(current), response.Value.Details.ETag, cancellationToken);
    }

    private Task<RunRecord> UpdateRunAsync(JobSpec job, Action<RunRecord> change, CancellationToken cancellationToken) =>
        runs.UpdateAsync(job.RunId, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            change(r);
            return true;
        }, cancellationToken);

    private Task FailAsync(JobSpec job, string code, string message, TimeSpan elapsed, JobStatus? status, CancellationToken cancellationToken) =>
        transitions.FailAsync(job.RunId, Stages.FineTune, code, message, elapsed, r =>
        {
            if (status is not null)
            {
                r.SetMetrics(status.Metrics);
            }

            r.SetArtifact("jobStatus", $"{StorageNames.Containers.Jobs}/{job.JobId}/status.json");
        }, cancellationToken);

    /// <summary>The trainer says it finished: the model folder must load and fit its tokenizer before it is registered on the run.</summary>
    private async Task<string> SucceededAsync(JobSpec job, JobStatus status, TimeSpan elapsed, CancellationToken cancellationToken)
    {
        ModelRuntime model;
        try
        {
            model = await sessions.GetAsync(job.OutputModelId, cancellationToken);
        }
        catch (InferenceRejectedException e)
        {
            await FailAsync(job, FineTuneErrorCodes.InvalidModel, $"The trainer reported success but its model folder {job.OutputModelFolder} cannot be used: {e.Message}", elapsed, status, cancellationToken);
            return JobStates.Failed;
        }

        var runSpec = (await runs.GetAsync(job.RunId, cancellationToken))?.SpecJson is { } specJson ? JsonSerializer.Deserialize(specJson, PipelineJson.Default.RunSpec) : null;
        var infer = FineTuneSpec.From(runSpec?.FineTune).Infer;
        var metrics = model.Manifest.Lineage.Metrics ?? status.Metrics;
        // Cancelled while the job trained: the model stays registered, the run stays cancelled.
        var (_, changed) = await transitions.SucceedAsync(job.RunId, RunEvents.Types.StageSucceeded, r =>
        {
            r.SetStage(Stages.FineTune, RunStatus.Succeeded);
            r.SetMetrics(metrics);
            r.SetCounts(new Dictionary<string, long> { ["fineTuneEpoch"] = status.Epoch, ["fineTuneProgressPercent"] = 100 });
            r.SetArtifact("model", job.OutputModelFolder);
            if (job.QuantizedModelId is { } quantized)
            {
                r.SetArtifact("quantizedModel", $"{StorageNames.Containers.Models}/{quantized}/");
            }
            r.SetArtifact("metrics", $"{StorageNames.Containers.Jobs}/{job.JobId}/metrics.jsonl");
            r.SetTiming(Stages.FineTune, elapsed);
            r.LastError = null;
            RunTransitions.QueueNextOrEnd(r, infer is not null ? Stages.Inference : null);
        }, cancellationToken);
        if (!changed)
        {
            return JobStates.Succeeded;
        }

        if (infer is not null)
        {
            await sender.SendAsync(StorageNames.Queues.Inference, MessageTypes.Inference, job.RunId, infer with { ModelId = job.OutputModelId },
                InferenceJson.Default.InferenceRequest, cancellationToken: cancellationToken);
        }

        logger.LogInformation("Job {JobId} succeeded: model {ModelId} registered (validation accuracy {Accuracy})", job.JobId, job.OutputModelId, metrics.GetValueOrDefault("validationAccuracy"));
        return JobStates.Succeeded;
    }
}
