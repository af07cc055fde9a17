using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>
/// Runs asking for one fine-tune job at the same moment, each on a host of its own (its own services), against
/// Azurite with the local backend's real trainer processes. Every trainer start is counted by the program the
/// backend runs, so a second submission cannot go unseen.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class SharedJobRaceTests(Azurite azurite) : IClassFixture<Azurite>, IDisposable
{
    private readonly CountingTrainer _trainer = new();

    public void Dispose() => _trainer.Dispose();

    // Room for more trainers than one job needs: a second start of the same job is not hidden by a full slot.
    private TestPipeline Host() => new(azurite, settings: new Dictionary<string, string?>
    {
        ["Pipeline:FineTune:Local:TrainerPath"] = _trainer.Path,
        ["Pipeline:FineTune:Local:MaxConcurrentJobs"] = "4",
        ["Pipeline:FineTune:MonitorInitialDelay"] = "00:00:00.200",
        ["Pipeline:FineTune:MonitorMaxDelay"] = "00:00:00.500",
        ["Pipeline:FineTune:HeartbeatSeconds"] = "0.5",
    });

    /// <summary>Both hosts deliver their run's fine-tune command at the same moment.</summary>
    private static async Task AskAtOnceAsync(TestPipeline[] hosts, string[] runIds, string datasetId, string fineTune)
    {
        var release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var asks = hosts.Select((host, i) => Task.Run(async () =>
        {
            await release.Task;
            await host.Commands.HandleAsync(FineTuneStageTests.FineTuneCommand(runIds[i], datasetId, fineTune), 1, CancellationToken.None);
        })).ToArray();
        release.SetResult();
        await Task.WhenAll(asks);
    }

    /// <summary>Both runs end with the job's model, and the job's trainer was started <paramref name="attempt"/> times in all.</summary>
    private async Task AssertBothFollowTheJobAsync(TestPipeline host, string[] runIds, string model, string jobId, int attempt)
    {
        var ended = await FineTuneStageTests.MonitorUntilAllEndAsync(host, runIds, TimeSpan.FromSeconds(120));
        Assert.All(ended, r => Assert.True(r.Status == RunStatus.Succeeded && r.GetArtifacts()["model"] == $"models/{model}/", $"{r.RunId}: {r.Status} {r.Error}"));
        Assert.All(ended, r => Assert.Equal($"jobs/{jobId}/", r.GetArtifacts()["job"]));
        Assert.True(_trainer.StartsOf(jobId) == attempt, $"{_trainer.StartsOf(jobId)} trainer starts for {jobId}, {attempt} expected (one per attempt)\n{string.Join('\n', _trainer.Starts)}");
        var files = new JobFiles(host.Storage, jobId);
        var submission = (await BlobJson.ReadAsync(files.Submission, FineTuneJson.Default.JobSubmission, CancellationToken.None))!;
        Assert.Equal((attempt, JobStates.Succeeded), (submission.Attempt, submission.Outcome));
        Assert.Contains(submission.RunId, runIds);
        var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
        Assert.Equal((JobStates.Succeeded, attempt), (status.State, status.Attempt));
    }

    [Fact]
    public async Task Two_runs_retraining_the_same_failed_job_at_once_start_one_attempt_and_both_follow_it()
    {
        using var first = Host();
        using var second = Host();
        var (datasetId, _, manifest) = await FineTuneStageTests.PrepareAsync(first, "ft-retrain-race.tsv");
        for (var round = 0; round < 3; round++)
        {
            var model = $"ft-retrain-race-{round}";
            var fineTune = $$"""{"epochs":3,"outputModelId":"{{model}}"}""";

            // The job fails first: its training shards are missing while it runs.
            var failedRun = $"run-rr{round}-first";
            await using (await HiddenTrainingShardsAsync(first, manifest))
            {
                await first.Commands.HandleAsync(FineTuneStageTests.FineTuneCommand(failedRun, datasetId, fineTune), 1, CancellationToken.None);
                var failed = (await FineTuneStageTests.MonitorUntilAllEndAsync(first, [failedRun], TimeSpan.FromSeconds(90)))[0];
                Assert.Equal((RunStatus.Failed, FineTuneErrorCodes.TrainerFailed), (failed.Status, failed.ErrorCode));
            }

            var jobId = (await first.Runs.GetAsync(failedRun))!.GetArtifacts()["job"].Split('/')[1];
            Assert.Equal(1, _trainer.StartsOf(jobId));

            // Two runs ask for the same job at the same moment, on two hosts: both find it failed and want to train it again.
            string[] runIds = [$"run-rr{round}-b", $"run-rr{round}-c"];
            await AskAtOnceAsync([first, second], runIds, datasetId, fineTune);

            await AssertBothFollowTheJobAsync(first, runIds, model, jobId, attempt: 2);
        }
    }

    [Fact]
    public async Task Two_runs_starting_the_same_new_job_at_once_start_one_trainer_and_both_follow_it()
    {
        using var first = Host();
        using var second = Host();
        var (datasetId, _, _) = await FineTuneStageTests.PrepareAsync(first, "ft-new-race.tsv");
        for (var round = 0; round < 3; round++)
        {
            var model = $"ft-new-race-{round}";
            string[] runIds = [$"run-nr{round}-b", $"run-nr{round}-c"];

            await AskAtOnceAsync([first, second], runIds, datasetId, $$"""{"epochs":3,"outputModelId":"{{model}}"}""");

            var jobId = (await first.Runs.GetAsync(runIds[0]))!.GetArtifacts()["job"].Split('/')[1];
            await AssertBothFollowTheJobAsync(first, runIds, model, jobId, attempt: 1);
        }
    }

    /// <summary>Removes the prepared dataset's training shards until disposed, then puts the same bytes back.</summary>
    private static async Task<IAsyncDisposable> HiddenTrainingShardsAsync(TestPipeline pipeline, string manifest)
    {
        var datasets = pipeline.Storage.Container(StorageNames.Containers.Datasets);
        var shards = new List<(string Name, BinaryData Content)>();
        foreach (var name in await pipeline.ListAsync(StorageNames.Containers.Datasets, manifest["datasets/".Length..].Replace("manifest.json", "train-", StringComparison.Ordinal)))
        {
            shards.Add((name, (await datasets.GetBlobClient(name).DownloadContentAsync()).Value.Content));
            await datasets.GetBlobClient(name).DeleteAsync();
        }

        Assert.NotEmpty(shards);
        return new Restore(async () =>
        {
            foreach (var (name, content) in shards)
            {
                await datasets.GetBlobClient(name).UploadAsync(content, overwrite: true);
            }
        });
    }

    private sealed class Restore(Func<Task> restore) : IAsyncDisposable
    {
        public async ValueTask DisposeAsync() => await restore();
    }
}

/// <summary>The built trainer behind a script that first records its start (one line per process, with its arguments).</summary>
public sealed class CountingTrainer : IDisposable
{
    private readonly string _folder = System.IO.Path.Combine(System.IO.Path.GetTempPath(), $"trainer-starts-{Guid.NewGuid():n}");

    public CountingTrainer()
    {
        Directory.CreateDirectory(_folder);
        File.WriteAllText(Path, $"#!/bin/sh\necho \"$$ $*\" >> '{Log}'\nexec dotnet '{RepoPaths.Trainer}' \"$@\"\n");
        if (!OperatingSystem.IsWindows())
        {
            File.SetUnixFileMode(Path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
    }

    public string Path => System.IO.Path.Combine(_folder, "trainer.sh");

    private string Log => System.IO.Path.Combine(_folder, "starts.log");

    public string[] Starts => File.Exists(Log) ? File.ReadAllLines(Log) : [];

    public int StartsOf(string jobId) => Starts.Count(line => line.EndsWith($"--job {jobId}", StringComparison.Ordinal));

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}
