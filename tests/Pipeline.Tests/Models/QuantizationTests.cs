using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Pipeline.Models;
using Pipeline.Models.Onnx.Proto;
using Pipeline.Models.Quantization;
using DataType = Pipeline.Models.Onnx.Proto.TensorProto.Types.DataType;

namespace Pipeline.Tests.Models;

/// <summary>
/// The int8 rewrite of a graph (<see cref="Int8Quantizer"/>) on a generated BERT encoder with a classification head:
/// which nodes change, that ONNX Runtime runs it and fuses it into its integer kernels, that it agrees with the fp32
/// graph, and what it refuses.
/// </summary>
public sealed class QuantizationTests
{
    private static readonly EncoderShape Small = new(1000, 64, 2, 4, 256, 64);
    private const int Batch = 4;
    private const int Sequence = 12;

    private static ModelProto Classifier(EncoderShape shape) =>
        ModelGenerator.WithClassificationHead(ModelGenerator.Bert(shape, 5), new ModelGenerator.Weights(6, 0.1f).Normal(3 * shape.Hidden), [0.1f, 0f, -0.1f], 3);

    /// <summary>Token ids and a mask with rows of different lengths (padding at the end), as the stage feeds them.</summary>
    private static (long[] Ids, long[] Mask) Inputs(int vocabulary, int seed)
    {
        var random = new Random(seed);
        var ids = new long[Batch * Sequence];
        var mask = new long[Batch * Sequence];
        for (var r = 0; r < Batch; r++)
        {
            var length = Sequence - 3 * r;
            for (var t = 0; t < length; t++)
            {
                ids[r * Sequence + t] = random.Next(1, vocabulary);
                mask[r * Sequence + t] = 1;
            }
        }

        return (ids, mask);
    }

    /// <summary>Runs a graph in ONNX Runtime and returns one output, flattened.</summary>
    public static float[] Run(byte[] onnx, string output, long[] ids, long[] mask, int batch, int sequence)
    {
        using var session = new InferenceSession(onnx);
        long[] shape = [batch, sequence];
        var names = session.InputMetadata.Keys.ToArray();
        var values = names.Select(n => OrtValue.CreateTensorValueFromMemory(n switch
        {
            ModelGenerator.InputIds => ids,
            ModelGenerator.AttentionMask => mask,
            _ => new long[ids.Length],
        }, shape)).ToArray();
        try
        {
            using var results = session.Run(new RunOptions(), names, values, [output]);
            return results[0].GetTensorDataAsSpan<float>().ToArray();
        }
        finally
        {
            foreach (var value in values)
            {
                value.Dispose();
            }
        }
    }

    public static double Cosine(ReadOnlySpan<float> a, ReadOnlySpan<float> b)
    {
        double dot = 0, na = 0, nb = 0;
        for (var i = 0; i < a.Length; i++)
        {
            dot += (double)a[i] * b[i];
            na += (double)a[i] * a[i];
            nb += (double)b[i] * b[i];
        }

        return dot / Math.Sqrt(na * nb);
    }

    [Fact]
    public void Every_weight_matmul_and_the_head_become_int8_while_embeddings_layer_norm_softmax_and_attention_stay_fp32()
    {
        var source = Classifier(Small);
        var quantized = Int8Quantizer.Quantize(source);
        var graph = quantized.Model.Graph;

        // Per layer: query, key, value, attention output, intermediate, output (6); plus the head's Gemm.
        Assert.Equal(Small.Layers * 6 + 1, quantized.QuantizedNodes.Count);
        Assert.Contains(quantized.QuantizedNodes, n => n.StartsWith(EncoderHead.Prefix + "Gemm", StringComparison.Ordinal));
        // Q·Kᵀ and softmax·V read two activations.
        Assert.Equal(Small.Layers * 2, quantized.FloatMatMuls.Count);
        Assert.Equal(Small.Layers * 2, graph.Node.Count(n => n.OpType == "MatMul"));
        Assert.Equal(Small.Layers * 6 + 1, graph.Node.Count(n => n.OpType == "MatMulInteger"));
        Assert.DoesNotContain(graph.Node, n => n.OpType == "Gemm");
        // One DynamicQuantizeLinear per activation: Q, K and V share theirs.
        Assert.Equal(Small.Layers * 4 + 1, graph.Node.Count(n => n.OpType == "DynamicQuantizeLinear"));
        foreach (var op in new[] { "LayerNormalization", "Softmax", "Gather", "Erf" })
        {
            Assert.Equal(source.Graph.Node.Count(n => n.OpType == op), graph.Node.Count(n => n.OpType == op));
        }

        // uint8 weights around 128 by default, with a zero point per column.
        var weights = graph.Initializer.Where(t => t.DataType == (int)DataType.Uint8 && t.Dims.Count == 2).ToList();
        Assert.Equal(Small.Layers * 6 + 1, weights.Count);
        Assert.All(weights, w => Assert.Equal(127, w.RawData.Span.ToArray().Max(b => Math.Abs(b - 128))));
        Assert.Equal(Small.Layers * 6 + 1, graph.Node.Count(n => n.OpType == "MatMulInteger" && n.Input.Count == 4));
        // int8 weights: 7 bits by default, no value past 63 (the AVX2 saturation bound), and no zero point.
        var signed = Int8Quantizer.Quantize(source, new QuantizationOptions { UnsignedWeights = false }).Model.Graph;
        var int8 = signed.Initializer.Where(t => t.DataType == (int)DataType.Int8).ToList();
        Assert.Equal(Small.Layers * 6 + 1, int8.Count);
        Assert.All(int8, w => Assert.Equal(63, w.RawData.Span.ToArray().Select(b => (int)(sbyte)b).Max(Math.Abs)));
        Assert.All(signed.Node.Where(n => n.OpType == "MatMulInteger"), n => Assert.Equal(3, n.Input.Count));
        Assert.Contains(graph.Initializer, t => t.Name == ModelGenerator.EmbeddingTable && t.DataType == (int)DataType.Float);
        Assert.DoesNotContain(graph.Initializer, t => t.Name == "encoder.layer.0.attention.self.query.weight");
        Assert.True(quantized.Model.CalculateSize() < source.CalculateSize() * 0.75, $"{quantized.Model.CalculateSize()} bytes vs {source.CalculateSize()}");
    }

