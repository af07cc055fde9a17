using Pipeline.Models.Onnx;
using Pipeline.Models.Onnx.Proto;
using DataType = Pipeline.Models.Onnx.Proto.TensorProto.Types.DataType;

namespace Pipeline.Models;

/// <summary>Shape of a generated BERT-style encoder.</summary>
public sealed record EncoderShape(int Vocabulary, int Hidden, int Layers, int Heads, int Intermediate, int MaxPositions = 512, int TypeVocabulary = 2)
{
    /// <summary>The shape of all-MiniLM-L6-v2.</summary>
    public static EncoderShape MiniLm => new(30522, 384, 6, 12, 1536);
}

/// <summary>
/// Generates real ONNX models with seeded weights (no weights can be downloaded here), with the input and
/// output names Hugging Face exports use, so the inference code that runs them runs a user's exported model.
/// </summary>
public static class ModelGenerator
{
    public const string InputIds = "input_ids";
    public const string AttentionMask = "attention_mask";
    public const string TokenTypeIds = "token_type_ids";
    public const string LastHiddenState = "last_hidden_state";
    public const string Logits = "logits";
    public const string Probabilities = "probabilities";
    public const string EmbeddingTable = "embeddings.word_embeddings.weight";
    public const string KindProperty = "pipeline.kind";

    /// <summary>Weights drawn from N(0, std) with a fixed seed: the same arguments give the same model.</summary>
    public sealed class Weights(int seed, float std = 0.02f)
    {
        private readonly Random _random = new(seed);

        public float[] Normal(int count)
        {
            var values = new float[count];
            for (var i = 0; i < count; i++)
            {
                // Box-Muller.
                var u1 = 1.0 - _random.NextDouble();
                var u2 = _random.NextDouble();
                values[i] = (float)(std * Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
            }

            return values;
        }

        public static float[] Constant(int count, float value) => Enumerable.Repeat(value, count).ToArray();
    }

    /// <summary>
    /// A bag-of-embeddings encoder: an embedding lookup whose rows are the token vectors
    /// (<c>last_hidden_state</c> = embeddings of each token). Fast, and a useful base for demos.
    /// </summary>
    public static ModelProto BagOfEmbeddings(int vocabulary, int hidden, int seed) =>
        BagOfEmbeddings(new Weights(seed, std: 0.5f).Normal(vocabulary * hidden), vocabulary, hidden);

    /// <summary>A bag-of-embeddings encoder over a given table (row-major, <paramref name="vocabulary"/> × <paramref name="hidden"/>), such as a trained one.</summary>
    public static ModelProto BagOfEmbeddings(float[] embeddings, int vocabulary, int hidden)
    {
        var graph = new OnnxGraph("bag_of_embeddings");
        graph.Input(InputIds, DataType.Int64, "batch", "sequence");
        graph.Input(AttentionMask, DataType.Int64, "batch", "sequence");
        var table = graph.Initializer(EmbeddingTable, embeddings, vocabulary, hidden);
        var gathered = graph.Node("Gather", [table, InputIds], ("axis", 0L));
        // Zero padded positions, so last_hidden_state means the same as an encoder's under the mask.
        var mask = Unsqueeze(graph, graph.Node("Cast", [AttentionMask], ("to", (long)DataType.Float)), 2, OnnxGraph.Opset, "mask_axes");
        graph.Rename(graph.Node("Mul", [gathered, mask]), LastHiddenState);
        graph.Output(LastHiddenState, DataType.Float, "batch", "sequence", hidden);
        return graph.ToModel(new Dictionary<string, string> { ["pipeline.kind"] = "bag-of-embeddings" });
    }

