using System.Text;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Ingestion;

/// <summary>The ingestion stage against real Azurite: datasets, runs, events, quarantine and idempotency.</summary>
public sealed class IngestHandlerTests(Azurite azurite) : IClassFixture<Azurite>
{
    private TestPipeline Pipeline(Action<IngestionOptions>? configure = null) => new(azurite, configure);

    private static string Unique(string name) => $"{Guid.NewGuid():n}"[..8] + "-" + name;

    [Fact]
    public async Task Dropped_jsonl_becomes_a_dataset_with_manifest_written_last()
    {
        using var pipeline = Pipeline();
        var run = await pipeline.IngestAsync(Unique("reviews.jsonl"), "{\"text\":\"good\",\"label\":1}\n{\"text\":\"bad\",\"label\":0}\n{\"text\":\"\",\"label\":0}\n",
            spec: "{\"schemaVersion\":1,\"ingest\":{\"maxInvalidFraction\":0.5}}");

        Assert.Equal(RunStatus.Running, run.Status);
        Assert.Equal(RunStatus.Succeeded, run.GetStages()[Stages.Ingest]);
        Assert.Equal(RunStatus.Queued, run.GetStages()[Stages.Preprocess]);
        var manifest = await pipeline.ManifestAsync(run.DatasetId!);
        Assert.NotNull(manifest);
        Assert.Equal(DataFormats.Jsonl, manifest.Format);
        Assert.Equal("number", manifest.LabelType);
        Assert.Equal(3, manifest.Counts.Read);
        Assert.Equal(2, manifest.Counts.Valid);
        Assert.Equal(1, manifest.Counts.Invalid);
        Assert.Equal(run.SourceETag, manifest.SourceETag);
        Assert.Equal(64, manifest.Sha256.Length);
        var records = await pipeline.ReadJsonLinesAsync(StorageNames.Containers.Datasets, manifest.Records);
        Assert.Equal(["good", "bad"], records.Select(r => r.GetProperty("text").GetString()));
        var errors = await pipeline.ReadJsonLinesAsync(StorageNames.Containers.Datasets, manifest.Errors);
        Assert.Equal(3, Assert.Single(errors).GetProperty("line").GetInt64());
        Assert.Empty(await pipeline.ListAsync(StorageNames.Containers.Datasets, $"{IngestHandler.StagingPrefix}/{run.RunId}/"));

        // Preprocessing is handed the dataset by reference.
        var message = (await pipeline.Storage.Queue(StorageNames.Queues.Preprocess).PeekMessagesAsync(32)).Value
            .Select(m => m.Body.ToString()).Single(m => m.Contains(run.RunId));
        Assert.Contains(run.DatasetId!, message);
        Assert.Contains("\"type\":\"preprocess\"", message);
    }

    [Fact]
    public async Task The_labelled_sentences_tsv_counts_every_line()
    {
        var path = RepoPaths.RequireSharedData("sentiment/yelp_labelled.txt");
        var lines = File.ReadAllLines(path).Length;
        using var pipeline = Pipeline();
        var run = await pipeline.IngestAsync(Unique("yelp_labelled.txt"), File.ReadAllText(path));

        var manifest = (await pipeline.ManifestAsync(run.DatasetId!))!;
        Assert.Equal(DataFormats.Tsv, manifest.Format);
        Assert.Equal(["text", "label"], manifest.Columns!);
        Assert.Equal(lines, manifest.Counts.Lines);
        Assert.Equal(lines, manifest.Counts.Valid + manifest.Counts.Invalid + manifest.Counts.BlankLines);
        Assert.True(manifest.Counts.Valid >= 999);
        Assert.Equal(manifest.Counts.Valid, manifest.LabelCounts!.Values.Sum());
    }

    [Fact]
    public async Task Redelivered_event_does_not_duplicate_the_dataset_or_the_work()
    {
        using var pipeline = Pipeline();
        var name = Unique("twice.jsonl");
        var message = await pipeline.DropAsync(name, "{\"text\":\"once\"}\n");
        await pipeline.BlobDrops.HandleAsync(message, 1, CancellationToken.None);
        var runId = FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, message);
        var first = (await pipeline.Runs.GetAsync(runId))!;

