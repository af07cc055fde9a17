namespace Pipeline.Storage;

/// <summary>
/// Every container, queue and table the platform uses. The Bicep templates in <c>infra/</c> create
/// exactly these; a test keeps the two in step.
/// </summary>
public static class StorageNames
{
    public static class Containers
    {
        /// <summary>The user's drop zone. Sources here are never modified or deleted.</summary>
        public const string Incoming = "incoming";
        public const string Datasets = "datasets";
        public const string Quarantine = "quarantine";
        public const string Models = "models";
        public const string Jobs = "jobs";
        public const string Outputs = "outputs";

        public static readonly string[] All = [Incoming, Datasets, Quarantine, Models, Jobs, Outputs];
    }

    public static class Queues
    {
        /// <summary>Event Grid <c>Microsoft.Storage.BlobCreated</c> events for <see cref="Containers.Incoming"/>.</summary>
        public const string BlobCreated = "blob-created";
        public const string Commands = "commands";
        public const string Preprocess = "preprocess";
        public const string FineTune = "finetune";
        public const string FineTuneMonitor = "finetune-monitor";
        public const string Inference = "inference";
        public const string InferenceShard = "inference-shard";
        /// <summary>One partition of a preprocessing build fanned out over partitions.</summary>
        public const string PreprocessPartition = "preprocess-partition";
        /// <summary>CloudEvents for every run transition.</summary>
        public const string Events = "events";

        public const string PoisonSuffix = "-poison";

        public static string Poison(string queue) => queue + PoisonSuffix;

        /// <summary>Queues that trigger a stage (each has a poison queue).</summary>
        public static readonly string[] Triggers = [BlobCreated, Commands, Preprocess, PreprocessPartition, FineTune, FineTuneMonitor, Inference, InferenceShard];

        public static readonly string[] All = [.. Triggers, .. Triggers.Select(Poison), Events];
    }

    public static class Tables
    {
        public const string Runs = "runs";
        /// <summary>Messages that reached a poison queue, with the reason they failed.</summary>
        public const string PoisonMessages = "poisonmessages";

        /// <summary>Every run transition (partition = run id), for a run's event history.</summary>
        public const string RunEvents = "runevents";

        public static readonly string[] All = [Runs, PoisonMessages, RunEvents];
    }
}
