namespace Pipeline.Tests.Infrastructure;

/// <summary>Where the repository, its build outputs and the team's shared data are.</summary>
public static class RepoPaths
{
    public static string Root => Pipeline.Testing.AzuriteServer.RepoRoot;

    /// <summary>The build configuration the tests run under (Debug or Release).</summary>
    public static string Configuration { get; } = AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Release{Path.DirectorySeparatorChar}") ? "Release" : "Debug";

    /// <summary>The function app as built: the isolated worker with host.json, worker.config.json and functions.metadata.</summary>
    public static string FunctionApp => Path.Combine(Root, "functions", "bin", Configuration, "net10.0");

    /// <summary>Local host mode (localhost/): starts the worker and drives it over FunctionRpc.</summary>
    public static string LocalHost => Path.Combine(Root, "localhost", "bin", Configuration, "net10.0", "Pipeline.LocalHost.dll");

    /// <summary>The built-in trainer (trainer/), which the local fine-tune backend starts.</summary>
    public static string Trainer => Path.Combine(Root, "trainer", "bin", Configuration, "net10.0", "Pipeline.Trainer.dll");

    /// <summary><c>../shared/data</c> beside the project (CI always has it; a user's clone may not).</summary>
    public static string? SharedData
    {
        get
        {
            var path = Path.GetFullPath(Path.Combine(Root, "..", "shared", "data"));
            return Directory.Exists(path) ? path : null;
        }
    }

    public static string RequireSharedData(string relative)
    {
        var root = SharedData ?? throw new InvalidOperationException("../shared/data is not beside the project; these tests need the team's data folder (CI always has it).");
        return Path.Combine(root, relative);
    }
}
