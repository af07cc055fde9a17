using System.Buffers.Binary;
using System.Text;

namespace Pipeline.Preprocessing;

/// <summary>
/// Where a partitioned build keeps its intermediate files: blobs under the build's <c>_partitions/</c> in the
/// stage, local files in the benchmark. Names are relative paths with forward slashes.
/// </summary>
public abstract class PartStore
{
    /// <summary>Opens a new file for writing (replacing one left by an earlier attempt); <paramref name="bufferBytes"/> is its upload block.</summary>
    public abstract Task<Stream> CreateAsync(string name, int bufferBytes, CancellationToken cancellationToken);

    public abstract Task<Stream> OpenReadAsync(string name, CancellationToken cancellationToken);

    public abstract Task<long> SizeAsync(string name, CancellationToken cancellationToken);

    /// <summary>The names of the files under <paramref name="prefix"/>.</summary>
    public abstract IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken);
}

/// <summary>
/// Near-duplicate dedup over partitions: the standard distributed MinHash-LSH steps, each a fan-out of
/// messages with memory bounded by the partition size, giving exactly the single pass's answer.
/// <list type="number">
/// <item><b>Partition</b> (one message a partition, with its exact dedup): each distinct record's signature
/// goes to <c>near/signatures/PPPPP.bin</c> (source order) and each of its band keys to bucket
/// <c>key mod B</c>: <c>near/bands/BBBBB/PPPPP.bin</c>.</item>
/// <item><b>Buckets</b> (one a bucket): the bucket's entries from every partition, sorted by key; in each group of
/// records sharing a key, every member is a candidate pair with the group's first (lowest line), sent to the
/// partition holding that first record: <c>near/pairs/PPPPP/BBBBB.bin</c>.</item>
/// <item><b>Attach</b> (one a partition): the candidate pairs whose first record it holds get that record's
/// signature and excerpt, and go to the partition holding the other: <c>near/attached/PPPPP/QQQQQ.bin</c>.</item>
/// <item><b>Verify</b> (one a partition): each pair's similarity is computed from both signatures; pairs at or
/// above the threshold are written to <c>near/edges/PPPPP.bin</c>.</item>
/// <item><b>Cluster</b> (the assembly): union-find over the verified pairs; every record but the first of its
/// cluster is removed (<see cref="NearDuplicateClusters"/>).</item>
/// </list>
/// Files are binary, little-endian, with no header; signatures keep 16 bits per permutation.
/// </summary>
public static class NearDedupSteps
{
    public const string Buckets = "buckets";
    public const string Attach = "attach";
    public const string Verify = "verify";

    /// <summary>Band entries per bucket message stay about 4 per partition record whatever the dataset's size.</summary>
    public static int BucketsFor(int partitions, MinHasher hasher) => partitions * Math.Max(1, hasher.Bands / 4);

    public static string Signatures(int partition) => $"near/signatures/{partition:00000}.bin";
    public static string Bands(int bucket, int partition) => $"near/bands/{bucket:00000}/{partition:00000}.bin";
    public static string Pairs(int partition, int bucket) => $"near/pairs/{partition:00000}/{bucket:00000}.bin";
    public static string Attached(int partition, int from) => $"near/attached/{partition:00000}/{from:00000}.bin";
    public static string Edges(int partition) => $"near/edges/{partition:00000}.bin";

    /// <summary>Upload blocks small enough that a partition writing to every bucket at once holds at most about 32 MiB.</summary>
    private static int BlockFor(int files) => Math.Clamp((32 << 20) / Math.Max(1, files), 64 << 10, 1 << 20);

