using System.Text;
using System.Text.Json;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Preprocessing;

/// <summary>The preprocessing stage against Azurite: recipes, shards, statistics, the report gate and idempotency.</summary>
public sealed class PreprocessHandlerTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static string Unique(string name) => $"{Guid.NewGuid():n}"[..8] + "-" + name;

    private sealed record Shard(int[] Ids, int? Label, int? PromptLength, long Line);

    private sealed record Prepared(RunRecord Run, PreparedManifest? Manifest, PreparedStats? Stats, List<Shard> Train, List<Shard> Validation);

    /// <summary>Ingests <paramref name="content"/>, then preprocesses it with <paramref name="spec"/> (a run spec JSON).</summary>
    private async Task<Prepared> PrepareAsync(TestPipeline pipeline, string name, string content, string? spec = null)
    {
        var run = await pipeline.IngestAsync(Unique(name), content);
        Assert.True(run.DatasetId is not null, run.Error);
        var runSpec = spec is null ? null : RunSpec.Parse(Encoding.UTF8.GetBytes(spec), "test");
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, "", runSpec), run.RunId, 1, CancellationToken.None);
        return await ReadAsync(pipeline, run.RunId);
    }

    private static async Task<Prepared> ReadAsync(TestPipeline pipeline, string runId)
    {
        var run = (await pipeline.Runs.GetAsync(runId))!;
        if (!run.GetArtifacts().TryGetValue("preparedManifest", out var path))
        {
            return new Prepared(run, null, null, [], []);
        }

        var manifest = JsonSerializer.Deserialize(await pipeline.ReadAsync(StorageNames.Containers.Datasets, path["datasets/".Length..]), PreprocessJson.Default.PreparedManifest)!;
        var stats = JsonSerializer.Deserialize(await pipeline.ReadAsync(StorageNames.Containers.Datasets, manifest.Stats["datasets/".Length..]), PreprocessJson.Default.PreparedStats)!;
        async Task<List<Shard>> Split(string split)
        {
            var rows = new List<Shard>();
            foreach (var shard in manifest.Shards.Where(s => s.Split == split))
            {
                foreach (var row in await pipeline.ReadJsonLinesAsync(StorageNames.Containers.Datasets, shard.Path["datasets/".Length..]))
                {
                    rows.Add(new Shard(
                        [.. row.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32())],
                        row.TryGetProperty("label", out var l) ? l.GetInt32() : null,
                        row.TryGetProperty("prompt_length", out var p) ? p.GetInt32() : null,
                        row.GetProperty("line").GetInt64()));
                }
            }

            return rows;
        }

        return new Prepared(run, manifest, stats, await Split("train"), await Split("validation"));
    }

    private static string Sentences() => File.ReadAllText(RepoPaths.RequireSharedData("sentiment/yelp_labelled.txt"));

    private async Task<TextTokenizer> TokenizerAsync(TokenizerSpec spec) => (await TokenizerSource.LoadAsync(azurite.Storage, spec, CancellationToken.None)).Create();

    private async Task UploadBertAsync() =>
        await azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient("bert-base-uncased/vocab.txt")
            .UploadAsync(RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt"), overwrite: true);

    [Fact]
    public async Task Default_recipe_tokenizes_splits_and_reports_the_labelled_sentences()
    {
        using var pipeline = new TestPipeline(azurite);
        var result = await PrepareAsync(pipeline, "yelp.txt", Sentences());

        Assert.Equal(RunStatus.Succeeded, result.Run.Status);
        Assert.Equal(RunStatus.Succeeded, result.Run.GetStages()[Stages.Preprocess]);
        var manifest = result.Manifest!;
        var stats = result.Stats!;
        Assert.Equal(["0", "1"], manifest.Labels);
        Assert.Equal("tiktoken:cl100k_base", manifest.TokenizerFingerprint);
        Assert.Equal(1000, stats.RecordsRead);
        Assert.Equal(stats.RecordsRead, stats.Train.Records + stats.Validation.Records + stats.ExactDuplicatesRemoved);
        Assert.True(stats.ExactDuplicatesRemoved > 0);
        Assert.Equal(stats.Train.Records, result.Train.Count);
        Assert.Equal(stats.Validation.Records, result.Validation.Count);
        Assert.Equal(stats.Train.Tokens, result.Train.Sum(r => r.Ids.Length));

        // Stratified: each label's validation share is within one record of 20%.
        foreach (var label in new[] { 0, 1 })
        {
            var total = result.Train.Count(r => r.Label == label) + result.Validation.Count(r => r.Label == label);
            var validation = result.Validation.Count(r => r.Label == label);
            Assert.InRange(validation, (int)Math.Floor(0.2 * total) - 1, (int)Math.Ceiling(0.2 * total) + 1);
        }

        // Ids equal the tiktoken reference for the same sentences.
        var reference = File.ReadLines(Path.Combine(AppContext.BaseDirectory, "Data", "cl100k_base.reference.jsonl"))
            .Select(l => JsonDocument.Parse(l).RootElement).Where(e => e.GetProperty("source").GetString() == "yelp")
            .ToDictionary(e => e.GetProperty("line").GetInt64(), e => e.GetProperty("ids").EnumerateArray().Select(i => i.GetInt32()).ToArray());
        foreach (var row in result.Train.Take(50))
        {
            Assert.Equal(reference[row.Line], row.Ids);
        }

        Assert.Equal(stats.Train.Tokens * 3, stats.EstimatedTrainingTokens);
        Assert.Equal(Math.Round(stats.EstimatedTrainingTokens / 1e6 * 3.0, 4), stats.EstimatedCost);
        Assert.True(stats.Lengths.P50 > 0 && stats.Lengths.P50 <= stats.Lengths.P90 && stats.Lengths.P99 <= stats.Lengths.Max);
        Assert.Equal(1, stats.IngestInvalidRecords);
        Assert.True(manifest.ReportPassed);
        Assert.Equal(stats.Train.Records, result.Run.GetCounts()["trainRecords"]);
    }

    [Fact]
    public async Task WordPiece_from_a_model_folder_truncates_to_the_maximum_length_and_counts_it()
    {
        await UploadBertAsync();
        using var pipeline = new TestPipeline(azurite);
        var result = await PrepareAsync(pipeline, "yelp.txt", Sentences(),
            """{"preprocess":{"tokenizer":{"kind":"wordpiece","files":"models/bert-base-uncased/"},"maxSequenceLength":12,"dedup":{"mode":"none"},"validationFraction":0.1}}""");

        var stats = result.Stats!;
        Assert.Equal(0, stats.ExactDuplicatesRemoved);
        Assert.Equal(1000, stats.Train.Records + stats.Validation.Records);
        var all = result.Train.Concat(result.Validation).ToList();
        Assert.All(all, r => Assert.True(r.Ids.Length <= 12 && r.Ids[0] == 101 && r.Ids[^1] == 102));
        Assert.InRange(stats.Truncated, 1, all.Count(r => r.Ids.Length == 12));
        Assert.True(stats.Truncated > 100);
        Assert.Equal(Math.Round((double)stats.Truncated / 1000, 6), stats.TruncatedFraction);
        Assert.StartsWith("wordpiece:vocab.txt=", result.Manifest!.TokenizerFingerprint);
        Assert.Equal(0, result.Manifest.PaddingId);
    }

    [Fact]
    public async Task Normalization_and_redaction_change_the_text_before_tokenization()
    {
        using var pipeline = new TestPipeline(azurite);
        var content = string.Join('\n',
            "{\"text\":\"Cafe\u0301   is\\tgreat\\u0007!\",\"label\":\"a\"}",
            "{\"text\":\"Mail bob.smith@example.com or call +1 (555) 123-4567 from 10.0.0.12\",\"label\":\"b\"}",
            "{\"text\":\"UPPER case\",\"label\":\"a\"}") + "\n";
        var result = await PrepareAsync(pipeline, "clean.jsonl", content,
            """{"preprocess":{"normalize":{"lowercase":true},"redact":{"emails":true,"phones":true,"ipAddresses":true},"validationFraction":0}}""");

        var tokenizer = await TokenizerAsync(new TokenizerSpec());
        var rows = result.Train.ToDictionary(r => r.Line);
        Assert.Equal(tokenizer.Encode("café is great!", []), rows[1].Ids);
        Assert.Equal(tokenizer.Encode("mail [EMAIL] or call [PHONE] from [IP]", []), rows[2].Ids);
        Assert.Equal(tokenizer.Encode("upper case", []), rows[3].Ids);
        Assert.Equal(1, result.Stats!.Redactions["emails"]);
        Assert.Equal(1, result.Stats.Redactions["phones"]);
        Assert.Equal(1, result.Stats.Redactions["ipAddresses"]);
        Assert.Equal(0, result.Stats.Validation.Records);
    }

    [Fact]
    public async Task Exact_deduplication_compares_records_after_normalization()
    {
        using var pipeline = new TestPipeline(azurite);
        var content = "{\"text\":\"same  words\"}\n{\"text\":\"same words \"}\n{\"text\":\"other words\"}\n{\"text\":\"same words\",\"id\":\"x\"}\n";
        var exact = await PrepareAsync(pipeline, "dups.jsonl", content, """{"preprocess":{"validationFraction":0}}""");
        Assert.Equal(2, exact.Stats!.ExactDuplicatesRemoved);
        Assert.Equal(2, exact.Stats.Train.Records);
        var sample = exact.Stats.DuplicateSamples[0];
        Assert.Equal(1, sample.KeptLine);
        Assert.Equal(2, sample.RemovedLine);
        // Both excerpts are the cleaned text the two records share.
        Assert.Equal(("same words", "same words"), (sample.Kept, sample.Removed));

        var none = await PrepareAsync(pipeline, "dups.jsonl", content, """{"preprocess":{"validationFraction":0,"dedup":{"mode":"none"}}}""");
        Assert.Equal(4, none.Stats!.Train.Records);
    }

    [Fact]
    public async Task Near_duplicates_are_found_and_distinct_records_are_kept()
    {
        using var pipeline = new TestPipeline(azurite);
        var random = new Random(7);
        string[] vocabulary = [.. Enumerable.Range(0, 2000).Select(i => "w" + i.ToString("x"))];
        var originals = Enumerable.Range(0, 300).Select(_ => string.Join(' ', Enumerable.Range(0, 30).Select(_ => vocabulary[random.Next(vocabulary.Length)]))).ToList();
        var lines = originals.Select(t => JsonSerializer.Serialize(new { text = t })).ToList();
        // 40 planted near-duplicates: one word of thirty changed (Jaccard of 3-word shingles ~0.8).
        for (var i = 0; i < 40; i++)
        {
            var words = originals[i * 7].Split(' ');
            words[15] = "changed";
            lines.Add(JsonSerializer.Serialize(new { text = string.Join(' ', words) }));
        }

        var result = await PrepareAsync(pipeline, "near.jsonl", string.Join('\n', lines) + "\n",
            """{"preprocess":{"validationFraction":0,"dedup":{"mode":"near","threshold":0.7}}}""");
        var stats = result.Stats!;
        Assert.Equal(340, stats.RecordsRead);
        Assert.InRange(stats.NearDuplicatesRemoved, 36, 40);
        Assert.Equal(340 - stats.NearDuplicatesRemoved, stats.Train.Records);
        Assert.All(stats.DuplicateSamples, pair => Assert.True(pair.RemovedLine > 300 && pair.KeptLine <= 300 && pair.Similarity >= 0.7, $"{pair}"));
        Assert.All(stats.DuplicateSamples, pair => Assert.Equal((pair.RemovedLine - 301) * 7 + 1, pair.KeptLine));
    }

    [Fact]
    public async Task Chat_and_prompt_completion_records_are_rendered_with_the_documented_templates()
    {
        using var pipeline = new TestPipeline(azurite);
        var tokenizer = await TokenizerAsync(new TokenizerSpec());
        var chat = await PrepareAsync(pipeline, "chat.jsonl",
            "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\",\"content\":\"Hello!\"}]}\n",
            """{"preprocess":{"validationFraction":0,"thresholds":{"minTrainRecords":1}}}""");
        Assert.Equal(tokenizer.Encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n", []), chat.Train.Single().Ids);

        var plain = await PrepareAsync(pipeline, "chat.jsonl",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\",\"content\":\"Hello!\"}]}\n",
            """{"preprocess":{"validationFraction":0,"chatTemplate":"plain"}}""");
        Assert.Equal(tokenizer.Encode("user: Hi\nassistant: Hello!\n", []), plain.Train.Single().Ids);

        var pc = await PrepareAsync(pipeline, "pc.jsonl", "{\"prompt\":\"Translate: cat\",\"completion\":\"chat\"}\n", """{"preprocess":{"validationFraction":0}}""");
        var row = pc.Train.Single();
        var promptIds = tokenizer.Encode("Translate: cat", []);
        Assert.Equal(promptIds.Count, row.PromptLength);
        Assert.Equal([.. promptIds, .. tokenizer.Encode("chat", []), tokenizer.EndOfText], row.Ids);
    }

    [Fact]
    public async Task Packing_fills_blocks_of_the_maximum_length_for_unlabelled_text()
    {
        using var pipeline = new TestPipeline(azurite);
        var content = string.Concat(Enumerable.Range(0, 200).Select(i => $"{{\"text\":\"document number {i} has a few words in it\"}}\n"));
        var result = await PrepareAsync(pipeline, "corpus.jsonl", content, """{"preprocess":{"packing":true,"maxSequenceLength":64,"validationFraction":0}}""");
        Assert.True(result.Manifest!.Packed);
        Assert.All(result.Train.SkipLast(1), block => Assert.Equal(64, block.Ids.Length));
        Assert.Equal(result.Stats!.PackedBlocks, result.Train.Count);
        Assert.Equal(200, result.Train.Sum(b => b.Ids.Count(id => id == 100257)));
    }

    [Fact]
    public async Task The_same_input_and_recipe_give_byte_identical_shards_whatever_the_parallelism()
    {
        using var pipeline = new TestPipeline(azurite);
        var run = await pipeline.IngestAsync(Unique("yelp.txt"), Sentences());
        var dataset = (await pipeline.ManifestAsync(run.DatasetId!))!;
        var recipe = PreprocessRecipe.From(JsonDocument.Parse("""{"dedup":{"mode":"near"},"shardRecords":300}""").RootElement);
        var tokenizers = await TokenizerSource.LoadAsync(azurite.Storage, recipe.Tokenizer, CancellationToken.None);
        var datasets = azurite.Storage.Container(StorageNames.Containers.Datasets);
        var hashes = new List<string>();
        foreach (var parallelism in new[] { 1, 3 })
        {
            var builder = new PreparedDatasetBuilder(recipe, tokenizers, new PreprocessingOptions { Parallelism = parallelism, BatchRecords = 97 });
            var records = datasets.GetBlobClient(dataset.Records);
            var build = await builder.BuildAsync(async token => (await records.DownloadStreamingAsync(cancellationToken: token)).Value.Content, dataset, datasets, $"determinism-{Guid.NewGuid():n}/", null, CancellationToken.None);
            Assert.True(build.Shards.Count >= 3);
            hashes.Add(string.Join(',', build.Shards.Select(s => s.Sha256)));
        }

        Assert.Equal(hashes[0], hashes[1]);
    }

    [Fact]
    public async Task Redelivered_preprocess_message_does_no_work_twice()
    {
        using var pipeline = new TestPipeline(azurite);
        var run = await pipeline.IngestAsync(Unique("twice.jsonl"), "{\"text\":\"one\",\"label\":1}\n{\"text\":\"two\",\"label\":0}\n");
        var message = (await pipeline.Storage.Queue(StorageNames.Queues.Preprocess).PeekMessagesAsync(32)).Value
            .Select(m => m.Body.ToString()).Single(m => m.Contains(run.RunId));

        await pipeline.StageMessages.PreprocessAsync(message, 1, CancellationToken.None);
        var first = (await pipeline.Runs.GetAsync(run.RunId))!;
        var manifestPath = first.GetArtifacts()["preparedManifest"]["datasets/".Length..];
        var etag = (await pipeline.Storage.Container(StorageNames.Containers.Datasets).GetBlobClient(manifestPath).GetPropertiesAsync()).Value.ETag;

        await pipeline.StageMessages.PreprocessAsync(message, 2, CancellationToken.None);

        var second = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.Equal(first.ETag, second.ETag);
        Assert.Equal(etag, (await pipeline.Storage.Container(StorageNames.Containers.Datasets).GetBlobClient(manifestPath).GetPropertiesAsync()).Value.ETag);

        // A second run on the same dataset and recipe reuses the prepared data.
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, ""), "run-other-" + Guid.NewGuid().ToString("n")[..8], 1, CancellationToken.None);
        Assert.Equal(etag, (await pipeline.Storage.Container(StorageNames.Containers.Datasets).GetBlobClient(manifestPath).GetPropertiesAsync()).Value.ETag);
    }

    [Fact]
    public async Task A_fine_tune_is_queued_only_when_the_report_passes()
    {
        using var pipeline = new TestPipeline(azurite);
        var failing = await PrepareAsync(pipeline, "yelp.txt", Sentences(), """{"preprocess":{"thresholds":{"minExamplesPerLabel":100000}},"fineTune":{}}""");
        Assert.Equal(RunStatus.Failed, failing.Run.Status);
        Assert.Equal(PreprocessErrorCodes.ValidationReportFailed, failing.Run.ErrorCode);
        Assert.Contains("minExamplesPerLabel[0]", failing.Run.Error);
        Assert.EndsWith("report.json", failing.Run.ReportPath);
        var queued = (await pipeline.Storage.Queue(StorageNames.Queues.FineTune).PeekMessagesAsync(32)).Value.Select(m => m.Body.ToString()).ToList();
        Assert.DoesNotContain(queued, m => m.Contains(failing.Run.RunId));

        var passing = await PrepareAsync(pipeline, "yelp.txt", Sentences().Replace("Wow", "Wow!"), """{"preprocess":{},"fineTune":{"epochs":2}}""");
        Assert.Equal(RunStatus.Running, passing.Run.Status);
        Assert.Equal(Stages.FineTune, passing.Run.Stage);
        Assert.Equal(RunStatus.Queued, passing.Run.GetStages()[Stages.FineTune]);
        var message = (await pipeline.Storage.Queue(StorageNames.Queues.FineTune).PeekMessagesAsync(32)).Value.Select(m => m.Body.ToString()).Single(m => m.Contains(passing.Run.RunId));
        Assert.Contains(passing.Manifest!.PreparedId, message);
    }

    [Theory]
    [InlineData("""{"preprocess":{"dedupe":{}}}""", "dedupe")]
    [InlineData("""{"preprocess":{"dedup":{"mode":"fuzzy"}}}""", "dedup.mode is 'fuzzy'")]
    [InlineData("""{"preprocess":{"tokenizer":{"kind":"wordpiece"}}}""", "needs tokenizer.files")]
    [InlineData("""{"preprocess":{"tokenizer":{"encoding":"p50k_base"}}}""", "tokenizer.encoding is 'p50k_base'")]
    [InlineData("""{"preprocess":{"validationFraction":1.5}}""", "validationFraction is 1.5")]
    [InlineData("""{"preprocess":{"maxSequenceLength":2}}""", "maxSequenceLength is 2")]
    [InlineData("""{"preprocess":{"tokenizer":{"kind":"sentencepiece","files":"models/missing/"}}}""", "tokenizer.model")]
    public async Task Bad_recipes_fail_the_run_with_a_clear_reason(string spec, string reason)
    {
        using var pipeline = new TestPipeline(azurite);
        var result = await PrepareAsync(pipeline, "ok.jsonl", "{\"text\":\"fine\"}\n", spec);
        Assert.Equal(RunStatus.Failed, result.Run.Status);
        Assert.Contains(reason, result.Run.Error);
        Assert.Contains(result.Run.ErrorCode, new[] { PreprocessErrorCodes.InvalidRecipe, PreprocessErrorCodes.MissingTokenizerFiles });
    }

    [Fact]
    public async Task A_dataset_without_a_manifest_is_a_clear_error()
    {
        using var pipeline = new TestPipeline(azurite);
        var runId = "run-" + Guid.NewGuid().ToString("n")[..12];
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest("ds-doesnotexist", ""), runId, 1, CancellationToken.None);
        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(PreprocessErrorCodes.DatasetNotFound, run.ErrorCode);
        Assert.Contains("never ingested", run.Error);
    }

    [Fact]
    public async Task A_preprocess_command_names_a_dataset_and_a_recipe()
    {
        using var pipeline = new TestPipeline(azurite);
        var run = await pipeline.IngestAsync(Unique("cmd.jsonl"), "{\"text\":\"alpha\"}\n{\"text\":\"beta\"}\n");
        var command = "{\"schemaVersion\":1,\"type\":\"preprocess\",\"runId\":\"run-cmd-" + Guid.NewGuid().ToString("n") + "\",\"body\":{\"datasetId\":\"" + run.DatasetId
            + "\",\"spec\":{\"preprocess\":{\"validationFraction\":0.5}}}}";
        await pipeline.Commands.HandleAsync(command, 1, CancellationToken.None);
        var runId = JsonDocument.Parse(command).RootElement.GetProperty("runId").GetString()!;
        var prepared = await ReadAsync(pipeline, runId);
        Assert.Equal(RunStatus.Succeeded, prepared.Run.Status);
        Assert.Equal(2, prepared.Stats!.Train.Records + prepared.Stats.Validation.Records);
    }

    [Fact]
    public async Task The_seed_changes_the_split_and_the_estimate_follows_epochs_and_price()
    {
        using var pipeline = new TestPipeline(azurite);
        var a = await PrepareAsync(pipeline, "yelp.txt", Sentences(), """{"preprocess":{"seed":1,"epochs":5,"costPerMillionTokens":10}}""");
        var b = await PrepareAsync(pipeline, "yelp.txt", Sentences(), """{"preprocess":{"seed":2}}""");
        Assert.NotEqual(a.Validation.Select(r => r.Line).Order(), b.Validation.Select(r => r.Line).Order());
        Assert.InRange(b.Stats!.Validation.Records, a.Stats!.Validation.Records - 2, a.Stats.Validation.Records + 2);
        Assert.NotEqual(a.Manifest!.PreparedId, b.Manifest!.PreparedId);
        Assert.Equal(a.Stats.Train.Tokens * 5, a.Stats.EstimatedTrainingTokens);
        Assert.Equal(Math.Round(a.Stats.EstimatedTrainingTokens / 1e6 * 10, 4), a.Stats.EstimatedCost);
    }

    [Theory]
    [InlineData("""{"preprocess":{"maxSequenceLength":8,"thresholds":{"maxTruncatedFraction":0.05}},"fineTune":{}}""", "maxTruncatedFraction")]
    [InlineData("""{"preprocess":{"thresholds":{"minTrainRecords":5000}},"fineTune":{}}""", "minTrainRecords")]
    public async Task Each_report_threshold_can_stop_the_fine_tune(string spec, string check)
    {
        using var pipeline = new TestPipeline(azurite);
        var result = await PrepareAsync(pipeline, "yelp.txt", Sentences(), spec);
        Assert.Equal(PreprocessErrorCodes.ValidationReportFailed, result.Run.ErrorCode);
        Assert.Contains(check, result.Run.Error);
        var report = JsonDocument.Parse(await pipeline.ReadAsync(StorageNames.Containers.Datasets, result.Run.ReportPath!["datasets/".Length..])).RootElement;
        Assert.False(report.GetProperty("passed").GetBoolean());
        Assert.Contains(report.GetProperty("checks").EnumerateArray(), c => c.GetProperty("name").GetString() == check && !c.GetProperty("passed").GetBoolean());
    }

    [Fact]
    public async Task Shingle_size_and_permutations_shape_near_duplicate_detection()
    {
        using var pipeline = new TestPipeline(azurite);
        // Two records sharing every word but in another order: identical as 1-word shingles, different as 3-word shingles.
        var content = "{\"text\":\"alpha beta gamma delta epsilon zeta eta theta\"}\n{\"text\":\"theta eta zeta epsilon delta gamma beta alpha\"}\n";
        var words = await PrepareAsync(pipeline, "order.jsonl", content, """{"preprocess":{"validationFraction":0,"dedup":{"mode":"near","shingle":1,"permutations":64,"threshold":0.9}}}""");
        Assert.Equal(1, words.Stats!.NearDuplicatesRemoved);
        var phrases = await PrepareAsync(pipeline, "order.jsonl", content, """{"preprocess":{"validationFraction":0,"dedup":{"mode":"near","shingle":3,"permutations":64,"threshold":0.9}}}""");
        Assert.Equal(0, phrases.Stats!.NearDuplicatesRemoved);
    }

    [Theory]
    [InlineData("""{"unicode":"NFKC"}""", "fine day")]
    [InlineData("""{"unicode":"NFC"}""", "\ufb01ne day")]
    [InlineData("""{"unicode":"none","collapseWhitespace":false}""", "\ufb01ne   day")]
    [InlineData("""{"stripControl":false,"collapseWhitespace":false}""", "\ufb01ne   day")]
    public async Task Each_normalization_option_shapes_the_text(string normalize, string expected)
    {
        using var pipeline = new TestPipeline(azurite);
        var result = await PrepareAsync(pipeline, "forms.jsonl", "{\"text\":\"\ufb01ne   day\"}\n",
            "{\"preprocess\":{\"validationFraction\":0,\"normalize\":" + normalize + "}}");
        var tokenizer = await TokenizerAsync(new TokenizerSpec());
        Assert.Equal(tokenizer.Encode(expected, []), result.Train.Single().Ids);
    }

    [Fact]
    public async Task Control_characters_are_kept_only_when_asked()
    {
        using var pipeline = new TestPipeline(azurite);
        var tokenizer = await TokenizerAsync(new TokenizerSpec());
        const string content = "{\"text\":\"bell\\u0007 here\"}\n";
        var stripped = await PrepareAsync(pipeline, "bell.jsonl", content, """{"preprocess":{"validationFraction":0}}""");
        Assert.Equal(tokenizer.Encode("bell here", []), stripped.Train.Single().Ids);
        var kept = await PrepareAsync(pipeline, "bell.jsonl", content, """{"preprocess":{"validationFraction":0,"normalize":{"stripControl":false}}}""");
        Assert.Equal(tokenizer.Encode("bell\u0007 here", []), kept.Train.Single().Ids);
    }

    [Fact]
    public async Task A_cased_wordpiece_vocabulary_keeps_case_when_lowercase_is_off()
    {
        await UploadBertAsync();
        using var pipeline = new TestPipeline(azurite);
        var cased = await PrepareAsync(pipeline, "case.jsonl", "{\"text\":\"Hello\"}\n",
            """{"preprocess":{"validationFraction":0,"tokenizer":{"kind":"wordpiece","files":"models/bert-base-uncased/","lowercase":false}}}""");
        var uncased = await PrepareAsync(pipeline, "case.jsonl", "{\"text\":\"Hello\"}\n",
            """{"preprocess":{"validationFraction":0,"tokenizer":{"kind":"wordpiece","files":"models/bert-base-uncased/"}}}""");
        Assert.Equal([101, 7592, 102], uncased.Train.Single().Ids);
        Assert.NotEqual(uncased.Train.Single().Ids, cased.Train.Single().Ids);
        Assert.NotEqual(uncased.Manifest!.TokenizerFingerprint, cased.Manifest!.TokenizerFingerprint);
    }
}
