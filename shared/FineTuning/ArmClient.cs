using System.Net;
using System.Text.Json.Nodes;
using Azure;
using Azure.Core;
using Azure.Core.Pipeline;
using Microsoft.Extensions.Options;

namespace Pipeline.FineTuning;

/// <summary>Configuration section <c>Pipeline:FineTune:Arm</c>: how the cloud backends talk to Azure Resource Manager.</summary>
public sealed class ArmOptions
{
    /// <summary>Retries of a throttled (429), unavailable (503) or failed (5xx, network) request; ARM's <c>Retry-After</c> is honoured.</summary>
    public int MaxRetries { get; set; } = 5;
    /// <summary>The first back-off; each retry doubles it (with jitter) up to <see cref="MaxDelay"/>.</summary>
    public TimeSpan Delay { get; set; } = TimeSpan.FromSeconds(1);
    public TimeSpan MaxDelay { get; set; } = TimeSpan.FromSeconds(60);
    /// <summary>One request's time limit (the whole call, retries included, has none beyond the invocation's).</summary>
    public TimeSpan NetworkTimeout { get; set; } = TimeSpan.FromSeconds(100);
    /// <summary>How often a long-running operation (201/202 with <c>Azure-AsyncOperation</c> or <c>Location</c>) is polled when ARM gives no <c>Retry-After</c>.</summary>
    public TimeSpan OperationPollInterval { get; set; } = TimeSpan.FromSeconds(5);
    /// <summary>A long-running operation not finished by then fails the call (the caller's redelivery looks it up again).</summary>
    public TimeSpan OperationTimeout { get; set; } = TimeSpan.FromMinutes(5);
}

/// <summary>ARM refused the request (a 4xx answer, or 503 after the retries): it did nothing, so the request may be sent again.</summary>
public sealed class ArmRefusedException(string message, HttpStatusCode status) : HttpRequestException(message, null, status);

/// <summary>
/// ARM requests through an Azure.Core <see cref="HttpPipeline"/>: a bearer token for
/// <c>https://management.azure.com/.default</c> (<see cref="BearerTokenAuthenticationPolicy"/>), exponential
/// retries that honour <c>Retry-After</c>, long-running operations polled to their end, and the transport of
/// the named <see cref="IHttpClientFactory"/> client <see cref="HttpClientName"/>. Errors carry ARM's message.
/// </summary>
public sealed class ArmClient
{
    public const string ArmScope = "https://management.azure.com/.default";
    /// <summary>The <see cref="IHttpClientFactory"/> client whose handler carries the requests.</summary>
    public const string HttpClientName = "Pipeline.Arm";

    private readonly HttpPipeline _pipeline;
    private readonly ArmOptions _settings;

    public ArmClient(IHttpClientFactory httpClients, TokenCredential credential, IOptions<FineTuneOptions> options)
        : this(httpClients.CreateClient(HttpClientName), credential, options.Value.Arm)
    {
    }

    public ArmClient(HttpClient http, TokenCredential credential, ArmOptions settings)
    {
        _settings = settings;
        var options = new PipelineClientOptions { Transport = new HttpClientTransport(http) };
        options.Retry.Mode = RetryMode.Exponential;
        options.Retry.MaxRetries = settings.MaxRetries;
        options.Retry.Delay = settings.Delay;
        options.Retry.MaxDelay = settings.MaxDelay;
        options.Retry.NetworkTimeout = settings.NetworkTimeout;
        options.Diagnostics.ApplicationId = "pipeline";
        _pipeline = HttpPipelineBuilder.Build(options, new BearerTokenAuthenticationPolicy(credential, ArmScope));
    }

    /// <summary>
    /// Sends one request; a 201/202 that names an operation is polled until it ends. Returns the response's JSON
    /// (the operation's result when the first response had none), or null when there was no body.
    /// </summary>
    /// <param name="retryAmbiguous">False for a request that must not be repeated blindly (a start): only 429 and 503,
    /// which ARM answers before doing anything, are retried; a timeout or 5xx surfaces and the caller looks it up.</param>
    /// <exception cref="HttpRequestException">ARM answered a status outside <paramref name="accepted"/>, or the operation failed.</exception>
    public async Task<JsonNode?> SendAsync(HttpMethod method, string url, JsonNode? body, CancellationToken cancellationToken, bool retryAmbiguous = true, params HttpStatusCode[] accepted)
    {
        using var message = _pipeline.CreateMessage();
        message.Request.Method = RequestMethod.Parse(method.Method);
        message.Request.Uri.Reset(new Uri(url));
        message.Request.Headers.Add("Accept", "application/json");
        if (body is not null)
        {
            message.Request.Headers.Add("Content-Type", "application/json");
            message.Request.Content = RequestContent.Create(BinaryData.FromString(body.ToJsonString()));
        }

        if (!retryAmbiguous)
        {
            message.ResponseClassifier = NotProcessedOnly.Instance;
        }

        await _pipeline.SendAsync(message, cancellationToken);
        var response = message.Response;
        if (!accepted.Contains((HttpStatusCode)response.Status))
        {
            var failure = Failure(method.Method, url, response);
            // A client error, or throttled/unavailable after the retries: ARM refused the request and did nothing.
            throw response.Status is (>= 400 and < 500) or 503 ? new ArmRefusedException(failure.Message, failure.StatusCode!.Value) : failure;
        }

        var result = Json(response);
        if (response.Status is 201 or 202 && OperationUrl(response) is { } operation)
        {
            var final = await PollAsync(operation, response, cancellationToken);
            result ??= final;
        }

        return result;
    }

