using System.Text;
using System.Text.Json;
using Pipeline.Ingestion;

namespace Pipeline.Tests.Ingestion;

/// <summary>The streaming core of ingestion, on in-memory streams: formats, per-record validation and file-level rejections.</summary>
public sealed class DatasetIngestorTests
{
    private static readonly IngestionOptions Options = new();

    private sealed record Outcome(IngestResult Result, List<JsonElement> Records, List<RecordError> Errors);

    private static Task<Outcome> RunAsync(string name, string content, IngestSettings? settings = null) =>
        RunAsync(name, Encoding.UTF8.GetBytes(content), settings);

    private static async Task<Outcome> RunAsync(string name, byte[] content, IngestSettings? settings = null)
    {
        using var records = new MemoryStream();
        using var errors = new MemoryStream();
        var result = await new DatasetIngestor(Options).RunAsync(new MemoryStream(content), name, content.Length, settings ?? Options.Resolve(null), records, errors, null, CancellationToken.None);
        return new Outcome(
            result,
            [.. Lines(records).Select(l => JsonDocument.Parse(l).RootElement.Clone())],
            [.. Lines(errors).Select(l => JsonSerializer.Deserialize<RecordError>(l, JsonSerializerOptions.Web)!)]);
    }

    private static string[] Lines(MemoryStream stream) => Encoding.UTF8.GetString(stream.ToArray()).Split('\n', StringSplitOptions.RemoveEmptyEntries);

    [Fact]
    public async Task Chat_jsonl_becomes_canonical_chat_records()
    {
        var outcome = await RunAsync("chat.jsonl",
            """
            {"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi \"there\""},{"role":"assistant","content":"Hello.","weight":1}],"custom_id":"a1"}
            {"messages":[{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"}]}
            """);

        Assert.Equal(DataFormats.Jsonl, outcome.Result.Detected.Format);
        Assert.Equal(RecordKinds.Chat, outcome.Result.Detected.RecordKind);
        Assert.Equal(2, outcome.Result.Counts.Valid);
        var first = outcome.Records[0];
        Assert.Equal("Hi \"there\"", first.GetProperty("messages")[1].GetProperty("content").GetString());
        Assert.Equal("a1", first.GetProperty("id").GetString());
        Assert.Equal(1, first.GetProperty("line").GetInt64());
        Assert.Equal(2, outcome.Records[1].GetProperty("line").GetInt64());
        Assert.False(first.GetProperty("messages")[2].TryGetProperty("weight", out _));
    }

    [Fact]
    public async Task Prompt_completion_jsonl_is_detected()
    {
        var outcome = await RunAsync("pc.jsonl", "{\"prompt\":\"Translate: cat\",\"completion\":\"chat\"}\n{\"prompt\":\"\",\"completion\":\"free text\"}\n");
        Assert.Equal(RecordKinds.PromptCompletion, outcome.Result.Detected.RecordKind);
        Assert.Equal(2, outcome.Result.Counts.Valid);
        Assert.Equal("chat", outcome.Records[0].GetProperty("completion").GetString());
    }

    [Fact]
    public async Task Text_with_label_aliases_is_normalized_to_text_and_label()
    {
        var outcome = await RunAsync("reviews.jsonl", "{\"sentence\":\"Great food\",\"sentiment\":\"pos\"}\n{\"sentence\":\"Cold soup\",\"sentiment\":\"neg\"}\n{\"sentence\":\"Nice\",\"sentiment\":\"pos\"}\n");
        Assert.Equal(RecordKinds.Text, outcome.Result.Detected.RecordKind);
        Assert.Equal("string", outcome.Result.LabelType);
        Assert.Equal("Great food", outcome.Records[0].GetProperty("text").GetString());
        Assert.Equal("pos", outcome.Records[0].GetProperty("label").GetString());
        Assert.Equal(2, outcome.Result.LabelCounts["pos"]);
        Assert.Equal(1, outcome.Result.LabelCounts["neg"]);
    }

    [Fact]
    public async Task Plain_text_jsonl_without_labels_is_accepted()
    {
        var outcome = await RunAsync("corpus.ndjson", "{\"text\":\"one\"}\n\n{\"text\":\"two\"}\n");
        Assert.Equal(2, outcome.Result.Counts.Valid);
        Assert.Equal(1, outcome.Result.Counts.BlankLines);
        Assert.Null(outcome.Result.LabelType);
        Assert.False(outcome.Records[0].TryGetProperty("label", out _));
    }

