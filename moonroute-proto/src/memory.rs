//! Keeping long-lived collections proportional to what they hold.
//!
//! A burst (a call spike, a registration storm) grows an event loop's maps and heaps, and
//! `HashMap`/`BinaryHeap` never give room back by themselves: the room would stay allocated,
//! idle, long after the burst, and RSS with it. The loops call these after removing entries.

use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, Hash};

/// Collections with room for fewer than this many entries are left alone: shrinking them
/// would save little and churn a lot.
pub const SHRINK_ABOVE: usize = 256;

/// Gives `map`'s room back once it is a quarter full, keeping room for twice what is left
/// (so the next entries do not rehash at once). The quarter threshold makes the rehash cost
/// O(1) per removal on average.
pub fn shrink_if_sparse<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > SHRINK_ABOVE && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// [`shrink_if_sparse`] for a heap (a timer queue).
pub fn shrink_heap_if_sparse<T: Ord>(heap: &mut BinaryHeap<T>) {
    if heap.capacity() > SHRINK_ABOVE && heap.len() < heap.capacity() / 4 {
        heap.shrink_to(heap.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_emptied_after_a_burst_gives_its_room_back_and_a_small_one_is_left_alone() {
        let mut map: HashMap<u32, [u8; 64]> = (0..10_000).map(|i| (i, [0; 64])).collect();
        let peak = map.capacity();
        for i in 0..9_990 {
            map.remove(&i);
            shrink_if_sparse(&mut map);
        }
        assert!(
            map.capacity() <= SHRINK_ABOVE,
            "{} of {peak}",
            map.capacity()
        );
        assert_eq!(map.len(), 10);
        let mut small: HashMap<u32, u8> = (0..200).map(|i| (i, 0)).collect();
        small.retain(|&k, _| k < 2);
        shrink_if_sparse(&mut small);
        // (`capacity` counts the slots removals left as tombstones out, so it moved anyway;
        // a shrink would have brought it down to a handful.)
        assert!(small.capacity() > 64, "{}", small.capacity());

        let mut heap: BinaryHeap<u64> = (0..10_000).collect();
        while heap.len() > 10 {
            heap.pop();
            shrink_heap_if_sparse(&mut heap);
        }
        assert!(heap.capacity() <= SHRINK_ABOVE, "{}", heap.capacity());
    }
}
