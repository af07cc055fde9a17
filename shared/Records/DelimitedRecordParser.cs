using System.Text;
using System.Text.Json;
using System.Text.Unicode;

namespace Pipeline.Ingestion;

/// <summary>
/// CSV (RFC 4180: quoted fields may hold commas, quotes as "" and line breaks) and TSV (IANA: no quoting,
/// a tab always separates) rows, mapped to text records by column role.
/// </summary>
public sealed class DelimitedRecordParser
{
    private readonly byte _separator;
    private readonly bool _quoted;
    private readonly int _textColumn;
    private readonly int _labelColumn;
    private readonly int _idColumn;
    private readonly int _columnCount;
    private readonly List<(int Start, int End, bool HasEscapedQuotes)> _cells = new(8);
    private byte[] _unquoted = new byte[4096];

    public DelimitedRecordParser(string format, string[] roles)
    {
        _separator = format == DataFormats.Csv ? (byte)',' : (byte)'\t';
        _quoted = format == DataFormats.Csv;
        _textColumn = Array.IndexOf(roles, "text");
        _labelColumn = Array.IndexOf(roles, "label");
        _idColumn = Array.IndexOf(roles, "id");
        _columnCount = roles.Length;
    }

    /// <summary>Records per label.</summary>
    public LabelCounter Labels { get; } = new(jsonEncoded: false);

    /// <summary>
    /// True when a CSV row ends inside a quoted field, so the record continues on the next line. A quote
    /// opens a field only at the field's start, so a stray inch mark (<c>5" screen</c>) never swallows lines.
    /// </summary>
    public static bool EndsInsideQuotes(ReadOnlySpan<byte> row)
    {
        var scan = new QuoteScan();
        scan.Feed(row);
        return scan.Inside;
    }

    /// <summary>
    /// <see cref="EndsInsideQuotes"/> fed piece by piece (a record read line by line, its line breaks fed too): each
    /// byte is looked at once, so a record spanning many lines costs its length, not its length squared.
    /// </summary>
    public struct QuoteScan()
    {
        private bool _inside;
        private bool _atFieldStart = true;
        private bool _pendingQuote;

        /// <summary>Whether the bytes fed so far end inside a quoted field (a quote last is taken as closing it).</summary>
        public readonly bool Inside => _inside && !_pendingQuote;

        public void Feed(ReadOnlySpan<byte> bytes)
        {
            foreach (var b in bytes)
            {
                if (_pendingQuote)
                {
                    // A quote inside a field: "" is an escaped quote, anything else means it closed the field.
                    _pendingQuote = false;
                    if (b == (byte)'"')
                    {
                        continue;
                    }

                    _inside = false;
                }

                if (_inside)
                {
                    _pendingQuote = b == (byte)'"';
                    continue;
                }

                _inside = b == (byte)'"' && _atFieldStart;
                _atFieldStart = b == (byte)',';
            }
        }
    }

    /// <summary>Splits a row into cell strings (for headers and detection).</summary>
    public static List<string> SplitCells(ReadOnlySpan<byte> row, string format)
    {
        var parser = new DelimitedRecordParser(format, ["text"]);
        parser.Split(row);
        var cells = new List<string>(parser._cells.Count);
        foreach (var cell in parser._cells)
        {
            cells.Add(Encoding.UTF8.GetString(parser.CellValue(row, cell)));
        }

        return cells;
    }

    public RecordError? Parse(ReadOnlySpan<byte> row, long lineNumber, CanonicalRecordWriter writer)
    {
        if (!Utf8.IsValid(row))
        {
            return new RecordError(lineNumber, RecordErrorCodes.InvalidUtf8, $"invalid UTF-8 at byte {Utf8Text.FirstInvalidByte(row)} of the row");
        }

        Split(row);
        if (_cells.Count != _columnCount)
        {
            var separator = _separator == (byte)',' ? "comma" : "tab";
            return new RecordError(lineNumber, RecordErrorCodes.WrongColumnCount, $"expected {_columnCount} {separator}-separated columns, found {_cells.Count}");
        }

        var text = CellValue(row, _cells[_textColumn]);
        if (Utf8Text.IsBlank(text))
        {
            return new RecordError(lineNumber, RecordErrorCodes.EmptyText, $"the text column ({_textColumn + 1}) is empty");
        }

        writer.WriteStartObject();
        writer.WriteString("text"u8, text);
        if (_labelColumn >= 0)
        {
            var label = CellValue(row, _cells[_labelColumn]).Trim((byte)' ');
            if (label.IsEmpty)
            {
                return new RecordError(lineNumber, RecordErrorCodes.MissingField, $"the label column ({_labelColumn + 1}) is empty");
            }

            writer.WriteString("label"u8, label);
            Labels.Add(label);
        }

        if (_idColumn >= 0)
        {
            writer.WriteString("id"u8, CellValue(row, _cells[_idColumn]));
        }

        return null;
    }

    private void Split(ReadOnlySpan<byte> row)
    {
        _cells.Clear();
        var position = 0;
        while (true)
        {
            if (_quoted && position < row.Length && row[position] == (byte)'"')
            {
                // Quoted field: runs to the closing quote that is not doubled.
                var i = position + 1;
                var escapedQuotes = false;
                while (i < row.Length)
                {
                    if (row[i] == (byte)'"')
                    {
                        if (i + 1 < row.Length && row[i + 1] == (byte)'"')
                        {
                            escapedQuotes = true;
                            i += 2;
                            continue;
                        }

                        break;
                    }

                    i++;
                }

                _cells.Add((position + 1, Math.Min(i, row.Length), escapedQuotes));
                var next = row[Math.Min(i + 1, row.Length)..].IndexOf(_separator);
                if (next < 0)
                {
                    return;
                }

                position = i + 1 + next + 1;
                continue;
            }

            var end = row[position..].IndexOf(_separator);
            if (end < 0)
            {
                _cells.Add((position, row.Length, false));
                return;
            }

            _cells.Add((position, position + end, false));
            position += end + 1;
        }
    }

    private ReadOnlySpan<byte> CellValue(ReadOnlySpan<byte> row, (int Start, int End, bool HasEscapedQuotes) cell)
    {
        var value = row[cell.Start..cell.End];
        if (!cell.HasEscapedQuotes)
        {
            return value;
        }

        if (_unquoted.Length < value.Length)
        {
            _unquoted = new byte[value.Length * 2];
        }

        var length = 0;
        for (var i = 0; i < value.Length; i++)
        {
            _unquoted[length++] = value[i];
            if (value[i] == (byte)'"' && i + 1 < value.Length && value[i + 1] == (byte)'"')
            {
                i++;
            }
        }

        return _unquoted.AsSpan(0, length);
    }
}
