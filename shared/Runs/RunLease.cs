using Azure;
using Azure.Storage.Blobs.Specialized;
using Pipeline.Storage;

namespace Pipeline.Runs;

/// <summary>
/// Another instance is working on this run's stage right now. The message is put back with a delay
/// rather than failed, so a busy run never uses up the message's delivery attempts.
/// </summary>
public sealed class RunBusyException(string message) : Exception(message);

/// <summary>
/// A renewed blob lease that gives one instance a run's stage at a time, so two deliveries of the same
/// message (Event Grid and queues deliver at least once) never do the work twice side by side.
/// The second finds the lease taken, fails transiently, and on its retry finds the stage finished.
/// </summary>
public sealed class RunLease : IAsyncDisposable
{
    private static readonly TimeSpan Duration = TimeSpan.FromSeconds(15);

    /// <summary>How long a busy delivery waits before it is tried again: past a dead holder's lease.</summary>
    public static readonly TimeSpan RetryAfter = TimeSpan.FromSeconds(20);
    private readonly BlobLeaseClient _lease;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _renewal;

    private RunLease(BlobLeaseClient lease)
    {
        _lease = lease;
        _renewal = RenewAsync();
    }

    public static async Task<RunLease> AcquireAsync(StorageClients storage, string runId, string stage, CancellationToken cancellationToken)
    {
        var blob = storage.Container(StorageNames.Containers.Datasets).GetBlobClient($"_locks/{runId}.{stage}");
        try
        {
            await blob.UploadAsync(BinaryData.Empty, overwrite: false, cancellationToken);
        }
        catch (RequestFailedException e) when (e.Status is 409 or 412)
        {
            // The lock blob exists already (an earlier attempt); leasing it is what counts.
        }

        var lease = blob.GetBlobLeaseClient();
        try
        {
            await lease.AcquireAsync(Duration, cancellationToken: cancellationToken);
        }
        catch (RequestFailedException e) when (e.Status == 409)
        {
            throw new RunBusyException($"Run {runId} is being processed ({stage}) by another instance; this delivery will be retried.");
        }

        return new RunLease(lease);
    }

    /// <summary>Ends whoever holds the lease now (a holder declared dead), so the next claimant does not wait for it to expire.</summary>
    public static async Task BreakAsync(StorageClients storage, string runId, string stage, CancellationToken cancellationToken)
    {
        try
        {
            await storage.Container(StorageNames.Containers.Datasets).GetBlobClient($"_locks/{runId}.{stage}").GetBlobLeaseClient().BreakAsync(TimeSpan.Zero, cancellationToken: cancellationToken);
        }
        catch (RequestFailedException e) when (e.Status is 404 or 409)
        {
            // No lock blob, or no lease on it: nothing to break.
        }
    }

    private async Task RenewAsync()
    {
        try
        {
            while (true)
            {
                await Task.Delay(Duration / 3, _stop.Token);
                await _lease.RenewAsync(cancellationToken: _stop.Token);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or RequestFailedException)
        {
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        await _renewal;
        try
        {
            await _lease.ReleaseAsync();
        }
        catch (RequestFailedException)
        {
        }

        _stop.Dispose();
    }
}
