using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Logging;
using Pipeline.Ingestion;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Preprocessing;

/// <summary>
/// Where a partitioned build keeps its work, under <c>_partitions/</c> of the prepared folder:
/// <c>plan.json</c>, <c>NNNNN/input.jsonl</c> (the partition's records, in source order),
/// <c>NNNNN/kept.bin</c> (its kept records, see <see cref="KeptRecords"/>) and <c>done/NNNNN.json</c>
/// (its commit, written last).
/// </summary>
internal sealed class PartitionFiles(BlobContainerClient datasets, string datasetId, string preparedId)
{
    public const string RecordsMetadata = "records";

    public string Folder { get; } = PreparedPaths.Folder(datasetId, preparedId);
    public string Prefix => Folder + "_partitions/";
    public BlobContainerClient Container => datasets;
    public BlobClient Plan => datasets.GetBlobClient(Prefix + "plan.json");
    public BlobClient Manifest => datasets.GetBlobClient(Folder + "manifest.json");
    public BlobClient Input(int partition) => datasets.GetBlobClient($"{Prefix}{partition:00000}/input.jsonl");
    public BlobClient Kept(int partition) => datasets.GetBlobClient($"{Prefix}{partition:00000}/kept.bin");
    public BlobClient Done(int partition) => datasets.GetBlobClient($"{Prefix}done/{partition:00000}.json");

    /// <summary>The done marker of one part of a step: a partition's build (step null), or a near-dedup step's part.</summary>
    public BlobClient Done(string? step, int part) => step is null ? Done(part) : datasets.GetBlobClient($"{Prefix}near/done/{step}/{part:00000}.json");

    /// <summary>The near-dedup steps' files (<see cref="NearDedupSteps"/>), under <c>_partitions/near/</c>.</summary>
    public PartStore Store => new BlobPartStore(datasets, Prefix);

    /// <summary>The parts of a step done so far and the records each read (from the done markers' metadata: no reads).</summary>
    public async Task<List<(int Partition, long Records)>> ListDoneAsync(CancellationToken cancellationToken) => await ListDoneAsync(null, cancellationToken);

    public async Task<List<(int Partition, long Records)>> ListDoneAsync(string? step, CancellationToken cancellationToken)
    {
        var done = new List<(int, long)>();
        await foreach (var item in datasets.GetBlobsAsync(BlobTraits.Metadata, BlobStates.None, step is null ? Prefix + "done/" : $"{Prefix}near/done/{step}/", cancellationToken))
        {
            if (int.TryParse(Path.GetFileNameWithoutExtension(item.Name), NumberStyles.None, CultureInfo.InvariantCulture, out var partition))
            {
                done.Add((partition, item.Metadata.TryGetValue(RecordsMetadata, out var n) ? long.Parse(n, CultureInfo.InvariantCulture) : 0));
            }
        }

        return done;
    }
}

/// <summary>The near-dedup steps' files as block blobs under a build's <c>_partitions/</c>.</summary>
internal sealed class BlobPartStore(BlobContainerClient container, string prefix) : PartStore
{
    public override async Task<Stream> CreateAsync(string name, int bufferBytes, CancellationToken cancellationToken) =>
        await container.GetBlobClient(prefix + name).OpenWriteAsync(overwrite: true, new BlobOpenWriteOptions { BufferSize = bufferBytes }, cancellationToken);

    public override async Task<Stream> OpenReadAsync(string name, CancellationToken cancellationToken) =>
        (await container.GetBlobClient(prefix + name).DownloadStreamingAsync(cancellationToken: cancellationToken)).Value.Content;

    public override async Task<long> SizeAsync(string name, CancellationToken cancellationToken) =>
        (await container.GetBlobClient(prefix + name).GetPropertiesAsync(cancellationToken: cancellationToken)).Value.ContentLength;

