using System.Buffers;
using System.Text;
using Microsoft.ML.Tokenizers;

namespace Pipeline.Preprocessing;

/// <summary>
/// The Hugging Face <c>BertNormalizer</c>, plugged into Microsoft.ML.Tokenizers' WordPiece tokenizer, in
/// Hugging Face's order: clean the text (drop NUL, U+FFFD and control, format and private-use characters;
/// white space becomes a space), put spaces around CJK ideographs, then for uncased models strip accents
/// (NFD, drop non-spacing marks) and only then lower-case, so that <c>İ</c> becomes <c>i</c>. Character
/// classes are Hugging Face's (<see cref="BertCharacterClasses"/>), not .NET's newer ones. BERT's special
/// tokens written in the text (<c>[SEP]</c>, ...) pass through untouched, as Hugging Face matches them in the
/// raw text and normalizes only the text between them. The library's own BERT normalizer drops symbols such
/// as <c>$ + &lt; = &gt;</c> and deletes tabs and line breaks (dotnet/machinelearning issues 7724, 7725).
/// </summary>
public sealed class BertBasicNormalizer(bool lowercase) : Normalizer
{
    public override string Normalize(string original) => Normalize(original.AsSpan());

    public override string Normalize(ReadOnlySpan<char> original)
    {
        if (Ascii.IsValid(original))
        {
            return NormalizeAscii(original);
        }

        var output = new StringBuilder(original.Length + 16);
        var start = 0;
        for (var i = original.IndexOf('['); i >= 0;)
        {
            var special = BertSpecialTokens.MatchAt(original[i..]);
            if (special > 0)
            {
                NormalizeSegment(original[start..i], output);
                output.Append(original.Slice(i, special));
                start = i + special;
            }

            var from = i + Math.Max(special, 1);
            var next = original[from..].IndexOf('[');
            i = next < 0 ? -1 : from + next;
        }

        NormalizeSegment(original[start..], output);
        return output.ToString();
    }

    /// <summary>Pure ASCII, the common case: no accents, no CJK, no marks; one pass, one string.</summary>
    private string NormalizeAscii(ReadOnlySpan<char> text)
    {
        char[]? rented = null;
        var buffer = text.Length <= 256 ? stackalloc char[text.Length] : (rented = ArrayPool<char>.Shared.Rent(text.Length));
        var length = 0;
        for (var i = 0; i < text.Length; i++)
        {
            var c = text[i];
            if (c is '\t' or '\n' or '\r')
            {
                buffer[length++] = ' ';
            }
            else if (c < ' ' || c == '\u007F')
            {
                // NUL and the other C0 controls and DEL are removed.
            }
            else if (c == '[' && BertSpecialTokens.MatchAt(text[i..]) is > 0 and var special)
            {
                text.Slice(i, special).CopyTo(buffer[length..]);
                length += special;
                i += special - 1;
            }
            else
            {
                buffer[length++] = lowercase && char.IsAsciiLetterUpper(c) ? (char)(c | 0x20) : c;
            }
        }

        var normalized = new string(buffer[..length]);
        if (rented is not null)
        {
            ArrayPool<char>.Shared.Return(rented);
        }

        return normalized;
    }

    /// <summary>Text between special tokens, normalized on its own as Hugging Face does.</summary>
    private void NormalizeSegment(ReadOnlySpan<char> segment, StringBuilder output)
    {
        if (segment.IsEmpty)
        {
            return;
        }

        var cleaned = lowercase ? new StringBuilder(segment.Length + 8) : output;
        var i = 0;
        while (i < segment.Length)
        {
            // A lone surrogate decodes as U+FFFD, which is dropped: Hugging Face receives it as U+FFFD.
            Rune.DecodeFromUtf16(segment[i..], out var rune, out var consumed);
            i += consumed;
            var value = rune.Value;
            if (value is '\t' or '\n' or '\r')
            {
                cleaned.Append(' ');
            }
            else if (value is 0 or 0xFFFD || BertCharacterClasses.IsOther(value))
            {
                // Removed before white space is looked at: U+0085 (a control character) joins the words around it.
            }
            else if (Rune.IsWhiteSpace(rune))
            {
                cleaned.Append(' ');
            }
            else if (IsCjk(value))
            {
                Append(cleaned.Append(' '), rune).Append(' ');
            }
            else
            {
                Append(cleaned, rune);
            }
        }

        if (!lowercase)
        {
            return;
        }

        // Strip accents first (NFD, drop Mn), then lower-case: .NET keeps İ upper-case, but its decomposition I + U+0307 is not.
        // U+11938 (Dives Akuru, Unicode 13) stays whole: ICU decomposes it, Hugging Face's older NFD tables do not.
        foreach (var rune in UnicodeNormalization.Normalize(cleaned.ToString(), NormalizationForm.FormD, "\U00011938").EnumerateRunes())
        {
            if (!BertCharacterClasses.IsNonspacingMark(rune.Value))
            {
                Append(output, BertCharacterClasses.Lowercase(rune));
            }
        }
    }