        await pipeline.BlobDrops.HandleAsync(message, 2, CancellationToken.None);

        var second = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(first.ETag, second.ETag);
        Assert.Equal(1, second.Attempt);
        var datasets = (await pipeline.ListAsync(StorageNames.Containers.Datasets, first.DatasetId)).Where(n => n.EndsWith("manifest.json")).ToList();
        Assert.Single(datasets);
    }

    [Fact]
    public async Task The_same_content_under_two_names_is_one_dataset()
    {
        using var pipeline = Pipeline();
        var content = "{\"text\":\"shared content " + Guid.NewGuid() + "\"}\n";
        var first = await pipeline.IngestAsync(Unique("a.jsonl"), content);
        var second = await pipeline.IngestAsync(Unique("b.jsonl"), content);

        Assert.NotEqual(first.RunId, second.RunId);
        Assert.Equal(first.DatasetId, second.DatasetId);
        var manifest = (await pipeline.ManifestAsync(first.DatasetId!))!;
        Assert.Equal(first.RunId, manifest.RunId);
        Assert.Equal(RunStatus.Succeeded, second.GetStages()[Stages.Ingest]);
    }

    [Fact]
    public async Task A_file_over_the_invalid_tolerance_is_quarantined_with_a_report_and_the_source_is_untouched()
    {
        using var pipeline = Pipeline();
        var name = Unique("broken.jsonl");
        var content = "{\"text\":\"ok\"}\n{\"text\":\n{\"text\":5}\n";
        var message = await pipeline.DropAsync(name, content);
        var source = pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name);
        var etagBefore = (await source.GetPropertiesAsync()).Value.ETag;

        await pipeline.BlobDrops.HandleAsync(message, 1, CancellationToken.None);

        var run = (await pipeline.Runs.GetAsync(FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, message)))!;
        Assert.Equal(RunStatus.Failed, run.Status);
        Assert.Equal(RejectionCodes.TooManyInvalidRecords, run.ErrorCode);
        Assert.Contains("2 of 3 records", run.Error);
        Assert.Contains("line 2", run.Error);
        Assert.Null(run.DatasetId);
        Assert.Equal(etagBefore, (await source.GetPropertiesAsync()).Value.ETag);
        Assert.Equal(content, (await source.DownloadContentAsync()).Value.Content.ToString());

        var quarantined = await pipeline.ListAsync(StorageNames.Containers.Quarantine, run.RunId + "/");
        Assert.Contains($"{run.RunId}/{name}", quarantined);
        Assert.Contains($"{run.RunId}/report.json", quarantined);
        Assert.Contains($"{run.RunId}/errors.jsonl", quarantined);
        Assert.Equal($"{StorageNames.Containers.Quarantine}/{run.RunId}/report.json", run.ReportPath);
        var report = await pipeline.ReadAsync(StorageNames.Containers.Quarantine, $"{run.RunId}/report.json");
        Assert.Contains(RecordErrorCodes.MalformedJson, report);
        Assert.Contains(RecordErrorCodes.WrongType, report);
        Assert.Empty(await pipeline.ListAsync(StorageNames.Containers.Datasets, $"{IngestHandler.StagingPrefix}/{run.RunId}/"));

        var events = await pipeline.EventsAsync();
        Assert.Contains(events, e => e.GetProperty("type").GetString() == RunEvents.Types.RunFailed && e.GetProperty("subject").GetString() == $"runs/{run.RunId}");
    }

    [Theory]
    [InlineData("empty.jsonl", "", RejectionCodes.EmptyFile)]
    [InlineData("utf16.txt", "\uFEFFhello\tworld\n", RejectionCodes.Utf16File)]
    [InlineData("image.csv", "\u0089PNG\u0000\u0000binary", RejectionCodes.BinaryFile)]
    public async Task Unusable_files_fail_the_run_with_a_clear_code(string name, string content, string code)
    {
        using var pipeline = Pipeline();
        var bytes = code == RejectionCodes.Utf16File ? Encoding.Unicode.GetPreamble().Concat(Encoding.Unicode.GetBytes(content[1..])).ToArray()
            : code == RejectionCodes.BinaryFile ? content.Select(c => (byte)c).ToArray()
            : Encoding.UTF8.GetBytes(content);
        var message = await pipeline.DropAsync(Unique(name), bytes);
        await pipeline.BlobDrops.HandleAsync(message, 1, CancellationToken.None);

        var run = (await pipeline.Runs.GetAsync(FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, message)))!;
        Assert.Equal(RunStatus.Failed, run.Status);
        Assert.Equal(code, run.ErrorCode);
        Assert.False(string.IsNullOrWhiteSpace(run.Error));
    }

    [Fact]
    public async Task An_oversized_file_is_rejected_before_it_is_read()
    {
        using var pipeline = Pipeline(o => o.MaxFileBytes = 100);
        var run = await pipeline.IngestAsync(Unique("big.jsonl"), string.Concat(Enumerable.Repeat("{\"text\":\"0123456789\"}\n", 10)));
        Assert.Equal(RejectionCodes.FileTooLarge, run.ErrorCode);
        Assert.Contains("MaxFileBytes", run.Error);
    }

    [Fact]
    public async Task An_invalid_run_spec_fails_the_run_and_names_the_field()
    {
        using var pipeline = Pipeline();
        var run = await pipeline.IngestAsync(Unique("specced.jsonl"), "{\"text\":\"a\"}\n", spec: "{\"schemaVersion\":1,\"ingest\":{\"fromat\":\"csv\"}}");
        Assert.Equal(RejectionCodes.InvalidRunSpec, run.ErrorCode);
        Assert.Contains("fromat", run.Error);
    }

    [Fact]
    public async Task A_run_spec_beside_the_data_fixes_the_format()
    {
        using var pipeline = Pipeline();
        var run = await pipeline.IngestAsync(Unique("export.dat"), "label|text\n", spec: "{\"ingest\":{\"format\":\"text\"}}");
        Assert.True(run.DatasetId is not null, run.Error);
        var manifest = (await pipeline.ManifestAsync(run.DatasetId!))!;
        Assert.Equal(DataFormats.Text, manifest.Format);
        Assert.Equal("run spec", manifest.FormatReason);
    }

    [Fact]
    public async Task Ingest_command_names_a_blob_already_in_the_account()
    {
        using var pipeline = Pipeline();
        var name = Unique("by-command.jsonl");
        await pipeline.DropAsync(name, "{\"prompt\":\"p\",\"completion\":\"c\"}\n");
        var command = $"{{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{{\"blob\":\"incoming/{name}\"}}}}";

        await pipeline.Commands.HandleAsync(command, 1, CancellationToken.None);

        var blob = pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(name);
        var runId = RunIds.ForBlob(StorageNames.Containers.Incoming, name, (await blob.GetPropertiesAsync()).Value.ETag.ToString());
        var run = (await pipeline.Runs.GetAsync(runId))!;
        Assert.Equal(RunStatus.Succeeded, run.GetStages()[Stages.Ingest]);
        Assert.Equal(RecordKinds.PromptCompletion, (await pipeline.ManifestAsync(run.DatasetId!))!.RecordKind);
    }

    [Theory]
    [InlineData("not json at all", "not a valid command document")]
    [InlineData("{\"schemaVersion\":1,\"type\":\"explode\",\"body\":{}}", "Unknown command type 'explode'")]
    [InlineData("{\"schemaVersion\":9,\"type\":\"ingest\",\"body\":{}}", "schemaVersion 9")]
    [InlineData("{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{\"blob\":\"incoming/nope.csv\"}}", "does not exist")]
    [InlineData("{\"schemaVersion\":1,\"type\":\"ingest\",\"body\":{\"blob\":\"nocontainer\"}}", "must be 'container/path'")]
    public async Task Malformed_commands_are_refused_with_a_reason(string command, string reason)
    {
        using var pipeline = Pipeline();
        var error = await Assert.ThrowsAsync<InvalidMessageException>(() => pipeline.Commands.HandleAsync(command, 1, CancellationToken.None));
        Assert.Contains(reason, error.Message);
    }
}
