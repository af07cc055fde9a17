namespace Pipeline.Preprocessing;

/// <summary>
/// The exact-dedup table: 64-bit record keys (already uniform hashes) to a non-negative int, in one array of
/// key/value pairs probed linearly, so a lookup or an insert touches one cache line where a
/// <see cref="Dictionary{TKey, TValue}"/> touches its bucket and then its entry. At most half full.
/// </summary>
public sealed class KeyTable
{
    private struct Slot
    {
        public ulong Key;
        /// <summary>The value plus one; zero marks an empty slot.</summary>
        public int Stored;
    }

    private Slot[] _slots;

    /// <summary>A table that holds <paramref name="expected"/> keys without growing.</summary>
    public KeyTable(int expected)
    {
        var capacity = 16;
        while (capacity < 2L * expected)
        {
            capacity *= 2;
        }

        _slots = new Slot[capacity];
    }

    public int Count { get; private set; }

    /// <summary>
    /// The value of <paramref name="key"/> when it is already present (true), else adds it with
    /// <paramref name="value"/> (false).
    /// </summary>
    public bool TryGetOrAdd(ulong key, int value, out int existing)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(value);
        var slots = _slots;
        var mask = slots.Length - 1;
        var i = Home(slots, key);
        while (true)
        {
            ref var slot = ref slots[i];
            if (slot.Stored == 0)
            {
                slot.Key = key;
                slot.Stored = value + 1;
                existing = value;
                if (++Count * 2 > slots.Length)
                {
                    Grow();
                }

                return false;
            }

            if (slot.Key == key)
            {
                existing = slot.Stored - 1;
                return true;
            }

            i = (i + 1) & mask;
        }
    }

    /// <summary>
    /// Brings <paramref name="key"/>'s first slot into this core's cache ahead of <see cref="TryGetOrAdd"/>: a
    /// worker touches it when it computes the key, a batch before the commit looks it up. Safe beside a
    /// concurrent insert or growth (a read of whichever array is current; nothing is written).
    /// </summary>
    public void Touch(ulong key)
    {
        var slots = Volatile.Read(ref _slots);
        _ = Volatile.Read(ref slots[Home(slots, key)].Stored);
    }

    /// <summary>The first slot to probe: the key's top bits after a Fibonacci multiply, so keys that share their low bits still spread.</summary>
    private static int Home(Slot[] slots, ulong key) => (int)((key * 0x9E3779B97F4A7C15UL) >> (64 - int.Log2(slots.Length)));

    private void Grow()
    {
        var old = _slots;
        var slots = new Slot[old.Length * 2];
        var mask = slots.Length - 1;
        foreach (var slot in old)
        {
            if (slot.Stored != 0)
            {
                var i = Home(slots, slot.Key);
                while (slots[i].Stored != 0)
                {
                    i = (i + 1) & mask;
                }

                slots[i] = slot;
            }
        }

        _slots = slots;
    }
}
