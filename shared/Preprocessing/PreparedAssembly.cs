using System.IO.Hashing;
using System.Runtime.InteropServices;
using Pipeline.Ingestion;

namespace Pipeline.Preprocessing;

/// <summary>
/// The order-dependent end of a build: kept records, given in source order, are split into train and
/// validation (seeded, stratified by label), packed when asked, written to shards and counted. The single
/// pass and the assembly of partitions both feed it, so their shards and statistics are the same bytes.
/// </summary>
internal sealed class PreparedAssembly : IAsyncDisposable
{
    private readonly PreprocessRecipe _recipe;
    private readonly List<string> _labels;
    private readonly bool _packed;
    private readonly int _endOfText;
    private readonly long[] _histogram;
    private readonly Dictionary<int, (long Seen, long Validation)> _seen = [];
    private readonly ShardWriter _train;
    private readonly ShardWriter _validation;
    private readonly List<int>[] _packBuffers = [new List<int>(), new List<int>()];
    /// <summary>Records per label id in each split (train, validation), and the order the labels first appeared in.</summary>
    private readonly long[][] _labelCounts;
    private readonly List<int>[] _labelOrder = [[], []];

    public PreparedAssembly(PreprocessRecipe recipe, ShardSink output, string folder, List<string> labels, bool packed, int endOfText)
    {
        _recipe = recipe;
        _labels = labels;
        _packed = packed;
        _endOfText = endOfText;
        _histogram = new long[recipe.MaxSequenceLength + 2];
        _labelCounts = [new long[labels.Count], new long[labels.Count]];
        _train = new ShardWriter(output, folder, "train", recipe.ShardRecords);
        _validation = new ShardWriter(output, folder, "validation", recipe.ShardRecords);
        Stats = new PreparedStats { Lengths = new LengthPercentiles(0, 0, 0, 0, 0, 0), Epochs = recipe.Epochs, CostPerMillionTokens = recipe.CostPerMillionTokens };
    }

    /// <summary>The statistics so far; the caller counts what happens before a record is kept (reads, duplicates, redactions).</summary>
    public PreparedStats Stats { get; }

    /// <summary>Tokens written so far (for progress).</summary>
    public long Tokens => Stats.Train.Tokens + Stats.Validation.Tokens;

    /// <summary>Adds the next kept record in source order (no await unless the shard writer has a block to hand over).</summary>
    public ValueTask AddAsync(ReadOnlyMemory<int> tokens, int? label, int? promptLength, bool truncated, ulong key, long line, CancellationToken cancellationToken)
    {
        var toValidation = AssignToValidation(label, key);
        var s = toValidation ? 1 : 0;
        var split = toValidation ? Stats.Validation : Stats.Train;
        split.Records++;
        if (label is { } id && _labelCounts[s][id]++ == 0)
        {
            _labelOrder[s].Add(id);
        }

        if (truncated)
        {
            Stats.Truncated++;
        }

        if (_packed)
        {
            return PackAsync(s, split, tokens, line, cancellationToken);
        }

        split.Tokens += tokens.Length;
        _histogram[Math.Min(tokens.Length, _histogram.Length - 1)]++;
        return (toValidation ? _validation : _train).WriteAsync(tokens, label, promptLength, line, cancellationToken);
    }

    private async ValueTask PackAsync(int s, SplitStats split, ReadOnlyMemory<int> tokens, long line, CancellationToken cancellationToken)
    {
        var buffer = _packBuffers[s];
        buffer.AddRange(tokens.Span);
        buffer.Add(_endOfText);
        while (buffer.Count >= _recipe.MaxSequenceLength)
        {
            await WriteBlockAsync(s == 1 ? _validation : _train, split, buffer, _recipe.MaxSequenceLength, line, cancellationToken);
        }
    }