    [Fact]
    public async Task Csv_with_header_quotes_and_line_breaks_is_parsed_per_RFC_4180()
    {
        var outcome = await RunAsync("data.csv", "id,text,label\r\n1,\"Hello, world\",pos\r\n2,\"She said \"\"hi\"\"\nthen left\",neg\r\n3,5\" screen is small,neg\r\n");
        Assert.Equal(DataFormats.Csv, outcome.Result.Detected.Format);
        Assert.True(outcome.Result.Detected.HasHeader);
        Assert.Equal(3, outcome.Result.Counts.Valid);
        Assert.Equal(1, outcome.Result.Counts.HeaderRows);
        Assert.Equal("Hello, world", outcome.Records[0].GetProperty("text").GetString());
        Assert.Equal("She said \"hi\"\nthen left", outcome.Records[1].GetProperty("text").GetString());
        Assert.Equal(3, outcome.Records[1].GetProperty("line").GetInt64());
        Assert.Equal("5\" screen is small", outcome.Records[2].GetProperty("text").GetString());
        Assert.Equal("1", outcome.Records[0].GetProperty("id").GetString());
    }

    [Fact]
    public async Task A_csv_record_across_thousands_of_lines_with_escaped_quotes_is_one_record()
    {
        // The quote state is carried from line to line (a line ending in an escaped quote, one starting with a
        // closing quote), so the record costs its length; it used to be re-scanned from its start on every line.
        var cell = string.Join('\n', Enumerable.Range(0, 20_000).Select(i => i % 3 == 0 ? $"line {i} ends \"\"" : $"\"\"line {i}\"\" starts"));
        var outcome = await RunAsync("long.csv", $"id,text,label\n1,\"{cell}\",pos\n2,short,neg\n", Options.Resolve(null) with { MaxRecordBytes = 8 << 20 });

        Assert.Equal((2L, 0L), (outcome.Result.Counts.Valid, outcome.Result.Counts.Invalid));
        Assert.Equal(cell.Replace("\"\"", "\"", StringComparison.Ordinal), outcome.Records[0].GetProperty("text").GetString());
        Assert.Equal(("pos", 2L), (outcome.Records[0].GetProperty("label").GetString(), outcome.Records[0].GetProperty("line").GetInt64()));
        Assert.Equal(20_002L, outcome.Records[1].GetProperty("line").GetInt64());
    }

    [Fact]
    public async Task Headerless_tsv_finds_the_label_column()
    {
        var lines = string.Concat(Enumerable.Range(0, 50).Select(i => $"Sentence number {i} is here.\t{i % 2}\n"));
        var outcome = await RunAsync("labelled.txt", lines);
        Assert.Equal(DataFormats.Tsv, outcome.Result.Detected.Format);
        Assert.Equal(["text", "label"], outcome.Result.Detected.Columns!);
        Assert.Equal(50, outcome.Result.Counts.Valid);
        Assert.Equal("1", outcome.Records[1].GetProperty("label").GetString());
    }

    [Fact]
    public async Task Headerless_csv_with_many_columns_asks_for_a_header_or_columns()
    {
        var error = await Assert.ThrowsAsync<IngestionRejectedException>(() => RunAsync("wide.csv", "a,b,c\nd,e,f\n"));
        Assert.Equal(RejectionCodes.UnknownFormat, error.Code);
        Assert.Contains("ingest.columns", error.Message);
    }

    [Fact]
    public async Task Columns_from_the_run_spec_override_detection()
    {
        var settings = Options.Resolve(new Runs.IngestSpec { Columns = ["id", "ignore", "text"] });
        var outcome = await RunAsync("wide.csv", "7,x,first text\n8,y,second text\n", settings);
        Assert.Equal("first text", outcome.Records[0].GetProperty("text").GetString());
        Assert.Equal("7", outcome.Records[0].GetProperty("id").GetString());
    }

    [Fact]
    public async Task Text_and_markdown_documents_become_one_record_per_paragraph()
    {
        var outcome = await RunAsync("notes.md", "# Title\n\nFirst paragraph\nspans two lines.\n\n\nSecond paragraph.\n");
        Assert.Equal(DataFormats.Text, outcome.Result.Detected.Format);
        Assert.Equal(3, outcome.Result.Counts.Valid);
        Assert.Equal("First paragraph\nspans two lines.", outcome.Records[1].GetProperty("text").GetString());
        Assert.Equal(3, outcome.Records[1].GetProperty("line").GetInt64());
        Assert.Equal(7, outcome.Result.Counts.Lines);
    }

