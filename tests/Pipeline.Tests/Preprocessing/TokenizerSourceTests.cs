using Pipeline.Preprocessing;
using Pipeline.Storage;
using Pipeline.Tests.Infrastructure;

namespace Pipeline.Tests.Preprocessing;

/// <summary>The tokenizers a build rents: kept between builds, and only ever handed to a build of the same fingerprint.</summary>
public sealed class TokenizerSourceTests(Azurite azurite) : IClassFixture<Azurite>
{
    /// <summary>A WordPiece vocabulary of its own (a fingerprint no other test uses), with a word only it knows.</summary>
    private async Task<TokenizerSource> UniqueWordPieceAsync(string word)
    {
        var folder = $"vocab-{Guid.NewGuid():n}/";
        var vocab = string.Join('\n', ["[PAD]", "[UNK]", "[CLS]", "[SEP]", word, "##s", "other"]) + "\n";
        await azurite.Storage.Container(StorageNames.Containers.Models).GetBlobClient(folder + "vocab.txt").UploadAsync(BinaryData.FromString(vocab));
        return await TokenizerSource.LoadAsync(azurite.Storage, new TokenizerSpec { Kind = TokenizerKinds.WordPiece, Files = "models/" + folder }, CancellationToken.None);
    }

    [Fact]
    public async Task A_returned_tokenizer_is_rented_again_only_for_the_same_fingerprint()
    {
        var first = await UniqueWordPieceAsync("alpha");
        var second = await UniqueWordPieceAsync("beta");
        Assert.NotEqual(first.Fingerprint, second.Fingerprint);

        var rented = first.Rent();
        Assert.Equal([2, 4, 3], rented.Encode("alpha", []));
        first.Return(rented);

        var other = second.Rent();
        Assert.NotSame(rented, other);
        Assert.Equal([2, 4, 5, 3], other.Encode("betas", []));
        Assert.Equal([2, 1, 3], other.Encode("alpha", []));

        Assert.Same(rented, first.Rent());
        var fresh = first.Rent();
        Assert.NotSame(rented, fresh);
        Assert.Equal(rented.Encode("alpha other", []), fresh.Encode("alpha other", []));
    }
}
