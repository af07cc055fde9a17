using System.Text.Json;
using Azure.Messaging;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>The data of every run CloudEvent (type <c>pipeline.run.*</c>), schema version 1.</summary>
public sealed record RunEventData(
    int SchemaVersion,
    string RunId,
    string Stage,
    string Status,
    Dictionary<string, long>? Counts = null,
    Dictionary<string, string>? Artifacts = null,
    string? Error = null,
    string? ErrorCode = null);

/// <summary>How run events are dispatched (configuration section <c>Pipeline:Events</c>).</summary>
public sealed class RunEventsOptions
{
    public const string Section = "Pipeline:Events";

    /// <summary>
    /// How long an event saved with its change is left to the transition that saved it before a dispatcher
    /// publishes it, and how long a dispatcher that took an event has before another may retry it. Default 10 seconds.
    /// </summary>
    public TimeSpan RetryAfter { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>How often the function app's dispatcher looks for events not yet published. Default 30 seconds.</summary>
    public TimeSpan DispatchInterval { get; set; } = TimeSpan.FromSeconds(30);
}

/// <summary>
/// Publishes each run transition as a CloudEvent 1.0 (structured JSON) on the <c>events</c> queue, through an
/// outbox: the event is saved with the change (<see cref="RunStore.TryUpdateAsync(string, Func{RunRecord, bool}, IReadOnlyList{string}, CancellationToken)"/>),
/// then published and removed. A publish that fails leaves it saved; it is published later, by the run's next
/// transition or by <see cref="DispatchPendingAsync"/> (the function app runs it every <see cref="RunEventsOptions.DispatchInterval"/>).
/// Delivery is at least once: the CloudEvent id (run id, version, type) is the same on every publish of one event.
/// </summary>
public sealed class RunEvents(StorageClients storage, ILogger<RunEvents> logger, IOptions<RunEventsOptions>? options = null)
{
    public const string Source = "/pipeline";

    private readonly RunStore _runs = new(storage);
    private readonly RunEventsOptions _options = options?.Value ?? new RunEventsOptions();

    public static class Types
    {
        public const string StageStarted = "pipeline.run.stage.started";
        public const string StageSucceeded = "pipeline.run.stage.succeeded";
        /// <summary>Batch inference finished with some rows failed (the run's status is <c>completed_with_failures</c>).</summary>
        public const string StageCompletedWithFailures = "pipeline.run.stage.completed_with_failures";
        public const string RunFailed = "pipeline.run.failed";
        public const string StageRetrying = "pipeline.run.stage.retrying";
        public const string DatasetCreated = "pipeline.dataset.created";
        public const string RunCancelled = "pipeline.run.cancelled";
        /// <summary>A fine-tune finished an epoch (the data carries the latest metrics).</summary>
        public const string FineTuneProgress = "pipeline.run.finetune.progress";
    }

    /// <summary>
    /// A run's transitions, oldest first: those published, then those saved and not yet published.
    /// </summary>
    public async Task<List<RunEventView>> ListAsync(string runId, CancellationToken cancellationToken = default)
    {
        var events = new List<RunEventView>();
        var filter = Azure.Data.Tables.TableClient.CreateQueryFilter($"PartitionKey eq {runId}");
        await foreach (var e in storage.Table(StorageNames.Tables.RunEvents).QueryAsync<RunEventEntity>(filter, cancellationToken: cancellationToken))
        {
            events.Add(new RunEventView(e.EventId, e.Type, e.Time, e.Stage, e.Status,
                JsonSerializer.Deserialize(e.CountsJson ?? "null", PipelineJson.Default.DictionaryStringInt64), e.Error, e.ErrorCode));
        }

        await foreach (var pending in _runs.PendingEventsAsync(runId, cancellationToken))
        {
            if (!events.Exists(e => e.Id == pending.EventId))
            {
                events.Add(new RunEventView(pending.EventId, pending.Type, pending.Time, pending.Stage, pending.Status, pending.GetCounts(), pending.Error, pending.ErrorCode));
            }
        }

        return events;
    }

