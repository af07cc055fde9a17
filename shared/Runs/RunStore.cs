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

    /// <summary>
    /// As <see cref="UpdateAsync"/>, and says whether the run was changed. A mutation that returns true but leaves
    /// the run as it was is no change: nothing is saved. Use <see cref="TryUpdateAsync(string, Func{RunRecord, bool}, IReadOnlyList{string}, CancellationToken)"/>
    /// when the change has events, so they are saved with it.
    /// </summary>
    public Task<(RunRecord Run, bool Changed)> TryUpdateAsync(string runId, Func<RunRecord, bool> mutate, CancellationToken cancellationToken = default) =>
        TryUpdateAsync(runId, mutate, [], cancellationToken);

    /// <summary>
    /// As <see cref="UpdateAsync"/>; when the run changed, the events <paramref name="eventTypes"/> that announce the
    /// change are saved with it in one entity-group transaction (the run and its pending events share a partition):
    /// either both are saved or neither. Each saved change adds one to <see cref="RunRecord.Version"/>.
    /// </summary>
    public async Task<(RunRecord Run, bool Changed)> TryUpdateAsync(string runId, Func<RunRecord, bool> mutate, IReadOnlyList<string> eventTypes, CancellationToken cancellationToken = default)
    {
        for (var attempt = 0; ; attempt++)
        {
            var run = await GetAsync(runId, cancellationToken) ?? throw new InvalidOperationException($"Run {runId} does not exist.");
            var before = run.Copy();
            if (!mutate(run) || run.SameContentAs(before))
            {
                return (before, false);
            }

            if (before.Status == RunStatus.Cancelled && run.Status != RunStatus.Cancelled)
            {
                return (await GetAsync(runId, cancellationToken) ?? before, false);
            }

            run.UpdatedAt = DateTimeOffset.UtcNow;
            run.Version = before.Version + 1;
            try
            {
                run.ETag = await SaveAsync(run, eventTypes, cancellationToken);
                return (run, true);
            }
            catch (RequestFailedException e) when (e.Status is 412 or 409 && attempt < 20)
            {
                // Changed by someone else since the read (409: its events, saved under the same version, came first).
                await Task.Delay(Random.Shared.Next(5, 50), cancellationToken);
            }
        }
    }

    /// <summary>Saves the run if it is still at the version read (ETag), with its pending events; returns the new ETag.</summary>
    private async Task<ETag> SaveAsync(RunRecord run, IReadOnlyList<string> eventTypes, CancellationToken cancellationToken)
    {
        if (eventTypes.Count == 0)
        {
            var response = await _table.UpdateEntityAsync(run, run.ETag, TableUpdateMode.Replace, cancellationToken);
            return response.Headers.ETag ?? default;
        }

        var actions = new List<TableTransactionAction>(eventTypes.Count + 1) { new(TableTransactionActionType.UpdateReplace, run, run.ETag) };
        actions.AddRange(eventTypes.Distinct().Select(type => new TableTransactionAction(TableTransactionActionType.Add, RunOutboxEntry.For(run, type))));
        var responses = await _table.SubmitTransactionAsync(actions, cancellationToken);
        return responses.Value[0].Headers.ETag ?? default;
    }

    /// <summary>
    /// Saves an event for a change already saved (at the run's version), for a caller that saved the change on its own.
    /// Saving it again is harmless: it is the same event.
    /// </summary>
    public async Task AddEventAsync(RunRecord run, string eventType, CancellationToken cancellationToken = default) =>
        await _table.UpsertEntityAsync(RunOutboxEntry.For(run, eventType), TableUpdateMode.Replace, cancellationToken);

    /// <summary>The events not yet published, of one run (oldest first) or of all runs (by run, then oldest first), a page at a time.</summary>
    public IAsyncEnumerable<RunOutboxEntry> PendingEventsAsync(string? runId = null, CancellationToken cancellationToken = default) =>
        _table.QueryAsync<RunOutboxEntry>(RunOutboxEntry.Filter(runId), maxPerPage: ListPageSize, cancellationToken: cancellationToken);

    /// <summary>
    /// Takes a pending event for one dispatcher: false when another changed it since it was read (it took it).
    /// Taking it restarts its retry delay (the entry's timestamp).
    /// </summary>
    public async Task<bool> TryClaimEventAsync(RunOutboxEntry entry, CancellationToken cancellationToken = default)
    {
        try
        {
            entry.Attempts++;
            var response = await _table.UpdateEntityAsync(entry, entry.ETag, TableUpdateMode.Replace, cancellationToken);
            entry.ETag = response.Headers.ETag ?? default;
            return true;
        }
        catch (RequestFailedException e) when (e.Status is 412 or 404)
        {
            return false;
        }
    }

    /// <summary>The event was published: it leaves the outbox (gone already, if another dispatcher published it too).</summary>
    public async Task RemoveEventAsync(RunOutboxEntry entry, CancellationToken cancellationToken = default)
    {
        try
        {
            await _table.DeleteEntityAsync(entry.PartitionKey, entry.RowKey, ETag.All, cancellationToken);
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
        }
    }

    /// <summary>
    /// The newest <paramref name="max"/> runs (optionally of one status), newest first. The table is read a page at
    /// a time and only the newest <paramref name="max"/> are kept, so memory stays bounded by <paramref name="max"/>
    /// however many runs the account holds.
    /// </summary>
    public async Task<List<RunRecord>> ListAsync(string? status = null, int max = 1000, CancellationToken cancellationToken = default)
    {
        // The table also holds each run's pending events (RunOutboxEntry): only run rows are listed.
        var filter = status is null
            ? TableClient.CreateQueryFilter($"RowKey eq {RunRecord.RowKeyValue}")
            : TableClient.CreateQueryFilter($"RowKey eq {RunRecord.RowKeyValue} and Status eq {status}");
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
