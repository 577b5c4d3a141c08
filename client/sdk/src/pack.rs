//! Packs: many encoded blobs stored together (about 16 MiB), the unit the
//! cluster erasure-codes and places.
//!
//! This module owns the pack byte layout: blobs back to back, then a sealed
//! trailer listing every blob (kind, id, offset, length), then the trailer
//! length and a magic. A pack can therefore be re-indexed from its bytes
//! alone with the tenant's key ([`read_pack_index`]), which is the disaster
//! recovery path when all metadata is lost. It does not encode blobs (that
//! is [`crate::seal`]) nor decide which blobs go in a pack (that is the
//! backup pipeline's dedup).
//!
//! Invariants: blob offsets are contiguous from 0 and the blob region ends
//! where the trailer starts; the trailer is authenticated and bound to the
//! pack layout (its associated data holds the blob region's length), so a
//! truncated, extended or tampered pack fails to index; [`Pack::id`] is the
//! unkeyed blake3 of the whole pack, which nodes can check without keys.
//! Readers check every bound before slicing: arbitrary bytes give an error,
//! never a panic.

use std::ops::Range;

use crate::seal::{BlobId, MasterKey, SealError};

/// Size at which a [`PackBuilder`] reports itself full.
pub const PACK_TARGET_BYTES: usize = 16 * 1024 * 1024;

/// Most blobs one pack may hold; far above what a 16 MiB pack of encoded
/// blobs (each at least ~56 bytes) can reach, and a bound for readers.
pub const MAX_BLOBS_PER_PACK: usize = 1 << 20;

/// Magic and version closing every pack.
const PACK_MAGIC: [u8; 7] = *b"CAIRNPK";
const PACK_VERSION: u8 = 1;
const TAIL_LEN: usize = 4 + PACK_MAGIC.len() + 1;
const ENTRY_LEN: usize = 1 + 32 + 8 + 4;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// A file's chunk.
    Data,
    /// An encoded [`crate::tree::Tree`].
    Tree,
    /// A reference-list segment ([`cairn_proto::refs`]): stored UNSEALED,
    /// its bytes as-is, so nodes can read which blobs a snapshot uses
    /// without the tenant's key. Never opened with [`MasterKey::decode_blob`].
    Refs,
}

impl BlobKind {
    fn to_byte(self) -> u8 {
        match self {
            BlobKind::Data => 0,
            BlobKind::Tree => 1,
            BlobKind::Refs => 2,
        }
    }

    /// Whether blobs of this kind are sealed with the tenant's key (data and
    /// trees) or stored in the clear (reference segments, checked with
    /// [`cairn_proto::refs::decode`] instead).
    pub fn is_sealed(self) -> bool {
        !matches!(self, BlobKind::Refs)
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            2 => Some(BlobKind::Refs),
            _ => None,
        }
    }
}

/// Where one blob sits inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PackedBlob {
    /// The blob's id (keyed hash of its plaintext).
    pub id: BlobId,
    /// Data, tree or reference segment (see [`BlobKind::is_sealed`]).
    pub kind: BlobKind,
    /// Byte offset of the encoded blob from the start of the pack.
    pub offset: u64,
    /// Length of the encoded blob in bytes.
    pub length: u32,
}

impl PackedBlob {
    /// The blob's byte range within the pack (saturating, so a corrupt
    /// entry gives a range no pack holds rather than an overflow).
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(u64::from(self.length))
    }
}

/// A finished pack, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    /// blake3 (unkeyed) of `data`: the name nodes store it under.
    pub id: [u8; 32],
    /// The pack's bytes.
    pub data: Vec<u8>,
    /// Every blob in `data`, in order.
    pub blobs: Vec<PackedBlob>,
}

