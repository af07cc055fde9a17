using Pipeline.Models.Onnx;
using Pipeline.Models.Onnx.Proto;
using DataType = Pipeline.Models.Onnx.Proto.TensorProto.Types.DataType;

namespace Pipeline.Models.Quantization;

/// <summary>How weights are quantized. The defaults suit x64 CPUs with AVX2 and no VNNI (see <see cref="UnsignedWeights"/> and <see cref="ReduceRange"/>).</summary>
public sealed record QuantizationOptions
{
    /// <summary>One scale per output column of each weight (default), or one per weight.</summary>
    public bool PerChannel { get; init; } = true;

    /// <summary>
    /// int8 weights in 7 bits ([-63, 63]) instead of 8 (default true). ONNX Runtime's uint8 x int8 kernel on AVX2
    /// without VNNI adds pairs of products in 16 bits (<c>vpmaddubsw</c>), which saturates past 32,767;
    /// 255 x 63 x 2 stays under it. On VNNI or AVX-512 machines full range is exact and a little more precise.
    /// </summary>
    public bool ReduceRange { get; init; } = true;

    /// <summary>
    /// uint8 weights around a zero point of 128 (default true) rather than int8: ONNX Runtime's uint8 x uint8 kernel
    /// widens to 16 bits before multiplying, so it never saturates, at full 8-bit precision. On the real MiniLM it
    /// keeps the sentence embeddings at cosine 0.991 to fp32 where int8 weights in 7 bits reach 0.989, and runs
    /// a little slower than the uint8 x int8 kernel on AVX2 (see the README's benchmark).
    /// </summary>
    public bool UnsignedWeights { get; init; } = true;

    public string Describe() => UnsignedWeights
        ? $"uint8 symmetric around 128, {(PerChannel ? "per output channel" : "per tensor")}, range [1, 255]"
        : $"int8 symmetric, {(PerChannel ? "per output channel" : "per tensor")}, {(ReduceRange ? "7-bit range [-63, 63] (reduce range)" : "8-bit range [-127, 127]")}";
}

/// <summary>What <see cref="Int8Quantizer.Quantize"/> made: the graph and which nodes it changed.</summary>
public sealed record QuantizedGraph(ModelProto Model, List<string> QuantizedNodes, List<string> FloatMatMuls);

/// <summary>
/// Dynamic int8 quantization of an ONNX graph, over the project's own ONNX model (no Python tools exist here).
/// Every <c>MatMul</c> whose second input is a constant float matrix, and every <c>Gemm</c> with a constant
/// weight, becomes <c>DynamicQuantizeLinear</c> (the activation to uint8 at run time, one scale per tensor,
/// one node per activation however many weights read it) + <c>MatMulInteger</c> (int8 weights) + <c>Cast</c>
/// + <c>Mul</c> by the product of the two scales, then the bias <c>Add</c>: the standard-op form ONNX
/// Runtime's CPU provider fuses into <c>MatMulIntegerToFloat</c> / <c>DynamicQuantizeMatMul</c> (U8U8 by default, U8S8 with int8 weights).
/// What stays fp32, and why: <c>MatMul</c>s of two activations (attention scores and context: quantizing them
/// costs a quantization of both operands per call for little gain at short sequences), embedding tables
/// (<c>Gather</c>: a lookup, no arithmetic to save), LayerNormalization, Softmax, GELU and every other op.
/// </summary>
public static class Int8Quantizer
{
    public const string Prefix = "pipeline_int8/";
    public const string MetadataKey = "pipeline.quantization";
    public const string Scheme = "dynamic-int8";
    /// <summary>DynamicQuantizeLinear and MatMulInteger exist from opsets 11 and 10.</summary>
    public const int MinimumOpset = 11;
    /// <summary>The newest default-domain opset tested with ONNX Runtime 1.31 here.</summary>
    public const int MaximumOpset = 21;

    /// <summary>Ops that mean a graph is quantized already (standard and ONNX Runtime contrib ops).</summary>
    private static readonly HashSet<string> QuantizedOps =
    [
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
        "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QGemm", "DynamicQuantizeLSTM", "MatMulNBits", "QOrderedMatMul",
    ];

    /// <exception cref="QuantizationRejectedException">The graph cannot be quantized; <see cref="QuantizationRejectedException.Code"/> says why.</exception>
    public static void EnsureQuantizable(ModelProto model) => Candidates(model);

