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
    /// </summary>
    public async Task<RunRecord> UpdateAsync(string runId, Func<RunRecord, bool> mutate, CancellationToken cancellationToken = default)
    {
        for (var attempt = 0; ; attempt++)
        {
            var run = await GetAsync(runId, cancellationToken) ?? throw new InvalidOperationException($"Run {runId} does not exist.");
            if (!mutate(run))
            {
                return run;
            }

            run.UpdatedAt = DateTimeOffset.UtcNow;
            try
            {
                var response = await _table.UpdateEntityAsync(run, run.ETag, TableUpdateMode.Replace, cancellationToken);
                run.ETag = response.Headers.ETag ?? default;
                return run;
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

    public async Task<List<RunRecord>> ListAsync(string? status = null, int max = 1000, CancellationToken cancellationToken = default)
    {
        var filter = status is null ? null : TableClient.CreateQueryFilter($"Status eq {status}");
        var runs = new List<RunRecord>();
        await foreach (var run in _table.QueryAsync<RunRecord>(filter, cancellationToken: cancellationToken))
        {
            runs.Add(run);
        }

        return [.. runs.OrderByDescending(r => r.CreatedAt).Take(max)];
    }
}
