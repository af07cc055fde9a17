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
