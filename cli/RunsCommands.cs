using System.CommandLine;
using System.Diagnostics;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Spectre.Console;

namespace Pipeline.Cli;

/// <summary><c>pipeline status</c>, <c>pipeline runs</c>, <c>pipeline poison</c>.</summary>
public static class RunsCommands
{
    public static Command Status()
    {
        var runId = new Argument<string>("runId") { Description = "The run id (printed by submit)." };
        var wait = new Option<bool>("--wait") { Description = "Follow the run until it ends (or reaches --until)." };
        var until = new Option<string?>("--until") { Description = "With --wait: stop once this stage has ended (default: wait until the run ends)." };
        var timeout = new Option<int>("--timeout") { Description = "With --wait: seconds before giving up (exit code 4).", DefaultValueFactory = _ => 600 };
        var command = new Command("status", "Show where a run stands: status, stage, counts, artifacts, timings and errors.") { runId, wait, until, timeout };
        command.SetAction(async (parse, ct) =>
        {
            var runs = new RunStore(CliOptions.Storage(parse));
            var id = parse.GetValue(runId)!;
            if (parse.GetValue(wait))
            {
                return await WaitAsync(parse, runs, id, parse.GetValue(until), TimeSpan.FromSeconds(parse.GetValue(timeout)), ct);
            }

            var run = await runs.GetAsync(id, ct);
            if (run is null)
            {
                return CliOptions.Fail($"No run {id}. List runs with: pipeline runs", CliOptions.ExitCodes.NotFound);
            }

            await PrintAsync(parse, runs, run, ct);
            return ExitCodeOf(run);
        });
        return command;
    }