    private static int OwnerOf(string name) => int.Parse(Path.GetFileNameWithoutExtension(name), System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>Step 1's output of one partition: its distinct records' signatures and band keys.</summary>
    public sealed class PartitionWriter : IAsyncDisposable
    {
        private readonly MinHasher _hasher;
        private readonly int _buckets;
        private readonly BufferedStream _signatures;
        private readonly BufferedStream[] _bands;
        private readonly byte[] _row;
        private readonly byte[] _entry = new byte[16];

        private PartitionWriter(MinHasher hasher, Stream signatures, Stream[] bands)
        {
            _hasher = hasher;
            _buckets = bands.Length;
            _signatures = new BufferedStream(signatures, 64 << 10);
            _bands = [.. bands.Select(b => new BufferedStream(b, 4096))];
            _row = new byte[8 + 2 * hasher.Permutations + 2 + 1024];
        }

        public static async Task<PartitionWriter> CreateAsync(PartStore store, MinHasher hasher, int partition, int buckets, CancellationToken cancellationToken)
        {
            var signatures = await store.CreateAsync(Signatures(partition), 1 << 20, cancellationToken);
            var bands = new Stream[buckets];
            for (var b = 0; b < buckets; b++)
            {
                bands[b] = await store.CreateAsync(Bands(b, partition), BlockFor(buckets), cancellationToken);
            }

            return new PartitionWriter(hasher, signatures, bands);
        }

        public async ValueTask AddAsync(long line, uint[] signature, string excerpt, CancellationToken cancellationToken)
        {
            var length = WriteSignature(_row, line, MinHasher.Compact(signature), excerpt);
            await _signatures.WriteAsync(_row.AsMemory(0, length), cancellationToken);
            for (var band = 0; band < _hasher.Bands; band++)
            {
                var key = _hasher.BandKey(signature, band);
                BinaryPrimitives.WriteUInt64LittleEndian(_entry, key);
                BinaryPrimitives.WriteInt64LittleEndian(_entry.AsSpan(8), line);
                await _bands[(int)(key % (ulong)_buckets)].WriteAsync(_entry, cancellationToken);
            }
        }

        public async ValueTask DisposeAsync()
        {
            await _signatures.DisposeAsync();
            foreach (var band in _bands)
            {
                await band.DisposeAsync();
            }
        }
    }

    private static (ulong Key, long Line, int Partition)[]? _entries;

    /// <summary>Step 2: one bucket's candidate pairs, each sent to the partition holding the group's first record.</summary>
    public static async Task<long> BucketAsync(PartStore store, int bucket, int partitions, CancellationToken cancellationToken)
    {
        // One array of the bucket's size, kept for the next bucket this instance does: bucket after bucket reuses it instead
        // of leaving a list's discarded growth arrays (hundreds of MB of large-object garbage) behind each one.
        long total = 0;
        for (var p = 0; p < partitions; p++)
        {
            total += await store.SizeAsync(Bands(bucket, p), cancellationToken) / 16;
        }

        var rented = Interlocked.Exchange(ref _entries, null) is { } spare && spare.Length >= total
            ? spare
            : new (ulong Key, long Line, int Partition)[Math.Max(1, total + total / 8)];
        try
        {
            var count = 0;
            var entry = new byte[16];
            for (var p = 0; p < partitions; p++)
            {
                await using var input = new BufferedStream(await store.OpenReadAsync(Bands(bucket, p), cancellationToken), 64 << 10);
                while (await ReadOrEndAsync(input, entry, cancellationToken))
                {
                    if (count == rented.Length)
                    {
                        throw new InvalidDataException($"Bucket {bucket}'s band files grew while it was read; it is read again on the message's retry.");
                    }

                    rented[count++] = (BinaryPrimitives.ReadUInt64LittleEndian(entry), BinaryPrimitives.ReadInt64LittleEndian(entry.AsSpan(8)), p);
                }
            }

            var entries = rented.AsMemory(0, count);
            entries.Span.Sort((a, b) => a.Key != b.Key ? a.Key.CompareTo(b.Key) : a.Line.CompareTo(b.Line));
            return await PairAsync(store, bucket, entries, cancellationToken);
        }
        finally
        {
            _entries = rented;
        }
    }

    /// <summary>In each run of sorted entries sharing a key, every member but the first is paired with the first, sent to the first's partition.</summary>
    private static async Task<long> PairAsync(PartStore store, int bucket, ReadOnlyMemory<(ulong Key, long Line, int Partition)> sorted, CancellationToken cancellationToken)
    {
        var outputs = new Dictionary<int, BufferedStream>();
        long pairs = 0;
        try
        {
            var pair = new byte[20];
            for (var start = 0; start < sorted.Length;)
            {
                var end = start + 1;
                while (end < sorted.Length && sorted.Span[end].Key == sorted.Span[start].Key)
                {
                    end++;
                }

                var first = sorted.Span[start];
                for (var i = start + 1; i < end; i++)
                {
                    if (!outputs.TryGetValue(first.Partition, out var output))
                    {
                        output = outputs[first.Partition] = new BufferedStream(await store.CreateAsync(Pairs(first.Partition, bucket), 256 << 10, cancellationToken), 16 << 10);
                    }

                    var other = sorted.Span[i];
                    BinaryPrimitives.WriteInt64LittleEndian(pair, first.Line);
                    BinaryPrimitives.WriteInt64LittleEndian(pair.AsSpan(8), other.Line);
                    BinaryPrimitives.WriteInt32LittleEndian(pair.AsSpan(16), other.Partition);
                    await output.WriteAsync(pair, cancellationToken);
                    pairs++;
                }

                start = end;
            }
        }
        finally
        {
            foreach (var output in outputs.Values)
            {
                await output.DisposeAsync();
            }
        }

        return pairs;
    }

    /// <summary>Step 3: the candidate pairs whose first record this partition holds, with that record's signature, sent on to the other's partition.</summary>
    public static async Task AttachAsync(PartStore store, int partition, int permutations, CancellationToken cancellationToken)
    {
        var requests = new HashSet<(long First, long Other, int OtherPartition)>();
        var pair = new byte[20];
        await foreach (var name in store.ListAsync($"near/pairs/{partition:00000}/", cancellationToken))
        {
            await using var input = new BufferedStream(await store.OpenReadAsync(name, cancellationToken), 64 << 10);
            while (await ReadOrEndAsync(input, pair, cancellationToken))
            {
                // One pair can share several bands: it is attached once.
                requests.Add((BinaryPrimitives.ReadInt64LittleEndian(pair), BinaryPrimitives.ReadInt64LittleEndian(pair.AsSpan(8)), BinaryPrimitives.ReadInt32LittleEndian(pair.AsSpan(16))));
            }
        }

        var sorted = requests.OrderBy(r => r.First).ThenBy(r => r.Other).ToList();
        var outputs = new Dictionary<int, BufferedStream>();
        try
        {
            var row = new byte[8 + 8 + 2 * permutations + 2 + 1024];
            var next = 0;
            await using var signatures = new SignatureReader(await store.OpenReadAsync(Signatures(partition), cancellationToken), permutations, $"the signatures of partition {partition}");
            while (next < sorted.Count && await signatures.ReadAsync(cancellationToken))
            {
                for (; next < sorted.Count && sorted[next].First == signatures.Line; next++)
                {
                    var request = sorted[next];
                    if (!outputs.TryGetValue(request.OtherPartition, out var output))
                    {
                        output = outputs[request.OtherPartition] = new BufferedStream(await store.CreateAsync(Attached(request.OtherPartition, partition), 256 << 10, cancellationToken), 16 << 10);
                    }

                    BinaryPrimitives.WriteInt64LittleEndian(row, request.Other);
                    var length = 8 + WriteSignature(row.AsSpan(8), request.First, signatures.Signature, signatures.Excerpt);
                    await output.WriteAsync(row.AsMemory(0, length), cancellationToken);
                }
            }

            if (next < sorted.Count)
            {
                throw new InvalidDataException($"Partition {partition} has no signature for line {sorted[next].First}, which bucket files name: its near-duplicate files are incomplete.");
            }
        }
        finally
        {
            foreach (var output in outputs.Values)
            {
                await output.DisposeAsync();
            }
        }
    }

    /// <summary>Step 4: the pairs whose other record this partition holds, verified against the threshold. Returns the verified pairs.</summary>
    public static async Task<long> VerifyAsync(PartStore store, int partition, MinHasher hasher, CancellationToken cancellationToken)
    {
        var requests = new List<(long Other, long First, ushort[] Signature, string Excerpt)>();
        var other = new byte[8];
        await foreach (var name in store.ListAsync($"near/attached/{partition:00000}/", cancellationToken))
        {
            await using var input = new BufferedStream(await store.OpenReadAsync(name, cancellationToken), 64 << 10);
            await using var firsts = new SignatureReader(input, hasher.Permutations, name);
            while (await ReadOrEndAsync(input, other, cancellationToken))
            {
                if (!await firsts.ReadAsync(cancellationToken))
                {
                    throw new InvalidDataException($"{name} ends inside a record.");
                }

                requests.Add((BinaryPrimitives.ReadInt64LittleEndian(other), firsts.Line, firsts.Signature.ToArray(), firsts.Excerpt));
            }
        }

        requests.Sort((a, b) => a.Other != b.Other ? a.Other.CompareTo(b.Other) : a.First.CompareTo(b.First));
        long verified = 0;
        await using var edges = new BufferedStream(await store.CreateAsync(Edges(partition), 256 << 10, cancellationToken), 16 << 10);
        await using var signatures = new SignatureReader(await store.OpenReadAsync(Signatures(partition), cancellationToken), hasher.Permutations, $"the signatures of partition {partition}");
        var next = 0;
        while (next < requests.Count && await signatures.ReadAsync(cancellationToken))
        {
            for (; next < requests.Count && requests[next].Other == signatures.Line; next++)
            {
                var request = requests[next];
                var similarity = MinHasher.Similarity(request.Signature, signatures.Signature);
                if (similarity >= hasher.Threshold)
                {
                    await WriteEdgeAsync(edges, request.First, signatures.Line, similarity, request.Excerpt, signatures.Excerpt, cancellationToken);
                    verified++;
                }
            }
        }

        if (next < requests.Count)
        {
            throw new InvalidDataException($"Partition {partition} has no signature for line {requests[next].Other}, which attached pairs name: its near-duplicate files are incomplete.");
        }

        return verified;
    }

    /// <summary>What the clusters remove, and the excerpts of the records the duplicate sample names (the first removals and the records their clusters keep).</summary>
    public sealed record NearDuplicates(Dictionary<long, NearRemoval> Removed, Dictionary<long, string> Excerpts)
    {
        public static NearDuplicates None { get; } = new([], []);
    }

    /// <summary>
    /// Step 5: union-find over every partition's verified pairs. The pairs are read twice: once for the
    /// clusters, once for the excerpts of the records the first <paramref name="samples"/> removals name
    /// (memory: the clusters, not every pair's text).
    /// </summary>
    public static async Task<NearDuplicates> ClusterAsync(PartStore store, int partitions, int samples, CancellationToken cancellationToken)
    {
        var clusters = new NearDuplicateClusters();
        await ReadEdgesAsync(store, partitions, (first, other, similarity, _, _) => clusters.Add(first, other, similarity), cancellationToken);
        var removed = clusters.Removals();
        var named = removed.OrderBy(r => r.Key).Take(samples).SelectMany(r => new[] { r.Key, r.Value.KeptLine }).ToHashSet();
        var excerpts = new Dictionary<long, string>();
        await ReadEdgesAsync(store, partitions, (first, other, _, firstExcerpt, otherExcerpt) =>
        {
            if (named.Contains(first))
            {
                excerpts[first] = firstExcerpt;
            }

            if (named.Contains(other))
            {
                excerpts[other] = otherExcerpt;
            }
        }, cancellationToken);
        return new NearDuplicates(removed, excerpts);
    }

    private static async Task ReadEdgesAsync(PartStore store, int partitions, Action<long, long, double, string, string> edge, CancellationToken cancellationToken)
    {
        var fixedPart = new byte[24];
        for (var p = 0; p < partitions; p++)
        {
            await using var input = new BufferedStream(await store.OpenReadAsync(Edges(p), cancellationToken), 64 << 10);
            while (await ReadOrEndAsync(input, fixedPart, cancellationToken))
            {
                var first = BinaryPrimitives.ReadInt64LittleEndian(fixedPart);
                var other = BinaryPrimitives.ReadInt64LittleEndian(fixedPart.AsSpan(8));
                var similarity = BinaryPrimitives.ReadDoubleLittleEndian(fixedPart.AsSpan(16));
                edge(first, other, similarity, await ReadStringAsync(input, cancellationToken), await ReadStringAsync(input, cancellationToken));
            }
        }
    }

    private static async ValueTask WriteEdgeAsync(Stream output, long first, long other, double similarity, string firstExcerpt, string otherExcerpt, CancellationToken cancellationToken)
    {
        var a = Encoding.UTF8.GetBytes(firstExcerpt);
        var b = Encoding.UTF8.GetBytes(otherExcerpt);
        var row = new byte[24 + 2 + a.Length + 2 + b.Length];
        BinaryPrimitives.WriteInt64LittleEndian(row, first);
        BinaryPrimitives.WriteInt64LittleEndian(row.AsSpan(8), other);
        BinaryPrimitives.WriteDoubleLittleEndian(row.AsSpan(16), similarity);
        BinaryPrimitives.WriteUInt16LittleEndian(row.AsSpan(24), (ushort)a.Length);
        a.CopyTo(row, 26);
        BinaryPrimitives.WriteUInt16LittleEndian(row.AsSpan(26 + a.Length), (ushort)b.Length);
        b.CopyTo(row, 28 + a.Length);
        await output.WriteAsync(row, cancellationToken);
    }

    /// <summary><c>line:i64 signature:u16[permutations] excerptLength:u16 excerpt:utf8</c>; returns the bytes written.</summary>
    private static int WriteSignature(Span<byte> row, long line, ReadOnlySpan<ushort> signature, string excerpt)
    {
        BinaryPrimitives.WriteInt64LittleEndian(row, line);
        var at = 8;
        foreach (var value in signature)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(row[at..], value);
            at += 2;
        }

        // Excerpts are at most ExcerptChars characters plus an ellipsis: well under the row's 1,024 spare bytes.
        var length = Encoding.UTF8.GetBytes(excerpt, row[(at + 2)..]);
        BinaryPrimitives.WriteUInt16LittleEndian(row[at..], (ushort)length);
        return at + 2 + length;
    }

