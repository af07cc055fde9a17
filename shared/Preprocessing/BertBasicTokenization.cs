using System.Globalization;
using System.Text;
using Microsoft.ML.Tokenizers;

namespace Pipeline.Preprocessing;

/// <summary>
/// The Hugging Face <c>BertNormalizer</c> (clean text, space around CJK ideographs, optional lower-casing
/// with accent stripping), plugged into Microsoft.ML.Tokenizers' WordPiece tokenizer. The library's own
/// BERT normalizer drops symbols such as <c>$ + &lt; = &gt;</c> and deletes tabs and line breaks
/// (dotnet/machinelearning issues 7724, 7725), so ids would differ from the reference tokenizer.json.
/// </summary>
public sealed class BertBasicNormalizer(bool lowercase) : Normalizer
{
    public override string Normalize(string original) => Normalize(original.AsSpan());

    public override string Normalize(ReadOnlySpan<char> original)
    {
        var builder = new StringBuilder(original.Length + 8);
        foreach (var rune in original.EnumerateRunes())
        {
            var value = rune.Value;
            if (value is 0 or 0xFFFD || IsControl(rune))
            {
                continue;
            }

            if (IsWhitespace(rune))
            {
                builder.Append(' ');
            }
            else if (IsCjk(value))
            {
                builder.Append(' ').Append(rune.ToString()).Append(' ');
            }
            else
            {
                builder.Append(rune.ToString());
            }
        }

        if (!lowercase)
        {
            return builder.ToString();
        }

        // Lower-case, then strip accents: NFD and drop non-spacing marks (Mn), as BERT uncased does.
        var decomposed = builder.ToString().ToLowerInvariant().Normalize(NormalizationForm.FormD);
        builder.Clear();
        foreach (var c in decomposed)
        {
            if (CharUnicodeInfo.GetUnicodeCategory(c) != UnicodeCategory.NonSpacingMark)
            {
                builder.Append(c);
            }
        }

        return builder.ToString();
    }

    /// <summary>HF: tab, line feed and carriage return count as white space, not control.</summary>
    private static bool IsWhitespace(Rune rune) => rune.Value is ' ' or '\t' or '\n' or '\r' || Rune.GetUnicodeCategory(rune) == UnicodeCategory.SpaceSeparator;

    private static bool IsControl(Rune rune) =>
        rune.Value is not ('\t' or '\n' or '\r') && Rune.GetUnicodeCategory(rune) is UnicodeCategory.Control or UnicodeCategory.Format;

    private static bool IsCjk(int cp) =>
        cp is (>= 0x4E00 and <= 0x9FFF) or (>= 0x3400 and <= 0x4DBF) or (>= 0x20000 and <= 0x2A6DF) or (>= 0x2A700 and <= 0x2B73F)
            or (>= 0x2B740 and <= 0x2B81F) or (>= 0x2B820 and <= 0x2CEAF) or (>= 0xF900 and <= 0xFAFF) or (>= 0x2F800 and <= 0x2FA1F);
}

/// <summary>
/// The Hugging Face <c>BertPreTokenizer</c>: split on white space, and make every punctuation character
/// (ASCII 33-47, 58-64, 91-96, 123-126, and every Unicode P* character) a token of its own.
/// </summary>
public sealed class BertBasicPreTokenizer : PreTokenizer
{
    public override IEnumerable<(int Offset, int Length)> PreTokenize(string text) => Split(text.AsSpan());

    public override IEnumerable<(int Offset, int Length)> PreTokenize(ReadOnlySpan<char> text) => Split(text);

    private static List<(int Offset, int Length)> Split(ReadOnlySpan<char> text)
    {
        var tokens = new List<(int, int)>();
        var start = -1;
        var i = 0;
        while (i < text.Length)
        {
            Rune.DecodeFromUtf16(text[i..], out var rune, out var consumed);
            if (Rune.IsWhiteSpace(rune))
            {
                Flush(tokens, ref start, i);
            }
            else if (IsPunctuation(rune))
            {
                Flush(tokens, ref start, i);
                tokens.Add((i, consumed));
            }
            else if (start < 0)
            {
                start = i;
            }

            i += consumed;
        }

        Flush(tokens, ref start, text.Length);
        return tokens;
    }

    private static void Flush(List<(int, int)> tokens, ref int start, int end)
    {
        if (start >= 0)
        {
            tokens.Add((start, end - start));
            start = -1;
        }
    }

    public static bool IsPunctuation(Rune rune) =>
        rune.Value is (>= 33 and <= 47) or (>= 58 and <= 64) or (>= 91 and <= 96) or (>= 123 and <= 126)
        || Rune.GetUnicodeCategory(rune) is UnicodeCategory.ConnectorPunctuation or UnicodeCategory.DashPunctuation
            or UnicodeCategory.OpenPunctuation or UnicodeCategory.ClosePunctuation or UnicodeCategory.InitialQuotePunctuation
            or UnicodeCategory.FinalQuotePunctuation or UnicodeCategory.OtherPunctuation;
}
