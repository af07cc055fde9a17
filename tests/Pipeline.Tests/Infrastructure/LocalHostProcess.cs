using System.Collections.Concurrent;
using System.Diagnostics;

namespace Pipeline.Tests.Infrastructure;

/// <summary>The function app started in local host mode as its own process (the real executable), killed on dispose.</summary>
public sealed class LocalHostProcess : IDisposable
{
    /// <summary>Tests that start hosts, or change the environment hosts inherit, run one at a time.</summary>
    public const string Collection = "Local host processes";

    private readonly Process _process;
    private readonly ConcurrentQueue<string> _output = new();

    public LocalHostProcess(string connectionString, IDictionary<string, string>? settings = null)
    {
        Port = Azurite.FreePort();
        var dll = Path.Combine(RepoPaths.FunctionApp, "Pipeline.Functions.dll");
        if (!File.Exists(dll))
        {
            throw new InvalidOperationException($"The function app is not built at {dll}. Build the solution first (./test.sh does).");
        }

        var start = new ProcessStartInfo("dotnet")
        {
            ArgumentList = { dll, "--local" },
            WorkingDirectory = RepoPaths.FunctionApp,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.Environment["AzureWebJobsStorage"] = connectionString;
        start.Environment["Pipeline__LocalHost__Port"] = Port.ToString();
        start.Environment["Pipeline__LocalHost__AppRoot"] = RepoPaths.FunctionApp;
        start.Environment["Logging__Console__FormatterName"] = "simple";
        // Tests poll fast; production defaults stay as in host.json.
        start.Environment["AzureFunctionsJobHost__extensions__queues__maxPollingInterval"] = "00:00:00.500";
        start.Environment["AzureFunctionsJobHost__extensions__queues__visibilityTimeout"] = "00:00:00";
        start.Environment["Pipeline__LocalHost__BlobScanInterval"] = "00:00:00.300";
        foreach (var (key, value) in settings ?? new Dictionary<string, string>())
        {
            start.Environment[key] = value;
        }

        _process = Process.Start(start)!;
        _process.OutputDataReceived += (_, e) => { if (e.Data is not null) { _output.Enqueue(e.Data); } };
        _process.ErrorDataReceived += (_, e) => { if (e.Data is not null) { _output.Enqueue(e.Data); } };
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    public int Port { get; }

    public string Output => string.Join('\n', _output);

    public bool HasExited => _process.HasExited;

    /// <summary>Waits until the handler answers HTTP (the local host starts its listeners after that).</summary>
    public async Task<HttpClient> WaitUntilListeningAsync()
    {
        var http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{Port}") };
        await Eventually.ReturnsAsync(async () =>
        {
            try
            {
                return (await http.GetAsync("/")).IsSuccessStatusCode ? "up" : null;
            }
            catch (HttpRequestException)
            {
                return null;
            }
        }, TimeSpan.FromSeconds(60), "the handler to listen", () => Output);
        return http;
    }

    /// <summary>Kills the host at once, as a crash or a scale-in would.</summary>
    public void Kill()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            _process.WaitForExit(5000);
        }
    }

    public void Dispose()
    {
        Kill();
        _process.Dispose();
    }
}
