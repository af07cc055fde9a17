using System.Text;
using System.Text.Json;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Inference;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Reliability;

/// <summary>
/// Run events go through an outbox saved with the run's change, on Azurite: a publish that fails (the events queue is
/// gone) loses nothing, a change that changes nothing sends nothing, and concurrent transitions each send theirs once.
/// </summary>
public sealed class RunEventOutboxTests(Azurite azurite) : IClassFixture<Azurite>
{
    // Left-over events are retried after 3 seconds (not 10), so the tests wait less; a transition's own publish,
    // slowed by a loaded machine, must still finish within it, or its event may be sent twice (at least once).
    private static readonly TimeSpan RetryAfter = TimeSpan.FromSeconds(3);
    private static readonly Dictionary<string, string?> QuickRetry = new() { ["Pipeline:Events:RetryAfter"] = RetryAfter.ToString() };

    private static Task RetryDelayAsync() => Task.Delay(RetryAfter + TimeSpan.FromMilliseconds(200));

    private static RunRecord NewRun(string prefix) => new() { RunId = $"{prefix}-{Guid.NewGuid():n}"[..24], Source = "test", Status = RunStatus.Queued, Stage = Stages.Preprocess };

    private static Func<RunRecord, bool> Start(string stage) => r =>
    {
        r.Status = RunStatus.Running;
        r.Stage = stage;
        r.SetStage(stage, RunStatus.Running);
        return true;
    };

    private static Func<RunRecord, bool> Succeed(string stage) => r =>
    {
        r.Status = RunStatus.Succeeded;
        r.SetStage(stage, RunStatus.Succeeded);
        return true;
    };

    /// <summary>Every CloudEvent on the events queue for <paramref name="runId"/> (all messages are read, then put back).</summary>
    private static async Task<List<JsonElement>> QueuedEventsAsync(TestPipeline pipeline, string runId)
    {
        var queue = pipeline.Storage.Queue(StorageNames.Queues.Events);
        var events = new List<JsonElement>();
        var received = new List<Azure.Storage.Queues.Models.QueueMessage>();
        while ((await queue.ReceiveMessagesAsync(32, TimeSpan.FromSeconds(30))).Value is { Length: > 0 } batch)
        {
            received.AddRange(batch);
        }

        foreach (var message in received)
        {
            var e = JsonDocument.Parse(message.Body.ToString()).RootElement.Clone();
            if (e.GetProperty("subject").GetString() == $"runs/{runId}")
            {
                events.Add(e);
            }

            await queue.UpdateMessageAsync(message.MessageId, message.PopReceipt, visibilityTimeout: TimeSpan.Zero);
        }

        return [.. events.OrderBy(e => e.GetProperty("time").GetDateTimeOffset())];
    }

    private static async Task<List<RunOutboxEntry>> PendingAsync(TestPipeline pipeline, string runId)
    {
        var pending = new List<RunOutboxEntry>();
        await foreach (var entry in pipeline.Runs.PendingEventsAsync(runId))
        {
            pending.Add(entry);
        }

        return pending;
    }

    [Fact]
    public async Task An_event_whose_publish_fails_after_the_run_changed_is_delivered_later_exactly_once()
    {
        using var pipeline = new TestPipeline(azurite, settings: QuickRetry);
        await pipeline.Storage.EnsureCreatedAsync();
        var events = pipeline.Services.GetRequiredService<RunEvents>();
        var run = await pipeline.Runs.GetOrCreateAsync(NewRun("lost"));

        // The events queue is unavailable when the stage starts: the run changes, the publish fails, nothing throws.
        await pipeline.Storage.Queue(StorageNames.Queues.Events).DeleteAsync();
        var (started, changed) = await events.TransitionAsync(run.RunId, RunEvents.Types.StageStarted, Start(Stages.Preprocess));
        Assert.True(changed);
        Assert.Equal((RunStatus.Running, 1L), ((await pipeline.Runs.GetAsync(run.RunId))!.Status, started.Version));
        Assert.Single(await PendingAsync(pipeline, run.RunId));
        await RetryDelayAsync();
        Assert.Equal(0, await events.DispatchPendingAsync());

        // Back again: the dispatcher publishes it once; a second round finds nothing left.
        await pipeline.Storage.Queue(StorageNames.Queues.Events).CreateIfNotExistsAsync();
        await RetryDelayAsync();
        Assert.True(await events.DispatchPendingAsync() >= 1);
        Assert.Equal(0, await events.DispatchPendingAsync());
        var queued = await QueuedEventsAsync(pipeline, run.RunId);
        Assert.Equal([RunEvents.Types.StageStarted], queued.Select(e => e.GetProperty("type").GetString()));
        Assert.Equal($"{run.RunId}:1:{RunEvents.Types.StageStarted}", queued[0].GetProperty("id").GetString());
        Assert.Equal(RunStatus.Running, queued[0].GetProperty("data").GetProperty("status").GetString());
        Assert.Empty(await PendingAsync(pipeline, run.RunId));
        Assert.Equal([RunEvents.Types.StageStarted], (await events.ListAsync(run.RunId)).Select(e => e.Type));
    }

