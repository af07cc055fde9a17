using System.Buffers;
using System.Globalization;
using System.Text;
using Azure.Storage.Blobs.Specialized;

namespace Pipeline.Storage;

/// <summary>
/// A write-only stream to a block blob that uploads each full block in the background while the writer
/// fills the next one (the SDK's <c>OpenWriteAsync</c> stream waits for each upload inside the write that
/// fills a block). At most <c>inFlight</c> blocks are uploading at once, so memory is <c>inFlight + 1</c>
/// blocks. Disposing uploads the rest and commits the block list; an upload's failure surfaces from the
/// next write or from the dispose, and then nothing is committed.
/// </summary>
public sealed class BlockUploadStream(BlockBlobClient blob, int blockBytes, int inFlight = 2) : Stream
{
    private readonly Queue<(Task Upload, byte[] Buffer)> _uploads = new();
    private readonly List<string> _blocks = [];
    private byte[] _buffer = ArrayPool<byte>.Shared.Rent(blockBytes);
    private int _length;
    private bool _disposed;

    public override bool CanRead => false;
    public override bool CanSeek => false;
    public override bool CanWrite => !_disposed;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        while (!buffer.IsEmpty)
        {
            var take = Math.Min(buffer.Length, blockBytes - _length);
            buffer.Span[..take].CopyTo(_buffer.AsSpan(_length));
            _length += take;
            buffer = buffer[take..];
            if (_length == blockBytes)
            {
                await StageAsync(cancellationToken);
            }
        }
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Write(byte[] buffer, int offset, int count) => WriteAsync(buffer, offset, count, CancellationToken.None).GetAwaiter().GetResult();

    /// <summary>Nothing to do: a block is uploaded when it is full, the rest when the stream is disposed.</summary>
    public override void Flush()
    {
    }

    public override Task FlushAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public override async ValueTask DisposeAsync()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        try
        {
            if (_length > 0)
            {
                await StageAsync(CancellationToken.None);
            }

            while (_uploads.Count > 0)
            {
                await CompleteOldestAsync();
            }

            await blob.CommitBlockListAsync(_blocks);
        }
        finally
        {
            await AbandonAsync();
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            DisposeAsync().AsTask().GetAwaiter().GetResult();
        }

        base.Dispose(disposing);
    }

    /// <summary>Starts the upload of the filled part of the buffer, first waiting for the oldest upload when <c>inFlight</c> are running.</summary>
    private async ValueTask StageAsync(CancellationToken cancellationToken)
    {
        while (_uploads.Count >= inFlight)
        {
            await CompleteOldestAsync();
        }

        // Block ids are base64 of the same length for every block of a blob.
        var id = Convert.ToBase64String(Encoding.ASCII.GetBytes(_blocks.Count.ToString("d8", CultureInfo.InvariantCulture)));
        _blocks.Add(id);
        var content = new MemoryStream(_buffer, 0, _length, writable: false);
        _uploads.Enqueue((blob.StageBlockAsync(id, content, cancellationToken: cancellationToken), _buffer));
        _buffer = ArrayPool<byte>.Shared.Rent(blockBytes);
        _length = 0;
    }

    private async Task CompleteOldestAsync()
    {
        var (upload, buffer) = _uploads.Peek();
        await upload;
        _uploads.Dequeue();
        ArrayPool<byte>.Shared.Return(buffer);
    }

    /// <summary>Waits out the uploads still running (their failures are already someone's error) and returns every buffer.</summary>
    private async Task AbandonAsync()
    {
        while (_uploads.TryDequeue(out var pending))
        {
            try
            {
                await pending.Upload;
            }
            catch (Exception)
            {
                // The failure that stopped the stream is the one reported.
            }

            ArrayPool<byte>.Shared.Return(pending.Buffer);
        }

        ArrayPool<byte>.Shared.Return(_buffer);
        _buffer = [];
    }

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();
}
