using System.Diagnostics;
using System.Text.Json;
using Pipeline.Runs;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Cli;

/// <summary>The <c>pipeline</c> CLI as a user runs it (its own process) against the local host on Azurite: JSON output and exit codes.</summary>
[Collection(LocalHostProcess.Collection)]
public sealed class CliTests(HostFixture fixture) : IAsyncLifetime
{
    private LocalHostProcess _host = null!;
    private readonly string _work = Directory.CreateTempSubdirectory("pipeline-cli-").FullName;

    public async Task InitializeAsync() => _host = await fixture.HostAsync();

    public Task DisposeAsync()
    {
        Directory.Delete(_work, recursive: true);
        return Task.CompletedTask;
    }

    private Task<(int ExitCode, string Output, string Error)> PipelineAsync(params string[] args) => RunAsync(fixture.ConnectionString, args);

    /// <summary>Runs the built CLI against a storage account; returns its exit code and what it wrote.</summary>
    public static async Task<(int ExitCode, string Output, string Error)> RunAsync(string connectionString, params string[] args)
    {
        var cli = Path.Combine(RepoPaths.Root, "cli", "bin", RepoPaths.Configuration, "net10.0", "pipeline.dll");
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        start.ArgumentList.Add(cli);
        foreach (var arg in args)
        {
            start.ArgumentList.Add(arg);
        }

        start.Environment["AzureWebJobsStorage"] = connectionString;
        start.Environment["NO_COLOR"] = "1";
        using var process = Process.Start(start)!;
        var output = process.StandardOutput.ReadToEndAsync();
        var error = process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync().WaitAsync(TimeSpan.FromMinutes(3));
        return (process.ExitCode, await output, await error);
    }

    private string File(string name, string content)
    {
        var path = Path.Combine(_work, name);
        System.IO.File.WriteAllText(path, content);
        return path;
    }

    [Fact]
    public async Task Submit_wait_status_runs_events_and_datasets_speak_json()
    {
        var data = File("reviews.tsv", "text\tlabel\nLovely\t1\nAwful\t0\nGreat\t1\nBad\t0\n");
        var spec = File("reviews.pipeline.json", """{"preprocess":{"validationFraction":0.25}}""");

        var submit = await PipelineAsync("submit", data, "--spec", spec, "--wait", "--timeout", "120", "--output", "json");
        Assert.True(submit.ExitCode == 0, submit.Output + submit.Error + _host.Output);
        var run = JsonDocument.Parse(submit.Output).RootElement;
        Assert.Equal(RunStatus.Succeeded, run.GetProperty("status").GetString());
        var runId = run.GetProperty("runId").GetString()!;
        Assert.Equal(4, run.GetProperty("counts").GetProperty("valid").GetInt64());

        var status = await PipelineAsync("status", runId, "-o", "json");
        Assert.Equal(0, status.ExitCode);
        Assert.Equal(runId, JsonDocument.Parse(status.Output).RootElement.GetProperty("runId").GetString());

        var runs = await PipelineAsync("runs", "--status", "succeeded", "-o", "json");
        Assert.Contains(JsonDocument.Parse(runs.Output).RootElement.EnumerateArray(), r => r.GetProperty("runId").GetString() == runId);

        var events = await PipelineAsync("events", runId, "-o", "json");
        Assert.Contains(JsonDocument.Parse(events.Output).RootElement.EnumerateArray(), e => e.GetProperty("type").GetString() == "pipeline.run.stage.succeeded");

        var datasets = await PipelineAsync("datasets", "-o", "json");
        Assert.Contains(JsonDocument.Parse(datasets.Output).RootElement.EnumerateArray(), d => d.GetProperty("datasetId").GetString() == run.GetProperty("datasetId").GetString());

        var cancel = await PipelineAsync("cancel", runId);
        Assert.Equal(2, cancel.ExitCode);
        Assert.Contains("already ended", cancel.Output + cancel.Error);

        var table = await PipelineAsync("status", runId);
        Assert.Contains("Tokens", table.Output);

        var artifacts = await PipelineAsync("artifacts", runId, "--out", Path.Combine(_work, "artifacts"), "-o", "json");
        Assert.Equal(0, artifacts.ExitCode);
        var files = JsonDocument.Parse(artifacts.Output).RootElement.GetProperty("files").EnumerateArray().Select(f => f.GetString()!).ToList();
        Assert.Contains(files, f => f.EndsWith("records.jsonl") && System.IO.File.Exists(f));
        Assert.Contains(files, f => f.EndsWith("train-00000.jsonl"));
        Assert.Contains(files, f => f.EndsWith("stats.json"));

        var lineage = await PipelineAsync("lineage", runId, "-o", "json");
        Assert.Equal(0, lineage.ExitCode);
        var chain = JsonDocument.Parse(lineage.Output).RootElement;
        Assert.Equal("incoming/reviews.tsv", chain.GetProperty("source").GetProperty("blob").GetString());
        Assert.Equal(0.25, chain.GetProperty("prepared").GetProperty("recipe").GetProperty("validationFraction").GetDouble());
        var preparedId = chain.GetProperty("prepared").GetProperty("preparedId").GetString()!;
        var fromPrepared = JsonDocument.Parse((await PipelineAsync("lineage", preparedId, "-o", "json")).Output).RootElement;
        Assert.Equal(run.GetProperty("datasetId").GetString(), fromPrepared.GetProperty("dataset").GetProperty("datasetId").GetString());
        Assert.Equal(3, (await PipelineAsync("lineage", "pp-nothing")).ExitCode);
    }

