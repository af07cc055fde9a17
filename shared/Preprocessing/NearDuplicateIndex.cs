using System.IO.Hashing;
using System.Runtime.InteropServices;

namespace Pipeline.Preprocessing;

/// <summary>
/// MinHash over word shingles with locality-sensitive hashing (bands of rows): a record's signature, its
/// band keys and the similarity of two signatures. Shared by the single pass (<see cref="NearDuplicateIndex"/>)
/// and the partitioned steps (<see cref="NearDedupSteps"/>), so both find the same pairs. Thread-safe.
/// </summary>
public sealed class MinHasher
{
    private readonly int _shingle;
    private readonly ulong[] _multipliers;
    private readonly ulong[] _offsets;

    public MinHasher(DedupOptions options)
    {
        Permutations = options.Permutations;
        Threshold = options.Threshold;
        _shingle = options.Shingle;
        (Bands, Rows) = ChooseBands(options.Permutations, options.Threshold);
        var random = new Random(20261126);
        _multipliers = new ulong[Permutations];
        _offsets = new ulong[Permutations];
        for (var i = 0; i < Permutations; i++)
        {
            _multipliers[i] = (ulong)random.NextInt64() | 1;
            _offsets[i] = (ulong)random.NextInt64();
        }
    }

    public int Permutations { get; }
    public double Threshold { get; }
    public int Bands { get; }
    public int Rows { get; }

    /// <summary>A record's MinHash signature (full 32-bit minimums; banding uses them, storage keeps 16 bits).</summary>
    public uint[] Signature(string text)
    {
        var minimums = new uint[Permutations];
        Array.Fill(minimums, uint.MaxValue);
        var words = text.ToLowerInvariant().Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
        var count = Math.Max(1, words.Length - _shingle + 1);
        for (var start = 0; start < count; start++)
        {
            var shingle = string.Join(' ', words, start, Math.Min(_shingle, words.Length - start));
            var hash = XxHash3.HashToUInt64(MemoryMarshal.AsBytes(shingle.AsSpan()));
            for (var p = 0; p < Permutations; p++)
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

    /// <summary>The key of one band of a signature: records sharing a key are candidate pairs.</summary>
    public ulong BandKey(uint[] signature, int band) =>
        XxHash3.HashToUInt64(MemoryMarshal.AsBytes(signature.AsSpan(band * Rows, Rows)), band);

    /// <summary>The 16 bits of each minimum that are stored (b-bit MinHash).</summary>
    public static ushort[] Compact(uint[] signature)
    {
        var stored = new ushort[signature.Length];
        for (var p = 0; p < signature.Length; p++)
        {
            stored[p] = (ushort)signature[p];
        }

        return stored;
    }

    /// <summary>Estimated Jaccard similarity of two stored signatures.</summary>
    public static double Similarity(ReadOnlySpan<ushort> a, ReadOnlySpan<ushort> b)
    {
        var equal = 0;
        for (var p = 0; p < a.Length; p++)
        {
            if (a[p] == b[p])
            {
                equal++;
            }
        }

        // b-bit MinHash: unrelated values still collide with probability 2^-16.
        const double chance = 1.0 / 65536;
        return Math.Max(0, ((double)equal / a.Length - chance) / (1 - chance));
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

/// <summary>A record removed as a near duplicate: the record its cluster keeps, and its closest verified similarity.</summary>
public readonly record struct NearRemoval(long KeptLine, double Similarity);

/// <summary>
/// Near-duplicate clusters: union-find over verified pairs of record lines. Each cluster keeps its first
/// record in source order (the lowest line) and removes the others, whatever order the pairs came in, so a
/// single pass and any number of partitions give the same answer. Memory: one entry per record in a pair.
/// </summary>
public sealed class NearDuplicateClusters
{
    private readonly Dictionary<long, long> _parent = [];
    private readonly Dictionary<long, double> _closest = [];

    public int Pairs { get; private set; }

    public void Add(long a, long b, double similarity)
    {
        Pairs++;
        Closest(a, similarity);
        Closest(b, similarity);
        var (rootA, rootB) = (Find(a), Find(b));
        if (rootA != rootB)
        {
            // The root is always the cluster's lowest line.
            _parent[Math.Max(rootA, rootB)] = Math.Min(rootA, rootB);
        }
    }

    /// <summary>Every record that is not its cluster's first, with that first record and its closest verified similarity.</summary>
    public Dictionary<long, NearRemoval> Removals()
    {
        var removals = new Dictionary<long, NearRemoval>();
        foreach (var line in _parent.Keys.ToList())
        {
            var root = Find(line);
            if (root != line)
            {
                removals[line] = new NearRemoval(root, Math.Round(_closest[line], 3));
            }
        }

        return removals;
    }

    private void Closest(long line, double similarity)
    {
        ref var closest = ref CollectionsMarshal.GetValueRefOrAddDefault(_closest, line, out _);
        closest = Math.Max(closest, similarity);
    }

    private long Find(long line)
    {
        var root = line;
        while (_parent.TryGetValue(root, out var parent) && parent != root)
        {
            root = parent;
        }

        _parent.TryAdd(line, line);
        // Path compression: every record on the way points at the root.
        while (line != root)
        {
            var next = _parent[line];
            _parent[line] = root;
            line = next;
        }

        return root;
    }
}

/// <summary>
/// The single pass's near-duplicate search, in memory: records are added in source order, each band key
/// remembers the first record that had it, and a record sharing a key with that first record is paired
/// with it when their signatures' similarity reaches the threshold. The same pairs as the partitioned
/// steps' buckets (a bucket's first member is its lowest line). Memory: 2 bytes per permutation per
/// distinct record, plus one table entry per band per record.
/// </summary>
public sealed class NearDuplicateIndex(MinHasher hasher)
{
    private readonly List<ushort[]> _signatures = [];
    private readonly List<long> _lines = [];
    private readonly Dictionary<ulong, int> _first = [];

    public MinHasher Hasher => hasher;
    public NearDuplicateClusters Clusters { get; } = new();

    public void Add(long line, uint[] signature)
    {
        var stored = MinHasher.Compact(signature);
        var id = _signatures.Count;
        _signatures.Add(stored);
        _lines.Add(line);
        var paired = -1;
        for (var band = 0; band < hasher.Bands; band++)
        {
            ref var first = ref CollectionsMarshal.GetValueRefOrAddDefault(_first, hasher.BandKey(signature, band), out var exists);
            if (!exists)
            {
                first = id;
            }
            else if (first != paired)
            {
                var similarity = MinHasher.Similarity(stored, _signatures[first]);
                if (similarity >= hasher.Threshold)
                {
                    Clusters.Add(_lines[first], line, similarity);
                }

                paired = first;
            }
        }
    }
}