    public override async IAsyncEnumerable<string> ListAsync(string prefixOfNames, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
    {
        await foreach (var item in container.GetBlobsAsync(BlobTraits.None, BlobStates.None, prefix + prefixOfNames, cancellationToken))
        {
            yield return item.Name[prefix.Length..];
        }
    }
}

/// <summary>
/// Preprocessing fanned out over partitions, as inference fans out over shards. The planner streams
/// <c>records.jsonl</c> once into P partitions by a hash of each record's dedup key, so exact duplicates
/// always meet in one partition, and sends one <c>preprocess-partition</c> message per partition; any
/// instance cleans, tokenizes and deduplicates any partition (under the partition's lease, committed by
/// its done marker, so a redelivery does nothing twice and a failed partition is retried alone); the
/// last to finish merges the partitions' kept records back into source order and writes the shards,
/// statistics, report and manifest with the single pass's own code, so the output is the same bytes.
/// </summary>
internal sealed class PartitionedBuild(
    StorageClients storage,
    RunStore runs,
    RunTransitions transitions,
    QueueSender sender,
    PreparedCommit commit,
    PreprocessingOptions options,
    TimeSpan progressInterval,
    ILogger logger)
{
    private const string AssembleLock = "preprocess-assemble";
    private const string PlanLock = "preprocess-plan";

    // The parts this instance works on at once (a host takes a batch of messages; each part uses every core and a partition's memory).
    private readonly SemaphoreSlim _slots = new(Math.Max(1, options.PartsPerInstance));

    private PartitionFiles Files(string datasetId, string preparedId) => new(storage.Container(StorageNames.Containers.Datasets), datasetId, preparedId);

    /// <summary>
    /// Plans the build (or resumes one already planned) and fans it out. The stage stays running: the
    /// assembly of the last partition ends it.
    /// </summary>
    public async Task PlanAsync(PreprocessRequest request, string runId, DatasetManifest dataset, PreprocessRecipe recipe, TokenizerSource tokenizer, string preparedId, int partitions, CancellationToken cancellationToken)
    {
        // One planner per prepared dataset, whichever runs ask for it (the same file dropped twice): the plan, its inputs
        // and a takeover are written under this lease. A second planner waits for the first, which is working (a dead
        // one's lease expires within seconds), so its wait does not use up its deferrals.
        RunLease planning;
        try
        {
            planning = await RunLease.AcquireAsync(storage, preparedId, PlanLock, cancellationToken);
        }
        catch (RunBusyException)
        {
            throw new RunBusyException($"Prepared dataset {preparedId} is being planned by another run; run {runId} looks again shortly.") { WaitsOnLiveRun = true };
        }

        await using var held = planning;
        using var work = planning.Link(cancellationToken);
        cancellationToken = work.Token;
        var files = Files(request.DatasetId, preparedId);
        if (await BlobJson.ReadAsync(files.Plan, PreprocessJson.Default.PartitionPlan, cancellationToken) is { } existing)
        {
            await ResumeAsync(files, existing, request, runId, cancellationToken);
            return;
        }

        var clock = Stopwatch.StartNew();
        var builder = new PreparedDatasetBuilder(recipe, tokenizer, options);
        var outputs = new List<Stream>();
        long[] counts;
        try
        {
            for (var p = 0; p < partitions; p++)
            {
                // Small upload blocks: the planner holds one block per partition.
                outputs.Add(await files.Input(p).OpenWriteAsync(overwrite: true, new BlobOpenWriteOptions { BufferSize = options.PartitionBlockBytes }, cancellationToken));
            }

            var download = await files.Container.GetBlobClient(dataset.Records).DownloadStreamingAsync(cancellationToken: cancellationToken);
            await using var records = download.Value.Content;
            var lastProgress = Stopwatch.StartNew();
            counts = await builder.PartitionAsync(records, outputs, async p =>
            {
                if (lastProgress.Elapsed >= progressInterval)
                {
                    lastProgress.Restart();
                    await transitions.ProgressAsync(runId, r => r.SetCounts(new Dictionary<string, long> { ["preprocessRecordsPartitioned"] = p.Records }), cancellationToken);
                }
            }, cancellationToken);
        }
        finally
        {
            foreach (var output in outputs)
            {
                await output.DisposeAsync();
            }
        }

        var plan = new PartitionPlan
        {
            RunId = runId,
            DatasetId = request.DatasetId,
            PreparedId = preparedId,
            Partitions = partitions,
            Records = counts.Sum(),
            PartitionRecords = [.. counts],
            NearBuckets = recipe.Dedup.Mode == DedupModes.Near ? NearDedupSteps.BucketsFor(partitions, new MinHasher(recipe.Dedup)) : 0,
            Request = request,
            CreatedAt = DateTimeOffset.UtcNow,
        };
        await BlobJson.WriteAsync(files.Plan, plan, PreprocessJson.Default.PartitionPlan, cancellationToken);
        await transitions.ProgressAsync(runId, r => r.SetCounts(new Dictionary<string, long>
        {
            ["preprocessRecordsPartitioned"] = plan.Records,
            ["preprocessPartitions"] = partitions,
            ["preprocessPartitionsDone"] = 0,
        }), cancellationToken);
        await SendAsync(plan, null, Enumerable.Range(0, partitions), cancellationToken);
        logger.LogInformation("Prepared {PreparedId} planned: {Records} records in {Partitions} partitions in {Ms} ms", preparedId, plan.Records, partitions, clock.ElapsedMilliseconds);
    }

    /// <summary>A redelivery of a planned build: partitions not yet done are sent again (their lease and done marker make that harmless).</summary>
    private async Task ResumeAsync(PartitionFiles files, PartitionPlan plan, PreprocessRequest request, string runId, CancellationToken cancellationToken)
    {
        if (plan.RunId != runId)
        {
            if (await runs.GetAsync(plan.RunId, cancellationToken) is { } other && !RunStatus.IsFinal(other.Status))
            {
                // Another run is preparing this very dataset with this recipe: this one waits for its manifest.
                throw new RunBusyException($"Prepared dataset {plan.PreparedId} is being built for run {plan.RunId}; run {runId} takes it when it is done.") { WaitsOnLiveRun = true };
            }

            // The run that planned it ended (cancelled, failed) before the build did: this run takes the build over.
            plan = plan with { RunId = runId, Request = request };
            await BlobJson.WriteAsync(files.Plan, plan, PreprocessJson.Default.PartitionPlan, cancellationToken);
        }

        // The first step not yet done is sent again (its parts' leases and done markers make that harmless); all done: the assembly.
        foreach (var step in StepsOf(plan))
        {
            var done = (await files.ListDoneAsync(step, cancellationToken)).Select(d => d.Partition).ToHashSet();
            if (done.Count < PartsOf(plan, step))
            {
                await SendAsync(plan, step, Enumerable.Range(0, PartsOf(plan, step)).Where(p => !done.Contains(p)), cancellationToken);
                return;
            }
        }

        await AdvanceAsync(files, plan, StepsOf(plan)[^1], 1, cancellationToken);
    }

    /// <summary>The steps of a build: the partitions, then (with near dedup) the buckets, attach and verify steps.</summary>
    private static string?[] StepsOf(PartitionPlan plan) =>
        plan.NearBuckets > 0 ? [null, NearDedupSteps.Buckets, NearDedupSteps.Attach, NearDedupSteps.Verify] : [null];

    private static int PartsOf(PartitionPlan plan, string? step) => step == NearDedupSteps.Buckets ? plan.NearBuckets : plan.Partitions;

    private async Task SendAsync(PartitionPlan plan, string? step, IEnumerable<int> parts, CancellationToken cancellationToken)
    {
        foreach (var part in parts)
        {
            await sender.SendAsync(StorageNames.Queues.PreprocessPartition, MessageTypes.PreprocessPartition, plan.RunId,
                new PreprocessPartitionRequest(plan.DatasetId, plan.PreparedId, part, step), PreprocessJson.Default.PreprocessPartitionRequest, cancellationToken: cancellationToken);
        }
    }

    /// <summary>
    /// Handles a <c>preprocess-partition</c> message: one part of one step (a partition, or a near-dedup
    /// bucket, attach or verify part) done once, then the next step started, or the assembly run, if it was the last.
    /// </summary>
    public async Task HandlePartitionAsync(PreprocessPartitionRequest request, int dequeueCount, CancellationToken cancellationToken)
    {
        var files = Files(request.DatasetId, request.PreparedId);
        var plan = await BlobJson.ReadAsync(files.Plan, PreprocessJson.Default.PartitionPlan, cancellationToken)
            ?? throw new InvalidMessageException($"The preprocess-partition message names prepared dataset {request.PreparedId} of {request.DatasetId}, which has no partition plan.");
        var step = request.Step;
        if (!StepsOf(plan).Contains(step))
        {
            throw new InvalidMessageException($"The preprocess-partition message names step '{step}'; {request.PreparedId} has the steps: {string.Join(", ", StepsOf(plan).Select(s => s ?? "(partition)"))}.");
        }

        var parts = PartsOf(plan, step);
        if (request.Partition < 0 || request.Partition >= parts)
        {
            throw new InvalidMessageException($"The preprocess-partition message names part {request.Partition} of step '{step ?? "partition"}'; {request.PreparedId} has parts 0 to {parts - 1} in it.");
        }

        using var scope = logger.BeginScope(new Dictionary<string, object> { ["RunId"] = plan.RunId, ["PreparedId"] = plan.PreparedId, ["Partition"] = request.Partition, ["Step"] = step ?? "partition" });
        // Under the part's own lease: a second delivery at once is busy (put back), then finds the done marker.
        var label = step is null ? $"Partition {request.Partition} of {plan.PreparedId}" : $"Near-dedup {step} part {request.Partition} of {plan.PreparedId}";
        var part = new StageRun(new RunRecord { RunId = plan.RunId }, Stages.Preprocess, dequeueCount, logger) { Part = label };
        var lockName = step is null ? $"preprocess-partition-{request.Partition:00000}" : $"preprocess-{step}-{request.Partition:00000}";
        if (await transitions.RunPartOnceAsync(part, plan.PreparedId, lockName, files.Done(step, request.Partition), async (clock, token) =>
            {
                if (!_slots.Wait(0, CancellationToken.None))
                {
                    // Memory per instance stays one part's: the message goes back for an instance with a free slot (uncounted: the work is live).
                    throw new RunBusyException($"This instance is already working on {options.PartsPerInstance} part(s) of a partitioned build ({PreprocessingOptions.Section}:PartsPerInstance); {label} waits for a free instance.") { WaitsOnLiveRun = true };
                }

                try
                {
                    await (step is null
                        ? BuildAsync(files, plan, request.Partition, dequeueCount, clock, token)
                        : NearStepAsync(files, plan, step, request.Partition, dequeueCount, clock, token));
                }
                finally
                {
                    _slots.Release();
                }
            }, cancellationToken) == PartOutcome.Stopped)
        {
            return;
        }

        await AdvanceAsync(files, plan, step, dequeueCount, cancellationToken);
    }

    /// <summary>One part of a near-dedup step (<see cref="NearDedupSteps"/>), committed by its done marker.</summary>
    private async Task NearStepAsync(PartitionFiles files, PartitionPlan plan, string step, int part, int attempt, Stopwatch clock, CancellationToken cancellationToken)
    {
        var hasher = new MinHasher(PreprocessRecipe.From(plan.Request.Spec?.Preprocess).Dedup);
        var store = files.Store;
        long count = 0;
        switch (step)
        {
            case NearDedupSteps.Buckets:
                count = await NearDedupSteps.BucketAsync(store, part, plan.Partitions, cancellationToken);
                break;
            case NearDedupSteps.Attach:
                await NearDedupSteps.AttachAsync(store, part, hasher.Permutations, cancellationToken);
                break;
            default:
                count = await NearDedupSteps.VerifyAsync(store, part, hasher, cancellationToken);
                break;
        }

        var outcome = new NearStepOutcome(step, part, count, attempt, Math.Round(clock.Elapsed.TotalMilliseconds, 1), DateTimeOffset.UtcNow);
        await files.Done(step, part).UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(outcome, PreprocessJson.Default.NearStepOutcome)), cancellationToken);
        logger.LogInformation("Near-dedup {Step} part {Part} of {PreparedId}: {Count} pairs, {Ms} ms", step, part, plan.PreparedId, count, outcome.WallMs);
    }

    private async Task BuildAsync(PartitionFiles files, PartitionPlan plan, int partition, int attempt, Stopwatch clock, CancellationToken cancellationToken)
    {
        var (dataset, recipe, tokenizer) = await LoadAsync(plan, cancellationToken);
        var builder = new PreparedDatasetBuilder(recipe, tokenizer, options);
        var lastProgress = Stopwatch.StartNew();
        PartitionOutcome outcome;
        var input = await files.Input(partition).DownloadStreamingAsync(cancellationToken: cancellationToken);
        await using (var records = input.Value.Content)
        await using (var kept = await files.Kept(partition).OpenWriteAsync(overwrite: true, new BlobOpenWriteOptions { BufferSize = options.UploadBlockBytes }, cancellationToken))
        await using (var near = plan.NearBuckets > 0 ? await NearDedupSteps.PartitionWriter.CreateAsync(files.Store, new MinHasher(recipe.Dedup), partition, plan.NearBuckets, cancellationToken) : null)
        {
            outcome = await builder.BuildPartitionAsync(partition, records, dataset, kept, near, async _ =>
            {
                if (lastProgress.Elapsed >= progressInterval)
                {
                    // A heartbeat that stops the partition when its run was cancelled.
                    lastProgress.Restart();
                    await transitions.ProgressAsync(plan.RunId, _ => { }, cancellationToken);
                }
            }, cancellationToken);
        }

        outcome.Attempt = attempt;
        outcome.WallMs = Math.Round(clock.Elapsed.TotalMilliseconds, 1);
        outcome.FinishedAt = DateTimeOffset.UtcNow;
        await files.Done(partition).UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(outcome, PreprocessJson.Default.PartitionOutcome)), new BlobUploadOptions
        {
            Metadata = new Dictionary<string, string> { [PartitionFiles.RecordsMetadata] = outcome.RecordsRead.ToString(CultureInfo.InvariantCulture) },
        }, cancellationToken);
        logger.LogInformation("Partition {Partition} of {PreparedId}: {Records} records, {Kept} kept, {Duplicates} exact duplicates, {Ms} ms",
            partition, plan.PreparedId, outcome.RecordsRead, outcome.Kept, outcome.ExactDuplicatesRemoved, outcome.WallMs);
    }

    private async Task<(DatasetManifest, PreprocessRecipe, TokenizerSource)> LoadAsync(PartitionPlan plan, CancellationToken cancellationToken)
    {
        var datasets = storage.Container(StorageNames.Containers.Datasets);
        var dataset = await BlobJson.ReadAsync(datasets.GetBlobClient($"{plan.DatasetId}/manifest.json"), PipelineJson.Default.DatasetManifest, cancellationToken)
            ?? throw new PreprocessingRejectedException(PreprocessErrorCodes.DatasetNotFound, $"Dataset {plan.DatasetId} has no manifest any more; ingest the file again.");
        var recipe = PreprocessRecipe.From(plan.Request.Spec?.Preprocess);
        var tokenizer = await TokenizerSource.LoadAsync(storage, recipe.Tokenizer, cancellationToken);
        if (PreprocessHandler.PreparedIdFor(plan.DatasetId, recipe, tokenizer) != plan.PreparedId)
        {
            throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidTokenizerFiles,
                $"The tokenizer files of {recipe.Tokenizer.Files} changed while {plan.PreparedId} was being prepared; its partitions would mix two tokenizers. Send the preprocess command again.");
        }

        return (dataset, recipe, tokenizer);
    }

    /// <summary>
    /// Reports progress from the done markers of <paramref name="step"/> and, when all its parts are done,
    /// sends the next step's messages or, after the last step, assembles under the build's lease; the
    /// manifest is written last, so a crash here leaves none and a redelivery redoes it.
    /// </summary>
    private async Task AdvanceAsync(PartitionFiles files, PartitionPlan plan, string? step, int attempt, CancellationToken cancellationToken)
    {
        var run = await runs.GetAsync(plan.RunId, cancellationToken);
        if (run is null || RunTransitions.IsDone(run, Stages.Preprocess))
        {
            return;
        }

        var done = await files.ListDoneAsync(step, cancellationToken);
        var steps = StepsOf(plan);
        var counts = step is null ? PartitionCounts(plan, done) : new Dictionary<string, long>
        {
            ["preprocessNearStep"] = Array.IndexOf(steps, step),
            ["preprocessNearSteps"] = steps.Length - 1,
            ["preprocessNearParts"] = PartsOf(plan, step),
            ["preprocessNearPartsDone"] = done.Count,
        };
        await runs.UpdateAsync(plan.RunId, r =>
        {
            if (RunStatus.IsFinal(r.Status))
            {
                return false;
            }

            r.SetCounts(counts);
            return true;
        }, cancellationToken);
        if (done.Count < PartsOf(plan, step))
        {
            return;
        }

        var index = Array.IndexOf(steps, step);
        if (index < steps.Length - 1)
        {
            var next = steps[index + 1];
            var nextDone = (await files.ListDoneAsync(next, cancellationToken)).Select(d => d.Partition).ToHashSet();
            if (nextDone.Count == PartsOf(plan, next))
            {
                // A redelivery after the next step finished too: carry on from there.
                await AdvanceAsync(files, plan, next, attempt, cancellationToken);
                return;
            }

            // Every finisher that sees the step complete may send these; a part's lease and done marker make a second message harmless.
            await SendAsync(plan, next, Enumerable.Range(0, PartsOf(plan, next)).Where(p => !nextDone.Contains(p)), cancellationToken);
            return;
        }

        var part = new StageRun(new RunRecord { RunId = plan.RunId }, Stages.Preprocess, attempt, logger) { Part = $"Assembly of {plan.PreparedId}" };
        await transitions.RunPartAsync(part, (_, token) => AssembleAsync(files, plan, token), cancellationToken);
    }

    private static Dictionary<string, long> PartitionCounts(PartitionPlan plan, List<(int Partition, long Records)> done)
    {
        var recordsDone = done.Sum(d => d.Records);
        var rate = recordsDone / Math.Max(0.001, (DateTimeOffset.UtcNow - plan.CreatedAt).TotalSeconds);
        return new Dictionary<string, long>
        {
            ["preprocessRecords"] = recordsDone,
            ["preprocessPartitions"] = plan.Partitions,
            ["preprocessPartitionsDone"] = done.Count,
            ["preprocessRecordsPerSecond"] = (long)rate,
            ["preprocessEtaSeconds"] = rate > 0 ? (long)Math.Ceiling(Math.Max(0, plan.Records - recordsDone) / rate) : -1,
        };
    }

    private async Task AssembleAsync(PartitionFiles files, PartitionPlan plan, CancellationToken cancellationToken)
    {
        RunLease lease;
        try
        {
            lease = await RunLease.AcquireAsync(storage, plan.PreparedId, AssembleLock, cancellationToken);
        }
        catch (RunBusyException)
        {
            // Another instance finished the last partition at the same time and is assembling; if it fails, its own message's retry assembles.
            logger.LogInformation("Prepared {PreparedId} is being assembled by another instance", plan.PreparedId);
            return;
        }

        await using var held = lease;
        using var work = lease.Link(cancellationToken);
        cancellationToken = work.Token;
        PreparedManifest manifest;
        ValidationReport report;
        if (await commit.ReadAsync(plan.DatasetId, plan.PreparedId, cancellationToken) is { } existing)
        {
            (manifest, report) = existing;
        }
        else
        {
            var clock = Stopwatch.StartNew();
            var (dataset, recipe, tokenizer) = await LoadAsync(plan, cancellationToken);
            var outcomes = new List<PartitionOutcome>();
            var kept = new List<Stream>();
            try
            {
                for (var p = 0; p < plan.Partitions; p++)
                {
                    outcomes.Add(await BlobJson.ReadAsync(files.Done(p), PreprocessJson.Default.PartitionOutcome, cancellationToken)
                        ?? throw new InvalidOperationException($"Partition {p} of {plan.PreparedId} has no done marker."));
                    kept.Add((await files.Kept(p).DownloadStreamingAsync(cancellationToken: cancellationToken)).Value.Content);
                }

                var near = plan.NearBuckets > 0 ? await NearDedupSteps.ClusterAsync(files.Store, plan.Partitions, options.DuplicateSamples, cancellationToken) : NearDedupSteps.NearDuplicates.None;
                var builder = new PreparedDatasetBuilder(recipe, tokenizer, options);
                var build = await builder.AssembleAsync(kept, outcomes, near, dataset, ShardSink.Blobs(files.Container, options.UploadBlockBytes), files.Folder, cancellationToken);
                (manifest, report) = await commit.WriteAsync(plan.RunId, dataset, recipe, tokenizer, plan.PreparedId, build, DateTimeOffset.UtcNow - plan.CreatedAt, cancellationToken);
            }
            finally
            {
                foreach (var stream in kept)
                {
                    await stream.DisposeAsync();
                }
            }

            logger.LogInformation("Prepared {PreparedId} assembled from {Partitions} partitions in {Ms} ms", plan.PreparedId, plan.Partitions, clock.ElapsedMilliseconds);
        }

        await commit.FinishRunAsync(plan.Request, plan.RunId, manifest, report, DateTimeOffset.UtcNow - plan.CreatedAt, cancellationToken);
        await CleanUpAsync(files, cancellationToken);
    }

    /// <summary>
    /// Once the manifest is written, the partitions' inputs, kept records and near-dedup files (about the
    /// dataset's size again, several times with near dedup) are deleted. The plan and the done markers stay:
    /// a late duplicate message finds its part done and the stage finished, and they record how the build went.
    /// </summary>
    private async Task CleanUpAsync(PartitionFiles files, CancellationToken cancellationToken)
    {
        var deleted = 0;
        await foreach (var item in files.Container.GetBlobsAsync(BlobTraits.None, BlobStates.None, files.Prefix, cancellationToken))
        {
            var name = item.Name[files.Prefix.Length..];
            if (name == "plan.json" || name.StartsWith("done/", StringComparison.Ordinal) || name.StartsWith("near/done/", StringComparison.Ordinal))
            {
                continue;
            }

            try
            {
                await files.Container.GetBlobClient(item.Name).DeleteIfExistsAsync(cancellationToken: cancellationToken);
                deleted++;
            }
            catch (Azure.RequestFailedException e)
            {
                // Left for the storage account's lifecycle rules: the prepared dataset is complete without it.
                logger.LogWarning(e, "Could not delete {Blob} after the build; it is no longer needed", item.Name);
            }
        }

        logger.LogInformation("Deleted {Count} intermediate files of {Prefix}", deleted, files.Prefix);
    }
}
