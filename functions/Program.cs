using Microsoft.Azure.Functions.Worker.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Pipeline.Functions;
using Pipeline.Functions.Telemetry;
using Pipeline.Hosting;

// The function app, a .NET isolated worker: the Functions host (or Pipeline.LocalHost locally) starts this
// process and invokes the [Function] methods in Triggers/ (queues) and Api/ (HTTP) over FunctionRpc.
var builder = FunctionsApplication.CreateBuilder(args);

// HTTP functions take ASP.NET Core's HttpRequest; the host forwards requests to this process.
builder.ConfigureFunctionsWebApplication();

// host.json's queue settings (message encoding) apply to the messages the stages send, too.
builder.Configuration.AddHostJson(AppContext.BaseDirectory);

// Stages tokenize in Parallel.For (blocking pool threads) while their uploads complete on pool threads:
// start with enough threads that the two never wait on the pool's slow thread injection.
ThreadPool.GetMinThreads(out var minWorkers, out var minIo);
ThreadPool.SetMinThreads(Math.Max(minWorkers, Environment.ProcessorCount * 4), minIo);

builder.Services
    .AddPipeline(builder.Configuration)
    .AddSingleton<QueueInvocation>();

// Logs and traces: OpenTelemetry, exported to Application Insights when a connection string is set;
// every span and log scope of an invocation carries its run id.
builder.Services.AddPipelineTelemetry(builder.Configuration);

builder.Build().Run();
