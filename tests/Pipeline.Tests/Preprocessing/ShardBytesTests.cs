using System.Text;
using System.Text.Json;
using Pipeline.Preprocessing;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Preprocessing;

/// <summary>
/// The shard bytes of fixed inputs and recipes, pinned by their SHA-256 as the stage wrote them before its
/// hot path was rewritten for speed: the prepared id promises the same shards for the same recipe, so any
/// change to these hashes needs a new shard format version, not a new expected value.
/// </summary>
public sealed class ShardBytesTests(Azurite azurite) : IClassFixture<Azurite>
{
    public static TheoryData<string, string, string> Cases => new()
    {
        { "sentences", """{"shardRecords":300}""", "train:300:9a428f095c644081,train:300:ab007bf3716ed256,train:300:892e0878fe9aad1a,train:300:b9f33157f8cbe475,train:300:703285775a664047,train:91:b0ad16bdf8636545,validation:300:cf2b2fd585b940fe,validation:95:7942fbcef42b63d0" },
        { "sentences", """{"dedup":{"mode":"near"},"shardRecords":400,"seed":7}""", "train:400:584c06add542c4d2,train:400:0b47ea436693fb02,train:400:538677ac1d76aba1,train:388:9323b15ee7cfa054,validation:395:2b3069a15712ee34" },
        { "sentences", """{"tokenizer":{"kind":"wordpiece","files":"models/bert-base-uncased/"},"maxSequenceLength":12,"dedup":{"mode":"none"}}""", "train:1602:bf17dde0d652ffc5,validation:398:817b9e64f5baf088" },
        { "sentences", """{"tokenizer":{"encoding":"o200k_base"},"validationFraction":0.5}""", "train:995:9166b618c809e319,validation:991:5e87106ff734c371" },
        { "messy", """{"normalize":{"lowercase":true,"unicode":"NFKC"},"redact":{"emails":true,"phones":true,"ipAddresses":true},"maxSequenceLength":24}""", "train:311:09d159368258917c,validation:77:a1ae8dde90273f31" },
        { "messy", """{"normalize":{"unicode":"none","stripControl":false,"collapseWhitespace":false},"dedup":{"mode":"none"}}""", "train:321:5014487b1d7946be,validation:79:8e3b24aa8be0bd26" },
        { "messy", """{"tokenizer":{"kind":"wordpiece","files":"models/bert-base-uncased/","lowercase":false},"maxSequenceLength":16}""", "train:315:c7b6a852d84e62ef,validation:75:08cd5f516d3cc766" },
        { "chat", "{}", "train:97:49fd957516e1f306,validation:23:8da3d4c80fd4eafd" },
        { "chat", """{"chatTemplate":"plain","validationFraction":0}""", "train:120:f1f2247a1c6d7bbd" },
        { "completions", """{"maxSequenceLength":10}""", "train:121:86ca9ae4c6ae0d00,validation:29:68d674dd238bdbaf" },
        { "corpus", """{"packing":true,"maxSequenceLength":64}""", "train:94:13ef80ae3c5f0bfb,validation:24:b6f0bf8765220b8a" },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task Shards_are_byte_identical_to_the_pinned_format(string input, string recipeJson, string expected)
    {
        await azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient("bert-base-uncased/vocab.txt")
            .UploadAsync(RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt"), overwrite: true);
        using var pipeline = new TestPipeline(azurite);
        var run = await pipeline.IngestAsync($"{Guid.NewGuid():n}"[..8] + "-" + input + ".jsonl", Input(input));
        Assert.True(run.DatasetId is not null, run.Error);
        var dataset = (await pipeline.ManifestAsync(run.DatasetId!))!;
        var recipe = PreprocessRecipe.From(JsonDocument.Parse(recipeJson).RootElement);
        var tokenizers = await TokenizerSource.LoadAsync(azurite.Storage, recipe.Tokenizer, CancellationToken.None);
        var datasets = azurite.Storage.Container(StorageNames.Containers.Datasets);
        foreach (var parallelism in new[] { 1, 2 })
        {
            var builder = new PreparedDatasetBuilder(recipe, tokenizers, new PreprocessingOptions { Parallelism = parallelism, BatchRecords = 61 });
            var records = datasets.GetBlobClient(dataset.Records);
            var build = await builder.BuildAsync(async token => (await records.DownloadStreamingAsync(cancellationToken: token)).Value.Content, dataset, datasets, $"pinned-{Guid.NewGuid():n}/", null, CancellationToken.None);
            var actual = string.Join(',', build.Shards.Select(s => $"{s.Split}:{s.Records}:{s.Sha256[..16]}"));
            Assert.True(expected == actual, $"{input} {recipeJson} (parallelism {parallelism}): expected {expected}, got {actual}");
        }
    }

    [Fact]
    public async Task Any_shard_sink_receives_the_bytes_the_blobs_get_and_the_manifest_hashes()
    {
        using var pipeline = new TestPipeline(azurite);
        var run = await pipeline.IngestAsync($"{Guid.NewGuid():n}"[..8] + "-sentences.jsonl", Input("sentences"));
        var dataset = (await pipeline.ManifestAsync(run.DatasetId!))!;
        var recipe = PreprocessRecipe.From(JsonDocument.Parse("""{"shardRecords":700}""").RootElement);
        var tokenizers = await TokenizerSource.LoadAsync(azurite.Storage, recipe.Tokenizer, CancellationToken.None);
        var datasets = azurite.Storage.Container(StorageNames.Containers.Datasets);
        var builder = new PreparedDatasetBuilder(recipe, tokenizers, new PreprocessingOptions { Parallelism = 2 });

        var folder = $"sink-{Guid.NewGuid():n}/";
        await using (var records = (await datasets.GetBlobClient(dataset.Records).DownloadStreamingAsync()).Value.Content)
        {
            await builder.BuildAsync(records, dataset, datasets, folder, null, CancellationToken.None);
        }

        var sink = new MemorySink();
        BuildResult build;
        await using (var records = (await datasets.GetBlobClient(dataset.Records).DownloadStreamingAsync()).Value.Content)
        {
            build = await builder.BuildAsync(records, dataset, sink, folder, null, CancellationToken.None);
        }

        Assert.Equal(["train-00000.jsonl", "train-00001.jsonl", "train-00002.jsonl", "validation-00000.jsonl"], sink.Shards.Keys.Select(k => k[folder.Length..]).Order());
        foreach (var shard in build.Shards)
        {
            Assert.StartsWith("memory/" + folder, shard.Path);
            var bytes = sink.Shards[shard.Path["memory/".Length..]].ToArray();
            Assert.Equal(shard.Sha256, Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(bytes)));
            var blob = (await datasets.GetBlobClient(shard.Path["memory/".Length..]).DownloadContentAsync()).Value.Content.ToArray();
            Assert.Equal(blob, bytes);
            Assert.Equal(shard.Records, bytes.Count(b => b == (byte)'\n'));
        }
    }

    /// <summary>Shards kept in memory, as a sink other than blobs.</summary>
    /// <summary>Fixed inputs: canonical records of every kind, with the characters normalization and redaction act on.</summary>
    private static string Input(string name)
    {
        var lines = new List<string>();
        switch (name)
        {
            case "sentences":
                foreach (var file in new[] { "yelp_labelled.txt", "amazon_cells_labelled.txt" })
                {
                    foreach (var line in File.ReadLines(RepoPaths.RequireSharedData("sentiment/" + file)).Where(l => l.Contains('\t')))
                    {
                        var parts = line.Split('\t');
                        lines.Add(JsonSerializer.Serialize(new { text = parts[0], label = int.Parse(parts[1].Trim()) }));
                    }
                }

                break;
            case "messy":
                string[] pieces =
                [
                    "Cafe\u0301", "ｆｕｌｌｗｉｄｔｈ", "tab\there", "bell\u0007", "zero\u200bwidth", "NEL\u0085x", "  padded  ", "bob.smith@example.com",
                    "+1 (555) 123-4567", "10.0.0.12", "fe80::1ff:fe23:4567:890a", "emoji 😀", "日本語のテキスト", "ﬁ ligature", "UPPER", "snake_case",
                    "$100 + <tag>", "line\nbreak", "quote \" and \\ backslash", "Ünïcödé", "a", "word",
                ];
                var random = new Random(14);
                for (var i = 0; i < 400; i++)
                {
                    var text = string.Join(' ', Enumerable.Range(0, 1 + random.Next(12)).Select(_ => pieces[random.Next(pieces.Length)]));
                    lines.Add(JsonSerializer.Serialize(new { text, label = random.Next(3) switch { 0 => "neg", 1 => "pos", _ => "mixed" } }));
                }

                break;
            case "chat":
                for (var i = 0; i < 120; i++)
                {
                    lines.Add(JsonSerializer.Serialize(new
                    {
                        messages = new[]
                        {
                            new { role = "system", content = "Be brief." },
                            new { role = "user", content = $"Question {i % 90}: what is {i % 90} \u00d7 {i % 7}?" },
                            new { role = "assistant", content = $"It is {i % 90 * (i % 7)}." },
                        },
                    }));
                }

                break;
            case "completions":
                for (var i = 0; i < 150; i++)
                {
                    lines.Add(JsonSerializer.Serialize(new { prompt = $"Translate to French: the {i % 120} cats", completion = $"les {i % 120} chats, r\u00e9ponse num\u00e9ro {i}" }));
                }

                break;
            default:
                for (var i = 0; i < 500; i++)
                {
                    lines.Add(JsonSerializer.Serialize(new { text = $"Document {i} talks about item {i * 31 % 97} and more words after it." }));
                }

                break;
        }

        return string.Join('\n', lines) + "\n";
    }
}
