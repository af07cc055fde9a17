using Pipeline.Functions;
using Pipeline.Functions.Api;
using Pipeline.Hosting;

// One executable, two roles: the custom handler the Functions host starts (FUNCTIONS_CUSTOMHANDLER_PORT),
// and with --local, also the host itself for our bindings (queue triggers, blob-created events) on any storage account.
if (args.Length > 0 && args[0] == "train")
{
    // The built-in trainer, as a separate process (the local fine-tune backend starts it; a GPU image runs it).
    return await TrainerCommand.RunAsync(args[1..]);
}

var local = args.Contains("--local");

// Stages tokenize in Parallel.For (blocking pool threads) while their uploads complete on pool threads:
// start with enough threads that the two never wait on the pool's slow thread injection.
ThreadPool.GetMinThreads(out var minWorkers, out var minIo);
ThreadPool.SetMinThreads(Math.Max(minWorkers, Environment.ProcessorCount * 4), minIo);
var builder = WebApplication.CreateBuilder(args.Where(a => a != "--local").ToArray());
var localOptions = builder.Configuration.GetSection(LocalHostOptions.Section).Get<LocalHostOptions>() ?? new LocalHostOptions();
builder.Configuration.AddHostJson(localOptions.AppRoot);

var port = int.TryParse(builder.Configuration["FUNCTIONS_CUSTOMHANDLER_PORT"], out var handlerPort) ? handlerPort
    : localOptions.Port > 0 ? localOptions.Port
    : 7071;
builder.WebHost.UseUrls($"http://127.0.0.1:{port}");

builder.Services
    .AddPipelineStorage(builder.Configuration)
    .AddPipelineRuns()
    .AddIngestion(builder.Configuration)
    .AddPreprocessing(builder.Configuration)
    .AddInference(builder.Configuration)
    .AddFineTuning(builder.Configuration);

if (local)
{
    localOptions.Port = port;
    builder.Services.AddSingleton(localOptions);
    builder.Services.AddHostedService<LocalHostService>();
}

var app = builder.Build();
app.MapQueueFunctions();
app.MapPipelineApi();
app.MapGet("/", () => Results.Ok(new { name = "Pipeline", mode = local ? "local" : "custom-handler" }));
await app.RunAsync();
return 0;
