using System.Text.Json;
using System.Text.Json.Nodes;
using Azure;
using Azure.Data.Tables;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging;
using Pipeline.FineTuning;
using Pipeline.Ingestion;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Messaging;

/// <summary>A message that was given up on, as kept in the <c>poisonmessages</c> table (partition = queue it came from).</summary>
public sealed class PoisonRecord : ITableEntity
{
    public string PartitionKey { get; set; } = "";
    public string RowKey { get; set; } = "";
    public DateTimeOffset? Timestamp { get; set; }
    public ETag ETag { get; set; }

    public string Queue { get => PartitionKey; set => PartitionKey = value; }
    public string Message { get; set; } = "";
    public string? RunId { get; set; }
    /// <summary>Why it was given up on: the last error of the run, or why the message is invalid.</summary>
    public string Reason { get; set; } = "";
    /// <summary><c>poisoned</c> (retries exhausted) or <c>invalid</c> (rejected on arrival, never retried).</summary>
    public string Kind { get; set; } = "";
    public int Attempts { get; set; }
    public DateTimeOffset RecordedAt { get; set; }
    /// <summary>When it was put back on its queue by a replay, if it was.</summary>
    public DateTimeOffset? ReplayedAt { get; set; }

    public PoisonView ToView() => new(Queue, RowKey, Kind, RunId, Reason, Attempts, RecordedAt, ReplayedAt, Message);
}

/// <summary>
/// Records messages that will not be processed: poisoned ones (after maxDequeueCount, from the
/// <c>&lt;queue&gt;-poison</c> queues) and invalid ones (rejected at once). Each keeps its reason, and its
/// run, when it has one, is marked failed with that reason.
/// </summary>
public sealed class FailedMessages(StorageClients storage, RunStore runs, RunTransitions transitions, FineTuneHandler fineTune, IConfiguration configuration, ILogger<FailedMessages> logger)
{
    public const string PoisonedKind = "poisoned";
    public const string InvalidKind = "invalid";
    public const string PoisonErrorCode = "PoisonMessage";

    /// <summary>
    /// How many times in a row a message may wait for its busy run before it is given up on (app setting
    /// <c>Pipeline__Messaging__MaxDeferrals</c>). The default waits 40 minutes at the default delay: longer than
    /// host.json's <c>functionTimeout</c> (30 minutes), so a duplicate delivery never outwaits, and fails, a
    /// stage that is still working.
    /// </summary>
    public const string MaxDeferralsSetting = "Pipeline:Messaging:MaxDeferrals";
    public const int DefaultMaxDeferrals = 120;

    /// <summary>The property a deferred message carries its count of deferrals in (a re-sent queue message starts its dequeue count again).</summary>
    public const string DeferralsProperty = "deferrals";

    /// <summary>How long a deferred message waits (app setting <c>Pipeline__Messaging__DeferralDelay</c>; default <see cref="RunLease.RetryAfter"/>, past a dead holder's lease).</summary>
    public const string DeferralDelaySetting = "Pipeline:Messaging:DeferralDelay";

    public int MaxDeferrals { get; } = Math.Max(1, configuration.GetValue(MaxDeferralsSetting, DefaultMaxDeferrals));

    public TimeSpan DeferralDelay { get; } = configuration.GetValue(DeferralDelaySetting, RunLease.RetryAfter);

    /// <summary>
    /// A message whose run is busy (another instance holds its stage, or this one lost the stage's lease) goes
    /// back on <paramref name="queue"/> for <see cref="DeferralDelay"/>, its count of deferrals (and the run it
    /// resolved to) written into it. After <see cref="MaxDeferrals"/> in a row it is given up on: recorded as
    /// poisoned with the reason, and its run failed with it.
    /// </summary>
    public Task DeferAsync(string queue, string message, string? messageId, string why, CancellationToken cancellationToken) =>
        DeferAsync(queue, message, messageId, why, counted: true, cancellationToken);

    /// <summary>
    /// As <see cref="DeferAsync(string, string, string?, string, CancellationToken)"/> for the busy exception itself: a
    /// message waiting on another live run (<see cref="RunBusyException.WaitsOnLiveRun"/>) waits without using up its deferrals.
    /// </summary>
    public Task DeferAsync(string queue, string message, string? messageId, Exception busy, CancellationToken cancellationToken) =>
        DeferAsync(queue, message, messageId, busy.Message, counted: busy is not RunBusyException { WaitsOnLiveRun: true }, cancellationToken);

