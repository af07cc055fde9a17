using System.Diagnostics;
using System.Text.Json;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.AspNetCore.Routing.Template;
using Microsoft.Extensions.Logging;
using Pipeline.LocalHost.Rpc;
using Pipeline.LocalHost.Worker;

namespace Pipeline.LocalHost.Triggers;

/// <summary>
/// HTTP triggers, the way the Functions host serves a worker with the <c>HttpUri</c> capability (ASP.NET
/// Core integration): the request's route picks the function; the host sends the worker an
/// <c>InvocationRequest</c> with an empty <c>RpcHttp</c> and the route values as trigger metadata, and forwards
/// the request itself to the worker's HTTP address with <c>x-ms-invocation-id</c>; the worker answers over
/// HTTP, and its <c>InvocationResponse</c> ends the invocation. Function keys are not checked locally (as in
/// <c>func start</c>); Azure checks them (<c>AuthorizationLevel.Function</c>).
/// </summary>
public sealed class HttpForwarder(WorkerSupervisor workers, string routePrefix, ILogger logger)
{
    public const string InvocationIdHeader = "x-ms-invocation-id";
    private static readonly HashSet<string> HopByHop = new(["Connection", "Keep-Alive", "Transfer-Encoding", "Upgrade", "Proxy-Connection", "Host", "Content-Length"], StringComparer.OrdinalIgnoreCase);
    private readonly HttpClient _client = new(new SocketsHttpHandler { AllowAutoRedirect = false, UseCookies = false }) { Timeout = Timeout.InfiniteTimeSpan };
    private List<(IndexedFunction Function, TemplateMatcher Matcher)>? _routes;

    public async Task HandleAsync(HttpContext context)
    {
        // The most specific route first (literals before parameters before catch-alls), as ASP.NET Core routing orders them.
        var routes = _routes ??= [.. (await workers.Indexed).Where(f => f.IsHttpTrigger)
            .Select(f => (Function: f, Template: TemplateParser.Parse(Prefixed(f.Route))))
            .OrderBy(r => RoutePrecedence.ComputeInbound(r.Template))
            .Select(r => (r.Function, new TemplateMatcher(r.Template, new RouteValueDictionary())))];
        var values = new RouteValueDictionary();
        IndexedFunction? function = null;
        foreach (var (candidate, matcher) in routes)
        {
            if (candidate.Methods.Contains(context.Request.Method, StringComparer.OrdinalIgnoreCase) && matcher.TryMatch(context.Request.Path, values))
            {
                function = candidate;
                break;
            }

            values.Clear();
        }

        if (function is null)
        {
            await Results.Problem(statusCode: 404, title: "No function serves this route", detail: $"No HTTP function of this app serves {context.Request.Method} {context.Request.Path}.", type: "urn:pipeline:problem:no-route").ExecuteAsync(context);
            return;
        }

        var channel = await workers.ReadyAsync(context.RequestAborted);
        if (!channel.Capabilities.TryGetValue("HttpUri", out var httpUri) || httpUri.Length == 0)
        {
            await Results.Problem(statusCode: 502, title: "The worker takes no forwarded HTTP requests", detail: "The worker did not report the HttpUri capability: build the app with ASP.NET Core integration (ConfigureFunctionsWebApplication).").ExecuteAsync(context);
            return;
        }

        var invocation = Invocation(function, values, context.Request);
        using var forward = Forward(context.Request, new Uri(new Uri(httpUri), context.Request.Path + context.Request.QueryString), invocation.InvocationId);
        var forwarding = _client.SendAsync(forward, HttpCompletionOption.ResponseHeadersRead, context.RequestAborted);
        var invoked = channel.InvokeAsync(invocation, context.RequestAborted);
        try
        {
            using var response = await forwarding;
            context.Response.StatusCode = (int)response.StatusCode;
            foreach (var header in response.Headers.Concat(response.Content.Headers))
            {
                if (!HopByHop.Contains(header.Key))
                {
                    context.Response.Headers[header.Key] = header.Value.ToArray();
                }
            }

            await response.Content.CopyToAsync(context.Response.Body, context.RequestAborted);
        }
        catch (HttpRequestException e)
        {
            logger.LogWarning(e, "Forwarding {Method} {Path} to the worker failed", context.Request.Method, context.Request.Path);
            if (!context.Response.HasStarted)
            {
                await Results.Problem(statusCode: 502, title: "The worker did not answer", detail: e.Message).ExecuteAsync(context);
            }
        }

        try
        {
            var result = await invoked;
            if (result.Result.Status != StatusResult.Types.Status.Success)
            {
                logger.LogWarning("Function {Function} failed: {Exception}", function.Name, result.Result.Exception?.Message);
            }
        }
        catch (WorkerUnavailableException e)
        {
            logger.LogWarning("Function {Function}: {Reason}", function.Name, e.Message);
        }
    }

    private string Prefixed(string route) => routePrefix.Trim('/').Length == 0 ? route.TrimStart('/') : $"{routePrefix.Trim('/')}/{route.TrimStart('/')}";

    private static InvocationRequest Invocation(IndexedFunction function, RouteValueDictionary values, HttpRequest request)
    {
        var invocation = new InvocationRequest
        {
            InvocationId = Guid.NewGuid().ToString(),
            FunctionId = function.FunctionId,
            TraceContext = QueueTriggerData.TraceContext(),
        };
        if (Activity.Current is { } activity)
        {
            invocation.TraceContext.TraceParent = activity.Id ?? invocation.TraceContext.TraceParent;
        }

        invocation.InputData.Add(new ParameterBinding { Name = function.TriggerName, Data = new TypedData { Http = new RpcHttp() } });
        foreach (var (key, value) in values)
        {
            if (value?.ToString() is { } text)
            {
                invocation.TriggerMetadata[key] = new TypedData { String = text };
            }
        }

        invocation.TriggerMetadata["Query"] = new TypedData { Json = JsonSerializer.Serialize(request.Query.ToDictionary(q => q.Key, q => q.Value.ToString())) };
        invocation.TriggerMetadata["Headers"] = new TypedData { Json = JsonSerializer.Serialize(request.Headers.ToDictionary(h => h.Key, h => h.Value.ToString())) };
        invocation.TriggerMetadata["sys"] = QueueTriggerData.Sys(function.Name);
        return invocation;
    }

    private static HttpRequestMessage Forward(HttpRequest request, Uri target, string invocationId)
    {
        var forward = new HttpRequestMessage(new HttpMethod(request.Method), target);
        if (request.ContentLength > 0 || request.Headers.TransferEncoding.Count > 0)
        {
            forward.Content = new StreamContent(request.Body);
        }

        foreach (var (key, value) in request.Headers)
        {
            if (HopByHop.Contains(key))
            {
                continue;
            }

            if (!forward.Headers.TryAddWithoutValidation(key, value.ToArray()))
            {
                forward.Content?.Headers.TryAddWithoutValidation(key, value.ToArray());
            }
        }

        forward.Headers.Remove(InvocationIdHeader);
        forward.Headers.TryAddWithoutValidation(InvocationIdHeader, invocationId);
        return forward;
    }
}