    private static async ValueTask<bool> ReadOrEndAsync(Stream input, byte[] buffer, CancellationToken cancellationToken)
    {
        var read = await input.ReadAtLeastAsync(buffer, buffer.Length, throwOnEndOfStream: false, cancellationToken);
        return read == buffer.Length
            ? true
            : read == 0 ? false : throw new InvalidDataException("A near-duplicate file ends inside a record.");
    }

    private static async ValueTask<string> ReadStringAsync(Stream input, CancellationToken cancellationToken)
    {
        var length = new byte[2];
        await input.ReadExactlyAsync(length, cancellationToken);
        var bytes = new byte[BinaryPrimitives.ReadUInt16LittleEndian(length)];
        await input.ReadExactlyAsync(bytes, cancellationToken);
        return Encoding.UTF8.GetString(bytes);
    }

    /// <summary>Reads signature rows (<see cref="WriteSignature"/>) one after another.</summary>
    private sealed class SignatureReader(Stream stream, int permutations, string name) : IAsyncDisposable
    {
        private readonly Stream _input = stream is BufferedStream ? stream : new BufferedStream(stream, 64 << 10);
        private readonly byte[] _fixed = new byte[8 + 2 * permutations + 2];
        private readonly ushort[] _signature = new ushort[permutations];
        private readonly byte[] _excerpt = new byte[1024];

        public long Line { get; private set; }
        public ReadOnlySpan<ushort> Signature => _signature;
        public string Excerpt { get; private set; } = "";

        public async ValueTask<bool> ReadAsync(CancellationToken cancellationToken)
        {
            var read = await _input.ReadAtLeastAsync(_fixed, _fixed.Length, throwOnEndOfStream: false, cancellationToken);
            if (read == 0)
            {
                return false;
            }

            if (read < _fixed.Length)
            {
                throw new InvalidDataException($"{name} ends inside a record.");
            }

            Line = BinaryPrimitives.ReadInt64LittleEndian(_fixed);
            for (var p = 0; p < _signature.Length; p++)
            {
                _signature[p] = BinaryPrimitives.ReadUInt16LittleEndian(_fixed.AsSpan(8 + 2 * p));
            }

            var length = BinaryPrimitives.ReadUInt16LittleEndian(_fixed.AsSpan(8 + 2 * _signature.Length));
            await _input.ReadExactlyAsync(_excerpt.AsMemory(0, length), cancellationToken);
            Excerpt = Encoding.UTF8.GetString(_excerpt, 0, length);
            return true;
        }

        public ValueTask DisposeAsync() => _input.DisposeAsync();
    }
}
