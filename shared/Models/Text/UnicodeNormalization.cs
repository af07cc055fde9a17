using System.Text;

namespace Pipeline.Preprocessing;

/// <summary>
/// <see cref="string.Normalize(NormalizationForm)"/> for any text. .NET throws on U+FFFE (a noncharacter, which
/// a record may still hold); it has no decomposition, combining class 0 and composes with nothing, so it
/// stays as it is and the text on each side of it is normalized on its own, which gives the same result.
/// </summary>
public static class UnicodeNormalization
{
    private const char NonCharacter = '\uFFFE';

    /// <param name="alsoKept">Another character to keep whole the same way (one that is also a starter).</param>
    public static string Normalize(string text, NormalizationForm form, string? alsoKept = null)
    {
        var at = NextKept(text, 0, alsoKept, out var width);
        if (at < 0)
        {
            return text.IsNormalized(form) ? text : text.Normalize(form);
        }

        var builder = new StringBuilder(text.Length + 16);
        var start = 0;
        while (at >= 0)
        {
            builder.Append(Normalize(text[start..at], form)).Append(text.AsSpan(at, width));
            start = at + width;
            at = NextKept(text, start, alsoKept, out width);
        }

        return builder.Append(Normalize(text[start..], form)).ToString();
    }

    private static int NextKept(string text, int from, string? alsoKept, out int width)
    {
        var at = text.IndexOf(NonCharacter, from);
        var other = alsoKept is null ? -1 : text.IndexOf(alsoKept, from, StringComparison.Ordinal);
        if (other >= 0 && (at < 0 || other < at))
        {
            width = alsoKept!.Length;
            return other;
        }

        width = 1;
        return at;
    }
}
