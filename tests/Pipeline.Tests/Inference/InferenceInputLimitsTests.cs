using System.Diagnostics;
using System.Text;
using Pipeline.Inference;
using Pipeline.Ingestion;

namespace Pipeline.Tests.Inference;

/// <summary>Inference input reading stays bounded: rows past the size limit fail alone, long CSV records cost their length.</summary>
public sealed class InferenceInputLimitsTests
{
    private static async Task<List<ShardInputRow>> ReadAsync(Stream stream, string name, int maxRowChars)
    {
        var rows = new List<ShardInputRow>();
        await foreach (var row in InferenceInput.ReadAsync(stream, name, new InferenceOptions(), maxRowChars, CancellationToken.None))
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
        Assert.Equal([1L, 2L, 3L], rows.Select(r => r.Line));
        Assert.Equal(InferenceInput.RowTooLongCode, rows[1].Code);
        Assert.Contains("Line 2 is longer than 1,000 characters (Pipeline:Inference:MaxRowChars)", rows[1].Error, StringComparison.Ordinal);
        Assert.Equal("also fine", rows[2].Text);
    }

    [Fact]
    public async Task A_line_of_hundreds_of_megabytes_is_skipped_without_being_held()
    {
        // 300 million characters on one line, streamed: never in memory at once.
        using var stream = new GeneratedStream(Encoding.UTF8.GetBytes("first row\n"), (byte)'a', 300_000_000, Encoding.UTF8.GetBytes("\nlast row\n"));
        var before = GC.GetTotalAllocatedBytes(precise: true);

        var rows = await ReadAsync(stream, "big.txt", InferenceInput.MaxRowChars);

        var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        Assert.Equal(["first row", null, "last row"], rows.Select(r => r.Text));
        Assert.Equal(InferenceInput.RowTooLongCode, rows[1].Code);
        // Reading it whole would allocate at least 600 MB (a string of 300 million UTF-16 characters).
        Assert.True(allocated < 300_000_000, $"{allocated:N0} bytes allocated");
    }

    [Fact]
    public async Task A_csv_record_spanning_forty_thousand_lines_is_read_in_linear_time()
    {
        var cell = string.Join('\n', Enumerable.Range(0, 40_000).Select(i => $"line {i:D5} of a very long quoted cell, \"\"quoted\"\" words"));
        var input = $"id,text\n1,\"{cell}\"\n2,short\n";
        var clock = Stopwatch.StartNew();

        var rows = await ReadAsync(Utf8(input), "long.csv", 8 << 20);

        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"{clock.Elapsed.TotalSeconds:N1} s");
        Assert.Equal(["1", "2"], rows.Select(r => r.CustomId));
        Assert.Equal(cell.Replace("\"\"", "\"", StringComparison.Ordinal), rows[0].Text);
        Assert.Equal(40_002, rows[1].Line);
    }

    [Fact]
    public async Task A_quoted_cell_that_never_closes_fails_its_record_at_the_limit_and_reading_resumes()
    {
        var input = "id,text\n1,\"opens\n" + string.Concat(Enumerable.Repeat("more text\n", 200));

        var rows = await ReadAsync(Utf8(input), "open.csv", 500);

        Assert.Equal(RecordErrorCodes.UnterminatedQuote, rows[0].Code);
        Assert.Contains("line 2", rows[0].Error, StringComparison.Ordinal);
        Assert.Contains("500 characters", rows[0].Error, StringComparison.Ordinal);
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
                buffer[written++] = _position < prefix.Length ? prefix[_position]
                    : _position < prefix.Length + count ? fill
                    : suffix[_position - prefix.Length - count];
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
