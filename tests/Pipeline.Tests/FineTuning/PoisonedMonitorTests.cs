using System.Diagnostics;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>
/// A <c>finetune-monitor</c> message given up on (as the <c>FineTuneMonitorPoison</c> function hands it over), with the
/// local backend's real trainer process training a job that two runs share, on Azurite.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class PoisonedMonitorTests(Azurite azurite) : IClassFixture<Azurite>
{
    [Fact]
    public async Task A_poisoned_monitor_message_stops_its_trainer_and_fails_the_runs_of_its_job_while_a_stale_one_leaves_it_running()
    {
        using var pipeline = new TestPipeline(azurite, settings: new Dictionary<string, string?>
        {
            ["Pipeline:FineTune:Local:TrainerPath"] = RepoPaths.Trainer,
            ["Pipeline:FineTune:MonitorInitialDelay"] = "00:00:00.200",
            ["Pipeline:FineTune:MonitorMaxDelay"] = "00:00:00.200",
            ["Pipeline:FineTune:HeartbeatSeconds"] = "0.5",
        });
        var failed = pipeline.Services.GetRequiredService<FailedMessages>();
        var (datasetId, _, _) = await FineTuneStageTests.PrepareAsync(pipeline, "ft-poisoned-monitor.tsv");
        // Long enough that only a stop ends it; a second run asks for the same job and waits on it.
        const string FineTune = """{"epochs":1000,"batchSize":1,"trainable":"head+embeddings","earlyStoppingPatience":0,"outputModelId":"ft-poisoned-monitor"}""";
        await pipeline.Commands.HandleAsync(FineTuneStageTests.FineTuneCommand("run-ft-poisoned", datasetId, FineTune), 1, CancellationToken.None);
        await pipeline.Commands.HandleAsync(FineTuneStageTests.FineTuneCommand("run-ft-poisoned-waiting", datasetId, FineTune), 1, CancellationToken.None);
        var jobId = (await pipeline.Runs.GetAsync("run-ft-poisoned"))!.GetArtifacts()["job"].Split('/')[1];
        var files = new JobFiles(pipeline.Storage, jobId);
        var submission = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!;
        using var trainer = Process.GetProcessById(int.Parse(submission.Handle!, System.Globalization.CultureInfo.InvariantCulture));
        await Eventually.ReturnsAsync(async () => await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None) is { State: JobStates.Running, Step: > 0 } s ? s : null,
            TimeSpan.FromSeconds(120), "the trainer's first steps");

        // Ticks 1 and 2 are polled; tick 3 waits on the queue.
        var tick1 = await DeliverNextTickAsync(pipeline);
        await DeliverNextTickAsync(pipeline);

        // A stale tick (1, older than the last processed) poisoned: tick 3 still watches the job, which goes on.
        await failed.RecordPoisonAsync(StorageNames.Queues.FineTuneMonitor, tick1, "poisoned-tick-1", CancellationToken.None);
        await Task.Delay(TimeSpan.FromSeconds(2));
        Assert.False(trainer.HasExited);
        Assert.Equal(RunStatus.Running, (await pipeline.Runs.GetAsync("run-ft-poisoned"))!.Status);
        Assert.Equal(RunStatus.Running, (await pipeline.Runs.GetAsync("run-ft-poisoned-waiting"))!.Status);
        Assert.Null((await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!.Outcome);

        // Tick 3's deliveries run out: the host moves it to finetune-monitor-poison, and nothing polls the job any more.
        var queue = pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor);
        var tick3 = await Eventually.ReturnsAsync(async () => (await queue.ReceiveMessagesAsync(1)).Value.FirstOrDefault(), TimeSpan.FromSeconds(10), "tick 3");
        await queue.DeleteMessageAsync(tick3.MessageId, tick3.PopReceipt);
        Assert.Contains("\"tick\":3", tick3.Body.ToString(), StringComparison.Ordinal);
        await failed.RecordPoisonAsync(StorageNames.Queues.FineTuneMonitor, tick3.Body.ToString(), tick3.MessageId, CancellationToken.None);

        // Its trainer is stopped, the job ends, and both runs fail with the poison reason.
        using (var exit = new CancellationTokenSource(TimeSpan.FromSeconds(30)))
        {
            await trainer.WaitForExitAsync(exit.Token);
        }

        var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
        Assert.Equal(JobStates.Cancelled, status.State);
        Assert.True(status.Epoch < 1000);
        Assert.True(await files.Cancel.ExistsAsync());
        Assert.Equal(FailedMessages.PoisonErrorCode, (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!.Outcome);
        var run = (await pipeline.Runs.GetAsync("run-ft-poisoned"))!;
        Assert.Equal((RunStatus.Failed, FailedMessages.PoisonErrorCode, Stages.FineTune), (run.Status, run.ErrorCode, run.Stage));
        Assert.Contains("finetune-monitor-poison", run.Error, StringComparison.Ordinal);
        var waiting = (await pipeline.Runs.GetAsync("run-ft-poisoned-waiting"))!;
        Assert.Equal((RunStatus.Failed, FailedMessages.PoisonErrorCode), (waiting.Status, waiting.ErrorCode));
        Assert.Contains("shared with run run-ft-poisoned", waiting.Error, StringComparison.Ordinal);
        Assert.Contains("finetune-monitor-poison", waiting.Error, StringComparison.Ordinal);
        var record = (await FailedMessages.ListAsync(pipeline.Storage, StorageNames.Queues.FineTuneMonitor, CancellationToken.None)).Single(r => r.RowKey == tick3.MessageId);
        Assert.Equal((FailedMessages.PoisonedKind, "run-ft-poisoned"), (record.Kind, record.RunId));

        // A later request for the same job trains it again (a poisoned job ended without a model).
        await pipeline.Commands.HandleAsync(FineTuneStageTests.FineTuneCommand("run-ft-poisoned-again", datasetId, FineTune), 1, CancellationToken.None);
        var again = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!;
        Assert.Equal((2, "run-ft-poisoned-again", (string?)null), (again.Attempt, again.RunId, again.Outcome));
        // (Cancelled, so that its trainer stops at the next poll.)
        await pipeline.Services.GetRequiredService<RunTransitions>().CancelAsync("run-ft-poisoned-again", "test over");
        await Eventually.ReturnsAsync(async () =>
        {
            await DeliverNextTickAsync(pipeline, required: false);
            return await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None) is { Outcome: not null } s ? s : null;
        }, TimeSpan.FromSeconds(30), "the retrained job to be stopped");
    }

    /// <summary>Receives the next monitor tick (waiting for its delay), delivers it once and removes it; returns its text.</summary>
    private static async Task<string> DeliverNextTickAsync(TestPipeline pipeline, bool required = true)
    {
        var queue = pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor);
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromSeconds(10))
        {
            if ((await queue.ReceiveMessagesAsync(1)).Value.FirstOrDefault() is { } message)
            {
                await pipeline.StageMessages.FineTuneMonitorAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
                return message.Body.ToString();
            }

            if (!required)
            {
                return "";
            }

            await Task.Delay(100);
        }

        throw new TimeoutException("No monitor tick became visible within 10 s.");
    }
}
