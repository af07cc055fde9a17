using Microsoft.Extensions.DependencyInjection;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Reliability;

/// <summary>
/// The run table's promises under real races on Azurite: concurrent tasks, released together, not one after another.
/// </summary>
public sealed class RunPromisesTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static RunRecord NewRun(string prefix) => new() { RunId = $"{prefix}-{Guid.NewGuid():n}"[..24], Source = "test", Status = RunStatus.Running, Stage = Stages.Preprocess };

    [Fact]
    public async Task A_cancelled_run_stays_cancelled_when_a_stage_finishes_at_the_same_moment()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var transitions = pipeline.Services.GetRequiredService<RunTransitions>();
        var outcomes = new List<(bool Cancelled, string Final)>();
        for (var i = 0; i < 24; i++)
        {
            var run = await pipeline.Runs.GetOrCreateAsync(NewRun("race"));
            using var go = new ManualResetEventSlim();
            // A stage's success (what each handler writes) and a user's cancel, released at once.
            // Staggered by 0, 25 or 50 ms, so both orders happen: the cancel first, the success first, and the two interleaved.
            var delay = TimeSpan.FromMilliseconds(i % 3 * 25);
            var succeed = Task.Run(async () =>
            {
                go.Wait();
                await Task.Delay(delay);
                await pipeline.Runs.UpdateAsync(run.RunId, r =>
                {
                    r.Status = RunStatus.Succeeded;
                    r.SetStage(Stages.Preprocess, RunStatus.Succeeded);
                    return true;
                });
            });
            var cancel = Task.Run(async () =>
            {
                go.Wait();
                return await transitions.CancelAsync(run.RunId, "race test");
            });
            go.Set();
            await Task.WhenAll(succeed, cancel);
            var final = (await pipeline.Runs.GetAsync(run.RunId))!;
            var events = await pipeline.Services.GetRequiredService<RunEvents>().ListAsync(run.RunId);
            var cancelled = events.Any(e => e.Type == RunEvents.Types.RunCancelled);
            outcomes.Add((cancelled, final.Status));
        }

        // Whenever the cancel took effect (its event was sent), the run ended cancelled, whichever write came last.
        Assert.All(outcomes.Where(o => o.Cancelled), o => Assert.Equal(RunStatus.Cancelled, o.Final));
        Assert.All(outcomes.Where(o => !o.Cancelled), o => Assert.Equal(RunStatus.Succeeded, o.Final));
        Assert.Contains(outcomes, o => o.Cancelled);
    }

    [Fact]
    public async Task A_failure_after_the_run_ended_changes_nothing_and_sends_no_event()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var transitions = pipeline.Services.GetRequiredService<RunTransitions>();
        var events = pipeline.Services.GetRequiredService<RunEvents>();
        var run = await pipeline.Runs.GetOrCreateAsync(NewRun("late"));
        await transitions.CancelAsync(run.RunId, "by the user");

        // Many late deliveries fail and restart the stage at once; none may reopen the run or publish.
        await Task.WhenAll(Enumerable.Range(0, 8).Select(i => i % 2 == 0
            ? transitions.FailAsync(run.RunId, Stages.Preprocess, "SomeError", "late failure", TimeSpan.Zero)
            : transitions.StartAsync(run.RunId, Stages.Preprocess, 2)));
        await transitions.CancelAsync(run.RunId, "again");

        var final = (await pipeline.Runs.GetAsync(run.RunId))!;
        Assert.Equal((RunStatus.Cancelled, "Cancelled: by the user"), (final.Status, final.Error));
        Assert.Equal([RunEvents.Types.RunCancelled], (await events.ListAsync(run.RunId)).Select(e => e.Type));
    }

    [Fact]
    public async Task A_holder_whose_lease_is_broken_is_told_and_the_new_holder_keeps_its_lease()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var runId = $"lease-{Guid.NewGuid():n}"[..20];
        var first = await RunLease.AcquireAsync(pipeline.Storage, runId, Stages.Inference, CancellationToken.None);
        await Assert.ThrowsAsync<RunBusyException>(() => RunLease.AcquireAsync(pipeline.Storage, runId, Stages.Inference, CancellationToken.None));
        Assert.False(first.Lost.IsCancellationRequested);

        // Another instance declares the holder dead and takes the stage over while the first still works.
        await RunLease.BreakAsync(pipeline.Storage, runId, Stages.Inference, CancellationToken.None);
        await using var second = await RunLease.AcquireAsync(pipeline.Storage, runId, Stages.Inference, CancellationToken.None);
        var work = Task.Delay(Timeout.Infinite, first.Lost);
        Assert.Same(work, await Task.WhenAny(work, Task.Delay(TimeSpan.FromSeconds(20))));
        Assert.Contains("could not be renewed", first.LostReason);
        Assert.Throws<LeaseLostException>(first.ThrowIfLost);

        // The first holder's end must not release the lease the second holds now.
        await first.DisposeAsync();
        await Assert.ThrowsAsync<RunBusyException>(() => RunLease.AcquireAsync(pipeline.Storage, runId, Stages.Inference, CancellationToken.None));
        Assert.False(second.Lost.IsCancellationRequested);
    }

    [Fact]
    public async Task Listing_runs_keeps_the_newest_across_table_pages()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var status = "list-" + Guid.NewGuid().ToString("n")[..6];
        var created = new List<string>();
        for (var i = 0; i < RunStore.ListPageSize + 20; i++)
        {
            if (i >= RunStore.ListPageSize + 10)
            {
                // The newest are told apart by their creation times.
                await Task.Delay(5);
            }

            var run = NewRun("list");
            run.Status = status;
            created.Add((await pipeline.Runs.GetOrCreateAsync(run)).RunId);
        }

        var newest = await pipeline.Runs.ListAsync(status, max: 7);
        Assert.Equal(created.AsEnumerable().Reverse().Take(7), newest.Select(r => r.RunId));
    }
}
