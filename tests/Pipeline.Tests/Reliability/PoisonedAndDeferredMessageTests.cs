using Azure.Data.Tables;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Reliability;

/// <summary>
/// Messages given up on end the run their handler really made: a poisoned ingest command without a run id,
/// and a message whose run stays busy past the deferral limit. Against Azurite, through the real handlers.
/// </summary>
public sealed class PoisonedAndDeferredMessageTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static string Unique(string name) => $"{Guid.NewGuid():n}"[..10] + "-" + name;

    [Fact]
    public async Task A_poisoned_ingest_command_without_a_run_id_fails_the_run_its_handler_created()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var name = Unique("poisoned.jsonl");
        await pipeline.DropAsync(name, "{\"text\":\"a\",\"label\":\"x\"}\n");
        var etag = (await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).GetPropertiesAsync()).Value.ETag.ToString();
        var runId = RunIds.ForBlob(StorageNames.Containers.Incoming, name, etag);
        var command = $"{{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{{\"blob\":\"incoming/{name}\"}}}}";

        // Another instance holds the run's ingest stage: every delivery of the command finds it busy, after creating the run.
        await using var holder = await RunLease.AcquireAsync(pipeline.Storage, runId, Stages.Ingest, CancellationToken.None);
        await Assert.ThrowsAsync<RunBusyException>(() => pipeline.Commands.HandleAsync(command, 1, CancellationToken.None));
        Assert.NotNull(await pipeline.Runs.GetAsync(runId));

        await pipeline.Services.GetRequiredService<FailedMessages>().RecordPoisonAsync(StorageNames.Queues.Commands, command, "poisoned-1", CancellationToken.None);

        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal((RunStatus.Failed, FailedMessages.PoisonErrorCode), (run.Status, run.ErrorCode));
        Assert.Contains("commands-poison", run.Error);
        // No second run was made up from the message's text.
        Assert.Null(await pipeline.Runs.GetAsync(RunIds.ForMessage(StorageNames.Queues.Commands, command)));
        var record = (await FailedMessages.ListAsync(pipeline.Storage, StorageNames.Queues.Commands, CancellationToken.None)).Single(r => r.RowKey == "poisoned-1");
        Assert.Equal(runId, record.RunId);
    }

    [Fact]
    public async Task A_message_deferred_past_the_limit_fails_its_run_and_is_recorded_with_the_reason()
    {
        using var pipeline = new TestPipeline(azurite, settings: new Dictionary<string, string?>
        {
            [FailedMessages.MaxDeferralsSetting] = "3",
            [FailedMessages.DeferralDelaySetting] = "00:00:00",
        });
        await pipeline.Storage.EnsureCreatedAsync();
        var failed = pipeline.Services.GetRequiredService<FailedMessages>();
        var name = Unique("busy.jsonl");
        var command = $"{{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{{\"blob\":\"incoming/{name}\"}}}}";
        await pipeline.DropAsync(name, "{\"text\":\"a\",\"label\":\"x\"}\n");
        var etag = (await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name).GetPropertiesAsync()).Value.ETag.ToString();
        var runId = RunIds.ForBlob(StorageNames.Containers.Incoming, name, etag);
        await using var holder = await RunLease.AcquireAsync(pipeline.Storage, runId, Stages.Ingest, CancellationToken.None);

        // As the queue function does: a busy run's message is deferred (re-sent, its dequeue count starting again).
        var queue = pipeline.Storage.Queue(StorageNames.Queues.Commands);
        var message = command;
        var seen = new List<int>();
        for (var delivery = 1; delivery <= 10; delivery++)
        {
            try
            {
                await pipeline.Commands.HandleAsync(message, 1, CancellationToken.None);
            }
            catch (RunBusyException e)
            {
                await failed.DeferAsync(StorageNames.Queues.Commands, message, $"busy-{delivery}", e.Message, CancellationToken.None);
            }

            var next = (await queue.ReceiveMessagesAsync(1)).Value;
            if (next.Length == 0)
            {
                break;
            }

            message = next[0].Body.ToString();
            seen.Add(FailedMessages.DeferralsOf(message));
            await queue.DeleteMessageAsync(next[0].MessageId, next[0].PopReceipt);
        }

        Assert.Equal([1, 2, 3], seen);
        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal((RunStatus.Failed, FailedMessages.PoisonErrorCode), (run.Status, run.ErrorCode));
        Assert.Contains("Gave up after waiting 3 times", run.Error);
        Assert.Contains("is being processed (ingest) by another instance", run.Error);
        var record = (await FailedMessages.ListAsync(pipeline.Storage, StorageNames.Queues.Commands, CancellationToken.None)).Single(r => r.RunId == runId);
        Assert.Equal(FailedMessages.PoisonedKind, record.Kind);
        Assert.Equal(run.Error, record.Reason);
        // Kept with its count cleared, so a replay waits afresh; it names its run.
        Assert.Equal(0, FailedMessages.DeferralsOf(record.Message));
        Assert.Contains(runId, record.Message);
    }

    [Fact]
    public async Task A_run_waiting_on_another_live_runs_batch_waits_past_the_deferral_limit_then_takes_its_results()
    {
        using var pipeline = new TestPipeline(azurite, settings: new Dictionary<string, string?>
        {
            [FailedMessages.MaxDeferralsSetting] = "2",
            [FailedMessages.DeferralDelaySetting] = "00:00:00",
        });
        await pipeline.Storage.EnsureCreatedAsync();
        var failed = pipeline.Services.GetRequiredService<FailedMessages>();
        var modelId = Unique("cls");
        await Inference.InferenceStageTests.ClassifierAsync(pipeline.Storage, modelId);
        var name = Unique("to-score.jsonl");
        await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name)
            .UploadAsync(new BinaryData(Inference.InferenceStageTests.Jsonl(Inference.InferenceStageTests.Sentences.Take(20))));
        var options = new Pipeline.Inference.InferenceOptions { RowsPerShard = 10 };
        var first = await Inference.InferenceStageTests.SendInferAsync(pipeline, modelId, $"incoming/{name}", options);

        // A second run asks for the very same batch while the first is still scoring it: it waits, uncounted.
        var second = Unique("run-waits");
        var body = System.Text.Json.JsonSerializer.SerializeToElement(new Pipeline.Inference.InferenceRequest(modelId, $"incoming/{name}", options), Pipeline.Inference.InferenceJson.Default.InferenceRequest);
        var message = System.Text.Json.JsonSerializer.Serialize(new MessageEnvelope { Type = MessageTypes.Infer, RunId = second, Body = body }, PipelineJson.Default.MessageEnvelope);
        var queue = pipeline.Storage.Queue(StorageNames.Queues.Commands);
        for (var delivery = 1; delivery <= 5; delivery++)
        {
            var busy = await Assert.ThrowsAsync<RunBusyException>(() => pipeline.Commands.HandleAsync(message, 1, CancellationToken.None));
            Assert.True(busy.WaitsOnLiveRun);
            await failed.DeferAsync(StorageNames.Queues.Commands, message, $"waits-{delivery}", busy, CancellationToken.None);
            var next = (await queue.ReceiveMessagesAsync(1)).Value.Single();
            message = next.Body.ToString();
            await queue.DeleteMessageAsync(next.MessageId, next.PopReceipt);
            Assert.Equal(0, FailedMessages.DeferralsOf(message));
        }

        Assert.NotEqual(RunStatus.Failed, (await pipeline.Runs.GetAsync(second))!.Status);

        // The first run finishes the batch; the waiting run's next delivery takes its results.
        await Inference.InferenceStageTests.DeliverShardsAsync(pipeline);
        Assert.Equal(RunStatus.Succeeded, (await pipeline.Runs.GetAsync(first))!.Status);
        await pipeline.Commands.HandleAsync(message, 1, CancellationToken.None);
        var waited = (await pipeline.Runs.GetAsync(second))!;
        Assert.Equal(RunStatus.Succeeded, waited.Status);
        Assert.Equal((await pipeline.Runs.GetAsync(first))!.GetArtifacts()["results"], waited.GetArtifacts()["results"]);
    }
}
