using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Microsoft.Playwright;
using Pipeline.Runs;
using Pipeline.Storage;
using Pipeline.Tests.FineTuning;
using Pipeline.Tests.Infrastructure;
using static Microsoft.Playwright.Assertions;

namespace Pipeline.Tests.Dashboard;

/// <summary>
/// The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against the function app in
/// local host mode on Azurite. Every page is checked for console errors; screenshots land in
/// <c>screenshots/</c> beside the test assembly.
/// </summary>
[Collection(LocalHostProcess.Collection)]
public sealed class DashboardTests(DashboardTests.Site site) : IClassFixture<DashboardTests.Site>
{
    private static readonly TimeSpan RunTimeout = TimeSpan.FromSeconds(150);

    [Fact]
    public async Task Runs_page_lists_a_submitted_run_and_shows_it_finishing()
    {
        var runId = await site.SubmitAsync("dash/reviews.tsv", "text\tlabel\nGood\t1\nBad\t0\nFine\t1\nAwful\t0\n", new { preprocess = new { validationFraction = 0 } });
        await using var page = await site.OpenAsync("");

        var row = page.Page.Locator($"#runs tr[data-run-id='{runId}']");
        await Expect(row).ToBeVisibleAsync();
        await Expect(row).ToHaveAttributeAsync("data-status", RunStatus.Succeeded, new() { Timeout = (float)RunTimeout.TotalMilliseconds });
        await Expect(row.Locator("td").Nth(1)).ToHaveTextAsync("succeeded");
        await page.ScreenshotAsync("runs");

        // The status filter asks the API for that status only.
        await page.Page.GetByLabel("Status").SelectOptionAsync(RunStatus.Failed);
        await Expect(page.Page.Locator("#runs caption")).ToContainTextAsync("failed");
        await Expect(row).ToHaveCountAsync(0);
        await page.Page.GetByLabel("Status").SelectOptionAsync(RunStatus.Succeeded);
        await Expect(row).ToBeVisibleAsync();

        // Keyboard: the run's link opens its page, with its stage timeline and counts.
        await row.GetByRole(AriaRole.Link, new() { Name = runId }).FocusAsync();
        await page.Page.Keyboard.PressAsync("Enter");
        await Expect(page.Page.Locator("#timeline li[data-stage='preprocess']")).ToContainTextAsync("succeeded");
        await Expect(page.Page.Locator("#timeline li[data-stage='ingest']")).ToContainTextAsync(" s");
        await Expect(page.Page.Locator("#counts-title + dl")).ToContainTextAsync("trainRecords");
        await Expect(page.Page.Locator("#artifacts")).ToContainTextAsync("manifest.json");
        await page.ScreenshotAsync("run");
        page.AssertNoConsoleErrors();
    }

    [Fact]
    public async Task A_failed_run_shows_its_code_and_first_error_line()
    {
        var runId = await site.SubmitAsync("dash/broken.jsonl", "{\"text\":\"fine\"}\n{\"text\": oops}\n{\"text\":\"also fine\"}\n{\"text\":\"\"}\n", null);
        await using var page = await site.OpenAsync($"#/runs/{runId}");

        await Expect(page.Page.Locator("#run-status")).ToHaveTextAsync(RunStatus.Failed, new() { Timeout = (float)RunTimeout.TotalMilliseconds });
        await Expect(page.Page.Locator("#error-code")).ToHaveTextAsync("TooManyInvalidRecords");
        var first = page.Page.Locator("#error-lines tbody tr").First;
        await Expect(first.Locator("td").First).ToHaveTextAsync("2");
        await Expect(first).ToContainTextAsync("malformed_json");
        await Expect(page.Page.Locator("#run-error")).ToContainTextAsync("report.json");
        await Expect(page.Page.Locator("#run-error").GetByRole(AriaRole.Link, new() { Name = "quarantined copy (broken.jsonl)" })).ToBeVisibleAsync();
        await page.ScreenshotAsync("failed-run");
        page.AssertNoConsoleErrors();
    }

