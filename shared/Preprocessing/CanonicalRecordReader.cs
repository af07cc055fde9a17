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
        TryReadFlat(line) ? _record : JsonSerializer.Deserialize(line, PreprocessJson.Default.CanonicalRecord)!;

    private bool TryReadFlat(ReadOnlySpan<byte> line)
    {
        var record = _record;
        record.Text = record.Label = record.Prompt = record.Completion = null;
        record.Messages = null;
        record.Line = 0;
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

                var field = reader.ValueSpan switch
                {
                    var n when n.SequenceEqual("text"u8) => 1,
                    var n when n.SequenceEqual("label"u8) => 2,
                    var n when n.SequenceEqual("line"u8) => 4,
                    var n when n.SequenceEqual("prompt"u8) => 8,
                    var n when n.SequenceEqual("completion"u8) => 16,
                    _ => 0,
                };
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

    /// <summary>A string or number label as its name; the previous label's string is reused when the bytes are the same (a dataset has few labels).</summary>
    private string Label(ref Utf8JsonReader reader)
    {
        if (_lastLabel is { } last && !reader.ValueIsEscaped && Ascii.Equals(reader.ValueSpan, last))
        {
            return last;
        }

        // GetString checks the UTF-8 as the serializer does; a number's text is ASCII.
        return _lastLabel = reader.TokenType == JsonTokenType.String ? reader.GetString()! : Encoding.ASCII.GetString(reader.ValueSpan);
    }
}
