using System.Text;
using System.Text.Json;
using Pipeline.Ingestion;
using Pipeline.Preprocessing;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Preprocessing;

/// <summary>
/// The build's workers race for batches and commit them in record order; these run many workers over
/// small batches at once, so batches finish out of order and commits pass from worker to worker.
/// </summary>
public sealed class BuildWorkersTests(Azurite azurite) : IClassFixture<Azurite>
{
    private const int Records = 6_000;

    [Fact]
    public async Task Many_workers_over_small_batches_write_the_bytes_one_worker_writes()
    {
        var (tokenizers, dataset, lines) = await SetUpAsync(badLine: null);
        var recipe = new PreprocessRecipe();
        var (one, stats) = await BuildAsync(recipe, tokenizers, dataset, lines, parallelism: 1, batchRecords: 256);
        Assert.Equal(Records / 50, stats.ExactDuplicatesRemoved);
        Assert.Equal(Records - stats.ExactDuplicatesRemoved, one.Values.Sum(b => Encoding.UTF8.GetString(b).Count(c => c == '\n')));
        foreach (var (parallelism, batch) in new[] { (8, 7), (16, 1), (3, 1000) })
        {
            var (many, manyStats) = await BuildAsync(recipe, tokenizers, dataset, lines, parallelism, batch);
            Assert.Equal(stats.ExactDuplicatesRemoved, manyStats.ExactDuplicatesRemoved);
            Assert.Equal(stats.DuplicateSamples, manyStats.DuplicateSamples);
            Assert.Equal(one.Keys.Order(), many.Keys.Order());
            foreach (var (path, bytes) in one)
            {
                Assert.True(bytes.AsSpan().SequenceEqual(many[path]), $"{path} differs with {parallelism} workers over batches of {batch}");
            }
        }
    }

    [Fact]
    public async Task A_record_that_fails_one_worker_fails_the_build_with_its_own_error()
    {
        var (tokenizers, dataset, lines) = await SetUpAsync(badLine: 4_321);
        foreach (var (parallelism, batch) in new[] { (1, 256), (8, 5) })
        {
            var error = await Assert.ThrowsAsync<PreprocessingRejectedException>(() => BuildAsync(new PreprocessRecipe(), tokenizers, dataset, lines, parallelism, batch));
            Assert.Contains("line 4321", error.Message);
            Assert.Contains("'unlisted'", error.Message);
        }
    }

    private async Task<(TokenizerSource Tokenizers, DatasetManifest Dataset, byte[] Lines)> SetUpAsync(long? badLine)
    {
        var text = new StringBuilder();
        for (var line = 1; line <= Records; line++)
        {
            // Every 50th record repeats the text and label of the record 17 lines before it, so the exact-dedup
            // table meets duplicates across batches (and across workers).
            var source = line % 50 == 0 ? line - 17 : line;
            var label = line == badLine ? "unlisted" : source % 3 == 0 ? "neg" : "pos";
            var body = $"record number {source} says the room was {(source % 7 == 0 ? "clean" : "noisy")}";
            text.Append(JsonSerializer.Serialize(new { text = body, label, line })).Append('\n');
        }

        var dataset = new DatasetManifest
        {
            DatasetId = "workers",
            Format = "jsonl",
            FormatReason = "test",
            RecordKind = RecordKinds.Text,
            LabelType = "string",
            LabelCounts = new() { ["pos"] = 4_000, ["neg"] = 2_000 },
            Counts = new IngestCounts { Lines = Records, Read = Records, Valid = Records },
            Sha256 = "",
            SourceBlob = "",
            SourceETag = "",
            RunId = "workers",
            Records = "",
            Errors = "",
            CreatedAt = DateTimeOffset.UnixEpoch,
            TimingsMs = [],
            SettingsFingerprint = "",
        };
        var tokenizers = await TokenizerSource.LoadAsync(azurite.Storage, new PreprocessRecipe().Tokenizer, CancellationToken.None);
        return (tokenizers, dataset, Encoding.UTF8.GetBytes(text.ToString()));
    }

    private static async Task<(Dictionary<string, byte[]> Shards, PreparedStats Stats)> BuildAsync(PreprocessRecipe recipe, TokenizerSource tokenizers, DatasetManifest dataset, byte[] lines, int parallelism, int batchRecords)
    {
        var builder = new PreparedDatasetBuilder(recipe, tokenizers, new PreprocessingOptions { Parallelism = parallelism, BatchRecords = batchRecords });
        var sink = new MemorySink();
        var build = await builder.BuildAsync(new MemoryStream(lines, writable: false), dataset, sink, "workers/", null, CancellationToken.None);
        return (sink.Shards.ToDictionary(s => s.Key, s => s.Value.ToArray()), build.Stats);
    }
}
