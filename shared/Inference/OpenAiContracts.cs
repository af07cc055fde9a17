using System.Text.Json.Serialization;

namespace Pipeline.Inference;

/// <summary>OpenAI's file object (<c>GET /v1/files/{id}</c>).</summary>
public sealed record OpenAiFile
{
    public required string Id { get; init; }
    public string Object { get; init; } = "file";
    public required long Bytes { get; init; }
    public required long CreatedAt { get; init; }
    public long? ExpiresAt { get; init; }
    public required string Filename { get; init; }
    public required string Purpose { get; init; }
    public string Status { get; init; } = "processed";
    public string? StatusDetails { get; init; }
}

public sealed record OpenAiFileDeleted(string Id, bool Deleted)
{
    public string Object { get; init; } = "file";
}

/// <summary>The body of <c>POST /v1/batches</c>.</summary>
public sealed record OpenAiCreateBatch
{
    public string? InputFileId { get; init; }
    public string? Endpoint { get; init; }
    public string? CompletionWindow { get; init; }
    public Dictionary<string, string>? Metadata { get; init; }
}

/// <summary>
/// <c>outputs/openai/batches/&lt;id&gt;.json</c>: a batch created through <c>POST /v1/batches</c>. Its state is
/// never stored twice: status, counts and files are read from the Pipeline run it started (same id).
/// </summary>
public sealed record OpenAiBatchRecord
{
    public int SchemaVersion { get; set; } = 1;
    public required string Id { get; init; }
    public required string InputFileId { get; init; }
    /// <summary>The input file's blob (<c>container/blob</c>): the inference request's input.</summary>
    public required string Input { get; init; }
    public required string Endpoint { get; init; }
    public required string CompletionWindow { get; init; }
    public required string Model { get; init; }
    public Dictionary<string, string>? Metadata { get; init; }
    public required DateTimeOffset CreatedAt { get; init; }
}

public sealed record OpenAiRequestCounts(long Total, long Completed, long Failed);

public sealed record OpenAiBatchError(string Code, string Message, string? Param = null, long? Line = null);

public sealed record OpenAiBatchErrors(List<OpenAiBatchError> Data)
{
    public string Object { get; init; } = "list";
}

/// <summary>Where a batch lives in Pipeline: its run (<c>pipeline status</c>) and inference batch (<c>pipeline infer --retry-failed</c>).</summary>
public sealed record OpenAiBatchPipeline(string RunId, string? BatchId, string RunStatus);

/// <summary>OpenAI's batch object, mapped from the Pipeline run and inference batch (see <see cref="OpenAiBatches"/>).</summary>
public sealed record OpenAiBatch
{
    public required string Id { get; init; }
    public string Object { get; init; } = "batch";
    public required string Endpoint { get; init; }
    public string? Model { get; init; }
    public OpenAiBatchErrors? Errors { get; init; }
    public required string InputFileId { get; init; }
    public required string CompletionWindow { get; init; }
    public required string Status { get; init; }
    public string? OutputFileId { get; init; }
    public string? ErrorFileId { get; init; }
    public required long CreatedAt { get; init; }
    public long? InProgressAt { get; init; }
    public long? ExpiresAt { get; init; }
    public long? FinalizingAt { get; init; }
    public long? CompletedAt { get; init; }
    public long? FailedAt { get; init; }
    public long? ExpiredAt { get; init; }
    public long? CancellingAt { get; init; }
    public long? CancelledAt { get; init; }
    public required OpenAiRequestCounts RequestCounts { get; init; }
    public Dictionary<string, string>? Metadata { get; init; }
    /// <summary>A Pipeline extension (clients ignore fields they do not know).</summary>
    public OpenAiBatchPipeline? Pipeline { get; init; }
}

public sealed record OpenAiBatchList(List<OpenAiBatch> Data, string? FirstId, string? LastId, bool HasMore)
{
    public string Object { get; init; } = "list";
}

/// <summary>OpenAI's error shape: <c>{"error": {"message", "type", "param", "code"}}</c>.</summary>
public sealed record OpenAiErrorBody(string Message, string Type, string? Param, string? Code);

public sealed record OpenAiError(OpenAiErrorBody Error);

/// <summary>Thrown by the Files and Batches API with its HTTP status and OpenAI error code.</summary>
public sealed class OpenAiApiException(int status, string code, string message, string? param = null) : Exception(message)
{
    public int Status { get; } = status;
    public string Code { get; } = code;
    public string? Param { get; } = param;

    public OpenAiError ToError() => new(new OpenAiErrorBody(Message, Status switch
    {
        401 => "invalid_authentication",
        404 => "not_found_error",
        409 => "conflict_error",
        _ => "invalid_request_error",
    }, Param, Code));
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(OpenAiFile))]
[JsonSerializable(typeof(OpenAiFileDeleted))]
[JsonSerializable(typeof(OpenAiCreateBatch))]
[JsonSerializable(typeof(OpenAiBatchRecord))]
[JsonSerializable(typeof(OpenAiBatch))]
[JsonSerializable(typeof(OpenAiBatchList))]
[JsonSerializable(typeof(OpenAiError))]
public sealed partial class OpenAiJson : JsonSerializerContext;
