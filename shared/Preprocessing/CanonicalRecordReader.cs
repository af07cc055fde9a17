using System.Text;
using System.Text.Json;

namespace Pipeline.Preprocessing;

/// <summary>
/// Reads one canonical record line. The lines ingestion writes (<c>text</c>/<c>prompt</c>/<c>completion</c>
/// strings, a <c>label</c>, a <c>line</c> number) are read with one <see cref="Utf8JsonReader"/> pass
/// into a reused record; anything else (chat messages, another spelling of a name, a value of another
/// kind, a repeated name) goes to the source-generated serializer, so the result is always the one
/// <see cref="JsonSerializer"/> gives. Not thread-safe: one reader per worker.
/// </summary>
public sealed class CanonicalRecordReader
{
    private readonly CanonicalRecord _record = new();
    private string? _lastLabel;

    /// <summary>The record on <paramref name="line"/>; the returned instance is reused by the next call unless it came from the serializer.</summary>
    public CanonicalRecord Read(ReadOnlySpan<byte> line) =>
        TryReadCompact(line) || TryReadFlat(line) ? _record : JsonSerializer.Deserialize(line, PreprocessJson.Default.CanonicalRecord)!;

    /// <summary>
    /// The lines exactly as ingestion writes them, scanned by hand: compact, strings without escapes, integer
    /// numbers, known names once each. Anything else returns false before the record is used, and goes to
    /// <see cref="TryReadFlat"/>; where both accept a line they give the same record.
    /// </summary>
    private bool TryReadCompact(ReadOnlySpan<byte> line)
    {
        var record = Cleared();
        if (line.Length < 2 || line[0] != (byte)'{' || line[^1] != (byte)'}')
        {
            return false;
        }

        var seen = 0;
        var at = 1;
        while (true)
        {
            // "name":
            if (line[at] != (byte)'"')
            {
                return false;
            }

            var nameLength = line[(at + 1)..].IndexOf((byte)'"');
            if (nameLength < 0 || at + nameLength + 2 >= line.Length || line[at + nameLength + 2] != (byte)':')
            {
                return false;
            }

            var field = FieldOf(line.Slice(at + 1, nameLength));
            if (field == 0 || (seen & field) != 0)
            {
                return false;
            }

            seen |= field;
            at += nameLength + 3;
            var rest = line[at..^1];
            int length;
            if (rest.IsEmpty)
            {
                return false;
            }

            if (rest[0] == (byte)'"')
            {
                // A string with no escape, no control character and valid UTF-8 is its bytes.
                length = rest[1..].IndexOfAny((byte)'"', (byte)'\\');
                if (length < 0 || rest[1 + length] != (byte)'"')
                {
                    return false;
                }

                var bytes = rest.Slice(1, length);
                if (bytes.IndexOfAnyInRange((byte)0, (byte)0x1F) >= 0 || !System.Text.Unicode.Utf8.IsValid(bytes))
                {
                    return false;
                }

                switch (field)
                {
                    case 1:
                        record.Text = Encoding.UTF8.GetString(bytes);
                        break;
                    case 2:
                        record.Label = LabelOf(bytes, Encoding.UTF8);
                        break;
                    case 8:
                        record.Prompt = Encoding.UTF8.GetString(bytes);
                        break;
                    case 16:
                        record.Completion = Encoding.UTF8.GetString(bytes);
                        break;
                    default:
                        return false;
                }

                length += 2;
            }
            else
            {
                // An integer: -?(0|[1-9][0-9]*), at most 18 digits.
                var negative = rest[0] == (byte)'-' ? 1 : 0;
                length = rest[negative..].IndexOfAnyExceptInRange((byte)'0', (byte)'9');
                length = length < 0 ? rest.Length - negative : length;
                if (length == 0 || length > 18 || (length > 1 && rest[negative] == (byte)'0'))
                {
                    return false;
                }

                var digits = rest[..(negative + length)];
                length += negative;
                if (field == 4 && negative == 0)
                {
                    record.Line = long.Parse(digits, provider: System.Globalization.CultureInfo.InvariantCulture);
                }
                else if (field == 2)
                {
                    record.Label = LabelOf(digits, Encoding.ASCII);
                }
                else
                {
                    return false;
                }
            }

            at += length;
            if (at == line.Length - 1)
            {
                return true;
            }

            if (line[at] != (byte)',')
            {
                return false;
            }

            at++;
        }
    }

