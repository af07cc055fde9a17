using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using Pipeline.Models;
using Pipeline.Models.Onnx.Proto;

namespace Pipeline.Tests.Models;

/// <summary>
/// The generated ONNX models load in ONNX Runtime, and their outputs equal an independent C#
/// computation of the same network (same weights, read from the model's initializers).
/// </summary>
public sealed class ModelGeneratorTests
{
    private static readonly long[] Ids = [2, 7, 11, 3, 0, 5, 9, 1, 0, 0];
    private static readonly long[] Mask = [1, 1, 1, 1, 0, 1, 1, 1, 0, 0];
    private static readonly long[] Types = [0, 0, 1, 1, 0, 0, 0, 0, 0, 0];
    private const int Batch = 2;
    private const int Sequence = 5;

    private static Dictionary<string, float[]> Run(ModelProto model, bool tokenTypes)
    {
        using var session = new InferenceSession(model.ToByteArray());
        var inputs = new List<NamedOnnxValue>
        {
            NamedOnnxValue.CreateFromTensor(ModelGenerator.InputIds, new DenseTensor<long>(Ids, [Batch, Sequence])),
            NamedOnnxValue.CreateFromTensor(ModelGenerator.AttentionMask, new DenseTensor<long>(Mask, [Batch, Sequence])),
        };
        if (tokenTypes)
        {
            inputs.Add(NamedOnnxValue.CreateFromTensor(ModelGenerator.TokenTypeIds, new DenseTensor<long>(Types, [Batch, Sequence])));
        }

        using var results = session.Run(inputs);
        return results.ToDictionary(r => r.Name, r => r.AsTensor<float>().ToArray());
    }

    private static float[] Weight(ModelProto model, string name)
    {
        var tensor = model.Graph.Initializer.Single(t => t.Name == name);
        var bytes = tensor.RawData.ToByteArray();
        var values = new float[bytes.Length / 4];
        Buffer.BlockCopy(bytes, 0, values, 0, bytes.Length);
        return values;
    }

    private static void Close(float[] expected, float[] actual, float tolerance = 1e-4f)
    {
        Assert.Equal(expected.Length, actual.Length);
        for (var i = 0; i < expected.Length; i++)
        {
            Assert.True(Math.Abs(expected[i] - actual[i]) <= tolerance * Math.Max(1, Math.Abs(expected[i])), $"index {i}: expected {expected[i]}, actual {actual[i]}");
        }
    }

    [Fact]
    public void Bag_of_embeddings_looks_up_each_token_and_zeroes_padding()
    {
        const int hidden = 4;
        var model = ModelGenerator.BagOfEmbeddings(vocabulary: 12, hidden, seed: 1);
        var output = Run(model, tokenTypes: false)[ModelGenerator.LastHiddenState];
        var table = Weight(model, "embeddings.word_embeddings.weight");
        var expected = new float[Batch * Sequence * hidden];
        for (var t = 0; t < Ids.Length; t++)
        {
            for (var d = 0; d < hidden; d++)
            {
                expected[(t * hidden) + d] = table[(Ids[t] * hidden) + d] * Mask[t];
            }
        }

        Close(expected, output);
    }

    [Fact]
    public void Bert_encoder_matches_an_independent_computation()
    {
        var shape = new EncoderShape(Vocabulary: 12, Hidden: 8, Layers: 2, Heads: 2, Intermediate: 16, MaxPositions: 16);
        var model = ModelGenerator.Bert(shape, seed: 7);
        var output = Run(model, tokenTypes: true)[ModelGenerator.LastHiddenState];
        Close(ReferenceBert(model, shape), output);
        Assert.Equal(["input_ids", "attention_mask", "token_type_ids"], model.Graph.Input.Select(i => i.Name));
        Assert.Equal("last_hidden_state", Assert.Single(model.Graph.Output).Name);
    }