    [Fact]
    public async Task A_training_run_draws_one_point_per_epoch_and_its_batch_shows_results_and_lineage()
    {
        var toScore = string.Concat(File.ReadLines(Path.Combine(RepoPaths.Root, "samples", "to-score.jsonl")).Take(200).Select(l => l + "\n"));
        await site.Pipeline.Storage.Container(StorageNames.Containers.Outputs).GetBlobClient("inputs/dash-score.jsonl").UploadAsync(BinaryData.FromString(toScore), overwrite: true);
        var spec = JsonDocument.Parse(FineTuneStageTests.PrepareSpec[..^1] + ""","fineTune":{"epochs":4,"earlyStoppingPatience":0,"outputModelId":"dash-sentiment","infer":{"input":"outputs/inputs/dash-score.jsonl"}}}""").RootElement;
        var runId = await site.SubmitAsync("dash/train.tsv", FineTuneStageTests.Reviews, spec);
        await using var page = await site.OpenAsync($"#/runs/{runId}");

        await Expect(page.Page.Locator("#run-status")).ToHaveTextAsync(RunStatus.Succeeded, new() { Timeout = (float)RunTimeout.TotalMilliseconds });
        var run = (await site.Pipeline.Runs.GetAsync(runId))!;
        var epochs = (int)run.GetMetrics()["epochsRun"];
        Assert.Equal(4, epochs);
        await Expect(page.Page.Locator("#training circle.point[data-series='validationAccuracy']")).ToHaveCountAsync(epochs);
        await Expect(page.Page.Locator("#training circle.point[data-series='trainLoss']")).ToHaveCountAsync(epochs);
        await Expect(page.Page.Locator("#training line.baseline[data-series='baseline']")).ToHaveCountAsync(1);
        // The generated bag-of-embeddings base, as the job resolved it.
        await Expect(page.Page.Locator("#training")).ToContainTextAsync("base-boe-");
        await Expect(page.Page.Locator("#training")).ToContainTextAsync("learningRate");
        await page.ScreenshotAsync("training-run");
        await page.ScreenshotAsync("training", page.Page.Locator("#training"));

        await page.Page.GetByRole(AriaRole.Link, new() { NameRegex = new System.Text.RegularExpressions.Regex("^Batch bt-") }).ClickAsync();
        await Expect(page.Page.Locator("#results tbody tr")).ToHaveCountAsync(20);
        await Expect(page.Page.Locator("#results tbody tr").First.Locator("[role=meter]")).ToHaveCountAsync(2);
        await Expect(page.Page.Locator("#throughput-title + dl")).ToContainTextAsync("CPUExecutionProvider");
        var lineage = page.Page.Locator("#lineage > li");
        await Expect(lineage).ToHaveCountAsync(5);
        await Expect(lineage.Nth(1)).ToContainTextAsync("dash-sentiment");
        await Expect(lineage.Nth(3)).ToContainTextAsync(run.DatasetId!);
        await Expect(lineage.Nth(4)).ToContainTextAsync("incoming/dash/train.tsv");
        await page.ScreenshotAsync("batch");
        page.AssertNoConsoleErrors();
    }

    [Fact]
    public async Task Cancel_from_the_page_cancels_the_run()
    {
        // A queued run that no stage has picked up (no message was sent): only the page's button can end it.
        var runId = "run-dash-cancel-" + Guid.NewGuid().ToString("N")[..8];
        await site.Pipeline.Runs.GetOrCreateAsync(new RunRecord { RunId = runId, Source = "incoming/dash/waiting.jsonl", Stage = Stages.Ingest });
        await using var page = await site.OpenAsync($"#/runs/{runId}");

        await Expect(page.Page.Locator("#run-status")).ToHaveTextAsync(RunStatus.Queued);
        await page.Page.GetByRole(AriaRole.Button, new() { Name = "Cancel run" }).ClickAsync();
        await Expect(page.Page.Locator("#run-status")).ToHaveTextAsync(RunStatus.Cancelled);
        await Expect(page.Page.Locator("#error-code")).ToHaveTextAsync("Cancelled");
        await Expect(page.Page.GetByRole(AriaRole.Button, new() { Name = "Cancel run" })).ToHaveCountAsync(0);
        var run = (await site.Pipeline.Runs.GetAsync(runId))!;
        Assert.Equal((RunStatus.Cancelled, "Cancelled: cancelled from the dashboard"), (run.Status, run.Error));
        page.AssertNoConsoleErrors();
    }

    [Fact]
    public async Task Upload_from_the_page_starts_a_run()
    {
        var folder = Directory.CreateTempSubdirectory("dash-upload-");
        try
        {
            var data = Path.Combine(folder.FullName, "uploaded.tsv");
            var spec = Path.Combine(folder.FullName, "uploaded.pipeline.json");
            await File.WriteAllTextAsync(data, "Great phone\t1\nBroke in a day\t0\nWorks well\t1\nTerrible\t0\n");
            await File.WriteAllTextAsync(spec, """{"ingest":{"format":"tsv","columns":["text","label"]},"preprocess":{"validationFraction":0}}""");
            await using var page = await site.OpenAsync("#/upload");

            await page.Page.GetByLabel("Data file").SetInputFilesAsync(data);
            await page.Page.GetByLabel("Run spec").SetInputFilesAsync(spec);
            await page.ScreenshotAsync("upload");
            await page.Page.GetByRole(AriaRole.Button, new() { Name = "Upload and start the run" }).ClickAsync();

            await page.Page.WaitForURLAsync(new System.Text.RegularExpressions.Regex("#/runs/run-"));
            await Expect(page.Page.Locator("#run-status")).ToHaveTextAsync(RunStatus.Succeeded, new() { Timeout = (float)RunTimeout.TotalMilliseconds });
            var runId = Uri.UnescapeDataString(new Uri(page.Page.Url).Fragment["#/runs/".Length..]);
            var run = (await site.Pipeline.Runs.GetAsync(runId))!;
            Assert.StartsWith("incoming/uploads/", run.Source);
            Assert.EndsWith("/uploaded.tsv", run.Source);
            Assert.Equal(4, run.GetCounts()["trainRecords"]);
            // The spec was uploaded beside the data, as a dropped spec would be.
            var specBlob = site.Pipeline.Storage.BlobAt(run.Source[..^".tsv".Length] + RunSpec.FileSuffix)!;
            Assert.Contains("columns", (await specBlob.DownloadContentAsync()).Value.Content.ToString());
            page.AssertNoConsoleErrors();
        }
        finally
        {
            folder.Delete(recursive: true);
        }
    }

