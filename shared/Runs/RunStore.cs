using Azure;
using Azure.Data.Tables;
using Pipeline.Storage;

namespace Pipeline.Runs;

/// <summary>Reads and writes run records in the <c>runs</c> table with optimistic concurrency.</summary>
public sealed class RunStore(StorageClients storage)
{
    private readonly TableClient _table = storage.Table(StorageNames.Tables.Runs);

    public async Task<RunRecord?> GetAsync(string runId, CancellationToken cancellationToken = default)
    {
        var response = await _table.GetEntityIfExistsAsync<RunRecord>(runId, RunRecord.RowKeyValue, cancellationToken: cancellationToken);
        return response.HasValue ? response.Value : null;
    }

    /// <summary>Creates the run, or returns the one that already exists under that id.</summary>
    public async Task<RunRecord> GetOrCreateAsync(RunRecord run, CancellationToken cancellationToken = default)
    {
        var now = DateTimeOffset.UtcNow;
        run.CreatedAt = now;
        run.UpdatedAt = now;
        try
        {
            var response = await _table.AddEntityAsync(run, cancellationToken);
            run.ETag = response.Headers.ETag ?? default;
            return run;
        }
        catch (RequestFailedException e) when (e.Status == 409)
        {
            return await GetAsync(run.RunId, cancellationToken) ?? throw new InvalidOperationException($"Run {run.RunId} vanished while being created.");
        }
    }

    /// <summary>
    /// Applies <paramref name="mutate"/> to the latest version of the run and saves it, retrying on
    /// concurrent changes. <paramref name="mutate"/> returns false to leave the run unchanged.
    /// A cancelled run stays cancelled: a change that would move it out of <c>cancelled</c> is not saved, and the
    /// save is conditional on the version read (ETag), so a cancel that lands between the read and the write
    /// makes the write fail, the run is read again and the change is refused on that version.
    /// </summary>
    public async Task<RunRecord> UpdateAsync(string runId, Func<RunRecord, bool> mutate, CancellationToken cancellationToken = default) =>
        (await TryUpdateAsync(runId, mutate, cancellationToken)).Run;

    /// <summary>As <see cref="UpdateAsync"/>, and says whether the run was changed (then publish its event; else don't).</summary>
    public async Task<(RunRecord Run, bool Changed)> TryUpdateAsync(string runId, Func<RunRecord, bool> mutate, CancellationToken cancellationToken = default)
    {
        for (var attempt = 0; ; attempt++)
        {
            var run = await GetAsync(runId, cancellationToken) ?? throw new InvalidOperationException($"Run {runId} does not exist.");
            var wasCancelled = run.Status == RunStatus.Cancelled;
            if (!mutate(run))
            {
                return (run, false);
            }

            if (wasCancelled && run.Status != RunStatus.Cancelled)
            {
                return (await GetAsync(runId, cancellationToken) ?? run, false);
            }

            run.UpdatedAt = DateTimeOffset.UtcNow;
            try
            {
                var response = await _table.UpdateEntityAsync(run, run.ETag, TableUpdateMode.Replace, cancellationToken);
                run.ETag = response.Headers.ETag ?? default;
                return (run, true);
            }
            catch (RequestFailedException e) when (e.Status == 412 && attempt < 20)
            {
                await Task.Delay(Random.Shared.Next(5, 50), cancellationToken);
            }
        }
    }

    /// <summary>The preprocessing statistics a run points to (<c>container/path</c>), or null.</summary>
    public async Task<Preprocessing.PreparedStats?> ReadStatsAsync(string path, CancellationToken cancellationToken = default)
    {
        return storage.BlobAt(path) is { } blob ? await BlobJson.ReadAsync(blob, Preprocessing.PreprocessJson.Default.PreparedStats, cancellationToken) : null;
    }

    /// <summary>
    /// The newest <paramref name="max"/> runs (optionally of one status), newest first. The table is read a page at
    /// a time and only the newest <paramref name="max"/> are kept, so memory stays bounded by <paramref name="max"/>
    /// however many runs the account holds.
    /// </summary>
    public async Task<List<RunRecord>> ListAsync(string? status = null, int max = 1000, CancellationToken cancellationToken = default)
    {
        var filter = status is null ? null : TableClient.CreateQueryFilter($"Status eq {status}");
        var newest = new PriorityQueue<RunRecord, DateTimeOffset>(max + 1);
        await foreach (var run in _table.QueryAsync<RunRecord>(filter, maxPerPage: ListPageSize, cancellationToken: cancellationToken))
        {
            newest.Enqueue(run, run.CreatedAt);
            if (newest.Count > max)
            {
                newest.Dequeue();
            }
        }

        var runs = new List<RunRecord>(newest.Count);
        while (newest.TryDequeue(out var run, out _))
        {
            runs.Add(run);
        }

        runs.Reverse();
        return runs;
    }

    /// <summary>How many runs one table query page returns.</summary>
    public const int ListPageSize = 500;
}