impl Pack {
    /// The encoded bytes of one of this pack's blobs, or `None` if `blob`
    /// lies outside the pack.
    pub fn blob_bytes(&self, blob: &PackedBlob) -> Option<&[u8]> {
        let start = usize::try_from(blob.offset).ok()?;
        let end = start.checked_add(usize::try_from(blob.length).ok()?)?;
        self.data.get(start..end)
    }
}

/// Errors reading a pack's index.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Too short to hold the fixed tail.
    #[error("pack truncated: {len} bytes, the tail alone needs {TAIL_LEN}")]
    Truncated {
        /// Bytes given.
        len: usize,
    },
    /// The pack does not end with the pack magic.
    #[error("not a Cairn pack (bad magic at the end)")]
    BadMagic,
    /// Written by a newer client.
    #[error(
        "pack version {version} is not supported by this client (it reads {PACK_VERSION}); upgrade the client"
    )]
    UnsupportedVersion {
        /// Version byte found.
        version: u8,
    },
    /// The stated trailer length does not fit in the pack.
    #[error("pack trailer length {trailer_len} does not fit in a {pack_len}-byte pack")]
    TrailerOutOfBounds {
        /// Trailer length read from the tail.
        trailer_len: u32,
        /// Pack size.
        pack_len: usize,
    },
    /// The trailer failed to open: wrong key, or the pack was damaged.
    #[error("pack trailer does not open: {source}")]
    Trailer {
        /// The seal error.
        #[source]
        source: SealError,
    },
    /// The decrypted trailer is not a whole number of entries.
    #[error("pack trailer holds {len} bytes, which does not match its count of {count} entries")]
    TrailerSize {
        /// Plaintext length.
        len: usize,
        /// Entry count it claims.
        count: u64,
    },
    /// More blobs than a pack may hold.
    #[error("pack lists {count} blobs, more than the limit of {MAX_BLOBS_PER_PACK}")]
    TooManyBlobs {
        /// Count found.
        count: u64,
    },
    /// A blob kind byte names no known kind.
    #[error("pack entry {index} has unknown blob kind {kind}")]
    UnknownKind {
        /// Entry position.
        index: usize,
        /// Byte found.
        kind: u8,
    },
    /// A blob read as a reference segment is of another kind.
    #[error("blob of kind {kind:?} is not a reference segment")]
    NotRefs {
        /// Kind found.
        kind: BlobKind,
    },
    /// A reference segment's bytes do not check out.
    #[error("reference segment: {reason}")]
    Refs {
        /// What is wrong.
        reason: String,
    },
    /// Entries do not tile the blob region exactly.
    #[error(
        "pack entry {index} at offset {offset} should start at {expected}; entries must be contiguous and end where the trailer starts"
    )]
    Layout {
        /// Entry position (equal to the count when the end is wrong).
        index: usize,
        /// Offset found.
        offset: u64,
        /// Offset expected.
        expected: u64,
    },
}

/// Collects encoded blobs into a pack.
///
/// One builder holds one kind of blob in practice (the backup keeps data,
/// trees and reference segments apart), but the layout allows any mix.
#[derive(Debug)]
pub struct PackBuilder {
    target_bytes: usize,
    data: Vec<u8>,
    blobs: Vec<PackedBlob>,
}

impl PackBuilder {
    /// An empty builder that reports full once `target_bytes` of blobs are in
    /// (usually [`PACK_TARGET_BYTES`]).
    pub fn new(target_bytes: usize) -> Self {
        Self {
            target_bytes,
            // Room for the last chunk past the target and the trailer, so the
            // buffer never doubles (a doubled 16 MiB pack is 32 MiB resident).
            data: Vec::with_capacity(target_bytes.min(PACK_TARGET_BYTES) + 1024 * 1024),
            blobs: Vec::new(),
        }
    }

