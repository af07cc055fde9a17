using Google.Protobuf;
using Pipeline.Models.Onnx.Proto;

namespace Pipeline.Models.Onnx;

/// <summary>
/// Builds an ONNX graph node by node: float initializers, typed inputs and outputs with symbolic
/// dimensions, and operators from the default domain (opset 17). <see cref="ToModel"/> wraps it in a
/// model any ONNX runtime loads.
/// </summary>
public sealed class OnnxGraph
{
    /// <summary>
    /// Opset 17: standard LayerNormalization. (At opset 12 ONNX Runtime 1.31 fuses the attention subgraph into its
    /// Attention kernel, but that measured no faster on CPU here and LayerNormalization is then ORT-only.)
    /// </summary>
    public const int Opset = 17;
    private readonly GraphProto _graph;
    private readonly string _prefix;
    private int _next;

    public OnnxGraph(string name)
        : this(new GraphProto { Name = name })
    {
    }

    /// <summary>
    /// Appends to an existing graph. New node and value names continue after the existing ones, and start with
    /// <paramref name="prefix"/> when one is given (so they cannot collide with the names an exporter chose).
    /// </summary>
    public OnnxGraph(GraphProto graph, string prefix = "")
    {
        _graph = graph;
        _prefix = prefix;
        _next = graph.Node.Count;
    }

    public GraphProto Proto => _graph;

    /// <summary>A float tensor of weights.</summary>
    public string Initializer(string name, float[] values, params long[] dims)
    {
        var tensor = new TensorProto { Name = name, DataType = (int)TensorProto.Types.DataType.Float };
        tensor.Dims.AddRange(dims);
        var bytes = new byte[values.Length * sizeof(float)];
        Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length);
        tensor.RawData = ByteString.CopyFrom(bytes);
        _graph.Initializer.Add(tensor);
        return name;
    }

    /// <summary>An int8 (or, with <paramref name="unsigned"/>, uint8: the same bytes) tensor of quantized weights; no dims: a scalar.</summary>
    public string Int8(string name, sbyte[] values, bool unsigned = false, params long[] dims)
    {
        var tensor = new TensorProto { Name = name, DataType = (int)(unsigned ? TensorProto.Types.DataType.Uint8 : TensorProto.Types.DataType.Int8) };
        tensor.Dims.AddRange(dims);
        tensor.RawData = ByteString.CopyFrom(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()));
        _graph.Initializer.Add(tensor);
        return name;
    }

    /// <summary>The values of a float tensor, stored as raw bytes or as float_data.</summary>
    public static float[] Floats(TensorProto tensor)
    {
        if (tensor.DataType != (int)TensorProto.Types.DataType.Float)
        {
            throw new ArgumentException($"Tensor {tensor.Name} holds data type {tensor.DataType}, not float.");
        }

        if (tensor.FloatData.Count > 0)
        {
            return [.. tensor.FloatData];
        }

        var values = new float[tensor.RawData.Length / sizeof(float)];
        Buffer.BlockCopy(tensor.RawData.ToByteArray(), 0, values, 0, values.Length * sizeof(float));
        return values;
    }

    /// <summary>An int64 constant tensor (shapes, axes).</summary>
    public string Int64(string name, params long[] values)
    {
        var tensor = new TensorProto { Name = name, DataType = (int)TensorProto.Types.DataType.Int64 };
        tensor.Dims.Add(values.Length);
        tensor.Int64Data.AddRange(values);
        _graph.Initializer.Add(tensor);
        return name;
    }

    /// <summary>A scalar int64 constant.</summary>
    public string Int64Scalar(string name, long value)
    {
        var tensor = new TensorProto { Name = name, DataType = (int)TensorProto.Types.DataType.Int64 };
        tensor.Int64Data.Add(value);
        _graph.Initializer.Add(tensor);
        return name;
    }

    /// <summary>A scalar float constant.</summary>
    public string Scalar(string name, float value)
    {
        var tensor = new TensorProto { Name = name, DataType = (int)TensorProto.Types.DataType.Float };
        tensor.FloatData.Add(value);
        _graph.Initializer.Add(tensor);
        return name;
    }

    public void Input(string name, TensorProto.Types.DataType type, params object[] dims) => _graph.Input.Add(Value(name, type, dims));

    public void Output(string name, TensorProto.Types.DataType type, params object[] dims) => _graph.Output.Add(Value(name, type, dims));

    /// <summary>Adds a node and returns the name of its (first) output.</summary>
    public string Node(string opType, string[] inputs, params (string Name, object Value)[] attributes) =>
        NodeWithOutputs(opType, inputs, 1, attributes)[0];

    public string[] NodeWithOutputs(string opType, string[] inputs, int outputs, params (string Name, object Value)[] attributes)
    {
        var node = new NodeProto { OpType = opType, Name = $"{_prefix}{opType}_{_next}" };
        node.Input.AddRange(inputs);
        var names = Enumerable.Range(0, outputs).Select(i => $"{_prefix}{opType.ToLowerInvariant()}_{_next}_{i}").ToArray();
        _next++;
        node.Output.AddRange(names);
        foreach (var (attributeName, value) in attributes)
        {
            node.Attribute.Add(Attribute(attributeName, value));
        }

        _graph.Node.Add(node);
        return names;
    }

    /// <summary>Renames the output of the last node (to give graph outputs their public names).</summary>
    public string Rename(string from, string to)
    {
        foreach (var node in _graph.Node)
        {
            for (var i = 0; i < node.Output.Count; i++)
            {
                if (node.Output[i] == from)
                {
                    node.Output[i] = to;
                }
            }

            for (var i = 0; i < node.Input.Count; i++)
            {
                if (node.Input[i] == from)
                {
                    node.Input[i] = to;
                }
            }
        }

        return to;
    }

    public ModelProto ToModel(IReadOnlyDictionary<string, string>? metadata = null)
    {
        var model = new ModelProto { IrVersion = 8, ProducerName = "Pipeline", ProducerVersion = "1", Graph = _graph };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = Opset });
        foreach (var (key, value) in metadata ?? new Dictionary<string, string>())
        {
            model.MetadataProps.Add(new StringStringEntryProto { Key = key, Value = value });
        }

        return model;
    }

    private static ValueInfoProto Value(string name, TensorProto.Types.DataType type, object[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var dim in dims)
        {
            shape.Dim.Add(dim is string symbol ? new TensorShapeProto.Types.Dimension { DimParam = symbol } : new TensorShapeProto.Types.Dimension { DimValue = Convert.ToInt64(dim) });
        }

        return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } } };
    }

    private static AttributeProto Attribute(string name, object value) => value switch
    {
        long i => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = i },
        int i => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = i },
        float f => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Float, F = f },
        long[] ints => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Ints, Ints = { ints } },
        _ => throw new ArgumentException($"Unsupported attribute value {value.GetType().Name} for {name}."),
    };
}
