using System.Buffers;
using System.Text;
using System.Text.Json;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Azure.Storage.Blobs.Specialized;
using Pipeline.Models;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// The layout of <c>outputs/&lt;batchId&gt;/</c> and the JSON Lines it holds:
/// <c>batch.json</c> (written before any shard), <c>shards/NNNNN/{input,results,errors,ledger}.jsonl</c>,
/// <c>done/NNNNN.json</c> (a shard's commit), <c>plan.json</c> (once the input is split), and the
/// assembled <c>results.jsonl</c>, <c>errors.jsonl</c>, <c>ledger.jsonl</c> (and, for an input in OpenAI's batch
/// format, <c>openai/output.jsonl</c> and <c>openai/errors.jsonl</c>) with <c>manifest.json</c> last.
/// That is version 1 of the batch. Committed files are never rewritten: a <c>retry-failed</c> merged into the
/// batch writes its next version under <c>versions/NNNNN/</c> (the shards it changed, their done markers, the
/// assembled files and a manifest naming the version it supersedes), and readers take the newest committed
/// version (<see cref="NewestAsync"/>). The input (<c>batch.json</c>, <c>plan.json</c>, shard inputs) is the batch's, not a version's.
/// </summary>
public sealed class BatchFiles(StorageClients storage, string batchId, int version = 1)
{
    public const string RowsMetadata = "rows";
    public const string FailedMetadata = "failed";

    private const string VersionsFolder = "versions/";

    public BlobContainerClient Container { get; } = storage.Container(StorageNames.Containers.Outputs);
    public string BatchId { get; } = batchId;
    public string Prefix => $"{BatchId}/";

    /// <summary>The version of the batch whose outputs these are: 1 in the batch's folder itself, later ones under <c>versions/NNNNN/</c>.</summary>
    public int Version { get; } = version >= 1 ? version : throw new ArgumentOutOfRangeException(nameof(version), version, "Batch versions start at 1.");

    /// <summary>The folder of this version's outputs.</summary>
    public string VersionPrefix => Version == 1 ? Prefix : $"{Prefix}{VersionsFolder}{Version:D5}/";

    public BlobClient Batch => Blob("batch.json");
    public BlobClient Plan => Blob("plan.json");
    public BlobClient Manifest => Output("manifest.json");
    public BlobClient Results => Output("results.jsonl");
    public BlobClient Errors => Output("errors.jsonl");
    public BlobClient Ledger => Output("ledger.jsonl");
    /// <summary>OpenAI's batch output and error files, for an input in that format.</summary>
    public BlobClient OpenAiOutput => Output("openai/output.jsonl");
    public BlobClient OpenAiErrors => Output("openai/errors.jsonl");

    public BlobClient ShardInput(int shard) => Blob($"shards/{shard:D5}/input.jsonl");
    public BlobClient ShardResults(int shard) => Output($"shards/{shard:D5}/results.jsonl");
    public BlobClient ShardErrors(int shard) => Output($"shards/{shard:D5}/errors.jsonl");
    public BlobClient ShardLedger(int shard) => Output($"shards/{shard:D5}/ledger.jsonl");
    public BlobClient ShardOpenAiOutput(int shard) => Output($"shards/{shard:D5}/openai-output.jsonl");
    public BlobClient ShardOpenAiErrors(int shard) => Output($"shards/{shard:D5}/openai-errors.jsonl");
    public BlobClient Done(int shard) => Output($"done/{shard:D5}.json");

    public string PathOf(BlobClient blob) => $"{StorageNames.Containers.Outputs}/{blob.Name}";

    /// <summary>The same batch's files at another version.</summary>
    public BatchFiles AtVersion(int other) => new(storage, BatchId, other);

    /// <summary>The files holding <paramref name="shard"/>'s outputs as of a version whose manifest has <paramref name="shardVersions"/>.</summary>
    public BatchFiles OfShard(int shard, IReadOnlyDictionary<int, int>? shardVersions) =>
        AtVersion(shardVersions?.GetValueOrDefault(shard, 1) ?? 1);

