using System.IO.Hashing;
using System.Runtime.InteropServices;

namespace Pipeline.Preprocessing;

/// <summary>
/// Near-duplicate detection with MinHash signatures over word shingles and locality-sensitive hashing
/// (bands of rows), so each record is compared only with the few earlier records it shares a band
/// with: near-linear in the number of records. Signatures are computed in parallel (<see cref="Signature"/>,
/// thread-safe); <see cref="FindOrAdd"/> runs in record order so the first of a group is the one kept.
/// Memory: 2 bytes per permutation per record (b-bit MinHash) plus one table entry per band per record.
/// </summary>
public sealed class NearDuplicateIndex
{
    private readonly int _permutations;
    private readonly int _shingle;
    private readonly double _threshold;
    private readonly ulong[] _multipliers;
    private readonly ulong[] _offsets;
    private readonly List<ushort[]> _signatures = [];
    private readonly Dictionary<ulong, int> _buckets = [];

    public NearDuplicateIndex(DedupOptions options)
    {
        _permutations = options.Permutations;
        _shingle = options.Shingle;
        _threshold = options.Threshold;
        (Bands, Rows) = ChooseBands(options.Permutations, options.Threshold);
        var random = new Random(20261126);
        _multipliers = new ulong[_permutations];
        _offsets = new ulong[_permutations];
        for (var i = 0; i < _permutations; i++)
        {
            _multipliers[i] = (ulong)random.NextInt64() | 1;
            _offsets[i] = (ulong)random.NextInt64();
        }
    }

    public int Bands { get; }
    public int Rows { get; }

    /// <summary>A record's MinHash signature (full 32-bit minimums; banding uses them, storage keeps 16 bits).</summary>
    public uint[] Signature(string text)
    {
        var minimums = new uint[_permutations];
        Array.Fill(minimums, uint.MaxValue);
        var words = text.ToLowerInvariant().Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
        var count = Math.Max(1, words.Length - _shingle + 1);
        for (var start = 0; start < count; start++)
        {
            var shingle = string.Join(' ', words, start, Math.Min(_shingle, words.Length - start));
            var hash = XxHash3.HashToUInt64(MemoryMarshal.AsBytes(shingle.AsSpan()));
            for (var p = 0; p < _permutations; p++)
            {
                var value = (uint)(((hash ^ _offsets[p]) * _multipliers[p]) >> 32);
                if (value < minimums[p])
                {
                    minimums[p] = value;
                }
            }
        }

        return minimums;
    }

    /// <summary>
    /// The index of an earlier record this one nearly duplicates (estimated Jaccard at or above the
    /// threshold), or -1 after adding it as a new record. <paramref name="index"/> is the caller's record number.
    /// </summary>
    public int FindOrAdd(uint[] signature, out double similarity)
    {
        similarity = 0;
        Span<ulong> keys = stackalloc ulong[Bands];
        for (var band = 0; band < Bands; band++)
        {
            var bytes = MemoryMarshal.AsBytes(signature.AsSpan(band * Rows, Rows));
            keys[band] = XxHash3.HashToUInt64(bytes, band);
            if (_buckets.TryGetValue(keys[band], out var candidate))
            {
                var estimate = Similarity(signature, _signatures[candidate]);
                if (estimate >= _threshold)
                {
                    similarity = estimate;
                    return candidate;
                }
            }
        }

        var stored = new ushort[_permutations];
        for (var p = 0; p < _permutations; p++)
        {
            stored[p] = (ushort)signature[p];
        }

        _signatures.Add(stored);
        var id = _signatures.Count - 1;
        foreach (var key in keys)
        {
            _buckets.TryAdd(key, id);
        }

        return -1;
    }

    private double Similarity(uint[] signature, ushort[] other)
    {
        var equal = 0;
        for (var p = 0; p < _permutations; p++)
        {
            if ((ushort)signature[p] == other[p])
            {
                equal++;
            }
        }

        // b-bit MinHash: unrelated values still collide with probability 2^-16.
        const double chance = 1.0 / 65536;
        return Math.Max(0, ((double)equal / _permutations - chance) / (1 - chance));
    }

    /// <summary>Bands × rows = permutations, with the LSH threshold (1/b)^(1/r) just below the requested one (favouring recall).</summary>
    public static (int Bands, int Rows) ChooseBands(int permutations, double threshold)
    {
        var best = (Bands: permutations, Rows: 1);
        var bestDistance = double.MaxValue;
        for (var rows = 1; rows <= permutations; rows++)
        {
            if (permutations % rows != 0)
            {
                continue;
            }

            var bands = permutations / rows;
            var lshThreshold = Math.Pow(1.0 / bands, 1.0 / rows);
            var distance = lshThreshold <= threshold ? threshold - lshThreshold : 2 * (lshThreshold - threshold);
            if (distance < bestDistance)
            {
                bestDistance = distance;
                best = (bands, rows);
            }
        }

        return best;
    }
}
