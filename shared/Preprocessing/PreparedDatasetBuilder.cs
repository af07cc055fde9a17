using System.Globalization;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Azure.Storage.Blobs;
using Pipeline.Ingestion;

namespace Pipeline.Preprocessing;

/// <summary>What a build produced, before the report and manifest are written.</summary>
public sealed record BuildResult(List<ShardInfo> Shards, PreparedStats Stats, List<string> Labels, bool Packed);

/// <summary>Progress of a build: records read so far and tokens written.</summary>
public readonly record struct BuildProgress(long Records, long Tokens);

/// <summary>
/// Streams a dataset's records through cleaning, rendering, tokenization, deduplication and the
/// train/validation split into shards. Records are read in batches; each batch is cleaned and
/// tokenized in parallel (one tokenizer per worker), then committed in record order, so the output
/// is byte-identical whatever the number of cores.
/// </summary>
public sealed class PreparedDatasetBuilder(PreprocessRecipe recipe, TokenizerSource tokenizers, PreprocessingOptions options)
{
    private const int ExcerptChars = 120;
    private static readonly ThreadLocal<List<int>> WorkerIds = new(() => new List<int>(256));
    private static readonly ThreadLocal<XxHash3> WorkerKeys = new(() => new XxHash3());
    private static readonly ThreadLocal<CanonicalRecordReader> WorkerRecords = new(() => new CanonicalRecordReader());

    /// <summary>
    /// One batch of records: their lines copied end to end into one reused buffer, and one reused result
    /// per record, so reading and tokenizing allocate nothing per record beyond what parsing needs.
    /// </summary>
    private sealed class Batch(int size)
    {
        private byte[] _bytes = new byte[1 << 20];
        private int _length;
        private readonly List<(int Offset, int Length)> _lines = new(size);
        public readonly Processed[] Results = [.. Enumerable.Range(0, size).Select(_ => new Processed())];

        public int Count => _lines.Count;

        /// <summary>The batch's place in record order (batches are committed in this order).</summary>
        public long Sequence;

        public ReadOnlySpan<byte> Line(int index) => _bytes.AsSpan(_lines[index].Offset, _lines[index].Length);

        public ReadOnlyMemory<byte> Memory(int index) => _bytes.AsMemory(_lines[index].Offset, _lines[index].Length);

        public void Clear()
        {
            _lines.Clear();
            _length = 0;
        }

        public void Add(ReadOnlySpan<byte> line)
        {
            if (_length + line.Length > _bytes.Length)
            {
                Array.Resize(ref _bytes, Math.Max(_bytes.Length * 2, _length + line.Length));
            }

            line.CopyTo(_bytes.AsSpan(_length));
            _lines.Add((_length, line.Length));
            _length += line.Length;
        }
    }

    private sealed class Processed
    {
        /// <summary>False when the record is left out (blank after cleaning).</summary>
        public bool Kept;
        /// <summary>The token ids: the first <see cref="Count"/> of a buffer reused from batch to batch.</summary>
        public int[] Ids = new int[128];
        public int Count;
        public int? Label;
        public int? PromptLength;
        public bool Truncated;
        public ulong Key;
        public uint[]? Signature;
        public string? Text;
        public long Line;
        public RedactionCounts Redactions = new();

        public ReadOnlyMemory<int> Tokens => Ids.AsMemory(0, Count);

        public void SetIds(List<int> ids)
        {
            if (ids.Count > Ids.Length)
            {
                Ids = new int[Math.Max(ids.Count, Ids.Length * 2)];
            }

            CollectionsMarshal.AsSpan(ids).CopyTo(Ids);
            Count = ids.Count;
        }
    }

    /// <summary>Builds the shards into <paramref name="folder"/> of <paramref name="output"/> as block blobs.</summary>
    public Task<BuildResult> BuildAsync(
        Stream records,
        DatasetManifest dataset,
        BlobContainerClient output,
        string folder,
        Func<BuildProgress, ValueTask>? progress,
        CancellationToken cancellationToken) =>
        BuildAsync(records, dataset, ShardSink.Blobs(output, options.UploadBlockBytes), folder, progress, cancellationToken);

