using System.Collections.Frozen;
using System.Reflection;
using System.Security.Cryptography;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.StaticFiles;

namespace Pipeline.Functions.Api;

/// <summary>
/// The dashboard's static files, embedded in the worker assembly (<c>Api/Dashboard/</c>, logical names
/// <c>dashboard/&lt;path&gt;</c>), so that every build and publish of the app carries them. Served with a
/// content-hash ETag and revalidated on each load.
/// </summary>
public static class DashboardFiles
{
    private const string ResourcePrefix = "dashboard/";

    // The page talks to this app and, for uploads, to blob storage (the SAS URL the API hands out).
    private const string ContentSecurityPolicy = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' http: https:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

    private static readonly FrozenDictionary<string, StaticFile> Files = Load();

    private sealed record StaticFile(byte[] Content, string ContentType, string ETag);

    /// <summary>The file names the assembly carries (<c>index.html</c>, <c>app.js</c>, ...).</summary>
    public static IEnumerable<string> Names => Files.Keys;

    public static IResult Serve(string path, string? ifNoneMatch)
    {
        var name = path.Trim('/');
        if (name == "api" || name.StartsWith("api/", StringComparison.Ordinal))
        {
            return PipelineApi.Problem(404, "no-route", "No function serves this route", $"No HTTP function of this app serves GET {path}. The API's routes are listed in the README (HTTP API).");
        }

        if (!Files.TryGetValue(name.Length == 0 ? "index.html" : name, out var file))
        {
            return PipelineApi.Problem(404, "not-found", "No such page", $"The dashboard has no file '{name}'. Open the dashboard at /.");
        }

        return new FileResult(file, ifNoneMatch);
    }

    private static FrozenDictionary<string, StaticFile> Load()
    {
        var assembly = typeof(DashboardFiles).Assembly;
        var types = new FileExtensionContentTypeProvider();
        var files = new Dictionary<string, StaticFile>(StringComparer.Ordinal);
        foreach (var resource in assembly.GetManifestResourceNames().Where(n => n.StartsWith(ResourcePrefix, StringComparison.Ordinal)))
        {
            using var stream = assembly.GetManifestResourceStream(resource)!;
            using var buffer = new MemoryStream();
            stream.CopyTo(buffer);
            var content = buffer.ToArray();
            var name = resource[ResourcePrefix.Length..].Replace('\\', '/');
            var type = types.TryGetContentType(name, out var known) ? known : "application/octet-stream";
            if (type.StartsWith("text/", StringComparison.Ordinal) || type.EndsWith("javascript", StringComparison.Ordinal))
            {
                type += "; charset=utf-8";
            }

            files[name] = new StaticFile(content, type, $"\"{Convert.ToHexStringLower(SHA256.HashData(content))[..16]}\"");
        }

        return files.ToFrozenDictionary(StringComparer.Ordinal);
    }

    private sealed class FileResult(StaticFile file, string? ifNoneMatch) : IResult
    {
        public Task ExecuteAsync(HttpContext context)
        {
            var headers = context.Response.Headers;
            headers.ETag = file.ETag;
            headers.CacheControl = "no-cache";
            headers.XContentTypeOptions = "nosniff";
            headers.ContentSecurityPolicy = ContentSecurityPolicy;
            headers["Referrer-Policy"] = "no-referrer";
            if (ifNoneMatch is { Length: > 0 } && ifNoneMatch.Split(',').Any(tag => tag.Trim() == file.ETag))
            {
                context.Response.StatusCode = StatusCodes.Status304NotModified;
                return Task.CompletedTask;
            }

            context.Response.ContentType = file.ContentType;
            context.Response.ContentLength = file.Content.Length;
            return context.Response.Body.WriteAsync(file.Content, context.RequestAborted).AsTask();
        }
    }
}