    private async Task DeferAsync(string queue, string message, string? messageId, string why, bool counted, CancellationToken cancellationToken)
    {
        var runId = await RunIdOfAsync(queue, message, cancellationToken);
        var deferrals = DeferralsOf(message);
        if (!counted)
        {
            await storage.Queue(queue).SendMessageAsync(WithDeferrals(message, deferrals, runId), DeferralDelay, cancellationToken: cancellationToken);
            logger.LogInformation("Run {RunId} waits for another run ({Reason}); the {Queue} message waits {Delay}", runId, why, queue, DeferralDelay);
            return;
        }

        if (deferrals >= MaxDeferrals)
        {
            var reason = $"Gave up after waiting {deferrals} times ({DeferralDelay.TotalSeconds:N0} s each) for run {runId}, which stayed busy: {why} "
                + $"Check what holds the run (pipeline status {runId}), then replay the message (pipeline poison replay). The limit is the setting {MaxDeferralsSetting.Replace(":", "__", StringComparison.Ordinal)} ({MaxDeferrals}).";
            // Kept with its count cleared, so a replay waits afresh.
            await SaveAsync(queue, WithDeferrals(message, 0, runId), messageId, runId, reason, PoisonedKind, deferrals, cancellationToken);
            await FailRunAsync(runId, queue, PoisonErrorCode, reason, cancellationToken);
            return;
        }

        await storage.Queue(queue).SendMessageAsync(WithDeferrals(message, deferrals + 1, runId), DeferralDelay, cancellationToken: cancellationToken);
        logger.LogInformation("Run {RunId} is busy ({Reason}); the {Queue} message waits {Delay} (deferral {Deferral} of {Max})", runId, why, queue, DeferralDelay, deferrals + 1, MaxDeferrals);
    }

    /// <summary>How many times the message has waited for its busy run (0 when it never has, or is not JSON).</summary>
    public static int DeferralsOf(string message)
    {
        try
        {
            return Root(JsonNode.Parse(message))?[DeferralsProperty] is JsonValue value && value.TryGetValue<int>(out var n) ? n : 0;
        }
        catch (JsonException)
        {
            return 0;
        }
    }

    /// <summary>The message with its count of deferrals (removed at 0) and, for an envelope without one, the run it belongs to.</summary>
    private static string WithDeferrals(string message, int deferrals, string runId)
    {
        JsonNode? document;
        try
        {
            document = JsonNode.Parse(message);
        }
        catch (JsonException)
        {
            return message;
        }

        if (Root(document) is not { } root)
        {
            return message;
        }

        if (deferrals > 0)
        {
            root[DeferralsProperty] = deferrals;
        }
        else
        {
            root.Remove(DeferralsProperty);
        }

        // An envelope names its run from now on: the run id derived from its text would change with the count.
        if (!root.ContainsKey("eventType") && root["runId"] is null)
        {
            root["runId"] = runId;
        }

        return document!.ToJsonString();
    }

    private static JsonObject? Root(JsonNode? document) => document switch
    {
        JsonArray { Count: > 0 } events => events[0] as JsonObject,
        JsonObject envelope => envelope,
        _ => null,
    };

    /// <summary>Handles a message that arrived on <c>&lt;sourceQueue&gt;-poison</c>.</summary>
    public async Task RecordPoisonAsync(string sourceQueue, string message, string? messageId, CancellationToken cancellationToken)
    {
        var runId = await RunIdOfAsync(sourceQueue, message, cancellationToken);
        var run = await runs.GetAsync(runId, cancellationToken);
        var attempts = run?.Attempt ?? 0;
        var lastError = run?.LastError ?? "no error was recorded (the handler may have crashed or timed out before it could record one)";
        var reason = $"Gave up after {attempts} attempt(s): the {sourceQueue} message was moved to {StorageNames.Queues.Poison(sourceQueue)}. Last error: {lastError}";
        await SaveAsync(sourceQueue, message, messageId, runId, reason, PoisonedKind, attempts, cancellationToken);
        // A fine-tune job's chain of polls died with its monitor message: the job's trainer is stopped and its runs fail;
        // unless a later tick still watches the job, and then its run goes on.
        if (sourceQueue == StorageNames.Queues.FineTuneMonitor && MonitorRequestOf(message) is { } monitor
            && !await fineTune.StopUnwatchedAsync(monitor, PoisonErrorCode, reason, cancellationToken))
        {
            return;
        }

        await FailRunAsync(runId, sourceQueue, PoisonErrorCode, reason, cancellationToken);
    }

