using System.Buffers;
using System.Security.Cryptography;

namespace Pipeline.Ingestion;

/// <summary>
/// Reads a stream line by line with one pooled buffer (bounded memory whatever the file size), hashing
/// every byte as it passes. Lines longer than the limit are skipped and reported, never buffered whole.
/// </summary>
public sealed class LineReader : IDisposable
{
    private readonly Stream _stream;
    private readonly int _maxLineBytes;
    private readonly IncrementalHash _sha256 = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
    private byte[] _buffer;
    private int _start;
    private int _end;
    private int _scan;
    private bool _eof;
    private int _lineStart;
    private int _lineLength;

    public LineReader(Stream stream, int maxLineBytes, int initialBufferBytes = 1 << 20)
    {
        _stream = stream;
        _maxLineBytes = maxLineBytes;
        _buffer = ArrayPool<byte>.Shared.Rent(Math.Max(initialBufferBytes, 64 * 1024));
    }

    /// <summary>The current line, without its line break.</summary>
    public ReadOnlySpan<byte> Line => _buffer.AsSpan(_lineStart, _lineLength);

    /// <summary>1-based number of the current line.</summary>
    public long LineNumber { get; private set; }

    /// <summary>True when the current line exceeded the limit; <see cref="Line"/> is then empty.</summary>
    public bool LineTooLong { get; private set; }

    /// <summary>Length of the current line in bytes (also when it was too long).</summary>
    public long LineBytes { get; private set; }

    public long BytesRead { get; private set; }

    /// <summary>Fills the buffer with at least <paramref name="count"/> bytes (or to the end) and returns them, consuming nothing.</summary>
    public async ValueTask<ReadOnlyMemory<byte>> PeekAsync(int count, CancellationToken cancellationToken)
    {
        while (_end - _start < count && !_eof)
        {
            await FillAsync(cancellationToken);
        }

        return _buffer.AsMemory(_start, Math.Min(count, _end - _start));
    }

    /// <summary>Skips <paramref name="count"/> bytes at the start (a byte order mark).</summary>
    public void Skip(int count)
    {
        _start += count;
        _scan = Math.Max(_scan, _start);
    }

    /// <summary>
    /// The next line when it is in the buffer already, without the cost of an asynchronous call (most
    /// lines); false means <see cref="ReadLineAsync"/> must read on (a buffer refill, a long line, the end).
    /// </summary>
    public bool TryReadLine()
    {
        var found = _buffer.AsSpan(_scan, _end - _scan).IndexOf((byte)'\n');
        if (found < 0)
        {
            // Scanned already: ReadLineAsync goes on from here.
            _scan = _end;
            return false;
        }

        var newline = _scan + found;
        SetLine(newline, 0);
        _start = _scan = newline + 1;
        return true;
    }

    public async ValueTask<bool> ReadLineAsync(CancellationToken cancellationToken)
    {
        long skipped = 0;
        while (true)
        {
            var found = _buffer.AsSpan(_scan, _end - _scan).IndexOf((byte)'\n');
            if (found >= 0)
            {
                var newline = _scan + found;
                SetLine(newline, skipped);
                _start = _scan = newline + 1;
                return true;
            }

            if (_eof)
            {
                if (_start < _end || skipped > 0)
                {
                    SetLine(_end, skipped);
                    _start = _scan = _end;
                    return true;
                }

                return false;
            }

            _scan = _end;
            if (_end - _start > _maxLineBytes)
            {
                // Too long: drop what we have and keep scanning for the end of this line.
                skipped += _end - _start;
                _start = _scan = _end;
            }

            await FillAsync(cancellationToken);
        }
    }

    private void SetLine(int newline, long skipped)
    {
        LineNumber++;
        var length = newline - _start;
        if (length > 0 && _buffer[newline - 1] == (byte)'\r')
        {
            length--;
        }

        LineBytes = skipped + length;
        LineTooLong = skipped > 0 || length > _maxLineBytes;
        _lineStart = _start;
        _lineLength = LineTooLong ? 0 : length;
    }

    private async ValueTask FillAsync(CancellationToken cancellationToken)
    {
        if (_start > 0 && (_end == _buffer.Length || _start > _buffer.Length / 2))
        {
            // Compact: move the unread part to the front.
            var unread = _end - _start;
            Buffer.BlockCopy(_buffer, _start, _buffer, 0, unread);
            _scan -= _start;
            _end = unread;
            _start = 0;
        }

        if (_end == _buffer.Length)
        {
            var larger = ArrayPool<byte>.Shared.Rent(_buffer.Length * 2);
            Buffer.BlockCopy(_buffer, 0, larger, 0, _end);
            ArrayPool<byte>.Shared.Return(_buffer);
            _buffer = larger;
        }

        var read = await _stream.ReadAsync(_buffer.AsMemory(_end), cancellationToken);
        if (read == 0)
        {
            _eof = true;
            return;
        }

        _sha256.AppendData(_buffer, _end, read);
        _end += read;
        BytesRead += read;
    }

    /// <summary>Reads to the end (so the hash covers every byte) and returns the SHA-256 of the whole stream.</summary>
    public async ValueTask<string> FinishHashAsync(CancellationToken cancellationToken)
    {
        while (!_eof)
        {
            _start = _scan = _end;
            await FillAsync(cancellationToken);
        }

        return Convert.ToHexStringLower(_sha256.GetHashAndReset());
    }

    public void Dispose()
    {
        ArrayPool<byte>.Shared.Return(_buffer);
        _sha256.Dispose();
    }
}
