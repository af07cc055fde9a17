using System.IO.Hashing;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;
using Pipeline.Ingestion;

namespace Pipeline.Inference;

/// <summary>
/// Reads the rows of an inference input as it streams in: JSONL (<c>custom_id</c> and a text field, with
/// ingestion's aliases), OpenAI's batch format (JSONL requests with <c>url</c> and <c>body</c>, recognised by
/// the first line; see <see cref="OpenAiBatchFormat"/>), CSV/TSV (a header naming the text column, or none where
/// ingestion's column rules tell the text column), or plain text (one row per line). The format is told by
/// ingestion's <see cref="FormatDetector"/>, lines are read by its bounded <see cref="LineReader"/> and CSV is split
/// by its <see cref="DelimitedRecordParser"/>. A row that cannot be scored comes back with its error code; an
/// input that has no text at all is refused before any work.
/// </summary>
public static class InferenceInput
{
    /// <summary>The default longest row (a line, or a CSV record across lines), in UTF-8 bytes: <see cref="InferenceSettings.MaxRowBytes"/>.</summary>
    public const int MaxRowBytes = 1 << 20;

    /// <summary>The input's rows in order, numbered from 0, none longer than <see cref="MaxRowBytes"/>.</summary>
    public static IAsyncEnumerable<ShardInputRow> ReadAsync(Stream stream, string blobName, InferenceOptions options, CancellationToken cancellationToken) =>
        ReadAsync(stream, blobName, options, MaxRowBytes, cancellationToken);