    /// <summary>
    /// Changes the run (as <see cref="RunStore.TryUpdateAsync(string, Func{RunRecord, bool}, CancellationToken)"/>) and,
    /// when it changed, saves the event <paramref name="type"/> with the change and publishes it. A change that
    /// changed nothing sends nothing.
    /// </summary>
    public Task<(RunRecord Run, bool Changed)> TransitionAsync(string runId, string type, Func<RunRecord, bool> mutate, CancellationToken cancellationToken = default) =>
        TransitionAsync(runId, [type], mutate, cancellationToken);

    /// <summary>As <see cref="TransitionAsync(string, string, Func{RunRecord, bool}, CancellationToken)"/>, for a change announced by several events (in this order).</summary>
    public async Task<(RunRecord Run, bool Changed)> TransitionAsync(string runId, IReadOnlyList<string> types, Func<RunRecord, bool> mutate, CancellationToken cancellationToken = default)
    {
        var (run, changed) = await _runs.TryUpdateAsync(runId, mutate, types, cancellationToken);
        if (changed)
        {
            await PublishSavedAsync(run, types, cancellationToken);
        }

        return (run, changed);
    }

    /// <summary>
    /// Publishes <paramref name="type"/> for the change <paramref name="run"/> holds, for a caller that saved the
    /// change without its event: the event is saved in the outbox first, then published as every event is. Prefer
    /// <see cref="TransitionAsync(string, string, Func{RunRecord, bool}, CancellationToken)"/>, which saves the two together.
    /// </summary>
    public async Task PublishAsync(string type, RunRecord run, CancellationToken cancellationToken = default)
    {
        await _runs.AddEventAsync(run, type, cancellationToken);
        await PublishSavedAsync(run, [type], cancellationToken);
    }

    /// <summary>
    /// Publishes every saved event that its transition did not publish within <see cref="RunEventsOptions.RetryAfter"/>
    /// (its publish failed, or its process stopped), each run's in order. Returns how many were published.
    /// </summary>
    public async Task<int> DispatchPendingAsync(CancellationToken cancellationToken = default)
    {
        var published = 0;
        string? stalledRun = null;
        await foreach (var entry in _runs.PendingEventsAsync(cancellationToken: cancellationToken))
        {
            // A run's events go out in order: after one of them fails, or is not due (another process is publishing it),
            // its later ones wait for the next round.
            if (entry.RunId == stalledRun)
            {
                continue;
            }

            if (!IsDue(entry))
            {
                stalledRun = entry.RunId;
                continue;
            }

            switch (await TryPublishAsync(entry, claim: true, cancellationToken))
            {
                case Outcome.Published:
                    published++;
                    break;
                case Outcome.Failed:
                    stalledRun = entry.RunId;
                    break;
            }
        }

        return published;
    }

    /// <summary>The events just saved with a change, after any of the run's earlier ones left over (so they stay in order).</summary>
    private async Task PublishSavedAsync(RunRecord run, IReadOnlyList<string> types, CancellationToken cancellationToken)
    {
        var own = types.Select(t => RunOutboxEntry.RowKeyFor(run.Version, t)).ToHashSet();
        var entries = new List<(RunOutboxEntry Entry, bool Claim)>();
        try
        {
            await foreach (var entry in _runs.PendingEventsAsync(run.RunId, cancellationToken))
            {
                // Its own events no dispatcher takes before RetryAfter: it publishes them without taking them first.
                if (own.Contains(entry.RowKey))
                {
                    entries.Add((entry, false));
                }
                else if (entry.Version < run.Version && IsDue(entry))
                {
                    entries.Add((entry, true));
                }
            }
        }
        catch (Exception e) when (IsTransient(e))
        {
            logger.LogWarning(e, "Run {RunId}: events of version {Version} not published yet, retried after {RetryAfter}: {Error}", run.RunId, run.Version, _options.RetryAfter, e.Message);
            return;
        }

        foreach (var (entry, claim) in entries)
        {
            if (await TryPublishAsync(entry, claim, cancellationToken) == Outcome.Failed)
            {
                // The rest wait for the dispatcher, behind this one.
                return;
            }
        }
    }