    /// <summary>A BERT encoder (post-layer-norm, GELU), as Hugging Face exports it: input_ids, attention_mask, token_type_ids → last_hidden_state.</summary>
    public static ModelProto Bert(EncoderShape shape, int seed)
    {
        var graph = new OnnxGraph("bert");
        graph.Input(InputIds, DataType.Int64, "batch", "sequence");
        graph.Input(AttentionMask, DataType.Int64, "batch", "sequence");
        graph.Input(TokenTypeIds, DataType.Int64, "batch", "sequence");
        var w = new Weights(seed);
        var h = shape.Hidden;

        // Embeddings: word + position + token type, then LayerNorm.
        var words = graph.Node("Gather", [graph.Initializer("embeddings.word_embeddings.weight", w.Normal(shape.Vocabulary * h), shape.Vocabulary, h), InputIds], ("axis", 0L));
        var types = graph.Node("Gather", [graph.Initializer("embeddings.token_type_embeddings.weight", w.Normal(shape.TypeVocabulary * h), shape.TypeVocabulary, h), TokenTypeIds], ("axis", 0L));
        var sequenceLength = graph.Node("Gather", [graph.Node("Shape", [InputIds]), graph.Int64("one_index", 1)], ("axis", 0L));
        var positionIds = graph.Node("Range", [graph.Int64Scalar("zero", 0), graph.Node("Squeeze", [sequenceLength]), graph.Int64Scalar("step", 1)]);
        var positions = graph.Node("Gather", [graph.Initializer("embeddings.position_embeddings.weight", w.Normal(shape.MaxPositions * h), shape.MaxPositions, h), positionIds], ("axis", 0L));
        var x = LayerNorm(graph, graph.Node("Add", [graph.Node("Add", [words, types]), positions]), "embeddings.LayerNorm", h);

        // Additive attention mask: 0 where attended, -10000 where padded; shape [batch, 1, 1, sequence]. The
        // same node pattern as Hugging Face's export, which ONNX Runtime's attention fusion recognises.
        var mask4 = Unsqueeze(graph, Unsqueeze(graph, AttentionMask, 1, OnnxGraph.Opset, "mask_axis1"), 2, OnnxGraph.Opset, "mask_axis2");
        var maskFloat = graph.Node("Cast", [mask4], ("to", (long)DataType.Float));
        var maskBias4 = graph.Node("Mul", [graph.Node("Sub", [graph.Scalar("one", 1f), maskFloat]), graph.Scalar("minus_large", -10000f)]);

        var headSize = h / shape.Heads;
        var splitShape = graph.Int64("split_heads_shape", 0, 0, shape.Heads, headSize);
        var mergeShape = graph.Int64("merge_heads_shape", 0, 0, h);
        var scale = graph.Scalar("attention_scale", MathF.Sqrt(headSize));
        for (var layer = 0; layer < shape.Layers; layer++)
        {
            var p = $"encoder.layer.{layer}";
            string Heads(string projection, long[] perm) => graph.Node("Transpose", [graph.Node("Reshape", [Linear(graph, w, x, $"{p}.attention.self.{projection}", h, h), splitShape])], ("perm", perm));
            var q = Heads("query", [0, 2, 1, 3]);
            // K comes out transposed for Q·Kᵀ in one Transpose, as the Hugging Face export has it.
            var kT = Heads("key", [0, 2, 3, 1]);
            var v = Heads("value", [0, 2, 1, 3]);
            var scores = graph.Node("Add", [graph.Node("Div", [graph.Node("MatMul", [q, kT]), scale]), maskBias4]);
            var context = graph.Node("MatMul", [graph.Node("Softmax", [scores], ("axis", 3L)), v]);
            var merged = graph.Node("Reshape", [graph.Node("Transpose", [context], ("perm", new long[] { 0, 2, 1, 3 })), mergeShape]);
            var attention = LayerNorm(graph, graph.Node("Add", [Linear(graph, w, merged, $"{p}.attention.output.dense", h, h), x]), $"{p}.attention.output.LayerNorm", h);
            var intermediate = Gelu(graph, Linear(graph, w, attention, $"{p}.intermediate.dense", h, shape.Intermediate));
            x = LayerNorm(graph, graph.Node("Add", [Linear(graph, w, intermediate, $"{p}.output.dense", shape.Intermediate, h), attention]), $"{p}.output.LayerNorm", h);
        }

        graph.Rename(x, LastHiddenState);
        graph.Output(LastHiddenState, DataType.Float, "batch", "sequence", h);
        return graph.ToModel(new Dictionary<string, string> { ["pipeline.kind"] = "bert" });
    }