    /// <summary>One Azurite, one local host and one browser for the class: each test opens its own page.</summary>
    public sealed class Site : IAsyncLifetime
    {
        public const string Chromium = "/usr/bin/chromium";
        private readonly Azurite _azurite = new();
        private LocalHostProcess _host = null!;
        private HttpClient _http = null!;
        private IPlaywright _playwright = null!;
        private IBrowser _browser = null!;

        public TestPipeline Pipeline { get; private set; } = null!;

        public static string Screenshots { get; } = Path.Combine(AppContext.BaseDirectory, "screenshots");

        public async Task InitializeAsync()
        {
            if (!File.Exists(Chromium))
            {
                throw new InvalidOperationException($"{Chromium} is missing: install Debian's chromium (apt-get install chromium; ./test.sh does).");
            }

            await _azurite.InitializeAsync();
            Pipeline = new TestPipeline(_azurite);
            await Pipeline.Storage.EnsureCreatedAsync();
            // Runs start through the API (as the page starts them), not the blob watcher.
            _host = new LocalHostProcess(_azurite.ConnectionString, new Dictionary<string, string>
            {
                ["Pipeline__LocalHost__WatchIncoming"] = "false",
                ["Pipeline__FineTune__MonitorInitialDelay"] = "00:00:00.500",
                ["Pipeline__FineTune__MonitorMaxDelay"] = "00:00:01",
                ["Pipeline__FineTune__HeartbeatSeconds"] = "0.5",
            });
            _http = await _host.WaitUntilListeningAsync();
            _playwright = await Playwright.CreateAsync();
            _browser = await _playwright.Chromium.LaunchAsync(new BrowserTypeLaunchOptions
            {
                ExecutablePath = Chromium,
                Headless = true,
                Args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            });
            Directory.CreateDirectory(Screenshots);
        }

        public async Task DisposeAsync()
        {
            await _browser.DisposeAsync();
            _playwright.Dispose();
            _http.Dispose();
            _host.Dispose();
            Pipeline.Dispose();
            await _azurite.DisposeAsync();
        }

        /// <summary>Uploads a file into incoming and starts its run with <c>POST /api/runs</c>, as a user's script would.</summary>
        public async Task<string> SubmitAsync(string blob, string content, object? spec)
        {
            await Pipeline.Storage.Container(StorageNames.Containers.Incoming).GetBlobClient(blob).UploadAsync(BinaryData.FromString(content), overwrite: true);
            using var response = await _http.PostAsJsonAsync("/api/runs", new { blob = $"{StorageNames.Containers.Incoming}/{blob}", spec });
            response.EnsureSuccessStatusCode();
            return (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("runId").GetString()!;
        }

        /// <summary>A new page at the dashboard's address plus <paramref name="fragment"/>, recording every console error.</summary>
        public async Task<DashboardPage> OpenAsync(string fragment)
        {
            var context = await _browser.NewContextAsync(new BrowserNewContextOptions { ViewportSize = new ViewportSize { Width = 1280, Height = 900 } });
            context.SetDefaultTimeout(30_000);
            var page = await context.NewPageAsync();
            var dashboard = new DashboardPage(context, page, () => _host.Output);
            await page.GotoAsync($"http://127.0.0.1:{_host.Port}/{fragment}");
            return dashboard;
        }
    }

    public sealed class DashboardPage : IAsyncDisposable
    {
        private readonly IBrowserContext _context;
        private readonly List<string> _errors = [];
        private readonly Func<string> _hostOutput;

        public DashboardPage(IBrowserContext context, IPage page, Func<string> hostOutput)
        {
            _context = context;
            _hostOutput = hostOutput;
            Page = page;
            page.Console += (_, message) =>
            {
                if (message.Type == "error")
                {
                    lock (_errors)
                    {
                        _errors.Add($"console: {message.Text} ({message.Location})");
                    }
                }
            };
            page.PageError += (_, error) =>
            {
                lock (_errors)
                {
                    _errors.Add($"page error: {error}");
                }
            };
        }

        public IPage Page { get; }

        public Task ScreenshotAsync(string name, ILocator? element = null) =>
            element is null
                ? Page.ScreenshotAsync(new PageScreenshotOptions { Path = Path.Combine(Site.Screenshots, $"{name}.png"), FullPage = true })
                : element.ScreenshotAsync(new LocatorScreenshotOptions { Path = Path.Combine(Site.Screenshots, $"{name}.png") });

        public void AssertNoConsoleErrors()
        {
            lock (_errors)
            {
                Assert.True(_errors.Count == 0, string.Join('\n', _errors) + "\n--- host output ---\n" + _hostOutput());
            }
        }

        public async ValueTask DisposeAsync() => await _context.DisposeAsync();
    }
}