    [Fact]
    public async Task Exit_codes_tell_what_went_wrong()
    {
        Assert.Equal(3, (await PipelineAsync("status", "run-does-not-exist")).ExitCode);
        Assert.Equal(3, (await PipelineAsync("events", "run-does-not-exist")).ExitCode);
        Assert.Equal(3, (await PipelineAsync("cancel", "run-does-not-exist")).ExitCode);
        Assert.Equal(2, (await PipelineAsync("submit", Path.Combine(_work, "missing.csv"))).ExitCode);

        var badSpec = await PipelineAsync("submit", File("a.jsonl", "{\"text\":\"a\"}\n"), "--spec", File("a.pipeline.json", """{"ingest":{"fromat":"csv"}}"""));
        Assert.Equal(2, badSpec.ExitCode);
        Assert.Contains("fromat", badSpec.Output + badSpec.Error);

        var rejected = await PipelineAsync("submit", File("empty.jsonl", ""), "--wait", "--timeout", "60", "-o", "json");
        Assert.Equal(1, rejected.ExitCode);
        Assert.Equal("EmptyFile", JsonDocument.Parse(rejected.Output).RootElement.GetProperty("errorCode").GetString());

        var poison = await PipelineAsync("poison", "-o", "json");
        Assert.Equal(0, poison.ExitCode);
        Assert.Equal(JsonValueKind.Array, JsonDocument.Parse(poison.Output).RootElement.ValueKind);

        var refused = await PipelineAsync("models", "register", "no-such-folder");
        Assert.Equal(2, refused.ExitCode);
        Assert.Contains("no model.onnx", refused.Output + refused.Error);
        Assert.Equal(JsonValueKind.Array, JsonDocument.Parse((await PipelineAsync("models", "-o", "json")).Output).RootElement.ValueKind);

        var help = await PipelineAsync("--help");
        Assert.Equal(0, help.ExitCode);
        Assert.Contains("submit", help.Output);
    }

