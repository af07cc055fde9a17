using Pipeline.Storage;
using Xunit;

namespace Pipeline.Tests.StorageTests;

public class BlobPathTests
{
    [Theory]
    [InlineData("incoming/reviews.tsv", "incoming", "reviews.tsv")]
    [InlineData("models/bert/vocab.txt", "models", "bert/vocab.txt")]
    public void A_container_path_reference_splits_at_its_first_slash(string text, string container, string name)
    {
        Assert.True(BlobPath.TryParse(text, out var path));
        Assert.Equal(new BlobPath(container, name), path);
        Assert.Equal(text, path.ToString());
        Assert.Equal(name.Split('/')[^1], path.FileName);
    }

    [Theory]
    [InlineData(null)]
    [InlineData("")]
    [InlineData("reviews.tsv")]
    [InlineData("/reviews.tsv")]
    [InlineData("incoming/")]
    public void What_names_no_blob_is_refused(string? text) => Assert.False(BlobPath.TryParse(text, out _));

    [Theory]
    [InlineData("models/bert-base-uncased", "models", "bert-base-uncased/")]
    [InlineData("models/bert-base-uncased/", "models", "bert-base-uncased/")]
    public void A_folder_reference_always_ends_with_a_slash(string text, string container, string name)
    {
        Assert.True(BlobPath.TryParseFolder(text, out var folder));
        Assert.Equal(new BlobPath(container, name), folder);
    }

    [Theory]
    [InlineData("models")]
    [InlineData("models/")]
    [InlineData("/bert/")]
    public void A_folder_without_a_path_is_refused(string text) => Assert.False(BlobPath.TryParseFolder(text, out _));
}
