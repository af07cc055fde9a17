using System.Text;
using System.Text.Json;
using Azure;
using Google.Protobuf;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.Inference;
using Pipeline.Models;
using Pipeline.Models.Onnx.Proto;
using Pipeline.Models.Quantization;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.FineTuning.Trainer;

/// <summary>
/// The built-in trainer: honours the job contract (<c>jobs/&lt;jobId&gt;/</c>). It takes the job's lease (so
/// one trainer works on a job at a time), reads the spec, the prepared shards and the base model, writes
/// <c>status.json</c> heartbeats and <c>metrics.jsonl</c>, stops when <c>cancel.json</c> appears, and
/// finally writes the model folder (one merged <c>model.onnx</c>, tokenizer files, <c>model.json</c> last).
/// The status has one writer (<see cref="JobStatusWriter"/>), and metrics are uploaded off the training thread.
/// Cancelling <c>RunAsync</c>'s token (the trainer program does on SIGTERM and Ctrl+C) stops it at the next batch:
/// status <c>cancelled</c>, lease released.
/// </summary>
public sealed class JobTrainer(StorageClients storage, IOptions<InferenceSettings> inference, ILogger<JobTrainer> logger)
{
    public const string LeaseStage = "trainer";
    private static readonly TimeSpan LeaseWait = TimeSpan.FromSeconds(45);

    /// <summary>The status's error when the trainer was stopped from outside (SIGTERM: the container stopped, the host shut down).</summary>
    public const string StoppedError = "Stopped by a termination signal before the job ended (SIGTERM: the execution was stopped or its node shut down).";

    private JobStatusWriter _status = null!;

    /// <summary>Runs a job to its end; returns the process exit code (0 succeeded, cancelled or held by another trainer; 1 failed).</summary>
    public async Task<int> RunAsync(string jobId, CancellationToken cancellationToken)
    {
        var job = new JobFiles(storage, jobId);
        var spec = await BlobJson.ReadAsync(job.Spec, FineTuneJson.Default.JobSpec, cancellationToken);
        if (spec is null)
        {
            logger.LogError("jobs/{JobId}/spec.json does not exist", jobId);
            return 2;
        }

        var lease = await AcquireAsync(jobId, cancellationToken);
        if (lease is null)
        {
            logger.LogWarning("Another trainer holds job {JobId}; leaving it to that one", jobId);
            return 0;
        }

        await using (lease)
        {
            var attempt = (await BlobJson.ReadAsync(job.Submission, FineTuneJson.Default.JobSubmission, cancellationToken))?.Attempt ?? 1;
            using var cancel = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            using var stopHeartbeat = new CancellationTokenSource();
            _status = new JobStatusWriter(job.Status, new JobStatus { State = JobStates.Running, Attempt = attempt, Epochs = spec.Hyperparameters.Epochs, Worker = Worker, Time = DateTimeOffset.UtcNow });
            await _status.WriteAsync(CancellationToken.None);
            var heartbeat = HeartbeatAsync(job, spec, cancel, stopHeartbeat.Token);
            try
            {
                var metrics = await TrainAsync(job, spec, cancel.Token);
                await StopAsync(stopHeartbeat, heartbeat);
                await _status.WriteFinalAsync(s => s with { State = JobStates.Succeeded, Progress = 1, Metrics = metrics });
                logger.LogInformation("Job {JobId} finished: model {ModelId}, validation accuracy {Accuracy:P1}", jobId, spec.OutputModelId, metrics.GetValueOrDefault("validationAccuracy"));
                return 0;
            }
            catch (OperationCanceledException) when (cancel.IsCancellationRequested)
            {
                await StopAsync(stopHeartbeat, heartbeat);
                var stopped = cancellationToken.IsCancellationRequested;
                await _status.WriteFinalAsync(s => s with { State = JobStates.Cancelled, Error = stopped ? StoppedError : "Cancelled (jobs/<jobId>/cancel.json)." });
                logger.LogInformation("Job {JobId} was {How}", jobId, stopped ? "stopped by a termination signal" : "cancelled");
                return 0;
            }
            catch (Exception e)
            {
                await StopAsync(stopHeartbeat, heartbeat);
                await _status.WriteFinalAsync(s => s with { State = JobStates.Failed, Error = $"{e.GetType().Name}: {e.Message}" });
                logger.LogError(e, "Job {JobId} failed", jobId);
                return 1;
            }
        }
    }

