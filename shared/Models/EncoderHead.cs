using Pipeline.Models.Onnx;
using Pipeline.Models.Onnx.Proto;
using DataType = Pipeline.Models.Onnx.Proto.TensorProto.Types.DataType;

namespace Pipeline.Models;

/// <summary>
/// Puts a pooled sentence vector, and a classification head on it, on top of any BERT-family ONNX export: the
/// graph Hugging Face tools give (symbolic or fixed dimensions, extra outputs such as the pooler's, with or
/// without <c>token_type_ids</c>, opsets 11 to 18, outputs <c>last_hidden_state</c>, <c>token_embeddings</c> or
/// <c>sentence_embedding</c>), or a <c>*ForSequenceClassification</c> export, whose own classifier is replaced.
/// The trainer computes its features with <see cref="Features"/> and ships <see cref="Classifier"/>: the same
/// nodes, so the shipped model gives the probabilities the trainer computed. The encoder's nodes, opset and
/// inputs are kept; new names start with <see cref="Prefix"/>; outputs and nodes no longer needed are removed
/// with the shapes the exporter recorded for them.
/// </summary>
public static class EncoderHead
{
    public const string Prefix = "pipeline_head/";
    public const string FeaturesOutput = "pipeline_features";
    public const string TokenEmbeddings = "token_embeddings";
    public const string SentenceEmbedding = "sentence_embedding";
    /// <summary>Outputs a base can give, in the order a base's features are taken from.</summary>
    public static readonly string[] BaseOutputs = [SentenceEmbedding, ModelGenerator.LastHiddenState, TokenEmbeddings, ModelGenerator.Logits];

    /// <summary>The encoder with one output, <see cref="FeaturesOutput"/> [batch, hidden]: the pooled (and, when asked, L2-normalised) sentence vector.</summary>
    public static ModelProto Features(ModelProto encoder, Pooling pooling)
    {
        var (model, builder, features) = Pooled(encoder, pooling);
        builder.Rename(builder.Node("Identity", [features]), FeaturesOutput);
        Finish(model, [(FeaturesOutput, ["batch", "hidden"])]);
        return model;
    }

    /// <summary>The encoder, pooling, a linear layer (<paramref name="weight"/> is [labels, hidden] row-major) and softmax: outputs <c>logits</c> and <c>probabilities</c>.</summary>
    public static ModelProto Classifier(ModelProto encoder, Pooling pooling, float[] weight, float[] bias, int labels)
    {
        if (labels < 1 || weight.Length % labels != 0 || bias.Length != labels)
        {
            throw new ArgumentException($"A head for {labels} labels needs a weight of labels x hidden values and {labels} biases (got {weight.Length} and {bias.Length}).");
        }

        var hidden = weight.Length / labels;
        var (model, builder, features) = Pooled(encoder, pooling);
        var logits = builder.Node("Gemm", [features, builder.Initializer(Prefix + "classifier.weight", weight, labels, hidden), builder.Initializer(Prefix + "classifier.bias", bias, labels)], ("transB", 1L));
        builder.Rename(logits, ModelGenerator.Logits);
        builder.Rename(builder.Node("Softmax", [ModelGenerator.Logits], ("axis", -1L)), ModelGenerator.Probabilities);
        Finish(model, [(ModelGenerator.Logits, ["batch", labels]), (ModelGenerator.Probabilities, ["batch", labels])]);
        return model;
    }

    /// <summary>The opset of the graph's default domain (the form of Unsqueeze and the reductions depends on it).</summary>
    public static int DefaultOpset(ModelProto model) =>
        (int)model.OpsetImport.Where(o => o.Domain is "" or "ai.onnx").Select(o => o.Version).DefaultIfEmpty(OnnxGraph.Opset).First();

