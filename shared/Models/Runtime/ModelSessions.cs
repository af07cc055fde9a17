using System.Collections.Concurrent;
using System.Text.Json;
using Azure;
using Google.Protobuf;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Microsoft.ML.OnnxRuntime;
using Pipeline.Models;
using Pipeline.Preprocessing;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>Configuration section <c>Pipeline:Inference</c> (environment: <c>Pipeline__Inference__*</c>).</summary>
public sealed record InferenceSettings
{
    public const string Section = "Pipeline:Inference";
    public const string Cpu = "cpu";
    public const string Cuda = "cuda";

    /// <summary><c>cpu</c> (default) or <c>cuda</c>; CUDA falls back to CPU when it is not available, and the manifest says so.</summary>
    public string ExecutionProvider { get; set; } = Cpu;
    public int CudaDeviceId { get; set; }
    /// <summary>Threads per model call. Default: every core (one call runs at a time per model and process).</summary>
    public int IntraOpThreads { get; set; }
    /// <summary>Upper bound of a dynamic batch in token slots, padding included. Default 1,024.</summary>
    public int MaxTokensPerBatch { get; set; } = 1024;
    /// <summary>Upper bound of a dynamic batch in rows. Default 32.</summary>
    public int MaxBatchRows { get; set; } = 32;
    /// <summary>A batch stops growing before its padding passes this fraction of its token slots. Default 0.1.</summary>
    public double MaxPaddingFraction { get; set; } = 0.1;
    /// <summary>Rows tokenized and length-sorted together while the previous chunk runs. Default 2,048.</summary>
    public int ChunkRows { get; set; } = 2048;
    /// <summary>Loaded models kept per process; past it the least recently used leaves. Default 4.</summary>
    public int MaxCachedModels { get; set; } = 4;
    /// <summary>Total ONNX size of the loaded models kept per process, in MB; past it the least recently used leave. Default 2,048.</summary>
    public int MaxCachedModelMegabytes { get; set; } = 2048;
    /// <summary>A loaded model unused this long leaves the cache. Default 30 minutes.</summary>
    public TimeSpan ModelIdleTimeout { get; set; } = TimeSpan.FromMinutes(30);
    /// <summary>The longest inference input row (a line, or a CSV record across lines), in UTF-8 bytes; a longer one fails alone (record_too_large). Default 1 MiB.</summary>
    public int MaxRowBytes { get; set; } = 1 << 20;
}

/// <summary>
/// A loaded model: its manifest, one ONNX Runtime session, a pool of tokenizers, and a gate so that one
/// call at a time uses all cores (concurrent calls on few cores only slow each other down).
/// </summary>
public sealed class ModelRuntime : IDisposable
{
    private readonly ConcurrentBag<TextTokenizer> _tokenizers = [];
    private readonly TokenizerSource _tokenizerSource;

    internal ModelRuntime(ModelManifest manifest, InferenceSession session, TokenizerSource tokenizer, string executionProvider)
    {
        Manifest = manifest;
        Session = session;
        _tokenizerSource = tokenizer;
        ExecutionProvider = executionProvider;
        Padding = tokenizer.Probe.Padding;
    }

    public ModelManifest Manifest { get; }
    public InferenceSession Session { get; }
    /// <summary>The ONNX file's size: what the session cache counts against its budget.</summary>
    public long ModelBytes { get; init; }
    /// <summary>When a stage last asked for this model (for the cache's least-recently-used and idle eviction).</summary>
    public DateTimeOffset LastUsed { get; internal set; } = DateTimeOffset.UtcNow;
    /// <summary>The provider the session runs on: <c>CPUExecutionProvider</c> or <c>CUDAExecutionProvider</c> (with the fallback reason, if any).</summary>
    public string ExecutionProvider { get; }
    public int Padding { get; }
    public SemaphoreSlim Gate { get; } = new(1, 1);
    public RunOptions RunOptions { get; } = new();

    public TextTokenizer RentTokenizer() => _tokenizers.TryTake(out var tokenizer) ? tokenizer : _tokenizerSource.Create();

    public void ReturnTokenizer(TextTokenizer tokenizer) => _tokenizers.Add(tokenizer);

    public void Dispose()
    {
        Session.Dispose();
        RunOptions.Dispose();
        Gate.Dispose();
    }
}

/// <summary>
/// One cached <see cref="ModelRuntime"/> per model and process, built on first use. The cache is bounded: by
/// count (<see cref="InferenceSettings.MaxCachedModels"/>), by ONNX size (<see cref="InferenceSettings.MaxCachedModelMegabytes"/>)
/// and by idleness (<see cref="InferenceSettings.ModelIdleTimeout"/>); a model that leaves is retired as a replaced
/// version is (calls already holding it finish), and loaded again when asked for.
/// </summary>
public sealed class ModelSessions(StorageClients storage, IOptions<InferenceSettings> settings, ILogger<ModelSessions> logger) : IDisposable
{
    private readonly ConcurrentDictionary<string, Lazy<Task<ModelRuntime>>> _models = new();

    public InferenceSettings Settings => settings.Value;

