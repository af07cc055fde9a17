using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Azure.Storage.Queues;
using Microsoft.Extensions.Configuration;
using Pipeline.Storage;

namespace Pipeline.Testing;

/// <summary>
/// A real Azurite (from the project's node_modules) on free loopback ports with its own data folder,
/// stopped and deleted on dispose. Shared by the tests and the benchmarks.
/// </summary>
public class AzuriteServer : IDisposable
{
    private Process? _process;
    private readonly string _location = Path.Combine(Path.GetTempPath(), "pipeline-azurite-" + Guid.NewGuid().ToString("n")[..12]);

    public string ConnectionString { get; private set; } = "";

    public static string RepoRoot { get; } = FindRoot();

    private static string FindRoot()
    {
        var directory = new DirectoryInfo(AppContext.BaseDirectory);
        while (directory is not null && !File.Exists(Path.Combine(directory.FullName, "Pipeline.sln")))
        {
            directory = directory.Parent;
        }

        return directory?.FullName ?? throw new InvalidOperationException("Pipeline.sln not found above " + AppContext.BaseDirectory);
    }
    public StorageClients Storage { get; private set; } = null!;

    /// <summary>The Azurite process (benchmarks pin it to its own core).</summary>
    public Process Process => _process ?? throw new InvalidOperationException("Azurite is not running.");

    public async Task StartAsync()
    {
        var azurite = Path.Combine(RepoRoot, "node_modules", ".bin", "azurite");
        if (!File.Exists(azurite))
        {
            throw new InvalidOperationException($"Azurite is not installed at {azurite}. Run ./test.sh (it runs npm ci) or npm ci in the project root.");
        }

        for (var attempt = 0; ; attempt++)
        {
            var (blob, queue, table) = (FreePort(), FreePort(), FreePort());
            Directory.CreateDirectory(_location);
            var start = new ProcessStartInfo(azurite)
            {
                ArgumentList =
                {
                    "--silent", "--skipApiVersionCheck", "--loose", "--location", _location,
                    "--blobHost", "127.0.0.1", "--blobPort", blob.ToString(),
                    "--queueHost", "127.0.0.1", "--queuePort", queue.ToString(),
                    "--tableHost", "127.0.0.1", "--tablePort", table.ToString(),
                },
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            };
            _process = Process.Start(start)!;
            _process.OutputDataReceived += (_, _) => { };
            _process.ErrorDataReceived += (_, _) => { };
            _process.BeginOutputReadLine();
            _process.BeginErrorReadLine();
            if (await WaitForPortsAsync([blob, queue, table], TimeSpan.FromSeconds(30)))
            {
                ConnectionString = StorageClients.AzuriteConnectionString(blob, queue, table);
                Storage = Clients(ConnectionString);
                await Storage.EnsureCreatedAsync();
                return;
            }

            Stop();
            if (attempt == 2)
            {
                throw new InvalidOperationException("Azurite did not start on free ports after 3 attempts.");
            }
        }
    }

    public static StorageClients Clients(string connectionString, QueueMessageEncoding encoding = QueueMessageEncoding.Base64) =>
        StorageClients.FromConfiguration(
            new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?> { [StorageClients.ConnectionSetting] = connectionString }).Build(),
            encoding);

    public static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    private async Task<bool> WaitForPortsAsync(int[] ports, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < timeout && _process is { HasExited: false })
        {
            var open = 0;
            foreach (var port in ports)
            {
                using var client = new TcpClient();
                try
                {
                    await client.ConnectAsync(IPAddress.Loopback, port);
                    open++;
                }
                catch (SocketException)
                {
                }
            }

            if (open == ports.Length)
            {
                return true;
            }

            await Task.Delay(100);
        }

        return false;
    }

    private void Stop()
    {
        if (_process is { HasExited: false })
        {
            _process.Kill(entireProcessTree: true);
            _process.WaitForExit(5000);
        }

        _process?.Dispose();
        _process = null;
    }

    public void Dispose()
    {
        Stop();
        try
        {
            Directory.Delete(_location, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
