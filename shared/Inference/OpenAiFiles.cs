using System.Text.RegularExpressions;
using Azure;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Azure.Storage.Blobs.Specialized;
using Pipeline.Storage;

namespace Pipeline.Inference;

/// <summary>
/// OpenAI's Files API on blob storage. An uploaded file is <c>outputs/openai/files/&lt;id&gt;</c> (its name, purpose
/// and creation time in the blob's metadata); a batch's output and error files are the inference batch's own
/// <c>outputs/&lt;batchId&gt;/openai/*.jsonl</c>, named <c>file-&lt;batchId&gt;-output</c> and <c>-errors</c>.
/// </summary>
public sealed partial class OpenAiFiles(StorageClients storage)
{
    public const string BatchPurpose = "batch";
    public const string BatchOutputPurpose = "batch_output";
    public const string FilesPrefix = "openai/files/";
    private const string FilenameMetadata = "filename";
    private const string PurposeMetadata = "purpose";
    private const string OutputSuffix = "-output";
    private const string ErrorsSuffix = "-errors";

    private BlobContainerClient Outputs => storage.Container(StorageNames.Containers.Outputs);

    public static string OutputFileId(string batchId) => $"file-{batchId}{OutputSuffix}";
    public static string ErrorFileId(string batchId) => $"file-{batchId}{ErrorsSuffix}";

    [GeneratedRegex("^file-[a-z0-9-]{1,80}$")]
    private static partial Regex FileId();

    /// <summary>The blob path (<c>container/blob</c>) of an uploaded file: the input of the batch that names it.</summary>
    public static string InputOf(string fileId) => $"{StorageNames.Containers.Outputs}/{FilesPrefix}{fileId}";

    /// <summary>
    /// Streams an upload into a new file (block by block: never held whole in memory) and returns its id. The
    /// purpose may arrive after the content in a multipart body: <see cref="SetPurposeAsync"/> records it then.
    /// </summary>
    public async Task<string> UploadAsync(Stream content, string filename, string? purpose, CancellationToken cancellationToken)
    {
        var id = "file-" + Guid.NewGuid().ToString("N");
        var blob = Outputs.GetBlockBlobClient(FilesPrefix + id);
        await blob.UploadAsync(content, new BlobUploadOptions
        {
            Metadata = Metadata(filename, purpose),
            HttpHeaders = new BlobHttpHeaders { ContentType = "application/jsonl" },
            TransferOptions = new Azure.Storage.StorageTransferOptions { InitialTransferSize = 4 << 20, MaximumTransferSize = 4 << 20 },
        }, cancellationToken);
        return id;
    }

    public async Task SetPurposeAsync(string id, string filename, string purpose, CancellationToken cancellationToken) =>
        await Outputs.GetBlobClient(FilesPrefix + id).SetMetadataAsync(Metadata(filename, purpose), cancellationToken: cancellationToken);

    private static Dictionary<string, string> Metadata(string filename, string? purpose)
    {
        // Metadata is ASCII: the name is kept escaped.
        var metadata = new Dictionary<string, string> { [FilenameMetadata] = Uri.EscapeDataString(filename) };
        if (purpose is not null)
        {
            metadata[PurposeMetadata] = purpose;
        }

        return metadata;
    }

    /// <summary>The file object, or null when there is no such file.</summary>
    public async Task<OpenAiFile?> GetAsync(string id, CancellationToken cancellationToken)
    {
        if (await BlobOfAsync(id, cancellationToken) is not { } blob)
        {
            return null;
        }

        BlobProperties properties;
        try
        {
            properties = (await blob.GetPropertiesAsync(cancellationToken: cancellationToken)).Value;
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return null;
        }

        var output = IsBatchOutput(id);
        return new OpenAiFile
        {
            Id = id,
            Bytes = properties.ContentLength,
            CreatedAt = properties.CreatedOn.ToUnixTimeSeconds(),
            Filename = output
                ? (id.EndsWith(OutputSuffix, StringComparison.Ordinal) ? "batch_output.jsonl" : "batch_errors.jsonl")
                : Uri.UnescapeDataString((properties.Metadata.TryGetValue(FilenameMetadata, out var name) ? name : null) ?? id),
            Purpose = output ? BatchOutputPurpose : (properties.Metadata.TryGetValue(PurposeMetadata, out var purpose) ? purpose : null) ?? BatchPurpose,
        };
    }

    /// <summary>The file's content as a stream, or null when there is no such file.</summary>
    public async Task<Stream?> OpenReadAsync(string id, CancellationToken cancellationToken)
    {
        if (await BlobOfAsync(id, cancellationToken) is not { } blob)
        {
            return null;
        }

        try
        {
            return (await blob.DownloadStreamingAsync(cancellationToken: cancellationToken)).Value.Content;
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return null;
        }
    }

    /// <summary>Deletes an uploaded file; a batch's output files belong to its inference batch and are refused.</summary>
    public async Task<bool> DeleteAsync(string id, CancellationToken cancellationToken)
    {
        if (IsBatchOutput(id))
        {
            throw new OpenAiApiException(400, "output_file_not_deletable",
                $"{id} is an output of a Pipeline inference batch (outputs/{BatchOf(id)}/), which is kept with its results, ledger and manifest; it is not deleted through the Files API.");
        }

        return await BlobOfAsync(id, cancellationToken) is { } blob && (await blob.DeleteIfExistsAsync(cancellationToken: cancellationToken)).Value;
    }

    private static bool IsBatchOutput(string id) => id.StartsWith("file-bt-", StringComparison.Ordinal) && (id.EndsWith(OutputSuffix, StringComparison.Ordinal) || id.EndsWith(ErrorsSuffix, StringComparison.Ordinal));

    private static string BatchOf(string id) => id["file-".Length..id.LastIndexOf('-')];

    /// <summary>An uploaded file's blob; for a batch's output or error file, that of the batch's newest committed version.</summary>
    private async Task<BlobClient?> BlobOfAsync(string id, CancellationToken cancellationToken)
    {
        if (!FileId().IsMatch(id))
        {
            return null;
        }

        if (!IsBatchOutput(id))
        {
            return Outputs.GetBlobClient(FilesPrefix + id);
        }

        if (await new BatchFiles(storage, BatchOf(id)).NewestAsync(cancellationToken) is not (_, var files))
        {
            return null;
        }

        return id.EndsWith(OutputSuffix, StringComparison.Ordinal) ? files.OpenAiOutput : files.OpenAiErrors;
    }
}
