using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using Pipeline.FineTuning;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Cli;

/// <summary><c>pipeline finetune --dataset &lt;id&gt; [--base-model ...] [--wait]</c>: a <c>finetune</c> command on the commands queue.</summary>
public static class FineTuneCommandLine
{
    public static Command Create()
    {
        var dataset = new Option<string>("--dataset", "-d") { Description = "The dataset (ds-...) to fine-tune on; its newest prepared version is used unless --prepared names one.", Required = true };
        var prepared = new Option<string?>("--prepared") { Description = "A prepared version of the dataset (pp-...)." };
        var baseModel = new Option<string?>("--base-model") { Description = $"A registered encoder whose tokenizer the prepared data used (default: {FineTuneSpec.GeneratedBase})." };
        var epochs = new Option<int?>("--epochs") { Description = "Maximum epochs (default 12 when the embeddings train, 60 for a head on a frozen encoder; early stopping may end sooner)." };
        var learningRate = new Option<double?>("--learning-rate") { Description = "Peak learning rate of AdamW (default 0.02 when the embeddings train, 0.0005 for a head on a frozen encoder)." };
        var pooling = new Option<string?>("--pooling") { Description = "The features' pooling: mean, cls or max, optionally +normalize (default: the base model's)." };
        var batchSize = new Option<int?>("--batch-size") { Description = "Examples per step (default 32)." };
        var output = new Option<string?>("--output-model") { Description = "The new model's id (default: ft-<hash of the job>)." };
        var backend = new Option<string?>("--backend") { Description = "local (default), azureml or containerapps." };
        var settings = new Option<FileInfo?>("--settings") { Description = "A JSON file with the full fineTune section (the options above override it)." };
        var wait = new Option<bool>("--wait") { Description = "Follow the run (epochs, validation metrics) until it ends and print its summary." };
        var timeout = new Option<int>("--timeout") { Description = "With --wait: seconds to wait before giving up (exit code 4).", DefaultValueFactory = _ => 3600 };
        var command = new Command("finetune", "Fine-tune a classification model on a prepared dataset: a job on the configured GPU backend, tracked to a registered model.")
        {
            dataset, prepared, baseModel, epochs, learningRate, batchSize, pooling, output, backend, settings, wait, timeout,
        };
        command.SetAction(async (parse, ct) =>
        {
            JsonObject section;
            try
            {
                section = parse.GetValue(settings) is { } file ? JsonNode.Parse(await File.ReadAllTextAsync(file.FullName, ct)) as JsonObject ?? [] : [];
            }
            catch (JsonException e)
            {
                return CliOptions.Fail($"--settings is not a JSON object: {e.Message}", CliOptions.ExitCodes.UsageError);
            }

            void Set(string name, JsonNode? value)
            {
                if (value is not null)
                {
                    section[name] = value;
                }
            }

            Set("baseModel", parse.GetValue(baseModel));
            Set("epochs", parse.GetValue(epochs));
            Set("learningRate", parse.GetValue(learningRate));
            Set("batchSize", parse.GetValue(batchSize));
            Set("pooling", parse.GetValue(pooling));
            Set("outputModelId", parse.GetValue(output));
            Set("backend", parse.GetValue(backend));
            var fineTune = JsonDocument.Parse(section.ToJsonString()).RootElement.Clone();
            try
            {
                FineTuneSpec.From(fineTune).Validate();
            }
            catch (FineTuneRejectedException e)
            {
                return CliOptions.Fail(e.Message, CliOptions.ExitCodes.UsageError);
            }

            var storage = CliOptions.Storage(parse);
            await storage.EnsureCreatedAsync(ct);
            var datasetId = parse.GetValue(dataset)!;
            var body = JsonSerializer.SerializeToElement(new FineTuneCommand(datasetId, parse.GetValue(prepared), fineTune), FineTuneJson.Default.FineTuneCommand);
            var runId = "run-" + RunIds.Hash($"finetune|{body.GetRawText()}|{DateTimeOffset.UtcNow:O}", 24);
            return await RunsCommands.SendCommandAsync(parse, storage, MessageTypes.FineTune, runId, body, parse.GetValue(wait), TimeSpan.FromSeconds(parse.GetValue(timeout)), ct);
        });
        return command;
    }
}