    private static StringBuilder Append(StringBuilder builder, Rune rune)
    {
        if (rune.IsBmp)
        {
            return builder.Append((char)rune.Value);
        }

        Span<char> pair = stackalloc char[2];
        rune.EncodeToUtf16(pair);
        return builder.Append(pair);
    }

    /// <summary>Hugging Face's CJK ideograph blocks (not Hangul, Hiragana or Katakana; note 0x2B920, not 0x2B820).</summary>
    private static bool IsCjk(int cp) =>
        cp is (>= 0x4E00 and <= 0x9FFF) or (>= 0x3400 and <= 0x4DBF) or (>= 0x20000 and <= 0x2A6DF) or (>= 0x2A700 and <= 0x2B73F)
            or (>= 0x2B740 and <= 0x2B81F) or (>= 0x2B920 and <= 0x2CEAF) or (>= 0xF900 and <= 0xFAFF) or (>= 0x2F800 and <= 0x2FA1F);
}

/// <summary>
/// The Hugging Face <c>BertPreTokenizer</c>: split on white space, and make every punctuation character
/// (ASCII 33-47, 58-64, 91-96, 123-126, and the Unicode P* characters of <see cref="BertCharacterClasses"/>)
/// a token of its own. A special token the normalizer kept (<c>[SEP]</c>, ...) is one token.
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
            var c = text[i];
            bool space, punctuation;
            var consumed = 1;
            if (c < 0x80)
            {
                space = c is ' ' or (>= '\t' and <= '\r');
                punctuation = IsAsciiPunctuation(c);
                if (c == '[' && BertSpecialTokens.MatchAt(text[i..]) is > 0 and var special)
                {
                    Flush(tokens, ref start, i);
                    tokens.Add((i, special));
                    i += special;
                    continue;
                }
            }
            else
            {
                Rune.DecodeFromUtf16(text[i..], out var rune, out consumed);
                space = Rune.IsWhiteSpace(rune);
                punctuation = BertCharacterClasses.IsPunctuation(rune.Value);
            }

            if (space)
            {
                Flush(tokens, ref start, i);
            }
            else if (punctuation)
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

    private static bool IsAsciiPunctuation(char c) => c is (>= '!' and <= '/') or (>= ':' and <= '@') or (>= '[' and <= '`') or (>= '{' and <= '~');

    public static bool IsPunctuation(Rune rune) =>
        rune.Value < 0x80 ? IsAsciiPunctuation((char)rune.Value) : BertCharacterClasses.IsPunctuation(rune.Value);
}

/// <summary>
/// BERT's special tokens. Hugging Face finds them in the raw text (case-sensitive, before normalizing),
/// so <c>a[SEP]b</c> is <c>a</c>, <c>[SEP]</c>, <c>b</c> while <c>[sep]</c> is three tokens.
/// </summary>
internal static class BertSpecialTokens
{
    private static readonly string[] All = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

    /// <summary>The length of the special token <paramref name="text"/> starts with, or 0.</summary>
    public static int MatchAt(ReadOnlySpan<char> text)
    {
        foreach (var token in All)
        {
            if (text.StartsWith(token, StringComparison.Ordinal))
            {
                return token.Length;
            }
        }

        return 0;
    }
}
