using Pipeline.Runs;

namespace Pipeline.Preprocessing;

public static class PreprocessErrorCodes
{
    public const string InvalidRecipe = "InvalidRecipe";
    public const string DatasetNotFound = "DatasetNotFound";
    public const string MissingTokenizerFiles = "MissingTokenizerFiles";
    public const string InvalidTokenizerFiles = "InvalidTokenizerFiles";
    public const string NoRecordsLeft = "NoRecordsLeft";
    public const string ValidationReportFailed = "ValidationReportFailed";
}

/// <summary>A permanent problem (bad recipe, missing dataset or tokenizer files): the run fails with this code, no retry.</summary>
public sealed class PreprocessingRejectedException(string code, string message) : StageRejectedException(code, message);