    /// <summary>Writes what packing still holds, closes the last shards and completes the statistics.</summary>
    public async Task<BuildResult> CompleteAsync(DatasetManifest dataset, RedactionCounts redactions, CancellationToken cancellationToken)
    {
        if (_packed)
        {
            for (var s = 0; s < 2; s++)
            {
                if (_packBuffers[s].Count > 0)
                {
                    await WriteBlockAsync(s == 1 ? _validation : _train, s == 1 ? Stats.Validation : Stats.Train, _packBuffers[s], _packBuffers[s].Count, 0, cancellationToken);
                }
            }
        }

        await _train.CompleteAsync(cancellationToken);
        await _validation.CompleteAsync(cancellationToken);

        var stats = Stats;
        for (var s = 0; s < 2; s++)
        {
            // In the order each label first appeared in the split.
            foreach (var id in _labelOrder[s])
            {
                (s == 1 ? stats.Validation : stats.Train).Labels[_labels[id]] = _labelCounts[s][id];
            }
        }

        var kept = stats.Train.Records + stats.Validation.Records;
        stats.TruncatedFraction = kept == 0 ? 0 : Math.Round((double)stats.Truncated / kept, 6);
        stats.Redactions = new() { ["emails"] = redactions.Emails, ["phones"] = redactions.Phones, ["ipAddresses"] = redactions.IpAddresses };
        stats.IngestInvalidRecords = dataset.Counts.Invalid;
        stats.EstimatedTrainingTokens = stats.Train.Tokens * _recipe.Epochs;
        stats.EstimatedCost = Math.Round(stats.EstimatedTrainingTokens / 1e6 * _recipe.CostPerMillionTokens, 4);
        var finalStats = stats with { Lengths = Percentiles(_histogram) };
        return new BuildResult([.. _train.Shards, .. _validation.Shards], finalStats, _labels, _packed);
    }

    /// <summary>
    /// Deterministic, seeded split by record hash, stratified by label: within each label the validation
    /// share stays within one record of the fraction, and the hash decides inside that band. It depends on
    /// the order of records within each label, which is why records come here in source order.
    /// </summary>
    private bool AssignToValidation(int? label, ulong recordKey)
    {
        if (_recipe.ValidationFraction == 0)
        {
            return false;
        }

        var stratum = label ?? -1;
        ref var seen = ref CollectionsMarshal.GetValueRefOrAddDefault(_seen, stratum, out _);
        var (n, v) = seen;
        var expected = _recipe.ValidationFraction * (n + 1);
        Span<byte> key = stackalloc byte[sizeof(ulong)];
        BitConverter.TryWriteBytes(key, recordKey);
        var u = XxHash3.HashToUInt64(key, _recipe.Seed) / (double)ulong.MaxValue;
        var toValidation = v + 1 <= Math.Floor(expected) - 1 || (v + 1 <= Math.Ceiling(expected) && u < _recipe.ValidationFraction);
        seen = (n + 1, v + (toValidation ? 1 : 0));
        return toValidation;
    }

    private async ValueTask WriteBlockAsync(ShardWriter writer, SplitStats split, List<int> buffer, int length, long line, CancellationToken cancellationToken)
    {
        var block = buffer.GetRange(0, length).ToArray();
        buffer.RemoveRange(0, length);
        split.Tokens += block.Length;
        _histogram[Math.Min(block.Length, _histogram.Length - 1)]++;
        Stats.PackedBlocks++;
        await writer.WriteAsync(block, null, null, line, cancellationToken);
    }

    private static LengthPercentiles Percentiles(long[] histogram)
    {
        var total = histogram.Sum();
        if (total == 0)
        {
            return new LengthPercentiles(0, 0, 0, 0, 0, 0);
        }

        int At(double q)
        {
            var target = (long)Math.Ceiling(q * total);
            long running = 0;
            for (var length = 0; length < histogram.Length; length++)
            {
                running += histogram[length];
                if (running >= target)
                {
                    return length;
                }
            }

            return histogram.Length - 1;
        }

        var max = Array.FindLastIndex(histogram, c => c > 0);
        var mean = histogram.Select((count, length) => (double)count * length).Sum() / total;
        return new LengthPercentiles(At(0.5), At(0.9), At(0.95), At(0.99), max, Math.Round(mean, 2));
    }

    public async ValueTask DisposeAsync()
    {
        await _train.DisposeAsync();
        await _validation.DisposeAsync();
    }
}
