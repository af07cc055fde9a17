using System.CommandLine;
using Pipeline.Inference;
using Pipeline.Models;
using Pipeline.Models.Quantization;
using Spectre.Console;

namespace Pipeline.Cli;

/// <summary><c>pipeline models quantize &lt;modelId&gt;</c>: a dynamic int8 copy of a registered model, measured against it.</summary>
public static class QuantizeCommand
{
    public static Command Create()
    {
        var id = new Argument<string>("modelId") { Description = "The registered fp32 model to quantize." };
        // --output is the global output format (table/json), so the new id has its own name.
        var output = new Option<string?>("--output-model") { Description = $"The int8 model's id (default: <modelId>{ModelQuantizer.DefaultSuffix})." };
        var validation = new Option<string?>("--validation") { Description = "The prepared dataset whose validation split measures the agreement (datasets/<datasetId>/prepared/<preparedId>/manifest.json; default: the one the model was trained on)." };
        var perTensor = new Option<bool>("--per-tensor") { Description = "One scale per weight matrix instead of one per output channel." };
        var signed = new Option<bool>("--signed") { Description = "int8 weights in a 7-bit range (ONNX Runtime's faster uint8 x int8 kernel) instead of uint8 weights around 128." };
        var fullRange = new Option<bool>("--full-range") { Description = "With --signed: 8-bit weights ([-127, 127]); the 7-bit default avoids the 16-bit saturation of AVX2 CPUs without VNNI." };
        var command = new Command("quantize", "Write a dynamic int8 copy of a model (MatMul/Gemm weights int8, activations quantized at run time) with its agreement on the validation split in model.json.")
        {
            id, output, validation, perTensor, signed, fullRange,
        };
        command.SetAction(async (parse, ct) =>
        {
            var storage = CliOptions.Storage(parse);
            var quantizer = new ModelQuantizer(storage, new InferenceSettings());
            ModelManifest manifest;
            try
            {
                manifest = await quantizer.QuantizeAsync(parse.GetValue(id)!, parse.GetValue(output), parse.GetValue(validation),
                    new QuantizationOptions { PerChannel = !parse.GetValue(perTensor), ReduceRange = !parse.GetValue(fullRange), UnsignedWeights = !parse.GetValue(signed) }, ct);
            }
            catch (QuantizationRejectedException e)
            {
                return CliOptions.Fail($"{e.Message} ({e.Code})", e.Code == QuantizationErrorCodes.ModelNotFound ? CliOptions.ExitCodes.NotFound : CliOptions.ExitCodes.UsageError);
            }

            if (CliOptions.Json(parse))
            {
                CliOptions.WriteJson(new List<ModelManifest> { manifest }, ModelJson.Default.ListModelManifest);
                return CliOptions.ExitCodes.Succeeded;
            }

            var q = manifest.Quantization!;
            AnsiConsole.MarkupLineInterpolated($"Wrote [bold]{manifest.ModelId}[/]: {q.Scheme} of {q.SourceModel}, {q.QuantizedNodes.Count} MatMul/Gemm weights int8 ({q.FloatMatMuls.Count} activation MatMuls kept fp32), {q.SourceBytes / 1e6:N1} MB -> {q.QuantizedBytes / 1e6:N1} MB.");
            AnsiConsole.MarkupLineInterpolated($"Agreement on {q.Agreement.Rows:N0} validation rows: {Describe(q.Agreement)}.");
            return CliOptions.ExitCodes.Succeeded;
        });
        return command;
    }

    /// <summary>The agreement in one phrase, for the CLI's tables.</summary>
    public static string Describe(QuantizationAgreement a) => a.QuantizedAccuracy is { } accuracy
        ? $"accuracy {accuracy:P1} vs {a.SourceAccuracy:P1} ({a.AccuracyPoints:+0.0;-0.0;0.0} points), {a.LabelChangedFraction:P1} of labels changed, cosine {a.MeanCosine:N4}"
        : $"mean cosine {a.MeanCosine:N4} (min {a.MinCosine:N4})";
}