    [Theory]
    [InlineData(true, true, true)]
    [InlineData(true, true, false)]
    [InlineData(true, false, false)]
    [InlineData(false, true, false)]
    [InlineData(false, true, true)]
    public void The_quantized_graph_agrees_with_fp32_on_pooled_features_and_probabilities(bool perChannel, bool reduceRange, bool unsignedWeights)
    {
        var encoder = ModelGenerator.Bert(Small, 5);
        var features = EncoderHead.Features(encoder, new Pooling(Pooling.Mean, Normalize: false));
        var classifier = Classifier(Small);
        var options = new QuantizationOptions { PerChannel = perChannel, ReduceRange = reduceRange, UnsignedWeights = unsignedWeights };
        var (ids, mask) = Inputs(Small.Vocabulary, 3);

        var fp32 = Run(features.ToByteArray(), EncoderHead.FeaturesOutput, ids, mask, Batch, Sequence);
        var int8 = Run(Int8Quantizer.Quantize(features, options).Model.ToByteArray(), EncoderHead.FeaturesOutput, ids, mask, Batch, Sequence);
        for (var r = 0; r < Batch; r++)
        {
            var cosine = Cosine(fp32.AsSpan(r * Small.Hidden, Small.Hidden), int8.AsSpan(r * Small.Hidden, Small.Hidden));
            Assert.True(cosine >= 0.99, $"row {r}: cosine {cosine:F4} to the fp32 features");
        }

        var probabilities = Run(classifier.ToByteArray(), ModelGenerator.Probabilities, ids, mask, Batch, Sequence);
        var quantized = Run(Int8Quantizer.Quantize(classifier, options).Model.ToByteArray(), ModelGenerator.Probabilities, ids, mask, Batch, Sequence);
        Assert.True(probabilities.Zip(quantized, (a, b) => Math.Abs(a - b)).Max() < 0.02, $"probabilities {string.Join(", ", probabilities)} vs {string.Join(", ", quantized)}");
        // Not the same numbers: the weights really are int8.
        Assert.NotEqual(fp32, int8);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Onnx_runtime_fuses_the_rewrite_into_its_integer_matmul_kernels(bool unsignedWeights)
    {
        var quantized = Int8Quantizer.Quantize(Classifier(Small), new QuantizationOptions { UnsignedWeights = unsignedWeights }).Model.ToByteArray();
        var path = Path.Combine(Path.GetTempPath(), $"int8-optimized-{Guid.NewGuid():n}.onnx");
        try
        {
            using (var options = new SessionOptions { GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_EXTENDED, OptimizedModelFilePath = path })
            using (new InferenceSession(quantized, options))
            {
            }

            var ops = ModelProto.Parser.ParseFrom(File.ReadAllBytes(path)).Graph.Node.Select(n => n.OpType).ToList();
            // Each weight's MatMulInteger + Cast + Mul (+ bias Add) is one fused node; nothing unfused is left.
            Assert.Equal(Small.Layers * 6 + 1, ops.Count(o => o is "MatMulIntegerToFloat" or "DynamicQuantizeMatMul"));
            Assert.DoesNotContain("MatMulInteger", ops);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void A_graph_without_weight_matrices_is_refused()
    {
        var error = Assert.Throws<QuantizationRejectedException>(() => Int8Quantizer.Quantize(ModelGenerator.BagOfEmbeddings(100, 8, 1)));
        Assert.Equal(QuantizationErrorCodes.NoWeights, error.Code);
        Assert.Contains("no MatMul or Gemm with a constant weight", error.Message);
    }

    [Fact]
    public void A_quantized_graph_is_refused()
    {
        var once = Int8Quantizer.Quantize(Classifier(Small)).Model;
        var error = Assert.Throws<QuantizationRejectedException>(() => Int8Quantizer.Quantize(once));
        Assert.Equal(QuantizationErrorCodes.AlreadyQuantized, error.Code);
        Assert.Contains("DynamicQuantizeLinear", error.Message);
    }

    [Theory]
    [InlineData(10)]
    [InlineData(22)]
    public void An_unsupported_opset_is_refused(int opset)
    {
        var model = Classifier(Small);
        model.OpsetImport[0].Version = opset;
        var error = Assert.Throws<QuantizationRejectedException>(() => Int8Quantizer.Quantize(model));
        Assert.Equal(QuantizationErrorCodes.UnsupportedOpset, error.Code);
        Assert.Contains($"opset {opset}", error.Message);
    }
}
