using System.Text.Json;
using Microsoft.Extensions.Configuration;

namespace Pipeline.Hosting;

/// <summary>A function as declared by <c>&lt;name&gt;/function.json</c>: its trigger binding.</summary>
public sealed record FunctionDefinition(string Name, string TriggerType, string BindingName, string? QueueName, string? Connection);

/// <summary>Reads the function app layout (one folder per function with its function.json), as the Functions host does.</summary>
public static class FunctionDefinitions
{
    public static List<FunctionDefinition> Load(string appRoot, IConfiguration settings)
    {
        var functions = new List<FunctionDefinition>();
        foreach (var file in Directory.GetFiles(appRoot, "function.json", SearchOption.AllDirectories).Order(StringComparer.Ordinal))
        {
            if (Path.GetDirectoryName(Path.GetDirectoryName(file)) != Path.TrimEndingDirectorySeparator(appRoot))
            {
                continue;
            }

            using var document = JsonDocument.Parse(File.ReadAllText(file));
            var trigger = document.RootElement.GetProperty("bindings").EnumerateArray()
                .FirstOrDefault(b => b.GetProperty("type").GetString()?.EndsWith("Trigger", StringComparison.Ordinal) == true);
            if (trigger.ValueKind != JsonValueKind.Object)
            {
                continue;
            }

            functions.Add(new FunctionDefinition(
                Path.GetFileName(Path.GetDirectoryName(file)!),
                trigger.GetProperty("type").GetString()!,
                trigger.GetProperty("name").GetString()!,
                trigger.TryGetProperty("queueName", out var queue) ? Resolve(queue.GetString()!, settings) : null,
                trigger.TryGetProperty("connection", out var connection) ? connection.GetString() : null));
        }

        return functions;
    }

    /// <summary>Resolves <c>%Setting%</c> references the way the host does.</summary>
    public static string Resolve(string value, IConfiguration settings) =>
        value.Length > 2 && value[0] == '%' && value[^1] == '%'
            ? settings[value[1..^1]] ?? throw new InvalidOperationException($"function.json refers to the app setting '{value[1..^1]}', which is not set.")
            : value;
}
