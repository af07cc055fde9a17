using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.WebUtilities;
using Microsoft.Net.Http.Headers;
using Pipeline.Inference;

namespace Pipeline.Functions.Api;

/// <summary>
/// The handlers of the <c>/v1</c> routes (<see cref="OpenAiFunctions"/> binds them): HTTP in and out, in OpenAI's
/// shapes; the files and batches themselves are <see cref="OpenAiFiles"/> and <see cref="OpenAiBatches"/>.
/// </summary>
public static class OpenAiApi
{
    /// <summary><c>POST /v1/files</c>: a multipart body with <c>file</c> and <c>purpose=batch</c>; the file streams to blob storage.</summary>
    public static async Task<IResult> UploadFileAsync(HttpRequest request, OpenAiFiles files, CancellationToken ct)
    {
        if (!MediaTypeHeaderValue.TryParse(request.ContentType, out var contentType) || !contentType.MediaType.Equals("multipart/form-data", StringComparison.OrdinalIgnoreCase)
            || HeaderUtilities.RemoveQuotes(contentType.Boundary).Value is not { Length: > 0 } boundary)
        {
            throw new OpenAiApiException(400, "invalid_content_type", "Upload files as multipart/form-data with the fields file and purpose=batch.");
        }

        // Batch files run to hundreds of megabytes (OpenAI takes 200 MB): past the server's default 30 MB body
        // limit, which holds nothing in memory anyway; the sections stream on to blob storage.
        if (request.HttpContext.Features.Get<IHttpMaxRequestBodySizeFeature>() is { IsReadOnly: false } limit)
        {
            limit.MaxRequestBodySize = null;
        }

        var reader = new MultipartReader(boundary, request.Body) { BodyLengthLimit = null };
        string? purpose = null, id = null, filename = null;
        while (await reader.ReadNextSectionAsync(ct) is { } section)
        {
            if (!ContentDispositionHeaderValue.TryParse(section.ContentDisposition, out var disposition))
            {
                continue;
            }

            var name = HeaderUtilities.RemoveQuotes(disposition.Name).Value;
            if (name == "purpose")
            {
                purpose = (await new StreamReader(section.Body).ReadToEndAsync(ct)).Trim();
            }
            else if (name == "file" && id is null)
            {
                filename = HeaderUtilities.RemoveQuotes(disposition.FileNameStar.HasValue ? disposition.FileNameStar : disposition.FileName).Value ?? "upload.jsonl";
                if (purpose is not null and not OpenAiFiles.BatchPurpose)
                {
                    throw PurposeRefused(purpose);
                }

                id = await files.UploadAsync(section.Body, filename, purpose, ct);
            }
        }

        if (id is null)
        {
            throw new OpenAiApiException(400, "missing_required_parameter", "The multipart body has no file field: send the JSONL of requests as file.", "file");
        }

        if (purpose != OpenAiFiles.BatchPurpose)
        {
            await files.DeleteAsync(id, ct);
            throw purpose is null ? new OpenAiApiException(400, "missing_required_parameter", "purpose is required: send purpose=batch.", "purpose") : PurposeRefused(purpose);
        }

        await files.SetPurposeAsync(id, filename!, purpose, ct);
        return Json((await files.GetAsync(id, ct))!, OpenAiJson.Default.OpenAiFile);
    }

    private static OpenAiApiException PurposeRefused(string purpose) =>
        new(400, "invalid_purpose", $"purpose is '{purpose}'; Pipeline stores files for batches only: send purpose=batch.", "purpose");

    public static async Task<IResult> GetFileAsync(OpenAiFiles files, string fileId, CancellationToken ct) =>
        Json(await files.GetAsync(fileId, ct) ?? throw FileNotFound(fileId), OpenAiJson.Default.OpenAiFile);

    public static async Task<IResult> GetFileContentAsync(OpenAiFiles files, string fileId, CancellationToken ct) =>
        Results.Stream(await files.OpenReadAsync(fileId, ct) ?? throw FileNotFound(fileId), "application/jsonl");

    public static async Task<IResult> DeleteFileAsync(OpenAiFiles files, string fileId, CancellationToken ct) =>
        await files.DeleteAsync(fileId, ct)
            ? Json(new OpenAiFileDeleted(fileId, Deleted: true), OpenAiJson.Default.OpenAiFileDeleted)
            : throw FileNotFound(fileId);

    public static async Task<IResult> CreateBatchAsync(HttpRequest request, OpenAiBatches batches, CancellationToken ct)
    {
        OpenAiCreateBatch? body;
        try
        {
            body = await JsonSerializer.DeserializeAsync(request.Body, OpenAiJson.Default.OpenAiCreateBatch, ct);
        }
        catch (JsonException e)
        {
            throw new OpenAiApiException(400, "invalid_json", $"The body is not a valid batch request: {e.Message}");
        }

        return Json(await batches.CreateAsync(body ?? new OpenAiCreateBatch(), ct), OpenAiJson.Default.OpenAiBatch);
    }

    public static async Task<IResult> ListBatchesAsync(HttpRequest request, OpenAiBatches batches, CancellationToken ct)
    {
        int? limit = null;
        if (request.Query["limit"].FirstOrDefault() is { } text)
        {
            limit = int.TryParse(text, out var value) ? value : throw new OpenAiApiException(400, "invalid_limit", $"limit is '{text}'; use an integer from 1 to 100.", "limit");
        }

        return Json(await batches.ListAsync(request.Query["after"].FirstOrDefault(), limit, ct), OpenAiJson.Default.OpenAiBatchList);
    }

    private static OpenAiApiException FileNotFound(string fileId) =>
        new(404, "file_not_found", $"No file with id '{fileId}'. Upload one with POST /v1/files.", "file_id");

    public static IResult Json<T>(T value, JsonTypeInfo<T> type) => Results.Json(value, type);

    public static IResult Error(OpenAiApiException e) => Results.Json(e.ToError(), OpenAiJson.Default.OpenAiError, statusCode: e.Status);
}
