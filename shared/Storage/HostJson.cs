using System.Text.Json;
using Microsoft.Extensions.Configuration;

namespace Pipeline.Hosting;

/// <summary>Loads <c>host.json</c> into configuration under <c>AzureFunctionsJobHost</c>, where app settings can override it as in Azure.</summary>
public static class HostJson
{
    public const string Prefix = "AzureFunctionsJobHost";

    public static IConfigurationBuilder AddHostJson(this IConfigurationBuilder builder, string appRoot)
    {
        var path = Path.Combine(appRoot, "host.json");
        if (!File.Exists(path))
        {
            throw new FileNotFoundException($"host.json was not found in {appRoot}: run from the function app folder (the build or publish output of functions/).", path);
        }

        var values = new Dictionary<string, string?>(StringComparer.OrdinalIgnoreCase);
        using (var document = JsonDocument.Parse(File.ReadAllText(path), new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip }))
        {
            Flatten(document.RootElement, Prefix, values);
        }

        builder.AddInMemoryCollection(values);
        // App settings win over host.json, as in Azure (AzureFunctionsJobHost__extensions__queues__batchSize).
        builder.AddEnvironmentVariables();
        return builder;
    }

    private static void Flatten(JsonElement element, string path, Dictionary<string, string?> values)
    {
        switch (element.ValueKind)
        {
            case JsonValueKind.Object:
                foreach (var property in element.EnumerateObject())
                {
                    Flatten(property.Value, $"{path}:{property.Name}", values);
                }

                break;
            case JsonValueKind.Array:
                var index = 0;
                foreach (var item in element.EnumerateArray())
                {
                    Flatten(item, $"{path}:{index++}", values);
                }

                break;
            default:
                values[path] = element.ValueKind == JsonValueKind.String ? element.GetString() : element.GetRawText();
                break;
        }
    }
}
