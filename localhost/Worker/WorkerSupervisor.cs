using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Pipeline.LocalHost.Rpc;

namespace Pipeline.LocalHost.Worker;

/// <summary>
/// Starts the worker the way the Functions host does and keeps one running: the command from the app's
/// <c>worker.config.json</c> with <c>--functions-uri</c>, <c>--functions-worker-id</c>, <c>--functions-request-id</c>
/// and <c>--functions-grpc-max-message-length</c>; then, on its stream, <c>WorkerInitRequest</c>,
/// <c>FunctionsMetadataRequest</c> (the worker indexes its own functions) and one <c>FunctionLoadRequest</c> per
/// function. A worker that exits is restarted (its in-flight invocations fail, so their messages come back);
/// a worker that never connects stops the host with the reason.
/// </summary>
public sealed class WorkerSupervisor(LocalHostOptions options, IHostApplicationLifetime lifetime, ILoggerFactory loggers) : BackgroundService
{
    public const string HostVersion = "4.1000.0-pipeline-local";
    private readonly ILogger _logger = loggers.CreateLogger("LocalHost.Worker");
    private readonly ConcurrentDictionary<string, TaskCompletionSource<WorkerChannel>> _connecting = new(StringComparer.Ordinal);
    private readonly TaskCompletionSource<IReadOnlyList<IndexedFunction>> _indexed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private TaskCompletionSource<WorkerChannel> _ready = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private Process? _process;

    /// <summary>The gRPC address workers connect to (set before the host starts listening).</summary>
    public Uri? RpcUri { get; set; }

    /// <summary>The functions the first worker indexed (local host mode starts their triggers once).</summary>
    public Task<IReadOnlyList<IndexedFunction>> Indexed => _indexed.Task;

    /// <summary>The worker now serving invocations, or null while it (re)starts.</summary>
    public WorkerChannel? Current => _ready.Task.IsCompletedSuccessfully ? _ready.Task.Result : null;

    public int? WorkerProcessId => _process is { HasExited: false } p ? p.Id : null;

    public int Starts { get; private set; }

    /// <summary>host.json <c>functionTimeout</c>: every invocation's limit (null: none, <c>-1</c>).</summary>
    public TimeSpan? FunctionTimeout => options.FunctionTimeout;

    /// <summary>Called by the gRPC service when a worker opens its stream with <c>StartStream</c>.</summary>
    public bool Connect(WorkerChannel channel) =>
        _connecting.TryGetValue(channel.WorkerId, out var waiting) && waiting.TrySetResult(channel);

    /// <summary>Waits for a ready worker (through restarts) and sends it one invocation.</summary>
    public async Task<InvocationResponse> InvokeAsync(InvocationRequest request, CancellationToken cancellationToken)
    {
        var channel = await _ready.Task.WaitAsync(cancellationToken);
        return await channel.InvokeAsync(request, cancellationToken);
    }

    public async Task<WorkerChannel> ReadyAsync(CancellationToken cancellationToken) => await _ready.Task.WaitAsync(cancellationToken);

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        // Stop when the host starts stopping, before its server ends the worker's stream: the worker gets
        // WorkerTerminate on a live stream.
        using var stoppingSource = CancellationTokenSource.CreateLinkedTokenSource(stoppingToken, lifetime.ApplicationStopping);
        var stopping = stoppingSource.Token;
        var config = WorkerConfig.Load(options.AppRoot);
        var failures = 0;
        while (!stopping.IsCancellationRequested)
        {
            var workerId = Guid.NewGuid().ToString();
            var connecting = new TaskCompletionSource<WorkerChannel>(TaskCreationOptions.RunContinuationsAsynchronously);
            _connecting[workerId] = connecting;
            Process process;
            try
            {
                process = StartProcess(config, workerId);
            }
            catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException)
            {
                Fail($"The worker could not be started ({config.Describe()}): {e.Message}");
                return;
            }

            _process = process;
            Starts++;
            var output = new WorkerOutput(_logger);
            output.Attach(process);
            WorkerChannel? channel = null;
            try
            {
                var exited = process.WaitForExitAsync(stopping);
                if (await Task.WhenAny(connecting.Task, exited).WaitAsync(options.WorkerStartTimeout, stopping) == exited)
                {
                    process.WaitForExit();
                    throw new WorkerUnavailableException($"its process exited with code {process.ExitCode} before it connected");
                }

                channel = await connecting.Task;
                await HandshakeAsync(channel, stopping);
                failures = 0;
                _ready.TrySetResult(channel);
                _logger.LogInformation("Worker {WorkerId} (process {Pid}) is ready", workerId, process.Id);
                await Task.WhenAny(process.WaitForExitAsync(stopping), channel.Closed);
            }
            catch (TimeoutException)
            {
                failures++;
                _logger.LogError("The worker (process {Pid}, {Command}) did not connect to {RpcUri} within {Timeout} s{Exit}. Its last output:{NewLine}{Output}",
                    process.Id, config.Describe(), RpcUri, options.WorkerStartTimeout.TotalSeconds, process.HasExited ? $"; it exited with code {process.ExitCode}" : "", Environment.NewLine, output.Tail());
            }
            catch (WorkerUnavailableException e)
            {
                failures++;
                _logger.LogError("The worker (process {Pid}) failed to start: {Reason}. Its last output:{NewLine}{Output}", process.Id, e.Message, Environment.NewLine, output.Tail());
            }
            catch (OperationCanceledException) when (stopping.IsCancellationRequested)
            {
            }
            finally
            {
                _connecting.TryRemove(workerId, out _);
            }

