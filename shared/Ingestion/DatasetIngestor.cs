using System.Buffers;
using System.Diagnostics;
using System.Text.Encodings.Web;
using System.Text.Json;
using Pipeline.Messaging;

namespace Pipeline.Ingestion;

/// <summary>The outcome of reading one source: what was detected, the counts and the hash.</summary>
public sealed record IngestResult(
    DetectedFormat Detected,
    string? LabelType,
    Dictionary<string, long> LabelCounts,
    IngestCounts Counts,
    bool DuplicatesExact,
    string Sha256,
    RecordError[] FirstErrors)
{
    /// <summary>The rejection this result earns under <paramref name="settings"/>, or null when it passes.</summary>
    public IngestionRejectedException? Rejection(IngestSettings settings)
    {
        if (Counts.Valid == 0)
        {
            return new IngestionRejectedException(RejectionCodes.NoValidRecords,
                Counts.Read == 0
                    ? "The file has no records (only blank lines or a header)."
                    : $"None of the {Counts.Read} records is valid. The first problem: {Describe(FirstErrors.FirstOrDefault())}. See errors.jsonl for every record.");
        }

        var fraction = Counts.Read == 0 ? 0 : (double)Counts.Invalid / Counts.Read;
        if (fraction > settings.MaxInvalidFraction)
        {
            return new IngestionRejectedException(RejectionCodes.TooManyInvalidRecords,
                $"{Counts.Invalid} of {Counts.Read} records ({fraction:P1}) are invalid, more than the allowed {settings.MaxInvalidFraction:P1}. " +
                $"The first problem: {Describe(FirstErrors.FirstOrDefault())}. Fix the records listed in errors.jsonl, or raise ingest.maxInvalidFraction in the run spec.");
        }

        return null;
    }

    private static string Describe(RecordError? error) => error is null ? "none recorded" : $"line {error.Line}: {error.Message}";
}

/// <summary>
/// Streams a source through validation into canonical JSONL records and an errors file, with bounded
/// memory: one line buffer, one record buffer and one output chunk, whatever the file size.
/// </summary>
public sealed class DatasetIngestor
{
    private const int OutputChunkBytes = 1 << 20;
    private static readonly byte[] Newline = "\n"u8.ToArray();

    private readonly IngestionOptions _options;

    public DatasetIngestor(IngestionOptions options) => _options = options;