    /// <summary>
    /// The single pass over <paramref name="records"/>. Near dedup reads the records twice, so it needs a
    /// stream that can seek (or the overload that opens the records itself).
    /// </summary>
    public Task<BuildResult> BuildAsync(
        Stream records,
        DatasetManifest dataset,
        ShardSink output,
        string folder,
        Func<BuildProgress, ValueTask>? progress,
        CancellationToken cancellationToken)
    {
        var opened = 0;
        return BuildAsync(_ =>
        {
            if (opened++ > 0)
            {
                if (!records.CanSeek)
                {
                    throw new InvalidOperationException("Near-duplicate dedup reads the records twice: pass a stream that can seek, or a function that opens the records.");
                }

                records.Position = 0;
            }

            return Task.FromResult(records);
        }, dispose: false, dataset, output, folder, progress, cancellationToken);
    }

    /// <summary>The single pass over the records <paramref name="openRecords"/> opens (twice for near dedup).</summary>
    public Task<BuildResult> BuildAsync(
        Func<CancellationToken, Task<Stream>> openRecords,
        DatasetManifest dataset,
        BlobContainerClient output,
        string folder,
        Func<BuildProgress, ValueTask>? progress,
        CancellationToken cancellationToken) =>
        BuildAsync(openRecords, dispose: true, dataset, ShardSink.Blobs(output, options.UploadBlockBytes), folder, progress, cancellationToken);

    /// <summary>
    /// The single pass: every record read, cleaned, tokenized, deduplicated and split by this one call. Near
    /// dedup first reads the records once for their signatures and the clusters (<see cref="FindNearDuplicatesAsync"/>).
    /// </summary>
    private async Task<BuildResult> BuildAsync(
        Func<CancellationToken, Task<Stream>> openRecords,
        bool dispose,
        DatasetManifest dataset,
        ShardSink output,
        string folder,
        Func<BuildProgress, ValueTask>? progress,
        CancellationToken cancellationToken)
    {
        var context = Context(dataset);
        var near = NearDedupSteps.NearDuplicates.None;
        if (recipe.Dedup.Mode == DedupModes.Near)
        {
            var first = await openRecords(cancellationToken);
            try
            {
                near = await FindNearDuplicatesAsync(first, context, cancellationToken);
            }
            finally
            {
                if (dispose)
                {
                    await first.DisposeAsync();
                }
            }
        }

        // The records kept by the clusters of the first removals: the sample shows their excerpts.
        var roots = near.Removed.OrderBy(r => r.Key).Take(options.DuplicateSamples).Select(r => r.Value.KeptLine).ToHashSet();
        var rootExcerpts = new Dictionary<long, string>();
        // Each dedup key seen, with the index its first record has (or would have) among the sample's sources;
        // sized up front for the dataset's valid records (up to a million), so it is not rebuilt as it grows.
        var exact = recipe.Dedup.Mode != DedupModes.None ? new KeyTable((int)Math.Min(dataset.Counts.Valid, 1 << 20)) : null;
        // The lines of the first kept records, whose excerpts the duplicate sample may show. Only lines: an
        // exact duplicate's text is its kept record's text, so the sample takes both excerpts from the
        // duplicate, and the batches' texts are not kept alive (which made each collection copy them).
        var sampleSources = new List<long>();
        var redactions = new RedactionCounts();
        await using var assembly = new PreparedAssembly(recipe, output, folder, context.Labels, context.Packed, tokenizers.Probe.EndOfText);
        var stats = assembly.Stats;
        var records = await openRecords(cancellationToken);
        try
        {
            await ReadInBatchesAsync(records, (line, result, tokenizer) =>
            {
                Process(line, result, tokenizer, context, null);
                if (result.Kept)
                {
                    // The commit looks the key up a batch later: its slot is in this core's cache by then.
                    exact?.Touch(result.Key);
                }
            }, async batch =>
            {
                for (var i = 0; i < batch.Count; i++)
                {
                    var record = batch.Results[i];
                    stats.RecordsRead++;
                    redactions.Add(record.Redactions);
                    if (!record.Kept)
                    {
                        continue;
                    }

                    // The first record of each key (the partitions' kept records) is remembered, whether near dedup keeps it or not.
                    if (exact is not null && exact.TryGetOrAdd(record.Key, sampleSources.Count, out var first))
                    {
                        stats.ExactDuplicatesRemoved++;
                        Sample(stats, sampleSources, first, record);
                        continue;
                    }

                    if (sampleSources.Count < options.DuplicateSampleSources)
                    {
                        sampleSources.Add(record.Line);
                    }

                    if (near.Removed.TryGetValue(record.Line, out var removal))
                    {
                        stats.NearDuplicatesRemoved++;
                        if (stats.DuplicateSamples.Count < options.DuplicateSamples)
                        {
                            stats.DuplicateSamples.Add(new DuplicatePair(removal.KeptLine, record.Line, removal.Similarity, rootExcerpts[removal.KeptLine], Excerpt(record.Text!)));
                        }

                        continue;
                    }

                    if (roots.Contains(record.Line))
                    {
                        rootExcerpts[record.Line] = Excerpt(record.Text!);
                    }

                    await assembly.AddAsync(record.Tokens, record.Label, record.PromptLength, record.Truncated, record.Key, record.Line, cancellationToken);
                }

                if (progress is not null)
                {
                    await progress(new BuildProgress(stats.RecordsRead, assembly.Tokens));
                }
            }, cancellationToken);
        }
        finally
        {
            if (dispose)
            {
                await records.DisposeAsync();
            }
        }

        return await assembly.CompleteAsync(dataset, redactions, cancellationToken);
    }

