using System.Text;
using Pipeline.Inference;
using Pipeline.Ingestion;

namespace Pipeline.Tests.Inference;

/// <summary>
/// Inference input reading: the format told by ingestion's detector, rows past the size limit failing alone,
/// long CSV records costing their length, memory bounded however long a line is.
/// </summary>
[Collection(Collection)]
public sealed class InferenceInputTests
{
    /// <summary>Runs alone: one test counts the process's allocations.</summary>
    public const string Collection = "Allocation-counting tests (not run in parallel)";

    private static async Task<List<ShardInputRow>> ReadAsync(Stream stream, string name, int maxRowBytes, InferenceOptions? options = null)
    {
        var rows = new List<ShardInputRow>();
        await foreach (var row in InferenceInput.ReadAsync(stream, name, options ?? new InferenceOptions(), maxRowBytes, CancellationToken.None))
        {
            rows.Add(row);
        }

        return rows;
    }

    private static MemoryStream Utf8(string text) => new(Encoding.UTF8.GetBytes(text));

    [Fact]
    public async Task A_line_longer_than_the_limit_fails_alone_with_an_error_naming_its_line_and_the_limit()
    {
        var input = "{\"custom_id\":\"a\",\"text\":\"fine\"}\n{\"custom_id\":\"b\",\"text\":\"" + new string('x', 5000) + "\"}\r\n{\"custom_id\":\"c\",\"text\":\"also fine\"}";

        var rows = await ReadAsync(Utf8(input), "in.jsonl", 1000);

        Assert.Equal(["a", null, "c"], rows.Select(r => r.CustomId));
        Assert.Equal([0L, 1L, 2L], rows.Select(r => r.Row));
        Assert.Equal([1L, 2L, 3L], rows.Select(r => r.Line));
        Assert.Equal(RecordErrorCodes.RecordTooLarge, rows[1].Code);
        Assert.Contains("Line 2 is 5,027 bytes, over the 1,000 byte limit (Pipeline:Inference:MaxRowBytes)", rows[1].Error, StringComparison.Ordinal);
        Assert.Equal("also fine", rows[2].Text);
    }

    [Fact]
    public async Task A_line_of_hundreds_of_megabytes_is_skipped_without_being_held()
    {
        // 300 million bytes on one line, streamed: never in memory at once.
        using var stream = new GeneratedStream(Encoding.UTF8.GetBytes("first row\n"), (byte)'a', 300_000_000, Encoding.UTF8.GetBytes("\nlast row\n"));
        // The process's allocations: this class runs alone (its collection is not parallel), so they are the reader's.
        var before = GC.GetTotalAllocatedBytes(precise: true);

        var rows = await ReadAsync(stream, "big.txt", InferenceInput.MaxRowBytes);

        var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        Assert.Equal(["first row", null, "last row"], rows.Select(r => r.Text));
        Assert.Equal(RecordErrorCodes.RecordTooLarge, rows[1].Code);
        Assert.Contains("300,000,000 bytes", rows[1].Error, StringComparison.Ordinal);
        // Holding the line would allocate at least 300 MB (600 MB as a string).
        Assert.True(allocated < 50_000_000, $"{allocated:N0} bytes allocated");
    }

    [Fact]
    public async Task A_csv_record_spanning_forty_thousand_lines_is_read_whole()
    {
        // Each line's quote state is carried to the next (QuoteScan), so this costs the record's length; re-scanning
        // the record from its start on each of its lines (as before) took minutes. Speed is left to the benchmarks.
        var cell = string.Join('\n', Enumerable.Range(0, 40_000).Select(i => $"line {i:D5} of a very long quoted cell, \"\"quoted\"\" words"));
        var input = $"id,text\n1,\"{cell}\"\n2,short\n";

        var rows = await ReadAsync(Utf8(input), "long.csv", 8 << 20);

        Assert.Equal(["1", "2"], rows.Select(r => r.CustomId));
        Assert.Equal(cell.Replace("\"\"", "\"", StringComparison.Ordinal), rows[0].Text);
        Assert.Equal(2, rows[0].Line);
        Assert.Equal(40_002, rows[1].Line);
    }

    [Fact]
    public async Task A_quoted_cell_that_never_closes_fails_its_record_at_the_limit_and_reading_resumes()
    {
        var input = "id,text\n1,\"opens\n" + string.Concat(Enumerable.Repeat("more text\n", 200));

        var rows = await ReadAsync(Utf8(input), "open.csv", 500);

        Assert.Equal(RecordErrorCodes.UnterminatedQuote, rows[0].Code);
        Assert.Equal(2, rows[0].Line);
        Assert.Contains("line 2", rows[0].Error, StringComparison.Ordinal);
        Assert.Contains("500 bytes", rows[0].Error, StringComparison.Ordinal);
        // Reading resumed after the failed record: the lines after it are rows again (each with the wrong column count).
        Assert.True(rows.Count > 100, $"{rows.Count} rows");
        Assert.All(rows.Skip(1), r => Assert.Equal(RecordErrorCodes.WrongColumnCount, r.Code));
    }