    public async Task<IngestResult> RunAsync(
        Stream source,
        string sourceName,
        long sourceLength,
        IngestSettings settings,
        Stream records,
        Stream errors,
        Func<IngestCounts, ValueTask>? progress,
        CancellationToken cancellationToken)
    {
        using var reader = new LineReader(source, settings.MaxRecordBytes);
        var head = await reader.PeekAsync(FormatDetector.SniffBytes, cancellationToken);
        FormatDetector.CheckEncoding(head.Span, sourceLength);
        if (head.Span.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF]))
        {
            reader.Skip(3);
            head = head[3..];
        }

        var detected = FormatDetector.Detect(sourceName, head.Span, head.Length >= sourceLength - 3, settings);
        var state = new State(_options, settings, records, errors);
        var clock = Stopwatch.StartNew();
        var lastProgress = TimeSpan.Zero;
        // The clock is read only when the reader has taken in more bytes (once a buffer, not once a record).
        var bytesAtLastCheck = 0L;

        var jsonl = detected.Format == DataFormats.Jsonl ? new JsonlRecordParser(detected.RecordKind, settings.TextField, settings.LabelField) : null;
        var delimited = detected.Format is DataFormats.Csv or DataFormats.Tsv ? new DelimitedRecordParser(detected.Format, detected.Columns!) : null;
        var pending = new ArrayBufferWriter<byte>(4096);
        // The quote state of the pending CSV record, fed one line at a time: a record across many lines costs its length.
        var quotes = new DelimitedRecordParser.QuoteScan();
        long pendingLine = 0;
        var skipHeader = detected.HasHeader == true;

        while (reader.TryReadLine() || await reader.ReadLineAsync(cancellationToken))
        {
            state.Lines++;
            if (reader.LineTooLong)
            {
                if (pending.WrittenCount > 0)
                {
                    pending.Clear();
                    await state.InvalidAsync(new RecordError(pendingLine, RecordErrorCodes.RecordTooLarge, $"the record is over the {settings.MaxRecordBytes} byte limit"), cancellationToken);
                }

                state.Read++;
                await state.InvalidAsync(new RecordError(reader.LineNumber, RecordErrorCodes.RecordTooLarge, $"the line is {reader.LineBytes} bytes, over the {settings.MaxRecordBytes} byte limit"), cancellationToken);
                continue;
            }

            var line = reader.Line;
            if (detected.Format == DataFormats.Text)
            {
                await DocumentLineAsync(state, pending, line, reader.LineNumber, ref pendingLine, cancellationToken);
            }
            else if (pending.WrittenCount > 0)
            {
                // A CSV record continued from earlier lines (a quoted field with line breaks).
                pending.Write("\n"u8);
                pending.Write(line);
                quotes.Feed("\n"u8);
                quotes.Feed(line);
                if (pending.WrittenCount > settings.MaxRecordBytes)
                {
                    pending.Clear();
                    state.Read++;
                    await state.InvalidAsync(new RecordError(pendingLine, RecordErrorCodes.UnterminatedQuote, $"a quoted field is never closed within {settings.MaxRecordBytes} bytes"), cancellationToken);
                }
                else if (!quotes.Inside)
                {
                    state.Read++;
                    await state.RecordAsync(delimited!.Parse(pending.WrittenSpan, pendingLine, state.Writer), pendingLine, cancellationToken);
                    pending.Clear();
                }
            }
            else if (Utf8Text.IsBlank(line))
            {
                state.BlankLines++;
            }
            else if (skipHeader)
            {
                skipHeader = false;
                state.HeaderRows++;
            }
            else if (jsonl is not null)
            {
                state.Read++;
                await state.RecordAsync(jsonl.Parse(line, reader.LineNumber, state.Writer), reader.LineNumber, cancellationToken);
            }
            else if (detected.Format == DataFormats.Csv && StartsRecordInsideQuotes(ref quotes, line))
            {
                pending.Write(line);
                pendingLine = reader.LineNumber;
            }
            else
            {
                state.Read++;
                await state.RecordAsync(delimited!.Parse(line, reader.LineNumber, state.Writer), reader.LineNumber, cancellationToken);
            }

            if (progress is not null && reader.BytesRead != bytesAtLastCheck)
            {
                bytesAtLastCheck = reader.BytesRead;
                if (clock.Elapsed - lastProgress >= _options.ProgressInterval)
                {
                    lastProgress = clock.Elapsed;
                    await progress(state.Counts(reader.BytesRead));
                }
            }
        }

        if (pending.WrittenCount > 0)
        {
            state.Read++;
            if (detected.Format == DataFormats.Text)
            {
                await state.DocumentAsync(pending.WrittenSpan, pendingLine, cancellationToken);
            }
            else
            {
                await state.InvalidAsync(new RecordError(pendingLine, RecordErrorCodes.UnterminatedQuote, "a quoted field is never closed before the end of the file"), cancellationToken);
            }
        }

        var sha256 = await reader.FinishHashAsync(cancellationToken);
        await state.FlushAsync(cancellationToken);
        return new IngestResult(
            detected,
            jsonl?.LabelType ?? (detected.Columns?.Contains("label") == true ? "string" : null),
            (jsonl?.Labels ?? delimited?.Labels)?.ToDictionary() ?? [],
            state.Counts(reader.BytesRead),
            state.DuplicatesExact,
            sha256,
            [.. state.FirstErrors]);
    }

    /// <summary>Whether <paramref name="line"/> ends inside a quoted field; <paramref name="quotes"/> then holds its state for the lines that follow.</summary>
    private static bool StartsRecordInsideQuotes(ref DelimitedRecordParser.QuoteScan quotes, ReadOnlySpan<byte> line)
    {
        quotes = new DelimitedRecordParser.QuoteScan();
        quotes.Feed(line);
        return quotes.Inside;
    }

    private static ValueTask DocumentLineAsync(State state, ArrayBufferWriter<byte> paragraph, ReadOnlySpan<byte> line, long lineNumber, ref long paragraphLine, CancellationToken cancellationToken)
    {
        if (Utf8Text.IsBlank(line))
        {
            state.BlankLines++;
            if (paragraph.WrittenCount == 0)
            {
                return ValueTask.CompletedTask;
            }

            // DocumentAsync copies the paragraph before it first yields, so the buffer can be reused at once.
            state.Read++;
            var written = state.DocumentAsync(paragraph.WrittenSpan, paragraphLine, cancellationToken);
            paragraph.Clear();
            return written;
        }

        if (paragraph.WrittenCount == 0)
        {
            paragraphLine = lineNumber;
        }
        else
        {
            paragraph.Write("\n"u8);
        }

        paragraph.Write(line);
        return ValueTask.CompletedTask;
    }

    /// <summary>Counters and output buffers of one run.</summary>
    private sealed class State
    {
        private readonly IngestionOptions _options;
        private readonly IngestSettings _settings;
        private readonly Stream _records;
        private readonly Stream _errors;
        private readonly byte[] _recordsChunk = new byte[OutputChunkBytes];
        private readonly ArrayBufferWriter<byte> _errorsChunk = new(64 * 1024);
        private readonly Utf8JsonWriter _errorWriter;
        private readonly DuplicateCounter _duplicates;
        private int _recordsLength;

        public State(IngestionOptions options, IngestSettings settings, Stream records, Stream errors)
        {
            _options = options;
            _settings = settings;
            _records = records;
            _errors = errors;
            _duplicates = new DuplicateCounter(options.DuplicateTrackingLimit);
            var writerOptions = new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping, SkipValidation = true };
            _errorWriter = new Utf8JsonWriter(_errorsChunk, writerOptions);
        }

        public CanonicalRecordWriter Writer { get; } = new();
        public long Lines;
        public long Read;
        public long Valid;
        public long Invalid;
        public long BlankLines;
        public long HeaderRows;
        public bool DuplicatesExact => _duplicates.Exact;
        public readonly List<RecordError> FirstErrors = [];

        public IngestCounts Counts(long bytes) => new()
        {
            Lines = Lines,
            Read = Read,
            Valid = Valid,
            Invalid = Invalid,
            Duplicates = _duplicates.Duplicates,
            BlankLines = BlankLines,
            HeaderRows = HeaderRows,
            Bytes = bytes,
        };

        /// <summary>Completes the record the parser wrote into <see cref="Writer"/>, or records its error.</summary>
        public ValueTask RecordAsync(RecordError? error, long line, CancellationToken cancellationToken)
        {
            if (error is not null)
            {
                ResetRecord();
                return InvalidAsync(error, cancellationToken);
            }

            _duplicates.Add(Writer.Written);
            Writer.WriteNumber("line"u8, line);
            Writer.WriteEndObject();
            Valid++;
            return AppendAsync(Writer.Written, cancellationToken);
        }

        public ValueTask DocumentAsync(ReadOnlySpan<byte> paragraph, long line, CancellationToken cancellationToken)
        {
            if (paragraph.Length > _settings.MaxRecordBytes)
            {
                return InvalidAsync(new RecordError(line, RecordErrorCodes.RecordTooLarge, $"the paragraph is {paragraph.Length} bytes, over the {_settings.MaxRecordBytes} byte limit"), cancellationToken);
            }

            if (!System.Text.Unicode.Utf8.IsValid(paragraph))
            {
                return InvalidAsync(new RecordError(line, RecordErrorCodes.InvalidUtf8, $"invalid UTF-8 at byte {Utf8Text.FirstInvalidByte(paragraph)} of the paragraph"), cancellationToken);
            }

            ResetRecord();
            Writer.WriteStartObject();
            Writer.WriteString("text"u8, paragraph);
            return RecordAsync(null, line, cancellationToken);
        }

        public async ValueTask InvalidAsync(RecordError error, CancellationToken cancellationToken)
        {
            Invalid++;
            if (FirstErrors.Count < _options.ReportedErrors)
            {
                FirstErrors.Add(error);
            }

            JsonSerializer.Serialize(_errorWriter, error, PipelineJson.Default.RecordError);
            _errorWriter.Flush();
            _errorsChunk.Write("\n"u8);
            _errorWriter.Reset(_errorsChunk);
            if (_errorsChunk.WrittenCount > 64 * 1024)
            {
                await _errors.WriteAsync(_errorsChunk.WrittenMemory, cancellationToken);
                _errorsChunk.Clear();
                _errorWriter.Reset(_errorsChunk);
            }
        }

        private void ResetRecord() => Writer.Reset();

        private ValueTask AppendAsync(ReadOnlySpan<byte> record, CancellationToken cancellationToken)
        {
            if (_recordsLength + record.Length + 1 <= _recordsChunk.Length)
            {
                record.CopyTo(_recordsChunk.AsSpan(_recordsLength));
                _recordsLength += record.Length;
                _recordsChunk[_recordsLength++] = (byte)'\n';
                ResetRecord();
                return ValueTask.CompletedTask;
            }

            return AppendSlowAsync(cancellationToken);
        }

        private async ValueTask AppendSlowAsync(CancellationToken cancellationToken)
        {
            await _records.WriteAsync(_recordsChunk.AsMemory(0, _recordsLength), cancellationToken);
            _recordsLength = 0;
            await _records.WriteAsync(Writer.Written.ToArray(), cancellationToken);
            await _records.WriteAsync(Newline, cancellationToken);
            ResetRecord();
        }

        public async ValueTask FlushAsync(CancellationToken cancellationToken)
        {
            await _records.WriteAsync(_recordsChunk.AsMemory(0, _recordsLength), cancellationToken);
            _recordsLength = 0;
            await _errors.WriteAsync(_errorsChunk.WrittenMemory, cancellationToken);
            _errorsChunk.Clear();
        }
    }
}
