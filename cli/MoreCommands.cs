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

            var table = new Table().AddColumns("Model", "Task", "Labels", "Output", "Vocabulary", "Metrics", "Lineage");
            foreach (var m in models)
            {
                table.AddRow(m.ModelId, m.Task, Markup.Escape(string.Join(", ", m.Labels)), m.Output, m.VocabularySize.ToString("N0"),
                    Markup.Escape(string.Join(", ", (m.Lineage.Metrics ?? []).Select(x => $"{x.Key} {x.Value:N3}"))),
                    Markup.Escape(m.Lineage.PreparedId ?? m.Lineage.Source ?? m.Lineage.BaseModel ?? ""));
            }

            AnsiConsole.Write(table);
            return CliOptions.ExitCodes.Succeeded;
        });
        command.Subcommands.Add(RegisterModel());
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