    [Fact]
    public async Task Every_bad_record_is_listed_with_its_line_and_reason()
    {
        var content = new List<byte[]>
        {
            "{\"text\":\"fine\",\"label\":1}\n"u8.ToArray(),
            "{\"text\":\"bad utf8 \xC3\x28\",\"label\":1}\n".Select(c => (byte)c).ToArray(),
            "{\"text\": \"unterminated\n"u8.ToArray(),
            "{\"label\":1}\n"u8.ToArray(),
            "{\"text\":42,\"label\":1}\n"u8.ToArray(),
            "{\"text\":\"   \",\"label\":1}\n"u8.ToArray(),
            "{\"text\":\"mixed\",\"label\":\"one\"}\n"u8.ToArray(),
            Encoding.UTF8.GetBytes("{\"text\":\"" + new string('x', 2000) + "\",\"label\":1}\n"),
            "[1,2]\n"u8.ToArray(),
            "{\"text\":\"also fine\",\"label\":0}\n"u8.ToArray(),
        };
        var settings = Options.Resolve(new Runs.IngestSpec { MaxRecordBytes = 1000 });
        var outcome = await RunAsync("bad.jsonl", [.. content.SelectMany(b => b)], settings);

        Assert.Equal(10, outcome.Result.Counts.Read);
        Assert.Equal(2, outcome.Result.Counts.Valid);
        Assert.Equal(8, outcome.Result.Counts.Invalid);
        var byLine = outcome.Errors.ToDictionary(e => e.Line);
        Assert.Equal(RecordErrorCodes.InvalidUtf8, byLine[2].Code);
        Assert.Equal(RecordErrorCodes.MalformedJson, byLine[3].Code);
        Assert.Equal(RecordErrorCodes.MissingField, byLine[4].Code);
        Assert.Equal(RecordErrorCodes.WrongType, byLine[5].Code);
        Assert.Equal(RecordErrorCodes.EmptyText, byLine[6].Code);
        Assert.Equal(RecordErrorCodes.InconsistentLabelType, byLine[7].Code);
        Assert.Contains("number", byLine[7].Message);
        Assert.Equal(RecordErrorCodes.RecordTooLarge, byLine[8].Code);
        Assert.Equal(RecordErrorCodes.NotAnObject, byLine[9].Code);
        Assert.Equal([1L, 10L], outcome.Records.Select(r => r.GetProperty("line").GetInt64()));
        Assert.NotNull(outcome.Result.Rejection(settings));
    }

    [Fact]
    public async Task Unknown_chat_roles_and_messages_without_content_are_invalid()
    {
        var outcome = await RunAsync("chat.jsonl",
            """
            {"messages":[{"role":"user","content":"ok"},{"role":"assistant","content":"fine"}]}
            {"messages":[{"role":"robot","content":"beep"}]}
            {"messages":[{"role":"user"}]}
            {"messages":"hello"}
            {"messages":[{"role":"system","content":"only a system prompt"}]}
            """);
        Assert.Equal(1, outcome.Result.Counts.Valid);
        Assert.Equal(
            [RecordErrorCodes.UnknownRole, RecordErrorCodes.MissingField, RecordErrorCodes.WrongType, RecordErrorCodes.EmptyText],
            outcome.Errors.Select(e => e.Code));
        Assert.Contains("'robot'", outcome.Errors[0].Message);
    }

    [Fact]
    public async Task Tolerance_accepts_a_file_at_or_under_the_invalid_fraction()
    {
        var good = string.Concat(Enumerable.Range(0, 199).Select(i => $"{{\"text\":\"row {i}\"}}\n"));
        var outcome = await RunAsync("mostly.jsonl", good + "{\"text\":\n");
        Assert.Equal(1, outcome.Result.Counts.Invalid);
        Assert.Null(outcome.Result.Rejection(Options.Resolve(null)));
        Assert.NotNull(outcome.Result.Rejection(Options.Resolve(new Runs.IngestSpec { MaxInvalidFraction = 0.001 })));
    }

    [Fact]
    public async Task Duplicate_records_are_counted_not_removed()
    {
        var outcome = await RunAsync("dups.jsonl", "{\"text\":\"same\"}\n{\"text\":\"same\"}\n{\"text\":\"other\"}\n");
        Assert.Equal(3, outcome.Result.Counts.Valid);
        Assert.Equal(1, outcome.Result.Counts.Duplicates);
    }

