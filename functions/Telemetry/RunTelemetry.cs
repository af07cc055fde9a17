using System.Diagnostics;
using Azure.Monitor.OpenTelemetry.Exporter;
using Microsoft.Azure.Functions.Worker.OpenTelemetry;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using OpenTelemetry;
using OpenTelemetry.Logs;
using OpenTelemetry.Trace;

namespace Pipeline.Functions.Telemetry;

/// <summary>
/// One run followed across stages and instances: an invocation puts its run id in the log scope and in the
/// activity's baggage, and <see cref="RunIdProcessor"/> copies it onto every span started under it (the
/// worker's invocation span, storage calls, the stage's own spans).
/// </summary>
public static class RunTelemetry
{
    public const string RunIdTag = "pipeline.run_id";
    public const string ActivitySourceName = "Pipeline";

    public static IDisposable? BeginRun(ILogger logger, string runId)
    {
        if (Activity.Current is { } activity)
        {
            activity.SetTag(RunIdTag, runId);
            activity.SetBaggage(RunIdTag, runId);
        }

        return logger.BeginScope(new Dictionary<string, object> { ["RunId"] = runId });
    }

    /// <summary>
    /// OpenTelemetry for the worker (<c>UseFunctionsWorkerDefaults</c>: the invocation spans and the host's
    /// trace context), exported to Application Insights when <c>APPLICATIONINSIGHTS_CONNECTION_STRING</c> is set.
    /// </summary>
    public static IServiceCollection AddPipelineTelemetry(this IServiceCollection services, IConfiguration configuration)
    {
        var connectionString = configuration["APPLICATIONINSIGHTS_CONNECTION_STRING"];
        var telemetry = services.AddOpenTelemetry().UseFunctionsWorkerDefaults();
        telemetry.WithTracing(tracing =>
        {
            tracing.AddSource(ActivitySourceName).AddProcessor(new RunIdProcessor());
            if (!string.IsNullOrEmpty(connectionString))
            {
                tracing.AddAzureMonitorTraceExporter(o => o.ConnectionString = connectionString);
            }
        });
        services.AddLogging(logging => logging.AddOpenTelemetry(o =>
        {
            o.IncludeScopes = true;
            if (!string.IsNullOrEmpty(connectionString))
            {
                o.AddAzureMonitorLogExporter(exporter => exporter.ConnectionString = connectionString);
            }
        }));
        return services;
    }

    /// <summary>Stamps the run id carried in baggage on each span as it starts.</summary>
    public sealed class RunIdProcessor : BaseProcessor<Activity>
    {
        public override void OnStart(Activity activity)
        {
            if (activity.GetBaggageItem(RunIdTag) is { Length: > 0 } runId)
            {
                activity.SetTag(RunIdTag, runId);
            }
        }
    }
}
