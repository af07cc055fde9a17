using System.Security.Cryptography;
using System.Text;

namespace Pipeline.Runs;

/// <summary>
/// Content- and input-derived ids. The same blob version always maps to the same run, so a redelivered
/// event or a command naming the same blob finds the run that already exists.
/// </summary>
public static class RunIds
{
    public static string ForBlob(string container, string blobName, string etag) =>
        "run-" + Hash($"{container}/{blobName}@{etag.Trim('"')}", 24);

    public static string ForMessage(string queue, string messageText) =>
        "run-" + Hash($"{queue}:{messageText}", 24);

    /// <summary>A new run for a batch's <c>retry-failed</c> command: each request is its own run.</summary>
    public static string ForRetry(string batchId) =>
        "run-" + Hash($"retry|{batchId}|{DateTimeOffset.UtcNow:O}", 24);

    public static string Hash(string input, int hexChars)
    {
        Span<byte> digest = stackalloc byte[32];
        SHA256.HashData(Encoding.UTF8.GetBytes(input), digest);
        return Convert.ToHexStringLower(digest)[..hexChars];
    }
}
