using System.Collections.Concurrent;
using System.IO.Compression;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Text.RegularExpressions;
using Azure;
using Microsoft.ML.Tokenizers;
using Pipeline.Storage;

namespace Pipeline.Preprocessing;

/// <summary>
/// A tokenizer's files, loaded once; <see cref="Create"/> builds an independent instance per worker
/// (the pre-tokenizer's regex must not be shared between threads: see ../shared/docs/MEASURED.md).
/// </summary>
public sealed class TokenizerSource
{
    // Built tokenizers kept between builds, by fingerprint (the same fingerprint is the same files and
    // settings, so the same ids): building cl100k_base parses 100,000 vocabulary lines, which costs more
    // than tokenizing a small dataset, and a kept tokenizer keeps its warm per-word cache.
    private const int IdleFingerprints = 4;
    private static readonly ConcurrentDictionary<string, ConcurrentBag<TextTokenizer>> Idle = new(StringComparer.Ordinal);
    private const string Cl100kPattern = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    private readonly Dictionary<string, byte[]> _files;
    private Dictionary<string, int>? _vocabIds;

    private TokenizerSource(TokenizerSpec spec, Dictionary<string, byte[]> files, string fingerprint)
    {
        Spec = spec;
        _files = files;
        Fingerprint = fingerprint;
        _probe = new Lazy<TextTokenizer>(Create);
    }

    private readonly Lazy<TextTokenizer> _probe;

    /// <summary>One instance built once, for reading the special token ids (not for tokenizing from several threads).</summary>
    public TextTokenizer Probe => _probe.Value;

    public TokenizerSpec Spec { get; }

    /// <summary>Tokens in the vocabulary (WordPiece: lines of vocab.txt), when the kind has a file that says.</summary>
    public int? VocabularySize => Spec.Kind == TokenizerKinds.Tiktoken ? TiktokenVocabularySize(Spec.Encoding)
        : _files.TryGetValue("vocab.txt", out var vocab) ? VocabularyLines(vocab)
        : null;

    /// <summary>Tokens in a vocab.txt: its non-empty lines.</summary>
    public static int VocabularyLines(byte[] vocabTxt) => System.Text.Encoding.UTF8.GetString(vocabTxt).Split('\n').Count(l => l.Length > 0);

    /// <summary>Ids a tiktoken encoding produces, special tokens included (the rows an embedding table needs).</summary>
    public static int TiktokenVocabularySize(string? encoding) => encoding == "o200k_base" ? 200_019 : 100_277;

    /// <summary>Kind plus the hash of every file (or the encoding name): part of the prepared id.</summary>
    public string Fingerprint { get; }

    public static async Task<TokenizerSource> LoadAsync(StorageClients storage, TokenizerSpec spec, CancellationToken cancellationToken)
    {
        if (spec.Kind == TokenizerKinds.Tiktoken)
        {
            var encoding = spec.Encoding ?? "cl100k_base";
            return new TokenizerSource(spec with { Encoding = encoding }, [], $"tiktoken:{encoding}");
        }

        var folder = spec.Files!.TrimEnd('/') + "/";
        if (!BlobPath.TryParseFolder(folder, out var location))
        {
            throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidRecipe, $"The tokenizer's files are '{spec.Files}'; name a folder as 'container/path/', for example 'models/bert-base-uncased/'.");
        }

        var container = storage.Container(location.Container);
        var prefix = location.Name;
        string[] wanted = spec.Kind switch
        {
            TokenizerKinds.WordPiece => ["vocab.txt"],
            TokenizerKinds.Bpe => ["vocab.json", "merges.txt"],
            _ => ["tokenizer.model"],
        };
        var files = new Dictionary<string, byte[]>();
        foreach (var name in wanted)
        {
            try
            {
                files[name] = (await container.GetBlobClient(prefix + name).DownloadContentAsync(cancellationToken)).Value.Content.ToArray();
            }
            catch (RequestFailedException e) when (e.Status == 404)
            {
                throw new PreprocessingRejectedException(PreprocessErrorCodes.MissingTokenizerFiles,
                    $"The {spec.Kind} tokenizer needs {string.Join(" and ", wanted)} in {folder}, and {name} is not there. Upload it, or name another folder in preprocess.tokenizer.files.");
            }
        }