    [Fact]
    public void The_quote_scan_fed_line_by_line_carries_its_state_across_lines()
    {
        // Each record, and whether it is inside a quoted cell after each of its lines.
        (string Record, bool[] Inside)[] cases =
        [
            ("a,\"b\"\"\nc\",d", [true, false]),
            ("a,\"b\"", [false]),
            ("a,5\" screen,\"x", [true]),
            ("\"\"\"\"", [false]),
            ("\"a\"\"\"\"\nb", [true, true]),
            ("x,\"\n\n\"", [true, true, false]),
            ("\"a\"\"", [true]),
            ("\"ab\"c", [false]),
        ];
        foreach (var (record, inside) in cases)
        {
            var scan = new DelimitedRecordParser.QuoteScan();
            var pieces = record.Split('\n');
            for (var i = 0; i < pieces.Length; i++)
            {
                if (i > 0)
                {
                    scan.Feed("\n"u8);
                }

                scan.Feed(Encoding.UTF8.GetBytes(pieces[i]));
                Assert.True(inside[i] == scan.Inside, $"{record} after line {i + 1}");
            }

            Assert.Equal(inside[^1], DelimitedRecordParser.EndsInsideQuotes(Encoding.UTF8.GetBytes(record)));
        }
    }

    [Fact]
    public async Task The_format_is_told_by_ingestions_detector_and_a_headerless_tsv_gives_its_text_column()
    {
        // A .txt whose lines all have one tab is TSV to ingestion, and its columns are text and label (a small set).
        var lines = Enumerable.Range(0, 20).Select(i => $"sentence number {i} is here\t{i % 2}");

        var rows = await ReadAsync(Utf8(string.Join('\n', lines) + "\n"), "labelled.txt", 1000);

        Assert.Equal(Enumerable.Range(0, 20).Select(i => $"sentence number {i} is here"), rows.Select(r => r.Text));
        Assert.Equal(1, rows[0].Line);

        // No name: JSONL by its first character, CSV by its commas, as ingestion decides.
        Assert.Equal(["one"], (await ReadAsync(Utf8("{\"text\":\"one\"}\n"), "noname", 1000)).Select(r => r.Text));
        Assert.Equal(["hello there", "bye"], (await ReadAsync(Utf8("id,text\n1,hello there\n2,bye\n"), "noname", 1000)).Select(r => r.Text));
    }

    [Fact]
    public async Task Inputs_ingestion_would_refuse_are_refused_with_its_reason()
    {
        var utf16 = await Assert.ThrowsAsync<InferenceRejectedException>(() => ReadAsync(new MemoryStream(Encoding.Unicode.GetBytes("{\"text\":\"one\"}\n{\"text\":\"two\"}\n")), "wide.jsonl", 1000));
        Assert.Equal(InferenceErrorCodes.UnsupportedFormat, utf16.Code);
        Assert.Contains("wide.jsonl", utf16.Message, StringComparison.Ordinal);
        Assert.Contains("UTF-16", utf16.Message, StringComparison.Ordinal);

        var noText = await Assert.ThrowsAsync<InferenceRejectedException>(() => ReadAsync(Utf8("name,score\nx,1\ny,2\nz,3\n"), "scores.csv", 1000));
        Assert.Equal(InferenceErrorCodes.NoTextField, noText.Code);
        Assert.Contains("options.textField", noText.Message, StringComparison.Ordinal);

        var header = await Assert.ThrowsAsync<InferenceRejectedException>(() => ReadAsync(Utf8("text," + new string('h', 3000) + "\nfine,1\n"), "wide-header.csv", 1000));
        Assert.Equal(InferenceErrorCodes.UnsupportedFormat, header.Code);
        Assert.Contains("header (line 1)", header.Message, StringComparison.Ordinal);
    }

    /// <summary>A prefix, then <c>count</c> copies of one byte, then a suffix, produced as read.</summary>
    private sealed class GeneratedStream(byte[] prefix, byte fill, long count, byte[] suffix) : Stream
    {
        private long _position;

        public override int Read(byte[] buffer, int offset, int length) => Read(buffer.AsSpan(offset, length));

        public override int Read(Span<byte> buffer)
        {
            var written = 0;
            while (written < buffer.Length && _position < prefix.Length + count + suffix.Length)
            {
                if (_position >= prefix.Length && _position < prefix.Length + count)
                {
                    var run = (int)Math.Min(buffer.Length - written, prefix.Length + count - _position);
                    buffer.Slice(written, run).Fill(fill);
                    written += run;
                    _position += run;
                    continue;
                }

                buffer[written++] = _position < prefix.Length ? prefix[_position] : suffix[_position - prefix.Length - count];
                _position++;
            }

            return written;
        }

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => prefix.Length + count + suffix.Length;
        public override long Position { get => _position; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int length) => throw new NotSupportedException();
    }
}

[CollectionDefinition(InferenceInputTests.Collection, DisableParallelization = true)]
public sealed class AllocationCountingCollection;