    private bool IsDue(RunOutboxEntry entry) => (entry.Timestamp ?? entry.Time) + _options.RetryAfter <= DateTimeOffset.UtcNow;

    private enum Outcome { Published, TakenByAnother, Failed }

    private static bool IsTransient(Exception e) => e is Azure.RequestFailedException or HttpRequestException or OperationCanceledException;

    /// <summary>
    /// Sends one saved event, records it in the run's history and removes it from the outbox. A left-over event is
    /// taken first (<paramref name="claim"/>: a conditional write, so two dispatchers never publish it at once). When
    /// it cannot be sent it stays saved, and is retried once <see cref="RunEventsOptions.RetryAfter"/> has passed
    /// since it was saved or last taken.
    /// </summary>
    private async Task<Outcome> TryPublishAsync(RunOutboxEntry entry, bool claim, CancellationToken cancellationToken)
    {
        try
        {
            if (claim && !await _runs.TryClaimEventAsync(entry, cancellationToken))
            {
                return Outcome.TakenByAnother;
            }

            var data = new RunEventData(1, entry.RunId, entry.Stage, entry.Status, entry.GetCounts(), entry.GetArtifacts(), entry.Error, entry.ErrorCode);
            var cloudEvent = new CloudEvent(Source, entry.Type, BinaryData.FromBytes(JsonSerializer.SerializeToUtf8Bytes(data, PipelineJson.Default.RunEventData)), "application/json", CloudEventDataFormat.Json)
            {
                Id = entry.EventId,
                Subject = $"runs/{entry.RunId}",
                Time = entry.Time,
            };
            cloudEvent.ExtensionAttributes["runid"] = entry.RunId;
            cloudEvent.ExtensionAttributes["runversion"] = entry.Version.ToString(System.Globalization.CultureInfo.InvariantCulture);
            await storage.Queue(StorageNames.Queues.Events).SendMessageAsync(JsonSerializer.Serialize(cloudEvent), cancellationToken);
            await storage.Table(StorageNames.Tables.RunEvents).UpsertEntityAsync(new RunEventEntity
            {
                PartitionKey = entry.RunId,
                RowKey = entry.RowKey[RunOutboxEntry.RowKeyPrefix.Length..],
                EventId = entry.EventId,
                Type = entry.Type,
                Stage = entry.Stage,
                Status = entry.Status,
                CountsJson = JsonSerializer.Serialize(data.Counts, PipelineJson.Default.DictionaryStringInt64),
                Error = entry.Error,
                ErrorCode = entry.ErrorCode,
                Time = entry.Time,
            }, Azure.Data.Tables.TableUpdateMode.Replace, cancellationToken);
            await _runs.RemoveEventAsync(entry, cancellationToken);
            logger.LogInformation("Run {RunId}: {EventType} (stage {Stage}, status {Status}, version {Version})", entry.RunId, entry.Type, entry.Stage, entry.Status, entry.Version);
            return Outcome.Published;
        }
        catch (Exception e) when (IsTransient(e))
        {
            // The change is saved and so is its event: it is published on a later try.
            logger.LogWarning(e, "Run {RunId}: event {EventType} (version {Version}) not published yet, retried after {RetryAfter}: {Error}",
                entry.RunId, entry.Type, entry.Version, _options.RetryAfter, e.Message);
            return Outcome.Failed;
        }
    }
}

/// <summary>A run transition as kept in the <c>runevents</c> table (partition = run id, row = time).</summary>
public sealed class RunEventEntity : Azure.Data.Tables.ITableEntity
{
    public string PartitionKey { get; set; } = "";
    public string RowKey { get; set; } = "";
    public DateTimeOffset? Timestamp { get; set; }
    public Azure.ETag ETag { get; set; }
    public string EventId { get; set; } = "";
    public string Type { get; set; } = "";
    public string Stage { get; set; } = "";
    public string Status { get; set; } = "";
    public string? CountsJson { get; set; }
    public string? Error { get; set; }
    public string? ErrorCode { get; set; }
    public DateTimeOffset Time { get; set; }
}