    /// <exception cref="QuantizationRejectedException">The graph cannot be quantized; <see cref="QuantizationRejectedException.Code"/> says why.</exception>
    public static QuantizedGraph Quantize(ModelProto source, QuantizationOptions? options = null)
    {
        options ??= new QuantizationOptions();
        var model = source.Clone();
        var graph = model.Graph;
        var candidates = Candidates(model);
        var initializers = graph.Initializer.ToDictionary(t => t.Name);
        var scratch = new OnnxGraph(new GraphProto(), Prefix);
        var quantizedActivations = new Dictionary<string, string[]>();
        var quantizedWeights = new Dictionary<(string Name, bool Transposed), (string Values, string Scale, string? ZeroPoint)>();
        var nodes = new List<NodeProto>();
        var quantizedNodes = new List<string>();
        var floatMatMuls = new List<string>();
        var replacedOutputs = new HashSet<string>();
        foreach (var node in graph.Node)
        {
            if (!candidates.Contains(node))
            {
                if (node.OpType == "MatMul")
                {
                    floatMatMuls.Add(node.Name);
                }

                nodes.Add(node);
                continue;
            }

            var gemm = node.OpType == "Gemm";
            var transposed = gemm && Attribute(node, "transB") == 1;
            if (!quantizedActivations.TryGetValue(node.Input[0], out var activation))
            {
                activation = scratch.NodeWithOutputs("DynamicQuantizeLinear", [node.Input[0]], 3);
                quantizedActivations[node.Input[0]] = activation;
            }

            if (!quantizedWeights.TryGetValue((node.Input[1], transposed), out var weight))
            {
                weight = QuantizeWeight(scratch, initializers[node.Input[1]], transposed, options);
                quantizedWeights[(node.Input[1], transposed)] = weight;
            }

            string[] inputs = weight.ZeroPoint is { } zeroPoint ? [activation[0], weight.Values, activation[2], zeroPoint] : [activation[0], weight.Values, activation[2]];
            var product = scratch.Node("MatMulInteger", inputs);
            var scaled = scratch.Node("Mul", [scratch.Node("Cast", [product], ("to", (long)DataType.Float)), scratch.Node("Mul", [activation[1], weight.Scale])]);
            if (gemm && node.Input.Count > 2 && node.Input[2].Length > 0)
            {
                scaled = scratch.Node("Add", [scaled, node.Input[2]]);
            }

            scratch.Rename(scaled, node.Output[0]);
            nodes.AddRange(scratch.Proto.Node);
            scratch.Proto.Node.Clear();
            quantizedNodes.Add(node.Name.Length > 0 ? node.Name : $"{node.OpType}->{node.Output[0]}");
            replacedOutputs.Add(node.Output[0]);
        }

        // Bias first (as some exporters write Add(bias, x)) hides it from ONNX Runtime's fusion, which reads the bias as input 1.
        foreach (var add in nodes.Where(n => n.OpType == "Add" && n.Input.Count == 2 && replacedOutputs.Contains(n.Input[1]) && initializers.ContainsKey(n.Input[0])))
        {
            (add.Input[0], add.Input[1]) = (add.Input[1], add.Input[0]);
        }

        graph.Node.Clear();
        graph.Node.AddRange(nodes);
        graph.Initializer.AddRange(scratch.Proto.Initializer);
        var used = nodes.SelectMany(n => n.Input).ToHashSet();
        foreach (var unused in graph.Initializer.Where(t => !used.Contains(t.Name)).ToList())
        {
            graph.Initializer.Remove(unused);
        }

        // Old exports (IR < 4) also list weights as graph inputs.
        var remaining = graph.Initializer.Select(t => t.Name).ToHashSet();
        foreach (var input in graph.Input.Where(i => initializers.ContainsKey(i.Name) && !remaining.Contains(i.Name)).ToList())
        {
            graph.Input.Remove(input);
        }

        model.MetadataProps.Add(new StringStringEntryProto { Key = MetadataKey, Value = $"{Scheme}; weights {options.Describe()}; activations uint8 per tensor at run time" });
        return new QuantizedGraph(model, quantizedNodes, floatMatMuls);
    }