    /// Append one encoded blob (from [`MasterKey::encode_blob`]).
    ///
    /// The same id may be added twice; avoiding that is the caller's dedup.
    ///
    /// # Panics
    /// If the pack already holds [`MAX_BLOBS_PER_PACK`] blobs or `encoded`
    /// is 4 GiB or more: both mean the caller ignored [`PackBuilder::is_full`]
    /// or passed something that is not an encoded blob.
    pub fn add(&mut self, id: BlobId, kind: BlobKind, encoded: &[u8]) {
        assert!(
            self.blobs.len() < MAX_BLOBS_PER_PACK,
            "pack is over {MAX_BLOBS_PER_PACK} blobs: the caller must finish packs once is_full()"
        );
        let length = u32::try_from(encoded.len())
            .expect("an encoded blob is at most MAX_BLOB_BYTES plus framing, far below 4 GiB");
        self.blobs.push(PackedBlob {
            id,
            kind,
            offset: self.data.len() as u64,
            length,
        });
        self.data.extend_from_slice(encoded);
    }

    /// Number of blobs added so far.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// True if no blob was added.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Bytes of blobs added so far (the finished pack adds the trailer).
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// True once the blobs reach the target size or the node's blob count
    /// per pack: time to [`finish`](Self::finish).
    pub fn is_full(&self) -> bool {
        // Nodes refuse a pack listing more blobs than one Raft entry holds.
        self.data.len() >= self.target_bytes || self.blobs.len() >= cairn_proto::BLOBS_PER_PACK_MAX
    }

    /// Seal the trailer and close the pack.
    pub fn finish(self, key: &MasterKey) -> Result<Pack, SealError> {
        let Self {
            mut data, blobs, ..
        } = self;
        let blob_region_len = data.len() as u64;
        let mut trailer = Vec::with_capacity(4 + blobs.len() * ENTRY_LEN);
        let count = u32::try_from(blobs.len()).expect("add() caps blobs at MAX_BLOBS_PER_PACK");
        trailer.extend_from_slice(&count.to_le_bytes());
        for b in &blobs {
            trailer.push(b.kind.to_byte());
            trailer.extend_from_slice(&b.id);
            trailer.extend_from_slice(&b.offset.to_le_bytes());
            trailer.extend_from_slice(&b.length.to_le_bytes());
        }
        let sealed = key.seal(&trailer, &trailer_aad(blob_region_len));
        let sealed_len = u32::try_from(sealed.len())
            .expect("at most MAX_BLOBS_PER_PACK entries of 45 bytes, far below 4 GiB");
        data.extend_from_slice(&sealed);
        data.extend_from_slice(&sealed_len.to_le_bytes());
        data.extend_from_slice(&PACK_MAGIC);
        data.push(PACK_VERSION);
        let id = *blake3::hash(&data).as_bytes();
        Ok(Pack { id, data, blobs })
    }
}

/// Associated data of the trailer: binds it to this layout and to the
/// length of the blob region it describes, so it cannot be grafted onto
/// another pack of a different size or read at a shifted position.
fn trailer_aad(blob_region_len: u64) -> [u8; 16] {
    let mut aad = [0u8; 16];
    aad[..7].copy_from_slice(&PACK_MAGIC);
    aad[7] = PACK_VERSION;
    aad[8..].copy_from_slice(&blob_region_len.to_le_bytes());
    aad
}