        var fingerprint = new StringBuilder(spec.Kind);
        foreach (var (name, bytes) in files.OrderBy(f => f.Key, StringComparer.Ordinal))
        {
            fingerprint.Append(':').Append(name).Append('=').Append(Convert.ToHexStringLower(SHA256.HashData(bytes))[..16]);
        }

        if (spec.Kind == TokenizerKinds.WordPiece)
        {
            fingerprint.Append(":lower=").Append(spec.Lowercase ?? true);
        }

        var source = new TokenizerSource(spec, files, fingerprint.ToString());
        try
        {
            _ = source.Probe;
        }
        catch (Exception e) when (e is not PreprocessingRejectedException)
        {
            throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidTokenizerFiles, $"The {spec.Kind} tokenizer files in {folder} cannot be read: {e.Message}");
        }

        return source;
    }

    /// <summary>A tokenizer for one worker's exclusive use, built earlier where one is idle; give it back with <see cref="Return"/>.</summary>
    public TextTokenizer Rent() => Idle.TryGetValue(Fingerprint, out var idle) && idle.TryTake(out var tokenizer) ? tokenizer : Create();

    /// <summary>Keeps a rented tokenizer for the next worker (up to two per core of each fingerprint).</summary>
    public void Return(TextTokenizer tokenizer)
    {
        if (!Idle.ContainsKey(Fingerprint) && Idle.Count >= IdleFingerprints)
        {
            Idle.Clear();
        }

        var idle = Idle.GetOrAdd(Fingerprint, _ => []);
        if (idle.Count < 2 * Environment.ProcessorCount)
        {
            idle.Add(tokenizer);
        }
    }

    /// <summary>A new, independent tokenizer (one per worker thread).</summary>
    public TextTokenizer Create()
    {
        switch (Spec.Kind)
        {
            case TokenizerKinds.Tiktoken when Spec.Encoding == "cl100k_base":
                // Own regex instance per tokenizer: a shared one serialises threads (MEASURED.md).
                using (var vocab = OpenCl100k())
                {
                    var special = new Dictionary<string, int> { ["<|endoftext|>"] = 100257, ["<|fim_prefix|>"] = 100258, ["<|fim_middle|>"] = 100259, ["<|fim_suffix|>"] = 100260, ["<|endofprompt|>"] = 100276 };
                    var tokenizer = TiktokenTokenizer.Create(vocab, new RegexPreTokenizer(new Regex(Cl100kPattern, RegexOptions.Compiled), special), normalizer: null, special);
                    return new TextTokenizer(tokenizer, prefix: null, suffix: null, endOfText: 100257, padding: 100257);
                }

            case TokenizerKinds.Tiktoken:
                var o200k = TiktokenTokenizer.CreateForEncoding(Spec.Encoding!);
                return new TextTokenizer(o200k, prefix: null, suffix: null, endOfText: 199999, padding: 199999);

            case TokenizerKinds.WordPiece:
                var options = new WordPieceOptions
                {
                    Normalizer = new BertBasicNormalizer(Spec.Lowercase ?? true),
                    PreTokenizer = new BertBasicPreTokenizer(),
                    UnknownToken = "[UNK]",
                    ContinuingSubwordPrefix = "##",
                    MaxInputCharsPerWord = 100,
                };
                var wordPiece = WordPieceTokenizer.Create(new MemoryStream(_files["vocab.txt"]), options);
                var vocabIds = _vocabIds ??= VocabularyIds(_files["vocab.txt"]);
                int Id(string token) => vocabIds.TryGetValue(token, out var id)
                    ? id
                    : throw new PreprocessingRejectedException(PreprocessErrorCodes.InvalidTokenizerFiles, $"vocab.txt has no {token} token; a BERT vocabulary needs [CLS], [SEP], [PAD] and [UNK].");
                return new TextTokenizer(wordPiece, prefix: Id("[CLS]"), suffix: Id("[SEP]"), endOfText: Id("[SEP]"), padding: Id("[PAD]"));

            case TokenizerKinds.Bpe:
                var bpe = CodeGenTokenizer.Create(new MemoryStream(_files["vocab.json"]), new MemoryStream(_files["merges.txt"]), addPrefixSpace: false, addBeginOfSentence: false, addEndOfSentence: false);
                var eos = bpe.EndOfSentenceId ?? 0;
                return new TextTokenizer(bpe, prefix: null, suffix: null, endOfText: eos, padding: eos);

            default:
                var sentencePiece = SentencePieceTokenizer.Create(new MemoryStream(_files["tokenizer.model"]), true, false);
                return new TextTokenizer(sentencePiece, prefix: null, suffix: null, endOfText: sentencePiece.EndOfSentenceId, padding: sentencePiece.EndOfSentenceId);
        }
    }

    /// <summary>A vocab.txt's token ids: the line number of each token, from 0.</summary>
    private static Dictionary<string, int> VocabularyIds(byte[] vocab)
    {
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        var lines = System.Text.Encoding.UTF8.GetString(vocab).Split('\n');
        for (var i = 0; i < lines.Length; i++)
        {
            ids.TryAdd(lines[i].TrimEnd('\r'), i);
        }

        return ids;
    }

    private static Stream OpenCl100k()
    {
        var assembly = System.Reflection.Assembly.Load("Microsoft.ML.Tokenizers.Data.Cl100kBase");
        var deflated = assembly.GetManifestResourceStream("cl100k_base.tiktoken.deflate")
            ?? throw new InvalidOperationException("The cl100k_base data is missing from Microsoft.ML.Tokenizers.Data.Cl100kBase.");
        return new DeflateStream(deflated, CompressionMode.Decompress);
    }
}

