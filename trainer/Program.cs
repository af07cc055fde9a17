using System.Runtime.InteropServices;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Pipeline.FineTuning.Trainer;
using Pipeline.Hosting;
using Pipeline.Inference;

// `Pipeline.Trainer --job <jobId>` (or PIPELINE_JOB_ID): runs the built-in trainer on one job of the job
// contract, against the storage account in AzureWebJobsStorage (a connection string, or
// AzureWebJobsStorage__blobServiceUri with a managed identity). Exit code 0: the job ended (its outcome is in
// jobs/<jobId>/status.json); 2: bad usage; anything else: the trainer failed.
var jobIndex = Array.IndexOf(args, "--job");
var jobId = jobIndex >= 0 && jobIndex + 1 < args.Length ? args[jobIndex + 1] : Environment.GetEnvironmentVariable("PIPELINE_JOB_ID");
if (string.IsNullOrWhiteSpace(jobId))
{
    Console.Error.WriteLine("usage: Pipeline.Trainer --job <jobId>   (or set PIPELINE_JOB_ID)");
    return 2;
}

var configuration = new ConfigurationBuilder().AddEnvironmentVariables().Build();
using var services = new ServiceCollection()
    .AddLogging(logging => logging.AddSimpleConsole(o => o.SingleLine = true))
    .AddPipelineStorage(configuration)
    .Configure<InferenceSettings>(configuration.GetSection(InferenceSettings.Section))
    .AddSingleton<JobTrainer>()
    .BuildServiceProvider();
using var stop = new CancellationTokenSource();
// SIGTERM (a stopped execution, a node shutting down) and Ctrl+C stop the job cleanly: status `cancelled`, the
// lease released, exit 0. The default handling (an immediate exit) is cancelled; the trainer ends at its next batch.
using var terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Stop);
using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Stop);
return await services.GetRequiredService<JobTrainer>().RunAsync(jobId, stop.Token);

void Stop(PosixSignalContext signal)
{
    signal.Cancel = true;
    stop.Cancel();
}
