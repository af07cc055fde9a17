using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Pipeline.Hosting;
using Pipeline.LocalHost.Triggers;
using Pipeline.LocalHost.Worker;
using Pipeline.Storage;

namespace Pipeline.LocalHost;

/// <summary>Local host mode settings (configuration section <c>Pipeline:LocalHost</c>).</summary>
public sealed class LocalHostOptions
{
    public const string Section = "Pipeline:LocalHost";

    /// <summary>The function app folder: the build or publish output of functions/ (host.json, worker.config.json, functions.metadata).</summary>
    public string AppRoot { get; set; } = "";
    /// <summary>The HTTP port the host serves the app's HTTP functions on (Core Tools' default, 7071).</summary>
    public int Port { get; set; } = 7071;
    /// <summary>How long a fetched message stays invisible while it is processed (renewed at half-time). The Functions host uses 10 minutes.</summary>
    public TimeSpan MessageLease { get; set; } = TimeSpan.FromMinutes(10);
    /// <summary>How often the incoming container is scanned for new blobs.</summary>
    public TimeSpan BlobScanInterval { get; set; } = TimeSpan.FromSeconds(1);
    /// <summary>Whether this host watches incoming for new blobs (the Event Grid subscription's part).</summary>
    public bool WatchIncoming { get; set; } = true;
    /// <summary>How long a started worker has to open its gRPC stream.</summary>
    public TimeSpan WorkerStartTimeout { get; set; } = TimeSpan.FromSeconds(60);
    /// <summary>How long the worker has to answer init, metadata and load requests.</summary>
    public TimeSpan WorkerRequestTimeout { get; set; } = TimeSpan.FromSeconds(60);
    /// <summary>Starts that may fail before the first ready worker, after which the host gives up.</summary>
    public int WorkerStartAttempts { get; set; } = 2;
    /// <summary>How long a worker told to terminate has before it is killed.</summary>
    public TimeSpan WorkerTerminateGrace { get; set; } = TimeSpan.FromSeconds(5);
    /// <summary>host.json <c>functionTimeout</c> (<c>AzureFunctionsJobHost__functionTimeout</c>): an invocation running longer is cancelled and fails; null (<c>-1</c>): no limit.</summary>
    public TimeSpan? FunctionTimeout { get; set; }
    /// <summary>local.settings.json <c>Values</c> (given to the worker where the environment does not set them).</summary>
    public Dictionary<string, string> AppSettings { get; set; } = [];
}

/// <summary>
/// Plays the Functions host's trigger part once the worker has indexed its functions: one queue listener per
/// queue-triggered function (host.json <c>extensions.queues</c>, <c>AzureWebJobs__&lt;fn&gt;__Disabled</c>), and the
/// blob-created events for the watched containers.
/// </summary>
public sealed class LocalHostService(
    StorageClients storage,
    LocalHostOptions options,
    WorkerSupervisor workers,
    IConfiguration configuration,
    ILoggerFactory loggers) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        var logger = loggers.CreateLogger("LocalHost");
        IReadOnlyList<IndexedFunction> functions;
        try
        {
            functions = await workers.Indexed.WaitAsync(stoppingToken);
        }
        catch (WorkerUnavailableException)
        {
            return;
        }

        await storage.EnsureCreatedAsync(stoppingToken);
        var queues = QueuesOptions.From(configuration);
        var tasks = new List<Task>();
        foreach (var function in functions)
        {
            if (IsDisabled(function.Name))
            {
                logger.LogInformation("Function {Function} is disabled by app setting AzureWebJobs.{Function}.Disabled", function.Name, function.Name);
                continue;
            }

            if (function.IsHttpTrigger)
            {
                logger.LogInformation("Function {Function}: httpTrigger {Methods} /{Route}", function.Name, string.Join(',', function.Methods), function.Route);
                continue;
            }

            if (!function.IsQueueTrigger || function.QueueName(configuration) is not { } queue)
            {
                logger.LogInformation("Function {Function} ({Trigger}) is not run by local host mode", function.Name, function.TriggerType);
                continue;
            }

            logger.LogInformation("Function {Function}: queueTrigger on {Queue}", function.Name, queue);
            var listener = new QueueListener(function, storage.Queue(queue), storage.Queue(queue + StorageNames.Queues.PoisonSuffix),
                queues, options.MessageLease, workers, loggers.CreateLogger($"LocalHost.{function.Name}"));
            tasks.Add(listener.RunAsync(stoppingToken));
        }

        if (options.WatchIncoming)
        {
            tasks.Add(new BlobCreatedWatcher(storage, options.BlobScanInterval, loggers.CreateLogger("LocalHost.BlobWatcher")).RunAsync(stoppingToken));
        }

        logger.LogInformation("Local host running on port {Port}: batchSize {BatchSize}, maxDequeueCount {MaxDequeueCount}, visibilityTimeout {VisibilityTimeout}, messageEncoding {Encoding}",
            options.Port, queues.BatchSize, queues.MaxDequeueCount, queues.VisibilityTimeout, queues.MessageEncoding);
        await Task.WhenAll(tasks);
    }

    /// <summary>The Functions host's switch: app setting <c>AzureWebJobs.&lt;name&gt;.Disabled</c> (<c>AzureWebJobs__&lt;name&gt;__Disabled</c> on Linux).</summary>
    private bool IsDisabled(string function) =>
        string.Equals(configuration[$"AzureWebJobs.{function}.Disabled"] ?? configuration[$"AzureWebJobs:{function}:Disabled"], "true", StringComparison.OrdinalIgnoreCase);
}
