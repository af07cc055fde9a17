using Azure.Storage.Queues;
using Microsoft.Extensions.Configuration;

namespace Pipeline.Storage;

/// <summary>
/// <c>host.json</c> <c>extensions.queues</c>, with the Functions host's names, defaults and meaning.
/// App settings <c>AzureFunctionsJobHost__extensions__queues__*</c> override them, as in Azure.
/// </summary>
public sealed class QueuesOptions
{
    public const string Section = "AzureFunctionsJobHost:extensions:queues";

    /// <summary>Messages fetched per poll (1-32). Default 16.</summary>
    public int BatchSize { get; set; } = 16;
    /// <summary>Fetch the next batch when this few messages are still being processed. Default batchSize/2 per core.</summary>
    public int? NewBatchThreshold { get; set; }
    /// <summary>Longest wait between polls of an empty queue (back-off grows to this). Default 1 minute.</summary>
    public TimeSpan MaxPollingInterval { get; set; } = TimeSpan.FromMinutes(1);
    /// <summary>How long a failed message stays invisible before its retry. Default 0.</summary>
    public TimeSpan VisibilityTimeout { get; set; } = TimeSpan.Zero;
    /// <summary>Attempts before a message moves to <c>&lt;queue&gt;-poison</c>. Default 5.</summary>
    public int MaxDequeueCount { get; set; } = 5;
    /// <summary><c>base64</c> (default) or <c>none</c>.</summary>
    public string MessageEncoding { get; set; } = "base64";

    public int EffectiveNewBatchThreshold => NewBatchThreshold ?? Environment.ProcessorCount * BatchSize / 2;

    public QueueMessageEncoding QueueMessageEncoding => string.Equals(MessageEncoding, "none", StringComparison.OrdinalIgnoreCase)
        ? QueueMessageEncoding.None
        : QueueMessageEncoding.Base64;

    public static QueuesOptions From(IConfiguration configuration)
    {
        var options = new QueuesOptions();
        configuration.GetSection(Section).Bind(options);
        options.BatchSize = Math.Clamp(options.BatchSize, 1, 32);
        if (options.MaxPollingInterval < TimeSpan.FromMilliseconds(100))
        {
            options.MaxPollingInterval = TimeSpan.FromMilliseconds(100);
        }

        return options;
    }
}
