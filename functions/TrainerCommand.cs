using Pipeline.FineTuning.Trainer;
using Pipeline.Hosting;
using Pipeline.Storage;

namespace Pipeline.Functions;

/// <summary>
/// <c>Pipeline.Functions train --job &lt;jobId&gt;</c> (or <c>PIPELINE_JOB_ID</c>): runs the built-in trainer on one
/// job of the job contract, against the storage account in <c>AzureWebJobsStorage</c> (a connection string, or
/// <c>AzureWebJobsStorage__blobServiceUri</c> with a managed identity).
/// </summary>
public static class TrainerCommand
{
    public static async Task<int> RunAsync(string[] args)
    {
        var jobIndex = Array.IndexOf(args, "--job");
        var jobId = jobIndex >= 0 && jobIndex + 1 < args.Length ? args[jobIndex + 1] : Environment.GetEnvironmentVariable("PIPELINE_JOB_ID");
        if (string.IsNullOrWhiteSpace(jobId))
        {
            Console.Error.WriteLine("usage: Pipeline.Functions train --job <jobId>   (or set PIPELINE_JOB_ID)");
            return 2;
        }

        var configuration = new ConfigurationBuilder().AddEnvironmentVariables().Build();
        using var services = new ServiceCollection()
            .AddLogging(logging => logging.AddSimpleConsole(o => o.SingleLine = true))
            .AddPipelineStorage(configuration)
            .Configure<Pipeline.Inference.InferenceSettings>(configuration.GetSection(Pipeline.Inference.InferenceSettings.Section))
            .AddSingleton<JobTrainer>()
            .BuildServiceProvider();
        using var stop = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) =>
        {
            e.Cancel = true;
            stop.Cancel();
        };
        return await services.GetRequiredService<JobTrainer>().RunAsync(jobId, stop.Token);
    }
}
