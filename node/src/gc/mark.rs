//! Partitions of the blob id space: the collector marks and sweeps one
//! partition at a time, so its memory is bounded by the partition's size,
//! not by the index's.

use crate::meta::types::{Id32, RefSegment};

/// Most index entries one partition should hold (its live set is a hash
/// set of at most that many ids: tens of MiB).
pub const PARTITION_ENTRIES_MAX: u64 = 1_000_000;

/// Partitions are cut on the ids' two leading bytes: at most this many.
const PREFIX_SPACE: u64 = 1 << 16;

/// One id range `lo <= id < hi` (`hi` `None`: to the end of the space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub lo: Id32,
    pub hi: Option<Id32>,
}

impl Partition {
    /// The whole id space.
    pub const WHOLE: Partition = Partition {
        lo: [0; 32],
        hi: None,
    };

    pub fn contains(&self, id: &Id32) -> bool {
        *id >= self.lo && self.hi.is_none_or(|hi| *id < hi)
    }

    /// Whether a reference segment lists ids that may fall in this range.
    pub fn overlaps(&self, segment: &RefSegment) -> bool {
        segment.last >= self.lo && self.hi.is_none_or(|hi| segment.first < hi)
    }
}

/// How many partitions keep each under [`PARTITION_ENTRIES_MAX`] entries,
/// for an index of `entries` (ids are uniform hashes, so an even split of
/// the id space splits the entries evenly).
pub fn partition_count(entries: u64) -> u64 {
    entries
        .div_ceil(PARTITION_ENTRIES_MAX)
        .clamp(1, PREFIX_SPACE)
}

/// `count` ranges covering the whole id space in order, without gap or
/// overlap, cut evenly on the two leading bytes.
pub fn partitions(count: u64) -> Vec<Partition> {
    let count = count.clamp(1, PREFIX_SPACE);
    let bound = |i: u64| {
        let prefix = (i * PREFIX_SPACE / count) as u16;
        let mut id = [0u8; 32];
        id[..2].copy_from_slice(&prefix.to_be_bytes());
        id
    };
    (0..count)
        .map(|i| Partition {
            lo: bound(i),
            hi: (i + 1 < count).then(|| bound(i + 1)),
        })
        .collect()
}

/// The id right after `id`, or `None` after the last one.
pub fn next_id(id: &Id32) -> Option<Id32> {
    let mut next = *id;
    for byte in next.iter_mut().rev() {
        if *byte == u8::MAX {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(next);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers_without_gap_or_overlap(parts: &[Partition]) {
        assert_eq!(parts[0].lo, [0u8; 32], "starts at the first id");
        assert_eq!(
            parts.last().map(|p| p.hi),
            Some(None),
            "ends at the last id"
        );
        for pair in parts.windows(2) {
            assert_eq!(pair[0].hi, Some(pair[1].lo), "no gap, no overlap");
            assert!(pair[0].lo < pair[1].lo, "ascending and non-empty");
        }
    }

    #[test]
    fn partitions_cover_the_id_space_exactly() {
        for count in [1, 2, 3, 7, 255, 256, 1000, 65_535, 65_536, 100_000] {
            let parts = partitions(count);
            assert_eq!(parts.len() as u64, count.min(PREFIX_SPACE));
            covers_without_gap_or_overlap(&parts);
        }
        // Every id lands in exactly one partition.
        let parts = partitions(7);
        for n in 0..=255u8 {
            let mut id = [n; 32];
            id[1] = n.wrapping_mul(31);
            assert_eq!(parts.iter().filter(|p| p.contains(&id)).count(), 1);
        }
        assert_eq!(parts.iter().filter(|p| p.contains(&[0xff; 32])).count(), 1);
    }

    #[test]
    fn partition_count_bounds_each_partition() {
        assert_eq!(partition_count(0), 1);
        assert_eq!(partition_count(PARTITION_ENTRIES_MAX), 1);
        assert_eq!(partition_count(PARTITION_ENTRIES_MAX + 1), 2);
        assert_eq!(partition_count(u64::MAX), PREFIX_SPACE);
    }

    #[test]
    fn segments_overlap_the_partitions_their_ids_span() {
        let parts = partitions(4);
        let mut first = [0u8; 32];
        first[0] = 0x30;
        let mut last = [0u8; 32];
        last[0] = 0x90;
        let segment = RefSegment {
            blob: [1; 32],
            first,
            last,
            count: 2,
        };
        let hits: Vec<bool> = parts.iter().map(|p| p.overlaps(&segment)).collect();
        assert_eq!(hits, vec![true, true, true, false]);
    }

    #[test]
    fn next_id_carries() {
        let mut id = [0u8; 32];
        id[31] = 0xff;
        let mut expected = [0u8; 32];
        expected[30] = 1;
        assert_eq!(next_id(&id), Some(expected));
        assert_eq!(next_id(&[0xff; 32]), None);
    }
}
