namespace Pipeline.Ingestion;

/// <summary>What <see cref="FormatDetector"/> decided, and why.</summary>
public sealed record DetectedFormat(string Format, string Reason, string RecordKind, bool? HasHeader = null, string[]? Columns = null);

/// <summary>
/// Decides format, record kind and column roles from the run spec, the blob name and the first bytes.
/// Detection is automatic only where it is unambiguous; otherwise the rejection says which run spec field fixes it.
/// </summary>
public static class FormatDetector
{
    public const int SniffBytes = 64 * 1024;

    /// <summary>Rejects files that are not UTF-8 text at all: empty, UTF-16/32, compressed or binary.</summary>
    public static void CheckEncoding(ReadOnlySpan<byte> head, long totalBytes)
    {
        if (totalBytes == 0)
        {
            throw new IngestionRejectedException(RejectionCodes.EmptyFile, "The file is empty (0 bytes). Upload a file with at least one record.");
        }

        if (head.StartsWith((ReadOnlySpan<byte>)[0xFF, 0xFE]) || head.StartsWith((ReadOnlySpan<byte>)[0xFE, 0xFF]) || LooksLikeUtf16(head))
        {
            throw new IngestionRejectedException(RejectionCodes.Utf16File, "The file is UTF-16 encoded. Save it as UTF-8 (without BOM) and upload it again.");
        }

        if (head.StartsWith((ReadOnlySpan<byte>)[0x1F, 0x8B]) || head.StartsWith("PK\u0003\u0004"u8))
        {
            throw new IngestionRejectedException(RejectionCodes.BinaryFile, "The file is compressed (gzip or zip). Upload the uncompressed text file.");
        }

        if (head.IndexOf((byte)0) >= 0)
        {
            throw new IngestionRejectedException(RejectionCodes.BinaryFile, "The file is binary (it contains NUL bytes), not text. Upload JSONL, CSV, TSV or plain text in UTF-8.");
        }

        if (Utf8Text.IsBlank(head) && head.Length == totalBytes)
        {
            throw new IngestionRejectedException(RejectionCodes.EmptyFile, "The file holds only white space. Upload a file with at least one record.");
        }
    }

    private static bool LooksLikeUtf16(ReadOnlySpan<byte> head)
    {
        // ASCII text in UTF-16 without a BOM: every other byte is zero.
        var sample = head[..Math.Min(head.Length, 512)];
        if (sample.Length < 4)
        {
            return false;
        }

        int evenZeros = 0, oddZeros = 0;
        for (var i = 0; i < sample.Length; i++)
        {
            if (sample[i] == 0)
            {
                if (i % 2 == 0)
                {
                    evenZeros++;
                }
                else
                {
                    oddZeros++;
                }
            }
        }

        var half = sample.Length / 2;
        return evenZeros > half * 0.7 || oddZeros > half * 0.7;
    }

    public static DetectedFormat Detect(string blobName, ReadOnlySpan<byte> head, bool complete, IngestSettings settings)
    {
        var lines = SampleLines(head, complete);
        var (format, reason) = settings.Format is { } chosen
            ? (chosen, "run spec")
            : DetectFormat(blobName, head, lines);
        return format switch
        {
            DataFormats.Jsonl => new DetectedFormat(format, reason, settings.RecordKind ?? DetectRecordKind(head, lines, settings)),
            DataFormats.Csv or DataFormats.Tsv => DetectColumns(format, reason, lines, settings),
            DataFormats.Text => new DetectedFormat(format, reason, RecordKinds.Text),
            _ => throw new IngestionRejectedException(RejectionCodes.UnknownFormat, $"Unknown format '{format}'."),
        };
    }

    private static (string Format, string Reason) DetectFormat(string blobName, ReadOnlySpan<byte> head, List<byte[]> lines)
    {
        var extension = Path.GetExtension(blobName).ToLowerInvariant();
        switch (extension)
        {
            case ".jsonl" or ".ndjson" or ".json":
                return (DataFormats.Jsonl, $"extension {extension}");
            case ".csv":
                return (DataFormats.Csv, "extension .csv");
            case ".tsv" or ".tab":
                return (DataFormats.Tsv, $"extension {extension}");
            case ".md" or ".markdown":
                return (DataFormats.Text, $"extension {extension}");
            case ".txt":
                return ConsistentSeparators(lines, (byte)'\t') ? (DataFormats.Tsv, "extension .txt with the same number of tabs on every line") : (DataFormats.Text, "extension .txt");
        }

        var first = FirstNonSpace(head);
        if (first == (byte)'{')
        {
            return (DataFormats.Jsonl, "content starts with '{'");
        }

        if (ConsistentSeparators(lines, (byte)'\t'))
        {
            return (DataFormats.Tsv, "the same number of tabs on every line");
        }

        if (ConsistentSeparators(lines, (byte)','))
        {
            return (DataFormats.Csv, "the same number of commas on every line");
        }

        return (DataFormats.Text, "no structure found: plain text");
    }

