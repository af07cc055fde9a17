using System.Diagnostics;
using System.Threading.Channels;
using Microsoft.ML.OnnxRuntime;
using Pipeline.Models;

namespace Pipeline.Inference;

/// <summary>A row's prediction (probabilities or embedding) and the tokens it took, or why it has none.</summary>
public readonly record struct ScoredRow(float[]? Values, string? Code, string? Error, int Tokens = 0);

/// <summary>What scoring a list of rows cost.</summary>
public sealed record ScoreStats(long Tokens, long Slots, int Batches, double TokenizeMs, double InferenceMs);

/// <summary>
/// Scores rows with a model: rows are tokenized a chunk ahead of the model (tokenization overlaps
/// inference), each chunk is sorted by length so that batches carry almost no padding, and batches are
/// sized dynamically by token slots. A row the model cannot take fails alone, never its batch.
/// </summary>
public sealed class BatchScorer(ModelRuntime model, InferenceSettings settings, int maxTokensPerBatch, bool normalize)
{
    private readonly string[] _inputNames = [.. model.Manifest.Inputs];
    private readonly string[] _outputNames = [model.Manifest.Output];
    private long[] _ids = [];
    private long[] _mask = [];
    private long[] _types = [];

    private sealed record Chunk(List<(int Index, int[] Ids)> Rows);

    /// <summary>Scores rows given as token ids (already tokenized, for example a prepared dataset's shards).</summary>
    public Task<(ScoredRow[] Rows, ScoreStats Stats)> ScoreTokensAsync(IReadOnlyList<int[]> ids, CancellationToken cancellationToken) =>
        ScoreAsync(ids.Count, (_, i) => ids[i].Length <= model.Manifest.MaxSequenceLength ? ids[i] : ids[i][..model.Manifest.MaxSequenceLength], cancellationToken);

    public Task<(ScoredRow[] Rows, ScoreStats Stats)> ScoreAsync(IReadOnlyList<string?> texts, CancellationToken cancellationToken)
    {
        var ids = new List<int>(64);
        return ScoreAsync(texts.Count, (tokenizer, i) =>
        {
            if (texts[i] is not { } text)
            {
                return null;
            }

            tokenizer.Encode(text, ids);
            tokenizer.Truncate(ids, model.Manifest.MaxSequenceLength);
            return [.. ids];
        }, cancellationToken);
    }

    /// <summary>Scores <paramref name="count"/> rows whose token ids <paramref name="tokenize"/> gives (null: the row has no text).</summary>
    private async Task<(ScoredRow[] Rows, ScoreStats Stats)> ScoreAsync(int count, Func<Preprocessing.TextTokenizer, int, int[]?> tokenize, CancellationToken cancellationToken)
    {
        var outputs = new ScoredRow[count];
        var chunks = Channel.CreateBounded<Chunk>(new BoundedChannelOptions(2) { SingleReader = true, SingleWriter = true });
        double tokenizeMs = 0;
        var producer = Task.Run(async () =>
        {
            var tokenizer = model.RentTokenizer();
            var clock = new Stopwatch();
            try
            {
                var chunkRows = Math.Max(1, settings.ChunkRows);
                for (var start = 0; start < count; start += chunkRows)
                {
                    clock.Start();
                    var rows = new List<(int, int[])>(Math.Min(chunkRows, count - start));
                    for (var i = start; i < Math.Min(count, start + chunkRows); i++)
                    {
                        try
                        {
                            if (tokenize(tokenizer, i) is { } tokens)
                            {
                                rows.Add((i, tokens));
                            }
                        }
                        catch (Exception e) when (e is ArgumentException or InvalidOperationException)
                        {
                            outputs[i] = new ScoredRow(null, RowErrorCodes.TokenizerError, $"The tokenizer refused the text: {e.Message}");
                        }
                    }

                    // Stable sort by length: neighbours have (almost) the same length, so batches carry little padding.
                    rows.Sort((a, b) => a.Item2.Length != b.Item2.Length ? a.Item2.Length.CompareTo(b.Item2.Length) : a.Item1.CompareTo(b.Item1));
                    clock.Stop();
                    await chunks.Writer.WriteAsync(new Chunk(rows), cancellationToken);
                }
            }
            finally
            {
                tokenizeMs = clock.Elapsed.TotalMilliseconds;
                model.ReturnTokenizer(tokenizer);
                chunks.Writer.TryComplete();
            }
        }, cancellationToken);

        long tokens = 0, slots = 0;
        var batches = 0;
        var inference = new Stopwatch();
        try
        {
            await foreach (var chunk in chunks.Reader.ReadAllAsync(cancellationToken))
            {
                var rows = chunk.Rows;
                for (var start = 0; start < rows.Count;)
                {
                    // Grow the batch while the longest row (the last: rows are sorted) times the count fits the
                    // token budget, and padding stays under the cap (small batches cost little on CPU; padding does).
                    var size = 1;
                    long real = rows[start].Ids.Length;
                    while (start + size < rows.Count && size < settings.MaxBatchRows)
                    {
                        var next = rows[start + size].Ids.Length;
                        var budget = (long)(size + 1) * next;
                        if (budget > maxTokensPerBatch || budget - (real + next) > settings.MaxPaddingFraction * budget)
                        {
                            break;
                        }

                        real += next;
                        size++;
                    }

                    var sequence = rows[start + size - 1].Ids.Length;
                    await model.Gate.WaitAsync(cancellationToken);
                    inference.Start();
                    try
                    {
                        RunIsolated(rows, start, size, sequence, outputs);
                    }
                    finally
                    {
                        inference.Stop();
                        model.Gate.Release();
                    }

                    for (var i = start; i < start + size; i++)
                    {
                        tokens += rows[i].Ids.Length;
                    }

                    slots += (long)size * sequence;
                    batches++;
                    start += size;
                }
            }
        }
        finally
        {
            chunks.Writer.TryComplete();
            await producer.ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        }

        await producer;
        return (outputs, new ScoreStats(tokens, slots, batches, tokenizeMs, inference.Elapsed.TotalMilliseconds));
    }

