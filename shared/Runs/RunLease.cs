using Azure;
using Azure.Storage.Blobs.Specialized;
using Pipeline.Storage;

namespace Pipeline.Runs;

/// <summary>
/// Another instance is working on this run's stage right now. The message is put back with a delay
/// rather than failed, so a busy run never uses up the message's delivery attempts. It is put back a bounded
/// number of times, except while <see cref="WaitsOnLiveRun"/>: then it waits for another run that is still making
/// progress (an identical batch it shares), however long that run takes; that run ends one way or another.
/// </summary>
public sealed class RunBusyException(string message) : Exception(message)
{
    /// <summary>The wait is for another run that has not ended (not for a lease held by a stuck instance).</summary>
    public bool WaitsOnLiveRun { get; init; }
}

/// <summary>
/// A renewed blob lease that gives one instance a run's stage at a time, so two deliveries of the same
/// message (Event Grid and queues deliver at least once) never do the work twice side by side.
/// The second finds the lease taken, fails transiently, and on its retry finds the stage finished.
/// A holder that loses its lease (another instance broke it, or renewals failed until it expired) is told
/// through <see cref="Lost"/>: the work it guards must stop, because someone else may now be doing it.
/// </summary>
public sealed class RunLease : IAsyncDisposable
{
    private static readonly TimeSpan Duration = TimeSpan.FromSeconds(15);

    /// <summary>How long a busy delivery waits before it is tried again: past a dead holder's lease.</summary>
    public static readonly TimeSpan RetryAfter = TimeSpan.FromSeconds(20);
    private readonly BlobLeaseClient _lease;
    private readonly CancellationTokenSource _stop = new();
    private readonly CancellationTokenSource _lost = new();
    private readonly Task _renewal;

    private RunLease(BlobLeaseClient lease, string holds)
    {
        _lease = lease;
        Holds = holds;
        _renewal = RenewAsync();
    }

    /// <summary>What the lease guards (<c>run.stage</c>), for messages.</summary>
    public string Holds { get; }

    /// <summary>Cancelled when the lease is lost; link it with the work's own token.</summary>
    public CancellationToken Lost => _lost.Token;

    /// <summary>The reason the lease was lost, once <see cref="Lost"/> is cancelled.</summary>
    public string? LostReason { get; private set; }

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

        return new RunLease(lease, $"{runId}.{stage}");
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

    /// <summary>A token for the guarded work: cancelled when <paramref name="cancellationToken"/> is, or when the lease is lost.</summary>
    public CancellationTokenSource Link(CancellationToken cancellationToken) => CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _lost.Token);

    /// <summary>Throws <see cref="LeaseLostException"/> when the lease is lost (call it where the work stops on cancellation).</summary>
    public void ThrowIfLost()
    {
        if (_lost.IsCancellationRequested)
        {
            throw new LeaseLostException(Holds, LostReason);
        }
    }

    private async Task RenewAsync()
    {
        var renewed = DateTimeOffset.UtcNow;
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(Duration / 3, _stop.Token);
                // Each renewal gets a third of the lease: a hung call must not outlive the lease it renews.
                using var attempt = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
                attempt.CancelAfter(Duration / 3);
                await _lease.RenewAsync(cancellationToken: attempt.Token);
                renewed = DateTimeOffset.UtcNow;
            }
            catch (OperationCanceledException) when (_stop.IsCancellationRequested)
            {
                return;
            }
            catch (RequestFailedException e) when (e.Status is 409 or 412 or 404)
            {
                // The lease was broken or taken over (or its blob is gone): someone else may hold the stage now.
                await LoseAsync($"the lease could not be renewed ({e.Status} {e.ErrorCode})");
                return;
            }
            catch (Exception e) when (e is RequestFailedException or HttpRequestException or IOException or TimeoutException or OperationCanceledException)
            {
                // A transient storage failure (or a renewal that timed out): keep trying while the lease is surely ours,
                // and give up a third of the lease before it could expire, so the work stops before another can take it.
                if (DateTimeOffset.UtcNow - renewed >= Duration - (Duration / 3))
                {
                    await LoseAsync($"renewals failed for {(DateTimeOffset.UtcNow - renewed).TotalSeconds:N0} s of the lease's {Duration.TotalSeconds:N0} ({e.GetType().Name}: {e.Message})");
                    return;
                }
            }
        }
    }

    private Task LoseAsync(string reason)
    {
        LostReason = reason;
        return _lost.CancelAsync();
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        await _renewal;
        if (!_lost.IsCancellationRequested)
        {
            try
            {
                await _lease.ReleaseAsync();
            }
            catch (RequestFailedException)
            {
            }
        }

        _stop.Dispose();
    }
}

/// <summary>The instance lost the lease on work it was doing: it stopped, and the message is retried (whoever holds the lease now finishes the work).</summary>
public sealed class LeaseLostException(string holds, string? reason) : Exception($"The lease on {holds} was lost ({reason ?? "no reason recorded"}); this instance stopped its work.");