    /// <summary>
    /// The newest committed version of the batch (the highest <c>versions/NNNNN/</c> with a manifest, else the
    /// batch's own manifest) and its files; null when the batch has not finished (or does not exist).
    /// </summary>
    public async Task<(InferenceManifest Manifest, BatchFiles Files)?> NewestAsync(CancellationToken cancellationToken)
    {
        var versions = new List<int>();
        await foreach (var item in Container.GetBlobsByHierarchyAsync(BlobTraits.None, BlobStates.None, "/", Prefix + VersionsFolder, cancellationToken))
        {
            if (item.IsPrefix && int.TryParse(item.Prefix.AsSpan(Prefix.Length + VersionsFolder.Length).TrimEnd('/'), out var number) && number > 1)
            {
                versions.Add(number);
            }
        }

        versions.Sort();
        versions.Reverse();
        versions.Add(1);
        foreach (var number in versions)
        {
            var files = AtVersion(number);
            if (await BlobJson.ReadAsync(files.Manifest, InferenceJson.Default.InferenceManifest, cancellationToken) is { } manifest)
            {
                return (manifest, files);
            }
        }

        return null;
    }

    private BlobClient Blob(string name) => Container.GetBlobClient(Prefix + name);

    private BlobClient Output(string name) => Container.GetBlobClient(VersionPrefix + name);

    /// <summary>Finished shards: index, rows and failed rows, from the done markers' metadata (one listing call).</summary>
    public async Task<List<(int Shard, long Rows, long Failed)>> ListDoneAsync(CancellationToken cancellationToken)
    {
        var done = new List<(int, long, long)>();
        await foreach (var item in Container.GetBlobsAsync(BlobTraits.Metadata, BlobStates.None, Prefix + "done/", cancellationToken))
        {
            var name = Path.GetFileNameWithoutExtension(item.Name);
            if (int.TryParse(name, out var shard))
            {
                done.Add((shard, Count(item.Metadata, RowsMetadata), Count(item.Metadata, FailedMetadata)));
            }
        }

        return done;
    }

    private static long Count(IDictionary<string, string> metadata, string key) =>
        metadata.TryGetValue(key, out var value) ? long.Parse(value, System.Globalization.CultureInfo.InvariantCulture) : 0;

    public async Task<List<ShardInputRow>> ReadInputAsync(int shard, CancellationToken cancellationToken)
    {
        var rows = new List<ShardInputRow>();
        await foreach (var line in ReadLinesAsync(ShardInput(shard), cancellationToken))
        {
            rows.Add(JsonSerializer.Deserialize(line, InferenceJson.Default.ShardInputRow)!);
        }

        return rows;
    }

    /// <summary>The lines of a JSON Lines blob (none when it does not exist).</summary>
    public static async IAsyncEnumerable<string> ReadLinesAsync(BlobClient blob, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
    {
        Stream stream;
        try
        {
            stream = (await blob.DownloadStreamingAsync(cancellationToken: cancellationToken)).Value.Content;
        }
        catch (Azure.RequestFailedException e) when (e.Status == 404)
        {
            yield break;
        }

        using var reader = new StreamReader(stream, Encoding.UTF8);
        while (await reader.ReadLineAsync(cancellationToken) is { } line)
        {
            if (line.Length > 0)
            {
                yield return line;
            }
        }
    }

    /// <summary>The <c>row</c> number a results, errors or ledger line starts with.</summary>
    public static long RowOf(string line)
    {
        var reader = new Utf8JsonReader(Encoding.UTF8.GetBytes(line));
        while (reader.Read())
        {
            if (reader.TokenType == JsonTokenType.PropertyName && reader.ValueTextEquals("row") && reader.Read())
            {
                return reader.GetInt64();
            }
        }

        throw new FormatException($"A batch line has no row number: {line[..Math.Min(80, line.Length)]}");
    }

    /// <summary>
    /// Concatenates blobs into one, streaming, in the given order. Blocks are staged and committed only once
    /// every part was read, so an interruption never leaves a truncated blob in place of the old one.
    /// </summary>
    public static async Task ConcatenateAsync(IEnumerable<BlobClient> parts, BlobClient target, CancellationToken cancellationToken)
    {
        const int blockBytes = 8 * 1024 * 1024;
        var block = target.GetParentBlobContainerClient().GetBlockBlobClient(target.Name);
        var ids = new List<string>();
        var buffer = new byte[blockBytes];
        var filled = 0;
        async Task StageAsync()
        {
            var id = Convert.ToBase64String(BitConverter.GetBytes((long)ids.Count));
            await block.StageBlockAsync(id, new MemoryStream(buffer, 0, filled, writable: false), cancellationToken: cancellationToken);
            ids.Add(id);
            filled = 0;
        }

        foreach (var part in parts)
        {
            Stream input;
            try
            {
                input = (await part.DownloadStreamingAsync(cancellationToken: cancellationToken)).Value.Content;
            }
            catch (Azure.RequestFailedException e) when (e.Status == 404)
            {
                continue;
            }

            await using (input)
            {
                int read;
                while ((read = await input.ReadAsync(buffer.AsMemory(filled, blockBytes - filled), cancellationToken)) > 0)
                {
                    filled += read;
                    if (filled == blockBytes)
                    {
                        await StageAsync();
                    }
                }
            }
        }

        if (filled > 0)
        {
            await StageAsync();
        }

        await block.CommitBlockListAsync(ids, cancellationToken: cancellationToken);
    }
}

/// <summary>Writes the JSON Lines of a shard: results, errors and the per-row ledger.</summary>
public sealed class BatchLineWriter
{
    private readonly ArrayBufferWriter<byte> _buffer = new(1 << 16);
    private readonly Utf8JsonWriter _json;