    [Fact]
    public void Same_seed_same_model_other_seed_other_weights()
    {
        var shape = new EncoderShape(12, 8, 1, 2, 16, 16);
        Assert.Equal(ModelGenerator.Bert(shape, 3).ToByteArray(), ModelGenerator.Bert(shape, 3).ToByteArray());
        Assert.NotEqual(ModelGenerator.Bert(shape, 3).ToByteArray(), ModelGenerator.Bert(shape, 4).ToByteArray());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_classification_head_merges_into_one_model_with_masked_mean_pooling(bool bert)
    {
        const int labels = 3;
        var shape = new EncoderShape(12, 8, 1, 2, 16, 16);
        var encoder = bert ? ModelGenerator.Bert(shape, 5) : ModelGenerator.BagOfEmbeddings(12, 8, 5);
        var w = new ModelGenerator.Weights(9, 0.5f);
        var weight = w.Normal(labels * 8);
        var bias = w.Normal(labels);
        var model = ModelGenerator.WithClassificationHead(encoder, weight, bias, labels);

        var outputs = Run(model, tokenTypes: bert);
        var hidden = bert ? ReferenceBert(encoder, shape) : Run(encoder, tokenTypes: false)[ModelGenerator.LastHiddenState];
        var expected = new float[Batch * labels];
        for (var b = 0; b < Batch; b++)
        {
            var pooled = new float[8];
            var count = 0;
            for (var s = 0; s < Sequence; s++)
            {
                if (Mask[(b * Sequence) + s] == 0)
                {
                    continue;
                }

                count++;
                for (var d = 0; d < 8; d++)
                {
                    pooled[d] += hidden[(((b * Sequence) + s) * 8) + d];
                }
            }

            var logits = new float[labels];
            for (var l = 0; l < labels; l++)
            {
                logits[l] = bias[l];
                for (var d = 0; d < 8; d++)
                {
                    logits[l] += weight[(l * 8) + d] * pooled[d] / count;
                }
            }

            var max = logits.Max();
            var sum = logits.Sum(v => MathF.Exp(v - max));
            for (var l = 0; l < labels; l++)
            {
                expected[(b * labels) + l] = MathF.Exp(logits[l] - max) / sum;
            }
        }

        Close(expected, outputs[ModelGenerator.Probabilities]);
        Assert.Equal(2, outputs[ModelGenerator.Probabilities].Chunk(labels).Count(row => Math.Abs(row.Sum() - 1) < 1e-5));
        Assert.Equal(Batch * labels, outputs[ModelGenerator.Logits].Length);
    }

    [Fact]
    public void A_minilm_shaped_encoder_loads_and_runs()
    {
        var model = ModelGenerator.Bert(EncoderShape.MiniLm, seed: 1);
        var output = Run(model, tokenTypes: true)[ModelGenerator.LastHiddenState];
        Assert.Equal(Batch * Sequence * 384, output.Length);
        Assert.All(output, v => Assert.True(float.IsFinite(v)));
    }

    /// <summary>The BERT forward pass written out in plain loops, using the model's own weights.</summary>
    private static float[] ReferenceBert(ModelProto model, EncoderShape shape)
    {
        var h = shape.Hidden;
        float[] W(string name) => Weight(model, name);
        var x = new float[Batch * Sequence * h];
        var words = W("embeddings.word_embeddings.weight");
        var positions = W("embeddings.position_embeddings.weight");
        var types = W("embeddings.token_type_embeddings.weight");
        for (var b = 0; b < Batch; b++)
        {
            for (var s = 0; s < Sequence; s++)
            {
                var t = (b * Sequence) + s;
                for (var d = 0; d < h; d++)
                {
                    x[(t * h) + d] = words[(Ids[t] * h) + d] + positions[(s * h) + d] + types[(Types[t] * h) + d];
                }
            }
        }

        x = Norm(x, W("embeddings.LayerNorm.weight"), W("embeddings.LayerNorm.bias"), h);
        var heads = shape.Heads;
        var size = h / heads;
        for (var layer = 0; layer < shape.Layers; layer++)
        {
            var p = $"encoder.layer.{layer}";
            var q = Dense(x, W($"{p}.attention.self.query.weight"), W($"{p}.attention.self.query.bias"), h, h);
            var k = Dense(x, W($"{p}.attention.self.key.weight"), W($"{p}.attention.self.key.bias"), h, h);
            var v = Dense(x, W($"{p}.attention.self.value.weight"), W($"{p}.attention.self.value.bias"), h, h);
            var context = new float[x.Length];
            for (var b = 0; b < Batch; b++)
            {
                for (var head = 0; head < heads; head++)
                {
                    for (var i = 0; i < Sequence; i++)
                    {
                        var scores = new float[Sequence];
                        for (var j = 0; j < Sequence; j++)
                        {
                            var dot = 0f;
                            for (var d = 0; d < size; d++)
                            {
                                dot += q[(((b * Sequence) + i) * h) + (head * size) + d] * k[(((b * Sequence) + j) * h) + (head * size) + d];
                            }

                            scores[j] = (dot / MathF.Sqrt(size)) + ((1 - Mask[(b * Sequence) + j]) * -10000f);
                        }

                        var max = scores.Max();
                        var sum = scores.Sum(s => MathF.Exp(s - max));
                        for (var j = 0; j < Sequence; j++)
                        {
                            var weight = MathF.Exp(scores[j] - max) / sum;
                            for (var d = 0; d < size; d++)
                            {
                                context[(((b * Sequence) + i) * h) + (head * size) + d] += weight * v[(((b * Sequence) + j) * h) + (head * size) + d];
                            }
                        }
                    }
                }
            }

            var attention = Norm(Add(Dense(context, W($"{p}.attention.output.dense.weight"), W($"{p}.attention.output.dense.bias"), h, h), x),
                W($"{p}.attention.output.LayerNorm.weight"), W($"{p}.attention.output.LayerNorm.bias"), h);
            var intermediate = Dense(attention, W($"{p}.intermediate.dense.weight"), W($"{p}.intermediate.dense.bias"), h, shape.Intermediate)
                .Select(value => 0.5f * value * (1 + Erf(value / MathF.Sqrt(2)))).ToArray();
            x = Norm(Add(Dense(intermediate, W($"{p}.output.dense.weight"), W($"{p}.output.dense.bias"), shape.Intermediate, h), attention),
                W($"{p}.output.LayerNorm.weight"), W($"{p}.output.LayerNorm.bias"), h);
        }

        return x;
    }

    private static float[] Dense(float[] x, float[] weight, float[] bias, int inFeatures, int outFeatures)
    {
        var rows = x.Length / inFeatures;
        var y = new float[rows * outFeatures];
        for (var r = 0; r < rows; r++)
        {
            for (var o = 0; o < outFeatures; o++)
            {
                var sum = bias[o];
                for (var i = 0; i < inFeatures; i++)
                {
                    sum += x[(r * inFeatures) + i] * weight[(i * outFeatures) + o];
                }

                y[(r * outFeatures) + o] = sum;
            }
        }

        return y;
    }

    private static float[] Add(float[] a, float[] b) => [.. a.Zip(b, (x, y) => x + y)];

    private static float[] Norm(float[] x, float[] gamma, float[] beta, int h)
    {
        var y = new float[x.Length];
        for (var r = 0; r < x.Length / h; r++)
        {
            var row = x.AsSpan(r * h, h);
            var mean = 0f;
            foreach (var value in row)
            {
                mean += value / h;
            }

            var variance = 0f;
            foreach (var value in row)
            {
                variance += (value - mean) * (value - mean) / h;
            }

            for (var d = 0; d < h; d++)
            {
                y[(r * h) + d] = ((row[d] - mean) / MathF.Sqrt(variance + 1e-12f) * gamma[d]) + beta[d];
            }
        }

        return y;
    }

    /// <summary>erf by Abramowitz and Stegun 7.1.26 (error below 1.5e-7).</summary>
    private static float Erf(float x)
    {
        var sign = Math.Sign(x);
        var ax = Math.Abs((double)x);
        var t = 1 / (1 + (0.3275911 * ax));
        var polynomial = ((((((((1.061405429 * t) - 1.453152027) * t) + 1.421413741) * t) - 0.284496736) * t) + 0.254829592) * t;
        var y = 1 - (polynomial * Math.Exp(-ax * ax));
        return (float)(sign * y);
    }
}
