using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net.Http.Json;
using System.Text.Json.Nodes;

namespace Pipeline.Tests.Infrastructure;

/// <summary>
/// Local host mode as its own process (the real Pipeline.LocalHost driving the real isolated worker over
/// FunctionRpc), killed with its worker on dispose.
/// </summary>
public sealed class LocalHostProcess : IDisposable
{
    /// <summary>Tests that start hosts, or change the environment hosts inherit, run one at a time.</summary>
    public const string Collection = "Local host processes";

    private readonly Process _process;
    private readonly ConcurrentQueue<string> _output = new();

    public LocalHostProcess(string connectionString, IDictionary<string, string>? settings = null, string? appRoot = null)
    {
        Port = Azurite.FreePort();
        foreach (var (path, project) in new[] { (RepoPaths.LocalHost, "localhost/"), (Path.Combine(RepoPaths.FunctionApp, "worker.config.json"), "functions/"), (RepoPaths.Trainer, "trainer/") })
        {
            if (!File.Exists(path))
            {
                throw new InvalidOperationException($"{project} is not built ({path} is missing). Build the solution first (./test.sh does).");
            }
        }

        var start = new ProcessStartInfo("dotnet")
        {
            ArgumentList = { RepoPaths.LocalHost, "--app", appRoot ?? RepoPaths.FunctionApp },
            WorkingDirectory = RepoPaths.Root,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.Environment["AzureWebJobsStorage"] = connectionString;
        start.Environment["Pipeline__LocalHost__Port"] = Port.ToString();
        start.Environment["Pipeline__FineTune__Local__TrainerPath"] = RepoPaths.Trainer;
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

    public int ExitCode => _process.ExitCode;

    /// <summary>Waits until the host answers <c>GET /admin/host/status</c> with 200: its worker has been started, initialized, has indexed and loaded its functions.</summary>
    public async Task<HttpClient> WaitUntilListeningAsync()
    {
        var http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{Port}") };
        await Eventually.ReturnsAsync(async () =>
        {
            if (_process.HasExited)
            {
                throw new InvalidOperationException($"The local host exited with code {_process.ExitCode}:\n{Output}");
            }

            try
            {
                return (await http.GetAsync("/admin/host/status")).IsSuccessStatusCode ? "up" : null;
            }
            catch (HttpRequestException)
            {
                return null;
            }
        }, TimeSpan.FromSeconds(90), "the local host and its worker to be ready", () => Output);
        return http;
    }

    /// <summary>The host's state: its worker's process id and how many workers it has started.</summary>
    public async Task<(int WorkerProcessId, int Starts)> WorkerAsync(HttpClient http)
    {
        var state = (await http.GetFromJsonAsync<JsonObject>("/admin/host/status"))!;
        var worker = state["worker"]!;
        return (worker["processId"]!.GetValue<int>(), worker["starts"]!.GetValue<int>());
    }

    /// <summary>Kills the host and its worker at once, as a crash or a scale-in would.</summary>
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