    public static Command List()
    {
        var status = new Option<string?>("--status") { Description = "Only runs with this status: queued, running, succeeded, failed, cancelled, completed_with_failures." };
        var command = new Command("runs", "List runs, newest first.") { status };
        command.SetAction(async (parse, ct) =>
        {
            var runs = await new RunStore(CliOptions.Storage(parse)).ListAsync(parse.GetValue(status), cancellationToken: ct);
            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(runs.Select(RunView.From).ToList(), ViewJson.Default.ListRunView);
                return CliOptions.ExitCodes.Succeeded;
            }

            var table = new Table().AddColumns("Run", "Status", "Stage", "Source", "Records", "Updated");
            foreach (var run in runs)
            {
                table.AddRow(run.RunId, Markup.Escape(run.Status), run.Stage, Markup.Escape(run.Source), run.GetCounts().GetValueOrDefault("valid").ToString("N0"), run.UpdatedAt.ToString("u"));
            }

            AnsiConsole.Write(table);
            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    public static Command Poison()
    {
        var queue = new Option<string?>("--queue") { Description = "Only messages that came from this queue." };
        var command = new Command("poison", "List messages that were given up on (poisoned or invalid), with the recorded reason.") { queue, MoreCommands.Replay() };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            var records = await FailedMessages.ListAsync(storage, parse.GetValue(queue), ct);
            var views = records.Select(r => r.ToView()).ToList();
            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(views, ViewJson.Default.ListPoisonView);
                return CliOptions.ExitCodes.Succeeded;
            }

            var table = new Table().AddColumns("Queue", "Kind", "Run", "Attempts", "Reason");
            foreach (var view in views)
            {
                table.AddRow(view.Queue, view.Kind, view.RunId ?? "", view.Attempts.ToString(), Markup.Escape(view.Reason));
            }

            AnsiConsole.Write(table);
            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    /// <summary>
    /// Puts a command on the commands queue for run <paramref name="runId"/>; prints the run id (or
    /// <c>{"runId","type"}</c> with --output json), or with <paramref name="wait"/> follows the run to its end.
    /// </summary>
    public static async Task<int> SendCommandAsync(ParseResult parse, StorageClients storage, string type, string runId, System.Text.Json.JsonElement body, bool wait, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var envelope = new MessageEnvelope { Type = type, RunId = runId, CorrelationId = runId, Body = body };
        await storage.Queue(StorageNames.Queues.Commands).SendMessageAsync(System.Text.Json.JsonSerializer.Serialize(envelope, PipelineJson.Default.MessageEnvelope), cancellationToken);
        if (!wait)
        {
            Console.Out.WriteLine(CliOptions.Json(parse) ? System.Text.Json.JsonSerializer.Serialize(new Dictionary<string, string> { ["runId"] = runId, ["type"] = type }) : runId);
            return CliOptions.ExitCodes.Succeeded;
        }

        if (!CliOptions.Json(parse))
        {
            AnsiConsole.MarkupLineInterpolated($"Sent the [bold]{type}[/] command: run [bold]{runId}[/]");
        }

        return await WaitAsync(parse, new RunStore(storage), runId, null, timeout, cancellationToken);
    }

    /// <summary>Polls the run until it is final or <paramref name="until"/> has ended, then prints the summary.</summary>
    public static async Task<int> WaitAsync(ParseResult parse, RunStore runs, string runId, string? until, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        RunRecord? run = null;
        string? lastLine = null;
        while (clock.Elapsed < timeout)
        {
            run = await runs.GetAsync(runId, cancellationToken);
            if (run is not null)
            {
                var stageStatus = until is null ? null : run.GetStages().GetValueOrDefault(until);
                if (RunStatus.IsFinal(run.Status) || stageStatus is RunStatus.Succeeded or RunStatus.Failed)
                {
                    await PrintAsync(parse, runs, run, cancellationToken);
                    return ExitCodeOf(run);
                }

                var counts = run.GetCounts();
                var line = ProgressLine(run, counts);
                if (!CliOptions.Json(parse) && line != lastLine)
                {
                    AnsiConsole.MarkupLineInterpolated($"[grey]{clock.Elapsed:mm\\:ss}[/] {line}");
                    lastLine = line;
                }
            }

            await Task.Delay(500, cancellationToken);
        }

        if (run is not null)
        {
            await PrintAsync(parse, runs, run, cancellationToken);
        }

        return CliOptions.Fail($"Run {runId} did not reach the end of '{until ?? "the run"}' within {timeout.TotalSeconds:N0} s. Check it later with: pipeline status {runId}", CliOptions.ExitCodes.TimedOut);
    }

    public static int ExitCodeOf(RunRecord run) => run.Status switch
    {
        RunStatus.Failed or RunStatus.Cancelled => CliOptions.ExitCodes.RunFailed,
        RunStatus.CompletedWithFailures => CliOptions.ExitCodes.CompletedWithFailures,
        _ => CliOptions.ExitCodes.Succeeded,
    };

    /// <summary>One line of live progress for the stage the run is in.</summary>
    public static string ProgressLine(RunRecord run, Dictionary<string, long> counts) => run.Stage switch
    {
        Stages.Preprocess when counts.TryGetValue("preprocessRecords", out var prepared) =>
            $"{run.Stage}: {run.Status}, {prepared:N0} records tokenized, {counts.GetValueOrDefault("preprocessTokens"):N0} tokens",
        Stages.Inference when Math.Max(counts.GetValueOrDefault("inferenceRows"), counts.GetValueOrDefault("inferenceRowsSplit")) == 0 =>
            $"{run.Stage}: {run.Status}, loading the model and splitting the input",
        Stages.Inference =>
            $"{run.Stage}: {run.Status}, {counts.GetValueOrDefault("inferenceRowsDone"):N0} of {Math.Max(counts.GetValueOrDefault("inferenceRows"), counts.GetValueOrDefault("inferenceRowsSplit")):N0} rows" +
            $" ({counts.GetValueOrDefault("inferenceShardsDone")} of {counts.GetValueOrDefault("inferenceShards")} shards, {counts.GetValueOrDefault("inferenceRowsPerSecond"):N0} rows/s" +
            (counts.GetValueOrDefault("inferenceEtaSeconds") > 0 ? $", ETA {counts["inferenceEtaSeconds"]} s)" : ")"),
        Stages.FineTune when counts.TryGetValue("fineTuneEpoch", out var epoch) =>
            $"{run.Stage}: {run.Status}, epoch {epoch} of {counts.GetValueOrDefault("fineTuneEpochs")}, step {counts.GetValueOrDefault("fineTuneStep"):N0}, progress {counts.GetValueOrDefault("fineTuneProgressPercent")}%" +
            (run.GetMetrics().TryGetValue("validationAccuracy", out var accuracy) ? $", validation accuracy {accuracy:P1}, loss {run.GetMetrics().GetValueOrDefault("validationLoss"):N3}" : ""),
        Stages.FineTune => $"{run.Stage}: {run.Status}, job submitted, waiting for the trainer's first heartbeat",
        _ => $"{run.Stage}: {run.Status}, {counts.GetValueOrDefault("read"):N0} records read",
    };

    /// <summary>The preprocessing statistics a run points to (<c>container/path</c>), or null.</summary>
    private static async Task<Pipeline.Preprocessing.PreparedStats?> ReadStatsAsync(StorageClients storage, string path, CancellationToken cancellationToken) =>
        storage.BlobAt(path) is { } blob ? await BlobJson.ReadAsync(blob, Pipeline.Preprocessing.PreprocessJson.Default.PreparedStats, cancellationToken) : null;

    public static async Task PrintAsync(ParseResult parse, RunStore runs, RunRecord run, CancellationToken cancellationToken)
    {
        if (CliOptions.Json(parse))
        {
            CliOptions.WriteJson(RunView.From(run), ViewJson.Default.RunView);
            return;
        }

        var stats = run.GetArtifacts().TryGetValue("stats", out var statsPath) ? await ReadStatsAsync(CliOptions.Storage(parse), statsPath, cancellationToken) : null;
        var color = run.Status switch { RunStatus.Failed => "red", RunStatus.Succeeded => "green", _ => "yellow" };
        if (run.Error is not null && run.Status == RunStatus.CompletedWithFailures)
        {
            color = "yellow";
        }
        var grid = new Grid().AddColumn().AddColumn();
        grid.AddRow("[bold]Run[/]", run.RunId);
        grid.AddRow("[bold]Status[/]", $"[{color}]{run.Status}[/] (stage: {run.Stage})");
        grid.AddRow("[bold]Source[/]", Markup.Escape(run.Source));
        grid.AddRow("[bold]Stages[/]", Markup.Escape(string.Join(", ", run.GetStages().Select(s => $"{s.Key} {s.Value}"))));
        if (run.DatasetId is not null)
        {
            grid.AddRow("[bold]Dataset[/]", run.DatasetId);
        }

        if (run.GetMetrics() is { Count: > 0 } metrics)
        {
            grid.AddRow("[bold]Metrics[/]", Markup.Escape(string.Join(", ", metrics.Select(m => $"{m.Key} {m.Value:0.####}"))));
        }

        grid.AddRow("[bold]Counts[/]", Markup.Escape(string.Join(", ", run.GetCounts().Select(c => $"{c.Key} {c.Value:N0}"))));
        if (stats is not null)
        {
            grid.AddRow("[bold]Tokens[/]", Markup.Escape(
                $"train {stats.Train.Tokens:N0} in {stats.Train.Records:N0} records, validation {stats.Validation.Tokens:N0} in {stats.Validation.Records:N0}; " +
                $"length p50 {stats.Lengths.P50}, p95 {stats.Lengths.P95}, max {stats.Lengths.Max}; truncated {stats.Truncated:N0}; " +
                $"duplicates removed {stats.ExactDuplicatesRemoved + stats.NearDuplicatesRemoved:N0}; " +
                $"{stats.Epochs} epochs = {stats.EstimatedTrainingTokens:N0} training tokens (~{stats.EstimatedCost:N2} at {stats.CostPerMillionTokens:N2} per million)"));
            if (stats.Train.Labels.Count > 0)
            {
                grid.AddRow("[bold]Labels[/]", Markup.Escape(string.Join(", ", stats.Train.Labels.OrderBy(l => l.Key, StringComparer.Ordinal).Select(l => $"{l.Key}: {l.Value:N0} train / {stats.Validation.Labels.GetValueOrDefault(l.Key):N0} validation"))));
            }
        }

        grid.AddRow("[bold]Timings[/]", Markup.Escape(string.Join(", ", run.GetTimings().Select(t => $"{t.Key} {t.Value / 1000:N2} s"))));
        foreach (var (name, path) in run.GetArtifacts())
        {
            grid.AddRow($"[bold]{Markup.Escape(name)}[/]", Markup.Escape(path));
        }

        if (run.Error is not null)
        {
            grid.AddRow("[bold red]Error[/]", Markup.Escape($"{run.ErrorCode}: {run.Error}"));
        }

        if (run.ReportPath is not null)
        {
            grid.AddRow("[bold]Report[/]", Markup.Escape(run.ReportPath));
        }

        if (run.LastError is not null && run.Status != RunStatus.Failed)
        {
            grid.AddRow("[bold yellow]Last error[/]", Markup.Escape($"(attempt {run.Attempt}) {run.LastError}"));
        }

        AnsiConsole.Write(new Panel(grid).Header("Pipeline run").Expand());
    }
}
