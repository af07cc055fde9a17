using System.Text.Json;
using Azure;
using Microsoft.AspNetCore.Http;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Functions.Api;

/// <summary>
/// The HTTP API's handlers (<see cref="ApiFunctions"/> binds them to HTTP-triggered functions). JSON bodies
/// with stable shapes; errors as RFC 7807 problem details.
/// </summary>
public static class PipelineApi
{
    /// <summary>The body of <c>POST /api/runs</c>: a blob already uploaded, and optionally a run spec.</summary>
    public sealed record SubmitRunRequest(string? Blob, JsonElement? Spec);

    public static async Task<IResult> ListRunsAsync(RunStore runs, string? status, int? top, CancellationToken ct)
    {
        if (status is not null && status is not (RunStatus.Queued or RunStatus.Running or RunStatus.Succeeded or RunStatus.Failed or RunStatus.Cancelled or RunStatus.CompletedWithFailures))
        {
            return Problem(400, "invalid-status", "Invalid status filter", $"'{status}' is not a run status; use queued, running, succeeded, failed, cancelled or completed_with_failures.");
        }

        var list = await runs.ListAsync(status, Math.Clamp(top ?? 100, 1, 1000), ct);
        return Results.Json(list.Select(RunView.From).ToList(), ViewJson.Default.ListRunView);
    }

    public static async Task<IResult> GetRunAsync(RunStore runs, string runId, CancellationToken ct) =>
        await runs.GetAsync(runId, ct) is { } run
            ? Results.Json(RunView.From(run), ViewJson.Default.RunView)
            : RunNotFound(runId);

    public static async Task<IResult> SubmitRunAsync(HttpRequest request, StorageClients storage, RunStore runs, QueueSender sender, CancellationToken ct)
    {
        SubmitRunRequest? body;
        try
        {
            body = await JsonSerializer.DeserializeAsync<SubmitRunRequest>(request.Body, JsonSerializerOptions.Web, ct);
        }
        catch (JsonException e)
        {
            return Problem(400, "invalid-body", "The request body is not valid JSON", e.Message);
        }

        var blob = body?.Blob;
        if (!BlobPath.TryParse(blob, out var source))
        {
            return Problem(400, "invalid-body", "A blob is required", "Send {\"blob\": \"incoming/<file>\"} naming a file already uploaded to the storage account, and optionally \"spec\": {...}.");
        }

        RunSpec? spec = null;
        if (body!.Spec is { ValueKind: JsonValueKind.Object } specJson)
        {
            try
            {
                spec = RunSpec.Parse(JsonSerializer.SerializeToUtf8Bytes(specJson), "in the request");
            }
            catch (RunSpecException e)
            {
                return Problem(400, "invalid-spec", "The run spec is not valid", e.Message);
            }
        }

        string etag;
        try
        {
            etag = (await storage.Blob(source).GetPropertiesAsync(cancellationToken: ct)).Value.ETag.ToString();
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return Problem(400, "blob-not-found", "The blob does not exist", $"'{blob}' is not in this storage account. Upload it first (for example into the incoming container).");
        }

        var runId = RunIds.ForBlob(source.Container, source.Name, etag);
        var run = await runs.GetOrCreateAsync(new RunRecord { RunId = runId, Source = blob, SourceETag = etag.Trim('"'), Stage = Stages.Ingest }, ct);
        await sender.SendAsync(StorageNames.Queues.Commands, MessageTypes.Ingest, runId, new IngestCommand(blob, spec), PipelineJson.Default.IngestCommand, cancellationToken: ct);
        return Results.Json(RunView.From(run), ViewJson.Default.RunView, statusCode: StatusCodes.Status202Accepted);
    }

    public static async Task<IResult> CancelRunAsync(RunTransitions transitions, string runId, string? reason, CancellationToken ct)
    {
        var run = await transitions.CancelAsync(runId, reason, ct);
        if (run is null)
        {
            return RunNotFound(runId);
        }

        return run.Status == RunStatus.Cancelled
            ? Results.Json(RunView.From(run), ViewJson.Default.RunView, statusCode: StatusCodes.Status202Accepted)
            : Problem(409, "run-finished", "The run has already ended", $"Run {runId} ended {run.Status}; only a queued or running run can be cancelled.");
    }

    public static async Task<IResult> GetRunEventsAsync(RunStore runs, RunEvents events, string runId, CancellationToken ct) =>
        await runs.GetAsync(runId, ct) is null
            ? RunNotFound(runId)
            : Results.Json(await events.ListAsync(runId, ct), ViewJson.Default.ListRunEventView);

    public static async Task<IResult> ListDatasetsAsync(StorageClients storage, CancellationToken ct) =>
        Results.Json(await DatasetCatalog.ListAsync(storage, ct), ViewJson.Default.ListDatasetView);

    public static async Task<IResult> ListBatchesAsync(StorageClients storage, CancellationToken ct) =>
        Results.Json(await Pipeline.Inference.BatchCatalog.ListAsync(storage, ct), Pipeline.Inference.InferenceJson.Default.ListInferenceManifest);

    public static async Task<IResult> ListModelsAsync(StorageClients storage, CancellationToken ct) =>
        Results.Json(await new Pipeline.Models.ModelRegistry(storage).ListAsync(ct), Pipeline.Models.ModelJson.Default.ListModelManifest);

    private static IResult RunNotFound(string runId) =>
        Problem(404, "run-not-found", "No such run", $"There is no run '{runId}'. List runs with GET /api/runs.");

    /// <summary>An RFC 7807 problem: a stable type URI per kind of error, a title, and what to do.</summary>
    public static IResult Problem(int status, string code, string title, string detail) =>
        Results.Problem(detail: detail, statusCode: status, title: title, type: $"urn:pipeline:problem:{code}");
}