    /// <summary>
    /// The single pass's first read for near dedup: each record cleaned and rendered (not tokenized), exact
    /// duplicates set aside (as the partitions' exact dedup does), and the distinct ones' signatures put
    /// through the LSH index; the clusters of verified pairs say which records go.
    /// </summary>
    private async Task<NearDedupSteps.NearDuplicates> FindNearDuplicatesAsync(Stream records, BuildContext context, CancellationToken cancellationToken)
    {
        var hasher = new MinHasher(recipe.Dedup);
        var index = new NearDuplicateIndex(hasher);
        var keys = new HashSet<ulong>();
        await ReadInBatchesAsync(records, (line, result, _) => Sign(line, result, context.Cleaner, hasher), batch =>
        {
            for (var i = 0; i < batch.Count; i++)
            {
                var record = batch.Results[i];
                if (record.Kept && keys.Add(record.Key))
                {
                    index.Add(record.Line, record.Signature!);
                }
            }

            return Task.CompletedTask;
        }, cancellationToken);
        return new NearDedupSteps.NearDuplicates(index.Clusters.Removals(), []);
    }

    private void Sign(ReadOnlySpan<byte> line, Processed result, TextCleaner cleaner, MinHasher hasher)
    {
        var record = WorkerRecords.Value!.Read(line);
        var rendered = Render(record, cleaner, new RedactionCounts(), out _, out _);
        result.Line = record.Line;
        result.Kept = !string.IsNullOrWhiteSpace(rendered);
        result.Key = result.Kept ? Key(rendered, record.Label) : 0;
        result.Signature = result.Kept ? hasher.Signature(rendered) : null;
    }

    /// <summary>
    /// The planner's pass: each record line goes, unchanged and in source order, to partition
    /// <c>hash(dedup key) mod partitions</c>, the dedup key being the cleaned, rendered text and the label,
    /// so records that are exact duplicates after normalization always meet in the same partition.
    /// Returns the records written to each partition.
    /// </summary>
    public async Task<long[]> PartitionAsync(Stream records, IReadOnlyList<Stream> partitions, Func<BuildProgress, ValueTask>? progress, CancellationToken cancellationToken)
    {
        var cleaner = new TextCleaner(recipe.Normalize, recipe.Redact);
        var counts = new long[partitions.Count];
        var newline = new byte[] { (byte)'\n' };
        long read = 0;
        await ReadInBatchesAsync(records, (line, result, _) => result.Key = KeyOf(line, cleaner), async batch =>
        {
            for (var i = 0; i < batch.Count; i++)
            {
                var partition = PartitionOf(batch.Results[i].Key, partitions.Count);
                var output = partitions[partition];
                await output.WriteAsync(batch.Memory(i), cancellationToken);
                await output.WriteAsync(newline, cancellationToken);
                counts[partition]++;
            }

            read += batch.Count;
            if (progress is not null)
            {
                await progress(new BuildProgress(read, 0));
            }
        }, cancellationToken);
        return counts;
    }

