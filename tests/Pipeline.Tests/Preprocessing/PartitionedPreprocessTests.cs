using System.Text;
using System.Text.Json;
using Azure.Storage.Blobs.Specialized;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Preprocessing;

/// <summary>
/// Preprocessing fanned out over partitions, against Azurite with the real tokenizers: the same shards and
/// statistics as the single pass, a failed partition retried alone, partitions shared by two hosts, and
/// concurrent deliveries of one partition doing its work once.
/// </summary>
public sealed class PartitionedPreprocessTests(Azurite azurite) : IClassFixture<Azurite>
{
    /// <summary>Small batches and a small excerpt memory, so batching and the duplicate sample's limits are exercised.</summary>
    private static readonly Dictionary<string, string?> Settings = new()
    {
        ["Pipeline:Preprocessing:BatchRecords"] = "97",
        ["Pipeline:Preprocessing:DuplicateSampleSources"] = "150",
    };

    private static PreprocessingOptions Options => new() { BatchRecords = 97, DuplicateSampleSources = 150 };

    /// <summary>
    /// The team's labelled sentences (2,000) plus planted exact duplicates: 300 of them again, later in the
    /// file, with their white space changed (identical after normalization), and 40 repeated three times.
    /// </summary>
    private static string SentencesWithDuplicates(bool labelled = true, bool near = false)
    {
        var sentences = new List<(string Text, int Label)>();
        foreach (var file in new[] { "yelp_labelled.txt", "amazon_cells_labelled.txt" })
        {
            foreach (var line in File.ReadLines(RepoPaths.RequireSharedData("sentiment/" + file)).Where(l => l.Contains('\t')))
            {
                var parts = line.Split('\t');
                if (int.TryParse(parts[^1].Trim(), out var label))
                {
                    sentences.Add((parts[0].Trim(), label));
                }
            }
        }

        var random = new Random(16);
        string Record(string text, int label) => labelled ? JsonSerializer.Serialize(new { text, label }) : JsonSerializer.Serialize(new { text });
        var records = sentences.Select(s => Record(s.Text, s.Label)).ToList();
        for (var i = 0; i < 300; i++)
        {
            var (text, label) = sentences[random.Next(sentences.Count)];
            records.Insert(random.Next(records.Count / 2, records.Count), Record("  " + text.Replace(" ", "   ") + "\t", label));
        }

        for (var i = 0; i < 40; i++)
        {
            var (text, label) = sentences[random.Next(sentences.Count)];
            for (var copy = 0; copy < 3; copy++)
            {
                records.Insert(random.Next(records.Count), Record(text, label));
            }
        }

        if (near)
        {
            // Planted near duplicates: 80 sentences of 10 words or more again with a word added (3-word shingles' Jaccard
            // 0.9 or more), later in the file; 20 of those copied once more with another word (a chain: a cluster of three).
            var longer = sentences.Where(s => s.Text.Split(' ').Length >= 10).ToList();
            for (var i = 0; i < 80; i++)
            {
                var (text, label) = longer[random.Next(longer.Count)];
                var at = records.FindIndex(r => r.Contains(JsonSerializer.Serialize(text)[1..^1], StringComparison.Ordinal));
                var copy = text + " indeed";
                var position = random.Next(at + 1, records.Count + 1);
                records.Insert(position, Record(copy, label));
                if (i < 20)
                {
                    records.Insert(random.Next(position + 1, records.Count + 1), Record(copy + " truly", label));
                }
            }
        }

        // One record of its own, so each test's dataset (content-addressed) is new.
        records.Add(Record($"A marker sentence {Guid.NewGuid():n}.", 0));
        return string.Join('\n', records) + "\n";
    }

    private static string Unique(string name) => $"{Guid.NewGuid():n}"[..8] + "-" + name;

    private static RunSpec Spec(string preprocess) => RunSpec.Parse(Encoding.UTF8.GetBytes($$"""{"preprocess":{{preprocess}}}"""), "test");

