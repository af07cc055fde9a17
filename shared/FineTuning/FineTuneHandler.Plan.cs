using Pipeline.FineTuning.Trainer;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.FineTuning;

/// <summary>Fine-tune planning: the request checked against its prepared data and base model, and the job written.</summary>
public sealed partial class FineTuneHandler
{
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

}
