using System.Text;
using Pipeline.Ingestion;

namespace Pipeline.Tests.Ingestion;

/// <summary>
/// The parser's flat-object scanner against <see cref="System.Text.Json.Utf8JsonReader"/>: for every line, valid or
/// not, both paths must write the same canonical record or return the same error.
/// </summary>
public sealed class JsonlRecordParserTests
{
    private static readonly string[] Tricky =
    [
        """{"text":"a","label":1}""",
        """ { "text" : "a" , "label" : -0.5e+3 , "id" : "r1" } """,
        "{\"text\":\"a\",\r\n\t\"label\":1}",
        """{"custom_id":"r7","text":"the food was great","label":0}""",
        """{"sentence":"x","y":true,"id":5}""",
        """{"review":"caf\u00e9 ok","sentiment":"pos","key":12.25}""",
        """{"text":"a","label":01}""",
        """{"text":"a","label":1.}""",
        """{"text":"a","label":.5}""",
        """{"text":"a","label":-}""",
        """{"text":"a","label":-0}""",
        """{"text":"a","label":1e}""",
        """{"text":"a","label":1E-7}""",
        """{"text":"a","label":+1}""",
        """{"text":"a","label":truex}""",
        """{"text":"a","label":tru}""",
        """{"text":"a","label":false}""",
        """{"text":"a","label":nul}""",
        """{"text":"a","label":null}""",
        """{"text":"a","label":NaN}""",
        """{"text":"a","label":Infinity}""",
        """{"text":"a","label":1 2}""",
        """{"text":"a","label":true,}""",
        """{"text":"a",}""",
        """{"text":"a"}x""",
        """{"text":"a"}{}""",
        """{"text":"a"}   """,
        """{"text":"a"/*c*/}""",
        """{"text":"a"}//c""",
        """{}""",
        """{ }""",
        """{""",
        """{"text":""",
        """{"text":"a""",
        """{"text":"a" "label":1}""",
        """{"text" "a"}""",
        """{text:"a"}""",
        """{'text':'a'}""",
        "{\"text\":\"a\tb\"}",
        "{\"text\":\"a\u0001b\"}",
        """{"text":"a\"b","label":1}""",
        """{"text":"a\\","label":1}""",
        """{"text":"\u0041","label":1}""",
        """{"te\u0078t":"a"}""",
        """{"text":"a\x"}""",
        """{"text":null}""",
        """{"text":12}""",
        """{"text":"   "}""",
        """{"text":""}""",
        """{"text":"a","meta":{"x":1}}""",
        """{"text":"a","tags":[1,2,{"b":[]}]}""",
        """{"text":"a","label":[]}""",
        """{"text":"a","label":{}}""",
        """["text"]""",
        "\"text\"",
        "42",
        """{"label":1}""",
        """{"text":"b","label":"pos"}""",
        """{"text":"a","text":"b"}""",
    ];

    [Fact]
    public void The_flat_scanner_and_the_json_reader_agree_on_hand_picked_lines()
    {
        // One line at a time, each against fresh parsers, so the label type of one cannot decide the next.
        foreach (var line in Tricky)
        {
            AssertSameAsReader(RecordKinds.Text, null, null, [line]);
            AssertSameAsReader(RecordKinds.Text, "text", "label", [line]);
        }

        // In sequence: labels of one type, then another (InconsistentLabelType), as a file would give them.
        AssertSameAsReader(RecordKinds.Text, null, null, Tricky);
        AssertSameAsReader(RecordKinds.PromptCompletion, null, null,
            ["""{"prompt":"Translate: cat","completion":"chat","id":3}""", """{"prompt":"","completion":" "}""", """{"prompt":1,"completion":"x"}""", """{"prompt":"a"}"""]);
    }

    [Fact]
    public void The_flat_scanner_and_the_json_reader_agree_on_thousands_of_mutated_lines()
    {
        // Every line one to three random edits (bytes that matter to JSON inserted, deleted or replaced) away from a valid record.
        var random = new Random(20261202);
        string[] seeds =
        [
            """{"custom_id":"r1","text":"the service was slow","label":1}""",
            """{ "text" : "never again" , "label" : -12.5e-3, "id": 7 }""",
            """{"review":"loved this place","sentiment":"pos","flag":true,"extra":null}""",
            """{"text":"a \"quoted\" word","label":false}""",
        ];
        const string alphabet = "{}[]\":,.-+eE0123456789 \t\\tfnrula/x\u00e9";
        var lines = new List<string>();
        for (var i = 0; i < 6000; i++)
        {
            var line = new StringBuilder(seeds[random.Next(seeds.Length)]);
            for (var edits = 1 + random.Next(3); edits > 0; edits--)
            {
                var at = random.Next(line.Length + 1);
                var c = alphabet[random.Next(alphabet.Length)];
                switch (random.Next(3))
                {
                    case 0:
                        line.Insert(at, c);
                        break;
                    case 1 when at < line.Length:
                        line.Remove(at, 1);
                        break;
                    default:
                        if (at < line.Length)
                        {
                            line[at] = c;
                        }

                        break;
                }
            }

            lines.Add(line.ToString());
        }

        // Fresh parsers per line here too, so every line is judged on its own.
        var accepted = 0;
        foreach (var line in lines)
        {
            accepted += AssertSameAsReader(RecordKinds.Text, null, null, [line]);
        }

        // Both outcomes were exercised: many mutated lines stay valid records, many do not.
        Assert.InRange(accepted, 500, lines.Count - 500);
    }

    /// <summary>Parses <paramref name="lines"/> with both paths; returns how many were valid records.</summary>
    private static int AssertSameAsReader(string kind, string? textField, string? labelField, IEnumerable<string> lines)
    {
        var scanner = new JsonlRecordParser(kind, textField, labelField, flatScanner: true);
        var reader = new JsonlRecordParser(kind, textField, labelField, flatScanner: false);
        var scannerWriter = new CanonicalRecordWriter();
        var readerWriter = new CanonicalRecordWriter();
        var valid = 0;
        var number = 0;
        foreach (var line in lines)
        {
            var bytes = Encoding.UTF8.GetBytes(line);
            scannerWriter.Reset();
            readerWriter.Reset();
            var scannerError = scanner.Parse(bytes, ++number, scannerWriter);
            var readerError = reader.Parse(bytes, number, readerWriter);
            Assert.True(readerError == scannerError, $"{line}\n  scanner: {scannerError}\n  reader:  {readerError}");
            Assert.True(readerWriter.Written.SequenceEqual(scannerWriter.Written), $"{line}\n  scanner wrote: {Encoding.UTF8.GetString(scannerWriter.Written)}\n  reader wrote:  {Encoding.UTF8.GetString(readerWriter.Written)}");
            valid += readerError is null ? 1 : 0;
        }

        Assert.Equal(reader.LabelType, scanner.LabelType);
        Assert.Equal(reader.Labels.ToDictionary(), scanner.Labels.ToDictionary());
        return valid;
    }
}