    /// <exception cref="InferenceRejectedException">The model does not exist, cannot be loaded, or its tokenizer does not fit it.</exception>
    public async Task<ModelRuntime> GetAsync(string modelId, CancellationToken cancellationToken)
    {
        // Keyed by model.json's version: a model registered again under the same id is loaded afresh.
        ETag version;
        try
        {
            version = (await storage.Container(StorageNames.Containers.Models).GetBlobClient($"{modelId}/{ModelManifest.FileName}").GetPropertiesAsync(cancellationToken: cancellationToken)).Value.ETag;
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            throw NotFound(modelId);
        }

        var key = $"{modelId}@{version}";
        var lazy = _models.GetOrAdd(key, _ => new Lazy<Task<ModelRuntime>>(() => LoadAsync(modelId, CancellationToken.None)));
        try
        {
            var runtime = await lazy.Value.WaitAsync(cancellationToken);
            runtime.LastUsed = DateTimeOffset.UtcNow;
            Evict(key);
            foreach (var stale in _models.Keys.Where(k => k.StartsWith(modelId + "@", StringComparison.Ordinal) && k != key))
            {
                // Sessions of an older version leave the cache; shards still scoring on them finish, then they are disposed.
                if (_models.TryRemove(stale, out var old) && old.IsValueCreated)
                {
                    _ = RetireAsync(old.Value);
                }
            }

            return runtime;
        }
        catch (Exception) when (lazy.Value.IsFaulted)
        {
            // Do not cache a failure: the model may be uploaded or fixed later.
            _models.TryRemove(new KeyValuePair<string, Lazy<Task<ModelRuntime>>>(key, lazy));
            throw;
        }
    }

    /// <summary>Number of models loaded and kept now (what the bounds apply to).</summary>
    public int Count => _models.Count;

    /// <summary>Whether the model's current load is cached (loaded and kept) in this process.</summary>
    public bool IsCached(string modelId) => _models.Keys.Any(k => k.StartsWith(modelId + "@", StringComparison.Ordinal));

    /// <summary>Retires idle models, then the least recently used until the count and size bounds hold; never <paramref name="keep"/>.</summary>
    private void Evict(string keep)
    {
        var limits = settings.Value;
        var loaded = _models.Where(m => m.Key != keep && m.Value.IsValueCreated && m.Value.Value.IsCompletedSuccessfully)
            .Select(m => (m.Key, Runtime: m.Value.Value.Result)).OrderBy(m => m.Runtime.LastUsed).ToList();
        var now = DateTimeOffset.UtcNow;
        var count = _models.Count;
        var bytes = _models.Values.Where(m => m.IsValueCreated && m.Value.IsCompletedSuccessfully).Sum(m => m.Value.Result.ModelBytes);
        foreach (var (key, runtime) in loaded)
        {
            var idle = now - runtime.LastUsed >= limits.ModelIdleTimeout;
            var over = count > Math.Max(1, limits.MaxCachedModels) || bytes > (long)limits.MaxCachedModelMegabytes * 1024 * 1024;
            if ((idle || over) && _models.TryRemove(key, out var removed))
            {
                logger.LogInformation("Model {Key} leaves the session cache ({Why})", key, idle ? $"unused for {limits.ModelIdleTimeout}" : "the cache is full");
                count--;
                bytes -= runtime.ModelBytes;
                _ = RetireAsync(removed.Value);
            }
        }
    }

    /// <summary>Frees a replaced session's native memory once the shards that took it have had time to finish.</summary>
    private static async Task RetireAsync(Task<ModelRuntime> loading)
    {
        try
        {
            var runtime = await loading;
            await Task.Delay(RetireAfter);
            await runtime.Gate.WaitAsync();
            try
            {
                // A call arriving later fails (ObjectDisposedException) and its shard is retried on the new session.
                runtime.Session.Dispose();
                runtime.RunOptions.Dispose();
            }
            finally
            {
                runtime.Gate.Release();
            }
        }
        catch (Exception e) when (e is OnnxRuntimeException or InferenceRejectedException or ObjectDisposedException)
        {
        }
    }

    /// <summary>How long a replaced session stays alive for the calls already holding it.</summary>
    public static readonly TimeSpan RetireAfter = TimeSpan.FromMinutes(10);

    private static InferenceRejectedException NotFound(string modelId) => new(InferenceErrorCodes.ModelNotFound,
        $"Model '{modelId}' is not registered: models/{modelId}/model.json does not exist. List models with `pipeline models`, or register a folder with `pipeline models register`.");

    /// <summary>The session options for the configured execution provider, and that provider's name.</summary>
    public static (SessionOptions Options, string Provider) CreateOptions(InferenceSettings settings)
    {
        SessionOptions options;
        string provider;
        if (settings.ExecutionProvider.Equals(InferenceSettings.Cuda, StringComparison.OrdinalIgnoreCase))
        {
            try
            {
                options = SessionOptions.MakeSessionOptionWithCudaProvider(settings.CudaDeviceId);
                provider = "CUDAExecutionProvider";
            }
            catch (Exception e) when (e is OnnxRuntimeException or DllNotFoundException or EntryPointNotFoundException)
            {
                options = new SessionOptions();
                provider = $"CPUExecutionProvider (CUDA unavailable: {e.Message.Split('\n')[0]})";
            }
        }
        else
        {
            options = new SessionOptions();
            provider = "CPUExecutionProvider";
        }

        options.GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL;
        options.ExecutionMode = ExecutionMode.ORT_SEQUENTIAL;
        options.IntraOpNumThreads = settings.IntraOpThreads > 0 ? settings.IntraOpThreads : Environment.ProcessorCount;
        options.InterOpNumThreads = 1;
        return (options, provider);
    }

