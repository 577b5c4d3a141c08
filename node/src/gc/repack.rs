//! The node-made pack that repacking writes (docs/format.md, "Repacked
//! packs"): the live blobs of an old pack copied back to back, as they
//! were stored (still sealed by the client; the node cannot read them),
//! then a plain trailer listing where each is.
//!
//! ```text
//! blob bytes ... | count × (id:32 | offset:u64 LE | length:u32 LE) | count:u32 LE | "CAIRNRP1"
//! ```
//! The pack id is the blake3 hash of the whole, as for client packs.

use crate::meta::types::{BlobLocation, Id32};

/// Magic closing a repacked pack.
pub const REPACK_MAGIC: [u8; 8] = *b"CAIRNRP1";
const ENTRY_LEN: usize = 32 + 8 + 4;

/// A repacked pack: its bytes, id and the new location of every blob.
pub struct Repacked {
    pub id: Id32,
    pub bytes: Vec<u8>,
    pub locations: Vec<(Id32, BlobLocation)>,
}

/// Builds a repacked pack from `(blob id, blob bytes)`, in the order given.
pub fn build(blobs: &[(Id32, Vec<u8>)]) -> Repacked {
    let body: usize = blobs.iter().map(|(_, b)| b.len()).sum();
    let mut bytes = Vec::with_capacity(body + blobs.len() * ENTRY_LEN + 12);
    let mut entries = Vec::with_capacity(blobs.len());
    for (id, blob) in blobs {
        entries.push((*id, bytes.len() as u64, blob.len() as u32));
        bytes.extend_from_slice(blob);
    }
    for (id, offset, length) in &entries {
        bytes.extend_from_slice(id);
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&length.to_le_bytes());
    }
    bytes.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&REPACK_MAGIC);
    let id = *blake3::hash(&bytes).as_bytes();
    let locations = entries
        .into_iter()
        .map(|(blob, offset, length)| {
            (
                blob,
                BlobLocation {
                    pack_id: id,
                    offset,
                    length,
                },
            )
        })
        .collect();
    Repacked {
        id,
        bytes,
        locations,
    }
}

/// Reads a repacked pack's trailer back: `(id, offset, length)` per blob;
/// `None` if the bytes are not one.
pub fn trailer(bytes: &[u8]) -> Option<Vec<(Id32, u64, u32)>> {
    let magic_at = bytes.len().checked_sub(REPACK_MAGIC.len())?;
    if bytes[magic_at..] != REPACK_MAGIC {
        return None;
    }
    let count_at = magic_at.checked_sub(4)?;
    let count = u32::from_le_bytes(bytes[count_at..magic_at].try_into().ok()?) as usize;
    let start = count_at.checked_sub(count.checked_mul(ENTRY_LEN)?)?;
    let out = bytes[start..count_at]
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let id: Id32 = e[..32].try_into().ok()?;
            let offset = u64::from_le_bytes(e[32..40].try_into().ok()?);
            let length = u32::from_le_bytes(e[40..44].try_into().ok()?);
            (offset + u64::from(length) <= start as u64).then_some((id, offset, length))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repacked_pack_lists_its_blobs_where_they_are() {
        let blobs = vec![([1u8; 32], vec![7u8; 10]), ([2u8; 32], vec![9u8; 3])];
        let pack = build(&blobs);
        assert_eq!(pack.id, *blake3::hash(&pack.bytes).as_bytes());
        for ((id, data), (loc_id, loc)) in blobs.iter().zip(&pack.locations) {
            assert_eq!(id, loc_id);
            assert_eq!(loc.pack_id, pack.id);
            let at = loc.offset as usize;
            assert_eq!(&pack.bytes[at..at + loc.length as usize], data.as_slice());
        }
        assert_eq!(
            trailer(&pack.bytes),
            Some(vec![([1u8; 32], 0, 10), ([2u8; 32], 10, 3)])
        );
        assert_eq!(trailer(&pack.bytes[1..]), None);
    }
}
