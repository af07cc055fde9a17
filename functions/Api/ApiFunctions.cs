using Microsoft.AspNetCore.Http;
using Microsoft.Azure.Functions.Worker;
using Microsoft.Extensions.Logging;
using Pipeline.Functions.Telemetry;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Functions.Api;

/// <summary>
/// The HTTP API as HTTP-triggered functions (every route starts with <c>api/</c>; host.json's <c>routePrefix</c> is
/// empty so that the dashboard, <see cref="DashboardFunctions"/>, is served at the root). The host
/// forwards each request to this worker's ASP.NET Core server; each function runs one handler of
/// <see cref="PipelineApi"/> and writes its result to the response.
/// </summary>
public sealed class ApiFunctions(RunStore runs, RunTransitions transitions, RunEvents events, StorageClients storage, QueueSender sender, ILogger<ApiFunctions> logger)
{
    [Function("ListRuns")]
    public Task ListRunsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "api/runs")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListRunsAsync(runs, request.Query["status"].FirstOrDefault(), int.TryParse(request.Query["top"], out var top) ? top : null, request.HttpContext.RequestAborted));

    [Function("GetRun")]
    public Task GetRunAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "api/runs/{runId}")] HttpRequest request, string runId) =>
        RespondAsync(request, PipelineApi.GetRunAsync(runs, runId, request.HttpContext.RequestAborted), runId);

    [Function("SubmitRun")]
    public Task SubmitRunAsync([HttpTrigger(AuthorizationLevel.Function, "post", Route = "api/runs")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.SubmitRunAsync(request, storage, runs, sender, request.HttpContext.RequestAborted));

    [Function("CancelRun")]
    public Task CancelRunAsync([HttpTrigger(AuthorizationLevel.Function, "post", Route = "api/runs/{runId}/cancel")] HttpRequest request, string runId) =>
        RespondAsync(request, PipelineApi.CancelRunAsync(transitions, runId, request.Query["reason"].FirstOrDefault(), request.HttpContext.RequestAborted), runId);

    [Function("GetRunEvents")]
    public Task GetRunEventsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "api/runs/{runId}/events")] HttpRequest request, string runId) =>
        RespondAsync(request, PipelineApi.GetRunEventsAsync(runs, events, runId, request.HttpContext.RequestAborted), runId);

    [Function("ListDatasets")]
    public Task ListDatasetsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "api/datasets")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListDatasetsAsync(storage, request.HttpContext.RequestAborted));

    [Function("ListModels")]
    public Task ListModelsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "api/models")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListModelsAsync(storage, request.HttpContext.RequestAborted));

    [Function("ListBatches")]
    public Task ListBatchesAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "api/batches")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListBatchesAsync(storage, request.HttpContext.RequestAborted));

    [Function("ReadArtifact")]
    public Task ReadArtifactAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "api/artifacts/{container}/{*path}")] HttpRequest request, string container) =>
        RespondAsync(request, ArtifactApi.ReadAsync(storage, container, ArtifactApi.PathAfter(request.Path, container), request.Query["lines"].FirstOrDefault(), request.Query.ContainsKey("download"), request.HttpContext.RequestAborted));

    [Function("CreateUpload")]
    public Task CreateUploadAsync([HttpTrigger(AuthorizationLevel.Function, "post", Route = "api/uploads")] HttpRequest request) =>
        RespondAsync(request, ArtifactApi.CreateUploadAsync(request, storage, request.HttpContext.RequestAborted));

    [Function("RetryFailedRows")]
    public Task RetryFailedRowsAsync([HttpTrigger(AuthorizationLevel.Function, "post", Route = "api/batches/{batchId}/retry-failed")] HttpRequest request, string batchId) =>
        RespondAsync(request, ArtifactApi.RetryFailedAsync(storage, runs, sender, batchId, request.HttpContext.RequestAborted));

    private async Task RespondAsync(HttpRequest request, Task<IResult> handler, string? runId = null)
    {
        using var scope = runId is null ? null : RunTelemetry.BeginRun(logger, runId);
        var result = await handler;
        await result.ExecuteAsync(request.HttpContext);
    }
}
