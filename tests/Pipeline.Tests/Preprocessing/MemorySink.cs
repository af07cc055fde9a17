using Pipeline.Preprocessing;

namespace Pipeline.Tests.Preprocessing;

/// <summary>Shards kept in memory, by path, as the stage wrote them.</summary>
internal sealed class MemorySink : ShardSink
{
    public Dictionary<string, MemoryStream> Shards { get; } = [];

    public override string Container => "memory";

    public override ValueTask<Stream> OpenAsync(string path, CancellationToken cancellationToken)
    {
        var stream = new MemoryStream();
        Shards[path] = stream;
        return ValueTask.FromResult<Stream>(stream);
    }
}
