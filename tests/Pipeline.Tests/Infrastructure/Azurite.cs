using Pipeline.Testing;

namespace Pipeline.Tests.Infrastructure;

/// <summary>Azurite as an xunit fixture: started before the tests that use it, stopped after.</summary>
public sealed class Azurite : AzuriteServer, IAsyncLifetime
{
    public Task InitializeAsync() => StartAsync();

    public Task DisposeAsync()
    {
        Dispose();
        return Task.CompletedTask;
    }
}
