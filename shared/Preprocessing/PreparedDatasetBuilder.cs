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

        public ReadOnlySpan<byte> Line(int index) => _bytes.AsSpan(_lines[index].Offset, _lines[index].Length);

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
        public long Emails, Phones, IpAddresses;

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

    public async Task<BuildResult> BuildAsync(
        Stream records,
        DatasetManifest dataset,
        ShardSink output,
        string folder,
        Func<BuildProgress, ValueTask>? progress,
        CancellationToken cancellationToken)
    {
        var labels = LabelNames(dataset);
        var labelIds = labels.Select((name, id) => (name, id)).ToDictionary(x => x.name, x => x.id, StringComparer.Ordinal);
        var packed = recipe.Packing && labels.Count == 0 && dataset.RecordKind == RecordKinds.Text;
        var cleaner = new TextCleaner(recipe.Normalize, recipe.Redact);
        var near = recipe.Dedup.Mode == DedupModes.Near ? new NearDuplicateIndex(recipe.Dedup) : null;
        var exact = recipe.Dedup.Mode == DedupModes.Exact ? new HashSet<ulong>() : null;
        var keptExcerpts = new List<(long Line, string Excerpt)>();
        var firstByKey = new Dictionary<ulong, int>();

        var stats = new PreparedStats { Lengths = new LengthPercentiles(0, 0, 0, 0, 0, 0), Epochs = recipe.Epochs, CostPerMillionTokens = recipe.CostPerMillionTokens };
        var histogram = new long[recipe.MaxSequenceLength + 2];
        var redactions = new RedactionCounts();
        var seen = new Dictionary<int, (long Seen, long Validation)>();
        await using var train = new ShardWriter(output, folder, "train", recipe.ShardRecords, options.UploadBlockBytes);
        await using var validation = new ShardWriter(output, folder, "validation", recipe.ShardRecords, options.UploadBlockBytes);
        var packBuffers = new[] { new List<int>(), new List<int>() };
        var endOfText = tokenizers.Probe.EndOfText;

        using var reader = new LineReader(records, int.MaxValue / 4);
        // Two batches in flight: while one is committed in record order (dedup, split, shard writes), the
        // next is read and tokenized in parallel.
        var batches = new[] { new Batch(options.BatchRecords), new Batch(options.BatchRecords) };
        var current = 0;
        var commit = Task.CompletedTask;
        var done = false;
        while (!done)
        {
            var batch = batches[current];
            batch.Clear();
            while (batch.Count < options.BatchRecords)
            {
                if (!await reader.ReadLineAsync(cancellationToken))
                {
                    done = true;
                    break;
                }

                if (!reader.Line.IsEmpty)
                {
                    batch.Add(reader.Line);
                }
            }

            // Each worker rents a tokenizer of its own for the batch (the pre-tokenizer's regex must not be shared).
            Parallel.For(0, batch.Count, new ParallelOptions { MaxDegreeOfParallelism = options.EffectiveParallelism, CancellationToken = cancellationToken },
                tokenizers.Rent,
                (i, _, tokenizer) =>
                {
                    Process(batch.Line(i), batch.Results[i], tokenizer, cleaner, labelIds, near, packed);
                    return tokenizer;
                },
                tokenizers.Return);

            await commit;
            commit = Task.Run(() => CommitAsync(batch), cancellationToken);
            current ^= 1;
        }

        await commit;

        async Task CommitAsync(Batch batch)
        {
            for (var i = 0; i < batch.Count; i++)
            {
                var record = batch.Results[i];
                stats.RecordsRead++;
                redactions.Emails += record.Emails;
                redactions.Phones += record.Phones;
                redactions.IpAddresses += record.IpAddresses;
                if (!record.Kept)
                {
                    continue;
                }

                if (IsDuplicate(record, exact, near, firstByKey, keptExcerpts, stats))
                {
                    continue;
                }

                if (keptExcerpts.Count < options.DuplicateSampleSources)
                {
                    keptExcerpts.Add((record.Line, Excerpt(record.Text!)));
                }

                var toValidation = AssignToValidation(record, seen);
                var split = toValidation ? stats.Validation : stats.Train;
                split.Records++;
                if (record.Label is { } label)
                {
                    split.Labels[labels[label]] = split.Labels.GetValueOrDefault(labels[label]) + 1;
                }

                if (record.Truncated)
                {
                    stats.Truncated++;
                }

                if (packed)
                {
                    var buffer = packBuffers[toValidation ? 1 : 0];
                    buffer.AddRange(record.Tokens.Span);
                    buffer.Add(endOfText);
                    while (buffer.Count >= recipe.MaxSequenceLength)
                    {
                        await WriteBlockAsync(toValidation ? validation : train, split, buffer, recipe.MaxSequenceLength, record.Line, histogram, stats, cancellationToken);
                    }

                    continue;
                }

                split.Tokens += record.Count;
                histogram[Math.Min(record.Count, histogram.Length - 1)]++;
                await (toValidation ? validation : train).WriteAsync(record.Tokens, record.Label, record.PromptLength, record.Line, cancellationToken);
            }

            if (progress is not null)
            {
                await progress(new BuildProgress(stats.RecordsRead, stats.Train.Tokens + stats.Validation.Tokens));
            }
        }

        if (packed)
        {
            for (var s = 0; s < 2; s++)
            {
                if (packBuffers[s].Count > 0)
                {
                    await WriteBlockAsync(s == 1 ? validation : train, s == 1 ? stats.Validation : stats.Train, packBuffers[s], packBuffers[s].Count, 0, histogram, stats, cancellationToken);
                }
            }
        }

        await train.CompleteAsync(cancellationToken);
        await validation.CompleteAsync(cancellationToken);

        var kept = stats.Train.Records + stats.Validation.Records;
        stats.TruncatedFraction = kept == 0 ? 0 : Math.Round((double)stats.Truncated / kept, 6);
        stats.Redactions = new() { ["emails"] = redactions.Emails, ["phones"] = redactions.Phones, ["ipAddresses"] = redactions.IpAddresses };
        stats.IngestInvalidRecords = dataset.Counts.Invalid;
        stats.EstimatedTrainingTokens = stats.Train.Tokens * recipe.Epochs;
        stats.EstimatedCost = Math.Round(stats.EstimatedTrainingTokens / 1e6 * recipe.CostPerMillionTokens, 4);
        var finalStats = stats with { Lengths = Percentiles(histogram) };
        return new BuildResult([.. train.Shards, .. validation.Shards], finalStats, labels, packed);
    }

    private void Process(ReadOnlySpan<byte> line, Processed result, TextTokenizer tokenizer, TextCleaner cleaner, Dictionary<string, int> labelIds, NearDuplicateIndex? near, bool packed)
    {
        result.Kept = false;
        result.Signature = null;
        result.PromptLength = null;
        result.Label = null;
        result.Truncated = false;
        var counts = new RedactionCounts();
        var record = JsonSerializer.Deserialize(line, PreprocessJson.Default.CanonicalRecord)!;
        result.Line = record.Line;
        result.Text = null;
        var ids = WorkerIds.Value!;
        string rendered;
        if (record.Messages is { } messages)
        {
            rendered = RenderChat(messages, cleaner, counts);
            tokenizer.Encode(rendered, ids);
        }
        else if (record.Completion is { } completion)
        {
            var prompt = cleaner.Clean(record.Prompt ?? "", counts);
            var answer = cleaner.Clean(completion, counts);
            rendered = prompt + "\n" + answer;
            result.PromptLength = tokenizer.EncodePair(prompt, answer, ids);
        }
        else
        {
            rendered = cleaner.Clean(record.Text ?? "", counts);
            tokenizer.Encode(rendered, ids);
        }

        result.Emails = counts.Emails;
        result.Phones = counts.Phones;
        result.IpAddresses = counts.IpAddresses;
        if (rendered.Length == 0 || string.IsNullOrWhiteSpace(rendered))
        {
            return;
        }

        if (record.Label is { } label)
        {
            if (!labelIds.TryGetValue(label, out var id))
            {
                throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidRecipe, $"Record on line {record.Line} has the label '{label}', which the dataset manifest does not list (more than {LabelCounter.MaxLabels} distinct labels?).");
            }

            result.Label = id;
        }

        if (!packed)
        {
            result.Truncated = tokenizer.Truncate(ids, recipe.MaxSequenceLength);
        }

        result.SetIds(ids);
        var key = WorkerKeys.Value!;
        key.Reset();
        key.Append(MemoryMarshal.AsBytes(rendered.AsSpan()));
        key.Append("\u0001"u8);
        key.Append(MemoryMarshal.AsBytes((record.Label ?? "").AsSpan()));
        result.Key = key.GetCurrentHashAsUInt64();
        result.Signature = near?.Signature(rendered);
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

    private bool IsDuplicate(Processed record, HashSet<ulong>? exact, NearDuplicateIndex? near, Dictionary<ulong, int> firstByKey, List<(long Line, string Excerpt)> kept, PreparedStats stats)
    {
        if (exact is not null)
        {
            if (exact.Add(record.Key))
            {
                firstByKey.TryAdd(record.Key, kept.Count);
                return false;
            }

            stats.ExactDuplicatesRemoved++;
            Sample(stats, kept, firstByKey.GetValueOrDefault(record.Key, -1), record, 1.0);
            return true;
        }

        if (near is not null)
        {
            var original = near.FindOrAdd(record.Signature!, out var similarity);
            if (original < 0)
            {
                return false;
            }

            stats.NearDuplicatesRemoved++;
            Sample(stats, kept, original, record, Math.Round(similarity, 3));
            return true;
        }

        return false;
    }

    private void Sample(PreparedStats stats, List<(long Line, string Excerpt)> kept, int keptIndex, Processed removed, double similarity)
    {
        if (stats.DuplicateSamples.Count >= options.DuplicateSamples)
        {
            return;
        }

        var (line, excerpt) = keptIndex >= 0 && keptIndex < kept.Count ? kept[keptIndex] : (0L, "");
        stats.DuplicateSamples.Add(new DuplicatePair(line, removed.Line, similarity, excerpt, Excerpt(removed.Text!)));
    }

    private static string Excerpt(string text) => text.Length <= ExcerptChars ? text : text[..ExcerptChars] + "…";

    /// <summary>
    /// Deterministic, seeded split by record hash, stratified by label: within each label the validation
    /// share stays within one record of the fraction, and the hash decides inside that band.
    /// </summary>
    private bool AssignToValidation(Processed record, Dictionary<int, (long Seen, long Validation)> seen)
    {
        if (recipe.ValidationFraction == 0)
        {
            return false;
        }

        var stratum = record.Label ?? -1;
        var (n, v) = seen.GetValueOrDefault(stratum);
        var expected = recipe.ValidationFraction * (n + 1);
        Span<byte> key = stackalloc byte[sizeof(ulong)];
        BitConverter.TryWriteBytes(key, record.Key);
        var u = XxHash3.HashToUInt64(key, recipe.Seed) / (double)ulong.MaxValue;
        var toValidation = v + 1 <= Math.Floor(expected) - 1 || (v + 1 <= Math.Ceiling(expected) && u < recipe.ValidationFraction);
        seen[stratum] = (n + 1, v + (toValidation ? 1 : 0));
        return toValidation;
    }

    private static async ValueTask WriteBlockAsync(ShardWriter writer, SplitStats split, List<int> buffer, int length, long line, long[] histogram, PreparedStats stats, CancellationToken cancellationToken)
    {
        var block = buffer.GetRange(0, length).ToArray();
        buffer.RemoveRange(0, length);
        split.Tokens += block.Length;
        histogram[Math.Min(block.Length, histogram.Length - 1)]++;
        stats.PackedBlocks++;
        await writer.WriteAsync(block, null, null, line, cancellationToken);
    }

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

    private static LengthPercentiles Percentiles(long[] histogram)
    {
        var total = histogram.Sum();
        if (total == 0)
        {
            return new LengthPercentiles(0, 0, 0, 0, 0, 0);
        }

        int At(double q)
        {
            var target = (long)Math.Ceiling(q * total);
            long running = 0;
            for (var length = 0; length < histogram.Length; length++)
            {
                running += histogram[length];
                if (running >= target)
                {
                    return length;
                }
            }

            return histogram.Length - 1;
        }

        var max = Array.FindLastIndex(histogram, c => c > 0);
        var mean = histogram.Select((count, length) => (double)count * length).Sum() / total;
        return new LengthPercentiles(At(0.5), At(0.9), At(0.95), At(0.99), max, Math.Round(mean, 2));
    }
}

/// <summary>Preprocessing limits (configuration section <c>Pipeline:Preprocessing</c>).</summary>
public sealed class PreprocessingOptions
{
    public const string Section = "Pipeline:Preprocessing";

    /// <summary>Worker threads tokenizing in parallel. Default: every core.</summary>
    public int Parallelism { get; set; }
    /// <summary>Records read and tokenized per batch. Default 4,096.</summary>
    public int BatchRecords { get; set; } = 4096;
    /// <summary>Removed-duplicate pairs kept as a sample in stats.json. Default 20.</summary>
    public int DuplicateSamples { get; set; } = 20;
    /// <summary>Kept records whose excerpt is remembered for the duplicate sample. Default 100,000.</summary>
    public int DuplicateSampleSources { get; set; } = 100_000;
    /// <summary>Block size of streamed shard uploads. Default 8 MiB.</summary>
    public int UploadBlockBytes { get; set; } = 8 * 1024 * 1024;

    public int EffectiveParallelism => Parallelism > 0 ? Parallelism : Environment.ProcessorCount;
}
