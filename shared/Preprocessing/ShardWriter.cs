using System.Buffers;
using System.Buffers.Text;
using System.Security.Cryptography;

namespace Pipeline.Preprocessing;

/// <summary>
/// Writes one split's shards: JSON Lines of <c>{"input_ids":[...],"label":k,"prompt_length":n,"line":n}</c>,
/// a new file every <c>shardRecords</c> records, each hashed as it is written.
/// </summary>
internal sealed class ShardWriter(ShardSink sink, string folder, string split, int shardRecords) : IAsyncDisposable
{
    /// <summary>
    /// Rows are formatted here and go to the shard stream (and the hash) every <see cref="FlushBytes"/>: the
    /// stream buffers its own upload blocks, so this buffer stays small enough to stay in cache.
    /// </summary>
    private const int FlushBytes = 64 * 1024;

    private readonly ArrayBufferWriter<byte> _buffer = new(2 * FlushBytes);
    private readonly List<ShardInfo> _shards = [];
    private Stream? _stream;
    private IncrementalHash? _hash;
    private long _records;
    private long _tokens;

    public IReadOnlyList<ShardInfo> Shards => _shards;

    /// <summary>Writes one row; awaits only to open a shard, hand over a full buffer or close a full shard.</summary>
    public ValueTask WriteAsync(ReadOnlyMemory<int> ids, int? label, int? promptLength, long line, CancellationToken cancellationToken)
    {
        if (_stream is null)
        {
            return OpenAndWriteAsync(ids, label, promptLength, line, cancellationToken);
        }

        Write(ids.Span, label, promptLength, line);
        _records++;
        _tokens += ids.Length;
        return _buffer.WrittenCount >= FlushBytes || _records >= shardRecords ? FlushOrCloseAsync(cancellationToken) : default;
    }

    private async ValueTask OpenAndWriteAsync(ReadOnlyMemory<int> ids, int? label, int? promptLength, long line, CancellationToken cancellationToken)
    {
        await OpenAsync(cancellationToken);
        await WriteAsync(ids, label, promptLength, line, cancellationToken);
    }

    private async ValueTask FlushOrCloseAsync(CancellationToken cancellationToken)
    {
        if (_records >= shardRecords)
        {
            await CloseAsync(cancellationToken);
        }
        else
        {
            await FlushAsync(cancellationToken);
        }
    }

    /// <summary>
    /// One row, compact JSON of numbers only (the bytes <see cref="System.Text.Json.Utf8JsonWriter"/> writes for
    /// it), formatted straight into the reused buffer: no writer state, no flush, no allocation per row.
    /// </summary>
    private void Write(ReadOnlySpan<int> ids, int? label, int? promptLength, long line)
    {
        // 11 characters for the longest int and one comma per id, and room for the fixed parts.
        var row = _buffer.GetSpan(ids.Length * 12 + 96);
        var length = Append(row, 0, "{\"input_ids\":["u8);
        for (var i = 0; i < ids.Length; i++)
        {
            if (i > 0)
            {
                row[length++] = (byte)',';
            }

            Utf8Formatter.TryFormat(ids[i], row[length..], out var written);
            length += written;
        }

        length = Append(row, length, "]"u8);
        if (label is { } l)
        {
            length = Number(row, Append(row, length, ",\"label\":"u8), l);
        }

        if (promptLength is { } p)
        {
            length = Number(row, Append(row, length, ",\"prompt_length\":"u8), p);
        }

        length = Number(row, Append(row, length, ",\"line\":"u8), line);
        length = Append(row, length, "}\n"u8);
        _buffer.Advance(length);
    }

    private static int Append(Span<byte> row, int at, ReadOnlySpan<byte> bytes)
    {
        bytes.CopyTo(row[at..]);
        return at + bytes.Length;
    }

    private static int Number(Span<byte> row, int at, long value)
    {
        Utf8Formatter.TryFormat(value, row[at..], out var written);
        return at + written;
    }

    private async ValueTask OpenAsync(CancellationToken cancellationToken)
    {
        var path = $"{folder}{split}-{_shards.Count:00000}.jsonl";
        _stream = await sink.OpenAsync(path, cancellationToken);
        _hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        _records = 0;
        _tokens = 0;
    }

    private async ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        _hash!.AppendData(_buffer.WrittenSpan);
        await _stream!.WriteAsync(_buffer.WrittenMemory, cancellationToken);
        _buffer.ResetWrittenCount();
    }

    private async ValueTask CloseAsync(CancellationToken cancellationToken)
    {
        if (_stream is null)
        {
            return;
        }

        await FlushAsync(cancellationToken);
        await _stream.DisposeAsync();
        var path = $"{folder}{split}-{_shards.Count:00000}.jsonl";
        _shards.Add(new ShardInfo(split, $"{sink.Container}/{path}", _records, _tokens, Convert.ToHexStringLower(_hash!.GetHashAndReset())));
        _hash.Dispose();
        _stream = null;
    }

    /// <summary>Closes the last shard; the shard list is complete after this.</summary>
    public ValueTask CompleteAsync(CancellationToken cancellationToken) => CloseAsync(cancellationToken);

    public async ValueTask DisposeAsync()
    {
        if (_stream is not null)
        {
            await _stream.DisposeAsync();
        }

        _hash?.Dispose();
    }
}
