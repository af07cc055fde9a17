using System.Buffers;
using System.Security.Cryptography;
using System.Text.Json;

namespace Pipeline.Preprocessing;

/// <summary>
/// Writes one split's shards: JSON Lines of <c>{"input_ids":[...],"label":k,"prompt_length":n,"line":n}</c>,
/// a new file every <c>shardRecords</c> records, each hashed as it is written.
/// </summary>
internal sealed class ShardWriter(ShardSink sink, string folder, string split, int shardRecords, int blockBytes) : IAsyncDisposable
{
    private readonly ArrayBufferWriter<byte> _buffer = new(1 << 20);
    private readonly List<ShardInfo> _shards = [];
    private Utf8JsonWriter? _json;
    private Stream? _stream;
    private IncrementalHash? _hash;
    private long _records;
    private long _tokens;

    public IReadOnlyList<ShardInfo> Shards => _shards;

    public async ValueTask WriteAsync(int[] ids, int? label, int? promptLength, long line, CancellationToken cancellationToken)
    {
        if (_stream is null)
        {
            await OpenAsync(cancellationToken);
        }

        Write(ids, label, promptLength, line);
        _records++;
        _tokens += ids.Length;
        if (_buffer.WrittenCount >= blockBytes / 2)
        {
            await FlushAsync(cancellationToken);
        }

        if (_records >= shardRecords)
        {
            await CloseAsync(cancellationToken);
        }
    }

    private void Write(ReadOnlySpan<int> ids, int? label, int? promptLength, long line)
    {
        var json = _json!;
        json.WriteStartObject();
        json.WriteStartArray("input_ids"u8);
        foreach (var id in ids)
        {
            json.WriteNumberValue(id);
        }

        json.WriteEndArray();
        if (label is { } l)
        {
            json.WriteNumber("label"u8, l);
        }

        if (promptLength is { } p)
        {
            json.WriteNumber("prompt_length"u8, p);
        }

        json.WriteNumber("line"u8, line);
        json.WriteEndObject();
        json.Flush();
        _buffer.Write("\n"u8);
        json.Reset(_buffer);
    }

    private async ValueTask OpenAsync(CancellationToken cancellationToken)
    {
        var path = $"{folder}{split}-{_shards.Count:00000}.jsonl";
        _stream = await sink.OpenAsync(path, cancellationToken);
        _hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        _json = new Utf8JsonWriter(_buffer, new JsonWriterOptions { SkipValidation = true });
        _records = 0;
        _tokens = 0;
    }

    private async ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        _hash!.AppendData(_buffer.WrittenSpan);
        await _stream!.WriteAsync(_buffer.WrittenMemory, cancellationToken);
        _buffer.Clear();
        _json!.Reset(_buffer);
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
        _json?.Dispose();
    }
}
