using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace Pipeline.Preprocessing;

/// <summary>Counts of what redaction replaced.</summary>
public sealed class RedactionCounts
{
    public long Emails;
    public long Phones;
    public long IpAddresses;

    public void Add(RedactionCounts other)
    {
        Emails += other.Emails;
        Phones += other.Phones;
        IpAddresses += other.IpAddresses;
    }
}

/// <summary>
/// Text normalization (Unicode form, control characters, white space, optional lower-case) and
/// redaction of e-mail addresses, phone numbers and IP addresses. Thread-safe; counts go to the caller.
/// </summary>
public sealed partial class TextCleaner(NormalizeOptions normalize, RedactOptions redact)
{
    public const string EmailMask = "[EMAIL]";
    public const string PhoneMask = "[PHONE]";
    public const string IpMask = "[IP]";

    public string Clean(string text, RedactionCounts counts)
    {
        if (normalize.Unicode != "none")
        {
            var form = normalize.Unicode == "NFKC" ? NormalizationForm.FormKC : NormalizationForm.FormC;
            text = UnicodeNormalization.Normalize(text, form);
        }

        if (normalize.StripControl || normalize.CollapseWhitespace)
        {
            text = Whitespace(text);
        }

        if (normalize.Lowercase)
        {
            text = text.ToLowerInvariant();
        }

        if (redact.Emails)
        {
            text = Replace(EmailRegex(), text, EmailMask, ref counts.Emails);
        }

        if (redact.IpAddresses)
        {
            text = Replace(IpRegex(), text, IpMask, ref counts.IpAddresses);
        }

        if (redact.Phones)
        {
            text = Replace(PhoneRegex(), text, PhoneMask, ref counts.Phones);
        }

        return text;
    }

    private string Whitespace(string text)
    {
        // Printable ASCII (one vectorized search) has no control, format or non-space white space characters.
        var changed = false;
        var first = text.AsSpan().IndexOfAnyExceptInRange(' ', '~');
        foreach (var c in first < 0 ? [] : text.AsSpan(first))
        {
            if (IsControlOrFormat(c) || (normalize.CollapseWhitespace && c != ' ' && char.IsWhiteSpace(c)))
            {
                changed = true;
                break;
            }
        }

        if (!changed && (!normalize.CollapseWhitespace || (!text.Contains("  ", StringComparison.Ordinal) && text.AsSpan().Trim().Length == text.Length)))
        {
            return text;
        }

        var builder = new StringBuilder(text.Length);
        var pendingSpace = false;
        foreach (var c in text)
        {
            // Control characters go before white space is looked at, as in BERT's normalizer: U+0085 (NEL),
            // U+000B and U+000C are white space to .NET but control characters, removed, to Hugging Face.
            if (normalize.StripControl && IsControlOrFormat(c))
            {
                continue;
            }

            var isSpace = char.IsWhiteSpace(c);

            if (isSpace && normalize.CollapseWhitespace)
            {
                pendingSpace = builder.Length > 0;
                continue;
            }

            if (pendingSpace)
            {
                builder.Append(' ');
                pendingSpace = false;
            }

            builder.Append(c);
        }

        return builder.ToString();
    }

    /// <summary>Control (but not tab, line feed or carriage return) or format characters.</summary>
    private static bool IsControlOrFormat(char c) =>
        c is not ('\t' or '\n' or '\r') && (char.IsControl(c) || CharUnicodeInfo.GetUnicodeCategory(c) == UnicodeCategory.Format);

    private static string Replace(Regex regex, string text, string mask, ref long count)
    {
        var matches = 0;
        var result = regex.Replace(text, _ =>
        {
            matches++;
            return mask;
        });
        count += matches;
        return result;
    }

    [GeneratedRegex(@"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}", RegexOptions.CultureInvariant)]
    private static partial Regex EmailRegex();

    [GeneratedRegex(@"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?(?![\w:])", RegexOptions.CultureInvariant)]
    private static partial Regex IpRegex();

    [GeneratedRegex(@"(?<![\w+])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)[\s.\-]?|\d{2,4}[\s.\-])\d{3,4}[\s.\-]?\d{3,4}(?!\w)", RegexOptions.CultureInvariant)]
    private static partial Regex PhoneRegex();
}
