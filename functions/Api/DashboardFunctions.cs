using Microsoft.AspNetCore.Http;
using Microsoft.Azure.Functions.Worker;

namespace Pipeline.Functions.Api;

/// <summary>
/// The dashboard's pages (HTML, CSS and JavaScript modules embedded in this assembly) at the root of the app.
/// Anonymous: the files hold no data; every data route stays <c>AuthorizationLevel.Function</c>, and in Azure the
/// page sends the function key it was opened with (<c>?code=</c>) on each API call.
/// </summary>
public sealed class DashboardFunctions
{
    [Function("Dashboard")]
    public Task ServeAsync([HttpTrigger(AuthorizationLevel.Anonymous, "get", Route = "{*path}")] HttpRequest request) =>
        DashboardFiles.Serve(request.Path.Value ?? "/", request.Headers.IfNoneMatch.ToString()).ExecuteAsync(request.HttpContext);
}
