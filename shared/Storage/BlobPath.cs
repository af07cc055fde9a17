using System.Diagnostics.CodeAnalysis;

namespace Pipeline.Storage;

/// <summary>
/// A <c>container/path</c> reference, the form artifacts, messages and settings use for a blob or a folder of blobs.
/// Parsed once here, so no caller splits strings on '/' by hand.
/// </summary>
public readonly record struct BlobPath(string Container, string Name)
{
    /// <summary>Parses <c>container/path</c>: the container is what comes before the first '/', and both parts are non-empty.</summary>
    public static bool TryParse([NotNullWhen(true)] string? text, out BlobPath path)
    {
        var slash = text?.IndexOf('/') ?? -1;
        if (text is null || slash <= 0 || slash == text.Length - 1)
        {
            path = default;
            return false;
        }

        path = new BlobPath(text[..slash], text[(slash + 1)..]);
        return true;
    }

    /// <summary>A folder reference (<c>container/prefix</c>, a trailing '/' optional): its name always ends with '/'.</summary>
    public static bool TryParseFolder([NotNullWhen(true)] string? text, out BlobPath folder)
    {
        if (!TryParse(text?.TrimEnd('/') + "/", out folder) || folder.Name == "/")
        {
            folder = default;
            return false;
        }

        return true;
    }

    /// <summary>The blob's file name: what follows the last '/'.</summary>
    public string FileName => Name[(Name.LastIndexOf('/') + 1)..];

    public override string ToString() => $"{Container}/{Name}";
}
