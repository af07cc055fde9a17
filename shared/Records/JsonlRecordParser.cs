using System.Text;
using System.Text.Json;
using System.Text.Unicode;

namespace Pipeline.Ingestion;

/// <summary>
/// Validates one JSON Lines record and writes its canonical form. Works on the line's bytes: string
/// values are copied through in their original (valid) JSON escaping, so the hot path allocates nothing
/// per record. A flat object (string values without escapes, numbers, true, false, null: the shape of
/// almost every record) is read by a one-pass scanner of its own; anything else (nesting, escapes,
/// anything the scanner does not accept) goes to <see cref="Utf8JsonReader"/>, which also words every
/// error, so the two paths give the same fields for the same line.
/// </summary>
public sealed class JsonlRecordParser
{
    private readonly string _kind;
    private readonly byte[] _textName;
    private readonly byte[]? _labelName;
    private readonly bool _anyTextAlias;
    private readonly List<Field> _fields = new(16);
    private readonly List<(Range Role, Range Content, Range? Name)> _messages = new(8);
    private byte[] _scratch = new byte[4096];

    private readonly bool _flatScanner;

    public JsonlRecordParser(string kind, string? textField, string? labelField)
        : this(kind, textField, labelField, flatScanner: true)
    {
    }

    /// <summary><paramref name="flatScanner"/> false reads every line with <see cref="Utf8JsonReader"/> (the tests compare the two paths).</summary>
    internal JsonlRecordParser(string kind, string? textField, string? labelField, bool flatScanner)
    {
        _flatScanner = flatScanner;
        _kind = kind;
        _textName = Encoding.UTF8.GetBytes(textField ?? "text");
        _anyTextAlias = textField is null;
        _labelName = labelField is null ? null : Encoding.UTF8.GetBytes(labelField);
    }

    /// <summary>Type of the first label seen (<c>string</c>, <c>number</c>, <c>boolean</c>); later labels must match.</summary>
    public string? LabelType { get; private set; }

    /// <summary>Records per label.</summary>
    public LabelCounter Labels { get; } = new(jsonEncoded: true);

    private readonly record struct Field(int NameStart, int NameLength, JsonTokenType Type, int ValueStart, int ValueEnd, bool Escaped);

    /// <summary>Writes the canonical record to <paramref name="writer"/>, or returns why it is invalid.</summary>
    public RecordError? Parse(ReadOnlySpan<byte> line, long lineNumber, CanonicalRecordWriter writer)
    {
        if (!Utf8.IsValid(line))
        {
            return new RecordError(lineNumber, RecordErrorCodes.InvalidUtf8, $"invalid UTF-8 at byte {Utf8Text.FirstInvalidByte(line)} of the line");
        }

        if (!(_flatScanner && ScanFlatObject(line, _fields)) && !ReadFields(line, lineNumber, out var error))
        {
            return error;
        }

        return _kind switch
        {
            RecordKinds.Chat => WriteChat(line, lineNumber, writer),
            RecordKinds.PromptCompletion => WritePromptCompletion(line, lineNumber, writer),
            _ => WriteText(line, lineNumber, writer),
        };
    }

    /// <summary>The top-level field names of a record (used to detect the record kind).</summary>
    public static List<string>? FieldNamesOf(ReadOnlySpan<byte> line)
    {
        try
        {
            var reader = new Utf8JsonReader(line);
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
            {
                return null;
            }

            var names = new List<string>();
            while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
            {
                names.Add(reader.GetString()!);
                reader.Read();
                reader.Skip();
            }

            return names;
        }
        catch (JsonException)
        {
            return null;
        }
    }

    private bool ReadFields(ReadOnlySpan<byte> line, long lineNumber, out RecordError? error)
    {
        _fields.Clear();
        error = null;
        try
        {
            var reader = new Utf8JsonReader(line, new JsonReaderOptions { MaxDepth = 64 });
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
            {
                error = new RecordError(lineNumber, RecordErrorCodes.NotAnObject, "each line must be one JSON object ({...})");
                return false;
            }

            while (reader.Read())
            {
                if (reader.TokenType == JsonTokenType.EndObject)
                {
                    break;
                }

                var nameStart = (int)reader.TokenStartIndex + 1;
                var nameLength = reader.ValueSpan.Length;
                reader.Read();
                var type = reader.TokenType;
                var valueStart = (int)reader.TokenStartIndex;
                var escaped = reader.ValueIsEscaped;
                if (type is JsonTokenType.StartObject or JsonTokenType.StartArray)
                {
                    reader.Skip();
                }

                _fields.Add(new Field(nameStart, nameLength, type, valueStart, (int)reader.BytesConsumed, escaped));
            }

            // Anything after the object other than whitespace is malformed.
            if (reader.Read())
            {
                error = new RecordError(lineNumber, RecordErrorCodes.MalformedJson, "unexpected content after the JSON object");
                return false;
            }

            return true;
        }
        catch (JsonException e)
        {
            error = new RecordError(lineNumber, RecordErrorCodes.MalformedJson, $"malformed JSON: {e.Message}");
            return false;
        }
    }

