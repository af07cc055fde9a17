using Pipeline.Bench;

// dotnet run -c Release --project bench/Pipeline.Bench -- ingest [sizeMB ...]        (default: 64 256)
// dotnet run -c Release --project bench/Pipeline.Bench -- preprocess [records]      (default: 200000)
// dotnet run -c Release --project bench/Pipeline.Bench -- preprocess-scale [records ...] (default: 1000000 10000000; a child process per partition)
// dotnet run -c Release --project bench/Pipeline.Bench -- generate-scale <records> <path> (the scale benchmark's records as a file to ingest)
// dotnet run -c Release --project bench/Pipeline.Bench -- neardup [records ...]     (default: 10000 100000 1000000)
// dotnet run -c Release --project bench/Pipeline.Bench -- infer [real] [rows]       (default: 20000; real: the pretrained MiniLM classifier)
// dotnet run -c Release --project bench/Pipeline.Bench -- finetune ['{fineTune json}']  (the real encoder: the starter all-MiniLM-L6-v2)
// dotnet run -c Release --project bench/Pipeline.Bench -- finetune generated ['{json}'] (the generated bag-of-embeddings base)
// dotnet run -c Release --project bench/Pipeline.Bench -- quantize [rows]              (default: 20000; int8 vs fp32 on the real MiniLM classifier)
// Stages block pool threads in Parallel.For while their uploads need pool threads to complete: start with enough.
ThreadPool.GetMinThreads(out var workers, out var io);
ThreadPool.SetMinThreads(Math.Max(workers, Environment.ProcessorCount * 4), io);
var mode = args.Length > 0 ? args[0] : "ingest";
var numbers = mode is "finetune" or "preprocess-scale-partition" or "generate-scale" ? [] : args.Skip(1).Where(a => a != "real").Select(int.Parse).ToArray();
switch (mode)
{
    case "ingest":
        await IngestionBench.RunAsync(numbers.Length > 0 ? numbers : [64, 256]);
        break;
    case "preprocess":
        await PreprocessingBench.RunAsync(numbers.Length > 0 ? numbers[0] : 200_000);
        break;
    case "preprocess-scale":
        await PreprocessScaleBench.RunAsync(numbers.Length > 0 ? numbers : [1_000_000, 10_000_000]);
        break;
    case "generate-scale":
        PreprocessScaleBench.GenerateFile(int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture), args[2]);
        break;
    case "preprocess-scale-partition":
        await PreprocessScaleBench.PartitionAsync(args[1..]);
        break;
    case "neardup":
        NearDuplicateBench.Run(numbers.Length > 0 ? numbers : [10_000, 100_000, 1_000_000]);
        break;
    case "infer":
        await InferenceBench.RunAsync(numbers.Length > 0 ? numbers[0] : 20_000, real: args.Length > 1 && args[1] == "real");
        break;
    case "quantize":
        await QuantizeBench.RunAsync(numbers.Length > 0 ? numbers[0] : 20_000);
        break;
    case "finetune":
        var generated = args.Length > 1 && args[1] == "generated";
        await FineTuneBench.RunAsync(args.Skip(generated ? 2 : 1).FirstOrDefault(), generated);
        break;
    default:
        Console.Error.WriteLine("usage: Pipeline.Bench ingest|preprocess|preprocess-scale|neardup|infer [real] [numbers] | finetune [generated] ['{json}']");
        return 2;
}

return 0;
