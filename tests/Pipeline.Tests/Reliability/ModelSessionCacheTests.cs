using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Options;
using Pipeline.Inference;
using Pipeline.Tests.Inference;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Reliability;

/// <summary>The process's ONNX Runtime sessions stay bounded however many models a host is asked for, concurrently.</summary>
public sealed class ModelSessionCacheTests(Azurite azurite) : IClassFixture<Azurite>
{
    [Fact]
    public async Task Concurrent_requests_for_many_models_keep_at_most_the_configured_number_loaded()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var ids = Enumerable.Range(0, 5).Select(i => $"cache-{i}-{Guid.NewGuid():n}"[..20]).ToList();
        foreach (var id in ids)
        {
            await InferenceStageTests.ClassifierAsync(pipeline.Storage, id);
        }

        using var sessions = new ModelSessions(pipeline.Storage, Options.Create(new InferenceSettings { MaxCachedModels = 2 }), NullLogger<ModelSessions>.Instance);
        // Shards of five batches on five models, arriving at once.
        var runtimes = await Task.WhenAll(ids.Concat(ids).Select(id => Task.Run(() => sessions.GetAsync(id, CancellationToken.None))));
        var last = await sessions.GetAsync(ids[^1], CancellationToken.None);

        Assert.InRange(sessions.Count, 1, 2);
        Assert.True(sessions.IsCached(ids[^1]));
        // Evicted or not, a runtime a shard already holds still scores: it is retired later, not disposed at once.
        foreach (var runtime in runtimes)
        {
            var (rows, _) = await new BatchScorer(runtime, sessions.Settings, 256, normalize: false).ScoreAsync(["still usable"], CancellationToken.None);
            Assert.Null(Assert.Single(rows).Error);
        }

        // A model that left the cache loads again when asked for, as a new session.
        var first = runtimes[0];
        var again = await sessions.GetAsync(ids[0], CancellationToken.None);
        Assert.InRange(sessions.Count, 1, 2);
        Assert.Equal(first.Manifest.ModelId, again.Manifest.ModelId);
        Assert.Same(last, await sessions.GetAsync(ids[^1], CancellationToken.None));
    }

    [Fact]
    public async Task A_model_unused_past_the_idle_timeout_leaves_the_cache_and_its_size_counts()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var big = $"cache-big-{Guid.NewGuid():n}"[..20];
        var small = $"cache-sml-{Guid.NewGuid():n}"[..20];
        await InferenceStageTests.ClassifierAsync(pipeline.Storage, big);
        await InferenceStageTests.ClassifierAsync(pipeline.Storage, small);

        using (var idle = new ModelSessions(pipeline.Storage, Options.Create(new InferenceSettings { ModelIdleTimeout = TimeSpan.FromMilliseconds(200) }), NullLogger<ModelSessions>.Instance))
        {
            await idle.GetAsync(big, CancellationToken.None);
            await Task.Delay(400);
            await idle.GetAsync(small, CancellationToken.None);
            Assert.False(idle.IsCached(big));
            Assert.True(idle.IsCached(small));
        }

        // A size budget under two models' ONNX size keeps one, however many the count would allow.
        using var sized = new ModelSessions(pipeline.Storage, Options.Create(new InferenceSettings { MaxCachedModelMegabytes = 0 }), NullLogger<ModelSessions>.Instance);
        var loaded = await sized.GetAsync(big, CancellationToken.None);
        Assert.True(loaded.ModelBytes > 0);
        await sized.GetAsync(small, CancellationToken.None);
        Assert.Equal(1, sized.Count);
        Assert.True(sized.IsCached(small));
    }
}