    private static FineTuneMonitorRequest? MonitorRequestOf(string message)
    {
        try
        {
            return StageMessages.Body(StageMessages.Open(message, MessageTypes.FineTuneMonitor), FineTuneJson.Default.FineTuneMonitorRequest) is { JobId.Length: > 0 } request ? request : null;
        }
        catch (InvalidMessageException)
        {
            return null;
        }
    }

    /// <summary>Handles a message its broker gave up on (a Service Bus dead letter), with the broker's reason.</summary>
    public async Task RecordDeadLetteredAsync(string source, string message, string? messageId, string reason, int attempts, CancellationToken cancellationToken)
    {
        var runId = await RunIdOfAsync(source, message, cancellationToken);
        await SaveAsync(source, message, messageId, runId, reason, PoisonedKind, attempts, cancellationToken);
        await FailRunAsync(runId, source, PoisonErrorCode, reason, cancellationToken);
    }

    /// <summary>Handles a message that can never succeed: recorded with its reason and acknowledged.</summary>
    public async Task RecordInvalidAsync(string sourceQueue, string message, string? messageId, string reason, CancellationToken cancellationToken)
    {
        var runId = await RunIdOfAsync(sourceQueue, message, cancellationToken);
        await SaveAsync(sourceQueue, message, messageId, runId, reason, InvalidKind, 1, cancellationToken);
        await FailRunAsync(runId, sourceQueue, RejectionCodes.InvalidMessage, reason, cancellationToken);
    }

    public static async Task<List<PoisonRecord>> ListAsync(StorageClients storage, string? queue, CancellationToken cancellationToken)
    {
        var table = storage.Table(StorageNames.Tables.PoisonMessages);
        var filter = queue is null ? null : TableClient.CreateQueryFilter($"PartitionKey eq {queue}");
        var list = new List<PoisonRecord>();
        await foreach (var record in table.QueryAsync<PoisonRecord>(filter, cancellationToken: cancellationToken))
        {
            list.Add(record);
        }

        return list;
    }

    /// <summary>
    /// Puts poisoned messages (not invalid ones: those can never succeed) back on the queue they came
    /// from, once each, and reopens their runs so the stages pick them up again.
    /// </summary>
    public static async Task<List<PoisonRecord>> ReplayAsync(StorageClients storage, string? queue, CancellationToken cancellationToken)
    {
        var table = storage.Table(StorageNames.Tables.PoisonMessages);
        var runs = new RunStore(storage);
        var replayed = new List<PoisonRecord>();
        foreach (var record in await ListAsync(storage, queue, cancellationToken))
        {
            if (record.Kind != PoisonedKind || record.ReplayedAt is not null || !StorageNames.Queues.Triggers.Contains(record.Queue))
            {
                continue;
            }

            if (record.RunId is { } runId && await runs.GetAsync(runId, cancellationToken) is not null)
            {
                await runs.UpdateAsync(runId, r =>
                {
                    if (r.ErrorCode != PoisonErrorCode)
                    {
                        return false;
                    }

                    r.Status = RunStatus.Running;
                    r.SetStage(r.Stage, RunStatus.Queued);
                    r.Error = null;
                    r.ErrorCode = null;
                    r.EndedAt = null;
                    return true;
                }, cancellationToken);
            }

            await storage.Queue(record.Queue).SendMessageAsync(record.Message, cancellationToken);
            record.ReplayedAt = DateTimeOffset.UtcNow;
            await table.UpdateEntityAsync(record, record.ETag, TableUpdateMode.Replace, cancellationToken);
            replayed.Add(record);
        }

        return replayed;
    }

