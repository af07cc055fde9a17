using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Azure.Storage.Blobs.Models;
using Pipeline.Messaging;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Spectre.Console;

namespace Pipeline.Cli;

/// <summary><c>pipeline up</c> / <c>down</c> (local Azurite + host), <c>artifacts</c>, <c>lineage</c>.</summary>
public static class LocalCommands
{
    public static Command Up()
    {
        var command = new Command("up", "Start Azurite and the local host in the background (what ./run.sh host does); stop them with: pipeline down.");
        command.SetAction(async (parse, ct) =>
        {
            var root = RepoRoot();
            if (root is null)
            {
                return CliOptions.Fail("pipeline up runs from a clone of the Pipeline repository (it starts run.sh host); cd into it first.", CliOptions.ExitCodes.UsageError);
            }

            var state = Path.Combine(root, ".run");
            Directory.CreateDirectory(state);
            var pidFile = Path.Combine(state, "up.pid");
            if (File.Exists(pidFile) && IsRunning(int.Parse(await File.ReadAllTextAsync(pidFile, ct))))
            {
                return CliOptions.Fail("Pipeline is already up. Stop it with: pipeline down", CliOptions.ExitCodes.UsageError);
            }

            var log = Path.Combine(state, "up.log");
            File.Delete(log);
            var start = new ProcessStartInfo("setsid") { WorkingDirectory = root, UseShellExecute = false };
            foreach (var arg in new[] { "bash", "-c", $"exec ./run.sh host > '{log}' 2>&1" })
            {
                start.ArgumentList.Add(arg);
            }

            using var process = Process.Start(start)!;
            await File.WriteAllTextAsync(pidFile, process.Id.ToString(), ct);
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < TimeSpan.FromMinutes(5))
            {
                var text = File.Exists(log) ? await File.ReadAllTextAsync(log, ct) : "";
                var line = text.Split('\n').FirstOrDefault(l => l.TrimStart().StartsWith("export AzureWebJobsStorage=", StringComparison.Ordinal));
                if (line is not null)
                {
                    var connection = line.Trim()["export AzureWebJobsStorage=".Length..].Trim('\'');
                    if (CliOptions.Json(parse))
                    {
                        Console.Out.WriteLine(JsonSerializer.Serialize(new JsonObject { ["connectionString"] = connection, ["log"] = log }));
                    }
                    else
                    {
                        AnsiConsole.MarkupLineInterpolated($"Pipeline is up (log: {log}). Use it with:");
                        Console.Out.WriteLine($"export AzureWebJobsStorage='{connection}'");
                    }

                    return CliOptions.ExitCodes.Succeeded;
                }

                if (process.HasExited)
                {
                    return CliOptions.Fail($"run.sh host stopped before the host started; see {log}", CliOptions.ExitCodes.RunFailed);
                }

                await Task.Delay(500, ct);
            }

            return CliOptions.Fail($"The local host did not start within 5 minutes; see {log}", CliOptions.ExitCodes.TimedOut);
        });
        return command;
    }

    public static Command Down()
    {
        var command = new Command("down", "Stop what pipeline up started.");
        command.SetAction(async (parse, ct) =>
        {
            var root = RepoRoot();
            var pidFile = root is null ? null : Path.Combine(root, ".run", "up.pid");
            if (pidFile is null || !File.Exists(pidFile) || !IsRunning(int.Parse(await File.ReadAllTextAsync(pidFile, ct))))
            {
                AnsiConsole.MarkupLine("Pipeline is not up.");
                return CliOptions.ExitCodes.Succeeded;
            }

            using var process = Process.GetProcessById(int.Parse(await File.ReadAllTextAsync(pidFile, ct)));
            // run.sh stops Azurite and the host on TERM.
            Process.Start("kill", ["-TERM", process.Id.ToString()])!.WaitForExit();
            await process.WaitForExitAsync(ct).WaitAsync(TimeSpan.FromSeconds(30), ct);
            File.Delete(pidFile);
            AnsiConsole.MarkupLine("Pipeline is down.");
            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    public static Command Artifacts()
    {
        var runId = new Argument<string>("runId") { Description = "The run whose artifacts to download." };
        var output = new Option<DirectoryInfo?>("--out") { Description = "Where to put them (default: ./<runId>/)." };
        var command = new Command("artifacts", "Download a run's artifacts (dataset, errors, shards, stats, report, quarantine copies).") { runId, output };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            var id = parse.GetValue(runId)!;
            var run = await new RunStore(storage).GetAsync(id, ct);
            if (run is null)
            {
                return CliOptions.Fail($"No run {id}. List runs with: pipeline runs", CliOptions.ExitCodes.NotFound);
            }

            var target = parse.GetValue(output)?.FullName ?? Path.Combine(Directory.GetCurrentDirectory(), id);
            var files = new SortedSet<string>(StringComparer.Ordinal);
            foreach (var path in run.GetArtifacts().Values)
            {
                if (!BlobPath.TryParse(path, out var artifact))
                {
                    continue;
                }

                var container = storage.Container(artifact.Container);
                var prefix = artifact.Name;
                var names = new List<string>();
                if (prefix.EndsWith('/'))
                {
                    await foreach (var blob in container.GetBlobsAsync(BlobTraits.None, BlobStates.None, prefix, ct))
                    {
                        names.Add(blob.Name);
                    }
                }
                else
                {
                    names.Add(prefix);
                }

                foreach (var name in names)
                {
                    var local = Path.Combine(target, container.Name, name.Replace('/', Path.DirectorySeparatorChar));
                    if (files.Add(local))
                    {
                        Directory.CreateDirectory(Path.GetDirectoryName(local)!);
                        await container.GetBlobClient(name).DownloadToAsync(local, ct);
                    }
                }
            }

            if (CliOptions.Json(parse))
            {
                Console.Out.WriteLine(JsonSerializer.Serialize(new JsonObject { ["runId"] = id, ["directory"] = target, ["files"] = new JsonArray([.. files.Select(f => JsonValue.Create(f))]) }));
            }
            else
            {
                AnsiConsole.MarkupLineInterpolated($"Downloaded {files.Count} file(s) to {target}");
            }

            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    public static Command Lineage()
    {
        var artifact = new Argument<string>("artifact") { Description = "A batch id (bt-...), model id, run id (run-...), dataset id (ds-...) or prepared id (pp-...)." };
        var command = new Command("lineage", "Trace an artifact back to its source blob and every setting used: predictions to model, model to prepared data, prepared data to dataset, dataset to source.") { artifact };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            var chain = await TraceAsync(storage, parse.GetValue(artifact)!, ct);
            if (chain is null)
            {
                return CliOptions.Fail($"Nothing found for '{parse.GetValue(artifact)}'. Give a batch id, model id, run id, dataset id or prepared id (pipeline batches, models, runs, datasets).", CliOptions.ExitCodes.NotFound);
            }

            if (CliOptions.Json(parse))
            {
                Console.Out.WriteLine(chain.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
                return CliOptions.ExitCodes.Succeeded;
            }

            var tree = new Tree(Markup.Escape(parse.GetValue(artifact)!));
            foreach (var (key, value) in chain)
            {
                tree.AddNode($"[bold]{Markup.Escape(key)}[/]: {Markup.Escape(value?.ToJsonString() ?? "null")}");
            }

            AnsiConsole.Write(tree);
            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    /// <summary>From a run, dataset or prepared id back to the source: each step read from a committed manifest.</summary>
    private static async Task<JsonObject?> TraceAsync(StorageClients storage, string id, CancellationToken cancellationToken)
    {
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        async Task<JsonNode?> Read(string path)
        {
            try
            {
                return JsonNode.Parse((await datasets.GetBlobClient(path).DownloadContentAsync(cancellationToken)).Value.Content.ToString());
            }
            catch (Azure.RequestFailedException e) when (e.Status == 404)
            {
                return null;
            }
        }

        var chain = new JsonObject();
        string? datasetId = null;
        string? preparedPath = null;
        string? preparedId = null;
        string? modelId = null;
        if (id.StartsWith("bt-", StringComparison.Ordinal))
        {
            // The batch's newest committed version (a retry-failed merged in writes the next one).
            if (await new Pipeline.Inference.BatchFiles(storage, id).NewestAsync(cancellationToken) is not (var batch, var files))
            {
                return null;
            }

            chain["batch"] = new JsonObject
            {
                ["manifest"] = files.PathOf(files.Manifest),
                ["version"] = batch.Version,
                ["status"] = batch.Status,
                ["input"] = batch.Input,
                ["rows"] = batch.Rows,
                ["failed"] = batch.Failed,
                ["options"] = JsonNode.Parse(JsonSerializer.Serialize(batch.Options, Pipeline.Inference.InferenceJson.Default.InferenceOptions)),
                ["executionProvider"] = batch.ExecutionProvider,
                ["results"] = batch.Results,
                ["run"] = batch.RunId,
            };
            modelId = batch.ModelId;
        }
        else if (id.StartsWith("run-", StringComparison.Ordinal))
        {
            var run = await new RunStore(storage).GetAsync(id, cancellationToken);
            if (run is null)
            {
                return null;
            }

            chain["run"] = JsonNode.Parse(JsonSerializer.Serialize(RunView.From(run), ViewJson.Default.RunView));
            datasetId = run.DatasetId;
            preparedPath = run.GetArtifacts().GetValueOrDefault("preparedManifest")?["datasets/".Length..];
            modelId = run.GetArtifacts().GetValueOrDefault("model")?.Split('/')[1];
        }
        else if (id.StartsWith("pp-", StringComparison.Ordinal))
        {
            preparedId = id;
        }
        else if (id.StartsWith("ds-", StringComparison.Ordinal))
        {
            datasetId = id;
        }
        else
        {
            modelId = id;
        }

        if (modelId is not null && await BlobJson.ReadAsync(storage.Container(StorageNames.Containers.Models).GetBlobClient($"{modelId}/model.json"), Pipeline.Models.ModelJson.Default.ModelManifest, cancellationToken) is { } model)
        {
            chain["model"] = new JsonObject
            {
                ["folder"] = $"{StorageNames.Containers.Models}/{modelId}/",
                ["task"] = model.Task,
                ["labels"] = new JsonArray([.. model.Labels.Select(l => JsonValue.Create(l))]),
                ["tokenizer"] = JsonNode.Parse(JsonSerializer.Serialize(model.Tokenizer, Pipeline.Preprocessing.PreprocessJson.Default.TokenizerSpec)),
                ["baseModel"] = model.Lineage.BaseModel,
                ["job"] = model.Lineage.Source,
                ["hyperparameters"] = model.Lineage.Hyperparameters is { } hyper ? JsonNode.Parse(hyper.GetRawText()) : null,
                ["metrics"] = model.Lineage.Metrics is { } metrics ? new JsonObject(metrics.Select(m => KeyValuePair.Create(m.Key, (JsonNode?)JsonValue.Create(m.Value)))) : null,
            };
            datasetId ??= model.Lineage.DatasetId;
            preparedId ??= model.Lineage.PreparedId;
        }
        else if (chain.Count == 0 && preparedId is null && datasetId is null)
        {
            return null;
        }

        if (preparedPath is null && preparedId is not null)
        {
            var prefix = datasetId is null ? null : $"{datasetId}/prepared/";
            await foreach (var blob in datasets.GetBlobsAsync(BlobTraits.None, BlobStates.None, prefix, cancellationToken))
            {
                if (blob.Name.EndsWith($"/prepared/{preparedId}/manifest.json", StringComparison.Ordinal))
                {
                    preparedPath = blob.Name;
                    datasetId ??= blob.Name[..blob.Name.IndexOf('/')];
                    break;
                }
            }
        }

        if (preparedPath is not null && await Read(preparedPath) is JsonObject prepared)
        {
            chain["prepared"] = new JsonObject
            {
                ["manifest"] = $"{StorageNames.Containers.Datasets}/{preparedPath}",
                ["preparedId"] = prepared["preparedId"]?.DeepClone(),
                ["tokenizer"] = prepared["tokenizer"]?.DeepClone(),
                ["tokenizerFingerprint"] = prepared["tokenizerFingerprint"]?.DeepClone(),
                ["recipe"] = prepared["recipe"]?.DeepClone(),
                ["shards"] = prepared["shards"]?.DeepClone(),
            };
        }

        if (datasetId is not null && await Read($"{datasetId}/manifest.json") is JsonObject dataset)
        {
            chain["dataset"] = new JsonObject
            {
                ["manifest"] = $"{StorageNames.Containers.Datasets}/{datasetId}/manifest.json",
                ["datasetId"] = datasetId,
                ["format"] = dataset["format"]?.DeepClone(),
                ["recordKind"] = dataset["recordKind"]?.DeepClone(),
                ["settingsFingerprint"] = dataset["settingsFingerprint"]?.DeepClone(),
                ["ingestedByRun"] = dataset["runId"]?.DeepClone(),
            };
            chain["source"] = new JsonObject
            {
                ["blob"] = dataset["sourceBlob"]?.DeepClone(),
                ["etag"] = dataset["sourceETag"]?.DeepClone(),
                ["sha256"] = dataset["sha256"]?.DeepClone(),
            };
        }

        return chain.Count == 0 ? null : chain;
    }

    private static bool IsRunning(int pid)
    {
        try
        {
            using var process = Process.GetProcessById(pid);
            return !process.HasExited;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }

    private static string? RepoRoot()
    {
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
        {
            for (var directory = new DirectoryInfo(start); directory is not null; directory = directory.Parent)
            {
                if (File.Exists(Path.Combine(directory.FullName, "run.sh")) && File.Exists(Path.Combine(directory.FullName, "Pipeline.sln")))
                {
                    return directory.FullName;
                }
            }
        }

        return null;
    }
}
