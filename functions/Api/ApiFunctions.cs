using Microsoft.AspNetCore.Http;
using Microsoft.Azure.Functions.Worker;
using Microsoft.Extensions.Logging;
using Pipeline.Functions.Telemetry;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Functions.Api;

/// <summary>
/// The HTTP API as HTTP-triggered functions (routes under host.json's <c>routePrefix</c>, <c>api</c>). The host
/// forwards each request to this worker's ASP.NET Core server; each function runs one handler of
/// <see cref="PipelineApi"/> and writes its result to the response.
/// </summary>
public sealed class ApiFunctions(RunStore runs, RunTransitions transitions, RunEvents events, StorageClients storage, QueueSender sender, ILogger<ApiFunctions> logger)
{
    [Function("ListRuns")]
    public Task ListRunsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "runs")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListRunsAsync(runs, request.Query["status"].FirstOrDefault(), int.TryParse(request.Query["top"], out var top) ? top : null, request.HttpContext.RequestAborted));

    [Function("GetRun")]
    public Task GetRunAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "runs/{runId}")] HttpRequest request, string runId) =>
        RespondAsync(request, PipelineApi.GetRunAsync(runs, runId, request.HttpContext.RequestAborted), runId);

    [Function("SubmitRun")]
    public Task SubmitRunAsync([HttpTrigger(AuthorizationLevel.Function, "post", Route = "runs")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.SubmitRunAsync(request, storage, runs, sender, request.HttpContext.RequestAborted));

    [Function("CancelRun")]
    public Task CancelRunAsync([HttpTrigger(AuthorizationLevel.Function, "post", Route = "runs/{runId}/cancel")] HttpRequest request, string runId) =>
        RespondAsync(request, PipelineApi.CancelRunAsync(transitions, runId, request.Query["reason"].FirstOrDefault(), request.HttpContext.RequestAborted), runId);

    [Function("GetRunEvents")]
    public Task GetRunEventsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "runs/{runId}/events")] HttpRequest request, string runId) =>
        RespondAsync(request, PipelineApi.GetRunEventsAsync(runs, events, runId, request.HttpContext.RequestAborted), runId);

    [Function("ListDatasets")]
    public Task ListDatasetsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "datasets")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListDatasetsAsync(storage, request.HttpContext.RequestAborted));

    [Function("ListModels")]
    public Task ListModelsAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "models")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListModelsAsync(storage, request.HttpContext.RequestAborted));

    [Function("ListBatches")]
    public Task ListBatchesAsync([HttpTrigger(AuthorizationLevel.Function, "get", Route = "batches")] HttpRequest request) =>
        RespondAsync(request, PipelineApi.ListBatchesAsync(storage, request.HttpContext.RequestAborted));

    private async Task RespondAsync(HttpRequest request, Task<IResult> handler, string? runId = null)
    {
        using var scope = runId is null ? null : RunTelemetry.BeginRun(logger, runId);
        var result = await handler;
        await result.ExecuteAsync(request.HttpContext);
    }
}