/// Rebuild a pack's blob list from its bytes and the tenant's key.
///
/// Checks the magic, the version, that the trailer authenticates, and that
/// the listed blobs tile the blob region exactly. A caller opening the
/// blobs must skip those whose kind is not [sealed](BlobKind::is_sealed):
/// a reference segment is plaintext and is read with
/// [`read_refs_blob`].
pub fn read_pack_index(key: &MasterKey, data: &[u8]) -> Result<Vec<PackedBlob>, PackError> {
    if data.len() < TAIL_LEN {
        return Err(PackError::Truncated { len: data.len() });
    }
    let tail = &data[data.len() - TAIL_LEN..];
    if tail[4..4 + PACK_MAGIC.len()] != PACK_MAGIC {
        return Err(PackError::BadMagic);
    }
    let version = tail[TAIL_LEN - 1];
    if version != PACK_VERSION {
        return Err(PackError::UnsupportedVersion { version });
    }
    let trailer_len = u32::from_le_bytes(array_at(tail, 0));
    let body_len = data.len() - TAIL_LEN;
    let blob_region_len =
        body_len
            .checked_sub(trailer_len as usize)
            .ok_or(PackError::TrailerOutOfBounds {
                trailer_len,
                pack_len: data.len(),
            })?;
    let sealed = &data[blob_region_len..body_len];
    let plain = key
        .open(sealed, &trailer_aad(blob_region_len as u64))
        .map_err(|source| PackError::Trailer { source })?;

    if plain.len() < 4 {
        return Err(PackError::TrailerSize {
            len: plain.len(),
            count: 0,
        });
    }
    let count = u64::from(u32::from_le_bytes(array_at(&plain, 0)));
    if count > MAX_BLOBS_PER_PACK as u64 {
        return Err(PackError::TooManyBlobs { count });
    }
    if (plain.len() - 4) as u64 != count * ENTRY_LEN as u64 {
        return Err(PackError::TrailerSize {
            len: plain.len(),
            count,
        });
    }
    let mut blobs = Vec::with_capacity(count as usize);
    let mut expected = 0u64;
    for (index, entry) in plain[4..].chunks_exact(ENTRY_LEN).enumerate() {
        let kind = BlobKind::from_byte(entry[0]).ok_or(PackError::UnknownKind {
            index,
            kind: entry[0],
        })?;
        let id: BlobId = array_at(entry, 1);
        let offset = u64::from_le_bytes(array_at(entry, 33));
        let length = u32::from_le_bytes(array_at(entry, 41));
        if offset != expected {
            return Err(PackError::Layout {
                index,
                offset,
                expected,
            });
        }
        expected += u64::from(length);
        blobs.push(PackedBlob {
            id,
            kind,
            offset,
            length,
        });
    }
    if expected != blob_region_len as u64 {
        return Err(PackError::Layout {
            index: blobs.len(),
            offset: expected,
            expected: blob_region_len as u64,
        });
    }
    Ok(blobs)
}

/// The ids a reference-segment blob of a pack lists, checked against its
/// id; refuses a blob of any other kind rather than misreading it.
pub fn read_refs_blob(pack: &[u8], blob: &PackedBlob) -> Result<Vec<BlobId>, PackError> {
    if blob.kind != BlobKind::Refs {
        return Err(PackError::NotRefs { kind: blob.kind });
    }
    let bytes = usize::try_from(blob.offset)
        .ok()
        .zip(usize::try_from(blob.length).ok())
        .and_then(|(start, len)| pack.get(start..start.checked_add(len)?))
        .ok_or_else(|| PackError::Refs {
            reason: format!(
                "blob at {}+{} lies outside the pack",
                blob.offset, blob.length
            ),
        })?;
    cairn_proto::refs::decode(&blob.id, bytes).map_err(|e| PackError::Refs { reason: e.0 })
}