    /// <summary>The partition a dedup key belongs to.</summary>
    public static int PartitionOf(ulong key, int partitions) => (int)(key % (ulong)partitions);

    /// <summary>
    /// One partition's heavy work: its records cleaned and tokenized, exact duplicates removed (they all
    /// meet here), and the kept ones written in source order to <paramref name="kept"/> for the assembly.
    /// Memory: one dedup entry per distinct record of the partition, and the lines of its first
    /// <see cref="PreprocessingOptions.DuplicateSampleSources"/> kept records. With near dedup, each kept
    /// record's signature and band keys also go to <paramref name="near"/> (the first of the near-dedup steps).
    /// </summary>
    public async Task<PartitionOutcome> BuildPartitionAsync(int partition, Stream records, DatasetManifest dataset, Stream kept, NearDedupSteps.PartitionWriter? near, Func<BuildProgress, ValueTask>? progress, CancellationToken cancellationToken)
    {
        if ((recipe.Dedup.Mode == DedupModes.Near) != (near is not null))
        {
            throw new InvalidOperationException("A partition with near dedup writes its signatures, and only then.");
        }

        var context = Context(dataset);
        var hasher = near is not null ? new MinHasher(recipe.Dedup) : null;
        var firstLines = recipe.Dedup.Mode != DedupModes.None ? new Dictionary<ulong, long>() : null;
        // The lines of the first kept records, whose excerpts the sample may show (the duplicate's own: the same text).
        var sampleSources = new HashSet<long>();
        var outcome = new PartitionOutcome { Partition = partition };
        var redactions = new RedactionCounts();
        long tokens = 0;
        await using var writer = new KeptRecords.Writer(kept);
        await ReadInBatchesAsync(records, (line, result, tokenizer) => Process(line, result, tokenizer, context, hasher), async batch =>
        {
            for (var i = 0; i < batch.Count; i++)
            {
                var record = batch.Results[i];
                outcome.RecordsRead++;
                redactions.Add(record.Redactions);
                if (!record.Kept)
                {
                    continue;
                }

                if (firstLines is not null && !firstLines.TryAdd(record.Key, record.Line))
                {
                    outcome.ExactDuplicatesRemoved++;
                    if (outcome.DuplicateSamples.Count < options.DuplicateSamples)
                    {
                        var keptLine = firstLines[record.Key];
                        outcome.DuplicateSamples.Add(ExactPair(sampleSources.Contains(keptLine) ? keptLine : null, record));
                    }

                    continue;
                }

                if (sampleSources.Count < options.DuplicateSampleSources)
                {
                    sampleSources.Add(record.Line);
                }

                outcome.Kept++;
                tokens += record.Count;
                await writer.WriteAsync(record.Tokens, record.Label, record.PromptLength, record.Truncated, record.Key, record.Line, cancellationToken);
                if (near is not null)
                {
                    await near.AddAsync(record.Line, record.Signature!, Excerpt(record.Text!), cancellationToken);
                }
            }

            if (progress is not null)
            {
                await progress(new BuildProgress(outcome.RecordsRead, tokens));
            }
        }, cancellationToken);
        await writer.CompleteAsync(cancellationToken);
        (outcome.Emails, outcome.Phones, outcome.IpAddresses) = (redactions.Emails, redactions.Phones, redactions.IpAddresses);
        return outcome;
    }

