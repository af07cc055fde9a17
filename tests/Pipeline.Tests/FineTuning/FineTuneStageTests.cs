using System.Net;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Azure.Core;
using Microsoft.Extensions.Options;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>
/// Fine-tune dispatch and monitoring with the real handlers on Azurite and a real trainer process (the function
/// app's <c>train</c> verb); monitor messages are delivered by the test, so redeliveries happen on cue. The cloud
/// backends are checked in <see cref="ArmBackendTests"/>.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class FineTuneStageTests(Azurite azurite) : IClassFixture<Azurite>
{
    public static string Reviews => File.ReadAllText(Path.Combine(RepoPaths.Root, "samples", "reviews.txt"));

    public const string PrepareSpec = """{"ingest":{"format":"tsv","columns":["text","label"],"maxInvalidFraction":0.01},"preprocess":{"tokenizer":{"kind":"tiktoken","encoding":"cl100k_base"},"validationFraction":0.2,"seed":42}}""";

    private TestPipeline Pipeline() => new(azurite, settings: new Dictionary<string, string?>
    {
        ["Pipeline:FineTune:Local:TrainerPath"] = RepoPaths.Trainer,
        ["Pipeline:FineTune:MonitorInitialDelay"] = "00:00:00.200",
        ["Pipeline:FineTune:MonitorMaxDelay"] = "00:00:00.500",
        ["Pipeline:FineTune:HeartbeatSeconds"] = "0.5",
    });

    /// <summary>Ingests and preprocesses the sample reviews; returns the dataset id and the prepared manifest path.</summary>
    public static async Task<(string DatasetId, string PreparedId, string Manifest)> PrepareAsync(TestPipeline pipeline, string name)
    {
        var ingested = await pipeline.IngestAsync(name, Reviews, PrepareSpec);
        var runId = "prep-" + Guid.NewGuid().ToString("n")[..8];
        await pipeline.Preprocess.HandleAsync(new PreprocessRequest(ingested.DatasetId!, "", RunSpec.Parse(Encoding.UTF8.GetBytes(PrepareSpec), "test")), runId, 1, CancellationToken.None);
        var manifest = (await pipeline.Runs.GetAsync(runId))!.GetArtifacts()["preparedManifest"];
        return (ingested.DatasetId!, manifest.Split('/')[3], manifest);
    }

    public static string FineTuneCommand(string runId, string datasetId, string fineTune) =>
        JsonSerializer.Serialize(new MessageEnvelope
        {
            Type = MessageTypes.FineTune,
            RunId = runId,
            Body = JsonSerializer.SerializeToElement(new FineTuneCommand(datasetId, null, JsonDocument.Parse(fineTune).RootElement.Clone()), FineTuneJson.Default.FineTuneCommand),
        }, PipelineJson.Default.MessageEnvelope);

    /// <summary>Delivers finetune-monitor messages as they become visible until every one of <paramref name="runIds"/> has ended; returns them.</summary>
    public static async Task<RunRecord[]> MonitorUntilAllEndAsync(TestPipeline pipeline, IReadOnlyList<string> runIds, TimeSpan timeout)
    {
        var queue = pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (clock.Elapsed < timeout)
        {
            foreach (var message in (await queue.ReceiveMessagesAsync(16)).Value)
            {
                await pipeline.StageMessages.FineTuneMonitorAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
            }

            var runs = await Task.WhenAll(runIds.Select(id => pipeline.Runs.GetAsync(id)));
            if (runs.All(r => r is not null && RunStatus.IsFinal(r.Status)))
            {
                return runs!;
            }

            await Task.Delay(100);
        }

        var states = await Task.WhenAll(runIds.Select(async id => $"{id}: {(await pipeline.Runs.GetAsync(id))?.Status}"));
        throw new TimeoutException($"Not every run ended within {timeout} ({string.Join(", ", states)}).");
    }

    /// <summary>Delivers finetune-monitor messages as they become visible until the run ends; returns how many were delivered.</summary>
    private static async Task<(RunRecord Run, int Delivered)> MonitorUntilEndAsync(TestPipeline pipeline, string runId, TimeSpan timeout)
    {
        var queue = pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var delivered = 0;
        while (clock.Elapsed < timeout)
        {
            foreach (var message in (await queue.ReceiveMessagesAsync(16)).Value)
            {
                await pipeline.StageMessages.FineTuneMonitorAsync(message.Body.ToString(), (int)message.DequeueCount, CancellationToken.None);
                await queue.DeleteMessageAsync(message.MessageId, message.PopReceipt);
                delivered++;
            }

            if (await pipeline.Runs.GetAsync(runId) is { } run && RunStatus.IsFinal(run.Status))
            {
                return (run, delivered);
            }

            await Task.Delay(100);
        }

        throw new TimeoutException($"Run {runId} did not end within {timeout}.");
    }

    [Fact]
    public async Task Redelivered_dispatch_and_monitor_messages_start_one_job_and_one_chain_of_polls()
    {
        using var pipeline = Pipeline();
        var (datasetId, _, _) = await PrepareAsync(pipeline, "ft-redelivery.tsv");
        var command = FineTuneCommand("run-ft-redelivery", datasetId, """{"epochs":3,"outputModelId":"ft-redelivery"}""");

        await pipeline.Commands.HandleAsync(command, 1, CancellationToken.None);
        await pipeline.Commands.HandleAsync(command, 2, CancellationToken.None);
        // Another run asks for the same job while it trains: it waits on it, nothing is submitted for it.
        await pipeline.Commands.HandleAsync(command.Replace("run-ft-redelivery", "run-ft-waiting"), 1, CancellationToken.None);
        Assert.Equal(RunStatus.Running, (await pipeline.Runs.GetAsync("run-ft-waiting"))!.Status);

        var run = (await pipeline.Runs.GetAsync("run-ft-redelivery"))!;
        var jobId = run.GetArtifacts()["job"].Split('/')[1];
        var files = new JobFiles(pipeline.Storage, jobId);
        Assert.Equal(1, (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!.Attempt);

        // Both dispatches scheduled tick 1; the second delivery of it finds the tick taken and schedules nothing.
        var queue = pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor);
        await Task.Delay(400);
        var ticks = (await queue.ReceiveMessagesAsync(16)).Value;
        Assert.Equal(2, ticks.Length);
        foreach (var tick in ticks)
        {
            await pipeline.StageMessages.FineTuneMonitorAsync(tick.Body.ToString(), (int)tick.DequeueCount, CancellationToken.None);
            await queue.DeleteMessageAsync(tick.MessageId, tick.PopReceipt);
        }

        // Counted with the invisible ones: the next tick is scheduled with a visibility delay.
        Assert.Equal(1, await MessagesAsync(queue));

        var (finished, _) = await MonitorUntilEndAsync(pipeline, "run-ft-redelivery", TimeSpan.FromSeconds(90));
        Assert.Equal(RunStatus.Succeeded, finished.Status);
        var waited = (await pipeline.Runs.GetAsync("run-ft-waiting"))!;
        Assert.Equal((RunStatus.Succeeded, "models/ft-redelivery/"), (waited.Status, waited.GetArtifacts()["model"]));
        Assert.Equal("models/ft-redelivery/", finished.GetArtifacts()["model"]);
        var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
        Assert.Equal((JobStates.Succeeded, 1), (status.State, status.Attempt));
        Assert.Equal(3, (await pipeline.ReadAsync(StorageNames.Containers.Jobs, $"{jobId}/metrics.jsonl")).Split('\n', StringSplitOptions.RemoveEmptyEntries).Length);

        // The same command once the job has ended: the run has finished the stage; nothing is submitted again.
        await pipeline.Commands.HandleAsync(command, 3, CancellationToken.None);
        Assert.Equal(0, await MessagesAsync(queue));

        // Another run asking for the same job (same data, base and settings) gets its model without training.
        await pipeline.Commands.HandleAsync(command.Replace("run-ft-redelivery", "run-ft-same-job"), 1, CancellationToken.None);
        var reused = (await pipeline.Runs.GetAsync("run-ft-same-job"))!;
        Assert.Equal((RunStatus.Succeeded, "models/ft-redelivery/"), (reused.Status, reused.GetArtifacts()["model"]));
        Assert.Equal(finished.GetMetrics()["validationAccuracy"], reused.GetMetrics()["validationAccuracy"]);
        Assert.Equal(0, await MessagesAsync(queue));
        Assert.Equal(1, (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!.Attempt);
    }

    /// <summary>Every message in the queue, visible or not (a peek sees only the visible ones).</summary>
    private static async Task<int> MessagesAsync(Azure.Storage.Queues.QueueClient queue) => (await queue.GetPropertiesAsync()).Value.ApproximateMessagesCount;

    [Fact]
    public async Task Bad_hyperparameters_are_rejected_before_anything_is_submitted()
    {
        using var pipeline = Pipeline();
        var (datasetId, _, _) = await PrepareAsync(pipeline, "ft-bad.tsv");

        await pipeline.Commands.HandleAsync(FineTuneCommand("run-ft-bad", datasetId, """{"epochs":0,"learningRate":-1,"backend":"gpu-cluster"}"""), 1, CancellationToken.None);
        var run = (await pipeline.Runs.GetAsync("run-ft-bad"))!;
        Assert.Equal((RunStatus.Failed, FineTuneErrorCodes.InvalidHyperparameters), (run.Status, run.ErrorCode));
        Assert.Contains("epochs is 0", run.Error);
        Assert.Contains("learningRate is -1", run.Error);
        Assert.Contains("backend is 'gpu-cluster'", run.Error);

        await pipeline.Commands.HandleAsync(FineTuneCommand("run-ft-typo", datasetId, """{"epoch":5}"""), 1, CancellationToken.None);
        var typo = (await pipeline.Runs.GetAsync("run-ft-typo"))!;
        Assert.Equal(FineTuneErrorCodes.InvalidHyperparameters, typo.ErrorCode);
        Assert.Contains("epoch", typo.Error);

        await pipeline.Commands.HandleAsync(FineTuneCommand("run-ft-nobase", datasetId, """{"baseModel":"not-registered"}"""), 1, CancellationToken.None);
        Assert.Equal(FineTuneErrorCodes.BaseModelNotFound, (await pipeline.Runs.GetAsync("run-ft-nobase"))!.ErrorCode);
        Assert.Empty((await pipeline.Storage.Queue(StorageNames.Queues.FineTuneMonitor).PeekMessagesAsync(16)).Value);
    }

    [Fact]
    public async Task The_trained_model_is_deterministic_for_a_seed_and_beats_the_majority_baseline()
    {
        using var pipeline = Pipeline();
        var (datasetId, preparedId, manifest) = await PrepareAsync(pipeline, "ft-determinism.tsv");
        var handler = pipeline.Services.GetService(typeof(FineTuneHandler)) as FineTuneHandler;
        var trainer = new JobTrainer(pipeline.Storage, Options.Create(new Pipeline.Inference.InferenceSettings()), Microsoft.Extensions.Logging.Abstractions.NullLogger<JobTrainer>.Instance);
        var outputs = new List<string>();
        foreach (var model in new[] { "ft-seeded-a", "ft-seeded-b" })
        {
            var spec = RunSpec.Parse(Encoding.UTF8.GetBytes("{\"fineTune\":{\"epochs\":4,\"outputModelId\":\"" + model + "\"}}"), "test");
            var job = await handler!.PlanAsync(new FineTuneRequest(datasetId, preparedId, manifest, spec), "run-" + model, CancellationToken.None);
            Assert.Equal(0, await trainer.RunAsync(job.JobId, CancellationToken.None));
            var status = (await BlobJson.ReadAsync(new JobFiles(pipeline.Storage, job.JobId).Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
            Assert.True(status.Metrics["accuracyPointsOverBaseline"] >= 20, $"{status.Metrics["validationAccuracy"]:P1} vs baseline {status.Metrics["majorityBaselineAccuracy"]:P1}");
            var onnx = (await pipeline.Storage.Container(StorageNames.Containers.Models).GetBlobClient($"{model}/model.onnx").DownloadContentAsync()).Value.Content.ToArray();
            outputs.Add(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(onnx)));
        }

        Assert.Equal(outputs[0], outputs[1]);
    }
}