    [Fact]
    public async Task Finetune_infer_batches_and_lineage_take_a_dataset_to_traced_predictions()
    {
        var data = File("sentiment.tsv", FineTuning.FineTuneStageTests.Reviews);
        var spec = File("sentiment.pipeline.json", FineTuning.FineTuneStageTests.PrepareSpec);
        var submit = await PipelineAsync("submit", data, "--spec", spec, "--wait", "--timeout", "120", "-o", "json");
        Assert.True(submit.ExitCode == 0, submit.Output + submit.Error);
        var datasetId = JsonDocument.Parse(submit.Output).RootElement.GetProperty("datasetId").GetString()!;

        // Settings that cannot train are refused before anything is sent (exit code 2).
        var bad = await PipelineAsync("finetune", "--dataset", datasetId, "--epochs", "0");
        Assert.Equal(2, bad.ExitCode);
        Assert.Contains("epochs is 0", bad.Output + bad.Error);

        var finetune = await PipelineAsync("finetune", "--dataset", datasetId, "--epochs", "6", "--output-model", "cli-sentiment", "--wait", "--timeout", "150", "-o", "json");
        Assert.True(finetune.ExitCode == 0, finetune.Output + finetune.Error + _host.Output);
        var trained = JsonDocument.Parse(finetune.Output).RootElement;
        Assert.Equal("models/cli-sentiment/", trained.GetProperty("artifacts").GetProperty("model").GetString());
        Assert.True(trained.GetProperty("metrics").GetProperty("validationAccuracy").GetDouble() > 0.6);

        var models = await PipelineAsync("models", "-o", "json");
        var model = JsonDocument.Parse(models.Output).RootElement.EnumerateArray().Single(m => m.GetProperty("modelId").GetString() == "cli-sentiment");
        Assert.Equal(datasetId, model.GetProperty("lineage").GetProperty("datasetId").GetString());

        var input = File("score.jsonl", "{\"custom_id\":\"a\",\"text\":\"Loved it, great food\"}\n{\"custom_id\":\"b\"}\n{\"custom_id\":\"c\",\"text\":\"Terrible service\"}\n");
        var infer = await PipelineAsync("infer", "--model", "cli-sentiment", input, "--wait", "--timeout", "120", "-o", "json");
        Assert.True(infer.ExitCode == 5, infer.Output + infer.Error);
        var scored = JsonDocument.Parse(infer.Output).RootElement;
        Assert.Equal(RunStatus.CompletedWithFailures, scored.GetProperty("status").GetString());
        Assert.Equal(2, scored.GetProperty("counts").GetProperty("inferenceRowsSucceeded").GetInt64());

        var batches = await PipelineAsync("batches", "-o", "json");
        var batch = JsonDocument.Parse(batches.Output).RootElement.EnumerateArray().Single(b => b.GetProperty("modelId").GetString() == "cli-sentiment");
        Assert.Equal("text_missing (1 of 1 failed rows): The row has no text field (fields: custom_id).", batch.GetProperty("topError").GetString());

        var lineage = await PipelineAsync("lineage", batch.GetProperty("batchId").GetString()!, "-o", "json");
        Assert.Equal(0, lineage.ExitCode);
        var chain = JsonDocument.Parse(lineage.Output).RootElement;
        Assert.Equal("models/cli-sentiment/", chain.GetProperty("model").GetProperty("folder").GetString());
        Assert.Equal(datasetId, chain.GetProperty("dataset").GetProperty("datasetId").GetString());
        Assert.EndsWith("sentiment.tsv", chain.GetProperty("source").GetProperty("blob").GetString());
        Assert.True(chain.GetProperty("prepared").GetProperty("recipe").ValueKind == JsonValueKind.Object);

        Assert.Equal(3, (await PipelineAsync("infer", "--model", "cli-sentiment", "incoming/not-there.jsonl")).ExitCode);
        Assert.Equal(2, (await PipelineAsync("infer", "--model", "cli-sentiment")).ExitCode);

        var generated = await PipelineAsync("models", "generate", "cli-embedder", "--hidden", "16", "-o", "json");
        Assert.Equal(0, generated.ExitCode);
        Assert.Equal("embedding", JsonDocument.Parse(generated.Output).RootElement[0].GetProperty("task").GetString());
    }

