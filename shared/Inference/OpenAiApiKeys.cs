using System.Security.Cryptography;
using System.Text;

namespace Pipeline.Inference;

/// <summary>
/// Who may call the <c>/v1</c> routes. OpenAI's SDKs send <c>Authorization: Bearer &lt;key&gt;</c>, which the Azure
/// Functions host does not take as a function key, so these routes are anonymous to the host and check the key
/// themselves against the app setting <c>Pipeline__OpenAi__ApiKeys</c> (keys separated by <c>;</c>): as a Bearer
/// token, an <c>api-key</c> header (Azure OpenAI's clients) or <c>x-functions-key</c> (never in the query string,
/// which request logs keep). With no key set they are closed, unless <c>Pipeline__OpenAi__AllowAnonymous</c> is
/// <c>true</c>: the local host sets it (as <c>func start</c> leaves function keys unchecked); no deployment does.
/// Keys are compared as SHA-256 digests in constant time, so neither their content nor their length leaks.
/// </summary>
public static class OpenAiApiKeys
{
    public const string Setting = "Pipeline:OpenAi:ApiKeys";

    /// <summary>Open without keys: only the local host sets it.</summary>
    public const string AllowAnonymousSetting = "Pipeline:OpenAi:AllowAnonymous";

    /// <summary>Null when the request may proceed; else the 401 to answer.</summary>
    public static OpenAiApiException? Check(string? configuredKeys, bool allowAnonymous, string? authorization, params string?[] otherKeys)
    {
        var keys = (configuredKeys ?? "").Split([';', ','], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (keys.Length == 0)
        {
            return allowAnonymous
                ? null
                : new OpenAiApiException(401, "api_keys_not_configured", "The /v1 routes are closed until the app setting Pipeline__OpenAi__ApiKeys names their keys (see the README, \"Use it from the OpenAI SDK\").");
        }

        var bearer = authorization is { } header && header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase) ? header["Bearer ".Length..].Trim() : null;
        string?[] presented = [bearer, .. otherKeys];
        if (presented.All(string.IsNullOrEmpty))
        {
            return new OpenAiApiException(401, "missing_api_key", "No API key: send it as Authorization: Bearer <key> (the OpenAI SDKs do, from their api key setting).");
        }

        var digests = keys.Select(k => SHA256.HashData(Encoding.UTF8.GetBytes(k))).ToList();
        var matched = false;
        foreach (var candidate in presented)
        {
            if (string.IsNullOrEmpty(candidate))
            {
                continue;
            }

            var digest = SHA256.HashData(Encoding.UTF8.GetBytes(candidate));
            foreach (var key in digests)
            {
                // Every key is compared (no early exit), each in constant time.
                matched |= CryptographicOperations.FixedTimeEquals(key, digest);
            }
        }

        if (matched)
        {
            return null;
        }

        return new OpenAiApiException(401, "invalid_api_key", "Incorrect API key provided: use one of the keys in the app setting Pipeline__OpenAi__ApiKeys.");
    }
}
