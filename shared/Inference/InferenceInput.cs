using System.IO.Hashing;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;
using Pipeline.Ingestion;

namespace Pipeline.Inference;

/// <summary>
/// Reads the rows of an inference input as it streams in: JSONL (<c>custom_id</c> and a text field, with
/// ingestion's aliases), OpenAI's batch format (JSONL requests with <c>url</c> and <c>body</c>, recognised by
/// the first line; see <see cref="OpenAiBatchFormat"/>), CSV/TSV with a header, or plain text (one row per line). A row that cannot be
/// scored comes back with its error code; an input that has no text at all is refused before any work.
/// </summary>
public static class InferenceInput
{
    /// <summary>The longest row (a CSV record spanning lines included), in characters.</summary>
    public const int MaxRowChars = 1 << 20;

    public static string FormatOf(string blobName, string firstLine)
    {
        var extension = Path.GetExtension(blobName).ToLowerInvariant();
        return extension switch
        {
            ".jsonl" or ".ndjson" or ".json" => DataFormats.Jsonl,
            ".csv" => DataFormats.Csv,
            ".tsv" or ".tab" => DataFormats.Tsv,
            ".txt" or ".text" => DataFormats.Text,
            _ when firstLine.TrimStart().StartsWith('{') => DataFormats.Jsonl,
            _ when firstLine.Contains('\t') => DataFormats.Tsv,
            _ => throw new InferenceRejectedException(InferenceErrorCodes.UnsupportedFormat,
                $"Cannot tell the format of {blobName}: use a .jsonl, .csv, .tsv or .txt name (JSONL rows are objects with custom_id and text)."),
        };
    }

    /// <summary>The input's rows in order, numbered from 0.</summary>
    public static async IAsyncEnumerable<ShardInputRow> ReadAsync(Stream stream, string blobName, InferenceOptions options, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        using var reader = new StreamReader(stream, Encoding.UTF8, detectEncodingFromByteOrderMarks: true, bufferSize: 1 << 16);
        string? format = null;
        List<string>? header = null;
        int textColumn = -1, idColumn = -1;
        long row = 0, line = 0;
        string? pending = null;
        long pendingLine = 0;
        // OpenAI's batch format: the lines each custom_id was first seen on (by its 64-bit hash, so memory stays small at millions of requests).
        Dictionary<ulong, long>? requests = null;
        while (await reader.ReadLineAsync(cancellationToken) is { } text)
        {
            line++;
            if (format is null)
            {
                if (string.IsNullOrWhiteSpace(text))
                {
                    continue;
                }

                format = FormatOf(blobName, text);
                if (format is DataFormats.Csv or DataFormats.Tsv)
                {
                    header = DelimitedRecordParser.SplitCells(Encoding.UTF8.GetBytes(text), format);
                    textColumn = FieldNames.IndexOf(header, FieldNames.Text, options.TextField);
                    idColumn = FieldNames.IndexOf(header, FieldNames.Id, options.IdField);
                    if (textColumn < 0)
                    {
                        throw NoText(blobName, header, options);
                    }

                    continue;
                }

                requests = format == DataFormats.Jsonl && OpenAiBatchFormat.IsRequestLine(text) ? [] : null;
                if (requests is null && format == DataFormats.Jsonl && JsonlFieldNames(text) is { } fields && FieldNames.IndexOf(fields, FieldNames.Text, options.TextField) < 0)
                {
                    throw NoText(blobName, fields, options);
                }
            }

            if (requests is not null)
            {
                if (string.IsNullOrWhiteSpace(text))
                {
                    continue;
                }

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

            if (format == DataFormats.Csv)
            {
                // A quoted cell may hold line breaks: the record goes on until its quotes close.
                pending = pending is null ? text : pending + "\n" + text;
                pendingLine = pendingLine == 0 ? line : pendingLine;
                if (pending.Length > MaxRowChars)
                {
                    // A quote that never closes would swallow the rest of the file: the row fails, reading resumes after it.
                    yield return new ShardInputRow { Row = row++, Line = pendingLine, Code = RecordErrorCodes.UnterminatedQuote, Error = $"The row's quoted cell is not closed within {MaxRowChars:N0} characters." };
                    pending = null;
                    pendingLine = 0;
                    continue;
                }

                if (DelimitedRecordParser.EndsInsideQuotes(Encoding.UTF8.GetBytes(pending)))
                {
                    continue;
                }

                text = pending;
                pending = null;
            }

            var startLine = format == DataFormats.Csv ? pendingLine : line;
            pendingLine = 0;
            if (string.IsNullOrWhiteSpace(text))
            {
                continue;
            }

            yield return format switch
            {
                DataFormats.Jsonl => JsonlRow(text, row, startLine, options),
                DataFormats.Text => new ShardInputRow { Row = row, Text = text, Line = startLine },
                _ => DelimitedRow(DelimitedRecordParser.SplitCells(Encoding.UTF8.GetBytes(text), format!), row, startLine, textColumn, idColumn, header!.Count),
            };
            row++;
        }

        if (pending is not null)
        {
            yield return new ShardInputRow { Row = row, Line = pendingLine, Code = RecordErrorCodes.UnterminatedQuote, Error = "The row's quoted cell is never closed before the end of the file." };
        }
    }

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
