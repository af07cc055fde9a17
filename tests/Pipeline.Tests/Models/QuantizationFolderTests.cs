using System.Text;
using System.Text.Json;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;
using Pipeline.FineTuning;
using Pipeline.FineTuning.Trainer;
using Pipeline.Inference;
using Pipeline.Models;
using Pipeline.Models.Quantization;
using Pipeline.Preprocessing;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Cli;
using Pipeline.Tests.FineTuning;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Models;

/// <summary>
/// Quantized model folders on Azurite: <c>fineTune.quantize</c> writes one beside the trained model, measured on the
/// validation split; the inference stage scores it unchanged; <c>pipeline models quantize</c> and <c>pipeline models</c>
/// speak it; the real all-MiniLM-L6-v2 encoder keeps its sentence embeddings; and what cannot be quantized is refused.
/// </summary>
public sealed class QuantizationFolderTests(Azurite azurite) : IClassFixture<Azurite>
{
    private static ModelManifest Manifest(TestPipeline pipeline, string modelId) =>
        BlobJson.ReadAsync(pipeline.Storage.Container(StorageNames.Containers.Models).GetBlobClient($"{modelId}/{ModelManifest.FileName}"), ModelJson.Default.ModelManifest, CancellationToken.None).GetAwaiter().GetResult()!;

