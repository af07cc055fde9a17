namespace Pipeline.Ingestion;

/// <summary>The field names (JSONL) and column headers (CSV/TSV) recognised for each role, in priority order.</summary>
public static class FieldNames
{
    public static readonly string[] Text = ["text", "sentence", "content", "input", "review", "document", "body", "utterance", "query"];
    public static readonly string[] Label = ["label", "target", "class", "category", "sentiment", "intent", "y"];
    public static readonly string[] Id = ["custom_id", "id", "uid", "key"];
    public const string Messages = "messages";
    public const string Prompt = "prompt";
    public const string Completion = "completion";
    public static readonly string[] ChatRoles = ["system", "developer", "user", "assistant", "tool", "function"];

    public static int IndexOf(IReadOnlyList<string> names, string[] aliases, string? preferred)
    {
        if (preferred is not null)
        {
            for (var i = 0; i < names.Count; i++)
            {
                if (string.Equals(names[i], preferred, StringComparison.OrdinalIgnoreCase))
                {
                    return i;
                }
            }

            return -1;
        }

        foreach (var alias in aliases)
        {
            for (var i = 0; i < names.Count; i++)
            {
                if (string.Equals(names[i].Trim(), alias, StringComparison.OrdinalIgnoreCase))
                {
                    return i;
                }
            }
        }

        return -1;
    }
}
