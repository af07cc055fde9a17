using System.Buffers;
using System.Buffers.Text;
using System.Text.Encodings.Web;

namespace Pipeline.Ingestion;

/// <summary>
/// Writes one canonical JSON record into a reused buffer. Most values are copied through as the (already
/// valid) JSON they were read as, so this is a small append-only writer rather than
/// <see cref="System.Text.Json.Utf8JsonWriter"/>: no validation, no flushing, no per-record state
/// beyond a comma flag per nesting level. Strings from CSV and text files are escaped with the relaxed
/// encoder (UTF-8 kept as is).
/// </summary>
public sealed class CanonicalRecordWriter
{
    private static readonly JavaScriptEncoder Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping;
    private byte[] _buffer = new byte[4096];
    private int _length;
    private int _depth;
    private ulong _hasMember;
    private bool _afterName;

    public ReadOnlySpan<byte> Written => _buffer.AsSpan(0, _length);

    public void Reset()
    {
        _length = 0;
        _depth = 0;
        _hasMember = 0;
        _afterName = false;
    }

    public void WriteStartObject() => Open((byte)'{');

    public void WriteEndObject() => Close((byte)'}');

    public void WriteStartArray(ReadOnlySpan<byte> name)
    {
        WritePropertyName(name);
        Open((byte)'[');
    }

    public void WriteEndArray() => Close((byte)']');

    public void WritePropertyName(ReadOnlySpan<byte> name)
    {
        Separator();
        Append((byte)'"');
        Append(name);
        Append("\":"u8);
        _afterName = true;
    }

    /// <summary>A value that is already valid JSON (a string with its quotes, a number, true/false).</summary>
    public void WriteRawValue(ReadOnlySpan<byte> json)
    {
        ValueStart();
        Append(json);
    }

    public void WriteString(ReadOnlySpan<byte> name, ReadOnlySpan<byte> utf8)
    {
        WritePropertyName(name);
        ValueStart();
        Append((byte)'"');
        while (!utf8.IsEmpty)
        {
            Ensure(utf8.Length * 6 + 2);
            var status = Encoder.EncodeUtf8(utf8, _buffer.AsSpan(_length), out var consumed, out var written);
            _length += written;
            utf8 = utf8[consumed..];
            if (status == OperationStatus.InvalidData)
            {
                // Input is validated before it is written; never reached, but never loop forever either.
                break;
            }
        }

        Append((byte)'"');
    }

    public void WriteNumber(ReadOnlySpan<byte> name, long value)
    {
        WritePropertyName(name);
        ValueStart();
        Ensure(20);
        Utf8Formatter.TryFormat(value, _buffer.AsSpan(_length), out var written);
        _length += written;
    }

    private void Open(byte bracket)
    {
        ValueStart();
        Append(bracket);
        _depth++;
        _hasMember &= ~(1UL << _depth);
    }

    private void Close(byte bracket)
    {
        _depth--;
        Append(bracket);
    }

    /// <summary>After a property name a value follows directly; an array element needs a comma before it.</summary>
    private void ValueStart()
    {
        if (_afterName)
        {
            _afterName = false;
        }
        else if (_depth > 0)
        {
            Separator();
        }
    }

    private void Separator()
    {
        if ((_hasMember & (1UL << _depth)) != 0)
        {
            Append((byte)',');
        }

        _hasMember |= 1UL << _depth;
    }

    private void Append(byte value)
    {
        Ensure(1);
        _buffer[_length++] = value;
    }

    private void Append(ReadOnlySpan<byte> bytes)
    {
        Ensure(bytes.Length);
        bytes.CopyTo(_buffer.AsSpan(_length));
        _length += bytes.Length;
    }

    private void Ensure(int more)
    {
        if (_length + more > _buffer.Length)
        {
            Array.Resize(ref _buffer, Math.Max(_buffer.Length * 2, _length + more));
        }
    }
}