            if (stopping.IsCancellationRequested)
            {
                await TerminateAsync(channel, process);
                return;
            }

            // The worker is gone (crashed, killed, or never ready): invocations wait for the next one.
            _ready = new TaskCompletionSource<WorkerChannel>(TaskCreationOptions.RunContinuationsAsynchronously);
            channel?.Close($"its process {(process.HasExited ? $"exited with code {process.ExitCode}" : "stopped answering")}");
            Kill(process);
            if (!_indexed.Task.IsCompleted && failures >= options.WorkerStartAttempts)
            {
                Fail($"The worker never became ready in {failures} attempt(s) ({config.Describe()}); see the errors above.");
                return;
            }

            _logger.LogWarning("Worker {WorkerId} ended{Exit}; starting a new one", workerId, process.HasExited ? $" with exit code {process.ExitCode}" : "");
            await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(5000, 250 * (1 << Math.Min(failures, 5)))), stopping).ContinueWith(_ => { }, TaskScheduler.Default);
        }
    }

    private async Task HandshakeAsync(WorkerChannel channel, CancellationToken stopping)
    {
        var init = new WorkerInitRequest
        {
            HostVersion = HostVersion,
            WorkerDirectory = options.AppRoot,
            FunctionAppDirectory = options.AppRoot,
        };
        var initialized = await channel.InitializeAsync(init, options.WorkerRequestTimeout, stopping);
        if (initialized.Result.Status != StatusResult.Types.Status.Success)
        {
            throw new WorkerUnavailableException($"WorkerInitResponse: {initialized.Result.Status} {initialized.Result.Exception?.Message}");
        }

        _logger.LogInformation("Worker {WorkerId}: {Runtime} {RuntimeVersion}, worker {Version}; capabilities {Capabilities}",
            channel.WorkerId, initialized.WorkerMetadata?.RuntimeName, initialized.WorkerMetadata?.RuntimeVersion, initialized.WorkerVersion, string.Join(", ", initialized.Capabilities.Keys.Order(StringComparer.Ordinal)));

        var metadata = await channel.GetMetadataAsync(options.AppRoot, options.WorkerRequestTimeout, stopping);
        if (metadata.Result is { Status: not StatusResult.Types.Status.Success } failed)
        {
            throw new WorkerUnavailableException($"FunctionMetadataResponse: {failed.Status} {failed.Exception?.Message}");
        }

        if (metadata.UseDefaultMetadataIndexing)
        {
            throw new WorkerUnavailableException("the worker asked the host to index its functions from function.json files; this app is indexed by the worker (functions.metadata), so the worker build is wrong");
        }

        var functions = metadata.FunctionMetadataResults.Select(IndexedFunction.From).ToList();
        foreach (var function in functions)
        {
            var loaded = await channel.LoadAsync(function.LoadRequest(), options.WorkerRequestTimeout, stopping);
            if (loaded.Result.Status != StatusResult.Types.Status.Success)
            {
                throw new WorkerUnavailableException($"loading {function.Name} failed: {loaded.Result.Exception?.Message}");
            }
        }

        _logger.LogInformation("Worker {WorkerId} indexed and loaded {Count} functions: {Functions}", channel.WorkerId, functions.Count, string.Join(", ", functions.Select(f => f.Name)));
        _indexed.TrySetResult(functions);
    }

    private Process StartProcess(WorkerConfig config, string workerId)
    {
        var start = new ProcessStartInfo(config.Executable)
        {
            WorkingDirectory = options.AppRoot,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var argument in config.Arguments)
        {
            start.ArgumentList.Add(argument);
        }

        foreach (var (name, value) in new[]
        {
            ("--functions-uri", RpcUri!.ToString()),
            ("--functions-worker-id", workerId),
            ("--functions-request-id", Guid.NewGuid().ToString()),
            ("--functions-grpc-max-message-length", int.MaxValue.ToString(System.Globalization.CultureInfo.InvariantCulture)),
        })
        {
            start.ArgumentList.Add(name);
            start.ArgumentList.Add(value);
        }

        // The app settings the host gives its worker: local.settings.json Values under this process's environment.
        foreach (var (key, value) in options.AppSettings)
        {
            if (Environment.GetEnvironmentVariable(key) is null)
            {
                start.Environment[key] = value;
            }
        }

        // Locally the /v1 (OpenAI-compatible) routes are open when no keys are set, as func start leaves function keys unchecked.
        if (Environment.GetEnvironmentVariable("Pipeline__OpenAi__AllowAnonymous") is null && !options.AppSettings.ContainsKey("Pipeline__OpenAi__AllowAnonymous"))
        {
            start.Environment["Pipeline__OpenAi__AllowAnonymous"] = "true";
        }

        start.Environment["FUNCTIONS_WORKER_RUNTIME"] = "dotnet-isolated";
        start.Environment["AzureWebJobsScriptRoot"] = options.AppRoot;
        start.Environment["FUNCTIONS_APPLICATION_DIRECTORY"] = options.AppRoot;
        start.Environment["FUNCTIONS_WORKER_DIRECTORY"] = options.AppRoot;
        var process = Process.Start(start) ?? throw new InvalidOperationException("Process.Start returned no process.");
        _logger.LogInformation("Started worker {WorkerId}: process {Pid} ({Command})", workerId, process.Id, config.Describe());
        return process;
    }

    private async Task TerminateAsync(WorkerChannel? channel, Process process)
    {
        if (channel is not null && !process.HasExited)
        {
            channel.Send(new StreamingMessage { WorkerTerminate = new WorkerTerminate { GracePeriod = Google.Protobuf.WellKnownTypes.Duration.FromTimeSpan(options.WorkerTerminateGrace) } });
            using var grace = new CancellationTokenSource(options.WorkerTerminateGrace);
            await process.WaitForExitAsync(grace.Token).ContinueWith(_ => { }, TaskScheduler.Default);
        }

        channel?.Close("the host is stopping");
        Kill(process);
    }

    private static void Kill(Process process)
    {
        try
        {
            if (!process.HasExited)
            {
                process.Kill(entireProcessTree: true);
            }
        }
        catch (InvalidOperationException)
        {
        }
    }

    private void Fail(string reason)
    {
        _logger.LogCritical("{Reason}", reason);
        _indexed.TrySetException(new WorkerUnavailableException(reason));
        Environment.ExitCode = 3;
        lifetime.StopApplication();
    }

    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        await base.StopAsync(cancellationToken);
        if (_process is { } process)
        {
            Kill(process);
        }
    }

    /// <summary>Keeps the worker's last output lines (for the error when it fails to start) and echoes them at debug level.</summary>
    private sealed class WorkerOutput(ILogger logger)
    {
        private readonly ConcurrentQueue<string> _lines = new();

        public void Attach(Process process)
        {
            process.OutputDataReceived += (_, e) => Add(e.Data);
            process.ErrorDataReceived += (_, e) => Add(e.Data);
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
        }

        public string Tail() => _lines.IsEmpty ? "(none)" : string.Join(Environment.NewLine, _lines);

        private void Add(string? line)
        {
            if (line is null)
            {
                return;
            }

            _lines.Enqueue(line);
            while (_lines.Count > 40 && _lines.TryDequeue(out _))
            {
            }

            logger.LogDebug("[worker output] {Line}", line);
        }
    }
}

/// <summary>How to start the worker: <c>worker.config.json</c> in the app folder (written by Worker.Sdk).</summary>
public sealed record WorkerConfig(string Executable, IReadOnlyList<string> Arguments)
{
    public string Describe() => string.Join(' ', [Executable, .. Arguments]);

    public static WorkerConfig Load(string appRoot)
    {
        var path = Path.Combine(appRoot, "worker.config.json");
        if (!File.Exists(path))
        {
            throw new FileNotFoundException($"{appRoot} has no worker.config.json: point the local host at the build or publish output of functions/ (dotnet build writes it).", path);
        }

        var description = JsonNode.Parse(File.ReadAllText(path))?["description"] ?? throw new InvalidDataException($"{path} has no 'description'.");
        var executable = description["defaultExecutablePath"]?.GetValue<string>() ?? "dotnet";
        var workerPath = description["defaultWorkerPath"]?.GetValue<string>();
        var arguments = new List<string>();
        if (description["arguments"] is JsonArray extra)
        {
            arguments.AddRange(extra.Select(a => a!.GetValue<string>()));
        }

        if (workerPath is { Length: > 0 })
        {
            arguments.Add(Path.Combine(appRoot, workerPath));
        }

        return new WorkerConfig(executable, arguments);
    }
}
