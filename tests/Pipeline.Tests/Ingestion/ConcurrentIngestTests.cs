using Microsoft.Extensions.DependencyInjection;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Ingestion;

/// <summary>The same content dropped under two names at the same moment: two real ingestions, released together.</summary>
public sealed class ConcurrentIngestTests(Azurite azurite) : IClassFixture<Azurite>
{
    [Fact]
    public async Task The_same_content_ingested_by_two_runs_at_once_is_one_dataset_with_intact_records()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        for (var round = 0; round < 6; round++)
        {
            var tag = Guid.NewGuid().ToString("n")[..10];
            var content = string.Concat(Enumerable.Range(0, 400).Select(i => $"{{\"text\":\"{tag} sentence {i}\",\"label\":\"{(i % 2 == 0 ? "pos" : "neg")}\"}}\n"));
            var first = await pipeline.DropAsync($"{tag}-a.jsonl", content);
            var second = await pipeline.DropAsync($"{tag}-b.jsonl", content);

            using var go = new ManualResetEventSlim();
            var deliveries = new[] { first, second }.Select(message => Task.Run(async () =>
            {
                go.Wait();
                // As the host does: a busy run's message comes back (bounded), anything else fails the test.
                for (var attempt = 1; ; attempt++)
                {
                    try
                    {
                        await pipeline.BlobDrops.HandleAsync(message, attempt, CancellationToken.None);
                        return;
                    }
                    catch (RunBusyException) when (attempt < 10)
                    {
                        await Task.Delay(200);
                    }
                }
            })).ToList();
            go.Set();
            await Task.WhenAll(deliveries);

            var runs = new List<RunRecord>();
            foreach (var message in new[] { first, second })
            {
                runs.Add((await pipeline.Runs.GetAsync(FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, message)))!);
            }

            Assert.All(runs, r => Assert.Equal(RunStatus.Succeeded, r.GetStages()[Stages.Ingest]));
            var datasetId = Assert.Single(runs.Select(r => r.DatasetId).Distinct())!;
            var manifest = (await pipeline.ManifestAsync(datasetId))!;
            Assert.Contains(manifest.RunId, runs.Select(r => r.RunId));
            var records = await pipeline.ReadJsonLinesAsync(StorageNames.Containers.Datasets, manifest.Records);
            Assert.Equal(400, records.Count);
            Assert.Equal(manifest.Counts.Valid, records.Count);
            var events = pipeline.Services.GetRequiredService<RunEvents>();
            var created = 0;
            foreach (var run in runs)
            {
                created += (await events.ListAsync(run.RunId)).Count(e => e.Type == RunEvents.Types.DatasetCreated);
            }

            Assert.Equal(1, created);
        }
    }
}
