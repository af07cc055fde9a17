using Azure;
using Azure.Storage.Queues;
using Azure.Storage.Queues.Models;
using Microsoft.Extensions.Logging;
using Pipeline.Hosting;
using Pipeline.LocalHost.Worker;
using Pipeline.Storage;

namespace Pipeline.LocalHost.Triggers;

/// <summary>
/// Local host mode's queue trigger for one function, with the WebJobs <c>QueueListener</c> semantics:
/// fetch <c>batchSize</c> messages, fetch again when in-flight work drops to <c>newBatchThreshold</c>,
/// randomized exponential back-off up to <c>maxPollingInterval</c> while the queue is empty, failed
/// messages become visible again after <c>visibilityTimeout</c>, and after <c>maxDequeueCount</c>
/// attempts a message is moved to <c>&lt;queue&gt;-poison</c>. Each message is one FunctionRpc invocation
/// of the worker, with the input and trigger metadata the queue extension sends (<see cref="QueueTriggerData"/>).
/// </summary>
public sealed class QueueListener(
    IndexedFunction function,
    QueueClient queue,
    QueueClient poisonQueue,
    QueuesOptions options,
    TimeSpan messageLease,
    WorkerSupervisor workers,
    ILogger logger)
{
    private static readonly TimeSpan MinimumPollingInterval = TimeSpan.FromMilliseconds(100);
    private readonly SemaphoreSlim _workDone = new(0);
    private int _inFlight;

    public async Task RunAsync(CancellationToken stopping)
    {
        await queue.CreateIfNotExistsAsync(cancellationToken: stopping);
        await poisonQueue.CreateIfNotExistsAsync(cancellationToken: stopping);
        var delay = MinimumPollingInterval;
        var running = new List<Task>();
        while (!stopping.IsCancellationRequested)
        {
            if (Volatile.Read(ref _inFlight) > options.EffectiveNewBatchThreshold)
            {
                await _workDone.WaitAsync(stopping);
                continue;
            }

            QueueMessage[] messages;
            try
            {
                messages = (await queue.ReceiveMessagesAsync(options.BatchSize, messageLease, stopping)).Value;
            }
            catch (Exception e) when (e is RequestFailedException or HttpRequestException && !stopping.IsCancellationRequested)
            {
                logger.LogWarning(e, "Polling {Queue} failed; retrying", queue.Name);
                messages = [];
            }

            if (messages.Length == 0)
            {
                await Task.Delay(delay, stopping).ContinueWith(_ => { }, TaskScheduler.Default);
                delay = NextDelay(delay);
                continue;
            }

            delay = MinimumPollingInterval;
            running.RemoveAll(t => t.IsCompleted);
            foreach (var message in messages)
            {
                Interlocked.Increment(ref _inFlight);
                running.Add(Task.Run(() => ProcessAsync(message, stopping), CancellationToken.None));
            }
        }

        await Task.WhenAll(running).ContinueWith(_ => { }, TaskScheduler.Default);
    }

    /// <summary>Randomized exponential back-off, as the Functions host's queue listener.</summary>
    private TimeSpan NextDelay(TimeSpan current)
    {
        var next = current * 2 * (0.8 + Random.Shared.NextDouble() * 0.4);
        return next > options.MaxPollingInterval ? options.MaxPollingInterval : next;
    }

    private async Task ProcessAsync(QueueMessage message, CancellationToken stopping)
    {
        var popReceipt = message.PopReceipt;
        using var renewal = CancellationTokenSource.CreateLinkedTokenSource(stopping);
        try
        {
            if (message.DequeueCount > options.MaxDequeueCount)
            {
                // Already failed maxDequeueCount times (e.g. the process died while handling it).
                await MoveToPoisonAsync(message, popReceipt);
                return;
            }

            var keepAlive = KeepInvisibleAsync(message, () => popReceipt, r => popReceipt = r, renewal.Token);
            var succeeded = await InvokeAsync(message, stopping);
            await renewal.CancelAsync();
            await keepAlive;
            if (succeeded)
            {
                await queue.DeleteMessageAsync(message.MessageId, popReceipt, CancellationToken.None);
            }
            else if (message.DequeueCount >= options.MaxDequeueCount)
            {
                await MoveToPoisonAsync(message, popReceipt);
            }
            else
            {
                await queue.UpdateMessageAsync(message.MessageId, popReceipt, visibilityTimeout: options.VisibilityTimeout, cancellationToken: CancellationToken.None);
            }
        }
        catch (Exception e) when (stopping.IsCancellationRequested || e is RequestFailedException)
        {
            // Stopping, or the message was lost to another listener: it becomes visible again by itself.
            logger.LogDebug(e, "Message {MessageId} on {Queue} left for redelivery", message.MessageId, queue.Name);
        }
        finally
        {
            Interlocked.Decrement(ref _inFlight);
            _workDone.Release();
        }
    }

    private async Task<bool> InvokeAsync(QueueMessage message, CancellationToken stopping)
    {
        try
        {
            var response = await workers.InvokeAsync(QueueTriggerData.Invocation(function, message), stopping);
            if (response.Result.Status == Rpc.StatusResult.Types.Status.Success)
            {
                return true;
            }

            logger.LogWarning("Function {Function} failed on message {MessageId} (attempt {Attempt} of {Max}): {Exception}",
                function.Name, message.MessageId, message.DequeueCount, options.MaxDequeueCount, response.Result.Exception?.Message ?? response.Result.Result);
            return false;
        }
        catch (WorkerUnavailableException e)
        {
            logger.LogWarning("Function {Function} did not run message {MessageId} to the end (attempt {Attempt} of {Max}): {Reason}",
                function.Name, message.MessageId, message.DequeueCount, options.MaxDequeueCount, e.Message);
            return false;
        }
    }

    private async Task KeepInvisibleAsync(QueueMessage message, Func<string> popReceipt, Action<string> setPopReceipt, CancellationToken cancellationToken)
    {
        try
        {
            while (true)
            {
                await Task.Delay(messageLease / 2, cancellationToken);
                var receipt = await queue.UpdateMessageAsync(message.MessageId, popReceipt(), visibilityTimeout: messageLease, cancellationToken: cancellationToken);
                setPopReceipt(receipt.Value.PopReceipt);
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    private async Task MoveToPoisonAsync(QueueMessage message, string popReceipt)
    {
        await poisonQueue.SendMessageAsync(message.Body.ToString(), CancellationToken.None);
        await queue.DeleteMessageAsync(message.MessageId, popReceipt, CancellationToken.None);
        logger.LogWarning("Message {MessageId} moved to {PoisonQueue} after {Attempts} attempts", message.MessageId, poisonQueue.Name, message.DequeueCount);
    }
}
