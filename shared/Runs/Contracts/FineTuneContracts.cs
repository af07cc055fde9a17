using System.Text.Json;
using System.Text.Json.Serialization;
using Pipeline.Inference;
using Pipeline.Preprocessing;
using Pipeline.Runs;

namespace Pipeline.FineTuning;

/// <summary>
/// The run spec's <c>fineTune</c> section (strict: unknown fields are refused). Every field has a
/// documented default; <see cref="Validate"/> refuses values that cannot train before any job is submitted.
/// </summary>
public sealed record FineTuneSpec
{
    /// <summary>A registered model id, or <c>generated:bag-of-embeddings</c> (default): a seeded base over the prepared data's tiktoken encoding.</summary>
    public string BaseModel { get; set; } = GeneratedBase;
    /// <summary>Default 12 when the embeddings train too; 60 for a head on a frozen encoder (cheap epochs; early stopping ends them).</summary>
    public int? Epochs { get; set; }
    /// <summary>Default 0.02 when the embeddings train too; 0.0005 for a head on a frozen encoder (on standardised features).</summary>
    public double? LearningRate { get; set; }
    public int BatchSize { get; set; } = 32;
    /// <summary>Default 0.0001 when the embeddings train too; 0.05 for a head on a frozen encoder.</summary>
    public double? WeightDecay { get; set; }
    /// <summary>Fraction of the steps over which the learning rate warms up linearly (then decays linearly to 0).</summary>
    public double WarmupFraction { get; set; } = 0.05;
    public int Seed { get; set; } = 42;
    /// <summary>Epochs without a better validation loss before training stops (0: never stop early). Default 3; 6 for a head on a frozen encoder.</summary>
    public int? EarlyStoppingPatience { get; set; }
    /// <summary><c>head</c> (the encoder is frozen) or <c>head+embeddings</c> (bag-of-embeddings bases only; default for them).</summary>
    public string? Trainable { get; set; }
    /// <summary>Weight each class's loss by inverse frequency (default true).</summary>
    public bool ClassWeights { get; set; } = true;
    /// <summary>
    /// How the encoder's token vectors become the head's features: <c>mean</c>, <c>cls</c> or <c>max</c>, optionally
    /// <c>+normalize</c> (L2). Default: the base model's (model.json; from its sentence-transformers files when it has them).
    /// </summary>
    public string? Pooling { get; set; }
    /// <summary>Where the job runs: <c>local</c>, <c>azureml</c> or <c>containerapps</c>; default: the app's <c>Pipeline:FineTune:Backend</c> (local).</summary>
    public string? Backend { get; set; }
    /// <summary>The job is stopped and the run failed after this long (default 120 minutes).</summary>
    public double MaxDurationMinutes { get; set; } = 120;
    /// <summary>The new model's id (default: <c>ft-</c> + the job id's hash).</summary>
    public string? OutputModelId { get; set; }
    /// <summary>Also write a dynamic int8 copy, <c>&lt;outputModelId&gt;-int8</c>, measured against the model on the validation split (default false).</summary>
    public bool Quantize { get; set; }
    /// <summary>After the model is registered, score this input with it (a batch inference stage in the same run).</summary>
    public InferenceRequest? Infer { get; set; }

    public const string GeneratedBase = "generated:bag-of-embeddings";
    public const string TrainHead = "head";
    public const string TrainHeadAndEmbeddings = "head+embeddings";

    public static FineTuneSpec From(JsonElement? section)
    {
        if (section is not { ValueKind: JsonValueKind.Object } element)
        {
            return new FineTuneSpec();
        }

        try
        {
            return element.Deserialize(FineTuneJson.Strict.FineTuneSpec) ?? new FineTuneSpec();
        }
        catch (JsonException e)
        {
            throw new FineTuneRejectedException(FineTuneErrorCodes.InvalidHyperparameters, $"The fineTune section is not valid: {e.Message}");
        }
    }

