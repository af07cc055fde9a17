using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Azure.Storage.Sas;

namespace Pipeline.Storage;

/// <summary>Server-side copies inside the account: the bytes never pass through the function.</summary>
public sealed class BlobCopier(StorageClients storage)
{
    public async Task CopyAsync(BlobClient source, BlobClient destination, CancellationToken cancellationToken, BlobRequestConditions? destinationConditions = null)
    {
        var sourceUri = await ReadableUriAsync(source, cancellationToken);
        var operation = await destination.StartCopyFromUriAsync(sourceUri, new BlobCopyFromUriOptions { DestinationConditions = destinationConditions }, cancellationToken);
        await operation.WaitForCompletionAsync(TimeSpan.FromMilliseconds(200), cancellationToken);
        var properties = await destination.GetPropertiesAsync(cancellationToken: cancellationToken);
        if (properties.Value.CopyStatus != CopyStatus.Success)
        {
            throw new IOException($"Copy of {source.Name} to {destination.Name} ended {properties.Value.CopyStatus}: {properties.Value.CopyStatusDescription}");
        }
    }

    /// <summary>A short-lived read SAS: from the account key where the client has one, else a user delegation key (managed identity).</summary>
    private async Task<Uri> ReadableUriAsync(BlobClient source, CancellationToken cancellationToken)
    {
        var expires = DateTimeOffset.UtcNow.AddHours(1);
        if (source.CanGenerateSasUri)
        {
            return source.GenerateSasUri(BlobSasPermissions.Read, expires);
        }

        var key = await storage.Blobs.GetUserDelegationKeyAsync(DateTimeOffset.UtcNow.AddMinutes(-5), expires, cancellationToken);
        var sas = new BlobSasBuilder(BlobSasPermissions.Read, expires)
        {
            BlobContainerName = source.BlobContainerName,
            BlobName = source.Name,
            Resource = "b",
        };
        return new BlobUriBuilder(source.Uri) { Sas = sas.ToSasQueryParameters(key.Value, storage.Blobs.AccountName) }.ToUri();
    }
}
