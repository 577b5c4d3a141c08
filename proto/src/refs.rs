//! Reference lists: the blob ids a snapshot references, in plaintext, so
//! that the metadata group can tell live blobs from garbage without the
//! tenant's key. Blob ids are keyed hashes: a node learns which opaque ids a
//! snapshot uses, never what they hold.
//!
//! A list is sorted, without duplicates, and split into segments of at most
//! [`SEGMENT_IDS_MAX`] ids. A segment is stored as a blob (unsealed) and
//! named by an unkeyed hash of its bytes, so a node can check what it reads:
//! ```text
//! "CAIRNRF1" | count: u32 LE | count × 32-byte id (strictly ascending)
//! ```

use crate::v1 as pb;

/// Magic opening every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CAIRNRF1";
/// Most ids in one segment (2 MiB of ids).
pub const SEGMENT_IDS_MAX: usize = 64 * 1024;
/// blake3 `derive_key` context naming segments.
pub const SEGMENT_ID_CONTEXT: &str = "cairn ref segment v1";

const HEADER_LEN: usize = SEGMENT_MAGIC.len() + 4;

/// Why a segment's bytes are not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentError(pub String);

impl std::fmt::Display for SegmentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reference segment: {}", self.0)
    }
}

impl std::error::Error for SegmentError {}

/// The blob id of a segment's bytes.
pub fn segment_id(bytes: &[u8]) -> [u8; 32] {
    blake3::derive_key(SEGMENT_ID_CONTEXT, bytes)
}

/// One encoded segment and its description for the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub id: [u8; 32],
    pub bytes: Vec<u8>,
    pub first: [u8; 32],
    pub last: [u8; 32],
    pub count: u32,
}

impl Segment {
    /// The wire description sent with the commit.
    pub fn to_wire(&self) -> pb::RefSegment {
        pb::RefSegment {
            blob: self.id.to_vec(),
            first: self.first.to_vec(),
            last: self.last.to_vec(),
            count: self.count,
        }
    }
}

/// Sorts and dedups `ids`, then encodes them as segments.
pub fn build(mut ids: Vec<[u8; 32]>) -> Vec<Segment> {
    ids.sort_unstable();
    ids.dedup();
    ids.chunks(SEGMENT_IDS_MAX)
        .map(|chunk| {
            let mut bytes = Vec::with_capacity(HEADER_LEN + chunk.len() * 32);
            bytes.extend_from_slice(&SEGMENT_MAGIC);
            bytes.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            for id in chunk {
                bytes.extend_from_slice(id);
            }
            Segment {
                id: segment_id(&bytes),
                first: chunk[0],
                last: chunk[chunk.len() - 1],
                count: chunk.len() as u32,
                bytes,
            }
        })
        .collect()
}

/// Decodes a segment, checking it against the blob id it was stored under,
/// its magic, length and order.
pub fn decode(expected_id: &[u8; 32], bytes: &[u8]) -> Result<Vec<[u8; 32]>, SegmentError> {
    if segment_id(bytes) != *expected_id {
        return Err(SegmentError("bytes do not match the segment id".into()));
    }
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| SegmentError("shorter than its header".into()))?;
    if header[..8] != SEGMENT_MAGIC {
        return Err(SegmentError("bad magic".into()));
    }
    let count = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let body = &bytes[HEADER_LEN..];
    if count > SEGMENT_IDS_MAX || body.len() != count * 32 {
        return Err(SegmentError(format!(
            "{} id bytes for a count of {count}",
            body.len()
        )));
    }
    let ids: Vec<[u8; 32]> = body
        .chunks_exact(32)
        .map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            id
        })
        .collect();
    if ids.windows(2).any(|w| w[0] >= w[1]) {
        return Err(SegmentError("ids not strictly ascending".into()));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_sorted_and_deduplicated() {
        let ids: Vec<[u8; 32]> = (0..(SEGMENT_IDS_MAX as u32 + 10))
            .rev()
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .chain([[7u8; 32], [7u8; 32]])
            .collect();
        let segments = build(ids.clone());
        assert_eq!(segments.len(), 2);
        let mut all = Vec::new();
        for s in &segments {
            let decoded = decode(&s.id, &s.bytes).expect("decodes");
            assert_eq!(decoded.first(), Some(&s.first));
            assert_eq!(decoded.last(), Some(&s.last));
            assert_eq!(decoded.len(), s.count as usize);
            all.extend(decoded);
        }
        let mut expected = ids;
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(all, expected);
    }

    #[test]
    fn a_tampered_segment_is_refused() {
        let s = &build(vec![[1u8; 32], [2u8; 32]])[0];
        let mut bytes = s.bytes.clone();
        bytes[20] ^= 1;
        assert!(decode(&s.id, &bytes).is_err());
        assert!(decode(&s.id, &s.bytes[..s.bytes.len() - 1]).is_err());
        // Out of order, even under a matching id.
        let mut swapped = s.bytes.clone();
        swapped[12..44].copy_from_slice(&[2u8; 32]);
        swapped[44..76].copy_from_slice(&[1u8; 32]);
        assert!(decode(&segment_id(&swapped), &swapped).is_err());
    }
}