/// <summary>One worker's tokenizer, with the special tokens a sequence gets around it.</summary>
public sealed class TextTokenizer(Tokenizer tokenizer, int? prefix, int? suffix, int endOfText, int padding)
{
    public Tokenizer Inner { get; } = tokenizer;
    /// <summary>Separates packed sequences (EOS / [SEP]).</summary>
    public int EndOfText { get; } = endOfText;
    public int Padding { get; } = padding;

    /// <summary>Token ids of <paramref name="text"/>, with the model's special tokens ([CLS] ... [SEP] for BERT).</summary>
    public List<int> Encode(string text, List<int> ids)
    {
        ids.Clear();
        if (prefix is { } first)
        {
            ids.Add(first);
        }

        ids.AddRange(Inner.EncodeToIds(text));
        if (suffix is { } last)
        {
            ids.Add(last);
        }

        return ids;
    }

    /// <summary>
    /// A prompt and its completion as one sequence (special tokens around the pair, end-of-text after the
    /// completion for models without a closing token); returns the prompt's length in tokens, so a trainer
    /// can leave the prompt out of the loss.
    /// </summary>
    public int EncodePair(string prompt, string completion, List<int> ids)
    {
        ids.Clear();
        if (prefix is { } first)
        {
            ids.Add(first);
        }

        ids.AddRange(Inner.EncodeToIds(prompt));
        var promptLength = ids.Count;
        ids.AddRange(Inner.EncodeToIds(completion));
        ids.Add(suffix ?? EndOfText);
        return promptLength;
    }

    /// <summary>Keeps at most <paramref name="max"/> ids, keeping the closing special token where there is one.</summary>
    public bool Truncate(List<int> ids, int max)
    {
        if (ids.Count <= max)
        {
            return false;
        }

        ids.RemoveRange(max, ids.Count - max);
        if (suffix is { } last)
        {
            ids[^1] = last;
        }

        return true;
    }
}
