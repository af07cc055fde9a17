using Azure.Core;
using Azure.Data.Tables;
using Azure.Identity;
using Azure.Storage.Blobs;
using Azure.Storage.Queues;
using Microsoft.Extensions.Configuration;

namespace Pipeline.Storage;

/// <summary>
/// The storage account every stage works against, built from the same settings the Functions host reads:
/// <c>AzureWebJobsStorage</c> as a connection string (Azurite locally), or identity-based
/// <c>AzureWebJobsStorage__accountName</c> / <c>__blobServiceUri</c> / <c>__queueServiceUri</c> /
/// <c>__tableServiceUri</c> (with <c>__clientId</c> for a user-assigned identity) in Azure.
/// Clients are thread-safe and shared.
/// </summary>
public sealed class StorageClients
{
    public const string ConnectionSetting = "AzureWebJobsStorage";

    public StorageClients(BlobServiceClient blobs, QueueServiceClient queues, TableServiceClient tables)
    {
        Blobs = blobs;
        Queues = queues;
        Tables = tables;
    }

    public BlobServiceClient Blobs { get; }
    public QueueServiceClient Queues { get; }
    public TableServiceClient Tables { get; }

    public BlobContainerClient Container(string name) => Blobs.GetBlobContainerClient(name);
    public QueueClient Queue(string name) => Queues.GetQueueClient(name);
    public TableClient Table(string name) => Tables.GetTableClient(name);

    /// <summary>The blob a <c>container/path</c> reference names (the form artifacts and messages use), or null when it names none.</summary>
    public BlobClient? BlobAt(string path) => BlobPath.TryParse(path, out var blob) ? Blob(blob) : null;

    public BlobClient Blob(BlobPath path) => Container(path.Container).GetBlobClient(path.Name);

    /// <summary>Builds the clients from configuration; <paramref name="messageEncoding"/> follows host.json.</summary>
    public static StorageClients FromConfiguration(IConfiguration configuration, QueueMessageEncoding messageEncoding, string connectionName = ConnectionSetting)
    {
        var queueOptions = new QueueClientOptions { MessageEncoding = messageEncoding };
        var connectionString = configuration[connectionName];
        if (!string.IsNullOrWhiteSpace(connectionString))
        {
            if (connectionString.Trim() == "UseDevelopmentStorage=true")
            {
                connectionString = AzuriteConnectionString(10000, 10001, 10002);
            }

            return new StorageClients(
                new BlobServiceClient(connectionString),
                new QueueServiceClient(connectionString, queueOptions),
                new TableServiceClient(connectionString));
        }

        var section = configuration.GetSection(connectionName);
        var accountName = section["accountName"];
        Uri? ServiceUri(string key, string kind) =>
            section[key] is { Length: > 0 } uri ? new Uri(uri)
            : accountName is { Length: > 0 } ? new Uri($"https://{accountName}.{kind}.core.windows.net")
            : null;

        var blobUri = ServiceUri("blobServiceUri", "blob");
        var queueUri = ServiceUri("queueServiceUri", "queue");
        var tableUri = ServiceUri("tableServiceUri", "table");
        if (blobUri is null || queueUri is null || tableUri is null)
        {
            throw new InvalidOperationException(
                $"No storage connection is configured. Set '{connectionName}' to a connection string " +
                $"(for Azurite: UseDevelopmentStorage=true) or '{connectionName}__accountName' for an identity-based connection.");
        }

        TokenCredential credential = section["clientId"] is { Length: > 0 } clientId
            ? new ManagedIdentityCredential(ManagedIdentityId.FromUserAssignedClientId(clientId))
            : new DefaultAzureCredential();
        return new StorageClients(
            new BlobServiceClient(blobUri, credential),
            new QueueServiceClient(queueUri, credential, queueOptions),
            new TableServiceClient(tableUri, credential));
    }

    public static string AzuriteConnectionString(int blobPort, int queuePort, int tablePort) =>
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;" +
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;" +
        $"BlobEndpoint=http://127.0.0.1:{blobPort}/devstoreaccount1;" +
        $"QueueEndpoint=http://127.0.0.1:{queuePort}/devstoreaccount1;" +
        $"TableEndpoint=http://127.0.0.1:{tablePort}/devstoreaccount1;";

    /// <summary>Creates every container, queue and table the platform uses (idempotent). In Azure the templates do this.</summary>
    public async Task EnsureCreatedAsync(CancellationToken cancellationToken = default)
    {
        await Task.WhenAll(StorageNames.Containers.All.Select(c => Container(c).CreateIfNotExistsAsync(cancellationToken: cancellationToken)));
        await Task.WhenAll(StorageNames.Queues.All.Select(q => Queue(q).CreateIfNotExistsAsync(cancellationToken: cancellationToken)));
        await Task.WhenAll(StorageNames.Tables.All.Select(t => Table(t).CreateIfNotExistsAsync(cancellationToken)));
    }
}
