using System.Diagnostics;
using System.Text.Json;
using Azure;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Pipeline.Models;

namespace Pipeline.Inference;

/// <summary>
/// Scores one shard of a batch and commits it: its results, errors and ledger (and OpenAI-format lines)
/// are written first, its done marker last and once (the caller holds the shard's lease).
/// </summary>
internal sealed class ShardScorer(ModelSessions models, ILogger logger)
{
    public async Task ScoreAsync(BatchFiles files, BatchPlan batch, int shard, int attempt, CancellationToken cancellationToken)
    {
        var wall = Stopwatch.StartNew();
        var rows = await files.ReadInputAsync(shard, cancellationToken);
        var model = await models.GetAsync(batch.ModelId, cancellationToken);
        if (batch.ModelVersion is { } version && model.Manifest.CreatedAt != version)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.ModelChanged,
                $"Model '{batch.ModelId}' was registered again (version {model.Manifest.CreatedAt:O}) while batch {batch.BatchId} (version {version:O}) was being scored; its rows are not mixed across versions. Send the command again: the new version gets a new batch.");
        }

        // Requests of OpenAI's batch format that this model cannot answer fail before scoring.
        for (var i = 0; i < rows.Count; i++)
        {
            if (rows[i] is { Code: null, OpenAi: { } request } && OpenAiBatchFormat.Refusal(request, model.Manifest) is var (refusedCode, refusal))
            {
                rows[i] = rows[i] with { Code = refusedCode, Error = refusal };
            }
        }

        var scorer = new BatchScorer(model, models.Settings, batch.Options.MaxTokensPerBatch!.Value, batch.Options.Normalize ?? model.Manifest.Normalize);
        var (scored, stats) = await scorer.ScoreAsync([.. rows.Select(r => r.Code is null ? r.Text : null)], cancellationToken);
        var openAi = rows.Count > 0 && rows[0].OpenAi is not null ? new OpenAiBatchFormat.RowOutcome[rows.Count] : null;

        var results = new BatchLineWriter();
        var errors = new BatchLineWriter();
        var ledger = new BatchLineWriter();
        var codes = new Dictionary<string, long>();
        var samples = new Dictionary<string, string>();
        var succeeded = 0;
        for (var i = 0; i < rows.Count; i++)
        {
            var row = rows[i];
            var attempts = row.PriorAttempts + attempt;
            if (scored[i].Values is { } values && row.OpenAi is { } asked && OpenAiBatchFormat.Mismatch(asked, values.Length) is var (mismatchCode, mismatch))
            {
                scored[i] = new ScoredRow(null, mismatchCode, mismatch);
            }

            if (scored[i].Values is { } scoredValues)
            {
                results.Result(row, scoredValues, model.Manifest, row.OpenAi is null ? null : scored[i].Tokens);
                ledger.LedgerEntry(row, true, attempts, null, null);
                openAi?[i] = new OpenAiBatchFormat.RowOutcome(scoredValues, scored[i].Tokens, null, null);
                succeeded++;
                continue;
            }

            var code = row.Code ?? scored[i].Code ?? RowErrorCodes.ModelError;
            var error = row.Error ?? scored[i].Error ?? "The row produced no output.";
            openAi?[i] = new OpenAiBatchFormat.RowOutcome(null, 0, code, error);
            errors.Error(row, code, error);
            ledger.LedgerEntry(row, false, attempts, code, error);
            codes[code] = codes.GetValueOrDefault(code) + 1;
            samples.TryAdd(code, error);
        }

        await files.ShardResults(shard).UploadAsync(results.ToBinaryData(), overwrite: true, cancellationToken);
        await files.ShardErrors(shard).UploadAsync(errors.ToBinaryData(), overwrite: true, cancellationToken);
        await files.ShardLedger(shard).UploadAsync(ledger.ToBinaryData(), overwrite: true, cancellationToken);
        var (requests, failedRequests) = openAi is null ? (null, null) : await WriteOpenAiShardAsync(files, shard, rows, openAi, model.Manifest, cancellationToken);
        var outcome = new ShardOutcome
        {
            Shard = shard,
            Rows = rows.Count,
            Succeeded = succeeded,
            Failed = rows.Count - succeeded,
            Tokens = stats.Tokens,
            Slots = stats.Slots,
            Batches = stats.Batches,
            TokenizeMs = Math.Round(stats.TokenizeMs, 1),
            InferenceMs = Math.Round(stats.InferenceMs, 1),
            WallMs = Math.Round(wall.Elapsed.TotalMilliseconds, 1),
            ExecutionProvider = model.ExecutionProvider,
            Attempt = attempt,
            ErrorCodes = codes,
            ErrorSamples = samples,
            OpenAiRequests = requests,
            OpenAiFailed = failedRequests,
            FinishedAt = DateTimeOffset.UtcNow,
        };
        if (!await WriteDoneAsync(files, outcome, cancellationToken, once: true))
        {
            // Only a holder whose shard lease was taken over gets here: the other delivery's commit stands.
            logger.LogWarning("Shard {Shard} of {BatchId} was committed by another delivery; this one's outcome is dropped", shard, batch.BatchId);
            return;
        }

        logger.LogInformation("Shard {Shard} of {BatchId}: {Rows} rows ({Failed} failed), {Tokens} tokens, padding {Padding:P1}, model {ModelMs} ms",
            shard, batch.BatchId, rows.Count, outcome.Failed, stats.Tokens, Padding(stats.Tokens, stats.Slots), outcome.InferenceMs);
    }

    /// <summary>A shard's lines in OpenAI's batch output format, written beside its own results before its done marker.</summary>
    public static async Task<(int?, int?)> WriteOpenAiShardAsync(BatchFiles files, int shard, IReadOnlyList<ShardInputRow> rows, IReadOnlyList<OpenAiBatchFormat.RowOutcome> outcomes, ModelManifest model, CancellationToken cancellationToken)
    {
        var (output, errors, requests, failed) = OpenAiBatchFormat.WriteShard(files.BatchId, rows, outcomes, model);
        await files.ShardOpenAiOutput(shard).UploadAsync(output, overwrite: true, cancellationToken);
        await files.ShardOpenAiErrors(shard).UploadAsync(errors, overwrite: true, cancellationToken);
        return (requests, failed);
    }

    /// <summary>A shard's done marker, its commit: with <paramref name="once"/>, only if none is there yet (false when one was).</summary>
    public static async Task<bool> WriteDoneAsync(BatchFiles files, ShardOutcome outcome, CancellationToken cancellationToken, bool once = false)
    {
        try
        {
            await files.Done(outcome.Shard).UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(outcome, InferenceJson.Default.ShardOutcome)), new BlobUploadOptions
            {
                Metadata = new Dictionary<string, string>
                {
                    [BatchFiles.RowsMetadata] = outcome.Rows.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    [BatchFiles.FailedMetadata] = outcome.Failed.ToString(System.Globalization.CultureInfo.InvariantCulture),
                },
                Conditions = once ? new BlobRequestConditions { IfNoneMatch = ETag.All } : null,
            }, cancellationToken);
            return true;
        }
        catch (RequestFailedException e) when (once && e.Status is 409 or 412)
        {
            return false;
        }
    }

    public static double Padding(long tokens, long slots) => slots == 0 ? 0 : 1 - (double)tokens / slots;
}