    [Fact]
    public async Task Fine_tune_with_quantize_writes_a_measured_int8_folder_that_the_stage_scores_and_the_cli_shows()
    {
        using var pipeline = new TestPipeline(azurite);
        var (datasetId, preparedId, prepared) = await FineTuneStageTests.PrepareAsync(pipeline, "ft-quantize.tsv");
        var handler = pipeline.Services.GetRequiredService<FineTuneHandler>();
        var trainer = new JobTrainer(pipeline.Storage, Options.Create(new InferenceSettings()), Microsoft.Extensions.Logging.Abstractions.NullLogger<JobTrainer>.Instance);
        var spec = RunSpec.Parse(Encoding.UTF8.GetBytes("""{"fineTune":{"epochs":4,"outputModelId":"ftq","quantize":true}}"""), "test");
        var job = await handler.PlanAsync(new FineTuneRequest(datasetId, preparedId, prepared, spec), "run-ftq", CancellationToken.None);
        Assert.Equal("ftq-int8", job.QuantizedModelId);
        Assert.Equal(0, await trainer.RunAsync(job.JobId, CancellationToken.None));
        var status = (await BlobJson.ReadAsync(new JobFiles(pipeline.Storage, job.JobId).Status, FineTuneJson.Default.JobStatus, CancellationToken.None))!;
        Assert.Equal(JobStates.Succeeded, status.State);

        var source = Manifest(pipeline, "ftq");
        var int8 = Manifest(pipeline, "ftq-int8");
        var q = int8.Quantization!;
        Assert.Null(source.Quantization);
        Assert.Equal((Int8Quantizer.Scheme, "ftq", source.CreatedAt, prepared), (q.Scheme, q.SourceModel, q.SourceCreatedAt, q.Agreement.PreparedManifest));
        // The bag-of-embeddings base has no weight matrix; the head's Gemm is the one node quantized.
        Assert.Equal([EncoderHead.Prefix + "Gemm"], q.QuantizedNodes.Select(n => n[..n.LastIndexOf('_')]));
        Assert.Equal(status.Metrics["validationExamples"], q.Agreement.Rows);
        Assert.Equal(status.Metrics["validationAccuracy"], q.Agreement.SourceAccuracy!.Value, 3);
        Assert.InRange(q.Agreement.AccuracyPoints!.Value, -2, 2);
        Assert.InRange(q.Agreement.LabelChangedFraction!.Value, 0, 0.05);
        Assert.True(q.Agreement.MeanCosine > 0.999, $"cosine {q.Agreement.MeanCosine}");
        Assert.Equal((source.Task, source.Output, source.Lineage.PreparedId), (int8.Task, int8.Output, int8.Lineage.PreparedId));
        Assert.Equal(source.Labels, int8.Labels);
        Assert.Equal("models/ftq-int8/", int8.Tokenizer.Files ?? "models/ftq-int8/");
        Assert.Equal(q.Agreement.AccuracyPoints, status.Metrics["int8AccuracyPoints"]);

        // The inference stage runs the int8 folder as any model folder.
        var texts = File.ReadLines(RepoPaths.RequireSharedData("sentiment/amazon_cells_labelled.txt")).Select(l => l.Split('\t')[0]).Take(60).ToList();
        await pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient("ftq-input.jsonl").UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(Pipeline.Tests.Inference.InferenceStageTests.Jsonl(texts))), overwrite: true);
        var runId = await Pipeline.Tests.Inference.InferenceStageTests.SendInferAsync(pipeline, "ftq-int8", "incoming/ftq-input.jsonl");
        Assert.Equal(0, await Pipeline.Tests.Inference.InferenceStageTests.DeliverShardsAsync(pipeline));
        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Succeeded, run.Status);
        var manifest = await Pipeline.Tests.Inference.InferenceStageTests.ManifestAsync(pipeline, run);
        Assert.Equal((60L, 60L, "ftq-int8"), (manifest.Rows, manifest.Succeeded, manifest.ModelId));

        // The CLI: quantize the fp32 model again under another id, refuse the int8 one, list both.
        var cli = await CliTests.RunAsync(azurite.ConnectionString, "models", "quantize", "ftq", "--output-model", "ftq-cli", "-o", "json");
        Assert.True(cli.ExitCode == 0, cli.Output + cli.Error);
        var written = JsonDocument.Parse(cli.Output).RootElement[0];
        Assert.Equal("ftq-cli", written.GetProperty("modelId").GetString());
        Assert.Equal(q.Agreement.Rows, written.GetProperty("quantization").GetProperty("agreement").GetProperty("rows").GetInt32());
        var again = await CliTests.RunAsync(azurite.ConnectionString, "models", "quantize", "ftq-int8");
        Assert.Equal(2, again.ExitCode);
        Assert.Contains("already an int8 copy of 'ftq'", again.Output.ReplaceLineEndings(" "));
        var list = JsonDocument.Parse((await CliTests.RunAsync(azurite.ConnectionString, "models", "-o", "json")).Output).RootElement.EnumerateArray().ToList();
        Assert.Equal("ftq", list.Single(m => m.GetProperty("modelId").GetString() == "ftq-int8").GetProperty("quantization").GetProperty("sourceModel").GetString());
        Assert.False(list.Single(m => m.GetProperty("modelId").GetString() == "ftq").TryGetProperty("quantization", out _));
    }

    [Fact]
    public async Task The_real_minilm_encoder_quantized_keeps_its_sentence_embeddings_and_refusals_say_what_to_do()
    {
        using var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        var starter = await new ModelRegistry(pipeline.Storage).AddStarterAsync(StarterModelTests.PackagePath, CancellationToken.None);
        var spec = """{"ingest":{"format":"tsv","columns":["text","label"]},"preprocess":{"tokenizer":{"kind":"wordpiece","files":"models/""" + StarterModel.ModelId + """/"},"validationFraction":0.2,"seed":42}}""";
        var data = string.Concat(File.ReadLines(RepoPaths.RequireSharedData("sentiment/yelp_labelled.txt")).Where((l, i) => l.Contains('\t') && i % 4 == 0).Select(l => l + "\n"));
        var ingested = await pipeline.IngestAsync("minilm-quantize.tsv", data, spec);
        await pipeline.Preprocess.HandleAsync(new Pipeline.Messaging.PreprocessRequest(ingested.DatasetId!, "", RunSpec.Parse(Encoding.UTF8.GetBytes(spec), "test")), "prep-minilm-q", 1, CancellationToken.None);
        var prepared = (await pipeline.Runs.GetAsync("prep-minilm-q"))!.GetArtifacts()["preparedManifest"];
        var quantizer = new ModelQuantizer(pipeline.Storage, new InferenceSettings());

        // The starter was not trained here: it has no validation split of its own until one is named.
        var none = await Assert.ThrowsAsync<QuantizationRejectedException>(() => quantizer.QuantizeAsync(StarterModel.ModelId, null, null, null, CancellationToken.None));
        Assert.Equal(QuantizationErrorCodes.NoValidationData, none.Code);
        Assert.Contains("--validation datasets/", none.Message);

        var int8 = await quantizer.QuantizeAsync(StarterModel.ModelId, null, prepared, null, CancellationToken.None);
        var q = int8.Quantization!;
        Assert.Equal(("all-minilm-l6-v2-int8", ModelTasks.Embedding, starter.Output, "mean+normalize"), (int8.ModelId, int8.Task, int8.Output, int8.SentencePooling.ToString()));
        // 6 layers x (query, key, value, attention output, intermediate, output), and the pooler's dense layer.
        Assert.Equal(37, q.QuantizedNodes.Count);
        Assert.Equal(12, q.FloatMatMuls.Count);
        Assert.True(q.Agreement.MeanCosine >= 0.99, $"mean cosine {q.Agreement.MeanCosine} (min {q.Agreement.MinCosine}) on {q.Agreement.Rows} rows");
        Assert.InRange(q.Agreement.Rows, 30, 70);
        Assert.Null(q.Agreement.QuantizedAccuracy);
        // The weight matrices shrink 4x; the 47 MB embedding table stays fp32.
        Assert.InRange((double)q.QuantizedBytes / q.SourceBytes, 0.6, 0.7);
        var sessions = pipeline.Services.GetRequiredService<ModelSessions>();
        Assert.Equal("all-minilm-l6-v2-int8", (await sessions.GetAsync(int8.ModelId, CancellationToken.None)).Manifest.ModelId);

        var twice = await Assert.ThrowsAsync<QuantizationRejectedException>(() => quantizer.QuantizeAsync(int8.ModelId, "again", prepared, null, CancellationToken.None));
        Assert.Equal(QuantizationErrorCodes.AlreadyQuantized, twice.Code);
        // The copy never replaces its source.
        var over = await Assert.ThrowsAsync<QuantizationRejectedException>(() => quantizer.QuantizeAsync(StarterModel.ModelId, StarterModel.ModelId, prepared, null, CancellationToken.None));
        Assert.Equal(QuantizationErrorCodes.OutputTaken, over.Code);
        var missing = await Assert.ThrowsAsync<QuantizationRejectedException>(() => quantizer.QuantizeAsync("no-such-model", null, prepared, null, CancellationToken.None));
        Assert.Equal(QuantizationErrorCodes.ModelNotFound, missing.Code);

        // Data tokenized for another model gives it meaningless ids.
        var (_, _, tiktoken) = await FineTuneStageTests.PrepareAsync(pipeline, "minilm-quantize-cl100k.tsv");
        var mismatch = await Assert.ThrowsAsync<QuantizationRejectedException>(() => quantizer.QuantizeAsync(StarterModel.ModelId, "wrong-data", tiktoken, null, CancellationToken.None));
        Assert.Equal(QuantizationErrorCodes.TokenizerMismatch, mismatch.Code);

        var embedder = await Pipeline.Tests.Inference.InferenceStageTests.EmbedderAsync(pipeline.Storage, "bag-embedder");
        var noWeights = await Assert.ThrowsAsync<QuantizationRejectedException>(() => quantizer.QuantizeAsync(embedder.ModelId, null, prepared, null, CancellationToken.None));
        Assert.Equal(QuantizationErrorCodes.NoWeights, noWeights.Code);
    }
}
