using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Azure;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;

namespace Pipeline.Storage;

/// <summary>Manifests, reports and other JSON documents in blobs: read (null when absent), write, write once.</summary>
public static class BlobJson
{
    public static async Task<T?> ReadAsync<T>(BlobClient blob, JsonTypeInfo<T> type, CancellationToken cancellationToken)
        where T : class
    {
        try
        {
            var content = await blob.DownloadContentAsync(cancellationToken);
            return JsonSerializer.Deserialize(content.Value.Content.ToMemory().Span, type);
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return null;
        }
    }

    public static Task WriteAsync<T>(BlobClient blob, T value, JsonTypeInfo<T> type, CancellationToken cancellationToken) =>
        blob.UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(value, type)), new BlobUploadOptions { HttpHeaders = Json }, cancellationToken);

    /// <summary>
    /// Writes the document only if the blob does not exist yet (the commit of a manifest); false when
    /// another writer got there first.
    /// </summary>
    public static async Task<bool> WriteOnceAsync<T>(BlobClient blob, T value, JsonTypeInfo<T> type, CancellationToken cancellationToken)
    {
        try
        {
            await blob.UploadAsync(new BinaryData(JsonSerializer.SerializeToUtf8Bytes(value, type)), new BlobUploadOptions
            {
                Conditions = new BlobRequestConditions { IfNoneMatch = ETag.All },
                HttpHeaders = Json,
            }, cancellationToken);
            return true;
        }
        catch (RequestFailedException e) when (e.Status is 409 or 412)
        {
            return false;
        }
    }

    private static BlobHttpHeaders Json => new() { ContentType = "application/json" };
}