    private static string DetectRecordKind(ReadOnlySpan<byte> head, List<byte[]> lines, IngestSettings settings)
    {
        if (FirstNonSpace(head) == (byte)'[')
        {
            throw new IngestionRejectedException(RejectionCodes.UnknownFormat,
                "The file is a JSON array, not JSON Lines. Write one JSON object per line (JSONL) and upload it again.");
        }

        foreach (var line in lines)
        {
            if (Utf8Text.IsBlank(line))
            {
                continue;
            }

            var names = JsonlRecordParser.FieldNamesOf(line);
            if (names is null)
            {
                continue;
            }

            if (names.Contains(FieldNames.Messages))
            {
                return RecordKinds.Chat;
            }

            if (names.Contains(FieldNames.Prompt) && names.Contains(FieldNames.Completion))
            {
                return RecordKinds.PromptCompletion;
            }

            if (FieldNames.IndexOf(names, FieldNames.Text, settings.TextField) >= 0)
            {
                return RecordKinds.Text;
            }

            throw new IngestionRejectedException(RejectionCodes.UnknownFormat,
                $"Cannot tell what the records hold: the first record has the fields [{string.Join(", ", names)}]. " +
                $"Expected 'messages' (chat), 'prompt' and 'completion', or a text field ({string.Join(", ", FieldNames.Text)}). " +
                "Rename the field, or set ingest.textField in the run spec.");
        }

        // No record parsed in the sample: validation will say why, line by line.
        return RecordKinds.Text;
    }

    private static DetectedFormat DetectColumns(string format, string reason, List<byte[]> lines, IngestSettings settings)
    {
        var rows = lines.Where(l => !Utf8Text.IsBlank(l)).Select(l => DelimitedRecordParser.SplitCells(l, format)).ToList();
        if (rows.Count == 0)
        {
            return new DetectedFormat(format, reason, RecordKinds.Text, false, settings.Columns ?? ["text"]);
        }

        var first = rows[0];
        var textByName = FieldNames.IndexOf(first, FieldNames.Text, settings.TextField);
        var hasHeader = settings.HasHeader ?? (settings.Columns is null && (textByName >= 0 || FieldNames.IndexOf(first, FieldNames.Label, settings.LabelField) >= 0));
        if (hasHeader)
        {
            if (textByName < 0)
            {
                throw new IngestionRejectedException(RejectionCodes.UnknownFormat,
                    $"The header row has the columns [{string.Join(", ", first)}] and none of them is a text column ({string.Join(", ", FieldNames.Text)}). " +
                    "Rename the column, or set ingest.textField in the run spec.");
            }

            var roles = Enumerable.Repeat("ignore", first.Count).ToArray();
            roles[textByName] = "text";
            var label = FieldNames.IndexOf(first, FieldNames.Label, settings.LabelField);
            if (label >= 0 && label != textByName)
            {
                roles[label] = "label";
            }

            var id = FieldNames.IndexOf(first, FieldNames.Id, null);
            if (id >= 0 && roles[id] == "ignore")
            {
                roles[id] = "id";
            }

            return new DetectedFormat(format, reason, RecordKinds.Text, true, roles);
        }

        if (settings.Columns is { } columns)
        {
            return new DetectedFormat(format, reason, RecordKinds.Text, false, columns);
        }

        var count = first.Count;
        if (count == 1)
        {
            return new DetectedFormat(format, reason, RecordKinds.Text, false, ["text"]);
        }

        if (count == 2)
        {
            var sample = rows.Where(r => r.Count == 2).ToList();
            if (LooksLikeLabels(sample, 1) && !LooksLikeLabels(sample, 0))
            {
                return new DetectedFormat(format, reason, RecordKinds.Text, false, ["text", "label"]);
            }

            if (LooksLikeLabels(sample, 0) && !LooksLikeLabels(sample, 1))
            {
                return new DetectedFormat(format, reason, RecordKinds.Text, false, ["label", "text"]);
            }
        }

        throw new IngestionRejectedException(RejectionCodes.UnknownFormat,
            $"Cannot tell which of the {count} columns holds the text. Add a header row (for example: text{(format == DataFormats.Csv ? "," : "\\t")}label), " +
            "or set ingest.columns in the run spec, for example [\"text\", \"label\"].");
    }

    /// <summary>A label column: short values from a small set.</summary>
    private static bool LooksLikeLabels(List<List<string>> rows, int column)
    {
        if (rows.Count == 0)
        {
            return false;
        }

        var values = rows.Select(r => r[column].Trim()).ToList();
        var distinct = values.Distinct().Count();
        return values.All(v => v.Length is > 0 and <= 32) && (distinct <= Math.Max(2, rows.Count / 5) || distinct <= 20 && rows.Count >= 100);
    }

    /// <summary>Most lines (at least 90%) carry the same, non-zero number of separators: a stray malformed line does not change the format.</summary>
    private static bool ConsistentSeparators(List<byte[]> lines, byte separator)
    {
        var counts = new Dictionary<int, int>();
        var total = 0;
        foreach (var line in lines)
        {
            if (Utf8Text.IsBlank(line))
            {
                continue;
            }

            var n = line.AsSpan().Count(separator);
            counts[n] = counts.GetValueOrDefault(n) + 1;
            total++;
        }

        if (total == 0)
        {
            return false;
        }

        var (common, occurrences) = counts.MaxBy(c => c.Value);
        return common > 0 && occurrences >= Math.Ceiling(total * 0.9);
    }

    private static byte FirstNonSpace(ReadOnlySpan<byte> head)
    {
        foreach (var b in head)
        {
            if (b is not ((byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n'))
            {
                return b;
            }
        }

        return 0;
    }

    /// <summary>Complete lines of the sample (the last one only when the sample is the whole file).</summary>
    private static List<byte[]> SampleLines(ReadOnlySpan<byte> head, bool complete)
    {
        var lines = new List<byte[]>();
        while (!head.IsEmpty && lines.Count < 200)
        {
            var newline = head.IndexOf((byte)'\n');
            if (newline < 0)
            {
                if (complete)
                {
                    lines.Add(head.TrimEnd((byte)'\r').ToArray());
                }

                break;
            }

            lines.Add(head[..newline].TrimEnd((byte)'\r').ToArray());
            head = head[(newline + 1)..];
        }

        return lines;
    }
}
