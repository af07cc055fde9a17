using System.Security.Cryptography;
using System.Text;

namespace Pipeline.Inference;

/// <summary>
/// Who may call the <c>/v1</c> routes. OpenAI's SDKs send <c>Authorization: Bearer &lt;key&gt;</c>, which the Azure
/// Functions host does not take as a function key, so these routes are anonymous to the host and check the key
/// themselves against the app setting <c>Pipeline__OpenAi__ApiKeys</c> (keys separated by <c>;</c>): as a Bearer
/// token, an <c>api-key</c> header (Azure OpenAI's clients), <c>x-functions-key</c> or <c>?code=</c>. With no key
/// set they are open locally (as <c>func start</c> leaves function keys unchecked) and closed in Azure.
/// </summary>
public static class OpenAiApiKeys
{
    public const string Setting = "Pipeline:OpenAi:ApiKeys";

    /// <summary>Set by App Service on every Azure Functions instance.</summary>
    public const string AzureInstanceVariable = "WEBSITE_INSTANCE_ID";

    /// <summary>Null when the request may proceed; else the 401 to answer.</summary>
    public static OpenAiApiException? Check(string? configuredKeys, bool inAzure, string? authorization, params string?[] otherKeys)
    {
        var keys = (configuredKeys ?? "").Split([';', ','], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (keys.Length == 0)
        {
            return inAzure
                ? new OpenAiApiException(401, "api_keys_not_configured", "The /v1 routes are closed until the app setting Pipeline__OpenAi__ApiKeys names their keys (see the README, \"Use it from the OpenAI SDK\").")
                : null;
        }

        var bearer = authorization is { } header && header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase) ? header["Bearer ".Length..].Trim() : null;
        string?[] presented = [bearer, .. otherKeys];
        if (presented.All(string.IsNullOrEmpty))
        {
            return new OpenAiApiException(401, "missing_api_key", "No API key: send it as Authorization: Bearer <key> (the OpenAI SDKs do, from their api key setting).");
        }

        foreach (var candidate in presented)
        {
            if (!string.IsNullOrEmpty(candidate) && keys.Any(k => CryptographicOperations.FixedTimeEquals(Encoding.UTF8.GetBytes(k), Encoding.UTF8.GetBytes(candidate))))
            {
                return null;
            }
        }

        return new OpenAiApiException(401, "invalid_api_key", "Incorrect API key provided: use one of the keys in the app setting Pipeline__OpenAi__ApiKeys.");
    }
}
