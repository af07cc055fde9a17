using System.Text.Json;
using Azure;
using Pipeline.Storage;

namespace Pipeline.Preprocessing;

/// <summary>A split's labelled rows: token ids and label ids, in shard order.</summary>
public sealed record LabelledRows(List<int[]> Tokens, int[] Labels)
{
    public int Count => Labels.Length;
}

/// <summary>Reads the rows of a prepared dataset's split from its shards (what trainers and the quantizer score).</summary>
public static class PreparedSplits
{
    /// <summary>
    /// The split's records with a label id in [0, <paramref name="classes"/>): <c>{"input_ids":[...],"label":k,...}</c>
    /// per shard line; other records are skipped. With no <paramref name="classes"/>, every record (label -1 where it has none).
    /// </summary>
    public static async Task<LabelledRows> ReadAsync(StorageClients storage, PreparedManifest prepared, string split, int? classes, CancellationToken cancellationToken)
    {
        var tokens = new List<int[]>();
        var labels = new List<int>();
        foreach (var shard in prepared.Shards.Where(s => s.Split == split))
        {
            var blob = storage.BlobAt(shard.Path) ?? throw new InvalidOperationException($"The prepared manifest lists a shard at '{shard.Path}', which is not a container/path.");
            Stream stream;
            try
            {
                stream = (await blob.DownloadStreamingAsync(cancellationToken: cancellationToken)).Value.Content;
            }
            catch (RequestFailedException e) when (e.Status == 404)
            {
                throw new InvalidOperationException($"The prepared shard {shard.Path} is missing: the prepared dataset was changed after it was written. Preprocess the dataset again.");
            }

            using var reader = new StreamReader(stream);
            while (await reader.ReadLineAsync(cancellationToken) is { } line)
            {
                using var record = JsonDocument.Parse(line);
                var id = record.RootElement.TryGetProperty("label", out var label) && label.ValueKind == JsonValueKind.Number ? label.GetInt32() : -1;
                if (classes is { } count && (id < 0 || id >= count))
                {
                    continue;
                }

                tokens.Add([.. record.RootElement.GetProperty("input_ids").EnumerateArray().Select(t => t.GetInt32())]);
                labels.Add(id);
            }
        }

        return new LabelledRows(tokens, [.. labels]);
    }
}
