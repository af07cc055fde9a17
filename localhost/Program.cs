using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Pipeline.Hosting;
using Pipeline.LocalHost;
using Pipeline.LocalHost.Triggers;
using Pipeline.LocalHost.Worker;

// Local host mode: `Pipeline.LocalHost --app <functions build or publish folder>`. Starts the isolated worker,
// speaks FunctionRpc to it over gRPC, runs its queue triggers, forwards HTTP to it and watches the blob
// containers, reading the app's host.json (and local.settings.json Values) as the Functions host does.
var builder = WebApplication.CreateBuilder(args);
var options = builder.Configuration.GetSection(LocalHostOptions.Section).Get<LocalHostOptions>() ?? new LocalHostOptions();
options.AppRoot = Path.GetFullPath(builder.Configuration["app"] is { Length: > 0 } app ? app : options.AppRoot is { Length: > 0 } root ? root : Directory.GetCurrentDirectory());
builder.Configuration.AddHostJson(options.AppRoot);
options.AppSettings = LocalSettings.Load(options.AppRoot);
options.FunctionTimeout = FunctionTimeout(builder.Configuration["AzureFunctionsJobHost:functionTimeout"]);
builder.Configuration.AddInMemoryCollection(options.AppSettings.Where(s => Environment.GetEnvironmentVariable(s.Key) is null).Select(s => KeyValuePair.Create(s.Key.Replace("__", ":", StringComparison.Ordinal), (string?)s.Value)));

// The host's and the worker's framework chatter stays out of the log; function logs and warnings stay in.
builder.Logging.AddFilter("Microsoft.AspNetCore", LogLevel.Warning).AddFilter("Grpc", LogLevel.Warning).AddFilter("Worker:Microsoft.AspNetCore", LogLevel.Warning)
    .AddFilter("Worker:Microsoft.Hosting", LogLevel.Warning).AddFilter("Worker:Azure", LogLevel.Warning);

var rpcPort = FreePort();
builder.WebHost.ConfigureKestrel(kestrel =>
{
    kestrel.Listen(IPAddress.Loopback, options.Port, listen => listen.Protocols = HttpProtocols.Http1);
    // Workers connect with HTTP/2 without TLS (prior knowledge), as to the Functions host.
    kestrel.Listen(IPAddress.Loopback, rpcPort, listen => listen.Protocols = HttpProtocols.Http2);
    kestrel.Limits.MaxRequestBodySize = null;
});
builder.Services.AddGrpc(grpc =>
{
    grpc.MaxReceiveMessageSize = null;
    grpc.MaxSendMessageSize = null;
});
builder.Services
    .AddSingleton(options)
    .AddPipelineStorage(builder.Configuration)
    .AddSingleton<WorkerSupervisor>()
    .AddHostedService(s => s.GetRequiredService<WorkerSupervisor>())
    .AddHostedService<LocalHostService>()
    .AddSingleton(s => new HttpForwarder(s.GetRequiredService<WorkerSupervisor>(), builder.Configuration["AzureFunctionsJobHost:extensions:http:routePrefix"] ?? "api", s.GetRequiredService<ILoggerFactory>().CreateLogger("LocalHost.Http")));

var host = builder.Build();
var supervisor = host.Services.GetRequiredService<WorkerSupervisor>();
supervisor.RpcUri = new Uri($"http://127.0.0.1:{rpcPort}/");

host.MapGrpcService<FunctionRpcService>().RequireHost($"*:{rpcPort}");
// The host's own endpoints, at the Functions host's admin paths: its state (200 once a worker is ready)
// and the functions the worker indexed. Everything else is the app's.
host.MapGet("/admin/host/status", () => supervisor.Current is { } worker
    ? Results.Json(new JsonObject
    {
        ["name"] = "Pipeline local host",
        ["state"] = "running",
        ["worker"] = new JsonObject { ["workerId"] = worker.WorkerId, ["processId"] = supervisor.WorkerProcessId, ["starts"] = supervisor.Starts, ["version"] = worker.Init?.WorkerVersion },
    })
    : Results.Json(new JsonObject { ["name"] = "Pipeline local host", ["state"] = "starting", ["starts"] = supervisor.Starts }, statusCode: 503)).RequireHost($"*:{options.Port}");
host.MapGet("/admin/functions", async (CancellationToken ct) => Results.Json(new JsonArray([.. (await supervisor.Indexed.WaitAsync(ct)).Select(f => f.ToJson())]))).RequireHost($"*:{options.Port}");
host.Map("/{**path}", (HttpContext context, HttpForwarder forwarder) => forwarder.HandleAsync(context)).RequireHost($"*:{options.Port}");
host.Run();
return Environment.ExitCode;

// host.json functionTimeout as the Functions host reads it: a TimeSpan, or -1 for none; the default when unset (Consumption: 5 min).
static TimeSpan? FunctionTimeout(string? value) => value switch
{
    null or "" => TimeSpan.FromMinutes(5),
    "-1" => null,
    _ => TimeSpan.TryParse(value, System.Globalization.CultureInfo.InvariantCulture, out var timeout) && timeout > TimeSpan.Zero
        ? timeout
        : throw new InvalidOperationException($"host.json functionTimeout '{value}' is not a positive TimeSpan (hh:mm:ss) or -1."),
};

static int FreePort()
{
    using var listener = new TcpListener(IPAddress.Loopback, 0);
    listener.Start();
    return ((IPEndPoint)listener.LocalEndpoint).Port;
}
