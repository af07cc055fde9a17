using System.Diagnostics;
using Azure.Core;
using Azure.Core.Pipeline;
using Azure.Data.Tables;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Hosting;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>
/// The fine-tune stage's own events (the job's stage.started, finetune.progress, a lost trainer's stage.retrying) are
/// saved with the run change they announce. The process "stops" right after the run's write reaches the table (a
/// pipeline policy throws once the answer is in), with the real handlers, a real trainer process and Azurite: the
/// event must be in the outbox exactly when the change is.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class FineTuneEventOutboxTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static readonly Dictionary<string, string?> Settings = new()
    {
        ["Pipeline:FineTune:Local:TrainerPath"] = RepoPaths.Trainer,
        ["Pipeline:FineTune:MonitorInitialDelay"] = "00:00:00.200",
        ["Pipeline:FineTune:MonitorMaxDelay"] = "00:00:00.300",
        ["Pipeline:FineTune:HeartbeatSeconds"] = "0.5",
        ["Pipeline:FineTune:HeartbeatTimeout"] = "00:00:04",
    };

    [Fact]
    public async Task Each_fine_tune_event_is_saved_with_its_run_change_when_the_process_stops_right_after_the_write()
    {
        using var plain = new TestPipeline(azurite, settings: Settings);
        var (datasetId, _, _) = await FineTuneStageTests.PrepareAsync(plain, "ft-outbox.tsv");
        var crash = new CrashAfterWrite();
        using var services = Compose(crash);
        var runs = services.GetRequiredService<RunStore>();
        var events = services.GetRequiredService<RunEvents>();
        var storage = services.GetRequiredService<StorageClients>();
        const string RunId = "run-ft-outbox";
        var command = FineTuneStageTests.FineTuneCommand(RunId, datasetId, """{"epochs":1000,"batchSize":1,"earlyStoppingPatience":0,"outputModelId":"ft-outbox"}""");

        // 1. The dispatch records the submitted job on the run (stage.started), then stops.
        crash.Arm("jobSpec");
        await Assert.ThrowsAsync<IOException>(() => services.GetRequiredService<CommandRouter>().HandleAsync(command, 1, CancellationToken.None));
        Assert.True(crash.Fired);
        Assert.True((await runs.GetAsync(RunId))!.GetArtifacts().ContainsKey("jobSpec"));
        // The claim's stage.started, and the job's, saved with it.
        Assert.Equal(2, (await events.ListAsync(RunId)).Count(e => e.Type == RunEvents.Types.StageStarted));
        await services.GetRequiredService<CommandRouter>().HandleAsync(command, 2, CancellationToken.None);
        var jobId = (await runs.GetAsync(RunId))!.GetArtifacts()["job"].Split('/')[1];
        var files = new JobFiles(storage, jobId);

        // 2. A poll records the trainer's first epoch on the run (finetune.progress), then stops.
        await Eventually.ReturnsAsync(async () => await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None) is { Epoch: >= 1 } s ? s : null,
            TimeSpan.FromSeconds(120), "the trainer's first epoch");
        crash.Arm("fineTuneEpoch");
        await DeliverTicksUntilAsync(services, () => Task.FromResult(crash.Fired));
        await AssertSavedWithTheChangeAsync(runs, events, RunId, RunEvents.Types.FineTuneProgress);

        // 3. The trainer dies; a poll finds it silent, resubmits the job and records the retry (stage.retrying), then stops.
        var submission = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!;
        using (var trainer = Process.GetProcessById(int.Parse(submission.Handle!, System.Globalization.CultureInfo.InvariantCulture)))
        {
            trainer.Kill();
            await trainer.WaitForExitAsync();
        }

        crash.Arm("resubmitted as attempt");
        await DeliverTicksUntilAsync(services, () => Task.FromResult(crash.Fired));
        await AssertSavedWithTheChangeAsync(runs, events, RunId, RunEvents.Types.StageRetrying);
        Assert.Equal(2, (await runs.GetAsync(RunId))!.Attempt);

        // The resubmitted trainer is stopped: the run is cancelled and the next poll stops the job.
        await services.GetRequiredService<RunTransitions>().CancelAsync(RunId, "test over");
        await DeliverTicksUntilAsync(services, async () => (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))?.Outcome is not null);
    }

    /// <summary>The run's latest change (the one the process stopped after) has its event, saved or sent.</summary>
    private static async Task AssertSavedWithTheChangeAsync(RunStore runs, RunEvents events, string runId, string type)
    {
        var run = (await runs.GetAsync(runId))!;
        var list = await events.ListAsync(runId);
        Assert.True(list.Exists(e => e.Id == $"{runId}:{run.Version}:{type}"),
            $"no {type} for version {run.Version} of the run; its events: {string.Join(", ", list.Select(e => e.Id))}");
    }

    /// <summary>Delivers monitor ticks as they become visible; a delivery that "crashed" is left to come back (after a second) as a redelivery.</summary>
    private static async Task DeliverTicksUntilAsync(IServiceProvider services, Func<Task<bool>> done)
    {
        var queue = services.GetRequiredService<StorageClients>().Queue(StorageNames.Queues.FineTuneMonitor);
        var stages = services.GetRequiredService<StageMessages>();
        var clock = Stopwatch.StartNew();
        while (!await done())
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), "the expected write did not happen within 60 s");
            foreach (var message in (await queue.ReceiveMessagesAsync(16, TimeSpan.FromSeconds(1))).Value)
            {
                try
                {
                    await stages.FineTuneMonitorAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                    await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
                }
                catch (IOException)
                {
                    // The process stopped mid-delivery: the message comes back.
                }
            }

            await Task.Delay(100);
        }
    }

    /// <summary>The platform's composition, its table client carrying <paramref name="crash"/>.</summary>
    private ServiceProvider Compose(CrashAfterWrite crash)
    {
        var configuration = new ConfigurationBuilder()
            .AddInMemoryCollection(new Dictionary<string, string?>(Settings) { [StorageClients.ConnectionSetting] = azurite.ConnectionString })
            .Build();
        var services = new ServiceCollection().AddLogging();
        services.AddPipeline(configuration);
        var clients = StorageClients.FromConfiguration(configuration, QueuesOptions.From(configuration).QueueMessageEncoding);
        var tableOptions = new TableClientOptions();
        tableOptions.AddPolicy(crash, HttpPipelinePosition.PerCall);
        services.AddSingleton(new StorageClients(clients.Blobs, clients.Queues, new TableServiceClient(azurite.ConnectionString, tableOptions)));
        return services.BuildServiceProvider();
    }

    /// <summary>
    /// Once armed, lets the first table write whose body holds a marker reach the table, then throws as though the
    /// process stopped before its next step (outside the retry policy: nothing is sent again).
    /// </summary>
    private sealed class CrashAfterWrite : HttpPipelinePolicy
    {
        private string? _marker;

        public bool Fired { get; private set; }

        public void Arm(string marker)
        {
            Fired = false;
            Volatile.Write(ref _marker, marker);
        }

        public override async ValueTask ProcessAsync(HttpMessage message, ReadOnlyMemory<HttpPipelinePolicy> pipeline)
        {
            var marker = Volatile.Read(ref _marker);
            var matches = marker is not null && message.Request.Method != RequestMethod.Get && Body(message.Request).Contains(marker, StringComparison.Ordinal);
            await ProcessNextAsync(message, pipeline);
            if (matches && message.Response.Status < 300 && Interlocked.CompareExchange(ref _marker, null, marker) == marker)
            {
                Fired = true;
                throw new IOException($"The process stopped right after a write holding '{marker}'.");
            }
        }

        public override void Process(HttpMessage message, ReadOnlyMemory<HttpPipelinePolicy> pipeline) => ProcessAsync(message, pipeline).AsTask().GetAwaiter().GetResult();

        private static string Body(Request request)
        {
            if (request.Content is null)
            {
                return "";
            }

            using var buffer = new MemoryStream();
            request.Content.WriteTo(buffer, CancellationToken.None);
            return System.Text.Encoding.UTF8.GetString(buffer.ToArray());
        }
    }
}
