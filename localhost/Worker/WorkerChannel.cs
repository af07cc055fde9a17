using System.Collections.Concurrent;
using System.Threading.Channels;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using Pipeline.LocalHost.Rpc;

namespace Pipeline.LocalHost.Worker;

/// <summary>The worker did not answer, exited, or refused: the invocation did not run (or its outcome is unknown).</summary>
public class WorkerUnavailableException(string message) : Exception(message);

/// <summary>
/// An invocation ran past host.json's <c>functionTimeout</c>: the worker was told to cancel it (its cancellation
/// token fires) and it fails, as in Azure; a queue message comes back and counts toward <c>maxDequeueCount</c>.
/// </summary>
public sealed class FunctionTimeoutException(string message) : WorkerUnavailableException(message);

/// <summary>
/// One worker's FunctionRpc stream, host side: sends requests (one writer at a time, as gRPC requires),
/// matches responses to them (init, metadata, load by function id, invocations by invocation id), and
/// prints the worker's <c>RpcLog</c> messages with their category and level.
/// </summary>
public sealed class WorkerChannel(string workerId, ILoggerFactory loggers, TimeSpan? functionTimeout = null)
{
    private readonly Channel<StreamingMessage> _outbound = Channel.CreateUnbounded<StreamingMessage>(new UnboundedChannelOptions { SingleReader = true });
    private readonly ConcurrentDictionary<string, TaskCompletionSource<StreamingMessage>> _pending = new(StringComparer.Ordinal);
    private readonly TaskCompletionSource _closed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly ILogger _logger = loggers.CreateLogger("LocalHost.Worker");
    private volatile string? _closedReason;

    public string WorkerId => workerId;

    /// <summary>Completes when the stream has ended (the worker exited or closed it).</summary>
    public Task Closed => _closed.Task;

    /// <summary>The worker's capabilities from its init response (<c>HttpUri</c> among them).</summary>
    public IReadOnlyDictionary<string, string> Capabilities { get; private set; } = new Dictionary<string, string>();

    public WorkerInitResponse? Init { get; private set; }

    /// <summary>Runs the stream: writes what is sent, dispatches what arrives, until either side ends it.</summary>
    public async Task RunAsync(IAsyncStreamReader<StreamingMessage> requests, IServerStreamWriter<StreamingMessage> responses, CancellationToken cancellationToken)
    {
        var writer = Task.Run(async () =>
        {
            await foreach (var message in _outbound.Reader.ReadAllAsync(cancellationToken))
            {
                await responses.WriteAsync(message, cancellationToken);
            }
        }, CancellationToken.None);
        try
        {
            while (await requests.MoveNext(cancellationToken))
            {
                Dispatch(requests.Current);
            }

            Close("the worker closed its stream");
        }
        catch (Exception e) when (e is IOException or Grpc.Core.RpcException or OperationCanceledException or InvalidOperationException)
        {
            Close($"the worker's stream broke ({e.GetType().Name}: {e.Message})");
        }

        _outbound.Writer.TryComplete();
        await writer.ContinueWith(_ => { }, TaskScheduler.Default);
    }

    public async Task<WorkerInitResponse> InitializeAsync(WorkerInitRequest request, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var response = (await RequestAsync("init", new StreamingMessage { WorkerInitRequest = request }, timeout, cancellationToken)).WorkerInitResponse;
        Init = response;
        Capabilities = new Dictionary<string, string>(response.Capabilities);
        return response;
    }

    public async Task<FunctionMetadataResponse> GetMetadataAsync(string appDirectory, TimeSpan timeout, CancellationToken cancellationToken) =>
        (await RequestAsync("metadata", new StreamingMessage { FunctionsMetadataRequest = new FunctionsMetadataRequest { FunctionAppDirectory = appDirectory } }, timeout, cancellationToken)).FunctionMetadataResponse;

    public async Task<FunctionLoadResponse> LoadAsync(FunctionLoadRequest request, TimeSpan timeout, CancellationToken cancellationToken) =>
        (await RequestAsync($"load:{request.FunctionId}", new StreamingMessage { FunctionLoadRequest = request }, timeout, cancellationToken)).FunctionLoadResponse;

    /// <summary>Sends one invocation and waits for its response, at most host.json's <c>functionTimeout</c>.</summary>
    /// <exception cref="FunctionTimeoutException">The function ran past functionTimeout (the worker is told to cancel it).</exception>
    public async Task<InvocationResponse> InvokeAsync(InvocationRequest request, CancellationToken cancellationToken)
    {
        var limit = functionTimeout ?? Timeout.InfiniteTimeSpan;
        try
        {
            return (await RequestAsync($"invoke:{request.InvocationId}", new StreamingMessage { InvocationRequest = request }, limit, cancellationToken)).InvocationResponse;
        }
        catch (TimeoutException)
        {
            Send(new StreamingMessage { InvocationCancel = new InvocationCancel { InvocationId = request.InvocationId } });
            _logger.LogError("Timeout value of {Timeout} exceeded by function {FunctionId} (invocation {InvocationId}); cancelling it (host.json functionTimeout)", limit, request.FunctionId, request.InvocationId);
            throw new FunctionTimeoutException($"Timeout value of {limit} exceeded by function {request.FunctionId} (invocation {request.InvocationId}): host.json functionTimeout.");
        }
    }

