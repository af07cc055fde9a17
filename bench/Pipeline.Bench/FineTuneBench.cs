using System.Diagnostics;
using System.Text;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Hosting;
using Pipeline.Ingestion;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Testing;

namespace Pipeline.Bench;

/// <summary>
/// The built-in trainer on ../shared/data/sentiment (yelp + amazon, stratified 80/20 split, cl100k_base): validation
/// accuracy against the majority-class baseline, and training examples per second, for the generated
/// bag-of-embeddings base (head + embeddings trained).
/// </summary>
public static class FineTuneBench
{
    public static async Task RunAsync(string? fineTuneJson)
    {
        using var azurite = new AzuriteServer();
        await azurite.StartAsync();
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?> { [StorageClients.ConnectionSetting] = azurite.ConnectionString }).Build();
        using var services = new ServiceCollection().AddLogging().AddPipelineStorage(configuration).AddPipelineRuns().AddIngestion(configuration)
            .AddPreprocessing(configuration).AddInference(configuration).AddFineTuning(configuration).AddSingleton<JobTrainer>().BuildServiceProvider();
        var storage = services.GetRequiredService<StorageClients>();
        await storage.EnsureCreatedAsync();

        var shared = Path.GetFullPath(Path.Combine(AzuriteServer.RepoRoot, "..", "shared", "data", "sentiment"));
        var data = string.Concat(new[] { "yelp_labelled.txt", "amazon_cells_labelled.txt" }.SelectMany(f => File.ReadLines(Path.Combine(shared, f))).Where(l => l.Contains('\t')).Select(l => l + "\n"));
        var spec = "{\"ingest\":{\"format\":\"tsv\",\"columns\":[\"text\",\"label\"]},\"preprocess\":{\"tokenizer\":{\"kind\":\"tiktoken\",\"encoding\":\"cl100k_base\"},\"validationFraction\":0.2,\"seed\":42},\"fineTune\":"
            + (fineTuneJson ?? "{}") + "}";
        var blob = storage.Container(StorageNames.Containers.Incoming).GetBlobClient("bench-sentiment.tsv");
        await storage.Container(StorageNames.Containers.Incoming).GetBlobClient("bench-sentiment.pipeline.json").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(spec)), overwrite: true);
        var etag = (await blob.UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(data)), overwrite: true)).Value.ETag.ToString().Trim('"');
        await services.GetRequiredService<IngestHandler>().IngestAsync(new IngestRequest(StorageNames.Containers.Incoming, blob.Name, etag, "bench-ft", null), 1, CancellationToken.None);
        var ingested = (await services.GetRequiredService<RunStore>().GetAsync("bench-ft"))!;
        var runSpec = RunSpec.Parse(Encoding.UTF8.GetBytes(spec), "bench");
        await services.GetRequiredService<PreprocessHandler>().HandleAsync(new Pipeline.Messaging.PreprocessRequest(ingested.DatasetId!, "", runSpec with { FineTune = null }), "bench-ft-pre", 1, CancellationToken.None);
        var prepared = (await services.GetRequiredService<RunStore>().GetAsync("bench-ft-pre"))!.GetArtifacts()["preparedManifest"];
        var preparedId = prepared.Split('/')[3];

        var job = await services.GetRequiredService<FineTuneHandler>().PlanAsync(new FineTuneRequest(ingested.DatasetId!, preparedId, prepared, runSpec), "bench-ft-run", CancellationToken.None);
        var clock = Stopwatch.StartNew();
        var exit = await services.GetRequiredService<JobTrainer>().RunAsync(job.JobId, CancellationToken.None);
        var seconds = clock.Elapsed.TotalSeconds;
        var status = (await BlobJson.ReadAsync(new JobFiles(storage, job.JobId).Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
        if (exit != 0 || status.State != JobStates.Succeeded)
        {
            throw new InvalidOperationException($"The trainer ended {status.State}: {status.Error}");
        }

        var m = status.Metrics;
        var h = job.Hyperparameters;
        Console.WriteLine($"Fine-tune benchmark: yelp + amazon ({m["trainExamples"]:N0} train / {m["validationExamples"]:N0} validation examples after dedup, stratified 80/20, seed 42), cl100k_base,");
        Console.WriteLine($"base {job.BaseModel}, trainable {h.Trainable}, {h.Epochs} epochs max (early stopping patience {h.EarlyStoppingPatience}), batch {h.BatchSize}, lr {h.LearningRate}, weight decay {h.WeightDecay}, seed {h.Seed}.");
        Console.WriteLine();
        Console.WriteLine("| Metric | Value |");
        Console.WriteLine("| --- | --- |");
        Console.WriteLine($"| validation accuracy (best epoch {m["bestEpoch"]}) | {m["validationAccuracy"]:P1} |");
        Console.WriteLine($"| majority-class baseline | {m["majorityBaselineAccuracy"]:P1} |");
        Console.WriteLine($"| points over the baseline (bar: 20) | {m["accuracyPointsOverBaseline"]:N1} |");
        Console.WriteLine($"| validation macro-F1 | {m["validationMacroF1"]:N3} |");
        Console.WriteLine($"| training examples per second (mean over {m["epochsRun"]} epochs, one thread) | {m["trainExamplesPerSecond"]:N0} |");
        Console.WriteLine($"| whole job: read shards + train + export + register | {seconds:N1} s |");
    }
}