    [Fact]
    public async Task A_dropped_hugging_face_export_of_a_real_encoder_fine_tunes_and_scores_through_submit()
    {
        // As a user uploads an export: the encoder, its tokenizer and configuration files, no sentence-transformers files.
        var models = new Azure.Storage.Blobs.BlobContainerClient(fixture.ConnectionString, "models");
        await models.CreateIfNotExistsAsync();
        foreach (var name in new[] { "config.json", "tokenizer_config.json", "vocab.txt", "model.onnx" })
        {
            await models.GetBlobClient($"user-minilm/{name}").UploadAsync(new BinaryData(Models.StarterModelTests.Files[name]), overwrite: true);
        }

        var registration = await Eventually.ReturnsAsync(async () =>
        {
            var blob = models.GetBlobClient("user-minilm/_registration.json");
            return await blob.ExistsAsync() && (await blob.DownloadContentAsync()).Value.Content.ToString() is var text && text.Contains("\"registered\"") ? text : null;
        }, TimeSpan.FromSeconds(60), "the dropped folder to be registered", () => _host.Output);
        Assert.Contains("user-minilm", registration);

        var data = File("reviews.tsv", string.Concat(System.IO.File.ReadLines(Path.Combine(RepoPaths.Root, "samples", "reviews.txt")).Where((_, i) => i % 8 == 0).Select(l => l + "\n")));
        var rows = File("rows.jsonl", "{\"custom_id\":\"good\",\"text\":\"The staff were lovely and the pasta was superb.\"}\n{\"custom_id\":\"bad\",\"text\":\"Cold food, rude waiter, never again.\"}\n");
        var spec = File("spec.json", """
            {"ingest":{"format":"tsv","columns":["text","label"],"maxInvalidFraction":0.05},
             "preprocess":{"tokenizer":{"kind":"wordpiece","files":"models/user-minilm/"},"validationFraction":0.2,"seed":42},
             "fineTune":{"baseModel":"user-minilm","outputModelId":"user-minilm-sentiment"}}
            """);
        var submit = await PipelineAsync("submit", data, "--spec", spec, "--score", rows, "--wait", "--timeout", "170", "-o", "json");

        Assert.True(submit.ExitCode == 0, submit.Output + submit.Error + _host.Output);
        var run = JsonDocument.Parse(submit.Output).RootElement;
        Assert.Equal(RunStatus.Succeeded, run.GetProperty("status").GetString());
        Assert.Equal("models/user-minilm-sentiment/", run.GetProperty("artifacts").GetProperty("model").GetString());
        var model = JsonDocument.Parse((await models.GetBlobClient("user-minilm-sentiment/model.json").DownloadContentAsync()).Value.Content.ToString()).RootElement;
        Assert.Equal(("classification", "user-minilm"), (model.GetProperty("task").GetString(), model.GetProperty("lineage").GetProperty("baseModel").GetString()));
        // No sentence-transformers files: the documented default pooling (mean, not normalised).
        Assert.Equal("mean", JsonDocument.Parse((await models.GetBlobClient("user-minilm/model.json").DownloadContentAsync()).Value.Content.ToString()).RootElement.GetProperty("pooling").GetString());

        var results = run.GetProperty("artifacts").GetProperty("results").GetString()!;
        var outputs = new Azure.Storage.Blobs.BlobContainerClient(fixture.ConnectionString, results[..results.IndexOf('/')]);
        var scored = (await outputs.GetBlobClient(results[(results.IndexOf('/') + 1)..]).DownloadContentAsync()).Value.Content.ToString()
            .Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement).ToDictionary(r => r.GetProperty("custom_id").GetString()!);
        Assert.Equal(2, scored.Count);
        Assert.Equal("1", scored["good"].GetProperty("label").GetString());
        Assert.Equal("0", scored["bad"].GetProperty("label").GetString());
    }
}
