using System.Text;
using System.Text.Json;

namespace Pipeline.Ingestion;

/// <summary>
/// Counts records per label from the label's bytes, allocating only when a new label appears (labels are
/// few; records are many). At most <see cref="MaxLabels"/> distinct labels are counted.
/// </summary>
public sealed class LabelCounter(bool jsonEncoded)
{
    public const int MaxLabels = 1000;
    private readonly List<(byte[] Key, long Count)> _labels = [];
    private int _last;

    public void Add(ReadOnlySpan<byte> label)
    {
        if (_last < _labels.Count && label.SequenceEqual(_labels[_last].Key))
        {
            _labels[_last] = (_labels[_last].Key, _labels[_last].Count + 1);
            return;
        }

        for (var i = 0; i < _labels.Count; i++)
        {
            if (label.SequenceEqual(_labels[i].Key))
            {
                _labels[i] = (_labels[i].Key, _labels[i].Count + 1);
                _last = i;
                return;
            }
        }

        if (_labels.Count < MaxLabels)
        {
            _labels.Add((label.ToArray(), 1));
            _last = _labels.Count - 1;
        }
    }

    /// <summary>Counts by label text (JSON labels unescaped; <c>"1"</c> and <c>1</c> are both shown as 1).</summary>
    public Dictionary<string, long> ToDictionary()
    {
        var counts = new Dictionary<string, long>();
        foreach (var (key, count) in _labels)
        {
            var text = jsonEncoded && key.Length > 0 && key[0] == (byte)'"' ? JsonSerializer.Deserialize<string>(key)! : Encoding.UTF8.GetString(key);
            counts[text] = counts.GetValueOrDefault(text) + count;
        }

        return counts;
    }
}