    public BatchLineWriter() => _json = new Utf8JsonWriter(_buffer, new JsonWriterOptions { SkipValidation = true });

    public BinaryData ToBinaryData() => new(_buffer.WrittenMemory.ToArray());

    public void Result(ShardInputRow row, float[] values, ModelManifest model, int? tokens = null)
    {
        Start(row);
        if (tokens is { } count)
        {
            _json.WriteNumber("tokens", count);
        }

        if (model.Task == ModelTasks.Classification)
        {
            var best = 0;
            for (var i = 1; i < values.Length; i++)
            {
                best = values[i] > values[best] ? i : best;
            }

            _json.WriteString("label", LabelName(model, best));
            _json.WritePropertyName("probabilities");
            _json.WriteStartObject();
            for (var i = 0; i < values.Length; i++)
            {
                _json.WriteNumber(LabelName(model, i), MathF.Round(values[i], 6));
            }

            _json.WriteEndObject();
        }
        else
        {
            _json.WritePropertyName("embedding");
            _json.WriteStartArray();
            foreach (var value in values)
            {
                _json.WriteNumberValue(value);
            }

            _json.WriteEndArray();
        }

        End();
    }

    public void Error(ShardInputRow row, string code, string error)
    {
        Start(row);
        _json.WriteNumber("line", row.Line);
        _json.WriteString("code", code);
        _json.WriteString("error", error);
        End();
    }

    public void LedgerEntry(ShardInputRow row, bool succeeded, int attempts, string? code, string? error)
    {
        Start(row);
        _json.WriteString("status", succeeded ? "succeeded" : "failed");
        _json.WriteNumber("attempts", attempts);
        if (!succeeded)
        {
            _json.WriteString("code", code);
            _json.WriteString("error", error);
        }

        End();
    }

    /// <summary>A line as it is (when merging a retry into a batch).</summary>
    public void Raw(string line)
    {
        _json.Flush();
        Encoding.UTF8.GetBytes(line, _buffer);
        _buffer.Write("\n"u8);
    }

    private void Start(ShardInputRow row)
    {
        _json.Reset();
        _json.WriteStartObject();
        _json.WriteNumber("row", row.Row);
        if (row.CustomId is not null)
        {
            _json.WriteString("custom_id", row.CustomId);
        }
    }

    private void End()
    {
        _json.WriteEndObject();
        _json.Flush();
        _buffer.Write("\n"u8);
    }

    internal static string LabelName(ModelManifest model, int index) => index < model.Labels.Count ? model.Labels[index] : index.ToString(System.Globalization.CultureInfo.InvariantCulture);
}

/// <summary>Finished batches: the newest committed version of every <c>outputs/&lt;batchId&gt;/</c>, newest first.</summary>
public static class BatchCatalog
{
    public static async Task<List<InferenceManifest>> ListAsync(StorageClients storage, CancellationToken cancellationToken)
    {
        var outputs = storage.Container(StorageNames.Containers.Outputs);
        var batches = new List<InferenceManifest>();
        await foreach (var item in outputs.GetBlobsByHierarchyAsync(BlobTraits.None, BlobStates.None, "/", "bt-", cancellationToken))
        {
            if (item.IsPrefix && await new BatchFiles(storage, item.Prefix.TrimEnd('/')).NewestAsync(cancellationToken) is (var manifest, _))
            {
                batches.Add(manifest);
            }
        }

        return [.. batches.OrderByDescending(b => b.CreatedAt)];
    }
}
