using System.Text;
using System.Text.Json;
using Pipeline.Preprocessing;

namespace Pipeline.Tests.Preprocessing;

/// <summary>
/// The preprocessing stage's one-pass record reader against the source-generated serializer it stands in
/// for: every line, valid or not, must give the same record or the same failure.
/// </summary>
public sealed class CanonicalRecordReaderTests
{
    private static readonly string[] Lines =
    [
        """{"text":"the food was great","label":"1","line":7}""",
        """{"text":"the food was great","label":1,"line":7}""",
        """{"line":3,"label":true,"text":"x"}""",
        """{"line":3,"label":false,"text":"x"}""",
        """{"line":3,"label":null,"text":null}""",
        """{"text":"caf\u00e9 \"quoted\" \\ tab\t","label":"pos","line":12}""",
        """{"text":"café","label":"négatif","line":1}""",
        """{"text":"a","label":"\u0031","line":2}""",
        """{"text":"a","label":-0.5e+3,"line":2}""",
        """{"prompt":"Q?","completion":"A.","line":4}""",
        """{"prompt":"Q?","completion":null,"line":4}""",
        """{"messages":[{"role":"user","content":"hi"}],"line":5}""",
        """{"Text":"capital name","line":6}""",
        """{"te\u0078t":"escaped name","line":6}""",
        """{"text":"a","line":"8"}""",
        """{"text":"a","line":8.5}""",
        """{"text":"a","line":8,"extra":1}""",
        """{"text":"a","text":"b","line":9}""",
        """{"text":"a","label":[1],"line":9}""",
        """{"text":"a","label":{"x":1},"line":9}""",
        """{"text":5,"line":9}""",
        """{"text":"a","line":9}x""",
        """{"text":"a","line":9""",
        """{"text":"a" "line":9}""",
        """[1,2]""",
        """{}""",
        """ {"text":"spaced","line":10} """,
        "{\"text\":\"bad \xff utf8\",\"line\":11}",
    ];

    [Fact]
    public void Every_line_reads_as_the_serializer_reads_it()
    {
        var reader = new CanonicalRecordReader();
        foreach (var text in Lines)
        {
            AssertSame(reader, text.Contains('\xff') ? Latin1Line(text) : Encoding.UTF8.GetBytes(text));
        }
    }

    [Fact]
    public void Randomly_damaged_lines_read_or_fail_as_the_serializer_does()
    {
        var random = new Random(7);
        var reader = new CanonicalRecordReader();
        var alphabet = "{}[]\":,\\ tu0123456789.-+elnrfasx\u00e9"u8.ToArray();
        for (var n = 0; n < 5000; n++)
        {
            var line = Encoding.UTF8.GetBytes(Lines[random.Next(8)]).ToList();
            for (var edits = random.Next(1, 4); edits > 0; edits--)
            {
                var at = random.Next(line.Count);
                switch (random.Next(3))
                {
                    case 0: line.RemoveAt(at); break;
                    case 1: line.Insert(at, alphabet[random.Next(alphabet.Length)]); break;
                    default: line[at] = alphabet[random.Next(alphabet.Length)]; break;
                }
            }

            AssertSame(reader, [.. line]);
        }
    }

    [Fact]
    public void A_reused_record_does_not_keep_the_previous_lines_fields()
    {
        var reader = new CanonicalRecordReader();
        reader.Read("""{"prompt":"Q","completion":"A","label":"x","line":1}"""u8);
        var second = reader.Read("""{"text":"only text","line":2}"""u8);
        Assert.Equal(("only text", (string?)null, (string?)null, (string?)null, 2L), (second.Text, second.Label, second.Prompt, second.Completion, second.Line));
    }

    private static byte[] Latin1Line(string text) => [.. text.Select(c => (byte)c)];

    private static void AssertSame(CanonicalRecordReader reader, byte[] line)
    {
        CanonicalRecord? expected = null;
        Exception? expectedError = null;
        try
        {
            expected = JsonSerializer.Deserialize(line, PreprocessJson.Default.CanonicalRecord);
        }
        catch (Exception e)
        {
            expectedError = e;
        }

        CanonicalRecord? actual = null;
        Exception? actualError = null;
        try
        {
            actual = reader.Read(line);
        }
        catch (Exception e)
        {
            actualError = e;
        }

        var shown = Encoding.UTF8.GetString(line);
        if (expectedError is not null || expected is null)
        {
            Assert.True(actualError is not null && actualError.GetType() == expectedError?.GetType(), $"{shown}: the serializer failed with {expectedError?.GetType().Name}, the reader gave {actualError?.GetType().Name ?? "a record"}");
            return;
        }

        Assert.True(actualError is null, $"{shown}: the reader failed with {actualError?.Message}");
        Assert.Equal(Describe(expected), Describe(actual!));
    }

    private static string Describe(CanonicalRecord r) =>
        $"text={r.Text ?? "<null>"}|label={r.Label ?? "<null>"}|prompt={r.Prompt ?? "<null>"}|completion={r.Completion ?? "<null>"}|line={r.Line}|messages={(r.Messages is null ? "<null>" : string.Join(";", r.Messages.Select(m => $"{m.Role}:{m.Content}")))}";
}