    /// <summary>
    /// The assembly of a partitioned build: the partitions' kept records merged back into source order
    /// (each partition is in source order, so a k-way merge streams them), then split, packed and written
    /// by the same code as the single pass, so shards and statistics are the same bytes. Memory: one
    /// record per partition, plus what the split and the shard writers hold. Records that <paramref name="near"/>
    /// removes (the near-dedup clusters) are left out as they are met.
    /// </summary>
    public async Task<BuildResult> AssembleAsync(IReadOnlyList<Stream> kept, IReadOnlyList<PartitionOutcome> outcomes, NearDedupSteps.NearDuplicates near, DatasetManifest dataset, ShardSink output, string folder, CancellationToken cancellationToken)
    {
        var context = Context(dataset);
        await using var assembly = new PreparedAssembly(recipe, output, folder, context.Labels, context.Packed, tokenizers.Probe.EndOfText);
        var stats = assembly.Stats;
        var redactions = new RedactionCounts();
        foreach (var outcome in outcomes)
        {
            stats.RecordsRead += outcome.RecordsRead;
            stats.ExactDuplicatesRemoved += outcome.ExactDuplicatesRemoved;
            redactions.Emails += outcome.Emails;
            redactions.Phones += outcome.Phones;
            redactions.IpAddresses += outcome.IpAddresses;
        }

        // The single pass samples the first removals in source order; each partition kept its own first ones.
        var samples = outcomes.SelectMany(o => o.DuplicateSamples).OrderBy(s => s.RemovedLine).Take(options.DuplicateSamples).ToList();
        var samplesByKeptLine = samples.Select((s, i) => (s.KeptLine, i)).Where(x => x.KeptLine > 0).ToLookup(x => x.KeptLine, x => x.i);

        var readers = kept.Select((stream, i) => new KeptRecords.Reader(stream, $"partition {i}")).ToList();
        try
        {
            var next = new PriorityQueue<int, long>();
            for (var i = 0; i < readers.Count; i++)
            {
                if (await readers[i].ReadAsync(cancellationToken))
                {
                    next.Enqueue(i, readers[i].Current.Line);
                }
            }

            long keptIndex = 0;
            while (next.TryDequeue(out var i, out _))
            {
                var record = readers[i].Current;
                if (keptIndex >= options.DuplicateSampleSources)
                {
                    // The single pass remembers the excerpts of its first kept records only.
                    foreach (var sample in samplesByKeptLine[record.Line])
                    {
                        samples[sample] = samples[sample] with { KeptLine = 0, Kept = "" };
                    }
                }

                keptIndex++;
                if (near.Removed.ContainsKey(record.Line))
                {
                    stats.NearDuplicatesRemoved++;
                }
                else
                {
                    await assembly.AddAsync(record.Tokens, record.Label, record.PromptLength, record.Truncated, record.Key, record.Line, cancellationToken);
                }

                if (await readers[i].ReadAsync(cancellationToken))
                {
                    next.Enqueue(i, readers[i].Current.Line);
                }
            }
        }
        finally
        {
            foreach (var reader in readers)
            {
                await reader.DisposeAsync();
            }
        }

        // The near duplicates' sample: the first removals in source order, with the excerpts their verified pairs carried.
        var nearSamples = near.Removed.OrderBy(r => r.Key).Take(options.DuplicateSamples)
            .Select(r => new DuplicatePair(r.Value.KeptLine, r.Key, r.Value.Similarity, near.Excerpts[r.Value.KeptLine], near.Excerpts[r.Key]));
        stats.DuplicateSamples = [.. samples.Concat(nearSamples).OrderBy(s => s.RemovedLine).Take(options.DuplicateSamples)];
        return await assembly.CompleteAsync(dataset, redactions, cancellationToken);
    }

    private sealed record BuildContext(TextCleaner Cleaner, List<string> Labels, Dictionary<string, int> LabelIds, bool Packed);

    private BuildContext Context(DatasetManifest dataset)
    {
        var labels = LabelNames(dataset);
        var labelIds = labels.Select((name, id) => (name, id)).ToDictionary(x => x.name, x => x.id, StringComparer.Ordinal);
        var packed = recipe.Packing && labels.Count == 0 && dataset.RecordKind == RecordKinds.Text;
        return new BuildContext(new TextCleaner(recipe.Normalize, recipe.Redact), labels, labelIds, packed);
    }

