using System.CommandLine;
using Azure;
using Azure.Storage.Blobs.Models;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Cli;

/// <summary><c>pipeline submit &lt;file&gt; [--spec] [--wait]</c>: upload into incoming (spec first), print the run id, optionally follow it.</summary>
public static class SubmitCommand
{
    public static Command Create()
    {
        var file = new Argument<FileInfo>("file") { Description = "The data file to upload (JSONL, CSV, TSV, TXT or MD)." };
        var spec = new Option<FileInfo?>("--spec") { Description = "A run spec (JSON) uploaded beside the file as <name>.pipeline.json." };
        var name = new Option<string?>("--name") { Description = "Blob name in the incoming container (default: the file name)." };
        var wait = new Option<bool>("--wait") { Description = "Follow the run until it ends (or reaches --until) and print its summary." };
        var until = new Option<string?>("--until") { Description = "With --wait: stop waiting once this stage has ended (default: wait until the run ends)." };
        var timeout = new Option<int>("--timeout") { Description = "With --wait: seconds to wait before giving up (exit code 4).", DefaultValueFactory = _ => 600 };
        var score = new Option<FileInfo?>("--score") { Description = "A file to score with the fine-tuned model once it is registered (uploaded to outputs/inputs/; needs a fineTune section in the spec)." };
        var command = new Command("submit", "Upload a data file into the incoming container and print its run id.") { file, spec, name, wait, until, timeout, score };
        command.SetAction(async (parse, ct) =>
        {
            var source = parse.GetValue(file)!;
            if (!source.Exists)
            {
                return CliOptions.Fail($"{source.FullName} does not exist.", CliOptions.ExitCodes.UsageError);
            }

            if (parse.GetValue(score) is not null && parse.GetValue(spec) is null)
            {
                return CliOptions.Fail("--score needs --spec with a fineTune section: the file is scored by the model the run fine-tunes.", CliOptions.ExitCodes.UsageError);
            }

            var storage = CliOptions.Storage(parse);
            await storage.EnsureCreatedAsync(ct);
            var blobName = parse.GetValue(name) ?? source.Name;
            var incoming = storage.Container(StorageNames.Containers.Incoming);
            if (parse.GetValue(spec) is { } specFile)
            {
                var specBytes = await File.ReadAllBytesAsync(specFile.FullName, ct);
                if (parse.GetValue(score) is { } scoreFile)
                {
                    // The fine-tuned model scores this file in the same run: fineTune.infer names its uploaded copy.
                    System.Text.Json.Nodes.JsonNode? parsed;
                    try
                    {
                        parsed = System.Text.Json.Nodes.JsonNode.Parse(specBytes);
                    }
                    catch (System.Text.Json.JsonException e)
                    {
                        return CliOptions.Fail($"{specFile.Name} is not valid JSON: {e.Message}", CliOptions.ExitCodes.UsageError);
                    }

                    if (parsed is not System.Text.Json.Nodes.JsonObject specJson || specJson["fineTune"] is not System.Text.Json.Nodes.JsonObject fineTune)
                    {
                        return CliOptions.Fail($"--score needs a run spec with a fineTune section; {specFile.Name} has none.", CliOptions.ExitCodes.UsageError);
                    }

                    if (!scoreFile.Exists)
                    {
                        return CliOptions.Fail($"{scoreFile.FullName} does not exist.", CliOptions.ExitCodes.UsageError);
                    }

                    var (scoreBlob, _) = await InferCommand.UploadInputAsync(storage, scoreFile, ct);
                    var infer = fineTune["infer"] as System.Text.Json.Nodes.JsonObject ?? [];
                    infer["input"] = scoreBlob;
                    fineTune["infer"] = infer;
                    specBytes = System.Text.Encoding.UTF8.GetBytes(specJson.ToJsonString());
                }

                try
                {
                    RunSpec.Parse(specBytes, specFile.Name);
                }
                catch (RunSpecException e)
                {
                    return CliOptions.Fail(e.Message, CliOptions.ExitCodes.UsageError);
                }

                // The spec goes first: ingestion reads it when the data's event arrives.
                await incoming.GetBlobClient(RunSpec.CandidateNamesFor(blobName).First()).UploadAsync(new BinaryData(specBytes), overwrite: true, ct);
            }

            Response<BlobContentInfo> uploaded;
            await using (var stream = source.OpenRead())
            {
                uploaded = await incoming.GetBlobClient(blobName).UploadAsync(stream, overwrite: true, ct);
            }

            var runId = RunIds.ForBlob(StorageNames.Containers.Incoming, blobName, uploaded.Value.ETag.ToString());
            if (!parse.GetValue(wait))
            {
                if (CliOptions.Json(parse))
                {
                    Console.Out.WriteLine($"{{\"runId\":\"{runId}\",\"blob\":\"{StorageNames.Containers.Incoming}/{blobName}\"}}");
                }
                else
                {
                    Console.Out.WriteLine(runId);
                }

                return CliOptions.ExitCodes.Succeeded;
            }

            if (!CliOptions.Json(parse))
            {
                Spectre.Console.AnsiConsole.MarkupLineInterpolated($"Uploaded [bold]{StorageNames.Containers.Incoming}/{blobName}[/]: run [bold]{runId}[/]");
            }

            return await RunsCommands.WaitAsync(parse, new RunStore(storage), runId, parse.GetValue(until), TimeSpan.FromSeconds(parse.GetValue(timeout)), ct);
        });
        return command;
    }
}
