using System.Buffers;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Ingestion;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Testing;

namespace Pipeline.Bench;

/// <summary>Ingestion throughput and peak memory against the read-only limit, in one process, on one core.</summary>
public static class IngestionBench
{
    public static async Task RunAsync(int[] sizes)
    {
        using var azurite = new AzuriteServer();
        await azurite.StartAsync();
        // Azurite on the second core, this process on the first: "one core" for the code under test.
        if (OperatingSystem.IsLinux() && Environment.ProcessorCount >= 2)
        {
            CpuAffinity.Pin(azurite.Process, 2UL);
            CpuAffinity.Pin(Process.GetCurrentProcess(), 1UL);
        }
        using var services = BenchServices.Create(azurite);
        var storage = services.GetRequiredService<StorageClients>();
        var incoming = storage.Container(StorageNames.Containers.Incoming);

        // Warm-up: let the JIT tier the hot paths up (on one core this takes a few seconds of work), as a
        // long-running host would have done before its second file.
        {
            var warm = "warm-up.jsonl";
            var warmBytes = await UploadAsync(incoming.GetBlobClient(warm), Math.Min(16, sizes.Min()));
            var warmEtag = (await incoming.GetBlobClient(warm).GetPropertiesAsync()).Value.ETag.ToString().Trim('"');
            for (var i = 0; i < 8; i++)
            {
                await ReadOnlyAsync(incoming, warm);
                await CoreOnlyAsync(incoming, warm, warmBytes);
                await StageAsync(services, warm, warmEtag, -i);
            }
        }

        Console.WriteLine($"Ingestion benchmark: {Environment.ProcessorCount} logical cores visible, pinned to core 0; Azurite pinned to core 1.");
        Console.WriteLine();
        Console.WriteLine("| File | Phase | MB/s (best of 3) | ratio to read-only | peak working set |");
        Console.WriteLine("| --- | --- | --- | --- | --- |");
        // The bar's figure: processing with outputs discarded against the read-only limit, the lowest over the sizes.
        var processing = double.MaxValue;
        foreach (var sizeMb in sizes)
        {
            var name = $"bench-{sizeMb}mb.jsonl";
            var bytes = await UploadAsync(incoming.GetBlobClient(name), sizeMb);
            var etag = (await incoming.GetBlobClient(name).GetPropertiesAsync()).Value.ETag.ToString().Trim('"');

            // The limit, the bar's phase and our code alone (from the blob's bytes in memory: no HTTP read) in
            // turns, so that the ratios compare runs under the same conditions on a machine whose speed drifts.
            var content = (await incoming.GetBlobClient(name).DownloadContentAsync()).Value.Content.ToArray();
            var phases = await Measure.BestOfInterleavedAsync(3, () => ReadOnlyAsync(incoming, name), () => CoreOnlyAsync(incoming, name, bytes), () => InMemoryAsync(content, name));
            var (read, core, memory) = (phases[0], phases[1], phases[2]);
            Row(sizeMb, "read blob, no processing (limit)", bytes, read, read);

            var copy = await Measure.BestOfAsync(3, () => ReadAndWriteAsync(storage, name));
            Row(sizeMb, "read blob + write it to a new blob, no processing (I/O limit of the stage)", bytes, copy, read);
            Row(sizeMb, "parse + validate + write, outputs discarded", bytes, core, read);
            Row(sizeMb, "parse + validate + write from memory, outputs discarded (our code alone)", bytes, memory, read);

            var attempt = 0;
            var stage = await Measure.BestOfAsync(3, () => StageAsync(services, name, etag, ++attempt));
            Row(sizeMb, "full ingestion stage (staging, copy, manifest)", bytes, stage, read);
            processing = Math.Min(processing, read.Seconds / core.Seconds);
        }

        Console.WriteLine();
        Console.WriteLine($"ingestion/read: {processing.ToString("F2", CultureInfo.InvariantCulture)}x");
    }

    private static void Row(int sizeMb, string phase, long bytes, Measure.Result result, Measure.Result baseline) =>
        Console.WriteLine($"| {sizeMb} MB | {phase} | {bytes / result.Seconds / 1e6:N1} | {baseline.Seconds / result.Seconds:P0} | {result.PeakBytes / 1e6:N0} MB |");