    /// <summary>The MatMul and Gemm nodes with a constant float weight matrix; refuses a graph that has none, is quantized already, or has another opset.</summary>
    private static HashSet<object?> Candidates(ModelProto model)
    {
        var opset = EncoderHead.DefaultOpset(model);
        if (opset is < MinimumOpset or > MaximumOpset)
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.UnsupportedOpset,
                $"The graph imports opset {opset} of the default domain; int8 quantization supports opsets {MinimumOpset} to {MaximumOpset} (DynamicQuantizeLinear needs 11). Export the model again with an opset in that range.");
        }

        var graph = model.Graph;
        var already = graph.Node.Where(n => QuantizedOps.Contains(n.OpType)).Select(n => n.OpType).Distinct().ToList();
        if (already.Count > 0 || model.MetadataProps.Any(p => p.Key == MetadataKey))
        {
            throw new QuantizationRejectedException(QuantizationErrorCodes.AlreadyQuantized,
                $"The graph is quantized already (it has {(already.Count > 0 ? string.Join(", ", already) + " nodes" : $"the {MetadataKey} mark")}). Quantize its fp32 source model instead.");
        }

        var initializers = graph.Initializer.ToDictionary(t => t.Name);
        TensorProto? Weight(string name) => initializers.TryGetValue(name, out var t) && t.DataType == (int)DataType.Float && t.Dims.Count == 2 ? t : null;
        var candidates = graph.Node.Where(n => n.Domain is "" or "ai.onnx" && Weight(n.Input.ElementAtOrDefault(1) ?? "") is not null && !initializers.ContainsKey(n.Input[0])
            && (n.OpType == "MatMul" || (n.OpType == "Gemm" && IsPlainGemm(n)))).ToHashSet(ReferenceEqualityComparer.Instance);
        return candidates.Count > 0 ? candidates
            : throw new QuantizationRejectedException(QuantizationErrorCodes.NoWeights,
                $"The graph has no MatMul or Gemm with a constant weight matrix to quantize (its ops: {string.Join(", ", graph.Node.Select(n => n.OpType).Distinct().Order())}); int8 would save nothing.");
    }

    /// <summary>A Gemm this rewrite keeps exact: A not transposed, alpha and beta 1.</summary>
    private static bool IsPlainGemm(NodeProto node) =>
        Attribute(node, "transA") == 0 && FloatAttribute(node, "alpha") == 1f && FloatAttribute(node, "beta") == 1f;

    private static long Attribute(NodeProto node, string name) => node.Attribute.FirstOrDefault(a => a.Name == name)?.I ?? 0;

    private static float FloatAttribute(NodeProto node, string name) => node.Attribute.FirstOrDefault(a => a.Name == name)?.F ?? 1f;

    /// <summary>
    /// A [K, N] weight (or a Gemm's [N, K] with transB) as int8 [K, N] with symmetric scales, one per output column
    /// (zero points are 0, so MatMulInteger needs none).
    /// </summary>
    private static (string Values, string Scale, string? ZeroPoint) QuantizeWeight(OnnxGraph graph, TensorProto tensor, bool transposed, QuantizationOptions options)
    {
        var values = OnnxGraph.Floats(tensor);
        var (k, n) = transposed ? ((int)tensor.Dims[1], (int)tensor.Dims[0]) : ((int)tensor.Dims[0], (int)tensor.Dims[1]);
        float At(int row, int column) => transposed ? values[column * k + row] : values[row * n + column];
        var limit = options.ReduceRange && !options.UnsignedWeights ? 63f : 127f;
        var scales = new float[options.PerChannel ? n : 1];
        for (var column = 0; column < n; column++)
        {
            var max = 0f;
            for (var row = 0; row < k; row++)
            {
                max = Math.Max(max, Math.Abs(At(row, column)));
            }

            var index = options.PerChannel ? column : 0;
            scales[index] = Math.Max(scales[index], max);
        }

        for (var i = 0; i < scales.Length; i++)
        {
            scales[i] = scales[i] > 0 ? scales[i] / limit : 1f;
        }

        var quantized = new sbyte[k * n];
        var offset = options.UnsignedWeights ? 128 : 0;
        for (var row = 0; row < k; row++)
        {
            for (var column = 0; column < n; column++)
            {
                var q = (int)Math.Clamp(MathF.Round(At(row, column) / scales[options.PerChannel ? column : 0], MidpointRounding.ToEven), -limit, limit);
                // uint8 values are stored through the same bytes: q + 128 in [1, 255].
                quantized[row * n + column] = unchecked((sbyte)(byte)(q + offset));
            }
        }

        var name = Prefix + tensor.Name + (transposed ? ".transposed" : "");
        var scale = options.PerChannel ? graph.Initializer(name + ".scale", scales, n) : graph.Scalar(name + ".scale", scales[0]);
        if (!options.UnsignedWeights)
        {
            return (graph.Int8(name + ".int8", quantized, false, k, n), scale, null);
        }

        var zeroPoints = Enumerable.Repeat(unchecked((sbyte)(byte)128), options.PerChannel ? n : 1).ToArray();
        return (graph.Int8(name + ".uint8", quantized, true, k, n), scale,
            options.PerChannel ? graph.Int8(name + ".zero_point", zeroPoints, true, n) : graph.Int8(name + ".zero_point", zeroPoints, true));
    }
}

public static class QuantizationErrorCodes
{
    public const string NoWeights = "NoWeights";
    public const string AlreadyQuantized = "AlreadyQuantized";
    public const string UnsupportedOpset = "UnsupportedOpset";
    public const string ModelNotFound = "ModelNotFound";
    public const string NoValidationData = "NoValidationData";
    /// <summary>The output id is the source itself, or another model that is not an int8 copy of this source.</summary>
    public const string OutputTaken = "OutputTaken";
    public const string TokenizerMismatch = "TokenizerMismatch";
}

/// <summary>A model that cannot be quantized as asked: <see cref="Code"/> and a message that says what to do.</summary>
public sealed class QuantizationRejectedException(string code, string message) : Exception(message)
{
    public string Code { get; } = code;
}
