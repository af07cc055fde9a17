using System.Diagnostics;
using System.Text;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.FineTuning;

/// <summary>The built trainer program as a process (as the local backend and the GPU image run it), on Azurite.</summary>
[Collection(LocalHostProcess.Collection)]
public sealed class TrainerProcessTests(Azurite azurite) : IClassFixture<Azurite>
{
    [Fact]
    public async Task A_trainer_sent_SIGTERM_mid_training_stops_cleanly_with_status_cancelled_and_its_lease_released()
    {
        using var pipeline = new TestPipeline(azurite, settings: new Dictionary<string, string?> { ["Pipeline:FineTune:HeartbeatSeconds"] = "0.5" });
        var (datasetId, preparedId, manifest) = await FineTuneStageTests.PrepareAsync(pipeline, "ft-sigterm.tsv");
        var handler = (FineTuneHandler)pipeline.Services.GetService(typeof(FineTuneHandler))!;
        // Long enough that only the signal ends it: a step per example, embeddings trained, 1000 epochs.
        var spec = RunSpec.Parse(Encoding.UTF8.GetBytes("""{"fineTune":{"epochs":1000,"batchSize":1,"trainable":"head+embeddings","earlyStoppingPatience":0,"outputModelId":"ft-sigterm"}}"""), "test");
        var job = await handler.PlanAsync(new FineTuneRequest(datasetId, preparedId, manifest, spec), "run-ft-sigterm", CancellationToken.None);
        var files = new JobFiles(pipeline.Storage, job.JobId);

        var start = LocalProcessBackend.TrainerStart(job.JobId, RepoPaths.Trainer);
        start.Environment[StorageClients.ConnectionSetting] = azurite.ConnectionString;
        using var trainer = Process.Start(start)!;
        var output = new StringBuilder();
        trainer.OutputDataReceived += (_, e) => { lock (output) { output.AppendLine(e.Data); } };
        trainer.ErrorDataReceived += (_, e) => { lock (output) { output.AppendLine(e.Data); } };
        trainer.BeginOutputReadLine();
        trainer.BeginErrorReadLine();
        try
        {
            // Mid-training: the trainer has reported steps.
            await Eventually.ReturnsAsync(async () => await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None) is { State: JobStates.Running, Step: > 0 } running ? running : null,
                TimeSpan.FromSeconds(120), "the trainer's first steps", () => output.ToString());

            using (var kill = Process.Start("kill", ["-TERM", trainer.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)]))
            {
                await kill.WaitForExitAsync();
            }

            using var exit = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            await trainer.WaitForExitAsync(exit.Token);
            Assert.True(trainer.ExitCode == 0, $"exit code {trainer.ExitCode}\n{output}");
            var status = (await BlobJson.ReadAsync(files.Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
            Assert.Equal(JobStates.Cancelled, status.State);
            Assert.Equal(JobTrainer.StoppedError, status.Error);
            Assert.True(status.Step > 0 && status.Progress < 1);
            // The lease went with it: the next trainer starts at once instead of waiting out a dead holder.
            await using var lease = await RunLease.AcquireAsync(pipeline.Storage, job.JobId, JobTrainer.LeaseStage, CancellationToken.None);
        }
        finally
        {
            if (!trainer.HasExited)
            {
                trainer.Kill(entireProcessTree: true);
            }
        }
    }
}
