using System.Text;
using System.Text.Json;
using Azure.Storage.Blobs.Models;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Pipeline.Hosting;
using Pipeline.Ingestion;
using Pipeline.LocalHost.Triggers;
using Pipeline.Messaging;
using Pipeline.Runs;
using Pipeline.Storage;

namespace Pipeline.Tests.Infrastructure;

/// <summary>The platform's real services, composed as the function app composes them, against one Azurite.</summary>
public sealed class TestPipeline : IDisposable
{
    private readonly ServiceProvider _services;

    public TestPipeline(Azurite azurite, Action<IngestionOptions>? configure = null, IDictionary<string, string?>? settings = null, ILoggerProvider? logs = null)
    {
        var configuration = new ConfigurationBuilder()
            .AddInMemoryCollection(new Dictionary<string, string?> { [StorageClients.ConnectionSetting] = azurite.ConnectionString })
            .AddInMemoryCollection(settings ?? new Dictionary<string, string?>())
            .Build();
        var services = new ServiceCollection().AddLogging(logging =>
        {
            if (logs is not null)
            {
                logging.AddProvider(logs);
            }
        });
        services.AddPipeline(configuration);
        if (configure is not null)
        {
            services.PostConfigure(configure);
        }

        _services = services.BuildServiceProvider();
    }

    public IServiceProvider Services => _services;
    public StorageClients Storage => _services.GetRequiredService<StorageClients>();
    public IngestHandler Ingest => _services.GetRequiredService<IngestHandler>();
    public CommandRouter Commands => _services.GetRequiredService<CommandRouter>();
    public RunStore Runs => _services.GetRequiredService<RunStore>();
    public Pipeline.Preprocessing.PreprocessHandler Preprocess => _services.GetRequiredService<Pipeline.Preprocessing.PreprocessHandler>();
    public StageMessages StageMessages => _services.GetRequiredService<StageMessages>();
    public BlobDrops BlobDrops => _services.GetRequiredService<BlobDrops>();

    /// <summary>Uploads <paramref name="content"/> to incoming and returns the Event Grid event the subscription would deliver.</summary>
    public async Task<string> DropAsync(string name, byte[] content, string? spec = null)
    {
        var incoming = Storage.Container(StorageNames.Containers.Incoming);
        if (spec is not null)
        {
            await incoming.GetBlobClient(RunSpec.CandidateNamesFor(name).First()).UploadAsync(new BinaryData(Encoding.UTF8.GetBytes(spec)), overwrite: true);
        }

        await incoming.GetBlobClient(name).UploadAsync(new BinaryData(content), overwrite: true);
        await foreach (var blob in incoming.GetBlobsAsync(BlobTraits.None, BlobStates.None, name, default))
        {
            if (blob.Name == name)
            {
                return BlobCreatedWatcher.EventFor(incoming, blob);
            }
        }

        throw new InvalidOperationException($"{name} was not uploaded.");
    }

    public Task<string> DropAsync(string name, string content, string? spec = null) => DropAsync(name, Encoding.UTF8.GetBytes(content), spec);

    /// <summary>Drops a file and delivers its event to the ingestion stage once; returns the run.</summary>
    public async Task<RunRecord> IngestAsync(string name, string content, string? spec = null)
    {
        var message = await DropAsync(name, content, spec);
        await BlobDrops.HandleAsync(message, 1, CancellationToken.None);
        return (await Runs.GetAsync(FailedMessages.RunIdOf(StorageNames.Queues.BlobCreated, message)))!;
    }

    public async Task<DatasetManifest?> ManifestAsync(string datasetId)
    {
        var blob = Storage.Container(StorageNames.Containers.Datasets).GetBlobClient($"{datasetId}/manifest.json");
        if (!await blob.ExistsAsync())
        {
            return null;
        }

        var content = await blob.DownloadContentAsync();
        return JsonSerializer.Deserialize(content.Value.Content.ToString(), PipelineJson.Default.DatasetManifest);
    }

    public async Task<string> ReadAsync(string container, string path) =>
        (await Storage.Container(container).GetBlobClient(path).DownloadContentAsync()).Value.Content.ToString();

    public async Task<List<JsonElement>> ReadJsonLinesAsync(string container, string path) =>
        [.. (await ReadAsync(container, path)).Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement.Clone())];

    public async Task<List<string>> ListAsync(string container, string? prefix = null)
    {
        var names = new List<string>();
        await foreach (var blob in Storage.Container(container).GetBlobsAsync(BlobTraits.None, BlobStates.None, prefix, default))
        {
            names.Add(blob.Name);
        }

        return names;
    }

    public async Task<List<JsonElement>> EventsAsync()
    {
        var queue = Storage.Queue(StorageNames.Queues.Events);
        var events = new List<JsonElement>();
        foreach (var message in (await queue.PeekMessagesAsync(32)).Value)
        {
            events.Add(JsonDocument.Parse(message.Body.ToString()).RootElement.Clone());
        }

        return events;
    }

    public void Dispose() => _services.Dispose();
}
