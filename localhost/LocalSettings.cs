using System.Text.Json.Nodes;

namespace Pipeline.LocalHost;

/// <summary><c>local.settings.json</c> in the app folder, as Core Tools reads it: its <c>Values</c> become app settings.</summary>
public static class LocalSettings
{
    public const string FileName = "local.settings.json";

    public static Dictionary<string, string> Load(string appRoot)
    {
        var path = Path.Combine(appRoot, FileName);
        var values = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        if (File.Exists(path) && JsonNode.Parse(File.ReadAllText(path))?["Values"] is JsonObject settings)
        {
            foreach (var (key, value) in settings)
            {
                if (value is not null)
                {
                    values[key] = value.ToString();
                }
            }
        }

        return values;
    }
}