    /// <summary>
    /// Reads non-empty lines in batches of <see cref="PreprocessingOptions.BatchRecords"/> and commits them in
    /// record order (<see cref="BatchPipeline"/>).
    /// </summary>
    private Task ReadInBatchesAsync(Stream records, Action<ReadOnlySpan<byte>, Processed, TextTokenizer> process, Func<Batch, Task> commitBatch, CancellationToken cancellationToken) =>
        new BatchPipeline(records, options, tokenizers, process, commitBatch).RunAsync(cancellationToken);

    /// <summary>
    /// The build's workers, one per core, each with its own tokenizer: a worker reads the next batch of lines
    /// (one reader at a time), processes it, and then commits every batch that is next in record order. So one
    /// worker reads, processes and commits each batch while its records are still in its core's cache, the
    /// commit costs no thread switch, and workers never wait for each other except for the few microseconds a
    /// batch hand-off takes. A batch processed ahead of an earlier, slower one waits, done, until that one is
    /// committed; batches are reused once committed, so at most two per worker exist.
    /// </summary>
    private sealed class BatchPipeline(Stream records, PreprocessingOptions options, TokenizerSource tokenizers, Action<ReadOnlySpan<byte>, Processed, TextTokenizer> process, Func<Batch, Task> commitBatch)
    {
        private readonly LineReader _reader = new(records, int.MaxValue / 4);
        private readonly SemaphoreSlim _reading = new(1, 1);
        private readonly Lock _state = new();
        private readonly Dictionary<long, Batch> _done = [];
        private readonly Stack<Batch> _free = new();
        private SemaphoreSlim _batches = null!;
        private long _read;
        private long _next;
        private bool _committing;
        private bool _ended;

        public async Task RunAsync(CancellationToken cancellationToken)
        {
            var workers = options.EffectiveParallelism;
            for (var i = 0; i < 2 * workers; i++)
            {
                _free.Push(new Batch(options.BatchRecords));
            }

            _batches = new SemaphoreSlim(2 * workers, 2 * workers);
            using var failed = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            try
            {
                await Task.WhenAll(Enumerable.Range(0, workers).Select(_ => Task.Run(() => WorkAsync(failed), CancellationToken.None)));
            }
            finally
            {
                _reader.Dispose();
                _reading.Dispose();
                _batches.Dispose();
            }
        }

        private async Task WorkAsync(CancellationTokenSource failed)
        {
            var tokenizer = tokenizers.Rent();
            try
            {
                while (await ReadAsync(failed.Token) is { } batch)
                {
                    for (var i = 0; i < batch.Count; i++)
                    {
                        process(batch.Line(i), batch.Results[i], tokenizer);
                    }

                    await CommitAsync(batch);
                }
            }
            catch
            {
                // The other workers stop at their next batch (cancelled, so the build fails with this failure, not theirs).
                failed.Cancel();
                throw;
            }
            finally
            {
                tokenizers.Return(tokenizer);
            }
        }

        /// <summary>The next batch of lines with its sequence number, or null at the end of the records.</summary>
        private async Task<Batch?> ReadAsync(CancellationToken cancellationToken)
        {
            await _batches.WaitAsync(cancellationToken);
            await _reading.WaitAsync(cancellationToken);
            try
            {
                if (_ended)
                {
                    _batches.Release();
                    return null;
                }

                Batch batch;
                lock (_state)
                {
                    batch = _free.Pop();
                }

                batch.Clear();
                while (batch.Count < options.BatchRecords)
                {
                    if (!await _reader.ReadLineAsync(cancellationToken))
                    {
                        _ended = true;
                        break;
                    }

                    if (!_reader.Line.IsEmpty)
                    {
                        batch.Add(_reader.Line);
                    }
                }

                if (batch.Count == 0)
                {
                    lock (_state)
                    {
                        _free.Push(batch);
                    }

                    _batches.Release();
                    return null;
                }

                batch.Sequence = _read++;
                return batch;
            }
            finally
            {
                _reading.Release();
            }
        }

