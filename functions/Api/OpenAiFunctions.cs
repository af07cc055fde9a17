using Microsoft.AspNetCore.Http;
using Microsoft.Azure.Functions.Worker;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Functions.Api;

/// <summary>
/// OpenAI's Files and Batches API under <c>/v1</c>, so that the OpenAI SDKs submit batch jobs with a change of
/// base URL. Anonymous to the host: <see cref="OpenAiApiKeys"/> checks the Bearer key (the Functions host does
/// not read one as a function key). Each function runs one handler of <see cref="OpenAiApi"/>.
/// </summary>
public sealed class OpenAiFunctions(StorageClients storage, RunStore runs, RunTransitions transitions, QueueSender sender, IConfiguration configuration, ILogger<OpenAiFunctions> logger)
{
    private readonly OpenAiFiles _files = new(storage);
    private readonly OpenAiBatches _batches = new(storage, runs, transitions, sender);

    [Function("OpenAiUploadFile")]
    public Task UploadFileAsync([HttpTrigger(AuthorizationLevel.Anonymous, "post", Route = "v1/files")] HttpRequest request) =>
        RespondAsync(request, () => OpenAiApi.UploadFileAsync(request, _files, request.HttpContext.RequestAborted));

    [Function("OpenAiGetFile")]
    public Task GetFileAsync([HttpTrigger(AuthorizationLevel.Anonymous, "get", Route = "v1/files/{fileId}")] HttpRequest request, string fileId) =>
        RespondAsync(request, () => OpenAiApi.GetFileAsync(_files, fileId, request.HttpContext.RequestAborted));

    [Function("OpenAiGetFileContent")]
    public Task GetFileContentAsync([HttpTrigger(AuthorizationLevel.Anonymous, "get", Route = "v1/files/{fileId}/content")] HttpRequest request, string fileId) =>
        RespondAsync(request, () => OpenAiApi.GetFileContentAsync(_files, fileId, request.HttpContext.RequestAborted));

    [Function("OpenAiDeleteFile")]
    public Task DeleteFileAsync([HttpTrigger(AuthorizationLevel.Anonymous, "delete", Route = "v1/files/{fileId}")] HttpRequest request, string fileId) =>
        RespondAsync(request, () => OpenAiApi.DeleteFileAsync(_files, fileId, request.HttpContext.RequestAborted));

    [Function("OpenAiCreateBatch")]
    public Task CreateBatchAsync([HttpTrigger(AuthorizationLevel.Anonymous, "post", Route = "v1/batches")] HttpRequest request) =>
        RespondAsync(request, () => OpenAiApi.CreateBatchAsync(request, _batches, request.HttpContext.RequestAborted));

    [Function("OpenAiGetBatch")]
    public Task GetBatchAsync([HttpTrigger(AuthorizationLevel.Anonymous, "get", Route = "v1/batches/{batchId}")] HttpRequest request, string batchId) =>
        RespondAsync(request, async () => OpenAiApi.Json(await _batches.GetAsync(batchId, request.HttpContext.RequestAborted), OpenAiJson.Default.OpenAiBatch));

    [Function("OpenAiListBatches")]
    public Task ListBatchesAsync([HttpTrigger(AuthorizationLevel.Anonymous, "get", Route = "v1/batches")] HttpRequest request) =>
        RespondAsync(request, () => OpenAiApi.ListBatchesAsync(request, _batches, request.HttpContext.RequestAborted));

    [Function("OpenAiCancelBatch")]
    public Task CancelBatchAsync([HttpTrigger(AuthorizationLevel.Anonymous, "post", Route = "v1/batches/{batchId}/cancel")] HttpRequest request, string batchId) =>
        RespondAsync(request, async () => OpenAiApi.Json(await _batches.CancelAsync(batchId, request.HttpContext.RequestAborted), OpenAiJson.Default.OpenAiBatch));

    private async Task RespondAsync(HttpRequest request, Func<Task<IResult>> handler)
    {
        var denied = OpenAiApiKeys.Check(configuration[OpenAiApiKeys.Setting], string.Equals(configuration[OpenAiApiKeys.AllowAnonymousSetting], "true", StringComparison.OrdinalIgnoreCase),
            request.Headers.Authorization.FirstOrDefault(), request.Headers["api-key"].FirstOrDefault(), request.Headers["x-functions-key"].FirstOrDefault());
        IResult result;
        try
        {
            result = denied is null ? await handler() : OpenAiApi.Error(denied);
        }
        catch (OpenAiApiException e)
        {
            result = OpenAiApi.Error(e);
        }
        catch (Exception e) when (!request.HttpContext.RequestAborted.IsCancellationRequested)
        {
            // Anything else still answers in OpenAI's error shape, so SDKs report it instead of failing to parse.
            logger.LogError(e, "The /v1 request {Method} {Path} failed", request.Method, request.Path);
            result = OpenAiApi.Error(new OpenAiApiException(500, "server_error", "The request failed on the server; try again. If it keeps failing, the function app's logs say why."));
        }

        await result.ExecuteAsync(request.HttpContext);
    }
}
