using System.Buffers;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Pipeline.Ingestion;
using Pipeline.Models;

namespace Pipeline.Inference;

/// <summary>
/// Where a row came from in an input written in OpenAI's batch format (one request per line:
/// <c>custom_id</c>, <c>method</c>, <c>url</c>, <c>body</c>): the request's URL and options, and which item
/// of its <c>body.input</c> the row is (a string input is one item; each string of an array is one).
/// </summary>
public sealed record OpenAiRequestItem
{
    public string? Url { get; init; }
    /// <summary>The request's <c>body.model</c>, when it names one.</summary>
    public string? Model { get; init; }
    /// <summary><c>float</c> (the default) or <c>base64</c>.</summary>
    public string EncodingFormat { get; init; } = OpenAiBatchFormat.FloatEncoding;
    public int? Dimensions { get; init; }
    public int Item { get; init; }
    public int Items { get; init; } = 1;

    public bool IsLast => Item == Items - 1;
}

/// <summary>
/// OpenAI's batch input and output format: requests are read into rows (<see cref="Rows"/>), and a shard's
/// rows, once scored, are written back as one output line per request (<see cref="WriteShard"/>): the
/// response body of <c>/v1/embeddings</c>, or of Pipeline's <c>/v1/classifications</c> for classifier models.
/// </summary>
public static class OpenAiBatchFormat
{
    public const string Embeddings = "/v1/embeddings";
    /// <summary>Pipeline's extension: a classifier model's labels and probabilities (see the README).</summary>
    public const string Classifications = "/v1/classifications";
    public const string FloatEncoding = "float";
    public const string Base64Encoding = "base64";

    public static readonly string[] Served = [Embeddings, Classifications];

    /// <summary>Row error codes of requests (besides ingestion's parse codes and <see cref="RowErrorCodes"/>).</summary>
    public static class Codes
    {
        public const string InvalidRequest = "invalid_request";
        public const string UnsupportedUrl = "unsupported_url";
        public const string UnsupportedMethod = "unsupported_method";
        public const string InvalidInput = "invalid_input";
        public const string InvalidEncodingFormat = "invalid_encoding_format";
        public const string UnsupportedDimensions = "unsupported_dimensions";
        public const string ModelMismatch = "model_mismatch";
        public const string WrongEndpoint = "wrong_endpoint";
    }

    /// <summary>What the platform serves, for messages that refuse a URL.</summary>
    public const string ServedDescription = "Pipeline serves POST /v1/embeddings (embedding models) and POST /v1/classifications (classifier models, a Pipeline extension)";

    /// <summary>
    /// Whether a JSON line is a batch request: an object with a string <c>custom_id</c>, a string <c>method</c>, a
    /// <c>url</c> path starting with <c>/</c> and an object <c>body</c>. Such a first line makes the whole input one.
    /// (A plain record with <c>url</c> and <c>body</c> text fields, as scraped pages often have, is not one.)
    /// </summary>
    public static bool IsRequestLine(string line)
    {
        try
        {
            using var document = JsonDocument.Parse(line);
            return document.RootElement is { ValueKind: JsonValueKind.Object } root
                && root.TryGetProperty("body", out var body) && body.ValueKind == JsonValueKind.Object
                && root.TryGetProperty("url", out var url) && url.ValueKind == JsonValueKind.String && url.GetString()!.StartsWith('/')
                && root.TryGetProperty("custom_id", out var id) && id.ValueKind == JsonValueKind.String
                && root.TryGetProperty("method", out var method) && method.ValueKind == JsonValueKind.String;
        }
        catch (JsonException)
        {
            return false;
        }
    }

    /// <summary>The task a URL asks for, or null when the platform does not serve it.</summary>
    public static string? TaskOf(string? url) => url switch
    {
        Embeddings => ModelTasks.Embedding,
        Classifications => ModelTasks.Classification,
        _ => null,
    };

