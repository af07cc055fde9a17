using Azure.Storage.Blobs.Models;
using Azure.Storage.Blobs.Specialized;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Storage;

/// <summary>The background block uploads against Azurite: the blob gets every byte, in order, in blocks of the set size.</summary>
public sealed class BlockUploadStreamTests(Azurite azurite) : IClassFixture<Azurite>
{
    [Theory]
    [InlineData(0, 0)]
    [InlineData(999, 1)]
    [InlineData(1000, 1)]
    [InlineData(10_500, 11)]
    public async Task The_blob_holds_the_bytes_written_in_blocks_of_the_set_size(int bytes, int blocks)
    {
        var container = azurite.Storage.Container(StorageNames.Containers.Datasets);
        var blob = container.GetBlockBlobClient($"upload-stream/{Guid.NewGuid():n}.bin");
        var content = Enumerable.Range(0, bytes).Select(i => (byte)(i * 31 % 251)).ToArray();
        await using (var stream = new BlockUploadStream(blob, blockBytes: 1000, inFlight: 3))
        {
            // Writes of uneven sizes, so blocks fill across writes.
            for (var at = 0; at < bytes;)
            {
                var take = Math.Min(bytes - at, 1 + (at % 777));
                await stream.WriteAsync(content.AsMemory(at, take));
                at += take;
            }
        }

        Assert.Equal(content, (await blob.DownloadContentAsync()).Value.Content.ToArray());
        var list = (await blob.GetBlockListAsync(BlockListTypes.Committed)).Value;
        Assert.Equal(blocks, list.CommittedBlocks.Count());
        Assert.All(list.CommittedBlocks.SkipLast(1), b => Assert.Equal(1000, b.SizeLong));
    }

    [Fact]
    public async Task A_failed_upload_fails_the_stream_and_commits_nothing()
    {
        var blob = azurite.Storage.Container(StorageNames.Containers.Datasets).GetBlockBlobClient($"upload-stream/{Guid.NewGuid():n}.bin");
        var stream = new BlockUploadStream(blob, blockBytes: 100, inFlight: 1);
        await stream.WriteAsync(new byte[150]);
        // The second block's upload is cancelled: the stream fails when it waits for it, and commits no block list.
        await stream.WriteAsync(new byte[100], new CancellationToken(canceled: true));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await stream.DisposeAsync());
        await stream.DisposeAsync();
        Assert.False(await blob.ExistsAsync());
    }
}
