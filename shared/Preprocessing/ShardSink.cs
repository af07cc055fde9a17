using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Specialized;
using Pipeline.Storage;

namespace Pipeline.Preprocessing;

/// <summary>
/// Where a build's shards go. The stage writes them as block blobs in the prepared folder; a benchmark
/// can pass a sink that costs nothing, so what remains is the stage's own CPU.
/// </summary>
public abstract class ShardSink
{
    /// <summary>The container named in each shard's path (<c>container/folder/train-00000.jsonl</c>).</summary>
    public abstract string Container { get; }

    /// <summary>A new, empty shard at <paramref name="path"/> (inside the container), written front to back.</summary>
    public abstract ValueTask<Stream> OpenAsync(string path, CancellationToken cancellationToken);

    /// <summary>Shards as block blobs, uploaded in blocks of <paramref name="blockBytes"/>.</summary>
    public static ShardSink Blobs(BlobContainerClient container, int blockBytes) => new BlobShardSink(container, blockBytes);

    private sealed class BlobShardSink(BlobContainerClient container, int blockBytes) : ShardSink
    {
        public override string Container => container.Name;

        /// <summary>Each block uploads while the stage goes on formatting the next (<see cref="BlockUploadStream"/>).</summary>
        public override ValueTask<Stream> OpenAsync(string path, CancellationToken cancellationToken) =>
            ValueTask.FromResult<Stream>(new BlockUploadStream(container.GetBlockBlobClient(path), blockBytes));
    }
}