    [Fact]
    public async Task A_change_saved_by_a_process_that_stopped_before_publishing_is_published_by_the_next_transition_in_order()
    {
        using var pipeline = new TestPipeline(azurite, settings: QuickRetry);
        await pipeline.Storage.EnsureCreatedAsync();
        var events = pipeline.Services.GetRequiredService<RunEvents>();
        var run = await pipeline.Runs.GetOrCreateAsync(NewRun("crash"));

        // The change and its event are saved together; the process stops before it publishes.
        var (_, saved) = await pipeline.Runs.TryUpdateAsync(run.RunId, Start(Stages.Preprocess), [RunEvents.Types.StageStarted]);
        Assert.True(saved);
        Assert.Empty(await QueuedEventsAsync(pipeline, run.RunId));
        await RetryDelayAsync();

        // The redelivered message finishes the stage: the left-over event goes out first, then its own.
        await events.TransitionAsync(run.RunId, RunEvents.Types.StageSucceeded, Succeed(Stages.Preprocess));
        var queued = await QueuedEventsAsync(pipeline, run.RunId);
        Assert.Equal([RunEvents.Types.StageStarted, RunEvents.Types.StageSucceeded], queued.Select(e => e.GetProperty("type").GetString()));
        Assert.Equal([RunStatus.Running, RunStatus.Succeeded], queued.Select(e => e.GetProperty("data").GetProperty("status").GetString()));
        Assert.Empty(await PendingAsync(pipeline, run.RunId));
        Assert.Equal(0, await events.DispatchPendingAsync());
        Assert.Equal(2, (await QueuedEventsAsync(pipeline, run.RunId)).Count);
    }

    [Fact]
    public async Task A_transition_that_changes_nothing_sends_nothing()
    {
        using var pipeline = new TestPipeline(azurite, settings: QuickRetry);
        await pipeline.Storage.EnsureCreatedAsync();
        var events = pipeline.Services.GetRequiredService<RunEvents>();
        var transitions = pipeline.Services.GetRequiredService<RunTransitions>();
        var run = await pipeline.Runs.GetOrCreateAsync(NewRun("same"));
        await events.TransitionAsync(run.RunId, RunEvents.Types.StageStarted, Start(Stages.Preprocess));

        // The same start again (a redelivery), a mutation that declines, and a failure after the run was cancelled.
        var again = await events.TransitionAsync(run.RunId, RunEvents.Types.StageStarted, Start(Stages.Preprocess));
        var declined = await events.TransitionAsync(run.RunId, RunEvents.Types.StageSucceeded, _ => false);
        await transitions.CancelAsync(run.RunId, "by the user");
        var late = await transitions.FailAsync(run.RunId, Stages.Preprocess, "Late", "late failure", TimeSpan.Zero);

        Assert.False(again.Changed);
        Assert.False(declined.Changed);
        var final = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.Equal((RunStatus.Cancelled, 2L), (final.Status, final.Version));
        Assert.Equal((RunStatus.Cancelled, 2L), (late.Status, late.Version));
        Assert.Equal([RunEvents.Types.StageStarted, RunEvents.Types.RunCancelled],
            (await QueuedEventsAsync(pipeline, run.RunId)).Select(e => e.GetProperty("type").GetString()));
        Assert.Empty(await PendingAsync(pipeline, run.RunId));
    }