        /// <summary>
        /// Marks <paramref name="batch"/> done, then, unless another worker is committing (it will take this one
        /// too), commits the done batches from the next in order until one is missing.
        /// </summary>
        private async Task CommitAsync(Batch batch)
        {
            lock (_state)
            {
                _done.Add(batch.Sequence, batch);
                if (_committing)
                {
                    return;
                }

                _committing = true;
            }

            while (true)
            {
                Batch next;
                lock (_state)
                {
                    if (!_done.Remove(_next, out next!))
                    {
                        _committing = false;
                        return;
                    }
                }

                try
                {
                    await commitBatch(next);
                }
                catch
                {
                    lock (_state)
                    {
                        _committing = false;
                    }

                    throw;
                }

                lock (_state)
                {
                    _next++;
                    _free.Push(next);
                }

                _batches.Release();
            }
        }
    }

    /// <summary>The dedup key of a record line, without tokenizing it (the planner's work).</summary>
    private ulong KeyOf(ReadOnlySpan<byte> line, TextCleaner cleaner)
    {
        var record = WorkerRecords.Value!.Read(line);
        var rendered = Render(record, cleaner, new RedactionCounts(), out _, out _);
        return Key(rendered, record.Label);
    }

    private string Render(CanonicalRecord record, TextCleaner cleaner, RedactionCounts counts, out string? prompt, out string? answer)
    {
        prompt = answer = null;
        if (record.Messages is { } messages)
        {
            return RenderChat(messages, cleaner, counts);
        }

        if (record.Completion is { } completion)
        {
            prompt = cleaner.Clean(record.Prompt ?? "", counts);
            answer = cleaner.Clean(completion, counts);
            return prompt + "\n" + answer;
        }

        return cleaner.Clean(record.Text ?? "", counts);
    }

    private static ulong Key(string rendered, string? label)
    {
        var key = WorkerKeys.Value!;
        key.Reset();
        key.Append(MemoryMarshal.AsBytes(rendered.AsSpan()));
        key.Append("\u0001"u8);
        key.Append(MemoryMarshal.AsBytes((label ?? "").AsSpan()));
        return key.GetCurrentHashAsUInt64();
    }

    private void Process(ReadOnlySpan<byte> line, Processed result, TextTokenizer tokenizer, BuildContext context, MinHasher? hasher)
    {
        result.Kept = false;
        result.Signature = null;
        result.PromptLength = null;
        result.Label = null;
        result.Truncated = false;
        var counts = result.Redactions;
        counts.Emails = counts.Phones = counts.IpAddresses = 0;
        var record = WorkerRecords.Value!.Read(line);
        result.Line = record.Line;
        result.Text = null;
        var ids = WorkerIds.Value!;
        var rendered = Render(record, context.Cleaner, counts, out var prompt, out var answer);
        if (answer is not null)
        {
            result.PromptLength = tokenizer.EncodePair(prompt!, answer, ids);
        }
        else
        {
            tokenizer.Encode(rendered, ids);
        }

        if (rendered.Length == 0 || string.IsNullOrWhiteSpace(rendered))
        {
            return;
        }

        if (record.Label is { } label)
        {
            if (!context.LabelIds.TryGetValue(label, out var id))
            {
                throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidRecipe, $"Record on line {record.Line} has the label '{label}', which the dataset manifest does not list (more than {LabelCounter.MaxLabels} distinct labels?).");
            }

            result.Label = id;
        }

        if (!context.Packed)
        {
            result.Truncated = tokenizer.Truncate(ids, recipe.MaxSequenceLength);
        }