    /// <summary>
    /// The rows of one request line, numbered from <paramref name="firstRow"/>: one per input item, or a single
    /// row with the error code when the request cannot be served.
    /// </summary>
    public static List<ShardInputRow> Rows(string line, long firstRow, long lineNumber)
    {
        ShardInputRow Fail(string? id, string code, string error, OpenAiRequestItem? item = null) =>
            new() { Row = firstRow, CustomId = id, Line = lineNumber, Code = code, Error = error, OpenAi = item ?? new OpenAiRequestItem() };

        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(line);
        }
        catch (JsonException e)
        {
            return [Fail(null, RecordErrorCodes.MalformedJson, $"Not valid JSON: {e.Message}")];
        }

        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                return [Fail(null, RecordErrorCodes.NotAnObject, $"The line is a JSON {Kind(root)}, not a request object (custom_id, method, url, body).")];
            }

            var id = root.TryGetProperty("custom_id", out var idValue) && idValue.ValueKind == JsonValueKind.String ? idValue.GetString() : null;
            if (string.IsNullOrEmpty(id))
            {
                return [Fail(null, Codes.InvalidRequest, "The request has no custom_id: give every line a unique string custom_id.")];
            }

            var url = root.TryGetProperty("url", out var urlValue) && urlValue.ValueKind == JsonValueKind.String ? urlValue.GetString() : null;
            if (TaskOf(url) is null)
            {
                return [Fail(id, Codes.UnsupportedUrl, $"url '{url}' is not served: {ServedDescription}.", new OpenAiRequestItem { Url = url })];
            }

            var method = root.TryGetProperty("method", out var methodValue) && methodValue.ValueKind == JsonValueKind.String ? methodValue.GetString() : null;
            if (!string.Equals(method, "POST", StringComparison.Ordinal))
            {
                return [Fail(id, Codes.UnsupportedMethod, $"method is '{method}'; batch requests are POST.", new OpenAiRequestItem { Url = url })];
            }

            if (!root.TryGetProperty("body", out var body) || body.ValueKind != JsonValueKind.Object)
            {
                return [Fail(id, Codes.InvalidRequest, "body is not an object: give it {\"model\": ..., \"input\": ...}.", new OpenAiRequestItem { Url = url })];
            }

            var request = new OpenAiRequestItem { Url = url, Model = body.TryGetProperty("model", out var model) && model.ValueKind == JsonValueKind.String ? model.GetString() : null };
            if (body.TryGetProperty("encoding_format", out var encoding))
            {
                if (encoding.ValueKind != JsonValueKind.String || encoding.GetString() is not (FloatEncoding or Base64Encoding))
                {
                    return [Fail(id, Codes.InvalidEncodingFormat, $"body.encoding_format is {encoding.GetRawText()}; use \"float\" or \"base64\".", request)];
                }

                request = request with { EncodingFormat = encoding.GetString()! };
            }

            if (body.TryGetProperty("dimensions", out var dimensions))
            {
                if (!dimensions.TryGetInt32(out var wanted) || wanted < 1)
                {
                    return [Fail(id, Codes.UnsupportedDimensions, $"body.dimensions is {dimensions.GetRawText()}; it is a positive integer, and only the model's own width is served.", request)];
                }

                request = request with { Dimensions = wanted };
            }

            if (!body.TryGetProperty("input", out var input))
            {
                return [Fail(id, Codes.InvalidInput, "body has no input: give a string, or an array of strings.", request)];
            }

            if (input.ValueKind == JsonValueKind.String)
            {
                return [Item(id, lineNumber, firstRow, request, input.GetString()!, 0, 1)];
            }

            if (input.ValueKind != JsonValueKind.Array || input.GetArrayLength() == 0 || input.EnumerateArray().Any(i => i.ValueKind != JsonValueKind.String))
            {
                return [Fail(id, Codes.InvalidInput, input.ValueKind == JsonValueKind.Array && input.GetArrayLength() > 0
                    ? "body.input holds items that are not strings: token arrays are not served, send the text."
                    : $"body.input is {(input.ValueKind == JsonValueKind.Array ? "an empty array" : "a " + Kind(input))}; give a string, or an array of strings.", request)];
            }

            var items = input.GetArrayLength();
            var rows = new List<ShardInputRow>(items);
            var index = 0;
            foreach (var text in input.EnumerateArray())
            {
                rows.Add(Item(id, lineNumber, firstRow + index, request, text.GetString()!, index, items));
                index++;
            }

            return rows;
        }
    }

    private static ShardInputRow Item(string id, long line, long row, OpenAiRequestItem request, string text, int index, int items)
    {
        var item = request with { Item = index, Items = items };
        return string.IsNullOrWhiteSpace(text)
            ? new ShardInputRow { Row = row, CustomId = id, Line = line, OpenAi = item, Code = RecordErrorCodes.EmptyText, Error = items == 1 ? "body.input is empty." : $"body.input[{index}] is empty." }
            : new ShardInputRow { Row = row, CustomId = id, Line = line, OpenAi = item, Text = text };
    }

    private static string Kind(JsonElement value) => value.ValueKind.ToString().ToLowerInvariant();

    /// <summary>Why a request's row cannot be served by the batch's model (before scoring), or null.</summary>
    public static (string Code, string Error)? Refusal(OpenAiRequestItem request, ModelManifest model)
    {
        if (request.Model is { } named && !string.Equals(named, model.ModelId, StringComparison.Ordinal))
        {
            return (Codes.ModelMismatch, $"body.model is '{named}', but this batch is scored by model '{model.ModelId}': put requests for another model in a batch of their own.");
        }

        return TaskOf(request.Url) == model.Task
            ? null
            : (Codes.WrongEndpoint, $"Model '{model.ModelId}' is a{(model.Task == ModelTasks.Embedding ? "n embedding" : " classifier")} model, served at {(model.Task == ModelTasks.Embedding ? Embeddings : Classifications)}, not {request.Url}.");
    }

    /// <summary>Why a scored row does not answer its request (the width asked for), or null.</summary>
    public static (string Code, string Error)? Mismatch(OpenAiRequestItem request, int width) =>
        request.Dimensions is { } wanted && wanted != width
            ? (Codes.UnsupportedDimensions, $"body.dimensions is {wanted}, but the model's vectors have {width} dimensions and are not shortened: omit dimensions or ask for {width}.")
            : null;

    /// <summary>A row as scored: its values and token count, or its error.</summary>
    public readonly record struct RowOutcome(float[]? Values, int Tokens, string? Code, string? Error);

    /// <summary>
    /// One output line per request of the shard's rows (a request's items are consecutive, on one line of the
    /// input, and never split across shards): answered requests to <c>output</c>, requests with a failed item to <c>errors</c>.
    /// </summary>
    public static (BinaryData Output, BinaryData Errors, int Requests, int Failed) WriteShard(string batchId, IReadOnlyList<ShardInputRow> rows, IReadOnlyList<RowOutcome> outcomes, ModelManifest model)
    {
        var output = new ArrayBufferWriter<byte>(1 << 16);
        var errors = new ArrayBufferWriter<byte>(1 << 12);
        using var outputJson = new Utf8JsonWriter(output);
        using var errorJson = new Utf8JsonWriter(errors);
        int requests = 0, failed = 0;
        for (var start = 0; start < rows.Count;)
        {
            // A request's items are its line's rows (a retry may hold only some of them).
            var end = start + 1;
            while (end < rows.Count && rows[end].Line == rows[start].Line)
            {
                end++;
            }

            requests++;
            var firstFailure = -1;
            for (var i = start; i < end && firstFailure < 0; i++)
            {
                firstFailure = outcomes[i].Values is null ? i : -1;
            }

            if (firstFailure >= 0)
            {
                failed++;
                var row = rows[firstFailure];
                errorJson.Reset();
                WriteEnvelopeStart(errorJson, batchId, row);
                errorJson.WriteNull("response");
                errorJson.WriteStartObject("error");
                errorJson.WriteString("code", outcomes[firstFailure].Code ?? RowErrorCodes.ModelError);
                errorJson.WriteString("message", $"line {row.Line}: {outcomes[firstFailure].Error}");
                errorJson.WriteEndObject();
                errorJson.WriteEndObject();
                errorJson.Flush();
                errors.Write("\n"u8);
            }
            else
            {
                outputJson.Reset();
                WriteResponse(outputJson, batchId, rows, outcomes, start, end, model);
                outputJson.Flush();
                output.Write("\n"u8);
            }

            start = end;
        }

        return (new BinaryData(output.WrittenMemory.ToArray()), new BinaryData(errors.WrittenMemory.ToArray()), requests, failed);
    }

    private static void WriteResponse(Utf8JsonWriter json, string batchId, IReadOnlyList<ShardInputRow> rows, IReadOnlyList<RowOutcome> outcomes, int start, int end, ModelManifest model)
    {
        var first = rows[start];
        var request = first.OpenAi ?? new OpenAiRequestItem();
        WriteEnvelopeStart(json, batchId, first);
        json.WriteStartObject("response");
        json.WriteNumber("status_code", 200);
        json.WriteString("request_id", "req_" + Id(batchId, first.CustomId, first.Row));
        json.WriteStartObject("body");
        json.WriteString("object", "list");
        json.WriteStartArray("data");
        var tokens = 0L;
        for (var i = start; i < end; i++)
        {
            var values = outcomes[i].Values!;
            tokens += outcomes[i].Tokens;
            json.WriteStartObject();
            json.WriteString("object", model.Task == ModelTasks.Classification ? "classification" : "embedding");
            json.WriteNumber("index", rows[i].OpenAi?.Item ?? i - start);
            if (model.Task == ModelTasks.Classification)
            {
                var best = 0;
                for (var v = 1; v < values.Length; v++)
                {
                    best = values[v] > values[best] ? v : best;
                }

                json.WriteString("label", BatchLineWriter.LabelName(model, best));
                json.WriteStartObject("probabilities");
                for (var v = 0; v < values.Length; v++)
                {
                    json.WriteNumber(BatchLineWriter.LabelName(model, v), MathF.Round(values[v], 6));
                }

                json.WriteEndObject();
            }
            else if (request.EncodingFormat == Base64Encoding)
            {
                // As OpenAI encodes it: the float32 values' little-endian bytes.
                json.WriteString("embedding", Convert.ToBase64String(MemoryMarshal.AsBytes(values.AsSpan())));
            }
            else
            {
                json.WriteStartArray("embedding");
                foreach (var value in values)
                {
                    json.WriteNumberValue(value);
                }

                json.WriteEndArray();
            }

            json.WriteEndObject();
        }

        json.WriteEndArray();
        json.WriteString("model", model.ModelId);
        json.WriteStartObject("usage");
        json.WriteNumber("prompt_tokens", tokens);
        json.WriteNumber("total_tokens", tokens);
        json.WriteEndObject();
        json.WriteEndObject();
        json.WriteEndObject();
        json.WriteNull("error");
        json.WriteEndObject();
    }

    private static void WriteEnvelopeStart(Utf8JsonWriter json, string batchId, ShardInputRow row)
    {
        json.WriteStartObject();
        json.WriteString("id", "batch_req_" + Id(batchId, row.CustomId, row.Row));
        if (row.CustomId is null)
        {
            json.WriteNull("custom_id");
        }
        else
        {
            json.WriteString("custom_id", row.CustomId);
        }
    }

    /// <summary>A stable id for a request of a batch: a redelivered shard writes the same lines.</summary>
    private static string Id(string batchId, string? customId, long row) =>
        Convert.ToHexStringLower(XxHash128.Hash(Encoding.UTF8.GetBytes($"{batchId}|{customId}|{row}")));

    /// <summary>A row's outcome read back from its results or errors line (when a retry is merged).</summary>
    public static RowOutcome OutcomeOf(string? resultLine, string? errorLine)
    {
        if (resultLine is not null)
        {
            using var result = JsonDocument.Parse(resultLine);
            var root = result.RootElement;
            var values = root.TryGetProperty("embedding", out var embedding)
                ? [.. embedding.EnumerateArray().Select(v => v.GetSingle())]
                : root.GetProperty("probabilities").EnumerateObject().Select(p => p.Value.GetSingle()).ToArray();
            return new RowOutcome(values, root.TryGetProperty("tokens", out var tokens) ? tokens.GetInt32() : 0, null, null);
        }

        if (errorLine is null)
        {
            return new RowOutcome(null, 0, RowErrorCodes.ModelError, "The row produced no output.");
        }

        using var error = JsonDocument.Parse(errorLine);
        return new RowOutcome(null, 0, error.RootElement.GetProperty("code").GetString(), error.RootElement.GetProperty("error").GetString());
    }
}
