using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using Pipeline.Models;
using Pipeline.Models.Onnx;
using Pipeline.Models.Onnx.Proto;
using DataType = Pipeline.Models.Onnx.Proto.TensorProto.Types.DataType;

namespace Pipeline.Tests.Models;

/// <summary>
/// Pooling and a classification head go on every shape of BERT-family export: symbolic or fixed dimensions, an
/// extra pooler output, with or without token_type_ids, opsets 11 to 18, the common output names, stale shapes
/// recorded by the exporter, and ForSequenceClassification exports whose classifier is replaced. The merged model
/// loads in ONNX Runtime and gives exactly the head's probabilities on the pooled features, and the pooling is
/// the one computed independently here.
/// </summary>
public sealed class EncoderHeadTests
{
    private const int Vocabulary = 50;
    private const int Hidden = 8;
    private const int Batch = 3;
    private const int Sequence = 6;
    private static readonly long[] Lengths = [6, 2, 4];

    /// <summary>A small encoder shaped like an exporter's: tanh(embeddings · W) as token vectors, in the requested form.</summary>
    private static ModelProto Encoder(int opset = 17, string output = "last_hidden_state", bool tokenTypes = true, bool fixedDims = false, bool pooler = false, bool staleShapes = false, bool classifier = false)
    {
        object[] Dims(params object[] dims) => fixedDims ? [.. dims.Select(d => d is string s ? s == "batch" ? Batch : Sequence : d)] : dims;
        var graph = new OnnxGraph("encoder");
        var builder = graph;
        graph.Proto.Input.Add(Value("input_ids", DataType.Int64, Dims("batch", "sequence")));
        graph.Proto.Input.Add(Value("attention_mask", DataType.Int64, Dims("batch", "sequence")));
        var w = new ModelGenerator.Weights(11, 0.5f);
        var x = builder.Node("Gather", [builder.Initializer("word_embeddings", w.Normal(Vocabulary * Hidden), Vocabulary, Hidden), "input_ids"], ("axis", 0L));
        if (tokenTypes)
        {
            graph.Proto.Input.Add(Value("token_type_ids", DataType.Int64, Dims("batch", "sequence")));
            x = builder.Node("Add", [x, builder.Node("Gather", [builder.Initializer("token_type_embeddings", w.Normal(2 * Hidden), 2, Hidden), "token_type_ids"], ("axis", 0L))]);
        }

        var tokens = builder.Node("Tanh", [builder.Node("MatMul", [x, builder.Initializer("dense", w.Normal(Hidden * Hidden), Hidden, Hidden)])]);
        if (output == EncoderHead.SentenceEmbedding)
        {
            var mask = opset >= 13
                ? builder.Node("Unsqueeze", [builder.Node("Cast", ["attention_mask"], ("to", (long)DataType.Float)), builder.Int64("axes", 2)])
                : builder.Node("Unsqueeze", [builder.Node("Cast", ["attention_mask"], ("to", (long)DataType.Float))], ("axes", new long[] { 2 }));
            var summed = opset >= 13
                ? builder.Node("ReduceSum", [builder.Node("Mul", [tokens, mask]), builder.Int64("axis1", 1)], ("keepdims", 0L))
                : builder.Node("ReduceSum", [builder.Node("Mul", [tokens, mask])], ("axes", new long[] { 1 }), ("keepdims", 0L));
            builder.Rename(summed, output);
            graph.Proto.Output.Add(Value(output, DataType.Float, Dims("batch", Hidden)));
        }
        else
        {
            builder.Rename(tokens, output);
            graph.Proto.Output.Add(Value(output, DataType.Float, fixedDims ? Dims("batch", "sequence", Hidden) : ["batch", "sequence", $"{output}_dim_2"]));
        }

        if (pooler || classifier)
        {
            var first = builder.Node("Gather", [output, builder.Int64Scalar("cls_index", 0)], ("axis", 1L));
            var pooled = builder.Node("Tanh", [builder.Node("Gemm", [first, builder.Initializer("pooler.weight", w.Normal(Hidden * Hidden), Hidden, Hidden), builder.Initializer("pooler.bias", w.Normal(Hidden), Hidden)], ("transB", 1L))]);
            builder.Rename(pooled, "pooler_output");
            graph.Proto.Output.Add(Value("pooler_output", DataType.Float, Dims("batch", Hidden)));
            if (classifier)
            {
                builder.Rename(builder.Node("Gemm", ["pooler_output", builder.Initializer("classifier.weight", w.Normal(3 * Hidden), 3, Hidden), builder.Initializer("classifier.bias", w.Normal(3), 3)], ("transB", 1L)), "logits");
                graph.Proto.Output.Clear();
                graph.Proto.Output.Add(Value("logits", DataType.Float, Dims("batch", 3)));
            }
        }

        if (staleShapes)
        {
            // What some exporters leave behind: shapes with unknown (0) sizes where the real ones are 8.
            graph.Proto.ValueInfo.Add(Value(output, DataType.Float, [0, 0, 0]));
            graph.Proto.ValueInfo.Add(Value(x, DataType.Float, ["batch", "sequence", 0]));
        }

        var model = graph.ToModel();
        model.OpsetImport[0].Version = opset;
        model.IrVersion = opset >= 18 ? 8 : 7;
        return model;
    }