/// Copy `N` bytes at `at`; callers have checked the bounds.
fn array_at<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(key: &MasterKey, n: usize) -> (Pack, Vec<(BlobId, Vec<u8>)>) {
        let mut builder = PackBuilder::new(PACK_TARGET_BYTES);
        let mut added = Vec::new();
        for i in 0..n {
            let plain = format!("chat line {i} ").repeat(i + 1).into_bytes();
            let id = key.blob_id(&plain);
            let encoded = key.encode_blob(&id, &plain).expect("encodes");
            let kind = if i % 3 == 0 {
                BlobKind::Tree
            } else {
                BlobKind::Data
            };
            builder.add(id, kind, &encoded);
            added.push((id, plain));
        }
        assert_eq!(builder.len(), n);
        (builder.finish(key).expect("finishes"), added)
    }

    #[test]
    fn index_round_trips_and_blobs_are_where_listed() {
        let key = MasterKey::generate();
        let (pack, added) = build(&key, 25);
        assert_eq!(pack.id, *blake3::hash(&pack.data).as_bytes());
        let index = read_pack_index(&key, &pack.data).expect("indexes");
        assert_eq!(index, pack.blobs);
        for (blob, (id, plain)) in index.iter().zip(&added) {
            assert_eq!(&blob.id, id);
            let bytes = pack.blob_bytes(blob).expect("in range");
            assert_eq!(&key.decode_blob(id, bytes).expect("decodes"), plain);
        }
        assert_eq!(index[0].kind, BlobKind::Tree);
        assert_eq!(index[1].kind, BlobKind::Data);
    }

    #[test]
    fn empty_pack_round_trips() {
        let key = MasterKey::generate();
        let builder = PackBuilder::new(10);
        assert!(builder.is_empty() && !builder.is_full());
        let pack = builder.finish(&key).expect("finishes");
        assert!(
            read_pack_index(&key, &pack.data)
                .expect("indexes")
                .is_empty()
        );
    }

    #[test]
    fn builder_reports_full_at_target() {
        let mut builder = PackBuilder::new(100);
        builder.add([1; 32], BlobKind::Data, &[0; 60]);
        assert!(!builder.is_full());
        builder.add([2; 32], BlobKind::Data, &[0; 40]);
        assert!(builder.is_full());
        assert_eq!(builder.size_bytes(), 100);
    }

    #[test]
    fn any_tampered_byte_in_the_trailer_or_tail_is_detected() {
        let key = MasterKey::generate();
        let (pack, _) = build(&key, 4);
        let region = pack.blobs.last().map(|b| b.range().end).expect("blobs") as usize;
        for i in region..pack.data.len() {
            let mut bad = pack.data.clone();
            bad[i] ^= 0x40;
            assert!(
                read_pack_index(&key, &bad).is_err(),
                "byte {i} tamper unnoticed"
            );
        }
    }

    #[test]
    fn wrong_key_truncation_and_prefixing_fail() {
        let key = MasterKey::generate();
        let (pack, _) = build(&key, 3);
        assert!(matches!(
            read_pack_index(&MasterKey::generate(), &pack.data),
            Err(PackError::Trailer { .. })
        ));
        // Dropping or adding bytes in front shifts the blob region, which
        // the trailer is bound to.
        assert!(read_pack_index(&key, &pack.data[1..]).is_err());
        let mut longer = vec![0u8];
        longer.extend_from_slice(&pack.data);
        assert!(read_pack_index(&key, &longer).is_err());
        assert!(matches!(
            read_pack_index(&key, &pack.data[..pack.data.len() - 1]),
            Err(PackError::BadMagic)
        ));
    }

    #[test]
    fn blob_bytes_refuses_out_of_range() {
        let key = MasterKey::generate();
        let (pack, _) = build(&key, 1);
        let far = PackedBlob {
            id: [0; 32],
            kind: BlobKind::Data,
            offset: u64::MAX - 1,
            length: 10,
        };
        assert!(pack.blob_bytes(&far).is_none());
    }

    #[test]
    fn a_refs_blob_round_trips_and_is_never_opened_as_sealed() {
        let key = MasterKey::generate();
        let ids: Vec<BlobId> = (0u8..5).map(|i| key.blob_id(&[i])).collect();
        let segment = &cairn_proto::refs::build(ids.clone())[0];
        let mut builder = PackBuilder::new(PACK_TARGET_BYTES);
        builder.add(segment.id, BlobKind::Refs, &segment.bytes);
        let plain = b"a chunk";
        let data_id = key.blob_id(plain);
        builder.add(
            data_id,
            BlobKind::Data,
            &key.encode_blob(&data_id, plain).expect("encodes"),
        );
        let pack = builder.finish(&key).expect("finishes");
        let index = read_pack_index(&key, &pack.data).expect("indexes");
        assert_eq!(index.len(), 2);
        assert_eq!(index[0].kind, BlobKind::Refs);
        assert!(!index[0].kind.is_sealed());
        assert!(index[1].kind.is_sealed() && BlobKind::Tree.is_sealed());
        // Stored as-is: the pack holds the segment's own bytes.
        assert_eq!(pack.blob_bytes(&index[0]), Some(&segment.bytes[..]));
        let mut sorted = ids;
        sorted.sort_unstable();
        assert_eq!(
            read_refs_blob(&pack.data, &index[0]).expect("decodes"),
            sorted
        );
        // Read as a sealed blob it does not open; a sealed blob is not a segment.
        assert!(key.decode_blob(&index[0].id, &segment.bytes).is_err());
        assert!(matches!(
            read_refs_blob(&pack.data, &index[1]),
            Err(PackError::NotRefs { .. })
        ));
        let far = PackedBlob {
            offset: u64::MAX - 1,
            ..index[0]
        };
        assert!(matches!(
            read_refs_blob(&pack.data, &far),
            Err(PackError::Refs { .. })
        ));
    }

    #[test]
    fn golden_pack_v1() {
        use crate::seal::tests::{GOLDEN_TEXT, golden_key, golden_noise, golden_vector};
        let key = golden_key();
        let noise = golden_noise();
        let plaintexts: [(&[u8], BlobKind); 2] =
            [(GOLDEN_TEXT, BlobKind::Data), (&noise, BlobKind::Tree)];
        let data = golden_vector("pack-v1.bin", || {
            let mut builder = PackBuilder::new(PACK_TARGET_BYTES);
            for (plain, kind) in plaintexts {
                let id = key.blob_id(plain);
                builder.add(id, kind, &key.encode_blob(&id, plain).expect("encodes"));
            }
            builder.finish(&key).expect("finishes").data
        });
        let index = read_pack_index(&key, &data).expect("indexes");
        assert_eq!(index.len(), 2);
        let mut offset = 0;
        for (blob, (plain, kind)) in index.iter().zip(plaintexts) {
            assert_eq!(blob.id, key.blob_id(plain));
            assert_eq!(blob.kind, kind);
            assert_eq!(blob.offset, offset);
            offset += u64::from(blob.length);
            let bytes = &data[blob.offset as usize..blob.range().end as usize];
            assert_eq!(key.decode_blob(&blob.id, bytes).expect("decodes"), plain);
        }
        assert_eq!(&data[data.len() - 8..], b"CAIRNPK\x01");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn read_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let key = MasterKey::generate();
            let _ = read_pack_index(&key, &bytes);
            // A valid tail over garbage reaches the trailer parser.
            let mut framed = bytes.clone();
            framed.extend_from_slice(&(bytes.len() as u32 / 2).to_le_bytes());
            framed.extend_from_slice(b"CAIRNPK\x01");
            prop_assert!(read_pack_index(&key, &framed).is_err());
        }

        #[test]
        fn random_blobs_round_trip(sizes in proptest::collection::vec(0usize..3000, 0..20)) {
            let key = MasterKey::generate();
            let mut builder = PackBuilder::new(PACK_TARGET_BYTES);
            let mut expect = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                let bytes = vec![i as u8; *size];
                builder.add([i as u8; 32], BlobKind::Data, &bytes);
                expect.push(bytes);
            }
            let pack = builder.finish(&key).expect("finishes");
            let index = read_pack_index(&key, &pack.data).expect("indexes");
            prop_assert_eq!(index.len(), expect.len());
            for (blob, bytes) in index.iter().zip(&expect) {
                prop_assert_eq!(pack.blob_bytes(blob).expect("in range"), &bytes[..]);
            }
        }
    }
}
