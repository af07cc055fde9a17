using System.Text.Json;
using System.Text.Json.Nodes;

namespace Pipeline.Models;

/// <summary>
/// How token vectors become one sentence vector: <c>mean</c> over the attention mask (default), <c>cls</c> (the
/// first token) or <c>max</c> (over the real tokens), then L2 normalisation or not. Written <c>mean</c>,
/// <c>mean+normalize</c>, <c>cls</c>, <c>max+normalize</c>... in settings.
/// </summary>
public sealed record Pooling(string Mode, bool Normalize)
{
    public const string Mean = "mean";
    public const string Cls = "cls";
    public const string Max = "max";
    public const string NormalizeSuffix = "+normalize";
    public static readonly string[] Modes = [Mean, Cls, Max];

    /// <summary>The default when a folder says nothing (Hugging Face's feature-extraction pipeline mean-pools without normalising).</summary>
    public static Pooling Default { get; } = new(Mean, false);

    public override string ToString() => Normalize ? Mode + NormalizeSuffix : Mode;

    /// <summary>Parses <c>mean</c>, <c>cls</c>, <c>max</c>, each optionally with <c>+normalize</c>; null when the text is none of those.</summary>
    public static Pooling? TryParse(string? text)
    {
        if (string.IsNullOrWhiteSpace(text))
        {
            return null;
        }

        var normalize = text.EndsWith(NormalizeSuffix, StringComparison.OrdinalIgnoreCase);
        var mode = (normalize ? text[..^NormalizeSuffix.Length] : text).Trim().ToLowerInvariant();
        return Modes.Contains(mode) ? new Pooling(mode, normalize) : null;
    }

    public static string Describe => $"use {string.Join(", ", Modes)}, each optionally with '{NormalizeSuffix}' (for example 'mean{NormalizeSuffix}')";

    /// <summary>
    /// The pooling a sentence-transformers folder declares: <c>modules.json</c> lists a Pooling module (its
    /// <c>config.json</c> says the mode) and, for normalised models, a Normalize module. Null when the files are absent.
    /// </summary>
    public static Pooling? FromSentenceTransformers(string? modulesJson, Func<string, string?> readFile, string folder)
    {
        if (modulesJson is null)
        {
            return null;
        }

        if (JsonNode.Parse(modulesJson) is not JsonArray modules)
        {
            throw new ModelRejectedException($"models/{folder}/modules.json is not a list of sentence-transformers modules.");
        }

        string? Type(JsonNode? module) => module?["type"]?.GetValue<string>();
        var pooling = modules.FirstOrDefault(m => Type(m)?.EndsWith(".Pooling", StringComparison.Ordinal) == true);
        var normalize = modules.Any(m => Type(m)?.EndsWith(".Normalize", StringComparison.Ordinal) == true);
        if (pooling is null)
        {
            return new Pooling(Mean, normalize);
        }

        var path = pooling["path"]?.GetValue<string>() is { Length: > 0 } p ? p.TrimEnd('/') + "/config.json" : "1_Pooling/config.json";
        var config = readFile(path) is { } text ? JsonNode.Parse(text) as JsonObject : null;
        if (config is null)
        {
            return new Pooling(Mean, normalize);
        }

        bool Flag(string name) => config[name] is JsonValue v && v.GetValueKind() == JsonValueKind.True;
        var mode = Flag("pooling_mode_cls_token") ? Cls : Flag("pooling_mode_max_tokens") ? Max : Flag("pooling_mode_mean_tokens") ? Mean
            : throw new ModelRejectedException($"models/{folder}/{path} asks for a pooling Pipeline does not compute (it supports pooling_mode_mean_tokens, pooling_mode_cls_token and pooling_mode_max_tokens).");
        return new Pooling(mode, normalize);
    }
}
