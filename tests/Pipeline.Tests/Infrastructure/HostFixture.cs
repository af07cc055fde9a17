namespace Pipeline.Tests.Infrastructure;

/// <summary>
/// The host tests' storage and local host, started once for the whole <see cref="LocalHostProcess.Collection"/>
/// collection: one Azurite, the platform's services on it, and one local host process (the blob watcher on, fine-tune
/// monitoring fast) started on first use and shared by the tests that need a host as it is. Tests that share it use
/// their own run ids, blobs and models. A test that starts hosts of its own (other settings, killed or competing hosts)
/// takes <see cref="IsolatedAsync"/> storage instead, so no shared host takes its messages.
/// </summary>
public sealed class HostFixture : IAsyncLifetime
{
    /// <summary>Fine-tune monitoring and heartbeats fast enough for tests: the shared host runs with them, and so do the fine-tune tests' own hosts.</summary>
    public static readonly IReadOnlyDictionary<string, string> FastFineTuneSettings = new Dictionary<string, string>
    {
        ["Pipeline__FineTune__MonitorInitialDelay"] = "00:00:00.500",
        ["Pipeline__FineTune__MonitorMaxDelay"] = "00:00:01",
        ["Pipeline__FineTune__HeartbeatSeconds"] = "0.5",
        ["Pipeline__FineTune__HeartbeatTimeout"] = "00:00:04",
    };

    private readonly Azurite _azurite = new();
    private readonly SemaphoreSlim _starting = new(1, 1);
    private LocalHostProcess? _host;
    private HttpClient? _http;

    public Azurite Azurite => _azurite;
    public TestPipeline Pipeline { get; private set; } = null!;
    public string ConnectionString => _azurite.ConnectionString;

    public async Task InitializeAsync()
    {
        await _azurite.InitializeAsync();
        Pipeline = new TestPipeline(_azurite);
        await Pipeline.Storage.EnsureCreatedAsync();
    }

    /// <summary>The shared local host, started (and waited for) on first use; started again if a test stopped it.</summary>
    public async Task<LocalHostProcess> HostAsync()
    {
        await _starting.WaitAsync();
        try
        {
            if (_host is null || _host.HasExited)
            {
                _http?.Dispose();
                _host?.Dispose();
                _host = new LocalHostProcess(_azurite.ConnectionString, new Dictionary<string, string>(FastFineTuneSettings));
                _http = await _host.WaitUntilListeningAsync();
            }

            return _host;
        }
        finally
        {
            _starting.Release();
        }
    }

    /// <summary>An HTTP client on the shared host.</summary>
    public async Task<HttpClient> HttpAsync()
    {
        await HostAsync();
        return _http!;
    }

    /// <summary>A fresh Azurite and services on it, for a test that runs hosts of its own; dispose it at the end.</summary>
    public static async Task<IsolatedStorage> IsolatedAsync()
    {
        var azurite = new Azurite();
        await azurite.InitializeAsync();
        var pipeline = new TestPipeline(azurite);
        await pipeline.Storage.EnsureCreatedAsync();
        return new IsolatedStorage(azurite, pipeline);
    }

    public async Task DisposeAsync()
    {
        _http?.Dispose();
        _host?.Dispose();
        Pipeline?.Dispose();
        await _azurite.DisposeAsync();
        _starting.Dispose();
    }
}

/// <summary>Storage of one test's own: an Azurite and the services on it, stopped on dispose.</summary>
public sealed class IsolatedStorage(Azurite azurite, TestPipeline pipeline) : IAsyncDisposable
{
    public Azurite Azurite => azurite;
    public TestPipeline Pipeline => pipeline;
    public string ConnectionString => azurite.ConnectionString;

    public async ValueTask DisposeAsync()
    {
        pipeline.Dispose();
        await azurite.DisposeAsync();
    }
}

/// <summary>The host tests run one at a time (they start processes and change what hosts inherit), sharing one <see cref="HostFixture"/>.</summary>
[CollectionDefinition(LocalHostProcess.Collection)]
public sealed class LocalHostCollection : ICollectionFixture<HostFixture>;
