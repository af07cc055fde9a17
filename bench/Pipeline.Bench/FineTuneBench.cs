using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Hosting;
using Pipeline.Ingestion;
using Pipeline.Models;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Testing;

namespace Pipeline.Bench;

/// <summary>
/// The built-in trainer on ../shared/data/sentiment (yelp + amazon, stratified 80/20 split, seed 42): validation
/// accuracy against the majority-class baseline, feature extraction rows per second and training examples per
/// second. <c>finetune</c>: the real encoder (the starter base, all-MiniLM-L6-v2, frozen, WordPiece), then a
/// second job on the same data with another learning rate, which must read the cached features.
/// <c>finetune generated</c>: the generated bag-of-embeddings base (head + embeddings trained, cl100k_base).
/// </summary>
public static class FineTuneBench
{
    public static async Task RunAsync(string? fineTuneJson, bool generated)
    {
        using var azurite = new AzuriteServer();
        await azurite.StartAsync();
        using var services = await ServicesAsync(azurite);
        var storage = services.GetRequiredService<StorageClients>();
        var fineTune = fineTuneJson is { Length: > 0 } ? JsonNode.Parse(fineTuneJson)!.AsObject() : [];
        if (!generated)
        {
            fineTune["baseModel"] ??= StarterModel.ModelId;
        }

        var (ingested, preparedId, prepared, runSpec) = await PrepareSentimentAsync(services, storage, fineTune, generated);
        var (job, m, seconds) = await TrainAsync(services, storage, new FineTuneRequest(ingested, preparedId, prepared, runSpec), "bench-ft-run");
        var h = job.Hyperparameters;
        Console.WriteLine($"Fine-tune benchmark: yelp + amazon ({m["trainExamples"]:N0} train / {m["validationExamples"]:N0} validation examples after dedup, stratified 80/20, seed 42), {(generated ? "cl100k_base" : "WordPiece (the model's vocab.txt)")},");
        Console.WriteLine($"base {job.BaseModel}, trainable {h.Trainable}, pooling {h.Pooling}, {h.Epochs} epochs max (early stopping patience {h.EarlyStoppingPatience}), batch {h.BatchSize}, lr {h.LearningRate}, weight decay {h.WeightDecay}, seed {h.Seed}, {Environment.ProcessorCount} cores.");
        Console.WriteLine();
        Console.WriteLine("| Metric | Value |");
        Console.WriteLine("| --- | --- |");
        Console.WriteLine($"| validation accuracy (best epoch {m["bestEpoch"]}) | {m["validationAccuracy"]:P1} |");
        Console.WriteLine($"| majority-class baseline | {m["majorityBaselineAccuracy"]:P1} |");
        Console.WriteLine($"| points over the baseline | {m["accuracyPointsOverBaseline"]:N1} |");
        Console.WriteLine($"| validation macro-F1 | {m["validationMacroF1"]:N3} |");
        if (m.TryGetValue("featureRowsPerSecond", out var featureRate))
        {
            Console.WriteLine($"| feature extraction (frozen encoder, sorted batches), rows per second | {featureRate:N0} ({m["featureSeconds"]:N1} s) |");
            Console.WriteLine($"| merged classifier vs trainer, largest probability difference ({JobTrainer.MergeCheckRows} rows) | {m["mergedMaxProbabilityDifference"]:G2} |");
        }

        Console.WriteLine($"| training examples per second (mean over {m["epochsRun"]} epochs, one thread) | {m["trainExamplesPerSecond"]:N0} |");
        Console.WriteLine($"| whole job: read shards + features + train + export + register | {seconds:N1} s |");
        if (!generated)
        {
            // Same data, other hyperparameters: a new job that must read the features the first one cached.
            var other = runSpec with
            {
                FineTune = JsonDocument.Parse(new JsonObject(fineTune.Select(p => KeyValuePair.Create(p.Key, p.Value?.DeepClone())))
                {
                    ["learningRate"] = h.LearningRate * 2,
                    ["outputModelId"] = "bench-second",
                }.ToJsonString()).RootElement.Clone()
            };
            var (_, second, secondSeconds) = await TrainAsync(services, storage, new FineTuneRequest(ingested, preparedId, prepared, other), "bench-ft-second");
            Console.WriteLine($"| second job (learning rate {h.LearningRate * 2}): feature cache hit | {(second["featureCacheHit"] == 1 ? "yes" : "no")}, features read in {second["featureSeconds"]:N2} s, whole job {secondSeconds:N1} s, accuracy {second["validationAccuracy"]:P1} |");
            await ProbeAsync(services, storage, job);
        }
    }

    /// <summary>The linear-probe ceiling on the same split and the same cached features (<see cref="LinearProbe"/>).</summary>
    private static async Task ProbeAsync(ServiceProvider services, StorageClients storage, JobSpec job)
    {
        var trainer = services.GetRequiredService<JobTrainer>();
        var prepared = (await BlobJson.ReadAsync(storage.BlobAt(job.PreparedManifest)!, PreprocessJson.Default.PreparedManifest, CancellationToken.None))!;
        var train = await trainer.ReadSplitAsync(prepared, "train", job.Labels.Count, CancellationToken.None);
        var validation = await trainer.ReadSplitAsync(prepared, "validation", job.Labels.Count, CancellationToken.None);
        var models = storage.Container(StorageNames.Containers.Models);
        var baseManifest = (await BlobJson.ReadAsync(models.GetBlobClient($"{job.BaseModel}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, CancellationToken.None))!;
        var baseModel = Pipeline.Models.Onnx.Proto.ModelProto.Parser.ParseFrom((await models.GetBlobClient($"{job.BaseModel}/{baseManifest.OnnxPath}").DownloadContentAsync()).Value.Content.ToArray());
        var pooling = Pooling.TryParse(job.Hyperparameters.Pooling) ?? baseManifest.SentencePooling;
        var features = await new FrozenFeatures(storage, services.GetRequiredService<Microsoft.Extensions.Options.IOptions<Pipeline.Inference.InferenceSettings>>().Value)
            .GetAsync(job, baseManifest, baseModel, pooling, train.Tokens!, validation.Tokens!, CancellationToken.None);
        if (job.Labels.Count != 2)
        {
            return;
        }

        var sweep = LinearProbe.Sweep(features.Train, train.Labels, features.Validation, validation.Labels).ToList();
        var (penalty, accuracy) = sweep.MaxBy(s => s.Accuracy);
        Console.WriteLine($"| reference: exact L2 logistic regression on the same {pooling} features (Newton to convergence), best of penalties {string.Join(", ", LinearProbe.Penalties)} | {accuracy:P1} (penalty {penalty}; {string.Join(", ", sweep.Select(s => $"{s.Accuracy:P1}"))}) |");
    }

    /// <summary>The services the app composes for the stages and the trainer, on the given Azurite.</summary>
    internal static async Task<ServiceProvider> ServicesAsync(AzuriteServer azurite, IDictionary<string, string?>? settings = null)
    {
        var services = BenchServices.Create(azurite, settings, more: s => s.AddSingleton<JobTrainer>());
        await services.GetRequiredService<StorageClients>().EnsureCreatedAsync();
        return services;
    }

    /// <summary>
    /// Ingests and preprocesses yelp + amazon (stratified 80/20, seed 42) with the base's tokenizer: the starter's WordPiece
    /// (registered first) or, for the generated base, cl100k_base. Returns the dataset, the prepared dataset and the run spec.
    /// </summary>
    internal static async Task<(string DatasetId, string PreparedId, string PreparedManifest, RunSpec Spec)> PrepareSentimentAsync(ServiceProvider services, StorageClients storage, JsonObject fineTune, bool generated)
    {
        string tokenizer;
        if (generated)
        {
            tokenizer = """{"kind":"tiktoken","encoding":"cl100k_base"}""";
        }
        else
        {
            var clock = Stopwatch.StartNew();
            await new ModelRegistry(storage).AddStarterAsync(StarterModel.LocatePackage(null, typeof(FineTuneBench).Assembly), CancellationToken.None);
            Console.WriteLine($"Starter base {StarterModel.ModelId} laid out and registered in {clock.Elapsed.TotalSeconds:N1} s ({StarterModel.Citation}).");
            tokenizer = $$"""{"kind":"wordpiece","files":"models/{{StarterModel.ModelId}}/"}""";
        }

        var shared = Path.GetFullPath(Path.Combine(AzuriteServer.RepoRoot, "..", "shared", "data", "sentiment"));
        var data = string.Concat(new[] { "yelp_labelled.txt", "amazon_cells_labelled.txt" }.SelectMany(f => File.ReadLines(Path.Combine(shared, f))).Where(l => l.Contains('\t')).Select(l => l + "\n"));
        var spec = "{\"ingest\":{\"format\":\"tsv\",\"columns\":[\"text\",\"label\"]},\"preprocess\":{\"tokenizer\":" + tokenizer + ",\"validationFraction\":0.2,\"seed\":42},\"fineTune\":"
            + fineTune.ToJsonString() + "}";
        var blob = storage.Container(StorageNames.Containers.Incoming).GetBlobClient("bench-sentiment.tsv");
        await storage.Container(StorageNames.Containers.Incoming).GetBlobClient("bench-sentiment.pipeline.json").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(spec)), overwrite: true);
        var etag = (await blob.UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(data)), overwrite: true)).Value.ETag.ToString().Trim('"');
        await services.GetRequiredService<IngestHandler>().IngestAsync(new IngestRequest(StorageNames.Containers.Incoming, blob.Name, etag, "bench-ft", null), 1, CancellationToken.None);
        var ingested = (await services.GetRequiredService<RunStore>().GetAsync("bench-ft"))!;
        var runSpec = RunSpec.Parse(Encoding.UTF8.GetBytes(spec), "bench");
        await services.GetRequiredService<PreprocessHandler>().HandleAsync(new Pipeline.Messaging.PreprocessRequest(ingested.DatasetId!, "", runSpec with { FineTune = null }), "bench-ft-pre", 1, CancellationToken.None);
        var prepared = (await services.GetRequiredService<RunStore>().GetAsync("bench-ft-pre"))!.GetArtifacts()["preparedManifest"];
        return (ingested.DatasetId!, prepared.Split('/')[3], prepared, runSpec);
    }

    internal static async Task<(JobSpec Job, Dictionary<string, double> Metrics, double Seconds)> TrainAsync(ServiceProvider services, StorageClients storage, FineTuneRequest request, string runId)
    {
        var job = await services.GetRequiredService<FineTuneHandler>().PlanAsync(request, runId, CancellationToken.None);
        var clock = Stopwatch.StartNew();
        var exit = await services.GetRequiredService<JobTrainer>().RunAsync(job.JobId, CancellationToken.None);
        var seconds = clock.Elapsed.TotalSeconds;
        var status = (await BlobJson.ReadAsync(new JobFiles(storage, job.JobId).Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
        return exit != 0 || status.State != JobStates.Succeeded
            ? throw new InvalidOperationException($"The trainer ended {status.State}: {status.Error}")
            : (job, status.Metrics, seconds);
    }
}