    [Theory]
    [InlineData(1_000_000, 5)]
    [InlineData(1_000_000, 20_000)]
    [InlineData(1_000, 20_000)]
    public async Task Duplicates_are_counted_exactly_under_the_tracking_limit_and_as_a_lower_bound_past_it(int limit, int records)
    {
        // Random repeats at random distances (a record's slot is looked up some records after it is read).
        var random = new Random(records);
        var content = new StringBuilder();
        var seen = new HashSet<int>();
        var expected = 0;
        for (var i = 0; i < records; i++)
        {
            var value = random.Next(records * 2 / 3 + 1);
            expected += seen.Add(value) ? 0 : 1;
            content.Append("{\"text\":\"record ").Append(value).Append("\"}\n");
        }

        var options = new IngestionOptions { DuplicateTrackingLimit = limit };
        using var output = new MemoryStream();
        var bytes = Encoding.UTF8.GetBytes(content.ToString());
        var result = await new DatasetIngestor(options).RunAsync(new MemoryStream(bytes), "dups.jsonl", bytes.Length, options.Resolve(null), output, Stream.Null, null, CancellationToken.None);

        Assert.Equal(records, result.Counts.Valid);
        if (seen.Count <= limit)
        {
            Assert.True(result.DuplicatesExact);
            Assert.Equal(expected, result.Counts.Duplicates);
        }
        else
        {
            Assert.False(result.DuplicatesExact);
            Assert.InRange(result.Counts.Duplicates, 1, expected - 1);
        }
    }

    [Theory]
    [InlineData(new byte[0], RejectionCodes.EmptyFile)]
    [InlineData(new byte[] { 0x20, 0x0A, 0x0A }, RejectionCodes.EmptyFile)]
    [InlineData(new byte[] { 0xFF, 0xFE, 0x7B, 0x00, 0x7D, 0x00 }, RejectionCodes.Utf16File)]
    [InlineData(new byte[] { 0x7B, 0x00, 0x22, 0x00, 0x74, 0x00, 0x22, 0x00, 0x3A, 0x00, 0x31, 0x00, 0x7D, 0x00 }, RejectionCodes.Utf16File)]
    [InlineData(new byte[] { 0x1F, 0x8B, 0x08, 0x00, 0x01 }, RejectionCodes.BinaryFile)]
    [InlineData(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x00, 0x00, 0x01 }, RejectionCodes.BinaryFile)]
    public async Task Files_that_are_not_utf8_text_are_rejected_clearly(byte[] content, string code)
    {
        var error = await Assert.ThrowsAsync<IngestionRejectedException>(() => RunAsync("file.jsonl", content));
        Assert.Equal(code, error.Code);
    }

    [Fact]
    public async Task A_json_array_is_rejected_with_a_hint_to_use_json_lines()
    {
        var error = await Assert.ThrowsAsync<IngestionRejectedException>(() => RunAsync("data.json", "[{\"text\":\"a\"},{\"text\":\"b\"}]"));
        Assert.Contains("JSON Lines", error.Message);
    }

    [Fact]
    public async Task A_utf8_bom_is_skipped_and_hashed()
    {
        var content = new byte[] { 0xEF, 0xBB, 0xBF }.Concat("{\"text\":\"a\"}\n"u8.ToArray()).ToArray();
        var outcome = await RunAsync("bom.jsonl", content);
        Assert.Equal(1, outcome.Result.Counts.Valid);
        Assert.Equal(Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(content)), outcome.Result.Sha256);
    }

    [Fact]
    public async Task Long_lines_are_skipped_without_buffering_them_whole()
    {
        var huge = "{\"text\":\"" + new string('y', 3_000_000) + "\"}\n";
        var outcome = await RunAsync("huge.jsonl", "{\"text\":\"small\"}\n" + huge + "{\"text\":\"after\"}\n");
        Assert.Equal(2, outcome.Result.Counts.Valid);
        Assert.Equal(RecordErrorCodes.RecordTooLarge, Assert.Single(outcome.Errors).Code);
        Assert.Equal(2, outcome.Errors[0].Line);
        Assert.Equal(3, outcome.Records[1].GetProperty("line").GetInt64());
    }

    [Fact]
    public async Task Unknown_record_shape_names_the_fields_and_the_fix()
    {
        var error = await Assert.ThrowsAsync<IngestionRejectedException>(() => RunAsync("odd.jsonl", "{\"question\":\"a\",\"answer\":\"b\"}\n"));
        Assert.Contains("question, answer", error.Message);
        Assert.Contains("ingest.textField", error.Message);
        var settings = Options.Resolve(new Runs.IngestSpec { TextField = "answer" });
        var outcome = await RunAsync("odd.jsonl", "{\"question\":\"a\",\"answer\":\"b\"}\n", settings);
        Assert.Equal("b", outcome.Records[0].GetProperty("text").GetString());
    }
}