    private bool TryReadFlat(ReadOnlySpan<byte> line)
    {
        var record = Cleared();
        var seen = 0;
        try
        {
            var reader = new Utf8JsonReader(line);
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
            {
                return false;
            }

            while (reader.Read())
            {
                if (reader.TokenType == JsonTokenType.EndObject)
                {
                    return !reader.Read();
                }

                // Names as ingestion writes them (no escapes); the serializer handles any other spelling.
                if (reader.TokenType != JsonTokenType.PropertyName || reader.ValueIsEscaped)
                {
                    return false;
                }

                var field = FieldOf(reader.ValueSpan);
                if (field == 0 || (seen & field) != 0 || !reader.Read())
                {
                    return false;
                }

                seen |= field;
                switch (field)
                {
                    case 4 when reader.TokenType == JsonTokenType.Number && reader.TryGetInt64(out var number):
                        record.Line = number;
                        break;
                    case 2:
                        record.Label = reader.TokenType switch
                        {
                            JsonTokenType.String or JsonTokenType.Number => Label(ref reader),
                            JsonTokenType.True => "true",
                            JsonTokenType.False => "false",
                            JsonTokenType.Null => null,
                            _ => throw new FormatException(),
                        };
                        break;
                    case 1 or 8 or 16 when reader.TokenType is JsonTokenType.String or JsonTokenType.Null:
                        var value = reader.TokenType == JsonTokenType.Null ? null : reader.GetString();
                        if (field == 1)
                        {
                            record.Text = value;
                        }
                        else if (field == 8)
                        {
                            record.Prompt = value;
                        }
                        else
                        {
                            record.Completion = value;
                        }

                        break;
                    default:
                        return false;
                }
            }

            return false;
        }
        catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
        {
            // The serializer reads it again and words the error.
            return false;
        }
    }

    /// <summary>The reused record, emptied.</summary>
    private CanonicalRecord Cleared()
    {
        var record = _record;
        record.Text = record.Label = record.Prompt = record.Completion = null;
        record.Messages = null;
        record.Line = 0;
        return record;
    }

    /// <summary>A label from bytes that need no unescaping: the previous label's string when the bytes are the same.</summary>
    private string LabelOf(ReadOnlySpan<byte> bytes, Encoding encoding) =>
        _lastLabel is { } last && Ascii.Equals(bytes, last) ? last : _lastLabel = encoding.GetString(bytes);

    /// <summary>The bit of a name the fast paths read (text 1, label 2, line 4, prompt 8, completion 16), or 0.</summary>
    private static int FieldOf(ReadOnlySpan<byte> name) => name switch
    {
        var n when n.SequenceEqual("text"u8) => 1,
        var n when n.SequenceEqual("label"u8) => 2,
        var n when n.SequenceEqual("line"u8) => 4,
        var n when n.SequenceEqual("prompt"u8) => 8,
        var n when n.SequenceEqual("completion"u8) => 16,
        _ => 0,
    };

    /// <summary>A string or number label as its name; the previous label's string is reused when the bytes are the same (a dataset has few labels).</summary>
    private string Label(ref Utf8JsonReader reader)
    {
        if (reader.TokenType != JsonTokenType.String)
        {
            // A number's text is ASCII.
            return LabelOf(reader.ValueSpan, Encoding.ASCII);
        }

        if (_lastLabel is { } last && !reader.ValueIsEscaped && Ascii.Equals(reader.ValueSpan, last))
        {
            return last;
        }

        // GetString unescapes and checks the UTF-8 as the serializer does.
        return _lastLabel = reader.GetString()!;
    }
}