    /// <summary>Polls an <c>Azure-AsyncOperation</c> (status document) or <c>Location</c> (202 until done) URL to the operation's end.</summary>
    private async Task<JsonNode?> PollAsync((string Url, bool AsyncOperation) operation, Response first, CancellationToken cancellationToken)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(_settings.OperationTimeout);
        var wait = RetryAfter(first) ?? _settings.OperationPollInterval;
        var location = first.Headers.TryGetValue("Location", out var l) ? l : null;
        try
        {
            while (true)
            {
                await Task.Delay(wait, timeout.Token);
                using var poll = _pipeline.CreateMessage();
                poll.Request.Method = RequestMethod.Get;
                poll.Request.Uri.Reset(new Uri(operation.Url));
                await _pipeline.SendAsync(poll, timeout.Token);
                var response = poll.Response;
                if (response.Status >= 400)
                {
                    throw Failure("GET", operation.Url, response);
                }

                wait = RetryAfter(response) ?? _settings.OperationPollInterval;
                if (!operation.AsyncOperation)
                {
                    if (response.Status != 202)
                    {
                        return Json(response);
                    }

                    continue;
                }

                var status = Json(response);
                switch (status?["status"]?.GetValue<string>())
                {
                    case "Succeeded":
                        // The result, where the operation has one, is at the first response's Location.
                        return location is null ? null : await SendAsync(HttpMethod.Get, location, null, cancellationToken, true, HttpStatusCode.OK, HttpStatusCode.NoContent);
                    case "Failed" or "Canceled" or "Cancelled":
                        throw new HttpRequestException($"The operation {operation.Url} ended {status!["status"]}: {status["error"]?["message"]?.GetValue<string>() ?? status.ToJsonString()}");
                }
            }
        }
        catch (OperationCanceledException) when (timeout.IsCancellationRequested && !cancellationToken.IsCancellationRequested)
        {
            throw new HttpRequestException($"The operation {operation.Url} did not end within {_settings.OperationTimeout.TotalSeconds:N0} s (Pipeline__FineTune__Arm__OperationTimeout).");
        }
    }

    private static (string Url, bool AsyncOperation)? OperationUrl(Response response) =>
        response.Headers.TryGetValue("Azure-AsyncOperation", out var asyncOperation) ? (asyncOperation, true)
        : response.Headers.TryGetValue("Location", out var location) ? (location, false)
        : null;

    private static TimeSpan? RetryAfter(Response response) =>
        response.Headers.TryGetValue("Retry-After", out var value) && int.TryParse(value, out var seconds) ? TimeSpan.FromSeconds(seconds) : null;

    private static JsonNode? Json(Response response) =>
        response.Content.ToMemory().Length > 0 ? JsonNode.Parse(response.Content.ToString()) : null;

    private static HttpRequestException Failure(string method, string url, Response response)
    {
        var text = response.Content.ToString();
        string message;
        try
        {
            message = text.Length > 0 && JsonNode.Parse(text)?["error"]?["message"]?.GetValue<string>() is { } armMessage ? armMessage : text;
        }
        catch (System.Text.Json.JsonException)
        {
            message = text;
        }

        return new HttpRequestException($"{method} {url} answered {response.Status}: {message}", null, (HttpStatusCode)response.Status);
    }

    private sealed class PipelineClientOptions : ClientOptions;

    /// <summary>Retries only what ARM answers before acting (throttled, unavailable): a start is never sent twice blindly.</summary>
    private sealed class NotProcessedOnly : ResponseClassifier
    {
        public static readonly NotProcessedOnly Instance = new();

        public override bool IsRetriableResponse(HttpMessage message) => message.Response.Status is 429 or 503;

        public override bool IsRetriableException(Exception exception) => false;

        public override bool IsRetriable(HttpMessage message, Exception? exception) => exception is null && IsRetriableResponse(message);

        public override bool IsErrorResponse(HttpMessage message) => message.Response.Status >= 400;
    }
}
