using System.Buffers.Binary;

namespace Pipeline.Preprocessing;

/// <summary>
/// A partition's kept records, in source order, as the assembly needs them: line, dedup key, label, prompt
/// length, truncation and token ids. Binary, little-endian, one record after another:
/// <c>line:i64 key:u64 flags:u8 [label:i32] [promptLength:i32] count:i32 ids:i32[count]</c>
/// (flags: 1 label, 2 prompt length, 4 truncated), after the 8-byte header <c>PPKEPT01</c>.
/// </summary>
internal static class KeptRecords
{
    private static ReadOnlySpan<byte> Header => "PPKEPT01"u8;
    private const byte HasLabel = 1, HasPromptLength = 2, IsTruncated = 4;

    /// <summary>One kept record as read back (its ids in a buffer reused from record to record).</summary>
    public sealed class Record
    {
        public long Line;
        public ulong Key;
        public int? Label;
        public int? PromptLength;
        public bool Truncated;
        public int[] Ids = new int[256];
        public int Count;

        public ReadOnlyMemory<int> Tokens => Ids.AsMemory(0, Count);
    }

    public sealed class Writer(Stream stream) : IAsyncDisposable
    {
        private readonly BufferedStream _output = new(stream, 1 << 20);
        private bool _started;

        private byte[] _scratch = new byte[4096];

        public async ValueTask WriteAsync(ReadOnlyMemory<int> ids, int? label, int? promptLength, bool truncated, ulong key, long line, CancellationToken cancellationToken)
        {
            if (!_started)
            {
                _started = true;
                await _output.WriteAsync(Header.ToArray(), cancellationToken);
            }

            var size = 8 + 8 + 1 + 4 + 4 + 4 + ids.Length * sizeof(int);
            if (size > _scratch.Length)
            {
                _scratch = new byte[Math.Max(size, _scratch.Length * 2)];
            }

            var row = _scratch.AsSpan();
            BinaryPrimitives.WriteInt64LittleEndian(row, line);
            BinaryPrimitives.WriteUInt64LittleEndian(row[8..], key);
            var at = 17;
            byte flags = truncated ? IsTruncated : (byte)0;
            if (label is { } l)
            {
                flags |= HasLabel;
                BinaryPrimitives.WriteInt32LittleEndian(row[at..], l);
                at += 4;
            }

            if (promptLength is { } p)
            {
                flags |= HasPromptLength;
                BinaryPrimitives.WriteInt32LittleEndian(row[at..], p);
                at += 4;
            }

            row[16] = flags;
            BinaryPrimitives.WriteInt32LittleEndian(row[at..], ids.Length);
            at += 4;
            foreach (var id in ids.Span)
            {
                BinaryPrimitives.WriteInt32LittleEndian(row[at..], id);
                at += 4;
            }

            await _output.WriteAsync(_scratch.AsMemory(0, at), cancellationToken);
        }

        /// <summary>Writes the header even when nothing was kept, and flushes.</summary>
        public async ValueTask CompleteAsync(CancellationToken cancellationToken)
        {
            if (!_started)
            {
                _started = true;
                await _output.WriteAsync(Header.ToArray(), cancellationToken);
            }

            await _output.FlushAsync(cancellationToken);
        }

        public ValueTask DisposeAsync() => _output.DisposeAsync();
    }

    public sealed class Reader(Stream stream, string name) : IAsyncDisposable
    {
        // Small: the assembly reads every partition at once, one reader each.
        private readonly BufferedStream _input = new(stream, 64 << 10);
        private readonly byte[] _fixed = new byte[8 + 8 + 1 + 4 + 4 + 4];
        private byte[] _scratch = new byte[4096];
        private bool _started;

        public Record Current { get; } = new();

        /// <summary>Reads the next record into <see cref="Current"/>; false at the end.</summary>
        public async ValueTask<bool> ReadAsync(CancellationToken cancellationToken)
        {
            if (!_started)
            {
                _started = true;
                var header = new byte[Header.Length];
                await _input.ReadExactlyAsync(header, cancellationToken);
                if (!header.AsSpan().SequenceEqual(Header))
                {
                    throw new InvalidDataException($"{name} is not a file of kept records (its header is not PPKEPT01).");
                }
            }

            if (await _input.ReadAtLeastAsync(_fixed.AsMemory(0, 17), 17, throwOnEndOfStream: false, cancellationToken) is var read && read == 0)
            {
                return false;
            }
            else if (read < 17)
            {
                throw new InvalidDataException($"{name} ends inside a record.");
            }

            var record = Current;
            record.Line = BinaryPrimitives.ReadInt64LittleEndian(_fixed);
            record.Key = BinaryPrimitives.ReadUInt64LittleEndian(_fixed.AsSpan(8));
            var flags = _fixed[16];
            var rest = 4 + ((flags & HasLabel) != 0 ? 4 : 0) + ((flags & HasPromptLength) != 0 ? 4 : 0);
            await _input.ReadExactlyAsync(_fixed.AsMemory(17, rest), cancellationToken);
            var at = 17;
            record.Label = (flags & HasLabel) != 0 ? BinaryPrimitives.ReadInt32LittleEndian(_fixed.AsSpan(at)) : null;
            at += (flags & HasLabel) != 0 ? 4 : 0;
            record.PromptLength = (flags & HasPromptLength) != 0 ? BinaryPrimitives.ReadInt32LittleEndian(_fixed.AsSpan(at)) : null;
            at += (flags & HasPromptLength) != 0 ? 4 : 0;
            record.Truncated = (flags & IsTruncated) != 0;
            var count = BinaryPrimitives.ReadInt32LittleEndian(_fixed.AsSpan(at));
            if (count > record.Ids.Length)
            {
                record.Ids = new int[Math.Max(count, record.Ids.Length * 2)];
            }

            if (count * sizeof(int) > _scratch.Length)
            {
                _scratch = new byte[Math.Max(count * sizeof(int), _scratch.Length * 2)];
            }

            await _input.ReadExactlyAsync(_scratch.AsMemory(0, count * sizeof(int)), cancellationToken);
            for (var i = 0; i < count; i++)
            {
                record.Ids[i] = BinaryPrimitives.ReadInt32LittleEndian(_scratch.AsSpan(i * sizeof(int)));
            }

            record.Count = count;
            return true;
        }

        public ValueTask DisposeAsync() => _input.DisposeAsync();
    }
}
