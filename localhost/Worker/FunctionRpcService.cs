using Grpc.Core;
using Microsoft.Extensions.Logging;
using Pipeline.LocalHost.Rpc;

namespace Pipeline.LocalHost.Worker;

/// <summary>The host's gRPC endpoint: each worker opens one <c>EventStream</c> and identifies itself with <c>StartStream</c>.</summary>
public sealed class FunctionRpcService(WorkerSupervisor supervisor, ILoggerFactory loggers) : FunctionRpc.FunctionRpcBase
{
    private readonly ILogger _logger = loggers.CreateLogger("LocalHost.Rpc");

    public override async Task EventStream(IAsyncStreamReader<StreamingMessage> requestStream, IServerStreamWriter<StreamingMessage> responseStream, ServerCallContext context)
    {
        if (!await requestStream.MoveNext(context.CancellationToken) || requestStream.Current.StartStream is not { } start)
        {
            _logger.LogWarning("A client opened the FunctionRpc stream without StartStream; closing it");
            return;
        }

        var channel = new WorkerChannel(start.WorkerId, loggers, supervisor.FunctionTimeout);
        if (!supervisor.Connect(channel))
        {
            _logger.LogWarning("Worker {WorkerId} is not one this host started; closing its stream", start.WorkerId);
            return;
        }

        await channel.RunAsync(requestStream, responseStream, context.CancellationToken);
    }
}