    /// <summary>
    /// Reads the members of a one-level object whose values are strings without escapes, numbers, true,
    /// false or null into <paramref name="fields"/>, as <see cref="ReadFields"/> would, in one pass over
    /// the bytes. Returns false, leaving the line to <see cref="ReadFields"/>, on anything else: a
    /// backslash anywhere, a nested value, or anything JSON does not allow (a control character in a
    /// string, a number outside the grammar, a trailing comma, content after the object).
    /// </summary>
    private static bool ScanFlatObject(ReadOnlySpan<byte> line, List<Field> fields)
    {
        fields.Clear();
        if (line.IndexOf((byte)'\\') >= 0)
        {
            return false;
        }

        var i = SkipWhiteSpace(line, 0);
        if (i >= line.Length || line[i] != (byte)'{')
        {
            return false;
        }

        i = SkipWhiteSpace(line, i + 1);
        if (i < line.Length && line[i] == (byte)'}')
        {
            return SkipWhiteSpace(line, i + 1) == line.Length;
        }

        while (true)
        {
            if (i >= line.Length || line[i] != (byte)'"')
            {
                return false;
            }

            var nameStart = i + 1;
            var nameEnd = StringEnd(line, nameStart);
            if (nameEnd < 0)
            {
                return false;
            }

            i = SkipWhiteSpace(line, nameEnd + 1);
            if (i >= line.Length || line[i] != (byte)':')
            {
                return false;
            }

            i = SkipWhiteSpace(line, i + 1);
            if (i >= line.Length)
            {
                return false;
            }

            var valueStart = i;
            JsonTokenType type;
            switch (line[i])
            {
                case (byte)'"':
                    i = StringEnd(line, i + 1) + 1;
                    type = JsonTokenType.String;
                    break;
                case (byte)'t':
                    i = line[i..].StartsWith("true"u8) ? i + 4 : 0;
                    type = JsonTokenType.True;
                    break;
                case (byte)'f':
                    i = line[i..].StartsWith("false"u8) ? i + 5 : 0;
                    type = JsonTokenType.False;
                    break;
                case (byte)'n':
                    i = line[i..].StartsWith("null"u8) ? i + 4 : 0;
                    type = JsonTokenType.Null;
                    break;
                default:
                    i = NumberEnd(line, i);
                    type = JsonTokenType.Number;
                    break;
            }

            if (i <= valueStart)
            {
                return false;
            }

            fields.Add(new Field(nameStart, nameEnd - nameStart, type, valueStart, i, Escaped: false));
            i = SkipWhiteSpace(line, i);
            if (i >= line.Length)
            {
                return false;
            }

            if (line[i] == (byte)'}')
            {
                return SkipWhiteSpace(line, i + 1) == line.Length;
            }

            if (line[i] != (byte)',')
            {
                return false;
            }

            i = SkipWhiteSpace(line, i + 1);
        }
    }

