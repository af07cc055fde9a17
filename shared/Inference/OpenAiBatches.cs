using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Pipeline.Messaging;
using Pipeline.Models;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// OpenAI's Batches API over Pipeline's runs. Creating a batch checks its input file and model, records the
/// batch and sends an <c>infer</c> command for a run of the same id; every read maps that run (and the
/// inference batch it produced) to OpenAI's batch object, so the state is never kept twice.
/// </summary>
public sealed class OpenAiBatches(StorageClients storage, RunStore runs, RunTransitions transitions, QueueSender sender)
{
    public const string RecordsPrefix = "openai/batches/";
    public const string CompletionWindow = "24h";

    public static class Statuses
    {
        public const string Validating = "validating";
        public const string InProgress = "in_progress";
        public const string Finalizing = "finalizing";
        public const string Completed = "completed";
        public const string Failed = "failed";
        public const string Cancelling = "cancelling";
        public const string Cancelled = "cancelled";
        public const string Expired = "expired";
    }

    private readonly OpenAiFiles _files = new(storage);

    public async Task<OpenAiBatch> CreateAsync(OpenAiCreateBatch request, CancellationToken cancellationToken)
    {
        if (string.IsNullOrEmpty(request.InputFileId))
        {
            throw new OpenAiApiException(400, "missing_required_parameter", "input_file_id is required: upload the requests with POST /v1/files (purpose=batch) and pass the file's id.", "input_file_id");
        }

        var task = OpenAiBatchFormat.TaskOf(request.Endpoint)
            ?? throw new OpenAiApiException(400, "unsupported_endpoint", $"endpoint '{request.Endpoint}' is not served: {OpenAiBatchFormat.ServedDescription}.", "endpoint");
        if (request.CompletionWindow != CompletionWindow)
        {
            throw new OpenAiApiException(400, "invalid_completion_window", $"completion_window is '{request.CompletionWindow}'; only \"{CompletionWindow}\" is supported.", "completion_window");
        }

        var file = await _files.GetAsync(request.InputFileId, cancellationToken);
        if (file is null || file.Purpose != OpenAiFiles.BatchPurpose)
        {
            throw new OpenAiApiException(404, "file_not_found", file is null
                ? $"No file with id '{request.InputFileId}': upload it with POST /v1/files (purpose=batch)."
                : $"File '{request.InputFileId}' has purpose '{file.Purpose}'; a batch reads a file uploaded with purpose=batch.", "input_file_id");
        }

        var input = OpenAiFiles.InputOf(request.InputFileId);
        var modelId = await FirstModelAsync(request.InputFileId, cancellationToken);
        var model = await BlobJson.ReadAsync(storage.Container(StorageNames.Containers.Models).GetBlobClient($"{modelId}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, cancellationToken)
            ?? throw new OpenAiApiException(404, "model_not_found",
                $"The model '{modelId}' does not exist in this Pipeline. Name a registered model in body.model (GET /api/models or `pipeline models` lists them; `pipeline models add-starter` registers {StarterModel.ModelId}).", "model");
        if (model.Task != task)
        {
            throw new OpenAiApiException(400, "unsupported_endpoint",
                $"Model '{modelId}' is a {model.Task} model: create its batch with endpoint {(model.Task == ModelTasks.Embedding ? OpenAiBatchFormat.Embeddings : OpenAiBatchFormat.Classifications)}, not {request.Endpoint}.", "endpoint");
        }

        var now = DateTimeOffset.UtcNow;
        // Ids sort newest first, so listing the records in name order lists the batches as OpenAI does.
        var record = new OpenAiBatchRecord
        {
            Id = $"batch_{DateTimeOffset.MaxValue.UtcTicks - now.UtcTicks:D19}{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(4))}",
            InputFileId = request.InputFileId,
            Input = input,
            Endpoint = request.Endpoint!,
            CompletionWindow = CompletionWindow,
            Model = modelId,
            Metadata = request.Metadata,
            CreatedAt = now,
        };
        await BlobJson.WriteAsync(RecordBlob(record.Id), record, OpenAiJson.Default.OpenAiBatchRecord, cancellationToken);
        var run = await runs.GetOrCreateAsync(new RunRecord { RunId = record.Id, Source = input, Stage = Stages.Inference }, cancellationToken);
        await sender.SendAsync(StorageNames.Queues.Commands, MessageTypes.Infer, record.Id, new InferenceRequest(modelId, input), InferenceCommandJson.Default.InferenceRequest, cancellationToken: cancellationToken);
        return Map(record, run);
    }

    public async Task<OpenAiBatch> GetAsync(string id, CancellationToken cancellationToken)
    {
        var record = await RecordAsync(id, cancellationToken);
        return Map(record, await runs.GetAsync(record.Id, cancellationToken));
    }

    /// <summary>Batches newest first, <paramref name="limit"/> (1 to 100, default 20) after the batch <paramref name="after"/>.</summary>
    public async Task<OpenAiBatchList> ListAsync(string? after, int? limit, CancellationToken cancellationToken)
    {
        if (limit is < 1 or > 100)
        {
            throw new OpenAiApiException(400, "invalid_limit", $"limit is {limit}; use 1 to 100 (default 20).", "limit");
        }

        var take = limit ?? 20;
        var batches = new List<OpenAiBatch>();
        var hasMore = false;
        var start = after is null ? null : RecordsPrefix + after + ".json";
        await foreach (var item in storage.Container(StorageNames.Containers.Outputs).GetBlobsAsync(Azure.Storage.Blobs.Models.BlobTraits.None, Azure.Storage.Blobs.Models.BlobStates.None, RecordsPrefix, cancellationToken))
        {
            if (start is not null && string.CompareOrdinal(item.Name, start) <= 0)
            {
                continue;
            }

            if (batches.Count == take)
            {
                hasMore = true;
                break;
            }

            if (await BlobJson.ReadAsync(storage.Container(StorageNames.Containers.Outputs).GetBlobClient(item.Name), OpenAiJson.Default.OpenAiBatchRecord, cancellationToken) is { } record)
            {
                batches.Add(Map(record, await runs.GetAsync(record.Id, cancellationToken)));
            }
        }

        return new OpenAiBatchList(batches, batches.FirstOrDefault()?.Id, batches.LastOrDefault()?.Id, hasMore);
    }

    /// <summary>Cancels the batch's run: shards not yet scored are skipped, and no output is assembled.</summary>
    public async Task<OpenAiBatch> CancelAsync(string id, CancellationToken cancellationToken)
    {
        var record = await RecordAsync(id, cancellationToken);
        var run = await transitions.CancelAsync(record.Id, "through POST /v1/batches/{id}/cancel", cancellationToken);
        var batch = Map(record, run);
        if (batch.Status is not (Statuses.Cancelled or Statuses.Cancelling))
        {
            throw new OpenAiApiException(409, "batch_not_cancellable", $"Batch {id} is {batch.Status}; only a batch that is validating or in_progress can be cancelled.");
        }

        return batch;
    }

    private Azure.Storage.Blobs.BlobClient RecordBlob(string id) =>
        storage.Container(StorageNames.Containers.Outputs).GetBlobClient($"{RecordsPrefix}{id}.json");

    private async Task<OpenAiBatchRecord> RecordAsync(string id, CancellationToken cancellationToken) =>
        (id.StartsWith("batch_", StringComparison.Ordinal) && id.All(c => char.IsAsciiLetterOrDigit(c) || c == '_')
            ? await BlobJson.ReadAsync(RecordBlob(id), OpenAiJson.Default.OpenAiBatchRecord, cancellationToken)
            : null)
        ?? throw new OpenAiApiException(404, "batch_not_found", $"No batch with id '{id}'. List batches with GET /v1/batches.", "batch_id");

    /// <summary>The model the file's first request names in <c>body.model</c>: the model that scores the batch.</summary>
    private async Task<string> FirstModelAsync(string fileId, CancellationToken cancellationToken)
    {
        await using var stream = await _files.OpenReadAsync(fileId, cancellationToken)
            ?? throw new OpenAiApiException(404, "file_not_found", $"No file with id '{fileId}'.", "input_file_id");
        using var reader = new StreamReader(stream, Encoding.UTF8);
        long line = 0;
        while (await reader.ReadLineAsync(cancellationToken) is { } text)
        {
            line++;
            if (string.IsNullOrWhiteSpace(text))
            {
                continue;
            }

            if (!OpenAiBatchFormat.IsRequestLine(text))
            {
                throw new OpenAiApiException(400, "invalid_file_format",
                    $"Line {line} of {fileId} is not a batch request: each line is {{\"custom_id\": ..., \"method\": \"POST\", \"url\": \"/v1/embeddings\", \"body\": {{\"model\": ..., \"input\": ...}}}}.", "input_file_id");
            }

            using var document = JsonDocument.Parse(text);
            return document.RootElement.GetProperty("body") is { ValueKind: JsonValueKind.Object } body && body.TryGetProperty("model", out var model) && model.ValueKind == JsonValueKind.String && model.GetString() is { Length: > 0 } name
                ? name
                : throw new OpenAiApiException(400, "missing_model", $"The request on line {line} of {fileId} has no body.model: name the registered model that scores the batch.", "model");
        }

        throw new OpenAiApiException(400, "empty_file", $"{fileId} has no requests: upload a JSONL file with one request per line.", "input_file_id");
    }

    /// <summary>OpenAI's batch object for a record and its run (the run may not be recorded yet).</summary>
    public static OpenAiBatch Map(OpenAiBatchRecord record, RunRecord? run)
    {
        var counts = run?.GetCounts() ?? [];
        var artifacts = run?.GetArtifacts() ?? [];
        var ended = run?.EndedAt?.ToUnixTimeSeconds();
        var status = run?.Status switch
        {
            RunStatus.Succeeded or RunStatus.CompletedWithFailures => Statuses.Completed,
            RunStatus.Failed => Statuses.Failed,
            RunStatus.Cancelled => Statuses.Cancelled,
            RunStatus.Running when counts.ContainsKey("inferenceShards") && counts.ContainsKey("inferenceRows") && counts.GetValueOrDefault("inferenceShardsDone") >= counts["inferenceShards"] => Statuses.Finalizing,
            RunStatus.Running when counts.ContainsKey("inferenceShards") => Statuses.InProgress,
            _ => Statuses.Validating,
        };
        var batchId = artifacts.GetValueOrDefault("batch") is { } prefix ? prefix.Trim('/').Split('/')[^1] : null;
        var total = counts.GetValueOrDefault("openAiRequests");
        var failed = counts.GetValueOrDefault("openAiRequestsFailed");
        var completed = status == Statuses.Completed;
        return new OpenAiBatch
        {
            Id = record.Id,
            Endpoint = record.Endpoint,
            Model = record.Model,
            Errors = status == Statuses.Failed ? new OpenAiBatchErrors([new OpenAiBatchError(run!.ErrorCode ?? "failed", run.Error ?? "The batch failed.")]) : null,
            InputFileId = record.InputFileId,
            CompletionWindow = record.CompletionWindow,
            Status = status,
            OutputFileId = completed && artifacts.ContainsKey("openAiOutput") && batchId is not null ? OpenAiFiles.OutputFileId(batchId) : null,
            ErrorFileId = completed && failed > 0 && batchId is not null ? OpenAiFiles.ErrorFileId(batchId) : null,
            CreatedAt = record.CreatedAt.ToUnixTimeSeconds(),
            InProgressAt = status == Statuses.Validating ? null : run?.StartedAt?.ToUnixTimeSeconds(),
            ExpiresAt = record.CreatedAt.AddHours(24).ToUnixTimeSeconds(),
            FinalizingAt = completed ? ended : null,
            CompletedAt = completed ? ended : null,
            FailedAt = status == Statuses.Failed ? ended : null,
            CancellingAt = status == Statuses.Cancelled ? ended : null,
            CancelledAt = status == Statuses.Cancelled ? ended : null,
            RequestCounts = new OpenAiRequestCounts(total, completed ? total - failed : 0, failed),
            Metadata = record.Metadata,
            Pipeline = new OpenAiBatchPipeline(record.Id, batchId, run?.Status ?? RunStatus.Queued),
        };
    }
}