    /// <summary>Delivers every queued preprocess-partition message once per loop turn, as a host would; returns how many it handled.</summary>
    private static async Task<int> DeliverPartitionsAsync(TestPipeline pipeline, int take = 32, Barrier? started = null)
    {
        var queue = pipeline.Storage.Queue(StorageNames.Queues.PreprocessPartition);
        var handled = 0;
        while (true)
        {
            var messages = (await queue.ReceiveMessagesAsync(take, TimeSpan.FromSeconds(30))).Value;
            if (messages.Length == 0)
            {
                // Messages another host holds may still come back: the queue is drained when none is left at all.
                if ((await queue.GetPropertiesAsync()).Value.ApproximateMessagesCount == 0)
                {
                    return handled;
                }

                await Task.Delay(200);
                continue;
            }

            // Hosts that start together each hold a message before any works (none drains the queue before the other is up).
            if (started is not null)
            {
                started.SignalAndWait(TimeSpan.FromSeconds(60));
                started = null;
            }

            foreach (var message in messages)
            {
                try
                {
                    await pipeline.StageMessages.PreprocessPartitionAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                    await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
                    handled++;
                }
                catch (RunBusyException)
                {
                    // As the host does: the message comes back after a delay.
                    await queue.UpdateMessageAsync(message.MessageId, message.PopReceipt, visibilityTimeout: TimeSpan.FromMilliseconds(500));
                }
            }
        }
    }

    private async Task UploadBertAsync() =>
        await azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient("bert-base-uncased/vocab.txt")
            .UploadAsync(RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt"), overwrite: true);

    /// <summary>What the single pass writes for the same dataset and recipe (into a folder of its own): the shards' records and hashes, and stats.json.</summary>
    private async Task<(string Shards, string Stats)> SinglePassAsync(DatasetManifest dataset, string preprocess)
    {
        var recipe = PreprocessRecipe.From(JsonDocument.Parse(preprocess).RootElement) with { Partitions = null };
        var tokenizers = await TokenizerSource.LoadAsync(azurite.Storage, recipe.Tokenizer, CancellationToken.None);
        var datasets = azurite.Storage.Container(StorageNames.Containers.Datasets);
        var records = datasets.GetBlobClient(dataset.Records);
        var build = await new PreparedDatasetBuilder(recipe, tokenizers, Options).BuildAsync(
            async token => (await records.DownloadStreamingAsync(cancellationToken: token)).Value.Content, dataset, datasets, $"single-{Guid.NewGuid():n}/", null, CancellationToken.None);
        return (Describe(build.Shards), JsonSerializer.Serialize(build.Stats, PreprocessJson.Default.PreparedStats));
    }

    private static string Describe(IEnumerable<ShardInfo> shards) => string.Join(',', shards.Select(s => $"{s.Split}:{s.Records}:{s.Tokens}:{s.Sha256}"));

    private static async Task<(PreparedManifest Manifest, string Stats)> PreparedAsync(TestPipeline pipeline, RunRecord run)
    {
        var path = run.GetArtifacts()["preparedManifest"]["datasets/".Length..];
        var manifest = JsonSerializer.Deserialize(await pipeline.ReadAsync(StorageNames.Containers.Datasets, path), PreprocessJson.Default.PreparedManifest)!;
        var stats = JsonSerializer.Deserialize(await pipeline.ReadAsync(StorageNames.Containers.Datasets, manifest.Stats["datasets/".Length..]), PreprocessJson.Default.PreparedStats)!;
        return (manifest, JsonSerializer.Serialize(stats, PreprocessJson.Default.PreparedStats));
    }

    private static async Task<(RunRecord Run, DatasetManifest Dataset)> IngestAsync(TestPipeline pipeline, string content)
    {
        // Nothing left on the partition queue by an earlier test.
        await pipeline.Storage.Queue(StorageNames.Queues.PreprocessPartition).ClearMessagesAsync();
        var run = await pipeline.IngestAsync(Unique("sentences.jsonl"), content);
        Assert.True(run.DatasetId is not null, run.Error);
        return (run, (await pipeline.ManifestAsync(run.DatasetId!))!);
    }

    [Theory]
    [InlineData("""{"shardRecords":300}""", true)]
    [InlineData("""{"dedup":{"mode":"none"},"validationFraction":0.3,"seed":3,"shardRecords":1000}""", true)]
    [InlineData("""{"tokenizer":{"kind":"wordpiece","files":"models/bert-base-uncased/"},"maxSequenceLength":12,"normalize":{"lowercase":true}}""", true)]
    [InlineData("""{"packing":true,"maxSequenceLength":64,"shardRecords":100}""", false)]
    public async Task Eight_partitions_give_the_single_pass_shards_and_stats_byte_for_byte(string preprocess, bool labelled)
    {
        await UploadBertAsync();
        using var pipeline = new TestPipeline(azurite, settings: Settings);
        var (run, dataset) = await IngestAsync(pipeline, SentencesWithDuplicates(labelled));
        var partitioned = preprocess[..^1] + ""","partitions":8}""";

        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, "", Spec(partitioned)), run.RunId, 1, CancellationToken.None);
        var planned = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.Equal(RunStatus.Running, planned.GetStages()[Stages.Preprocess]);
        Assert.Equal(8, planned.GetCounts()["preprocessPartitions"]);
        Assert.Equal(8, await DeliverPartitionsAsync(pipeline));

