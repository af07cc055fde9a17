using System.Text.Json;
using Google.Protobuf;
using Pipeline.Models;
using Pipeline.Models.Onnx;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;
using DataType = Pipeline.Models.Onnx.Proto.TensorProto.Types.DataType;

namespace Pipeline.Tests.Models;

/// <summary>Model folders in the models container: generated models, Hugging Face exports, and the folders that are refused.</summary>
public sealed class ModelRegistryTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static readonly EncoderShape Tiny = new(30522, 8, 1, 2, 16, 16);

    private ModelRegistry Registry => new(azurite.Storage);

    private async Task UploadAsync(string path, byte[] content) =>
        await azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient(path).UploadAsync(new BinaryData(content), overwrite: true);

    private static byte[] Shared(string file) => File.ReadAllBytes(RepoPaths.RequireSharedData($"tokenizers/bert-base-uncased/{file}"));

    private static byte[] ClassifierOnnx(EncoderShape shape) =>
        ModelGenerator.WithClassificationHead(ModelGenerator.Bert(shape, 1), new float[2 * shape.Hidden], [0f, 0f], 2).ToByteArray();

    [Fact]
    public async Task A_generated_model_folder_is_written_with_its_manifest_last_and_listed()
    {
        var id = "boe-" + Guid.NewGuid().ToString("n")[..8];
        var manifest = await Registry.WriteAsync(id, ModelGenerator.BagOfEmbeddings(30522, 16, 3), Shared("vocab.txt"), ModelTasks.Embedding, [], 128,
            new ModelLineage { BaseModel = "generated:bag-of-embeddings" }, CancellationToken.None);

        Assert.Equal(ModelGenerator.LastHiddenState, manifest.Output);
        Assert.Equal(30522, manifest.VocabularySize);
        Assert.Equal([ModelGenerator.InputIds, ModelGenerator.AttentionMask], manifest.Inputs);
        Assert.Contains(await Registry.ListAsync(CancellationToken.None), m => m.ModelId == id);
    }

    [Fact]
    public async Task A_hugging_face_export_is_registered_from_its_files_and_graph()
    {
        const string folder = "hf-classifier";
        await UploadAsync($"{folder}/onnx/model.onnx", ClassifierOnnx(Tiny));
        await UploadAsync($"{folder}/tokenizer.json", Shared("tokenizer.json"));
        await UploadAsync($"{folder}/tokenizer_config.json", Shared("tokenizer_config.json"));
        await UploadAsync($"{folder}/config.json", JsonSerializer.SerializeToUtf8Bytes(new
        {
            architectures = new[] { "BertForSequenceClassification" },
            id2label = new Dictionary<string, string> { ["0"] = "negative", ["1"] = "positive" },
            vocab_size = 30522,
            max_position_embeddings = 16,
        }));

        var manifest = await Registry.RegisterHuggingFaceFolderAsync(folder, CancellationToken.None);

        Assert.Equal(ModelTasks.Classification, manifest.Task);
        Assert.Equal(["negative", "positive"], manifest.Labels);
        Assert.Equal(ModelGenerator.Probabilities, manifest.Output);
        Assert.Equal("onnx/model.onnx", manifest.OnnxPath);
        Assert.Equal(16, manifest.MaxSequenceLength);
        Assert.Equal([ModelGenerator.InputIds, ModelGenerator.AttentionMask, ModelGenerator.TokenTypeIds], manifest.Inputs);
        // The vocabulary extracted from tokenizer.json is the published vocab.txt, line for line.
        var extracted = (await azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient($"{folder}/vocab.txt").DownloadContentAsync()).Value.Content.ToString();
        Assert.Equal(File.ReadAllText(RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt")).Replace("\r", ""), extracted);
        Assert.NotNull(await BlobJson.ReadAsync(azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient($"{folder}/model.json"), ModelJson.Default.ModelManifest, CancellationToken.None));
    }

    [Fact]
    public async Task Folders_that_cannot_be_run_are_refused_with_the_reason()
    {
        async Task<string> Refused(string folder) => (await Assert.ThrowsAsync<ModelRejectedException>(() => Registry.RegisterHuggingFaceFolderAsync(folder, CancellationToken.None))).Message;

        await UploadAsync("no-onnx/vocab.txt", Shared("vocab.txt"));
        Assert.Contains("no model.onnx", await Refused("no-onnx"));

        await UploadAsync("no-tokenizer/model.onnx", ClassifierOnnx(Tiny));
        Assert.Contains("no tokenizer", await Refused("no-tokenizer"));

        await UploadAsync("mismatch/model.onnx", ClassifierOnnx(Tiny with { Vocabulary = 1000 }));
        await UploadAsync("mismatch/vocab.txt", Shared("vocab.txt"));
        Assert.Contains("embedding table has 1000 rows", await Refused("mismatch"));

        var graph = new OnnxGraph("image");
        graph.Input("pixel_values", DataType.Float, "batch", 3);
        graph.Input(ModelGenerator.InputIds, DataType.Int64, "batch", "sequence");
        graph.Rename(graph.Node("Identity", ["pixel_values"]), "sentence_embedding");
        graph.Output("sentence_embedding", DataType.Float, "batch", 3);
        await UploadAsync("vision/model.onnx", graph.ToModel().ToByteArray());
        await UploadAsync("vision/vocab.txt", Shared("vocab.txt"));
        Assert.Contains("pixel_values cannot be fed", await Refused("vision"));

        await UploadAsync("corrupt/model.onnx", [1, 2, 3, 4]);
        await UploadAsync("corrupt/vocab.txt", Shared("vocab.txt"));
        Assert.Contains("not a model ONNX Runtime can load", await Refused("corrupt"));
    }
}