    public void Send(StreamingMessage message) => _outbound.Writer.TryWrite(message);

    /// <summary>Ends the stream from the host's side: every request still waiting fails with <paramref name="reason"/>.</summary>
    public void Close(string reason)
    {
        _closedReason ??= reason;
        _outbound.Writer.TryComplete();
        foreach (var (key, pending) in _pending)
        {
            if (_pending.TryRemove(key, out _))
            {
                pending.TrySetException(new WorkerUnavailableException($"Worker {workerId}: {_closedReason}."));
            }
        }

        _closed.TrySetResult();
    }

    private async Task<StreamingMessage> RequestAsync(string key, StreamingMessage message, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var response = new TaskCompletionSource<StreamingMessage>(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_pending.TryAdd(key, response))
        {
            throw new InvalidOperationException($"A request '{key}' is already waiting for worker {workerId}.");
        }

        try
        {
            if (_closedReason is { } reason)
            {
                throw new WorkerUnavailableException($"Worker {workerId}: {reason}.");
            }

            message.RequestId = Guid.NewGuid().ToString();
            if (!_outbound.Writer.TryWrite(message))
            {
                throw new WorkerUnavailableException($"Worker {workerId}: {_closedReason ?? "its stream is closed"}.");
            }

            try
            {
                return await response.Task.WaitAsync(timeout, cancellationToken);
            }
            catch (TimeoutException) when (message.ContentCase == StreamingMessage.ContentOneofCase.InvocationRequest)
            {
                throw;
            }
            catch (TimeoutException)
            {
                throw new WorkerUnavailableException($"Worker {workerId} did not answer {message.ContentCase} within {timeout.TotalSeconds:0} s.");
            }
        }
        finally
        {
            _pending.TryRemove(key, out _);
        }
    }

    private void Dispatch(StreamingMessage message)
    {
        var key = message.ContentCase switch
        {
            StreamingMessage.ContentOneofCase.WorkerInitResponse => "init",
            StreamingMessage.ContentOneofCase.FunctionMetadataResponse => "metadata",
            StreamingMessage.ContentOneofCase.FunctionLoadResponse => $"load:{message.FunctionLoadResponse.FunctionId}",
            StreamingMessage.ContentOneofCase.InvocationResponse => $"invoke:{message.InvocationResponse.InvocationId}",
            _ => null,
        };
        if (key is not null)
        {
            if (_pending.TryRemove(key, out var pending))
            {
                pending.TrySetResult(message);
            }
            else
            {
                _logger.LogWarning("Worker {WorkerId} sent {Message} that no request waits for ({Key})", workerId, message.ContentCase, key);
            }

            return;
        }

        switch (message.ContentCase)
        {
            case StreamingMessage.ContentOneofCase.RpcLog:
                Log(message.RpcLog);
                break;
            case StreamingMessage.ContentOneofCase.WorkerHeartbeat:
                break;
            default:
                _logger.LogDebug("Worker {WorkerId} sent {Message}; local host mode does not use it", workerId, message.ContentCase);
                break;
        }
    }

    /// <summary>A worker log line, under its own category (for example <c>Function.Ingest.User</c>) and level.</summary>
    private void Log(RpcLog log)
    {
        var level = log.Level switch
        {
            RpcLog.Types.Level.Trace => LogLevel.Trace,
            RpcLog.Types.Level.Debug => LogLevel.Debug,
            RpcLog.Types.Level.Information => LogLevel.Information,
            RpcLog.Types.Level.Warning => LogLevel.Warning,
            RpcLog.Types.Level.Error => LogLevel.Error,
            RpcLog.Types.Level.Critical => LogLevel.Critical,
            _ => LogLevel.None,
        };
        var logger = loggers.CreateLogger(log.Category is { Length: > 0 } category ? $"Worker:{category}" : "Worker");
        if (!logger.IsEnabled(level))
        {
            return;
        }

        var exception = log.Exception is { } e && (e.Message.Length > 0 || e.StackTrace.Length > 0)
            ? $"{Environment.NewLine}{e.Type}{(e.Type.Length > 0 ? ": " : "")}{e.Message}{Environment.NewLine}{e.StackTrace}"
            : "";
        logger.Log(level, "{Message}{Exception}", log.Message, exception);
    }
}
