using Pipeline.Preprocessing;

namespace Pipeline.Tests.Preprocessing;

/// <summary>The exact-dedup table agrees with a dictionary, through growth and keys built to collide.</summary>
public sealed class KeyTableTests
{
    [Theory]
    [InlineData(0)]
    [InlineData(1_000)]
    [InlineData(200_000)]
    public void Answers_as_a_dictionary_does(int expected)
    {
        var random = new Random(7);
        var table = new KeyTable(expected);
        var reference = new Dictionary<ulong, int>();
        // Random keys, repeats of earlier ones, key 0, and keys that differ only in their top or bottom bits.
        var keys = Enumerable.Range(0, 150_000).Select(i => (i % 5) switch
        {
            0 => (ulong)random.NextInt64() * 2,
            1 => (ulong)i << 40,
            2 => (ulong)i,
            3 => 0UL,
            _ => (ulong)random.Next(1_000),
        }).ToList();
        for (var i = 0; i < keys.Count; i++)
        {
            var present = table.TryGetOrAdd(keys[i], i, out var value);
            Assert.Equal(reference.TryGetValue(keys[i], out var first), present);
            if (present)
            {
                Assert.Equal(first, value);
            }
            else
            {
                reference[keys[i]] = i;
                Assert.Equal(i, value);
            }
        }

        Assert.Equal(reference.Count, table.Count);
    }
}
