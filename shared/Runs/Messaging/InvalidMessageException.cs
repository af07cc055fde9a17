namespace Pipeline.Messaging;

/// <summary>A message that can never succeed (malformed, or naming something that does not exist): recorded, never retried.</summary>
public sealed class InvalidMessageException(string message) : Exception(message);
