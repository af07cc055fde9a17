using System.CommandLine;
using System.Text.Json;
using Azure;
using Pipeline.Inference;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Cli;

/// <summary>
/// <c>pipeline infer --model &lt;id&gt; &lt;file|container/blob&gt; [--wait]</c>: score a file with a registered model
/// (an <c>infer</c> command on the commands queue), and <c>pipeline infer --retry-failed &lt;batchId&gt;</c>.
/// </summary>
public static class InferCommand
{
    /// <summary>Where local files given to <c>pipeline infer</c> are uploaded (not incoming: that would ingest them).</summary>
    public const string InputsPrefix = "inputs/";

    /// <summary>
    /// Uploads a local file to <c>outputs/inputs/&lt;content hash&gt;/&lt;name&gt;</c>: files with the same name never
    /// replace each other while a run waits to read them. Returns the blob path and its ETag.
    /// </summary>
    public static async Task<(string Blob, string ETag)> UploadInputAsync(StorageClients storage, FileInfo file, CancellationToken cancellationToken)
    {
        string hash;
        await using (var content = file.OpenRead())
        {
            hash = Convert.ToHexStringLower(await System.Security.Cryptography.SHA256.HashDataAsync(content, cancellationToken))[..16];
        }

        var name = $"{InputsPrefix}{hash}/{file.Name}";
        await using var stream = file.OpenRead();
        var uploaded = await storage.Container(StorageNames.Containers.Outputs).GetBlobClient(name).UploadAsync(stream, overwrite: true, cancellationToken);
        return ($"{StorageNames.Containers.Outputs}/{name}", uploaded.Value.ETag.ToString());
    }

    public static Command Create()
    {
        var input = new Argument<string?>("input") { Description = "A local file (JSONL, CSV, TSV or TXT; uploaded to outputs/inputs/<content hash>/) or a blob already in the account (container/path).", Arity = ArgumentArity.ZeroOrOne };
        var model = new Option<string?>("--model", "-m") { Description = "The registered model to score with (see: pipeline models)." };
        var rowsPerShard = new Option<int?>("--rows-per-shard") { Description = $"Rows per shard; each shard is one message any instance can take (default {InferenceOptions.DefaultRowsPerShard:N0})." };
        var textField = new Option<string?>("--text-field") { Description = "The text field or column (default: text, sentence, content, ...)." };
        var normalize = new Option<bool>("--normalize") { Description = "Embedding models: L2-normalize each vector." };
        var retryFailed = new Option<string?>("--retry-failed") { Description = "Rescore only the failed rows of this finished batch (bt-...); the batch gets a new version (outputs/<batchId>/versions/NNNNN/) with every earlier result and the new ones." };
        var wait = new Option<bool>("--wait") { Description = "Follow the run (rows done, rows/s, ETA) until it ends and print its summary." };
        var timeout = new Option<int>("--timeout") { Description = "With --wait: seconds to wait before giving up (exit code 4).", DefaultValueFactory = _ => 1800 };
        var command = new Command("infer", "Score a file with a registered model: results.jsonl in input order, errors.jsonl, manifest.json under outputs/<batchId>/.")
        {
            input, model, rowsPerShard, textField, normalize, retryFailed, wait, timeout,
        };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            await storage.EnsureCreatedAsync(ct);
            string type, runId;
            JsonElement body;
            if (parse.GetValue(retryFailed) is { } batchId)
            {
                type = MessageTypes.RetryFailed;
                body = JsonSerializer.SerializeToElement(new RetryFailedCommand(batchId), InferenceJson.Default.RetryFailedCommand);
                runId = RunIds.ForRetry(batchId);
            }
            else
            {
                if (parse.GetValue(model) is not { Length: > 0 } modelId || parse.GetValue(input) is not { Length: > 0 } source)
                {
                    return CliOptions.Fail("Name a model and an input: pipeline infer --model <modelId> <file or container/blob> (or --retry-failed <batchId>).", CliOptions.ExitCodes.UsageError);
                }

                string blob, version;
                if (File.Exists(source))
                {
                    (blob, version) = await UploadInputAsync(storage, new FileInfo(source), ct);
                }
                else
                {
                    try
                    {
                        version = storage.BlobAt(source) is { } existing
                            ? (await existing.GetPropertiesAsync(cancellationToken: ct)).Value.ETag.ToString()
                            : throw new RequestFailedException(404, "not a blob path");
                    }
                    catch (RequestFailedException e) when (e.Status == 404)
                    {
                        return CliOptions.Fail($"'{source}' is neither a local file nor a blob in the account (container/path).", CliOptions.ExitCodes.NotFound);
                    }

                    blob = source;
                }

                var options = new InferenceOptions { RowsPerShard = parse.GetValue(rowsPerShard), TextField = parse.GetValue(textField), Normalize = parse.GetValue(normalize) ? true : null };
                try
                {
                    options.Validate();
                }
                catch (InferenceRejectedException e)
                {
                    return CliOptions.Fail(e.Message, CliOptions.ExitCodes.UsageError);
                }

                type = MessageTypes.Infer;
                body = JsonSerializer.SerializeToElement(new InferenceRequest(modelId, blob, options), InferenceJson.Default.InferenceRequest);
                runId = "run-" + RunIds.Hash($"infer|{modelId}|{blob}|{version}|{body.GetRawText()}", 24);
            }

            return await RunsCommands.SendCommandAsync(parse, storage, type, runId, body, parse.GetValue(wait), TimeSpan.FromSeconds(parse.GetValue(timeout)), ct);
        });
        return command;
    }
}