    /// <summary>
    /// A runtime for a graph held in memory (the trainer's feature extractor and its merged classifier), with the
    /// tokenizer of the model it derives from; <paramref name="manifest"/>'s inputs are replaced by the graph's.
    /// </summary>
    public static ModelRuntime FromGraph(byte[] onnx, ModelManifest manifest, TokenizerSource tokenizer, InferenceSettings settings)
    {
        var (options, provider) = CreateOptions(settings);
        try
        {
            var session = new InferenceSession(onnx, options);
            return new ModelRuntime(manifest with { Inputs = [.. session.InputMetadata.Keys] }, session, tokenizer, provider);
        }
        finally
        {
            options.Dispose();
        }
    }

    private async Task<ModelRuntime> LoadAsync(string modelId, CancellationToken cancellationToken)
    {
        var models = storage.Container(StorageNames.Containers.Models);
        ModelManifest manifest;
        try
        {
            manifest = await BlobJson.ReadAsync(models.GetBlobClient($"{modelId}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, cancellationToken)
                ?? throw NotFound(modelId);
        }
        catch (JsonException e)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.ModelCorrupt, $"Model '{modelId}': models/{modelId}/model.json is not valid ({e.Message}). Register the folder again.");
        }
        var folder = manifest.Tokenizer.Files?.TrimEnd('/') is { Length: > 0 } files && files.StartsWith($"{StorageNames.Containers.Models}/", StringComparison.Ordinal)
            ? files[(StorageNames.Containers.Models.Length + 1)..]
            : modelId;
        byte[] onnx;
        try
        {
            onnx = (await models.GetBlobClient($"{folder}/{manifest.OnnxPath}").DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.ModelCorrupt, $"Model '{modelId}' has a model.json but no models/{folder}/{manifest.OnnxPath}. Upload the ONNX file again.");
        }

        TokenizerSource tokenizer;
        try
        {
            tokenizer = await TokenizerSource.LoadAsync(storage, manifest.Tokenizer, cancellationToken);
        }
        catch (PreprocessingRejectedException e)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.TokenizerMismatch, $"Model '{modelId}': {e.Message}");
        }

        CheckVocabulary(modelId, manifest, onnx, tokenizer);
        var (options, provider) = CreateOptions(settings.Value);
        InferenceSession session;
        try
        {
            session = new InferenceSession(onnx, options);
        }
        catch (OnnxRuntimeException e)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.ModelCorrupt, $"Model '{modelId}': models/{folder}/{manifest.OnnxPath} cannot be loaded by ONNX Runtime ({e.Message.Split('\n')[0]}). Upload a valid ONNX file.");
        }
        finally
        {
            options.Dispose();
        }

        var missing = manifest.Inputs.Append(manifest.Output).Except(session.InputMetadata.Keys.Concat(session.OutputMetadata.Keys)).ToList();
        if (missing.Count > 0)
        {
            session.Dispose();
            throw new InferenceRejectedException(InferenceErrorCodes.ModelCorrupt, $"Model '{modelId}': model.json names [{string.Join(", ", missing)}], which the graph does not have. Register the folder again.");
        }

        logger.LogInformation("Loaded model {ModelId} ({Task}, output {Output}) on {Provider}", modelId, manifest.Task, manifest.Output, provider);
        return new ModelRuntime(manifest, session, tokenizer, provider) { ModelBytes = onnx.Length };
    }

    /// <summary>The tokenizer must not produce ids past the model's embedding table.</summary>
    private static void CheckVocabulary(string modelId, ModelManifest manifest, byte[] onnx, TokenizerSource tokenizer)
    {
        long? rows;
        try
        {
            rows = ModelRegistry.EmbeddingRows(onnx);
        }
        catch (InvalidProtocolBufferException e)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.ModelCorrupt, $"Model '{modelId}': {manifest.OnnxPath} is not an ONNX model ({e.Message}). Upload a valid ONNX file.");
        }

        if (tokenizer.VocabularySize is { } size && (size != manifest.VocabularySize || (rows is { } r && size > r)))
        {
            throw new InferenceRejectedException(InferenceErrorCodes.TokenizerMismatch,
                $"Model '{modelId}': its tokenizer has {size} tokens but the model expects {rows ?? manifest.VocabularySize} (model.json says {manifest.VocabularySize}). Upload the vocab.txt that belongs to this model.");
        }
    }

    public void Dispose()
    {
        foreach (var model in _models.Values.Where(m => m.IsValueCreated && m.Value.IsCompletedSuccessfully))
        {
            model.Value.Result.Dispose();
        }
    }
}
