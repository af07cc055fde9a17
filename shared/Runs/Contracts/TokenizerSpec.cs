using System.Text.Json.Serialization;

namespace Pipeline.Preprocessing;

/// <summary>Which tokenizer a recipe uses: a named tiktoken encoding, or files in a model folder in blob storage.</summary>
[JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
public sealed record TokenizerSpec
{
    /// <summary><c>tiktoken</c> (default), <c>wordpiece</c> (BERT <c>vocab.txt</c>), <c>bpe</c> (byte-level <c>vocab.json</c> + <c>merges.txt</c>), <c>sentencepiece</c> (<c>tokenizer.model</c>).</summary>
    public string Kind { get; set; } = TokenizerKinds.Tiktoken;
    /// <summary>For tiktoken: <c>cl100k_base</c> (default) or <c>o200k_base</c>.</summary>
    public string? Encoding { get; set; }
    /// <summary>For file-based kinds: the folder holding the files, as <c>container/path/</c> (e.g. <c>models/bert-base-uncased/</c>).</summary>
    public string? Files { get; set; }
    /// <summary>For WordPiece: lower-case and strip accents (uncased models). Default true.</summary>
    public bool? Lowercase { get; set; }
}

public static class TokenizerKinds
{
    public const string Tiktoken = "tiktoken";
    public const string WordPiece = "wordpiece";
    public const string Bpe = "bpe";
    public const string SentencePiece = "sentencepiece";

    public static readonly string[] All = [Tiktoken, WordPiece, Bpe, SentencePiece];
    public static readonly string[] Encodings = ["cl100k_base", "o200k_base"];
}