    [Fact]
    public async Task Concurrent_transitions_each_send_their_event_once_even_when_publishing_fails()
    {
        using var pipeline = new TestPipeline(azurite, settings: QuickRetry);
        await pipeline.Storage.EnsureCreatedAsync();
        var events = pipeline.Services.GetRequiredService<RunEvents>();

        foreach (var queueDown in new[] { false, true })
        {
            var run = await pipeline.Runs.GetOrCreateAsync(NewRun(queueDown ? "down" : "up"));
            if (queueDown)
            {
                await pipeline.Storage.Queue(StorageNames.Queues.Events).DeleteAsync();
            }

            // Eight progress updates of one run, released together: each is its own change, with its own event.
            using var go = new ManualResetEventSlim();
            var updates = Enumerable.Range(0, 8).Select(i => Task.Run(async () =>
            {
                go.Wait();
                return await events.TransitionAsync(run.RunId, RunEvents.Types.FineTuneProgress, r =>
                {
                    r.SetCounts(new Dictionary<string, long> { [$"epoch{i}"] = i });
                    return true;
                });
            })).ToList();
            go.Set();
            var results = await Task.WhenAll(updates);
            Assert.All(results, r => Assert.True(r.Changed));
            Assert.Equal(Enumerable.Range(1, 8).Select(v => (long)v), results.Select(r => r.Run.Version).Order());

            if (queueDown)
            {
                Assert.Equal(8, (await PendingAsync(pipeline, run.RunId)).Count);
                await pipeline.Storage.Queue(StorageNames.Queues.Events).CreateIfNotExistsAsync();
                await RetryDelayAsync();
                // Two dispatchers at once (two function app instances): still one publish per event.
                await Task.WhenAll(events.DispatchPendingAsync(), events.DispatchPendingAsync());
            }

            var queued = await QueuedEventsAsync(pipeline, run.RunId);
            var ids = queued.Select(e => e.GetProperty("id").GetString()).ToList();
            Assert.Equal(Enumerable.Range(1, 8).Select(v => $"{run.RunId}:{v}:{RunEvents.Types.FineTuneProgress}").Order(), ids.Order());
            // Each event carries the run as its change left it: version v holds v counts.
            Assert.All(queued, e => Assert.Equal(
                long.Parse(e.GetProperty("runversion").GetString()!, System.Globalization.CultureInfo.InvariantCulture),
                e.GetProperty("data").GetProperty("counts").EnumerateObject().Count()));
            Assert.Empty(await PendingAsync(pipeline, run.RunId));
        }
    }

    [Fact]
    public async Task A_batch_completed_with_failures_sends_that_event_and_no_stage_succeeded()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var modelId = $"cls-{Guid.NewGuid():n}"[..20];
        await InferenceStageTests.ClassifierAsync(pipeline.Storage, modelId);
        var lines = InferenceStageTests.Jsonl(InferenceStageTests.Sentences.Take(30)).Split('\n', StringSplitOptions.RemoveEmptyEntries).ToList();
        lines[3] = "{not json";
        var name = $"in-{Guid.NewGuid():n}.jsonl";
        await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(string.Join('\n', lines) + "\n")), overwrite: true);

        var runId = await InferenceStageTests.SendInferAsync(pipeline, modelId, $"{StorageNames.Containers.Incoming}/{name}", new InferenceOptions { RowsPerShard = 10 });
        Assert.Equal(0, await InferenceStageTests.DeliverShardsAsync(pipeline));

        Assert.Equal(RunStatus.CompletedWithFailures, (await pipeline.Runs.GetAsync(runId))!.Status);
        var types = (await QueuedEventsAsync(pipeline, runId)).Select(e => e.GetProperty("type").GetString()).ToList();
        Assert.Equal(1, types.Count(t => t == RunEvents.Types.StageCompletedWithFailures));
        Assert.DoesNotContain(RunEvents.Types.StageSucceeded, types);
    }
}
