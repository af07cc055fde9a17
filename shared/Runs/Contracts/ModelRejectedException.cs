namespace Pipeline.Models;

/// <summary>A model folder that cannot be used; the message says what is missing or wrong.</summary>
public sealed class ModelRejectedException(string message) : Exception(message);
