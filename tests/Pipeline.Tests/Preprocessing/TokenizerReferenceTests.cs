using System.Globalization;
using System.Text;
using System.Text.Json;
using Pipeline.Preprocessing;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Preprocessing;

/// <summary>
/// Token ids must equal the reference tokenizers exactly, on every sentence of the sentiment data:
/// WordPiece against the Hugging Face tokenizer.json, cl100k_base against tiktoken
/// (reference ids generated once by those peers; see tests/Pipeline.Tests/Data/README.md).
/// </summary>
public sealed class TokenizerReferenceTests(Azurite azurite) : IClassFixture<Azurite>
{
    private sealed record Reference(string Source, int Line, string Text, int[] Ids);

    private static List<Reference> Load(string file) =>
        [.. File.ReadLines(Path.Combine(AppContext.BaseDirectory, "Data", file)).Select(l => JsonSerializer.Deserialize<Reference>(l, JsonSerializerOptions.Web)!)];

    private async Task<TokenizerSource> BertAsync()
    {
        var vocab = RepoPaths.RequireSharedData("tokenizers/bert-base-uncased/vocab.txt");
        var models = azurite.Storage.Container(StorageNames.Containers.Models);
        await models.GetBlobClient("bert-base-uncased/vocab.txt").UploadAsync(vocab, overwrite: true);
        return await TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec { Kind = TokenizerKinds.WordPiece, Files = "models/bert-base-uncased/" }, CancellationToken.None);
    }

    [Fact]
    public async Task WordPiece_ids_match_the_hugging_face_reference_on_every_sentence()
    {
        var tokenizer = (await BertAsync()).Create();
        var references = Load("bert-base-uncased.reference.jsonl");
        Assert.Equal(2001, references.Count);
        var ids = new List<int>();
        var mismatches = references.Where(r => !tokenizer.Encode(r.Text, ids).SequenceEqual(r.Ids))
            .Select(r => $"{r.Source}:{r.Line} {r.Text}\n  expected [{string.Join(',', r.Ids)}]\n  actual   [{string.Join(',', tokenizer.Encode(r.Text, ids))}]").ToList();
        Assert.True(mismatches.Count == 0, $"{mismatches.Count} sentences differ:\n{string.Join('\n', mismatches.Take(5))}");
    }

    /// <summary>A hand-made hard case: <see cref="Case"/> is its line in the file.</summary>
    private sealed record AdversarialCase(int Case, string What, string Text, int[] Ids);

    private static List<AdversarialCase> LoadAdversarial() =>
        [.. File.ReadLines(Path.Combine(AppContext.BaseDirectory, "Data", "bert-base-uncased.adversarial.jsonl")).Select(l => JsonSerializer.Deserialize<AdversarialCase>(l, JsonSerializerOptions.Web)!)];

    /// <summary>Cases whose text the default preprocessing changes on purpose, so that their ids may differ (Data/README.md).</summary>
    private static readonly int[] ChangedByDefaultCleaning = [35, 184];

    [Fact]
    public async Task WordPiece_ids_match_the_hugging_face_library_on_every_adversarial_sentence()
    {
        var tokenizer = (await BertAsync()).Create();
        var cases = LoadAdversarial();
        Assert.True(cases.Count >= 200, $"{cases.Count} adversarial cases");
        var mismatches = Mismatches(tokenizer, cases, text => text);
        Assert.True(mismatches.Count == 0, $"{mismatches.Count} of {cases.Count} adversarial sentences differ:\n{string.Join('\n', mismatches)}");
    }

    [Fact]
    public async Task Default_cleaning_then_WordPiece_keeps_the_hugging_face_ids_of_the_raw_text()
    {
        var tokenizer = (await BertAsync()).Create();
        var cleaner = new TextCleaner(new NormalizeOptions(), new RedactOptions());
        var cases = LoadAdversarial().Where(c => !ChangedByDefaultCleaning.Contains(c.Case)).ToList();
        var mismatches = Mismatches(tokenizer, cases, text => cleaner.Clean(text, new RedactionCounts()));
        Assert.True(mismatches.Count == 0, $"{mismatches.Count} of {cases.Count} adversarial sentences differ once cleaned:\n{string.Join('\n', mismatches)}");
    }

    [Fact]
    public async Task WordPiece_drops_lone_surrogates_as_hugging_face_drops_their_replacement_character()
    {
        // Not in the JSONL file: System.Text.Json refuses to read a lone surrogate, though a string can hold one.
        var tokenizer = (await BertAsync()).Create();
        Assert.Equal([101, 11113, 1060, 102], tokenizer.Encode("a\ud800b x\udc00", []));
    }

    private static List<string> Mismatches(TextTokenizer tokenizer, List<AdversarialCase> cases, Func<string, string> prepare)
    {
        var ids = new List<int>();
        return [.. cases.Where(c => !tokenizer.Encode(prepare(c.Text), ids).SequenceEqual(c.Ids))
            .Select(c => $"line {c.Case} ({c.What}): \"{Escape(c.Text)}\"\n  expected [{string.Join(',', c.Ids)}]\n  actual   [{string.Join(',', tokenizer.Encode(prepare(c.Text), ids))}]")];
    }

    /// <summary>The text with invisible and combining characters as \u escapes, so a failure shows what is there.</summary>
    private static string Escape(string text)
    {
        var escaped = new StringBuilder();
        foreach (var c in text)
        {
            var category = char.GetUnicodeCategory(c);
            var visible = c == ' ' || category is not (UnicodeCategory.Control or UnicodeCategory.Format
                or UnicodeCategory.Surrogate or UnicodeCategory.PrivateUse or UnicodeCategory.OtherNotAssigned
                or UnicodeCategory.SpaceSeparator or UnicodeCategory.LineSeparator or UnicodeCategory.ParagraphSeparator
                or UnicodeCategory.NonSpacingMark or UnicodeCategory.EnclosingMark or UnicodeCategory.SpacingCombiningMark);
            if (visible)
            {
                escaped.Append(c);
            }
            else
            {
                escaped.Append($"\\u{(int)c:X4}");
            }
        }

        return escaped.ToString();
    }

    [Theory]
    [InlineData("price $5 + tax <= 10 ^ 2 | a ~ b", new[] { 101, 3976, 1002, 1019, 1009, 4171, 1026, 1027, 2184, 1034, 1016, 1064, 1037, 1066, 1038, 102 })]
    [InlineData("tab\there\nnew", new[] { 101, 21628, 2182, 2047, 102 })]
    [InlineData("Café snake_case", new[] { 101, 7668, 7488, 1035, 2553, 102 })]
    public async Task WordPiece_handles_the_cases_where_the_library_default_differs_from_the_reference(string text, int[] expected)
    {
        var tokenizer = (await BertAsync()).Create();
        Assert.Equal(expected, tokenizer.Encode(text, []));
    }

    [Fact]
    public async Task Cl100k_ids_match_tiktoken_on_every_sentence()
    {
        var tokenizer = (await TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec(), CancellationToken.None)).Create();
        var ids = new List<int>();
        var references = Load("cl100k_base.reference.jsonl");
        var mismatches = references.Count(r => !tokenizer.Encode(r.Text, ids).SequenceEqual(r.Ids));
        Assert.Equal(0, mismatches);
    }

    [Fact]
    public async Task Missing_tokenizer_files_are_a_clear_error()
    {
        var error = await Assert.ThrowsAsync<PreprocessingRejectedException>(() =>
            TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec { Kind = TokenizerKinds.Bpe, Files = "models/nothing-here/" }, CancellationToken.None));
        Assert.Equal(PreprocessErrorCodes.MissingTokenizerFiles, error.Code);
        Assert.Contains("vocab.json", error.Message);
    }

    [Fact]
    public async Task Byte_level_bpe_files_load_from_a_model_folder()
    {
        var models = azurite.Storage.Container(StorageNames.Containers.Models);
        await models.GetBlobClient("tiny-bpe/vocab.json").UploadAsync(BinaryData.FromString("""{"h":0,"e":1,"l":2,"o":3,"he":4,"ll":5,"hell":6,"hello":7,"Ġ":8,"<|endoftext|>":9}"""), overwrite: true);
        await models.GetBlobClient("tiny-bpe/merges.txt").UploadAsync(BinaryData.FromString("#version: 0.2\nh e\nl l\nhe ll\nhell o\n"), overwrite: true);
        var source = await TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec { Kind = TokenizerKinds.Bpe, Files = "models/tiny-bpe" }, CancellationToken.None);
        Assert.Equal([7, 8, 6], source.Create().Encode("hello hell", []));
        Assert.StartsWith("bpe:merges.txt=", source.Fingerprint);
    }

    [Fact]
    public async Task A_sentencepiece_model_loads_from_a_model_folder()
    {
        // A tiny BPE SentencePiece model, written field by field from sentencepiece_model.proto.
        string[] pieces = ["<unk>", "<s>", "</s>", "\u2581", "h", "e", "l", "o", "w", "r", "d", "ll", "he", "hell", "hello", "\u2581hello", "wo", "wor", "worl", "world", "\u2581world"];
        using var model = new MemoryStream();
        var output = new Google.Protobuf.CodedOutputStream(model);
        for (var i = 0; i < pieces.Length; i++)
        {
            using var piece = new MemoryStream();
            var p = new Google.Protobuf.CodedOutputStream(piece);
            p.WriteTag(1, Google.Protobuf.WireFormat.WireType.LengthDelimited);
            p.WriteString(pieces[i]);
            p.WriteTag(2, Google.Protobuf.WireFormat.WireType.Fixed32);
            p.WriteFloat(-i);
            p.WriteTag(3, Google.Protobuf.WireFormat.WireType.Varint);
            p.WriteEnum(i == 0 ? 2 : i < 3 ? 3 : 1);
            p.Flush();
            output.WriteTag(1, Google.Protobuf.WireFormat.WireType.LengthDelimited);
            output.WriteBytes(Google.Protobuf.ByteString.CopyFrom(piece.ToArray()));
        }

        using (var trainer = new MemoryStream())
        {
            var t = new Google.Protobuf.CodedOutputStream(trainer);
            t.WriteTag(3, Google.Protobuf.WireFormat.WireType.Varint);
            t.WriteEnum(2); // BPE
            t.WriteTag(40, Google.Protobuf.WireFormat.WireType.Varint);
            t.WriteInt32(0);
            t.WriteTag(41, Google.Protobuf.WireFormat.WireType.Varint);
            t.WriteInt32(1);
            t.WriteTag(42, Google.Protobuf.WireFormat.WireType.Varint);
            t.WriteInt32(2);
            t.Flush();
            output.WriteTag(2, Google.Protobuf.WireFormat.WireType.LengthDelimited);
            output.WriteBytes(Google.Protobuf.ByteString.CopyFrom(trainer.ToArray()));
        }

        using (var normalizer = new MemoryStream())
        {
            var n = new Google.Protobuf.CodedOutputStream(normalizer);
            n.WriteTag(1, Google.Protobuf.WireFormat.WireType.LengthDelimited);
            n.WriteString("identity");
            n.WriteTag(3, Google.Protobuf.WireFormat.WireType.Varint);
            n.WriteBool(true);
            n.WriteTag(4, Google.Protobuf.WireFormat.WireType.Varint);
            n.WriteBool(true);
            n.WriteTag(5, Google.Protobuf.WireFormat.WireType.Varint);
            n.WriteBool(true);
            n.Flush();
            output.WriteTag(3, Google.Protobuf.WireFormat.WireType.LengthDelimited);
            output.WriteBytes(Google.Protobuf.ByteString.CopyFrom(normalizer.ToArray()));
        }

        output.Flush();
        await azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient("tiny-sp/tokenizer.model").UploadAsync(new BinaryData(model.ToArray()), overwrite: true);

        var source = await TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec { Kind = TokenizerKinds.SentencePiece, Files = "models/tiny-sp/" }, CancellationToken.None);
        var ids = source.Create().Encode("hello world", []);
        Assert.Equal([1, 15, 20], ids);
    }

    [Fact]
    public async Task O200k_is_available_by_name()
    {
        var tokenizer = (await TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec { Encoding = "o200k_base" }, CancellationToken.None)).Create();
        var ids = tokenizer.Encode("Wow... Loved this place.", []);
        Assert.Equal("Wow... Loved this place.", tokenizer.Inner.Decode(ids));
        Assert.NotEqual(tokenizer.Encode("Wow... Loved this place.", []), (await TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec(), CancellationToken.None)).Create().Encode("Wow... Loved this place.", []));
        Assert.Equal(199999, tokenizer.EndOfText);
    }
}