        result.SetIds(ids);
        result.Key = Key(rendered, record.Label);
        result.Signature = hasher?.Signature(rendered);
        result.Text = rendered;
        result.Kept = true;
    }

    private string RenderChat(List<ChatMessage> messages, TextCleaner cleaner, RedactionCounts counts)
    {
        var builder = new StringBuilder();
        foreach (var message in messages)
        {
            var content = cleaner.Clean(message.Content, counts);
            if (recipe.ChatTemplate == ChatTemplates.ChatMl)
            {
                builder.Append("<|im_start|>").Append(message.Role).Append('\n').Append(content).Append("<|im_end|>\n");
            }
            else
            {
                builder.Append(message.Role).Append(": ").Append(content).Append('\n');
            }
        }

        return builder.ToString();
    }

    /// <summary>An exact duplicate for the sample: its kept record is shown when it is one of the first kept records.</summary>
    private void Sample(PreparedStats stats, List<long> sources, int keptIndex, Processed removed)
    {
        if (stats.DuplicateSamples.Count >= options.DuplicateSamples)
        {
            return;
        }

        stats.DuplicateSamples.Add(ExactPair(keptIndex >= 0 && keptIndex < sources.Count ? sources[keptIndex] : null, removed));
    }

    /// <summary>
    /// A removed exact duplicate and its kept record (line 0 and no excerpt when that line was not
    /// remembered). Both excerpts are the duplicate's: its text is the kept record's text.
    /// </summary>
    private static DuplicatePair ExactPair(long? keptLine, Processed removed)
    {
        var excerpt = Excerpt(removed.Text!);
        return keptLine is { } kept ? new DuplicatePair(kept, removed.Line, 1.0, excerpt, excerpt) : new DuplicatePair(0, removed.Line, 1.0, "", excerpt);
    }

    /// <summary>The start of a text for the duplicate sample (never ending inside a surrogate pair).</summary>
    private static string Excerpt(string text) => text.Length <= ExcerptChars
        ? text
        : text[..(char.IsHighSurrogate(text[ExcerptChars - 1]) ? ExcerptChars - 1 : ExcerptChars)] + "…";

    /// <summary>Label names by id: numeric labels in numeric order, others in ordinal order.</summary>
    public static List<string> LabelNames(DatasetManifest dataset)
    {
        if (dataset.LabelCounts is not { Count: > 0 } counts)
        {
            return [];
        }

        var names = counts.Keys.ToList();
        if (names.All(n => long.TryParse(n, NumberStyles.Integer, CultureInfo.InvariantCulture, out _)))
        {
            return [.. names.OrderBy(n => long.Parse(n, CultureInfo.InvariantCulture))];
        }

        return [.. names.Order(StringComparer.Ordinal)];
    }
}

/// <summary>Preprocessing limits (configuration section <c>Pipeline:Preprocessing</c>).</summary>
public sealed class PreprocessingOptions
{
    public const string Section = "Pipeline:Preprocessing";

    /// <summary>Worker threads tokenizing in parallel. Default: every core.</summary>
    public int Parallelism { get; set; }
    /// <summary>
    /// Records a worker reads, processes and commits at a time. Default 256: a batch's lines, token ids and
    /// texts stay in the core's cache from reading to commit.
    /// </summary>
    public int BatchRecords { get; set; } = 256;
    /// <summary>Removed-duplicate pairs kept as a sample in stats.json. Default 20.</summary>
    public int DuplicateSamples { get; set; } = 20;
    /// <summary>The first kept records a duplicate sample can name as the kept one (their lines are remembered). Default 100,000.</summary>
    public int DuplicateSampleSources { get; set; } = 100_000;
    /// <summary>Block size of streamed shard uploads. Default 8 MiB.</summary>
    public int UploadBlockBytes { get; set; } = 8 * 1024 * 1024;
    /// <summary>Block size of the planner's partition uploads (it holds one block per partition). Default 1 MiB.</summary>
    public int PartitionBlockBytes { get; set; } = 1024 * 1024;
    /// <summary>
    /// Parts of partitioned builds (partitions, near-dedup parts) one instance works on at once; a message for
    /// another goes back to the queue for a free instance, so an instance's memory is one part's. Default 1.
    /// </summary>
    public int PartsPerInstance { get; set; } = 1;

    public int EffectiveParallelism => Parallelism > 0 ? Parallelism : Environment.ProcessorCount;
}