    private static string Worker => $"{Environment.MachineName}/pid {Environment.ProcessId}";

    private async Task<RunLease?> AcquireAsync(string jobId, CancellationToken cancellationToken)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (true)
        {
            try
            {
                return await RunLease.AcquireAsync(storage, jobId, LeaseStage, cancellationToken);
            }
            catch (RunBusyException) when (clock.Elapsed < LeaseWait)
            {
                // A trainer that was killed keeps its lease until the lease expires (15 s).
                await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
            }
            catch (RunBusyException)
            {
                return null;
            }
        }
    }

    private static async Task StopAsync(CancellationTokenSource stop, Task heartbeat)
    {
        await stop.CancelAsync();
        await heartbeat;
    }

    /// <summary>Rewrites status.json every heartbeat interval, and stops the job when cancel.json appears.</summary>
    private async Task HeartbeatAsync(JobFiles job, JobSpec spec, CancellationTokenSource cancel, CancellationToken stop)
    {
        var interval = TimeSpan.FromSeconds(Math.Max(0.2, spec.HeartbeatSeconds));
        while (!stop.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(interval, stop);
                if (await job.Cancel.ExistsAsync(stop))
                {
                    await cancel.CancelAsync();
                }

                await _status.WriteAsync(stop);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            catch (RequestFailedException e)
            {
                logger.LogWarning(e, "Heartbeat of job {JobId} failed; trying again", spec.JobId);
            }
        }
    }

    private async Task<Dictionary<string, double>> TrainAsync(JobFiles job, JobSpec spec, CancellationToken cancellationToken)
    {
        var prepared = (storage.BlobAt(spec.PreparedManifest) is { } manifestBlob ? await BlobJson.ReadAsync(manifestBlob, PreprocessJson.Default.PreparedManifest, cancellationToken) : null)
            ?? throw new InvalidOperationException($"The prepared dataset {spec.PreparedManifest} does not exist.");
        var baseManifest = await BlobJson.ReadAsync(storage.Container(StorageNames.Containers.Models).GetBlobClient($"{spec.BaseModel}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, cancellationToken)
            ?? throw new InvalidOperationException($"The base model {spec.BaseModel} has no model.json.");
        var baseOnnx = (await storage.Container(StorageNames.Containers.Models).GetBlobClient($"{spec.BaseModel}/{baseManifest.OnnxPath}").DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
        var baseModel = ModelProto.Parser.ParseFrom(baseOnnx);

        var train = await ReadSplitAsync(prepared, "train", spec.Labels.Count, cancellationToken);
        var validation = await ReadSplitAsync(prepared, "validation", spec.Labels.Count, cancellationToken);
        if (train.Count == 0)
        {
            throw new InvalidOperationException($"The prepared dataset {spec.PreparedId} has no labelled training records.");
        }

        var table = baseModel.Graph.Initializer.FirstOrDefault(t => t.Name == ModelGenerator.EmbeddingTable && t.Dims.Count == 2);
        var bagOfEmbeddings = baseModel.MetadataProps.Any(p => p.Key == ModelGenerator.KindProperty && p.Value == GeneratedModelSpec.BagOfEmbeddingsKind) && table is not null
            && spec.Hyperparameters.Trainable == FineTuneSpec.TrainHeadAndEmbeddings;
        var pooling = Pooling.TryParse(spec.Hyperparameters.Pooling) ?? baseManifest.SentencePooling;
        int hidden;
        float[]? embeddings = null;
        FeatureSet? features = null;
        FeatureScaler? scaler = null;
        var rawValidation = validation;
        if (bagOfEmbeddings)
        {
            hidden = (int)table!.Dims[1];
            embeddings = [.. table.FloatData];
            if (embeddings.Length == 0)
            {
                embeddings = new float[table.RawData.Length / 4];
                Buffer.BlockCopy(table.RawData.ToByteArray(), 0, embeddings, 0, table.RawData.Length);
            }
        }
        else
        {
            // A frozen encoder: its pooled features are computed once (or read from the cache), then only the head
            // trains, on standardised features. With the inference settings (Pipeline:Inference): CUDA when configured.
            features = await new FrozenFeatures(storage, inference.Value).GetAsync(spec, baseManifest, baseModel, pooling, train.Tokens!, validation.Tokens!, cancellationToken);
            logger.LogInformation("Features of {Rows} examples {How} in {Seconds:F1} s ({Blob})", train.Count + validation.Count, features.CacheHit ? "read from the cache" : "computed", features.Seconds, features.Blob);
            scaler = FeatureScaler.Fit(features.Train);
            rawValidation = validation with { Features = features.Validation };
            train = train with { Features = scaler.Apply(features.Train) };
            validation = validation with { Features = scaler.Apply(features.Validation) };
            hidden = features.Hidden;
        }

        var trainer = new ClassifierTrainer(spec.Hyperparameters, spec.Labels.Count, hidden);
        var history = new StringBuilder();
        var metricsUpload = new LatestUpload(job.Metrics, logger);
        TrainedClassifier result;
        try
        {
            // Training is synchronous and CPU-bound: on its own thread, so the heartbeat and uploads keep their threads.
            result = await Task.Factory.StartNew(() => trainer.Train(train, validation, embeddings, p =>
            {
                _status.Update(s => s with { Epoch = p.Epoch, Step = p.Step, Steps = p.Steps, Progress = Math.Round((double)p.Step / Math.Max(1, p.Steps), 4) });
                if (p.Completed is { } epoch)
                {
                    _status.Update(s => s with
                    {
                        Metrics = new Dictionary<string, double>
                        {
                            ["trainLoss"] = epoch.TrainLoss,
                            ["validationLoss"] = epoch.ValidationLoss,
                            ["validationAccuracy"] = epoch.ValidationAccuracy,
                            ["validationMacroF1"] = epoch.ValidationMacroF1,
                        },
                    });
                    history.Append(JsonSerializer.Serialize(epoch, FineTuneJson.Default.EpochMetrics).ReplaceLineEndings("")).Append('\n');
                    // metrics.jsonl holds the whole history: the newest document supersedes any not yet uploaded.
                    metricsUpload.Offer(Encoding.UTF8.GetBytes(history.ToString()));
                }
            }, cancellationToken), cancellationToken, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }
        finally
        {
            await metricsUpload.CompleteAsync();
        }

        var best = result.Epochs.Single(e => e.Epoch == result.BestEpoch);
        var baseline = ClassifierTrainer.MajorityBaseline(validation.Labels, spec.Labels.Count);
        var metrics = new Dictionary<string, double>
        {
            ["validationAccuracy"] = best.ValidationAccuracy,
            ["validationMacroF1"] = best.ValidationMacroF1,
            ["validationLoss"] = best.ValidationLoss,
            ["trainLoss"] = best.TrainLoss,
            ["majorityBaselineAccuracy"] = Math.Round(baseline, 6),
            ["accuracyPointsOverBaseline"] = Math.Round(100 * (best.ValidationAccuracy - baseline), 2),
            ["bestEpoch"] = result.BestEpoch,
            ["epochsRun"] = result.Epochs.Count,
            ["trainExamples"] = train.Count,
            ["validationExamples"] = validation.Count,
            ["trainExamplesPerSecond"] = Math.Round(result.Epochs.Average(e => e.ExamplesPerSecond), 1),
        };

        ModelProto merged;
        if (features is not null)
        {
            metrics["featureCacheHit"] = features.CacheHit ? 1 : 0;
            metrics["featureSeconds"] = Math.Round(features.Seconds, 2);
            if (!features.CacheHit)
            {
                metrics["featureRowsPerSecond"] = Math.Round((train.Count + validation.Count) / Math.Max(1e-6, features.Seconds), 1);
            }

            var (weight, bias) = scaler!.Fold(result.Weight, result.Bias);
            merged = EncoderHead.Classifier(baseModel, pooling, weight, bias, spec.Labels.Count);
            metrics["mergedMaxProbabilityDifference"] = await CheckMergedAsync(merged, baseManifest, trainer, result, validation, rawValidation, cancellationToken);
        }
        else
        {
            merged = EncoderHead.Classifier(ModelGenerator.BagOfEmbeddings(result.Embeddings ?? embeddings!, (int)table!.Dims[0], hidden), Pooling.Default, result.Weight, result.Bias, spec.Labels.Count);
        }
        var files = await new ModelRegistry(storage).ReadTokenizerFilesAsync(baseManifest.Tokenizer, cancellationToken);
        var lineage = new ModelLineage
        {
            DatasetId = spec.DatasetId,
            PreparedId = spec.PreparedId,
            BaseModel = spec.BaseModel,
            Source = $"{StorageNames.Containers.Jobs}/{spec.JobId}/",
            Hyperparameters = JsonSerializer.SerializeToElement(spec.Hyperparameters, FineTuneJson.Default.Hyperparameters),
            Metrics = metrics,
        };
        var written = await new ModelRegistry(storage).WriteAsync(spec.OutputModelId, merged, baseManifest.Tokenizer, files, baseManifest.VocabularySize,
            ModelTasks.Classification, spec.Labels, prepared.MaxSequenceLength, lineage, cancellationToken);
        if (spec.QuantizedModelId is { } quantizedId)
        {
            // fineTune.quantize: the int8 copy, measured against the model just written on the same validation rows.
            var tokenizer = await TokenizerSource.LoadAsync(storage, written.Tokenizer, cancellationToken);
            var int8 = await new ModelQuantizer(storage, inference.Value).QuantizeAsync(written, merged.ToByteArray(), tokenizer, quantizedId,
                new LabelledRows(rawValidation.Tokens!, rawValidation.Labels), spec.PreparedManifest, null, cancellationToken);
            foreach (var (key, value) in int8.Lineage.Metrics!.Where(m => m.Key.StartsWith("int8", StringComparison.Ordinal)))
            {
                metrics[key] = value;
            }
        }

        return metrics;
    }

    /// <summary>Rows of validation the merged model is checked on before it is registered.</summary>
    public const int MergeCheckRows = 64;

    /// <summary>
    /// Runs the merged classifier in ONNX Runtime on a sample of validation rows and compares its probabilities
    /// with the trainer's (head on the standardised features): a model that loads but computes something else is
    /// never registered. Returns the largest difference.
    /// </summary>
    private async Task<double> CheckMergedAsync(ModelProto merged, ModelManifest baseManifest, ClassifierTrainer trainer, TrainedClassifier result, TrainingSet validation, TrainingSet raw, CancellationToken cancellationToken)
    {
        var sample = Enumerable.Range(0, Math.Min(MergeCheckRows, validation.Count)).ToList();
        if (sample.Count == 0)
        {
            return 0;
        }

        var tokenizer = await TokenizerSource.LoadAsync(storage, baseManifest.Tokenizer, cancellationToken);
        ModelRuntime runtime;
        try
        {
            runtime = ModelSessions.FromGraph(merged.ToByteArray(), baseManifest with { Task = ModelTasks.Classification, Output = ModelGenerator.Probabilities }, tokenizer, inference.Value);
        }
        catch (Microsoft.ML.OnnxRuntime.OnnxRuntimeException e)
        {
            throw new InvalidOperationException($"The merged classifier (base {baseManifest.ModelId} + head) does not load in ONNX Runtime: {e.Message}", e);
        }

        using (runtime)
        {
            var (rows, _) = await new BatchScorer(runtime, inference.Value, 2048, normalize: false).ScoreTokensAsync([.. sample.Select(i => raw.Tokens![i])], cancellationToken);
            double worst = 0;
            for (var s = 0; s < sample.Count; s++)
            {
                var expected = trainer.Probabilities(result.Weight, result.Bias, validation.Features![sample[s]]);
                var actual = rows[s].Values ?? throw new InvalidOperationException($"The merged classifier failed on validation row {sample[s]}: {rows[s].Error}");
                worst = Math.Max(worst, expected.Zip(actual, (e, a) => Math.Abs(e - a)).Max());
            }

            return worst > MergeTolerance
                ? throw new InvalidOperationException($"The merged classifier's probabilities differ from the trainer's by up to {worst:G3} on {sample.Count} validation rows (tolerance {MergeTolerance}); the model is not registered.")
                : Math.Round(worst, 8);
        }
    }

    /// <summary>Largest difference allowed between the trainer's and the merged model's probabilities (batching and float order differ).</summary>
    public const double MergeTolerance = 2e-3;

    /// <summary>A split's labelled records from its shards: <c>{"input_ids":[...],"label":k,...}</c> per line.</summary>
    public async Task<TrainingSet> ReadSplitAsync(PreparedManifest prepared, string split, int classes, CancellationToken cancellationToken)
    {
        var rows = await PreparedSplits.ReadAsync(storage, prepared, split, classes, cancellationToken);
        return new TrainingSet(rows.Tokens, null, rows.Labels);
    }
}

/// <summary>The blobs of one job: <c>jobs/&lt;jobId&gt;/{spec,status,submission,cancel}.json</c> and <c>metrics.jsonl</c>.</summary>
public sealed class JobFiles(StorageClients storage, string jobId)
{
    private Azure.Storage.Blobs.BlobClient Blob(string name) => storage.Container(StorageNames.Containers.Jobs).GetBlobClient($"{jobId}/{name}");

    public string JobId => jobId;
    public Azure.Storage.Blobs.BlobClient Spec => Blob("spec.json");
    public Azure.Storage.Blobs.BlobClient Status => Blob("status.json");
    public Azure.Storage.Blobs.BlobClient Submission => Blob("submission.json");
    public Azure.Storage.Blobs.BlobClient Cancel => Blob("cancel.json");
    public Azure.Storage.Blobs.BlobClient Metrics => Blob("metrics.jsonl");
    public string SpecPath => $"{StorageNames.Containers.Jobs}/{jobId}/spec.json";

    /// <summary><c>waiting/&lt;runId&gt;</c>: another run that asked for this job while it trained; the monitor finishes it too.</summary>
    public Azure.Storage.Blobs.BlobClient Waiting(string runId) => Blob($"waiting/{runId}");
    public string WaitingPrefix => $"{jobId}/waiting/";
}

/// <summary>
/// The only writer of <c>status.json</c>: the training thread and the heartbeat update the status under one lock,
/// writes are serialized (a heartbeat never lands after the final state), and nothing is written after the final one.
/// </summary>
public sealed class JobStatusWriter(Azure.Storage.Blobs.BlobClient blob, JobStatus initial)
{
    private readonly Lock _lock = new();
    private readonly SemaphoreSlim _write = new(1, 1);
    private JobStatus _status = initial;
    private bool _final;

    public JobStatus Current
    {
        get
        {
            lock (_lock)
            {
                return _status;
            }
        }
    }

    public void Update(Func<JobStatus, JobStatus> change)
    {
        lock (_lock)
        {
            _status = change(_status);
        }
    }

    /// <summary>Writes the current status with the time now (a heartbeat); nothing once the final status is written.</summary>
    public Task WriteAsync(CancellationToken cancellationToken) => WriteAsync(null, final: false, cancellationToken);

    /// <summary>Writes the end state; later heartbeats write nothing.</summary>
    public Task WriteFinalAsync(Func<JobStatus, JobStatus> change) => WriteAsync(change, final: true, CancellationToken.None);

    private async Task WriteAsync(Func<JobStatus, JobStatus>? change, bool final, CancellationToken cancellationToken)
    {
        await _write.WaitAsync(cancellationToken);
        try
        {
            if (_final)
            {
                return;
            }

            JobStatus snapshot;
            lock (_lock)
            {
                _status = (change?.Invoke(_status) ?? _status) with { Time = DateTimeOffset.UtcNow };
                snapshot = _status;
                _final = final;
            }

            await BlobJson.WriteAsync(blob, snapshot, FineTuneJson.Default.JobStatus, cancellationToken);
        }
        finally
        {
            _write.Release();
        }
    }
}

/// <summary>
/// Uploads a document that each version supersedes (metrics.jsonl) off the caller's thread: a bounded channel of
/// one, newest wins; <see cref="CompleteAsync"/> waits for the last one. A failed upload is logged and retried with
/// the next version; the last version's failure surfaces from <see cref="CompleteAsync"/>.
/// </summary>
public sealed class LatestUpload
{
    private readonly System.Threading.Channels.Channel<byte[]> _pending = System.Threading.Channels.Channel.CreateBounded<byte[]>(
        new System.Threading.Channels.BoundedChannelOptions(1) { FullMode = System.Threading.Channels.BoundedChannelFullMode.DropOldest, SingleReader = true });
    private readonly Task _uploader;

    public LatestUpload(Azure.Storage.Blobs.BlobClient blob, ILogger logger)
    {
        _uploader = Task.Run(async () =>
        {
            // A failed upload never fails the job: metrics.jsonl is a progress view, the job's result is the model
            // and status.json. The next version replaces a failed one; a failure of the last one is only logged.
            await foreach (var content in _pending.Reader.ReadAllAsync())
            {
                try
                {
                    await blob.UploadAsync(new BinaryData(content), overwrite: true);
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    logger.LogWarning(e, "Uploading {Blob} failed; the next version replaces it", blob.Name);
                }
            }
        });
    }

    /// <summary>Never blocks: the version waiting to be uploaded, if any, is replaced.</summary>
    public void Offer(byte[] content) => _pending.Writer.TryWrite(content);

    public Task CompleteAsync()
    {
        _pending.Writer.TryComplete();
        return _uploader;
    }
}
