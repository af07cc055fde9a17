using Azure.Storage.Blobs.Models;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Ingestion;

/// <summary>The datasets in the account: every <c>datasets/&lt;datasetId&gt;/manifest.json</c>.</summary>
public static class DatasetCatalog
{
    public static async Task<List<DatasetView>> ListAsync(StorageClients storage, CancellationToken cancellationToken)
    {
        var container = storage.Container(StorageNames.Containers.Datasets);
        var datasets = new List<DatasetView>();
        await foreach (var item in container.GetBlobsByHierarchyAsync(BlobTraits.None, BlobStates.None, "/", null, cancellationToken))
        {
            if (!item.IsPrefix || item.Prefix.StartsWith('_'))
            {
                continue;
            }

            // No manifest: not committed (a crash mid-ingestion); readers trust only manifests.
            if (await BlobJson.ReadAsync(container.GetBlobClient(item.Prefix + "manifest.json"), PipelineJson.Default.DatasetManifest, cancellationToken) is { } manifest)
            {
                datasets.Add(new DatasetView(manifest.DatasetId, manifest.Format, manifest.RecordKind, manifest.Counts.Valid, manifest.Counts.Invalid,
                    manifest.LabelType, manifest.SourceBlob, manifest.RunId, manifest.CreatedAt, $"{StorageNames.Containers.Datasets}/{item.Prefix}manifest.json"));
            }
        }

        return [.. datasets.OrderByDescending(d => d.CreatedAt)];
    }
}