    private static (ModelProto Model, OnnxGraph Builder, string Features) Pooled(ModelProto encoder, Pooling pooling)
    {
        var model = encoder.Clone();
        var graph = model.Graph;
        var opset = DefaultOpset(model);
        if (!model.OpsetImport.Any(o => o.Domain is "" or "ai.onnx"))
        {
            model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = opset });
        }

        // Values and nodes the head adds are prefixed; the public output names must be free too (a classification
        // export's own logits are renamed, and removed with its classifier).
        var source = SourceOf(graph);
        foreach (var name in new[] { ModelGenerator.Logits, ModelGenerator.Probabilities, FeaturesOutput })
        {
            ReleaseName(graph, name);
        }

        var builder = new OnnxGraph(graph, Prefix);
        var features = source.Name;
        if (source.ElementType is not (0 or (int)DataType.Float))
        {
            features = builder.Node("Cast", [features], ("to", (long)DataType.Float));
        }

        if (source.Rank == 3)
        {
            // Token vectors [batch, sequence, hidden]: pool over the attention mask, as sentence-transformers does.
            if (!graph.Input.Any(i => i.Name == ModelGenerator.AttentionMask))
            {
                builder.Input(ModelGenerator.AttentionMask, DataType.Int64, "batch", "sequence");
            }

            var mask = Unsqueeze(builder, builder.Node("Cast", [ModelGenerator.AttentionMask], ("to", (long)DataType.Float)), 2, opset, Prefix + "mask_axes");
            features = pooling.Mode switch
            {
                Pooling.Cls => builder.Node("Gather", [features, builder.Int64Scalar(Prefix + "first_token", 0)], ("axis", 1L)),
                Pooling.Max => Reduce(builder, "ReduceMax", builder.Node("Add", [features, builder.Node("Mul", [builder.Node("Sub", [mask, builder.Scalar(Prefix + "one", 1f)]), builder.Scalar(Prefix + "large", 1e9f)])]),
                    1, keepDims: false, opset, Prefix + "max_axis"),
                _ => builder.Node("Div", [
                    Reduce(builder, "ReduceSum", builder.Node("Mul", [features, mask]), 1, keepDims: false, opset, Prefix + "sequence_axis"),
                    builder.Node("Max", [Reduce(builder, "ReduceSum", mask, 1, keepDims: false, opset, Prefix + "count_axis"), builder.Scalar(Prefix + "min_count", 1e-9f)])]),
            };
        }

        if (pooling.Normalize)
        {
            // x / max(|x|, 1e-12), as torch.nn.functional.normalize.
            var norm = builder.Node("Sqrt", [Reduce(builder, "ReduceSum", builder.Node("Mul", [features, features]), -1, keepDims: true, opset, Prefix + "norm_axis")]);
            features = builder.Node("Div", [features, builder.Node("Max", [norm, builder.Scalar(Prefix + "min_norm", 1e-12f)])]);
        }

        return (model, builder, features);
    }

    /// <summary>What the head reads: a graph output, or for a classification export the input of its classifier layer.</summary>
    private static (string Name, int Rank, int ElementType) SourceOf(GraphProto graph)
    {
        foreach (var name in BaseOutputs)
        {
            if (graph.Output.FirstOrDefault(o => o.Name == name) is not { } output)
            {
                continue;
            }

            var type = output.Type?.TensorType;
            var rank = type?.Shape?.Dim.Count is > 0 and var r ? r : name == SentenceEmbedding ? 2 : 3;
            if (name != ModelGenerator.Logits)
            {
                return (name, rank, type?.ElemType ?? 0);
            }

            return (ClassifierInput(graph), 2, 0);
        }

        throw new ModelRejectedException(
            $"The graph's outputs are [{string.Join(", ", graph.Output.Select(o => o.Name))}]; a base model needs last_hidden_state or token_embeddings (token vectors), sentence_embedding, or logits (a ForSequenceClassification export).");
    }

    /// <summary>The pooled vector a ForSequenceClassification export feeds its classifier (<c>Gemm</c>, or <c>MatMul</c> + <c>Add</c>).</summary>
    private static string ClassifierInput(GraphProto graph)
    {
        var initializers = graph.Initializer.Select(t => t.Name).ToHashSet();
        var producers = graph.Node.SelectMany(n => n.Output.Select(o => (Output: o, Node: n))).GroupBy(p => p.Output).ToDictionary(g => g.Key, g => g.First().Node);
        var node = producers.GetValueOrDefault(ModelGenerator.Logits);
        if (node?.OpType == "Gemm" && node.Input.Count >= 2 && initializers.Contains(node.Input[1]))
        {
            return node.Input[0];
        }

        if (node?.OpType == "Add" && node.Input.FirstOrDefault(i => !initializers.Contains(i)) is { } product
            && producers.GetValueOrDefault(product) is { OpType: "MatMul" } matMul && initializers.Contains(matMul.Input[1]))
        {
            return matMul.Input[0];
        }

        throw new ModelRejectedException("The graph's logits do not come from a linear classifier layer (Gemm, or MatMul then Add, with constant weights), so the features under it cannot be found. Export the encoder without its head (last_hidden_state).");
    }

    /// <summary>
    /// Makes <paramref name="outputs"/> the graph's only outputs, drops every node and weight they no longer need
    /// and the shapes the exporter recorded (value_info can disagree with the new graph; ONNX Runtime infers them).
    /// </summary>
    private static void Finish(ModelProto model, (string Name, object[] Dims)[] outputs)
    {
        var graph = model.Graph;
        var builder = new OnnxGraph(graph);
        graph.Output.Clear();
        foreach (var (name, dims) in outputs)
        {
            builder.Output(name, DataType.Float, dims);
        }

        graph.ValueInfo.Clear();
        // Subgraphs (If, Loop) may read outer values implicitly: such a graph is kept whole.
        if (graph.Node.Any(n => n.Attribute.Any(a => (int)a.Type is 5 or 10)))
        {
            return;
        }

        var needed = outputs.Select(o => o.Name).ToHashSet();
        var kept = new List<NodeProto>();
        for (var i = graph.Node.Count - 1; i >= 0; i--)
        {
            var node = graph.Node[i];
            if (node.Output.Any(needed.Contains))
            {
                kept.Add(node);
                needed.UnionWith(node.Input.Where(n => n.Length > 0));
            }
        }

        kept.Reverse();
        graph.Node.Clear();
        graph.Node.AddRange(kept);
        var unused = graph.Initializer.Where(t => !needed.Contains(t.Name)).ToList();
        foreach (var tensor in unused)
        {
            graph.Initializer.Remove(tensor);
        }

        // Old exports (IR < 4) list weights as graph inputs too.
        var removed = unused.Select(t => t.Name).ToHashSet();
        foreach (var input in graph.Input.Where(i => removed.Contains(i.Name)).ToList())
        {
            graph.Input.Remove(input);
        }
    }

    /// <summary>Renames a value to which an exporter gave a name the head's outputs need.</summary>
    private static void ReleaseName(GraphProto graph, string name)
    {
        if (!graph.Node.Any(n => n.Output.Contains(name)))
        {
            return;
        }

        new OnnxGraph(graph).Rename(name, Prefix + "original_" + name);
    }

    private static string Unsqueeze(OnnxGraph graph, string input, long axis, int opset, string axesName) => opset >= 13
        ? graph.Node("Unsqueeze", [input, graph.Int64(axesName, axis)])
        : graph.Node("Unsqueeze", [input], ("axes", new[] { axis }));

    /// <summary>A reduction in its opset's form: axes became an input at opset 13 (ReduceSum) and 18 (the others).</summary>
    private static string Reduce(OnnxGraph graph, string op, string input, long axis, bool keepDims, int opset, string axesName) =>
        opset >= (op == "ReduceSum" ? 13 : 18)
            ? graph.Node(op, [input, graph.Int64(axesName, axis)], ("keepdims", keepDims ? 1L : 0L))
            : graph.Node(op, [input], ("axes", new[] { axis }), ("keepdims", keepDims ? 1L : 0L));
}
