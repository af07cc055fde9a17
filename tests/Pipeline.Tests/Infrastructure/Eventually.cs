using System.Diagnostics;

namespace Pipeline.Tests.Infrastructure;

public static class Eventually
{
    /// <summary>Polls <paramref name="condition"/> until it returns a value, or fails the test with <paramref name="what"/>.</summary>
    public static async Task<T> ReturnsAsync<T>(Func<Task<T?>> condition, TimeSpan timeout, string what, Func<string>? diagnostics = null)
        where T : class
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            if (await condition() is { } value)
            {
                return value;
            }

            if (clock.Elapsed > timeout)
            {
                throw new TimeoutException($"Timed out after {timeout.TotalSeconds:N0} s waiting for {what}.{(diagnostics is null ? "" : "\n" + diagnostics())}");
            }

            await Task.Delay(200);
        }
    }
}
