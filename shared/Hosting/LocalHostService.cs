using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Pipeline.Storage;

namespace Pipeline.Hosting;

/// <summary>Local host mode settings (configuration section <c>Pipeline:LocalHost</c>).</summary>
public sealed class LocalHostOptions
{
    public const string Section = "Pipeline:LocalHost";

    /// <summary>The folder holding host.json and the function folders.</summary>
    public string AppRoot { get; set; } = AppContext.BaseDirectory;
    /// <summary>How long a fetched message stays invisible while it is processed (renewed at half-time). The Functions host uses 10 minutes.</summary>
    public TimeSpan MessageLease { get; set; } = TimeSpan.FromMinutes(10);
    /// <summary>How often the incoming container is scanned for new blobs.</summary>
    public TimeSpan BlobScanInterval { get; set; } = TimeSpan.FromSeconds(1);
    /// <summary>Whether this host watches incoming for new blobs (the Event Grid subscription's part).</summary>
    public bool WatchIncoming { get; set; } = true;
    /// <summary>The port the handler listens on (set at start-up).</summary>
    public int Port { get; set; }
}

/// <summary>Plays the Functions host's part locally: queue triggers from function.json, and the blob-created events.</summary>
public sealed class LocalHostService(
    StorageClients storage,
    LocalHostOptions options,
    IConfiguration configuration,
    IHostApplicationLifetime lifetime,
    ILoggerFactory loggers) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        // Invoke functions only once the handler is listening, as the host waits for the custom handler.
        var started = new TaskCompletionSource();
        using (lifetime.ApplicationStarted.Register(() => started.TrySetResult()))
        {
            await started.Task.WaitAsync(stoppingToken);
        }

        var logger = loggers.CreateLogger("LocalHost");
        await storage.EnsureCreatedAsync(stoppingToken);
        var queues = QueuesOptions.From(configuration);
        using var handler = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{options.Port}"), Timeout = Timeout.InfiniteTimeSpan };
        var tasks = new List<Task>();
        foreach (var function in FunctionDefinitions.Load(options.AppRoot, configuration))
        {
            if (IsDisabled(function.Name))
            {
                logger.LogInformation("Function {Function} is disabled by app setting AzureWebJobs.{Function}.Disabled", function.Name, function.Name);
                continue;
            }

            if (function.TriggerType != "queueTrigger" || function.QueueName is null)
            {
                logger.LogInformation("Function {Function} ({Trigger}) is not run by local host mode", function.Name, function.TriggerType);
                continue;
            }

            logger.LogInformation("Function {Function}: queueTrigger on {Queue}", function.Name, function.QueueName);
            var listener = new QueueListener(function, storage.Queue(function.QueueName), storage.Queue(function.QueueName + Storage.StorageNames.Queues.PoisonSuffix),
                queues, options.MessageLease, handler, loggers.CreateLogger($"LocalHost.{function.Name}"));
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