    /// <summary>
    /// The input's rows in order, numbered from 0. No line or record is held beyond <paramref name="maxRowBytes"/>:
    /// a longer one becomes a failed row (<see cref="RecordErrorCodes.RecordTooLarge"/>) naming its line and the
    /// limit, and reading goes on after it. A CSV record spanning lines is appended and quote-scanned once per
    /// line, so it costs its length.
    /// </summary>
    public static async IAsyncEnumerable<ShardInputRow> ReadAsync(Stream stream, string blobName, InferenceOptions options, int maxRowBytes, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        using var lines = new LineReader(stream, maxRowBytes, initialBufferBytes: FormatDetector.SniffBytes);
        var head = await lines.PeekAsync(FormatDetector.SniffBytes + 3, cancellationToken);
        var complete = head.Length < FormatDetector.SniffBytes + 3;
        if (head.Span.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF]))
        {
            lines.Skip(3);
            head = head[3..];
        }

        var input = Detect(blobName, head.Span, complete, options);
        var format = input.Format;
        List<string>? header = null;
        int textColumn = input.TextColumn, idColumn = input.IdColumn, columns = input.Columns;
        long row = 0;
        StringBuilder? pending = null;
        var quotes = new DelimitedRecordParser.QuoteScan();
        long pendingLine = 0, pendingBytes = 0;
        var first = true;
        // OpenAI's batch format: the lines each custom_id was first seen on (by its 64-bit hash, so memory stays small at millions of requests).
        Dictionary<ulong, long>? requests = null;
        while (await lines.ReadLineAsync(cancellationToken))
        {
            var line = lines.LineNumber;
            if (lines.LineTooLong)
            {
                if (first && input.HasHeader)
                {
                    throw new InferenceRejectedException(InferenceErrorCodes.UnsupportedFormat,
                        $"{blobName}: the header (line {line}) is {lines.LineBytes:N0} bytes, over the {maxRowBytes:N0} byte limit (Pipeline:Inference:MaxRowBytes).");
                }

                // The line was skipped, never held: its row (and a CSV record it continued) fails, and reading resumes after it.
                first = false;
                yield return TooLarge(row++, pending is null ? line : pendingLine, lines.LineBytes, maxRowBytes, pending is not null);
                pending = null;
                pendingLine = 0;
                pendingBytes = 0;
                quotes = new();
                continue;
            }

            if (pending is null && Utf8Text.IsBlank(lines.Line))
            {
                continue;
            }

            if (first)
            {
                first = false;
                if (input.HasHeader)
                {
                    header = DelimitedRecordParser.SplitCells(lines.Line, format);
                    textColumn = FieldNames.IndexOf(header, FieldNames.Text, options.TextField);
                    idColumn = FieldNames.IndexOf(header, FieldNames.Id, options.IdField);
                    columns = header.Count;
                    if (textColumn < 0)
                    {
                        throw NoText(blobName, header, options);
                    }

                    continue;
                }

                if (format == DataFormats.Jsonl)
                {
                    var firstLine = Encoding.UTF8.GetString(lines.Line);
                    requests = OpenAiBatchFormat.IsRequestLine(firstLine) ? [] : null;
                    if (requests is null && JsonlFieldNames(firstLine) is { } fields && FieldNames.IndexOf(fields, FieldNames.Text, options.TextField) < 0)
                    {
                        throw NoText(blobName, fields, options);
                    }
                }
            }

            if (requests is not null)
            {
                var text = Encoding.UTF8.GetString(lines.Line);
                foreach (var item in OpenAiBatchFormat.Rows(text, row, line))
                {
                    if (item.OpenAi!.Item == 0 && item.CustomId is { } id && !requests.TryAdd(XxHash64.HashToUInt64(Encoding.UTF8.GetBytes(id)), line))
                    {
                        throw new InferenceRejectedException(InferenceErrorCodes.DuplicateCustomId,
                            $"{blobName}: custom_id '{id}' on line {line} was already used on line {requests[XxHash64.HashToUInt64(Encoding.UTF8.GetBytes(id))]}; every request of a batch needs a unique custom_id.");
                    }

                    yield return item;
                    row++;
                }

                continue;
            }

            var startLine = line;
            string record;
            if (format == DataFormats.Csv)
            {
                // A quoted cell may hold line breaks: the record goes on until its quotes close. Each line is
                // appended and scanned once (the quote state carries over), so a long record costs its length.
                if (pending is null)
                {
                    pending = new StringBuilder();
                    pendingLine = line;
                }
                else
                {
                    pending.Append('\n');
                    quotes.Feed("\n"u8);
                }

                quotes.Feed(lines.Line);
                pending.Append(Encoding.UTF8.GetString(lines.Line));
                pendingBytes += lines.Line.Length + (pendingBytes == 0 ? 0 : 1);
                if (pendingBytes > maxRowBytes)
                {
                    // A quote that never closes would swallow the rest of the file: the row fails, reading resumes after it.
                    yield return new ShardInputRow { Row = row++, Line = pendingLine, Code = RecordErrorCodes.UnterminatedQuote, Error = $"The record starting on line {pendingLine} has a quoted cell not closed within {maxRowBytes:N0} bytes (Pipeline:Inference:MaxRowBytes)." };
                    pending = null;
                    pendingLine = 0;
                    pendingBytes = 0;
                    quotes = new();
                    continue;
                }

                if (quotes.Inside)
                {
                    continue;
                }

                record = pending.ToString();
                startLine = pendingLine;
                pending = null;
                pendingLine = 0;
                pendingBytes = 0;
                quotes = new();
            }
            else
            {
                record = Encoding.UTF8.GetString(lines.Line);
            }

            if (string.IsNullOrWhiteSpace(record))
            {
                continue;
            }

            yield return format switch
            {
                DataFormats.Jsonl => JsonlRow(record, row, startLine, options),
                DataFormats.Text => new ShardInputRow { Row = row, Text = record, Line = startLine },
                _ => DelimitedRow(DelimitedRecordParser.SplitCells(Encoding.UTF8.GetBytes(record), format), row, startLine, textColumn, idColumn, columns),
            };
            row++;
        }

        if (pending is not null)
        {
            yield return new ShardInputRow { Row = row, Line = pendingLine, Code = RecordErrorCodes.UnterminatedQuote, Error = $"The record starting on line {pendingLine} has a quoted cell never closed before the end of the file." };
        }
    }

    /// <summary>What ingestion's detector tells of an input: its format and, for CSV/TSV, whether a header names the columns (else which column is the text).</summary>
    private readonly record struct DetectedInput(string Format, bool HasHeader, int TextColumn, int IdColumn, int Columns);

    private static DetectedInput Detect(string blobName, ReadOnlySpan<byte> head, bool complete, InferenceOptions options)
    {
        DetectedFormat detected;
        try
        {
            if (!Utf8Text.IsBlank(head))
            {
                FormatDetector.CheckEncoding(head, head.Length);
            }

            // The record kind is the input's own business (text rows or OpenAI requests): only the format and columns are asked for.
            detected = FormatDetector.Detect(blobName, head, complete, new IngestSettings(null, RecordKinds.Text, null, null, options.TextField, null, 1, MaxRowBytes));
        }
        catch (IngestionRejectedException e) when (e.Code == RejectionCodes.UnknownFormat)
        {
            // Ingestion's column rules found no text column (a header without one, or columns it cannot tell apart).
            var first = Encoding.UTF8.GetString(FirstLine(head));
            throw new InferenceRejectedException(InferenceErrorCodes.NoTextField,
                $"{blobName} has no text column that can be told: its first row is \"{(first.Length > 200 ? first[..200] + "..." : first)}\". " +
                $"Add a header row naming the text column (one of [{string.Join(", ", FieldNames.Text)}]), or set options.textField to the column's name.");
        }
        catch (IngestionRejectedException e)
        {
            throw new InferenceRejectedException(InferenceErrorCodes.UnsupportedFormat, $"{blobName}: {e.Message}");
        }

        if (detected.Format is DataFormats.Csv or DataFormats.Tsv)
        {
            return detected.HasHeader == true
                ? new DetectedInput(detected.Format, true, -1, -1, 0)
                : new DetectedInput(detected.Format, false, Array.IndexOf(detected.Columns!, "text"), Array.IndexOf(detected.Columns!, "id"), detected.Columns!.Length);
        }

        return new DetectedInput(detected.Format, false, -1, -1, 0);
    }

    private static ReadOnlySpan<byte> FirstLine(ReadOnlySpan<byte> head)
    {
        var text = head.TrimStart("\r\n \t"u8);
        var end = text.IndexOf((byte)'\n');
        return (end < 0 ? text : text[..end]).TrimEnd((byte)'\r');
    }

    private static ShardInputRow TooLarge(long row, long line, long bytes, int maxRowBytes, bool continued) => new()
    {
        Row = row,
        Line = line,
        Code = RecordErrorCodes.RecordTooLarge,
        Error = continued
            ? $"The record starting on line {line} goes on past the {maxRowBytes:N0} byte limit (Pipeline:Inference:MaxRowBytes); the row was skipped."
            : $"Line {line} is {bytes:N0} bytes, over the {maxRowBytes:N0} byte limit (Pipeline:Inference:MaxRowBytes); the row was skipped. Shorten it or split it into rows.",
    };

    private static InferenceRejectedException NoText(string blobName, IReadOnlyList<string> fields, InferenceOptions options) =>
        new(InferenceErrorCodes.NoTextField, options.TextField is { } wanted
            ? $"{blobName} has no '{wanted}' field (options.textField); its fields are [{string.Join(", ", fields)}]."
            : $"{blobName} has no text field: its fields are [{string.Join(", ", fields)}]; name one of [{string.Join(", ", FieldNames.Text)}], or set options.textField.");

    private static List<string>? JsonlFieldNames(string line)
    {
        try
        {
            using var document = JsonDocument.Parse(line);
            return document.RootElement.ValueKind == JsonValueKind.Object ? [.. document.RootElement.EnumerateObject().Select(p => p.Name)] : null;
        }
        catch (JsonException)
        {
            return null;
        }
    }

    private static ShardInputRow JsonlRow(string text, long row, long line, InferenceOptions options)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(text);
        }
        catch (JsonException e)
        {
            return new ShardInputRow { Row = row, Line = line, Code = RecordErrorCodes.MalformedJson, Error = $"Not valid JSON: {e.Message}" };
        }

        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                return new ShardInputRow { Row = row, Line = line, Code = RecordErrorCodes.NotAnObject, Error = $"The row is a JSON {root.ValueKind.ToString().ToLowerInvariant()}, not an object." };
            }

            var names = root.EnumerateObject().Select(p => p.Name).ToList();
            var idIndex = FieldNames.IndexOf(names, FieldNames.Id, options.IdField);
            string? id = idIndex < 0 ? null : root.GetProperty(names[idIndex]) switch
            {
                { ValueKind: JsonValueKind.String } s => s.GetString(),
                { ValueKind: JsonValueKind.Number } n => n.GetRawText(),
                _ => null,
            };
            var textIndex = FieldNames.IndexOf(names, FieldNames.Text, options.TextField);
            if (textIndex < 0)
            {
                return new ShardInputRow { Row = row, CustomId = id, Line = line, Code = RowErrorCodes.TextMissing, Error = $"The row has no text field (fields: {string.Join(", ", names)})." };
            }

            var value = root.GetProperty(names[textIndex]);
            if (value.ValueKind != JsonValueKind.String)
            {
                return new ShardInputRow { Row = row, CustomId = id, Line = line, Code = RecordErrorCodes.WrongType, Error = $"'{names[textIndex]}' is a {value.ValueKind.ToString().ToLowerInvariant()}, not a string." };
            }

            var content = value.GetString()!;
            return string.IsNullOrWhiteSpace(content)
                ? new ShardInputRow { Row = row, CustomId = id, Line = line, Code = RecordErrorCodes.EmptyText, Error = $"'{names[textIndex]}' is empty." }
                : new ShardInputRow { Row = row, CustomId = id, Line = line, Text = content };
        }
    }

    private static ShardInputRow DelimitedRow(List<string> cells, long row, long line, int textColumn, int idColumn, int columns)
    {
        var id = idColumn >= 0 && idColumn < cells.Count ? cells[idColumn] : null;
        if (cells.Count != columns)
        {
            return new ShardInputRow { Row = row, CustomId = id, Line = line, Code = RecordErrorCodes.WrongColumnCount, Error = $"The row has {cells.Count} cells; the header has {columns}." };
        }

        return string.IsNullOrWhiteSpace(cells[textColumn])
            ? new ShardInputRow { Row = row, CustomId = id, Line = line, Code = RecordErrorCodes.EmptyText, Error = "The text cell is empty." }
            : new ShardInputRow { Row = row, CustomId = id, Line = line, Text = cells[textColumn] };
    }
}
