using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>
/// Fine-tuning through the function app in local host mode on Azurite, with the local backend's trainer
/// processes: the whole chain, cancellation, a killed trainer, a failing trainer, and a timeout.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class FineTuneHostTests : IAsyncLifetime
{
    // Storage and a host of its own per test: the tests prepare their data in this process while the host watches
    // incoming, which a host shared with other tests (already watching) would ingest and prepare at the same time.
    private IsolatedStorage _storage = null!;
    private TestPipeline _pipeline = null!;

    public async Task InitializeAsync()
    {
        _storage = await HostFixture.IsolatedAsync();
        _pipeline = _storage.Pipeline;
    }

    public async Task DisposeAsync() => await _storage.DisposeAsync();

    private LocalHostProcess Host() => new(_storage.ConnectionString, new Dictionary<string, string>(HostFixture.FastFineTuneSettings));

    private Task<RunRecord> RunReachesAsync(string runId, Func<RunRecord, bool> condition, string what, LocalHostProcess host, int seconds = 120) =>
        Eventually.ReturnsAsync(async () => await _pipeline.Runs.GetAsync(runId) is { } run && condition(run) ? run : null, TimeSpan.FromSeconds(seconds), what, () => host.Output);

    private async Task<string> SendFineTuneAsync(string runId, string fineTune)
    {
        var (datasetId, _, _) = await FineTuneStageTests.PrepareAsync(_pipeline, $"{runId}.tsv");
        await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync(FineTuneStageTests.FineTuneCommand(runId, datasetId, fineTune));
        return runId;
    }

    private async Task<JobStatus?> StatusAsync(RunRecord run) =>
        run.GetArtifacts().TryGetValue("job", out var job)
            ? await BlobJson.ReadAsync(new JobFiles(_pipeline.Storage, job.Split('/')[1]).Status, FineTuneJson.Default.JobStatus, CancellationToken.None)
            : null;

    [Fact]
    public async Task A_dropped_file_with_a_fine_tune_spec_becomes_a_registered_model_and_scored_predictions()
    {
        using var host = Host();
        var toScore = string.Concat(File.ReadLines(Path.Combine(RepoPaths.Root, "samples", "to-score.jsonl")).Where(l => l.Contains("\"review-", StringComparison.Ordinal)).Take(300).Select(l => l + "\n"));
        await _pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient("inputs/to-score.jsonl").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(toScore)), overwrite: true);
        var spec = FineTuneStageTests.PrepareSpec[..^1] + ""","fineTune":{"epochs":12,"outputModelId":"sentiment-ft","infer":{"input":"outputs/inputs/to-score.jsonl"}}}""";
        var blob = _pipeline.Storage.Container(StorageNames.Containers.Incoming);
        await blob.GetBlobClient("chain.pipeline.json").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(spec)), overwrite: true);
        var uploaded = await blob.GetBlobClient("chain.tsv").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(FineTuneStageTests.Reviews)), overwrite: true);
        var runId = RunIds.ForBlob(StorageNames.Containers.Incoming, "chain.tsv", uploaded.Value.ETag.ToString());

        var run = await RunReachesAsync(runId, r => RunStatus.IsFinal(r.Status), "the whole chain to finish", host, 180);

        Assert.True(run.Status == RunStatus.Succeeded, $"{run.Status}: {run.Error}");
        Assert.Equal(Stages.Inference, run.Stage);
        Assert.Equal([RunStatus.Succeeded], run.GetStages().Values.Distinct());
        var metrics = run.GetMetrics();
        Assert.True(metrics["accuracyPointsOverBaseline"] >= 20, $"accuracy {metrics["validationAccuracy"]:P1}, baseline {metrics["majorityBaselineAccuracy"]:P1}");
        var model = (await BlobJson.ReadAsync(_pipeline.Storage.Container(StorageNames.Containers.Models).GetBlobClient("sentiment-ft/model.json"), ModelJson.Default.ModelManifest, CancellationToken.None))!;
        Assert.Equal((ModelTasks.Classification, run.DatasetId), (model.Task, model.Lineage.DatasetId));
        Assert.Equal(["0", "1"], model.Labels);
        Assert.Equal(metrics["validationAccuracy"], model.Lineage.Metrics!["validationAccuracy"]);
        var results = await _pipeline.ReadJsonLinesAsync(StorageNames.Containers.Outputs, run.GetArtifacts()["results"]["outputs/".Length..]);
        Assert.Equal(300, results.Count);
        // The model learned: on these (seen) reviews its labels mostly agree with the originals.
        var truth = File.ReadLines(Path.Combine(RepoPaths.Root, "samples", "reviews.txt")).Take(300).Select(l => l.Split('\t')[1]).ToList();
        var agree = results.Count(r => r.GetProperty("label").GetString() == truth[(int)r.GetProperty("row").GetInt64()]);
        Assert.True(agree > 240, $"{agree} of 300 predictions agree with the labels");
        var metricsLines = await _pipeline.ReadAsync(StorageNames.Containers.Jobs, run.GetArtifacts()["metrics"]["jobs/".Length..]);
        Assert.Contains("validationMacroF1", metricsLines);
        var events = await CliOptionsEvents(runId);
        Assert.Contains(RunEvents.Types.FineTuneProgress, events);
    }

    private async Task<List<string>> CliOptionsEvents(string runId) =>
        [.. (await new RunEvents(_pipeline.Storage, Microsoft.Extensions.Logging.Abstractions.NullLogger<RunEvents>.Instance).ListAsync(runId)).Select(e => e.Type)];

    [Fact]
    public async Task A_job_cancelled_while_running_stops_its_trainer()
    {
        using var host = Host();
        var runId = await SendFineTuneAsync("run-ft-cancel", """{"epochs":1000,"batchSize":1,"earlyStoppingPatience":0}""");
        var running = await RunReachesAsync(runId, r => r.GetCounts().GetValueOrDefault("fineTuneEpoch") >= 1, "the trainer to report an epoch", host);

        await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync(JsonSerializer.Serialize(new MessageEnvelope
        {
            Type = MessageTypes.Cancel,
            Body = JsonSerializer.SerializeToElement(new CancelCommand(runId, "test"), PipelineJson.Default.CancelCommand),
        }, PipelineJson.Default.MessageEnvelope));

        var cancelled = await RunReachesAsync(runId, r => r.Status == RunStatus.Cancelled, "the run to be cancelled", host);
        var status = await Eventually.ReturnsAsync(async () => await StatusAsync(cancelled) is { State: JobStates.Cancelled } s ? s : null,
            TimeSpan.FromSeconds(30), "the trainer to stop", () => host.Output);
        Assert.True(status.Epoch < 1000);
        Assert.True(await new JobFiles(_pipeline.Storage, running.GetArtifacts()["job"].Split('/')[1]).Cancel.ExistsAsync());
    }

    [Fact]
    public async Task A_killed_trainer_is_noticed_by_its_silence_resubmitted_and_finishes()
    {
        using var host = Host();
        var runId = await SendFineTuneAsync("run-ft-kill", """{"epochs":150,"batchSize":4,"earlyStoppingPatience":0}""");
        var running = await RunReachesAsync(runId, r => r.GetCounts().GetValueOrDefault("fineTuneEpoch") >= 1, "the trainer to report an epoch", host);
        var status = (await StatusAsync(running))!;
        var pid = int.Parse(status.Worker!.Split("pid ")[1]);
        Process.GetProcessById(pid).Kill();

        var run = await RunReachesAsync(runId, r => RunStatus.IsFinal(r.Status), "the resubmitted job to finish", host, 180);

        Assert.True(run.Status == RunStatus.Succeeded, $"{run.Status}: {run.Error}\n{host.Output}");
        Assert.Equal(2, run.GetCounts()["fineTuneAttempt"]);
        var final = (await StatusAsync(run))!;
        Assert.Equal((JobStates.Succeeded, 2), (final.State, final.Attempt));
        Assert.Contains(RunEvents.Types.StageRetrying, await CliOptionsEvents(runId));
    }

    [Fact]
    public async Task A_failing_trainer_fails_the_run_with_its_reason()
    {
        using var host = Host();
        var (datasetId, _, manifest) = await FineTuneStageTests.PrepareAsync(_pipeline, "ft-fails.tsv");
        // The prepared shards disappear after preprocessing: the trainer cannot read them.
        foreach (var shard in await _pipeline.ListAsync(StorageNames.Containers.Datasets, manifest["datasets/".Length..].Replace("manifest.json", "train-")))
        {
            await _pipeline.Storage.Container(StorageNames.Containers.Datasets).GetBlobClient(shard).DeleteAsync();
        }

        await _pipeline.Storage.Queue(StorageNames.Queues.Commands).SendMessageAsync(FineTuneStageTests.FineTuneCommand("run-ft-fails", datasetId, """{"epochs":2}"""));
        var run = await RunReachesAsync("run-ft-fails", r => RunStatus.IsFinal(r.Status), "the run to fail", host);

        Assert.Equal((RunStatus.Failed, FineTuneErrorCodes.TrainerFailed), (run.Status, run.ErrorCode));
        Assert.Contains("is missing", run.Error);
        Assert.Contains("Preprocess the dataset again", run.Error);
    }

    [Fact]
    public async Task A_job_running_past_its_maximum_duration_is_stopped_and_fails()
    {
        using var host = Host();
        var runId = await SendFineTuneAsync("run-ft-timeout", """{"epochs":1000,"batchSize":1,"earlyStoppingPatience":0,"maxDurationMinutes":0.05}""");

        var run = await RunReachesAsync(runId, r => RunStatus.IsFinal(r.Status), "the run to time out", host);

        Assert.Equal((RunStatus.Failed, FineTuneErrorCodes.TimedOut), (run.Status, run.ErrorCode));
        Assert.Contains("maxDurationMinutes", run.Error);
        await Eventually.ReturnsAsync(async () => await StatusAsync(run) is { State: JobStates.Cancelled } s ? s : null, TimeSpan.FromSeconds(30), "the trainer to stop", () => host.Output);
    }
}