    /// <summary>
    /// Appends a classification head to an encoder: masked mean pooling, a linear layer and softmax, giving one
    /// merged model with outputs <c>logits</c> and <c>probabilities</c> (see <see cref="EncoderHead"/>).
    /// </summary>
    public static ModelProto WithClassificationHead(ModelProto encoder, float[] weight, float[] bias, int labels) =>
        EncoderHead.Classifier(encoder, Pooling.Default, weight, bias, labels);

    private static string Unsqueeze(OnnxGraph graph, string input, long axis, int opset, string axesName) => opset >= 13
        ? graph.Node("Unsqueeze", [input, graph.Int64(axesName, axis)])
        : graph.Node("Unsqueeze", [input], ("axes", new[] { axis }));

    private static string Linear(OnnxGraph graph, Weights w, string input, string name, int inFeatures, int outFeatures) =>
        graph.Node("Add", [graph.Node("MatMul", [input, graph.Initializer($"{name}.weight", w.Normal(inFeatures * outFeatures), inFeatures, outFeatures)]),
            graph.Initializer($"{name}.bias", Weights.Constant(outFeatures, 0f), outFeatures)]);

    private static string LayerNorm(OnnxGraph graph, string input, string name, int hidden) =>
        graph.Node("LayerNormalization", [input, graph.Initializer($"{name}.weight", Weights.Constant(hidden, 1f), hidden), graph.Initializer($"{name}.bias", Weights.Constant(hidden, 0f), hidden)],
            ("axis", -1L), ("epsilon", 1e-12f));

    /// <summary>GELU, exact form: 0.5 x (1 + erf(x / sqrt 2)).</summary>
    private static string Gelu(OnnxGraph graph, string x) =>
        graph.Node("Mul", [graph.Node("Mul", [x, graph.Scalar($"gelu_half_{x}", 0.5f)]),
            graph.Node("Add", [graph.Node("Erf", [graph.Node("Div", [x, graph.Scalar($"gelu_sqrt2_{x}", MathF.Sqrt(2f))])]), graph.Scalar($"gelu_one_{x}", 1f)])]);
}

/// <summary>What <c>pipeline models generate</c> makes: a seeded model over a tiktoken encoding, needing no downloaded files.</summary>
public sealed record GeneratedModelSpec
{
    public const string BagOfEmbeddingsKind = "bag-of-embeddings";
    public const string BertKind = "bert";

    public string Kind { get; init; } = BagOfEmbeddingsKind;
    public string Task { get; init; } = ModelTasks.Embedding;
    public List<string> Labels { get; init; } = [];
    /// <summary>Width of the embeddings (bag-of-embeddings) or of the encoder (BERT; default MiniLM's 384).</summary>
    public int Hidden { get; init; } = 64;
    public int Layers { get; init; } = 6;
    public int Heads { get; init; } = 12;
    public string Encoding { get; init; } = "cl100k_base";
    public int MaxSequenceLength { get; init; } = 128;
    public int Seed { get; init; } = 1;

    /// <summary>The ONNX model this spec describes (a classification head with seeded weights when the task asks for one).</summary>
    public ModelProto Build()
    {
        var vocabulary = Preprocessing.TokenizerSource.TiktokenVocabularySize(Encoding);
        var encoder = Kind switch
        {
            BagOfEmbeddingsKind => ModelGenerator.BagOfEmbeddings(vocabulary, Hidden, Seed),
            BertKind => ModelGenerator.Bert(new EncoderShape(vocabulary, Hidden, Layers, Heads, 4 * Hidden, Math.Max(512, MaxSequenceLength)), Seed),
            _ => throw new ArgumentException($"Unknown model kind '{Kind}': use {BagOfEmbeddingsKind} or {BertKind}."),
        };
        if (Task != ModelTasks.Classification)
        {
            return encoder;
        }

        if (Labels.Count < 2)
        {
            throw new ArgumentException("A classification model needs at least two labels.");
        }

        var weights = new ModelGenerator.Weights(Seed + 1, 0.1f);
        return ModelGenerator.WithClassificationHead(encoder, weights.Normal(Labels.Count * Hidden), new float[Labels.Count], Labels.Count);
    }
}
