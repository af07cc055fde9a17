using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Azure.Storage.Queues;
using Microsoft.Extensions.Configuration;
using Pipeline.Storage;
using Spectre.Console;

namespace Pipeline.Cli;

/// <summary>Options every command shares, and the exit codes the CLI returns.</summary>
public static class CliOptions
{
    public static readonly Option<string?> Connection = new("--connection")
    {
        Description = "Storage connection string (default: the AzureWebJobsStorage environment variable, else local Azurite).",
        Recursive = true,
    };

    public static readonly Option<string> Output = new("--output", "-o")
    {
        Description = "Output format: table (default) or json.",
        DefaultValueFactory = _ => "table",
        Recursive = true,
    };

    static CliOptions() => Output.AcceptOnlyFromAmong("table", "json");

    public static class ExitCodes
    {
        public const int Succeeded = 0;
        /// <summary>The run (or command) failed.</summary>
        public const int RunFailed = 1;
        /// <summary>Bad usage or input the user must fix.</summary>
        public const int UsageError = 2;
        /// <summary>Not found.</summary>
        public const int NotFound = 3;
        /// <summary>--wait gave up before the run ended.</summary>
        public const int TimedOut = 4;
        /// <summary>The run finished but some rows failed (batch inference: completed_with_failures).</summary>
        public const int CompletedWithFailures = 5;
    }

    public static StorageClients Storage(ParseResult parse)
    {
        var connection = parse.GetValue(Connection)
            ?? Environment.GetEnvironmentVariable(StorageClients.ConnectionSetting)
            ?? "UseDevelopmentStorage=true";
        var configuration = new ConfigurationBuilder()
            .AddInMemoryCollection(new Dictionary<string, string?> { [StorageClients.ConnectionSetting] = connection })
            .Build();
        return StorageClients.FromConfiguration(configuration, QueueMessageEncoding.Base64);
    }

    /// <summary>The run event store, as the CLI uses it (no logging).</summary>
    public static Pipeline.Messaging.RunEvents Events(StorageClients storage) =>
        new(storage, Microsoft.Extensions.Logging.Abstractions.NullLogger<Pipeline.Messaging.RunEvents>.Instance);

    public static bool Json(ParseResult parse) => parse.GetValue(Output) == "json";

    public static void WriteJson<T>(T value, JsonTypeInfo<T> type) => Console.Out.WriteLine(JsonSerializer.Serialize(value, type));

    public static int Fail(string message, int code)
    {
        AnsiConsole.MarkupLineInterpolated($"[red]error:[/] {message}");
        return code;
    }
}