    private static async Task<long> UploadAsync(Azure.Storage.Blobs.BlobClient blob, int sizeMb)
    {
        var random = new Random(42);
        string[] words = ["the", "service", "was", "slow", "but", "food", "great", "never", "again", "loved", "this", "place", "and", "staff", "friendly", "cold", "soup"];
        var path = Path.Combine(Path.GetTempPath(), $"pipeline-bench-{sizeMb}.jsonl");
        long written = 0;
        await using (var file = new StreamWriter(path, false, new UTF8Encoding(false), 1 << 20))
        {
            var line = new StringBuilder();
            for (var i = 0; written < sizeMb * 1_000_000L; i++)
            {
                line.Clear().Append("{\"custom_id\":\"r").Append(i).Append("\",\"text\":\"");
                var count = 6 + random.Next(14);
                for (var w = 0; w < count; w++)
                {
                    line.Append(w == 0 ? "" : " ").Append(words[random.Next(words.Length)]);
                }

                line.Append(i % 97 == 0 ? " \\\"quoted\\\" caf\u00e9" : "").Append("\",\"label\":").Append(i % 2).Append("}\n");
                await file.WriteAsync(line);
                written += Encoding.UTF8.GetByteCount(line.ToString());
            }
        }

        await using (var stream = File.OpenRead(path))
        {
            await blob.UploadAsync(stream, new BlobUploadOptions { TransferOptions = new Azure.Storage.StorageTransferOptions { MaximumTransferSize = 8 << 20 } });
        }

        File.Delete(path);
        return written;
    }

    private static async Task ReadOnlyAsync(Azure.Storage.Blobs.BlobContainerClient container, string name)
    {
        var download = await container.GetBlobClient(name).DownloadStreamingAsync();
        await using var stream = download.Value.Content;
        var buffer = ArrayPool<byte>.Shared.Rent(1 << 20);
        while (await stream.ReadAsync(buffer) > 0)
        {
        }

        ArrayPool<byte>.Shared.Return(buffer);
    }

    private static async Task ReadAndWriteAsync(StorageClients storage, string name)
    {
        var download = await storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).DownloadStreamingAsync();
        await using var source = download.Value.Content;
        var target = storage.Container(StorageNames.Containers.Datasets).GetBlobClient($"bench-copy/{name}");
        await using (var destination = await target.OpenWriteAsync(overwrite: true, new BlobOpenWriteOptions { BufferSize = new IngestionOptions().UploadBlockBytes }))
        {
            await source.CopyToAsync(destination, 1 << 20);
        }

        await target.DeleteAsync();
    }

    private static async Task CoreOnlyAsync(Azure.Storage.Blobs.BlobContainerClient container, string name, long length)
    {
        var download = await container.GetBlobClient(name).DownloadStreamingAsync();
        await using var stream = download.Value.Content;
        await DiscardingIngestAsync(stream, name, length);
    }

    private static async Task InMemoryAsync(byte[] content, string name)
    {
        using var stream = new MemoryStream(content, writable: false);
        await DiscardingIngestAsync(stream, name, content.Length);
    }

    /// <summary>The stage's record processing over <paramref name="source"/>, its records and errors discarded.</summary>
    private static async Task DiscardingIngestAsync(Stream source, string name, long length)
    {
        var options = new IngestionOptions();
        await new DatasetIngestor(options).RunAsync(source, name, length, options.Resolve(null), Stream.Null, Stream.Null, null, CancellationToken.None);
    }

    private static async Task StageAsync(ServiceProvider services, string name, string etag, int attempt)
    {
        // A fresh run id each time, and no existing dataset, so every repetition does the whole work.
        var storage = services.GetRequiredService<StorageClients>();
        var handler = services.GetRequiredService<IngestHandler>();
        var runId = $"bench-{attempt}-{Guid.NewGuid():n}";
        await handler.IngestAsync(new IngestRequest(StorageNames.Containers.Incoming, name, etag, runId, null), 1, CancellationToken.None);
        var run = await services.GetRequiredService<RunStore>().GetAsync(runId);
        if (run?.DatasetId is not { } datasetId)
        {
            throw new InvalidOperationException($"Ingestion failed: {run?.Error}");
        }

        // Remove the dataset so the next repetition is not a cache hit.
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        await foreach (var blob in datasets.GetBlobsAsync(BlobTraits.None, BlobStates.None, datasetId + "/", default))
        {
            await datasets.DeleteBlobAsync(blob.Name);
        }
    }
}
