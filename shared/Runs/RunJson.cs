using System.Text.Json;
using System.Text.Json.Serialization;

namespace Pipeline.Runs;

[JsonSerializable(typeof(Dictionary<string, string>))]
[JsonSerializable(typeof(Dictionary<string, long>))]
[JsonSerializable(typeof(Dictionary<string, double>))]
internal sealed partial class RunJsonContext : JsonSerializerContext;

internal static class RunJson
{
    public static Dictionary<string, string> ReadStrings(string? json) =>
        string.IsNullOrEmpty(json) ? [] : JsonSerializer.Deserialize(json, RunJsonContext.Default.DictionaryStringString) ?? [];

    public static Dictionary<string, long> ReadCounts(string? json) =>
        string.IsNullOrEmpty(json) ? [] : JsonSerializer.Deserialize(json, RunJsonContext.Default.DictionaryStringInt64) ?? [];

    public static Dictionary<string, double> ReadTimings(string? json) =>
        string.IsNullOrEmpty(json) ? [] : JsonSerializer.Deserialize(json, RunJsonContext.Default.DictionaryStringDouble) ?? [];

    public static string Write(Dictionary<string, string> value) => JsonSerializer.Serialize(value, RunJsonContext.Default.DictionaryStringString);
    public static string Write(Dictionary<string, long> value) => JsonSerializer.Serialize(value, RunJsonContext.Default.DictionaryStringInt64);
    public static string Write(Dictionary<string, double> value) => JsonSerializer.Serialize(value, RunJsonContext.Default.DictionaryStringDouble);
}