    private static ValueInfoProto Value(string name, DataType type, object[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var dim in dims)
        {
            shape.Dim.Add(dim is string symbol ? new TensorShapeProto.Types.Dimension { DimParam = symbol } : new TensorShapeProto.Types.Dimension { DimValue = Convert.ToInt64(dim) });
        }

        return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } } };
    }

    /// <summary>A padded batch of random ids: rows of <see cref="Lengths"/> real tokens.</summary>
    private static Dictionary<string, long[]> Feed(int vocabulary)
    {
        var random = new Random(5);
        var ids = new long[Batch * Sequence];
        var mask = new long[Batch * Sequence];
        for (var b = 0; b < Batch; b++)
        {
            for (var t = 0; t < Lengths[b]; t++)
            {
                ids[(b * Sequence) + t] = random.Next(1, vocabulary);
                mask[(b * Sequence) + t] = 1;
            }
        }

        return new() { ["input_ids"] = ids, ["attention_mask"] = mask, ["token_type_ids"] = new long[Batch * Sequence] };
    }

    private static Dictionary<string, float[]> Run(ModelProto model, int vocabulary)
    {
        using var session = new InferenceSession(model.ToByteArray());
        var feed = Feed(vocabulary);
        var inputs = session.InputMetadata.Keys.Select(name => NamedOnnxValue.CreateFromTensor(name, new DenseTensor<long>(feed[name], [Batch, Sequence]))).ToList();
        using var results = session.Run(inputs);
        return results.ToDictionary(r => r.Name, r => r.AsTensor<float>().ToArray());
    }

    /// <summary>The classifier's probabilities equal softmax(W·f + b) on the features graph's f, row by row.</summary>
    internal static void AssertHeadMatches(ModelProto classifier, ModelProto features, float[] weight, float[] bias, int labels, bool tokenTypes, int vocabulary = Vocabulary)
    {
        var probabilities = Run(classifier, vocabulary)[ModelGenerator.Probabilities];
        var pooled = Run(features, vocabulary)[EncoderHead.FeaturesOutput];
        var hidden = weight.Length / labels;
        Assert.Equal(Batch * hidden, pooled.Length);
        for (var b = 0; b < Batch; b++)
        {
            var logits = Enumerable.Range(0, labels).Select(c => bias[c] + Enumerable.Range(0, hidden).Sum(h => weight[(c * hidden) + h] * pooled[(b * hidden) + h])).ToArray();
            var max = logits.Max();
            var sum = logits.Sum(z => MathF.Exp(z - max));
            for (var c = 0; c < labels; c++)
            {
                Assert.Equal(MathF.Exp(logits[c] - max) / sum, probabilities[(b * labels) + c], 1e-4);
            }
        }
    }

    /// <summary>Pooling written out: over each row's real tokens, then L2 normalisation when asked.</summary>
    private static float[] Pool(float[] tokens, Pooling pooling)
    {
        var pooled = new float[Batch * Hidden];
        for (var b = 0; b < Batch; b++)
        {
            var row = pooled.AsSpan(b * Hidden, Hidden);
            for (var h = 0; h < Hidden; h++)
            {
                var values = Enumerable.Range(0, (int)Lengths[b]).Select(t => tokens[(((b * Sequence) + t) * Hidden) + h]).ToArray();
                row[h] = pooling.Mode switch { Pooling.Cls => values[0], Pooling.Max => values.Max(), _ => values.Average() };
            }

            var norm = MathF.Sqrt(row.ToArray().Sum(v => v * v));
            for (var h = 0; h < Hidden && pooling.Normalize; h++)
            {
                row[h] /= norm;
            }
        }

        return pooled;
    }

    public static TheoryData<string, int, string, bool, bool, bool, bool> Variants => new()
    {
        // name, opset, output, token types, fixed dims, pooler output, stale shapes
        { "hf-export", 14, "last_hidden_state", true, false, true, false },
        { "fixed-dims", 17, "last_hidden_state", true, true, true, false },
        { "no-token-types", 13, "last_hidden_state", false, false, false, false },
        { "opset-11", 11, "last_hidden_state", true, false, true, false },
        { "opset-12-stale-shapes", 12, "last_hidden_state", true, false, false, true },
        { "opset-18", 18, "last_hidden_state", true, false, true, false },
        { "token-embeddings", 15, "token_embeddings", false, false, false, true },
    };

    [Theory]
    [MemberData(nameof(Variants))]
    public void Every_pooling_on_every_export_variant_loads_and_gives_the_heads_probabilities(string name, int opset, string output, bool tokenTypes, bool fixedDims, bool pooler, bool stale)
    {
        var encoder = Encoder(opset, output, tokenTypes, fixedDims, pooler, stale);
        var tokens = Run(Encoder(opset, output, tokenTypes, fixedDims), Vocabulary)[output];
        var w = new ModelGenerator.Weights(name.Length, 0.7f);
        foreach (var pooling in new[] { "mean", "mean+normalize", "cls", "max", "max+normalize" }.Select(p => Pooling.TryParse(p)!))
        {
            var features = EncoderHead.Features(encoder, pooling);
            var pooled = Run(features, Vocabulary)[EncoderHead.FeaturesOutput];
            Assert.All(Pool(tokens, pooling).Zip(pooled), p => Assert.Equal(p.First, p.Second, 1e-5));

            var (weight, bias) = (w.Normal(2 * Hidden), w.Normal(2));
            var classifier = EncoderHead.Classifier(encoder, pooling, weight, bias, 2);
            Assert.Equal(opset, EncoderHead.DefaultOpset(classifier));
            Assert.Equal(["logits", "probabilities"], classifier.Graph.Output.Select(o => o.Name));
            Assert.Empty(classifier.Graph.ValueInfo);
            Assert.DoesNotContain(classifier.Graph.Initializer, t => t.Name.StartsWith("pooler", StringComparison.Ordinal));
            AssertHeadMatches(classifier, features, weight, bias, 2, tokenTypes);
        }
    }

    [Fact]
    public void A_sentence_embedding_export_is_used_as_pooled_and_normalised_when_asked()
    {
        var encoder = Encoder(output: EncoderHead.SentenceEmbedding, opset: 12);
        var sums = Run(encoder, Vocabulary)[EncoderHead.SentenceEmbedding];
        var normalized = Run(EncoderHead.Features(encoder, new Pooling(Pooling.Mean, true)), Vocabulary)[EncoderHead.FeaturesOutput];
        for (var b = 0; b < Batch; b++)
        {
            var row = sums.AsSpan(b * Hidden, Hidden).ToArray();
            var norm = MathF.Sqrt(row.Sum(v => v * v));
            Assert.All(row.Select(v => v / norm).Zip(normalized.AsSpan(b * Hidden, Hidden).ToArray()), p => Assert.Equal(p.First, p.Second, 1e-5));
        }

        var w = new ModelGenerator.Weights(2, 0.5f);
        var (weight, bias) = (w.Normal(4 * Hidden), w.Normal(4));
        AssertHeadMatches(EncoderHead.Classifier(encoder, Pooling.Default, weight, bias, 4), EncoderHead.Features(encoder, Pooling.Default), weight, bias, 4, tokenTypes: true);
    }

    [Fact]
    public void A_sequence_classification_export_gets_a_new_head_on_its_pooled_features()
    {
        var encoder = Encoder(classifier: true, opset: 14);
        var features = EncoderHead.Features(encoder, Pooling.Default);
        // The features are the export's pooler output (what its own classifier read).
        var pooler = Run(Encoder(pooler: true, opset: 14), Vocabulary)["pooler_output"];
        Assert.All(pooler.Zip(Run(features, Vocabulary)[EncoderHead.FeaturesOutput]), p => Assert.Equal(p.First, p.Second, 1e-5));

        var w = new ModelGenerator.Weights(4, 0.5f);
        var (weight, bias) = (w.Normal(2 * Hidden), w.Normal(2));
        var classifier = EncoderHead.Classifier(encoder, Pooling.Default, weight, bias, 2);
        Assert.DoesNotContain(classifier.Graph.Initializer, t => t.Name == "classifier.weight");
        Assert.Single(classifier.Graph.Node, n => n.Output.Contains("logits"));
        AssertHeadMatches(classifier, features, weight, bias, 2, tokenTypes: true);
    }

    [Fact]
    public void A_graph_without_encoder_outputs_is_refused_with_the_outputs_it_has()
    {
        var encoder = Encoder();
        encoder.Graph.Output[0].Name = "hidden";
        encoder.Graph.Node.Last().Output[0] = "hidden";
        var refused = Assert.Throws<ModelRejectedException>(() => EncoderHead.Classifier(encoder, Pooling.Default, new float[2 * Hidden], new float[2], 2));
        Assert.Contains("[hidden]", refused.Message);
        Assert.Throws<ArgumentException>(() => EncoderHead.Classifier(Encoder(), Pooling.Default, new float[7], new float[2], 2));
    }

    [Fact]
    public void Pooling_settings_parse_and_sentence_transformers_files_are_read()
    {
        Assert.Equal(new Pooling(Pooling.Max, true), Pooling.TryParse("max+normalize"));
        Assert.Equal("cls", Pooling.TryParse("CLS")!.ToString());
        Assert.Null(Pooling.TryParse("sum"));
        const string modules = """[{"idx":0,"path":"","type":"sentence_transformers.models.Transformer"},{"idx":1,"path":"1_Pooling","type":"sentence_transformers.models.Pooling"},{"idx":2,"path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]""";
        Assert.Equal(new Pooling(Pooling.Cls, true), Pooling.FromSentenceTransformers(modules, _ => """{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}""", "m"));
        Assert.Equal(new Pooling(Pooling.Mean, false), Pooling.FromSentenceTransformers(modules.Replace(",{\"idx\":2,\"path\":\"2_Normalize\",\"type\":\"sentence_transformers.models.Normalize\"}", ""), _ => """{"pooling_mode_mean_tokens": true}""", "m"));
        Assert.Contains("pooling_mode_mean_tokens", Assert.Throws<ModelRejectedException>(() => Pooling.FromSentenceTransformers(modules, _ => """{"pooling_mode_weightedmean_tokens": true}""", "m")).Message);
        Assert.Null(Pooling.FromSentenceTransformers(null, _ => null, "m"));
    }
}
