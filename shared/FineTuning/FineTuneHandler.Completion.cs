using System.Text.Json;
using Microsoft.Extensions.Logging;
using Pipeline.FineTuning.Trainer;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.FineTuning;

/// <summary>A job's end on its run: failed with the trainer's reason, or succeeded once its model folder loads.</summary>
public sealed partial class FineTuneHandler
{
    private Task<RunRecord> UpdateRunAsync(JobSpec job, Action<RunRecord> change, CancellationToken cancellationToken) =>
        runs.UpdateAsync(job.RunId, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            change(r);
            return true;
        }, cancellationToken);

    private Task FailAsync(JobSpec job, string code, string message, TimeSpan elapsed, JobStatus? status, CancellationToken cancellationToken) =>
        transitions.FailAsync(job.RunId, Stages.FineTune, code, message, elapsed, r =>
        {
            if (status is not null)
            {
                r.SetMetrics(status.Metrics);
            }

            r.SetArtifact("jobStatus", $"{StorageNames.Containers.Jobs}/{job.JobId}/status.json");
        }, cancellationToken);

    /// <summary>The trainer says it finished: the model folder must load and fit its tokenizer before it is registered on the run.</summary>
    private async Task<string> SucceededAsync(JobSpec job, JobStatus status, TimeSpan elapsed, CancellationToken cancellationToken)
    {
        ModelRuntime model;
        try
        {
            model = await sessions.GetAsync(job.OutputModelId, cancellationToken);
        }
        catch (InferenceRejectedException e)
        {
            await FailAsync(job, FineTuneErrorCodes.InvalidModel, $"The trainer reported success but its model folder {job.OutputModelFolder} cannot be used: {e.Message}", elapsed, status, cancellationToken);
            return JobStates.Failed;
        }

        var runSpec = (await runs.GetAsync(job.RunId, cancellationToken))?.SpecJson is { } specJson ? JsonSerializer.Deserialize(specJson, PipelineJson.Default.RunSpec) : null;
        var infer = FineTuneSpec.From(runSpec?.FineTune).Infer;
        var metrics = model.Manifest.Lineage.Metrics ?? status.Metrics;
        // Cancelled while the job trained: the model stays registered, the run stays cancelled.
        var (_, changed) = await transitions.SucceedAsync(job.RunId, RunEvents.Types.StageSucceeded, r =>
        {
            r.SetStage(Stages.FineTune, RunStatus.Succeeded);
            r.SetMetrics(metrics);
            r.SetCounts(new Dictionary<string, long> { ["fineTuneEpoch"] = status.Epoch, ["fineTuneProgressPercent"] = 100 });
            r.SetArtifact("model", job.OutputModelFolder);
            if (job.QuantizedModelId is { } quantized)
            {
                r.SetArtifact("quantizedModel", $"{StorageNames.Containers.Models}/{quantized}/");
            }
            r.SetArtifact("metrics", $"{StorageNames.Containers.Jobs}/{job.JobId}/metrics.jsonl");
            r.SetTiming(Stages.FineTune, elapsed);
            r.LastError = null;
            RunTransitions.QueueNextOrEnd(r, infer is not null ? Stages.Inference : null);
        }, cancellationToken);
        if (!changed)
        {
            return JobStates.Succeeded;
        }

        if (infer is not null)
        {
            await sender.SendAsync(StorageNames.Queues.Inference, MessageTypes.Inference, job.RunId, infer with { ModelId = job.OutputModelId },
                InferenceCommandJson.Default.InferenceRequest, cancellationToken: cancellationToken);
        }

        logger.LogInformation("Job {JobId} succeeded: model {ModelId} registered (validation accuracy {Accuracy})", job.JobId, job.OutputModelId, metrics.GetValueOrDefault("validationAccuracy"));
        return JobStates.Succeeded;
    }
}