    /// <summary>
    /// The run a message's handler made: <see cref="RunIdOf"/>, except for an <c>ingest</c> command without a
    /// <c>runId</c>, whose run is that of the blob version it names (as <see cref="IngestHandler"/> names it) once that run exists.
    /// </summary>
    public async Task<string> RunIdOfAsync(string queue, string message, CancellationToken cancellationToken)
    {
        var runId = RunIdOf(queue, message);
        if (IngestCommandOf(message) is not { } command)
        {
            return runId;
        }

        try
        {
            var request = await IngestHandler.RequestForAsync(storage, command, runId: null, cancellationToken);
            return await runs.GetAsync(request.RunId, cancellationToken) is not null ? request.RunId : runId;
        }
        catch (InvalidMessageException)
        {
            // It names no blob that exists (now): the handler made no run of one.
            return runId;
        }
    }

    /// <summary>The body of an <c>ingest</c> command envelope that names no run.</summary>
    private static IngestCommand? IngestCommandOf(string message)
    {
        try
        {
            var envelope = JsonSerializer.Deserialize(message, PipelineJson.Default.MessageEnvelope);
            return envelope is { Type: MessageTypes.Ingest, RunId: null } && envelope.Body.ValueKind == JsonValueKind.Object
                && envelope.Body.Deserialize(PipelineJson.Default.IngestCommand) is { Blob.Length: > 0 } command
                ? command
                : null;
        }
        catch (Exception e) when (e is JsonException or NotSupportedException or InvalidOperationException)
        {
            return null;
        }
    }

    /// <summary>The run a message belongs to: from its envelope, its blob event, or (failing both) its text.</summary>
    public static string RunIdOf(string queue, string message)
    {
        try
        {
            using var document = JsonDocument.Parse(message);
            var root = document.RootElement.ValueKind == JsonValueKind.Array && document.RootElement.GetArrayLength() > 0 ? document.RootElement[0] : document.RootElement;
            if (root.ValueKind == JsonValueKind.Object)
            {
                if (root.TryGetProperty("runId", out var runId) && runId.ValueKind == JsonValueKind.String && runId.GetString() is { Length: > 0 } id)
                {
                    return id;
                }

                if (root.TryGetProperty("eventType", out _))
                {
                    var blobEvent = root.Deserialize(PipelineJson.Default.BlobCreatedEvent);
                    if (blobEvent?.ParseSubject() is { } target && blobEvent.Data.ETag.Length > 0)
                    {
                        return RunIds.ForBlob(target.Container, target.Blob, blobEvent.Data.ETag);
                    }
                }
            }
        }
        catch (JsonException)
        {
        }

        // Service Bus commands are routed as commands-queue ones, and named so.
        return RunIds.ForMessage(queue == ServiceBusCommands.Source ? StorageNames.Queues.Commands : queue, message);
    }

    private async Task SaveAsync(string queue, string message, string? messageId, string runId, string reason, string kind, int attempts, CancellationToken cancellationToken)
    {
        var record = new PoisonRecord
        {
            Queue = queue,
            RowKey = messageId is { Length: > 0 } ? messageId : RunIds.Hash(message, 32),
            Message = message.Length > 30_000 ? message[..30_000] : message,
            RunId = runId,
            Reason = reason.Length > 8000 ? reason[..8000] : reason,
            Kind = kind,
            Attempts = attempts,
            RecordedAt = DateTimeOffset.UtcNow,
        };
        await storage.Table(StorageNames.Tables.PoisonMessages).UpsertEntityAsync(record, TableUpdateMode.Replace, cancellationToken);
        logger.LogWarning("Message on {Queue} for run {RunId} {Kind}: {Reason}", queue, runId, kind, reason);
    }

    /// <summary>The message's run (created if the message never got as far) fails at the stage it had reached.</summary>
    private async Task FailRunAsync(string runId, string queue, string code, string reason, CancellationToken cancellationToken)
    {
        await runs.GetOrCreateAsync(new RunRecord { RunId = runId, Source = $"queue:{queue}", Stage = StageOf(queue) }, cancellationToken);
        await transitions.FailAsync(runId, stage: null, code, reason, elapsed: null, cancellationToken: cancellationToken);
    }

    private static string StageOf(string queue) => queue switch
    {
        StorageNames.Queues.Preprocess or StorageNames.Queues.PreprocessPartition => Stages.Preprocess,
        StorageNames.Queues.FineTune or StorageNames.Queues.FineTuneMonitor => Stages.FineTune,
        StorageNames.Queues.Inference or StorageNames.Queues.InferenceShard => Stages.Inference,
        _ => Stages.Ingest,
    };
}