        var done = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.True(done.Status == RunStatus.Succeeded, done.Error ?? done.LastError);
        Assert.Equal(8, done.GetCounts()["preprocessPartitionsDone"]);
        var (manifest, stats) = await PreparedAsync(pipeline, done);
        var (singleShards, singleStats) = await SinglePassAsync(dataset, preprocess);
        Assert.Equal(singleShards, Describe(manifest.Shards));
        Assert.Equal(singleStats, stats);
        Assert.Equal(!labelled, manifest.Packed);

        // The prepared id does not depend on the partitions: it is the single pass's.
        var recipe = PreprocessRecipe.From(JsonDocument.Parse(preprocess).RootElement);
        var tokenizer = await TokenizerSource.LoadAsync(azurite.Storage, recipe.Tokenizer, CancellationToken.None);
        Assert.Equal(PreprocessHandler.PreparedIdFor(run.DatasetId!, recipe, tokenizer), manifest.PreparedId);
        var parsed = JsonSerializer.Deserialize(stats, PreprocessJson.Default.PreparedStats)!;
        Assert.Equal(parsed.RecordsRead, parsed.Train.Records + parsed.Validation.Records + parsed.ExactDuplicatesRemoved);
        if (!preprocess.Contains("none"))
        {
            // Every planted duplicate (300 re-spaced, 40 × 3 copies) is removed, and the sample names real pairs.
            Assert.True(parsed.ExactDuplicatesRemoved >= 300 + 40 * 3, $"{parsed.ExactDuplicatesRemoved} exact duplicates removed");
            Assert.NotEmpty(parsed.DuplicateSamples);
            Assert.All(parsed.DuplicateSamples, s => Assert.True(s.KeptLine == 0 || s.KeptLine < s.RemovedLine));
        }
    }

    [Fact]
    public async Task A_partition_that_fails_is_retried_alone_and_the_others_are_not_redone()
    {
        using var pipeline = new TestPipeline(azurite, settings: Settings);
        var (run, dataset) = await IngestAsync(pipeline, SentencesWithDuplicates());
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, "", Spec("""{"partitions":8}""")), run.RunId, 1, CancellationToken.None);
        var prefix = PreparedPaths.Folder(run.DatasetId!, (await PlanAsync(pipeline, run.DatasetId!)).PreparedId) + "_partitions/";
        var datasets = pipeline.Storage.Container(StorageNames.Containers.Datasets);

        // Partition 3 cannot commit its kept records: another holder leases the blob it writes, as a storage outage would refuse it.
        var blocked = datasets.GetBlobClient(prefix + "00003/kept.bin");
        await blocked.UploadAsync(BinaryData.Empty, overwrite: true);
        var lease = blocked.GetBlobLeaseClient();
        await lease.AcquireAsync(TimeSpan.FromSeconds(-1));

        var queue = pipeline.Storage.Queue(StorageNames.Queues.PreprocessPartition);
        var failed = new List<string>();
        foreach (var message in (await queue.ReceiveMessagesAsync(32, TimeSpan.FromSeconds(1))).Value)
        {
            try
            {
                await pipeline.StageMessages.PreprocessPartitionAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
            }
            catch (Azure.RequestFailedException)
            {
                failed.Add(message.Body.ToString());
            }
        }

        Assert.Single(failed);
        var afterFailure = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.Equal(RunStatus.Running, afterFailure.Status);
        Assert.Contains("Partition 3 of", afterFailure.LastError);
        Assert.Equal(7, afterFailure.GetCounts()["preprocessPartitionsDone"]);
        Assert.False(afterFailure.GetArtifacts().ContainsKey("preparedManifest"));
        Assert.Empty(await pipeline.ListAsync(StorageNames.Containers.Datasets, PreparedPaths.Folder(run.DatasetId!, (await PlanAsync(pipeline, run.DatasetId!)).PreparedId) + "manifest.json"));
        var markers = new Dictionary<int, Azure.ETag>();
        foreach (var p in new[] { 0, 1, 2, 4, 5, 6, 7 })
        {
            markers[p] = (await datasets.GetBlobClient($"{prefix}done/{p:00000}.json").GetPropertiesAsync()).Value.ETag;
        }

        // The outage ends; the host retries the failed message: partition 3 alone is built, and it assembles.
        await lease.ReleaseAsync();
        await Task.Delay(TimeSpan.FromSeconds(1));
        Assert.Equal(1, await DeliverPartitionsAsync(pipeline));

        var done = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.True(done.Status == RunStatus.Succeeded, done.Error ?? done.LastError);
        foreach (var (p, etag) in markers)
        {
            Assert.Equal(etag, (await datasets.GetBlobClient($"{prefix}done/{p:00000}.json").GetPropertiesAsync()).Value.ETag);
        }

        var outcome = JsonSerializer.Deserialize(await pipeline.ReadAsync(StorageNames.Containers.Datasets, $"{prefix}done/00003.json"), PreprocessJson.Default.PartitionOutcome)!;
        Assert.Equal(2, outcome.Attempt);
        var (manifest, stats) = await PreparedAsync(pipeline, done);
        var (singleShards, singleStats) = await SinglePassAsync(dataset, "{}");
        Assert.Equal(singleShards, Describe(manifest.Shards));
        Assert.Equal(singleStats, stats);
    }

    private static async Task<PartitionPlan> PlanAsync(TestPipeline pipeline, string datasetId)
    {
        var plans = (await pipeline.ListAsync(StorageNames.Containers.Datasets, $"{datasetId}/prepared/")).Where(n => n.EndsWith("/_partitions/plan.json", StringComparison.Ordinal)).ToList();
        return JsonSerializer.Deserialize(await pipeline.ReadAsync(StorageNames.Containers.Datasets, Assert.Single(plans)), PreprocessJson.Default.PartitionPlan)!;
    }

    [Fact]
    public async Task Two_hosts_share_the_partitions_and_give_the_single_pass_output()
    {
        using var first = new TestPipeline(azurite, settings: Settings);
        using var second = new TestPipeline(azurite, settings: Settings);
        var (run, dataset) = await IngestAsync(first, SentencesWithDuplicates());
        await first.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, "", Spec("""{"partitions":8,"shardRecords":500}""")), run.RunId, 1, CancellationToken.None);

        // Two hosts poll the same queue at once, one message at a time, as two instances would.
        using var started = new Barrier(2);
        var handled = await Task.WhenAll(Task.Run(() => DeliverPartitionsAsync(first, take: 1, started)), Task.Run(() => DeliverPartitionsAsync(second, take: 1, started)));

        Assert.Equal(8, handled.Sum());
        Assert.All(handled, n => Assert.True(n > 0, $"each host takes partitions: {string.Join(", ", handled)}"));
        var done = (await first.Runs.GetAsync(run.RunId))!;
        Assert.True(done.Status == RunStatus.Succeeded, done.Error ?? done.LastError);
        var (manifest, stats) = await PreparedAsync(first, done);
        var (singleShards, singleStats) = await SinglePassAsync(dataset, """{"shardRecords":500}""");
        Assert.Equal(singleShards, Describe(manifest.Shards));
        Assert.Equal(singleStats, stats);
    }

    [Fact]
    public async Task Concurrent_deliveries_of_one_partition_do_its_work_once()
    {
        using var pipeline = new TestPipeline(azurite, settings: Settings);
        var (run, _) = await IngestAsync(pipeline, SentencesWithDuplicates());
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, "", Spec("""{"partitions":4}""")), run.RunId, 1, CancellationToken.None);
        var queue = pipeline.Storage.Queue(StorageNames.Queues.PreprocessPartition);
        var received = (await queue.ReceiveMessagesAsync(32, TimeSpan.FromSeconds(60))).Value;
        var message = received.Select(m => m.Body.ToString()).First(m => m.Contains("\"partition\":0", StringComparison.Ordinal));

        // Four hosts get the same message at once (queues deliver at least once).
        var logs = new CountingLoggerProvider();
        var handlers = Enumerable.Range(0, 4).Select(_ => new StageMessages(HandlerWith(pipeline, logs), null!, null!, pipeline.Storage)).ToList();
        var results = await Task.WhenAll(handlers.Select((h, i) => Task.Run(async () =>
        {
            try
            {
                await h.PreprocessPartitionAsync(message, 1 + i, CancellationToken.None);
                return "completed";
            }
            catch (RunBusyException)
            {
                return "busy";
            }
        })));

        Assert.Equal(1, logs.Count("Partition 0 of"));
        Assert.Contains("completed", results);
        // Every delivery either found the work done or was refused by the partition's lease, to be retried later.
        Assert.All(results, r => Assert.True(r is "completed" or "busy", r));
        var prefix = PreparedPaths.Folder(run.DatasetId!, (await PlanAsync(pipeline, run.DatasetId!)).PreparedId) + "_partitions/";
        var done = pipeline.Storage.Container(StorageNames.Containers.Datasets).GetBlobClient(prefix + "done/00000.json");
        var etag = (await done.GetPropertiesAsync()).Value.ETag;

        // The retries of the refused deliveries find the done marker and do nothing.
        foreach (var handler in handlers)
        {
            await handler.PreprocessPartitionAsync(message, 5, CancellationToken.None);
        }

        Assert.Equal(1, logs.Count("Partition 0 of"));
        Assert.Equal(etag, (await done.GetPropertiesAsync()).Value.ETag);
        foreach (var other in received)
        {
            await queue.DeleteMessageAsync(other.MessageId, other.PopReceipt);
        }
    }

    [Fact]
    public async Task Cancelling_the_run_stops_every_partition_and_leaves_no_manifest()
    {
        using var pipeline = new TestPipeline(azurite, settings: Settings);
        var (run, _) = await IngestAsync(pipeline, SentencesWithDuplicates());
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, "", Spec("""{"partitions":6}""")), run.RunId, 1, CancellationToken.None);
        await pipeline.Services.GetRequiredService<RunTransitions>().CancelAsync(run.RunId, "test");

        Assert.Equal(6, await DeliverPartitionsAsync(pipeline));

        var prefix = PreparedPaths.Folder(run.DatasetId!, (await PlanAsync(pipeline, run.DatasetId!)).PreparedId);
        var blobs = await pipeline.ListAsync(StorageNames.Containers.Datasets, prefix);
        Assert.DoesNotContain(blobs, b => b.Contains("/done/", StringComparison.Ordinal) || b.EndsWith("manifest.json", StringComparison.Ordinal) || b.EndsWith("kept.bin", StringComparison.Ordinal));
        Assert.Equal(RunStatus.Cancelled, (await pipeline.Runs.GetAsync(run.RunId))!.Status);
    }

    [Fact]
    public async Task Two_runs_preparing_the_same_dataset_at_once_plan_it_once_and_both_succeed()
    {
        using var first = new TestPipeline(azurite, settings: Settings);
        using var second = new TestPipeline(azurite, settings: Settings);
        var (run, _) = await IngestAsync(first, SentencesWithDuplicates());
        var request = new PreprocessRequest(run.DatasetId!, "", Spec("""{"partitions":4}"""));
        var other = Unique("run-same-recipe");

        // Two runs ask for the same prepared dataset at the same moment, on two hosts; a busy one is put back, as the host does.
        using var go = new Barrier(2);
        var waits = new int[2];
        async Task PrepareAsync(TestPipeline pipeline, string runId, int index)
        {
            go.SignalAndWait(TimeSpan.FromSeconds(60));
            while (true)
            {
                try
                {
                    await pipeline.Preprocess.HandleAsync(request, runId, 1, CancellationToken.None);
                    return;
                }
                catch (RunBusyException e) when (waits[index]++ < 100)
                {
                    Assert.True(e.WaitsOnLiveRun, e.Message);
                    await DeliverPartitionsAsync(pipeline);
                    await Task.Delay(200);
                }
            }
        }

        await Task.WhenAll(Task.Run(() => PrepareAsync(first, run.RunId, 0)), Task.Run(() => PrepareAsync(second, other, 1)));
        await DeliverPartitionsAsync(first);
        foreach (var runId in new[] { run.RunId, other })
        {
            var done = (await first.Runs.GetAsync(runId))!;
            Assert.True(done.Status == RunStatus.Succeeded, $"{runId}: {done.Status} {done.Error ?? done.LastError}");
        }

        // One plan, one set of partitions: each partition was built once (its done marker written once).
        var plan = await PlanAsync(first, run.DatasetId!);
        Assert.Equal(4, plan.Partitions);
        var folder = PreparedPaths.Folder(run.DatasetId!, plan.PreparedId) + "_partitions/done/";
        Assert.Equal(4, (await first.ListAsync(StorageNames.Containers.Datasets, folder)).Count);
        Assert.True(waits.Sum() > 0, "one run waited for the other");
    }

    [Fact]
    public async Task A_redelivered_preprocess_message_does_not_plan_twice()
    {
        using var pipeline = new TestPipeline(azurite, settings: Settings);
        var (run, _) = await IngestAsync(pipeline, SentencesWithDuplicates());
        var request = new PreprocessRequest(run.DatasetId!, "", Spec("""{"partitions":3}"""));
        await pipeline.Preprocess.HandleAsync(request, run.RunId, 1, CancellationToken.None);
        var plan = await PlanAsync(pipeline, run.DatasetId!);
        var planBlob = pipeline.Storage.Container(StorageNames.Containers.Datasets).GetBlobClient(PreparedPaths.Folder(run.DatasetId!, plan.PreparedId) + "_partitions/plan.json");
        var etag = (await planBlob.GetPropertiesAsync()).Value.ETag;

        await pipeline.Preprocess.HandleAsync(request, run.RunId, 2, CancellationToken.None);

        Assert.Equal(etag, (await planBlob.GetPropertiesAsync()).Value.ETag);
        // The redelivery sent the partitions again (a lost send is recovered); each is still built once.
        Assert.Equal(6, await DeliverPartitionsAsync(pipeline));
        var done = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.True(done.Status == RunStatus.Succeeded, done.Error ?? done.LastError);
        Assert.Equal(plan.Records, done.GetCounts()["preprocessRecords"]);
    }

    [Fact]
    public async Task Near_dedup_over_eight_partitions_and_two_hosts_gives_the_single_pass_output_byte_for_byte()
    {
        const string preprocess = """{"dedup":{"mode":"near","threshold":0.7},"shardRecords":400}""";
        using var first = new TestPipeline(azurite, settings: Settings);
        using var second = new TestPipeline(azurite, settings: Settings);
        var (run, dataset) = await IngestAsync(first, SentencesWithDuplicates(near: true));
        await first.Preprocess.HandleAsync(new PreprocessRequest(run.DatasetId!, "", Spec(preprocess[..^1] + ""","partitions":8}""")), run.RunId, 1, CancellationToken.None);
        var plan = await PlanAsync(first, run.DatasetId!);
        Assert.Equal(8 * 4, plan.NearBuckets);

        // Two hosts take the partitions, then the buckets, attach and verify parts, from one queue at once.
        using var started = new Barrier(2);
        var handled = await Task.WhenAll(Task.Run(() => DeliverPartitionsAsync(first, take: 2, started)), Task.Run(() => DeliverPartitionsAsync(second, take: 2, started)));
        // Two hosts finishing a step's last parts together may both send the next step: a second message finds the part done.
        Assert.True(handled.Sum() >= 8 + plan.NearBuckets + 8 + 8, $"{handled.Sum()} messages handled");
        Assert.All(handled, n => Assert.True(n > 0, $"each host takes parts: {string.Join(", ", handled)}"));

        var done = (await first.Runs.GetAsync(run.RunId))!;
        Assert.True(done.Status == RunStatus.Succeeded, done.Error ?? done.LastError);
        Assert.Equal(8, done.GetCounts()["preprocessNearPartsDone"]);
        var (manifest, stats) = await PreparedAsync(first, done);
        var (singleShards, singleStats) = await SinglePassAsync(dataset, preprocess);
        Assert.Equal(singleShards, Describe(manifest.Shards));
        Assert.Equal(singleStats, stats);

        var parsed = JsonSerializer.Deserialize(stats, PreprocessJson.Default.PreparedStats)!;
        Assert.Equal(parsed.RecordsRead, parsed.Train.Records + parsed.Validation.Records + parsed.ExactDuplicatesRemoved + parsed.NearDuplicatesRemoved);
        Assert.True(parsed.ExactDuplicatesRemoved >= 300 + 40 * 3, $"{parsed.ExactDuplicatesRemoved} exact duplicates removed");
        // 100 planted (80 copies, 20 copies of copies); the sentences may hold a few near pairs of their own.
        Assert.InRange(parsed.NearDuplicatesRemoved, 99, 130);
        var nearSamples = parsed.DuplicateSamples.Where(s => s.Similarity < 1).ToList();
        Assert.NotEmpty(nearSamples);
        Assert.All(nearSamples, s => Assert.True(s.KeptLine < s.RemovedLine && s.Similarity >= 0.7 && s.Kept.Length > 0 && s.Removed.Length > 0, $"{s}"));

        // The intermediate files are deleted once the manifest is written; the plan and the done markers stay.
        var prefix = PreparedPaths.Folder(run.DatasetId!, plan.PreparedId) + "_partitions/";
        var left = (await first.ListAsync(StorageNames.Containers.Datasets, prefix)).Select(n => n[prefix.Length..]).ToList();
        Assert.Contains("plan.json", left);
        Assert.Equal(8 + 8 + plan.NearBuckets + 8, left.Count(n => n.StartsWith("done/", StringComparison.Ordinal) || n.StartsWith("near/done/", StringComparison.Ordinal)));
        Assert.All(left, n => Assert.True(n == "plan.json" || n.StartsWith("done/", StringComparison.Ordinal) || n.StartsWith("near/done/", StringComparison.Ordinal), n));
    }

    [Fact]
    public async Task A_near_duplicate_cluster_keeps_its_first_record_whatever_order_its_pairs_are_found_in()
    {
        // b ~ a and c ~ b, but c is not near a: one cluster through b, so a alone is kept, in the single pass as in partitions.
        var clusters = new NearDuplicateClusters();
        clusters.Add(7, 9, 0.8);
        clusters.Add(3, 9, 0.9);
        clusters.Add(12, 3, 0.75);
        var removed = clusters.Removals();
        Assert.Equal([7, 9, 12], removed.Keys.Order());
        Assert.All(removed.Values, r => Assert.Equal(3, r.KeptLine));
        Assert.Equal(0.9, removed[9].Similarity);
    }

    private static PreprocessHandler HandlerWith(TestPipeline pipeline, ILoggerProvider logs)
    {
        var services = pipeline.Services;
        return new PreprocessHandler(
            services.GetRequiredService<StorageClients>(),
            services.GetRequiredService<RunStore>(),
            services.GetRequiredService<RunTransitions>(),
            services.GetRequiredService<QueueSender>(),
            services.GetRequiredService<IOptions<PreprocessingOptions>>(),
            services.GetRequiredService<IOptions<IngestionOptions>>(),
            new Logger<PreprocessHandler>(new LoggerFactory([logs])));
    }

    /// <summary>Counts the log lines the handlers write (a partition logs one line when it is built).</summary>
    private sealed class CountingLoggerProvider : ILoggerProvider
    {
        private readonly List<string> _lines = [];

        public int Count(string text)
        {
            lock (_lines)
            {
                // The one line a partition logs when it has been built (records read and kept).
                return _lines.Count(l => l.Contains(text, StringComparison.Ordinal) && l.Contains(" kept, ", StringComparison.Ordinal));
            }
        }

        public ILogger CreateLogger(string categoryName) => new Logger(this);

        public void Dispose()
        {
        }

        private sealed class Logger(CountingLoggerProvider owner) : ILogger
        {
            public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

            public bool IsEnabled(LogLevel logLevel) => true;

            public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
            {
                lock (owner._lines)
                {
                    owner._lines.Add(formatter(state, exception));
                }
            }
        }
    }
}
