//! `check --read-data-subset N/M`: which packs one slice of a check reads.
//!
//! Pure: a pack belongs to exactly one of M slices by a stable rule on its
//! id, so M runs with N = 1..=M read every pack's shards once (a month of
//! daily `auto/30` checks reads everything), and the same pack is always in
//! the same slice whatever else the cluster holds. The rule is restic's
//! idea with a uniform split: the first 8 bytes of the id as a big-endian
//! u64, times M, shifted right 64 bits, is the 0-based slice. Pack ids are
//! blake3 hashes, so the slices are near equal in size.

use super::{GatewayError, invalid};

/// A slice of the packs: `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slice {
    pub index: u32,
    pub count: u32,
}

impl Slice {
    /// The slice a request asks for: `None` for every pack (count 0), an
    /// error when the index is outside 1..=count.
    pub fn from_request(index: u32, count: u32) -> Result<Option<Slice>, GatewayError> {
        if count == 0 {
            return if index == 0 {
                Ok(None)
            } else {
                Err(invalid(format!(
                    "subset_index {index} without a subset_count"
                )))
            };
        }
        if index == 0 || index > count {
            return Err(invalid(format!(
                "data subset {index}/{count}: the slice must lie in 1..={count}"
            )));
        }
        Ok(Some(Slice { index, count }))
    }

    /// Whether the pack `id` lies in this slice.
    pub fn holds(&self, id: &[u8; 32]) -> bool {
        slice_of(id, self.count) == self.index
    }
}

/// The 1-based slice of `count` that pack `id` lies in.
pub(super) fn slice_of(id: &[u8; 32], count: u32) -> u32 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&id[..8]);
    let prefix = u128::from(u64::from_be_bytes(head));
    ((prefix * u128::from(count)) >> 64) as u32 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every pack lies in exactly one slice of M, and it is the slice
        /// `slice_of` names.
        #[test]
        fn slices_partition_the_packs(id in any::<[u8; 32]>(), count in 1u32..100) {
            let holding: Vec<u32> = (1..=count)
                .filter(|&index| Slice { index, count }.holds(&id))
                .collect();
            prop_assert_eq!(holding, vec![slice_of(&id, count)]);
        }
    }

    #[test]
    fn the_rule_splits_the_id_space_evenly_and_stably() {
        let mut low = [0u8; 32];
        assert_eq!(slice_of(&low, 30), 1);
        low[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(slice_of(&low, 30), 30);
        // Half-way through the id space is the first pack of slice 2 of 2.
        let mut half = [0u8; 32];
        half[0] = 0x80;
        assert_eq!(slice_of(&half, 2), 2);
        half[0] = 0x7f;
        half[1..8].fill(0xff);
        assert_eq!(slice_of(&half, 2), 1);
        assert_eq!(slice_of(&half, 1), 1);
    }

    #[test]
    fn a_slice_outside_its_count_is_refused() {
        assert_eq!(Slice::from_request(0, 0).expect("all"), None);
        assert_eq!(
            Slice::from_request(3, 30).expect("slice"),
            Some(Slice {
                index: 3,
                count: 30
            })
        );
        for (index, count) in [(0, 30), (31, 30), (2, 0)] {
            assert!(
                Slice::from_request(index, count).is_err(),
                "{index}/{count}"
            );
        }
    }
}