    /// <summary>Runs a batch; if the model refuses it, runs its rows one by one so only the bad ones fail.</summary>
    private void RunIsolated(List<(int Index, int[] Ids)> rows, int start, int count, int sequence, ScoredRow[] outputs)
    {
        try
        {
            Run(rows, start, count, sequence, outputs);
        }
        catch (OnnxRuntimeException) when (count > 1)
        {
            for (var i = start; i < start + count; i++)
            {
                RunIsolated(rows, i, 1, rows[i].Ids.Length, outputs);
            }
        }
        catch (OnnxRuntimeException e)
        {
            outputs[rows[start].Index] = new ScoredRow(null, RowErrorCodes.ModelError, $"The model failed on this row: {e.Message.Split('\n')[0]}");
        }
    }

    private void Run(List<(int Index, int[] Ids)> rows, int start, int count, int sequence, ScoredRow[] outputs)
    {
        var size = count * sequence;
        if (_ids.Length < size)
        {
            _ids = new long[size];
            _mask = new long[size];
            _types = new long[size];
        }

        for (var r = 0; r < count; r++)
        {
            var ids = rows[start + r].Ids;
            var offset = r * sequence;
            for (var t = 0; t < sequence; t++)
            {
                var real = t < ids.Length;
                _ids[offset + t] = real ? ids[t] : model.Padding;
                _mask[offset + t] = real ? 1 : 0;
                _types[offset + t] = 0;
            }
        }

        long[] shape = [count, sequence];
        var values = new OrtValue[_inputNames.Length];
        try
        {
            for (var i = 0; i < _inputNames.Length; i++)
            {
                var buffer = _inputNames[i] switch
                {
                    ModelGenerator.InputIds => _ids,
                    ModelGenerator.AttentionMask => _mask,
                    _ => _types,
                };
                values[i] = OrtValue.CreateTensorValueFromMemory(OrtMemoryInfo.DefaultInstance, new Memory<long>(buffer, 0, size), shape);
            }

            using var results = model.Session.Run(model.RunOptions, _inputNames, values, _outputNames);
            var output = results[0];
            var dims = output.GetTensorTypeAndShape().Shape;
            var data = output.GetTensorDataAsSpan<float>();
            for (var r = 0; r < count; r++)
            {
                var index = rows[start + r].Index;
                var vector = Extract(data, dims, r, rows[start + r].Ids.Length);
                outputs[index] = vector.All(float.IsFinite)
                    ? new ScoredRow(vector, null, null, rows[start + r].Ids.Length)
                    : new ScoredRow(null, RowErrorCodes.ModelError, "The model produced a value that is not a finite number (NaN or infinity) for this row.");
            }
        }
        finally
        {
            foreach (var value in values)
            {
                value?.Dispose();
            }
        }
    }

    /// <summary>
    /// One row's vector from the output: probabilities (softmax of logits), or a pooled, optionally normalized
    /// embedding: the pooling <see cref="EncoderHead"/> puts in a fine-tuned model's graph (a test keeps them equal).
    /// </summary>
    private float[] Extract(ReadOnlySpan<float> data, long[] dims, int row, int length)
    {
        var manifest = model.Manifest;
        float[] vector;
        if (dims.Length == 3)
        {
            // last_hidden_state [batch, sequence, hidden]: pool over the row's real tokens.
            var sequence = (int)dims[1];
            var hidden = (int)dims[2];
            vector = new float[hidden];
            var rowData = data.Slice(row * sequence * hidden, sequence * hidden);
            if (manifest.Pooling == Pooling.Cls)
            {
                rowData[..hidden].CopyTo(vector);
            }
            else if (manifest.Pooling == Pooling.Max)
            {
                rowData[..hidden].CopyTo(vector);
                for (var t = 1; t < length; t++)
                {
                    var token = rowData.Slice(t * hidden, hidden);
                    for (var h = 0; h < hidden; h++)
                    {
                        vector[h] = Math.Max(vector[h], token[h]);
                    }
                }
            }
            else
            {
                for (var t = 0; t < length; t++)
                {
                    var token = rowData.Slice(t * hidden, hidden);
                    for (var h = 0; h < hidden; h++)
                    {
                        vector[h] += token[h];
                    }
                }

                for (var h = 0; h < hidden; h++)
                {
                    vector[h] /= length;
                }
            }
        }
        else
        {
            var width = (int)dims[1];
            vector = data.Slice(row * width, width).ToArray();
        }

        if (manifest.Output == ModelGenerator.Logits)
        {
            Softmax(vector);
        }
        else if (normalize && manifest.Task == ModelTasks.Embedding)
        {
            var norm = MathF.Sqrt(vector.Sum(v => v * v));
            for (var i = 0; i < vector.Length && norm > 0; i++)
            {
                vector[i] /= norm;
            }
        }

        return vector;
    }

    private static void Softmax(float[] values)
    {
        var max = values.Max();
        var sum = 0f;
        for (var i = 0; i < values.Length; i++)
        {
            values[i] = MathF.Exp(values[i] - max);
            sum += values[i];
        }

        for (var i = 0; i < values.Length; i++)
        {
            values[i] /= sum;
        }
    }
}