    /// <summary>Every problem at once, so one fix-and-resubmit is enough.</summary>
    public void Validate()
    {
        var problems = new List<string>();
        void Check(bool ok, string problem)
        {
            if (!ok)
            {
                problems.Add(problem);
            }
        }

        Check(Epochs is null or (>= 1 and <= 1000), $"epochs is {Epochs}; use 1 to 1000");
        Check(LearningRate is null or (> 0 and <= 10), $"learningRate is {LearningRate}; use a value in (0, 10]");
        Check(BatchSize is >= 1 and <= 65536, $"batchSize is {BatchSize}; use 1 to 65536");
        Check(WeightDecay is null or (>= 0 and < 1), $"weightDecay is {WeightDecay}; use 0 to 1");
        Check(WarmupFraction is >= 0 and < 1, $"warmupFraction is {WarmupFraction}; use 0 to 1");
        Check(EarlyStoppingPatience is null or >= 0, $"earlyStoppingPatience is {EarlyStoppingPatience}; use 0 (off) or more");
        Check(Trainable is null or TrainHead or TrainHeadAndEmbeddings, $"trainable is '{Trainable}'; use '{TrainHead}' or '{TrainHeadAndEmbeddings}'");
        Check(Pooling is null || Models.Pooling.TryParse(Pooling) is not null, $"pooling is '{Pooling}'; {Models.Pooling.Describe}");
        Check(Backend is null || FineTuneBackends.All.Contains(Backend), $"backend is '{Backend}'; use one of {string.Join(", ", FineTuneBackends.All)}");
        Check(MaxDurationMinutes > 0, $"maxDurationMinutes is {MaxDurationMinutes}; use a positive number");
        Check(OutputModelId is null || (OutputModelId.Length is > 0 and <= 64 && OutputModelId.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_')),
            $"outputModelId '{OutputModelId}' must be 1-64 letters, digits, '-' or '_'");
        Check(Infer is null || !string.IsNullOrWhiteSpace(Infer.Input), "infer.input must name the blob to score (container/path)");
        if (problems.Count > 0)
        {
            throw new FineTuneRejectedException(FineTuneErrorCodes.InvalidHyperparameters, $"The fine-tune settings cannot train: {string.Join("; ", problems)}.");
        }
    }
}

public static class FineTuneBackends
{
    public const string Local = "local";
    public const string AzureMl = "azureml";
    public const string ContainerApps = "containerapps";
    public static readonly string[] All = [Local, AzureMl, ContainerApps];
}

/// <summary>Body of the <c>finetune</c> command: fine-tune on a prepared dataset (the newest one of the dataset when no prepared id is named).</summary>
public sealed record FineTuneCommand(string DatasetId, string? PreparedId = null, JsonElement? FineTune = null);

/// <summary>Body of a <c>finetune-monitor</c> message: one poll of a job. <see cref="Tick"/> keeps a single chain of polls alive.</summary>
public sealed record FineTuneMonitorRequest(string JobId, int Tick);

/// <summary>
/// <c>jobs/&lt;jobId&gt;/spec.json</c>: everything a trainer needs, in any language. See the README's job contract.
/// </summary>
public sealed record JobSpec
{
    public int SchemaVersion { get; set; } = 1;
    public required string JobId { get; init; }
    public required string RunId { get; init; }
    /// <summary>Only <c>classification</c> for now.</summary>
    public required string Task { get; init; }
    /// <summary>The base model's id and folder (<c>models/&lt;id&gt;/</c>, with model.json, model.onnx and tokenizer files).</summary>
    public required string BaseModel { get; init; }
    public required string BaseModelFolder { get; init; }
    /// <summary>The prepared dataset's manifest (<c>datasets/.../manifest.json</c>): shards, labels, tokenizer.</summary>
    public required string PreparedManifest { get; init; }
    public required string DatasetId { get; init; }
    public required string PreparedId { get; init; }
    public required List<string> Labels { get; init; }
    public required Hyperparameters Hyperparameters { get; init; }
    /// <summary>Where the trainer writes the model folder (<c>models/&lt;modelId&gt;/</c>), model.json last.</summary>
    public required string OutputModelId { get; init; }
    public required string OutputModelFolder { get; init; }
    /// <summary>When set, the trainer also writes a dynamic int8 copy of the model under this id (<c>fineTune.quantize</c>).</summary>
    public string? QuantizedModelId { get; init; }
    public required string Backend { get; init; }
    /// <summary>The job is stopped (and the run failed) after this long.</summary>
    public required double MaxDurationMinutes { get; init; }
    /// <summary>The trainer writes a heartbeat to status.json at least this often.</summary>
    public required double HeartbeatSeconds { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
}

public sealed record Hyperparameters
{
    public required int Epochs { get; init; }
    public required double LearningRate { get; init; }
    public required int BatchSize { get; init; }
    public required double WeightDecay { get; init; }
    public required double WarmupFraction { get; init; }
    public required int Seed { get; init; }
    public required int EarlyStoppingPatience { get; init; }
    public required string Trainable { get; init; }
    public required bool ClassWeights { get; init; }
    /// <summary>The features' pooling (<c>mean+normalize</c>...); absent in specs written before it existed: the base model's.</summary>
    public string? Pooling { get; init; }
}

public static class JobStates
{
    public const string Queued = "queued";
    public const string Running = "running";
    public const string Succeeded = "succeeded";
    public const string Failed = "failed";
    public const string Cancelled = "cancelled";
    public static bool IsFinal(string state) => state is Succeeded or Failed or Cancelled;
}

/// <summary><c>jobs/&lt;jobId&gt;/status.json</c>: the trainer's heartbeat (rewritten every few seconds and at every transition).</summary>
public sealed record JobStatus
{
    public required string State { get; init; }
    public int Attempt { get; init; }
    public int Epoch { get; init; }
    public int Epochs { get; init; }
    public long Step { get; init; }
    public long Steps { get; init; }
    public double Progress { get; init; }
    public Dictionary<string, double> Metrics { get; init; } = [];
    public string? Error { get; init; }
    /// <summary>Set by the trainer that holds the job (process id, host), for people and for the local backend.</summary>
    public string? Worker { get; init; }
    public required DateTimeOffset Time { get; init; }
}

/// <summary>One line of <c>jobs/&lt;jobId&gt;/metrics.jsonl</c>: one epoch.</summary>
public sealed record EpochMetrics
{
    public required int Epoch { get; init; }
    public required double TrainLoss { get; init; }
    public required double ValidationLoss { get; init; }
    public required double ValidationAccuracy { get; init; }
    public required double ValidationMacroF1 { get; init; }
    public required double ExamplesPerSecond { get; init; }
    public required DateTimeOffset Time { get; init; }
}

/// <summary><c>jobs/&lt;jobId&gt;/submission.json</c>: what the dispatcher submitted, to which backend, how often.</summary>
public sealed record JobSubmission
{
    public required string JobId { get; init; }
    public required string Backend { get; init; }
    public required int Attempt { get; init; }
    /// <summary>The backend's handle: a process id (local), the job name (Azure ML), the execution name (Container Apps).</summary>
    public string? Handle { get; init; }
    public required DateTimeOffset FirstSubmittedAt { get; init; }
    public required DateTimeOffset SubmittedAt { get; init; }
    /// <summary>The last monitor tick that was processed (one chain of polls per job).</summary>
    public int Tick { get; init; }
    /// <summary>Set once the job has ended and its outcome is on the run.</summary>
    public string? Outcome { get; init; }
    /// <summary>
    /// The run this attempt trains for: the run whose dispatch claimed it (the submission is written, under an ETag
    /// condition, before anything is submitted, so of runs asking at once one submits and the others wait on it).
    /// Absent in submissions written before it existed: the spec's run.
    /// </summary>
    public string? RunId { get; init; }
}

public static class FineTuneErrorCodes
{
    public const string InvalidHyperparameters = "InvalidHyperparameters";
    public const string PreparedDatasetNotFound = "PreparedDatasetNotFound";
    public const string BaseModelNotFound = "BaseModelNotFound";
    public const string TokenizerMismatch = "TokenizerMismatch";
    public const string UnsupportedTask = "UnsupportedTask";
    public const string TrainerFailed = "TrainerFailed";
    public const string TimedOut = "TimedOut";
    public const string Lost = "Lost";
    public const string InvalidModel = "InvalidModel";
    public const string BackendRejected = "BackendRejected";
}

/// <summary>A fine-tune that can never succeed as asked: the run fails with <see cref="Code"/> and the message.</summary>
public sealed class FineTuneRejectedException(string code, string message) : StageRejectedException(code, message);

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(FineTuneSpec))]
[JsonSerializable(typeof(FineTuneCommand))]
[JsonSerializable(typeof(FineTuneMonitorRequest))]
[JsonSerializable(typeof(JobSpec))]
[JsonSerializable(typeof(JobStatus))]
[JsonSerializable(typeof(EpochMetrics))]
[JsonSerializable(typeof(JobSubmission))]
[JsonSerializable(typeof(FineTuneRequest))]
public sealed partial class FineTuneJson : JsonSerializerContext
{
    /// <summary>Refuses unknown fields (a misspelt hyperparameter must not be silently ignored).</summary>
    public static FineTuneJson Strict { get; } = new(new JsonSerializerOptions(JsonSerializerDefaults.Web)
    {
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    });
}