    private static int SkipWhiteSpace(ReadOnlySpan<byte> line, int i)
    {
        while (i < line.Length && line[i] is (byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n')
        {
            i++;
        }

        return i;
    }

    /// <summary>The index of the quote that closes a string starting at <paramref name="start"/> (the line has no backslash), or -1 when there is none or a control character comes first.</summary>
    private static int StringEnd(ReadOnlySpan<byte> line, int start)
    {
        var length = line[start..].IndexOf((byte)'"');
        return length < 0 || line.Slice(start, length).IndexOfAnyInRange((byte)0, (byte)0x1F) >= 0 ? -1 : start + length;
    }

    /// <summary>The end of the JSON number starting at <paramref name="i"/> (-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?), or -1 when none starts there.</summary>
    private static int NumberEnd(ReadOnlySpan<byte> line, int i)
    {
        if (i < line.Length && line[i] == (byte)'-')
        {
            i++;
        }

        if (i >= line.Length || !char.IsAsciiDigit((char)line[i]))
        {
            return -1;
        }

        i = line[i] == (byte)'0' ? i + 1 : Digits(line, i);
        if (i < line.Length && line[i] == (byte)'.')
        {
            i = Digits(line, i + 1);
        }

        if (i > 0 && i < line.Length && line[i] is (byte)'e' or (byte)'E')
        {
            i++;
            if (i < line.Length && line[i] is (byte)'+' or (byte)'-')
            {
                i++;
            }

            i = Digits(line, i);
        }

        return i;
    }

    /// <summary>The end of the run of digits at <paramref name="i"/>, or -1 when none is there.</summary>
    private static int Digits(ReadOnlySpan<byte> line, int i)
    {
        var start = i;
        while (i < line.Length && char.IsAsciiDigit((char)line[i]))
        {
            i++;
        }

        return i > start ? i : -1;
    }

    private int Find(ReadOnlySpan<byte> line, ReadOnlySpan<byte> name)
    {
        for (var i = 0; i < _fields.Count; i++)
        {
            var f = _fields[i];
            if (line.Slice(f.NameStart, f.NameLength).SequenceEqual(name))
            {
                return i;
            }
        }

        return -1;
    }

    private static readonly byte[][] TextAliases = Utf8All(FieldNames.Text);
    private static readonly byte[][] LabelAliases = Utf8All(FieldNames.Label);
    private static readonly byte[][] IdAliases = Utf8All(FieldNames.Id);
    private static readonly byte[][] Roles = Utf8All(FieldNames.ChatRoles);

    private static byte[][] Utf8All(string[] names) => [.. names.Select(Encoding.UTF8.GetBytes)];

    private int FindAny(ReadOnlySpan<byte> line, byte[][] aliases)
    {
        foreach (var alias in aliases)
        {
            var index = Find(line, alias);
            if (index >= 0)
            {
                return index;
            }
        }

        return -1;
    }

    private RecordError? WriteText(ReadOnlySpan<byte> line, long lineNumber, CanonicalRecordWriter writer)
    {
        var textIndex = _anyTextAlias ? FindAny(line, TextAliases) : Find(line, _textName);
        if (textIndex < 0)
        {
            var expected = _anyTextAlias ? "a text field (" + string.Join(", ", FieldNames.Text) + ")" : $"the field '{Encoding.UTF8.GetString(_textName)}'";
            return new RecordError(lineNumber, RecordErrorCodes.MissingField, $"missing {expected}");
        }

        var text = _fields[textIndex];
        if (text.Type != JsonTokenType.String)
        {
            return new RecordError(lineNumber, RecordErrorCodes.WrongType, $"'{Name(line, text)}' must be a string, found {Describe(text.Type)}");
        }

        if (IsBlank(line, text))
        {
            return new RecordError(lineNumber, RecordErrorCodes.EmptyText, $"'{Name(line, text)}' is empty");
        }

        var labelIndex = _labelName is null ? FindAny(line, LabelAliases) : Find(line, _labelName);
        string? labelType = null;
        if (labelIndex >= 0)
        {
            var label = _fields[labelIndex];
            labelType = label.Type switch
            {
                JsonTokenType.String => "string",
                JsonTokenType.Number => "number",
                JsonTokenType.True or JsonTokenType.False => "boolean",
                JsonTokenType.Null => null,
                _ => "invalid",
            };
            if (labelType == "invalid")
            {
                return new RecordError(lineNumber, RecordErrorCodes.WrongType, $"'{Name(line, label)}' must be a string, number or boolean, found {Describe(label.Type)}");
            }

            if (labelType is not null && LabelType is not null && labelType != LabelType)
            {
                return new RecordError(lineNumber, RecordErrorCodes.InconsistentLabelType, $"'{Name(line, label)}' is a {labelType}, but earlier records have {LabelType} labels");
            }
        }

        writer.WriteStartObject();
        WriteRaw(writer, "text"u8, line, text);
        if (labelType is not null)
        {
            var label = _fields[labelIndex];
            WriteRaw(writer, "label"u8, line, label);
            LabelType ??= labelType;
            Labels.Add(Raw(line, label));
        }

        WriteId(line, writer);
        return null;
    }

    private RecordError? WritePromptCompletion(ReadOnlySpan<byte> line, long lineNumber, CanonicalRecordWriter writer)
    {
        var prompt = Find(line, "prompt"u8);
        var completion = Find(line, "completion"u8);
        if (prompt < 0 || completion < 0)
        {
            return new RecordError(lineNumber, RecordErrorCodes.MissingField, prompt < 0 ? "missing the field 'prompt'" : "missing the field 'completion'");
        }

        foreach (var index in (ReadOnlySpan<int>)[prompt, completion])
        {
            if (_fields[index].Type != JsonTokenType.String)
            {
                return new RecordError(lineNumber, RecordErrorCodes.WrongType, $"'{Name(line, _fields[index])}' must be a string, found {Describe(_fields[index].Type)}");
            }
        }

        if (IsBlank(line, _fields[completion]))
        {
            return new RecordError(lineNumber, RecordErrorCodes.EmptyText, "'completion' is empty");
        }

        writer.WriteStartObject();
        WriteRaw(writer, "prompt"u8, line, _fields[prompt]);
        WriteRaw(writer, "completion"u8, line, _fields[completion]);
        WriteId(line, writer);
        return null;
    }

    private RecordError? WriteChat(ReadOnlySpan<byte> line, long lineNumber, CanonicalRecordWriter writer)
    {
        var index = Find(line, "messages"u8);
        if (index < 0)
        {
            return new RecordError(lineNumber, RecordErrorCodes.MissingField, "missing the field 'messages'");
        }

        var messagesField = _fields[index];
        if (messagesField.Type != JsonTokenType.StartArray)
        {
            return new RecordError(lineNumber, RecordErrorCodes.WrongType, $"'messages' must be an array of {{\"role\",\"content\"}} objects, found {Describe(messagesField.Type)}");
        }

        _messages.Clear();
        var messages = line[messagesField.ValueStart..messagesField.ValueEnd];
        var reader = new Utf8JsonReader(messages);
        reader.Read();
        var hasContent = false;
        var position = 0;
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
        {
            position++;
            if (reader.TokenType != JsonTokenType.StartObject)
            {
                return new RecordError(lineNumber, RecordErrorCodes.WrongType, $"messages[{position - 1}] must be an object with 'role' and 'content'");
            }

            Range? role = null, content = null, name = null;
            var contentType = JsonTokenType.None;
            while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
            {
                var property = reader.ValueSpan;
                var isRole = property.SequenceEqual("role"u8);
                var isContent = property.SequenceEqual("content"u8);
                var isName = property.SequenceEqual("name"u8);
                reader.Read();
                var start = (int)reader.TokenStartIndex + messagesField.ValueStart;
                var tokenType = reader.TokenType;
                reader.Skip();
                var end = (int)reader.BytesConsumed + messagesField.ValueStart;
                if (isRole)
                {
                    if (tokenType != JsonTokenType.String)
                    {
                        return new RecordError(lineNumber, RecordErrorCodes.WrongType, $"messages[{position - 1}].role must be a string");
                    }

                    role = start..end;
                }
                else if (isContent)
                {
                    content = start..end;
                    contentType = tokenType;
                }
                else if (isName && tokenType == JsonTokenType.String)
                {
                    name = start..end;
                }
            }

            if (role is null)
            {
                return new RecordError(lineNumber, RecordErrorCodes.MissingField, $"messages[{position - 1}] has no 'role'");
            }

            var roleText = Unquote(line[role.Value]);
            if (!IsKnownRole(roleText))
            {
                return new RecordError(lineNumber, RecordErrorCodes.UnknownRole, $"messages[{position - 1}].role '{Encoding.UTF8.GetString(roleText)}' is not one of: {string.Join(", ", FieldNames.ChatRoles)}");
            }

            if (content is null || contentType != JsonTokenType.String)
            {
                return new RecordError(lineNumber, content is null ? RecordErrorCodes.MissingField : RecordErrorCodes.WrongType,
                    content is null ? $"messages[{position - 1}] has no 'content'" : $"messages[{position - 1}].content must be a string, found {Describe(contentType)}");
            }

            if (!roleText.SequenceEqual("system"u8) && !roleText.SequenceEqual("developer"u8) && !IsBlankJsonString(line[content.Value]))
            {
                hasContent = true;
            }

            _messages.Add((role.Value, content.Value, name));
        }

        if (_messages.Count == 0 || !hasContent)
        {
            return new RecordError(lineNumber, RecordErrorCodes.EmptyText, "'messages' has no user or assistant message with content");
        }

        writer.WriteStartObject();
        writer.WriteStartArray("messages"u8);
        foreach (var (role, content, name) in _messages)
        {
            writer.WriteStartObject();
            writer.WritePropertyName("role"u8);
            writer.WriteRawValue(line[role]);
            writer.WritePropertyName("content"u8);
            writer.WriteRawValue(line[content]);
            if (name is { } n)
            {
                writer.WritePropertyName("name"u8);
                writer.WriteRawValue(line[n]);
            }

            writer.WriteEndObject();
        }

        writer.WriteEndArray();
        WriteId(line, writer);
        return null;
    }

    private static bool IsKnownRole(ReadOnlySpan<byte> role)
    {
        foreach (var known in Roles)
        {
            if (role.SequenceEqual(known))
            {
                return true;
            }
        }

        return false;
    }

    private void WriteId(ReadOnlySpan<byte> line, CanonicalRecordWriter writer)
    {
        var id = FindAny(line, IdAliases);
        if (id >= 0 && _fields[id].Type is JsonTokenType.String or JsonTokenType.Number)
        {
            WriteRaw(writer, "id"u8, line, _fields[id]);
        }
    }

    private static ReadOnlySpan<byte> Raw(ReadOnlySpan<byte> line, Field field) => line[field.ValueStart..field.ValueEnd];

    private static void WriteRaw(CanonicalRecordWriter writer, ReadOnlySpan<byte> name, ReadOnlySpan<byte> line, Field field)
    {
        writer.WritePropertyName(name);
        writer.WriteRawValue(Raw(line, field));
    }

    private static string Name(ReadOnlySpan<byte> line, Field field) => Encoding.UTF8.GetString(line.Slice(field.NameStart, field.NameLength));

    private static ReadOnlySpan<byte> Unquote(ReadOnlySpan<byte> quoted) => quoted[1..^1];

    private bool IsBlank(ReadOnlySpan<byte> line, Field field) => field.Escaped
        ? string.IsNullOrWhiteSpace(Unescape(line, field))
        : Utf8Text.IsBlank(Unquote(Raw(line, field)));

    private static bool IsBlankJsonString(ReadOnlySpan<byte> quoted)
    {
        var inner = Unquote(quoted);
        return inner.IndexOf((byte)'\\') >= 0
            ? string.IsNullOrWhiteSpace(JsonSerializer.Deserialize<string>(quoted))
            : Utf8Text.IsBlank(inner);
    }

    private string Unescape(ReadOnlySpan<byte> line, Field field)
    {
        var reader = new Utf8JsonReader(Raw(line, field));
        reader.Read();
        if (_scratch.Length < reader.ValueSpan.Length)
        {
            _scratch = new byte[reader.ValueSpan.Length * 2];
        }

        var written = reader.CopyString(_scratch);
        return Encoding.UTF8.GetString(_scratch, 0, written);
    }

    private static string Describe(JsonTokenType type) => type switch
    {
        JsonTokenType.String => "a string",
        JsonTokenType.Number => "a number",
        JsonTokenType.True or JsonTokenType.False => "a boolean",
        JsonTokenType.Null => "null",
        JsonTokenType.StartObject => "an object",
        JsonTokenType.StartArray => "an array",
        _ => type.ToString(),
    };
}

public static class Utf8Text
{
    /// <summary>True when the UTF-8 text is empty or only white space.</summary>
    public static bool IsBlank(ReadOnlySpan<byte> utf8)
    {
        // Fast path: text almost always starts with a visible ASCII character.
        if (!utf8.IsEmpty && utf8[0] is > (byte)' ' and < 0x7F)
        {
            return false;
        }

        while (!utf8.IsEmpty)
        {
            if (System.Text.Rune.DecodeFromUtf8(utf8, out var rune, out var consumed) != System.Buffers.OperationStatus.Done)
            {
                return false;
            }

            if (!System.Text.Rune.IsWhiteSpace(rune) && rune.Value is not (0x200B or 0xFEFF))
            {
                return false;
            }

            utf8 = utf8[consumed..];
        }

        return true;
    }

    public static int FirstInvalidByte(ReadOnlySpan<byte> utf8)
    {
        var offset = 0;
        while (offset < utf8.Length)
        {
            if (System.Text.Rune.DecodeFromUtf8(utf8[offset..], out _, out var consumed) != System.Buffers.OperationStatus.Done)
            {
                return offset;
            }

            offset += consumed;
        }

        return offset;
    }
}
