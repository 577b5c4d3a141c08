//! Reed-Solomon erasure coding of packs and the shard file format.
//!
//! This module owns two things: turning a pack (opaque ciphertext) into k data
//! and m parity shards and back, and the byte layout of a shard file (a fixed
//! 128-byte header followed by the payload; `docs/format.md, part 2`). It is pure:
//! no I/O, no clocks, no randomness, so every function is deterministic and can
//! be property-tested.
//!
//! It must not decide where shards go (`placement`) nor touch disks or the
//! network (`shard_store`, `gateway`).
//!
//! Invariants:
//! - every shard of a pack has the same payload length,
//!   `max(1, ceil(pack_len / k))`; the pack is zero-padded to `k * shard_len`
//!   and its real length travels in every header;
//! - a parsed shard has passed its header checksum *and* its payload checksum:
//!   [`parse_shard_file`] never hands out bytes it has not verified, and never
//!   panics, whatever the input;
//! - the format is versioned (magic + version) and pinned by a golden vector
//!   (`node/tests/vectors/`), so it can never change silently.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use reed_solomon_erasure::galois_8::ReedSolomon;
use serde::{Deserialize, Serialize};

use crate::model::Id32;

/// First bytes of every shard file.
pub const SHARD_MAGIC: [u8; 8] = *b"CAIRNSHD";
/// The shard file format version this code writes and reads.
pub const SHARD_FORMAT_VERSION: u16 = 1;
/// Size of the fixed shard file header in bytes; the payload starts here.
pub const HEADER_LEN: usize = 128;
/// Largest total number of shards (`data + parity`) per pack.
///
/// The codec (GF(2^8)) would allow 256; 32 keeps the decode matrices small
/// and is far beyond any sensible failure-domain layout.
pub const MAX_TOTAL_SHARDS: u32 = 32;

// Field offsets inside the header (little-endian). Kept as named constants so
// the encoder, the decoder and the format document agree on one table.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_DATA: usize = 10;
const OFF_PARITY: usize = 11;
const OFF_INDEX: usize = 12;
const OFF_RESERVED: usize = 14;
const OFF_PACK_ID: usize = 16;
const OFF_PACK_LEN: usize = 48;
const OFF_SHARD_LEN: usize = 56;
const OFF_PAYLOAD_SUM: usize = 64;
const OFF_HEADER_SUM: usize = 96;

/// A Reed-Solomon code: `data` shards carry the pack, `parity` shards repair it.
///
/// Written `"4+2"` in configuration and on the command line. Any `data` of
/// the `data + parity` shards reconstruct the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Code {
    /// Number of data shards (k).
    pub data: u32,
    /// Number of parity shards (m): how many shards may be lost.
    pub parity: u32,
}

impl Code {
    /// Builds and validates a code.
    pub fn new(data: u32, parity: u32) -> Result<Self, ErasureError> {
        let code = Code { data, parity };
        code.validate()?;
        Ok(code)
    }

    /// Checks the limits: `data >= 1`, `parity >= 1`, `data + parity <= 32`.
    pub fn validate(&self) -> Result<(), ErasureError> {
        if self.data == 0 {
            return Err(ErasureError::NoDataShards);
        }
        if self.parity == 0 {
            return Err(ErasureError::NoParityShards);
        }
        let total = u64::from(self.data) + u64::from(self.parity);
        if total > u64::from(MAX_TOTAL_SHARDS) {
            return Err(ErasureError::TooManyShards {
                data: self.data,
                parity: self.parity,
                total,
                max: MAX_TOTAL_SHARDS,
            });
        }
        Ok(())
    }

    /// `data + parity`. Only meaningful for a validated code.
    pub fn total(&self) -> u32 {
        self.data.saturating_add(self.parity)
    }

    /// Payload length of every shard of a pack of `pack_len` bytes:
    /// `max(1, ceil(pack_len / data))` (the codec refuses empty shards).
    pub fn shard_len(&self, pack_len: u64) -> u64 {
        let k = u64::from(self.data.max(1));
        pack_len.div_ceil(k).max(1)
    }

    fn codec(&self) -> Result<ReedSolomon, ErasureError> {
        self.validate()?;
        ReedSolomon::new(self.data as usize, self.parity as usize).map_err(ErasureError::Codec)
    }
}

impl Default for Code {
    /// 4+2: survives the loss of any two shards (one region of three) at 1.5x storage.
    fn default() -> Self {
        Code { data: 4, parity: 2 }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.data, self.parity)
    }
}

impl FromStr for Code {
    type Err = ErasureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ErasureError::CodeSyntax {
            input: s.to_owned(),
        };
        let (data, parity) = s.trim().split_once('+').ok_or_else(syntax)?;
        let data = data.trim().parse::<u32>().map_err(|_| syntax())?;
        let parity = parity.trim().parse::<u32>().map_err(|_| syntax())?;
        Code::new(data, parity)
    }
}

impl TryFrom<String> for Code {
    type Error = ErasureError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Code> for String {
    fn from(code: Code) -> Self {
        code.to_string()
    }
}

/// Errors of codes, decoding and reconstruction.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ErasureError {
    /// The text is not `DATA+PARITY`.
    #[error("erasure code {input:?} is not of the form DATA+PARITY, for example \"4+2\"")]
    CodeSyntax { input: String },
    /// A code with zero data shards.
    #[error("an erasure code needs at least 1 data shard")]
    NoDataShards,
    /// A code with zero parity shards: nothing could ever be lost.
    #[error("an erasure code needs at least 1 parity shard, otherwise one lost node loses data")]
    NoParityShards,
    /// A code with too many shards in total.
    #[error("erasure code {data}+{parity} has {total} shards; at most {max} are supported")]
    TooManyShards {
        data: u32,
        parity: u32,
        total: u64,
        max: u32,
    },
    /// The shard vector does not have one slot per shard of the code.
    #[error("expected {expected} shard slots for the code, got {got}")]
    WrongShardCount { got: usize, expected: u32 },
    /// Fewer than k shards are present: the pack cannot be rebuilt.
    #[error(
        "only {present} of {total} shards are present but {needed} are needed to rebuild the pack; \
         fetch more shards or run repair from another copy"
    )]
    TooFewShards {
        present: u32,
        needed: u32,
        total: u32,
    },
    /// A present shard has the wrong payload length.
    #[error("shard {index} has {len} payload bytes, expected {expected}")]
    ShardLength { index: u32, len: u64, expected: u64 },
    /// The shard length given does not match the pack length and code.
    #[error(
        "shard length {shard_len} does not fit a {pack_len}-byte pack under code {code} (expected {expected})"
    )]
    ShardLenMismatch {
        code: Code,
        pack_len: u64,
        shard_len: u64,
        expected: u64,
    },
    /// A shard index beyond the code.
    #[error("shard index {index} is outside code {code}")]
    IndexOutOfRange { index: u32, code: Code },
    /// A byte range that does not lie inside the pack.
    #[error("range of {len} bytes at offset {offset} lies outside the {pack_len}-byte pack")]
    RangeOutOfPack {
        offset: u64,
        len: u64,
        pack_len: u64,
    },
    /// A pack or shard too large for this machine's address space.
    #[error("a {bytes}-byte buffer does not fit in memory on this platform")]
    TooLarge { bytes: u64 },
    /// The codec refused the shards after our own checks passed (a bug here).
    #[error("reed-solomon codec error: {0}")]
    Codec(reed_solomon_erasure::Error),
}

/// Why bytes are not a valid shard file. Every variant means "do not use
/// this shard": read another one or reconstruct it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardFormatError {
    /// Shorter than the fixed header.
    #[error("shard file is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    /// Not a Cairn shard file at all.
    #[error("not a cairn shard file (bad magic)")]
    BadMagic,
    /// Written by a format version this node does not read.
    #[error(
        "shard format version {version} is not supported (this node reads version {SHARD_FORMAT_VERSION})"
    )]
    UnsupportedVersion { version: u16 },
    /// The header checksum does not match: a header byte changed.
    #[error("shard header checksum mismatch: the header is corrupt")]
    HeaderChecksum,
    /// The reserved header field is not zero.
    #[error("shard header reserved field is {value:#06x}, must be zero")]
    Reserved { value: u16 },
    /// The header names an invalid code.
    #[error("shard header names an invalid erasure code {data}+{parity}")]
    InvalidCode { data: u8, parity: u8 },
    /// The shard index is beyond the code.
    #[error("shard header index {index} is outside code {code}")]
    IndexOutOfRange { index: u16, code: Code },
    /// The shard length is not the one the pack length and code imply.
    #[error(
        "shard header says {shard_len}-byte shards, but a {pack_len}-byte pack under code {code} has {expected}-byte shards"
    )]
    ShardLenMismatch {
        code: Code,
        pack_len: u64,
        shard_len: u64,
        expected: u64,
    },
    /// The file holds a different number of payload bytes than the header says.
    #[error(
        "shard payload is {actual} bytes but the header says {expected}: the file is truncated or extended"
    )]
    PayloadLength { expected: u64, actual: u64 },
    /// The payload checksum does not match: a payload byte changed.
    #[error("shard payload checksum mismatch: the payload is corrupt")]
    PayloadChecksum,
}

/// The decoded, verified header of a shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHeader {
    /// Code of the pack this shard belongs to.
    pub code: Code,
    /// Position in the codeword: `0..k` data, `k..k+m` parity.
    pub index: u32,
    /// Id of the pack (blake3 of its bytes, computed by the client).
    pub pack_id: Id32,
    /// Length of the pack before padding.
    pub pack_len: u64,
    /// Length of this shard's payload (equal for all shards of the pack).
    pub shard_len: u64,
    /// blake3 of the payload.
    pub checksum: Id32,
}

impl ShardHeader {
    /// Encodes the header, including its own checksum.
    ///
    /// The caller guarantees a valid header (code within limits, index below
    /// 256): every header is produced by [`encode_pack`],
    /// [`EncodedShard::from_payload`] or [`ShardHeader::decode`], which check.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&SHARD_MAGIC);
        h[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&SHARD_FORMAT_VERSION.to_le_bytes());
        // Codes are limited to 32 shards, so k, m and the index fit their fields;
        // a violation would be caught by the decoder's range checks.
        h[OFF_DATA] = u8::try_from(self.code.data).unwrap_or(u8::MAX);
        h[OFF_PARITY] = u8::try_from(self.code.parity).unwrap_or(u8::MAX);
        let index = u16::try_from(self.index).unwrap_or(u16::MAX);
        h[OFF_INDEX..OFF_INDEX + 2].copy_from_slice(&index.to_le_bytes());
        // OFF_RESERVED stays zero.
        h[OFF_PACK_ID..OFF_PACK_ID + 32].copy_from_slice(&self.pack_id);
        h[OFF_PACK_LEN..OFF_PACK_LEN + 8].copy_from_slice(&self.pack_len.to_le_bytes());
        h[OFF_SHARD_LEN..OFF_SHARD_LEN + 8].copy_from_slice(&self.shard_len.to_le_bytes());
        h[OFF_PAYLOAD_SUM..OFF_PAYLOAD_SUM + 32].copy_from_slice(&self.checksum);
        let sum = blake3::hash(&h[..OFF_HEADER_SUM]);
        h[OFF_HEADER_SUM..].copy_from_slice(sum.as_bytes());
        h
    }

    /// Decodes and checks a header (magic, version, header checksum, code,
    /// index, lengths), without looking at the payload.
    ///
    /// Use [`parse_shard_file`] to get a shard's bytes: this function alone
    /// does not prove the payload intact.
    pub fn decode(bytes: &[u8]) -> Result<ShardHeader, ShardFormatError> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(ShardFormatError::TooShort { len: bytes.len() })?;
        if h[OFF_MAGIC..OFF_MAGIC + 8] != SHARD_MAGIC {
            return Err(ShardFormatError::BadMagic);
        }
        let version = u16::from_le_bytes([h[OFF_VERSION], h[OFF_VERSION + 1]]);
        if version != SHARD_FORMAT_VERSION {
            return Err(ShardFormatError::UnsupportedVersion { version });
        }
        // The header checksum comes before any field is trusted.
        if blake3::hash(&h[..OFF_HEADER_SUM]).as_bytes()[..] != h[OFF_HEADER_SUM..] {
            return Err(ShardFormatError::HeaderChecksum);
        }
        let reserved = u16::from_le_bytes([h[OFF_RESERVED], h[OFF_RESERVED + 1]]);
        if reserved != 0 {
            return Err(ShardFormatError::Reserved { value: reserved });
        }
        let (data, parity) = (h[OFF_DATA], h[OFF_PARITY]);
        let code = Code::new(u32::from(data), u32::from(parity))
            .map_err(|_| ShardFormatError::InvalidCode { data, parity })?;
        let index = u16::from_le_bytes([h[OFF_INDEX], h[OFF_INDEX + 1]]);
        if u32::from(index) >= code.total() {
            return Err(ShardFormatError::IndexOutOfRange { index, code });
        }
        let pack_len = read_u64(h, OFF_PACK_LEN);
        let shard_len = read_u64(h, OFF_SHARD_LEN);
        let expected = code.shard_len(pack_len);
        if shard_len != expected {
            return Err(ShardFormatError::ShardLenMismatch {
                code,
                pack_len,
                shard_len,
                expected,
            });
        }
        Ok(ShardHeader {
            code,
            index: u32::from(index),
            pack_id: read_32(h, OFF_PACK_ID),
            pack_len,
            shard_len,
            checksum: read_32(h, OFF_PAYLOAD_SUM),
        })
    }
}

fn read_u64(h: &[u8; HEADER_LEN], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[off..off + 8]);
    u64::from_le_bytes(b)
}

fn read_32(h: &[u8; HEADER_LEN], off: usize) -> Id32 {
    let mut b = [0u8; 32];
    b.copy_from_slice(&h[off..off + 32]);
    b
}

/// Parses a whole shard file and verifies it: magic, version, header
/// checksum, lengths, then the payload checksum. Returns the header and the
/// verified payload. Never panics, whatever the bytes.
pub fn parse_shard_file(bytes: &[u8]) -> Result<(ShardHeader, &[u8]), ShardFormatError> {
    let header = ShardHeader::decode(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != header.shard_len {
        return Err(ShardFormatError::PayloadLength {
            expected: header.shard_len,
            actual: payload.len() as u64,
        });
    }
    if blake3::hash(payload).as_bytes() != &header.checksum {
        return Err(ShardFormatError::PayloadChecksum);
    }
    Ok((header, payload))
}

/// One shard of an encoded pack: its header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedShard {
    /// Header describing the shard (its `checksum` is the payload's blake3).
    pub header: ShardHeader,
    /// The shard payload, `header.shard_len` bytes.
    pub payload: Vec<u8>,
}

impl EncodedShard {
    /// Wraps a payload (for instance one rebuilt by [`reconstruct_shards`])
    /// into a shard with a fresh header and checksum.
    pub fn from_payload(
        code: Code,
        index: u32,
        pack_id: Id32,
        pack_len: u64,
        payload: Vec<u8>,
    ) -> Result<EncodedShard, ErasureError> {
        code.validate()?;
        if index >= code.total() {
            return Err(ErasureError::IndexOutOfRange { index, code });
        }
        let expected = code.shard_len(pack_len);
        if payload.len() as u64 != expected {
            return Err(ErasureError::ShardLength {
                index,
                len: payload.len() as u64,
                expected,
            });
        }
        Ok(EncodedShard {
            header: ShardHeader {
                code,
                index,
                pack_id,
                pack_len,
                shard_len: expected,
                checksum: *blake3::hash(&payload).as_bytes(),
            },
            payload,
        })
    }

    /// The shard file: header followed by payload, in one exact-size allocation.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header.to_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

fn to_usize(n: u64) -> Result<usize, ErasureError> {
    usize::try_from(n).map_err(|_| ErasureError::TooLarge { bytes: n })
}

/// Erasure-codes a pack into `k + m` shards, indices `0..k+m`, as separate
/// header and payload: [`encode_pack_files`] (what ingest stores) split up,
/// for callers that handle shards one part at a time.
///
/// # Panics
///
/// If `code` is invalid (see [`encode_pack_files`]).
pub fn encode_pack(code: Code, pack_id: Id32, pack: &[u8]) -> Vec<EncodedShard> {
    encode_pack_files(code, pack_id, pack)
        .into_iter()
        .map(|file| EncodedShard {
            header: file.header,
            payload: file.bytes[HEADER_LEN..].to_vec(),
        })
        .collect()
}

/// One shard of an encoded pack as the file that is stored: header followed
/// by payload in one shared buffer, sent to every node without a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFile {
    /// Header describing the shard (its `checksum` is the payload's blake3).
    pub header: ShardHeader,
    /// The whole shard file, `HEADER_LEN + header.shard_len` bytes.
    pub bytes: prost::bytes::Bytes,
}

/// Erasure-codes a pack straight into its `k + m` shard files (indices
/// `0..k+m`): each buffer is allocated once at its final size, the pack is
/// copied into the data files, parity is computed in place, and each
/// payload is hashed once.
///
/// # Panics
///
/// If `code` is invalid. Codes are validated where they enter the system
/// ([`Code::new`], [`FromStr`], configuration), so an invalid code here is a
/// programmer error, not an operating one.
pub fn encode_pack_files(code: Code, pack_id: Id32, pack: &[u8]) -> Vec<ShardFile> {
    let codec = code
        .codec()
        .expect("encode_pack_files is only given validated codes (Code::new, FromStr, config)");
    let k = code.data as usize;
    let shard_len = pack.len().div_ceil(k).max(1);
    debug_assert_eq!(shard_len as u64, code.shard_len(pack.len() as u64));
    let file_len = HEADER_LEN + shard_len;

    let mut data: Vec<Vec<u8>> = Vec::with_capacity(k);
    for i in 0..k {
        let start = (i * shard_len).min(pack.len());
        let end = ((i + 1) * shard_len).min(pack.len());
        let mut file = Vec::with_capacity(file_len);
        file.resize(HEADER_LEN, 0);
        file.extend_from_slice(&pack[start..end]);
        file.resize(file_len, 0);
        data.push(file);
    }
    let mut parity: Vec<Vec<u8>> = (0..code.parity).map(|_| vec![0u8; file_len]).collect();
    {
        let payloads: Vec<&[u8]> = data.iter().map(|f| &f[HEADER_LEN..]).collect();
        let mut parity_payloads: Vec<&mut [u8]> =
            parity.iter_mut().map(|f| &mut f[HEADER_LEN..]).collect();
        codec.encode_sep(&payloads, &mut parity_payloads).expect(
            "k data and m parity buffers of one non-zero length meet every precondition of the codec",
        );
    }

    data.into_iter()
        .chain(parity)
        .enumerate()
        .map(|(index, mut file)| {
            let header = ShardHeader {
                code,
                // Below MAX_TOTAL_SHARDS (validated above), so the cast is exact.
                index: index as u32,
                pack_id,
                pack_len: pack.len() as u64,
                shard_len: shard_len as u64,
                checksum: *blake3::hash(&file[HEADER_LEN..]).as_bytes(),
            };
            file[..HEADER_LEN].copy_from_slice(&header.to_bytes());
            ShardFile {
                header,
                bytes: file.into(),
            }
        })
        .collect()
}

/// Checks the slots handed to decoding: one per shard, every present payload
/// `shard_len` long, `shard_len` consistent with `pack_len`, at least k present.
fn check_slots(
    code: Code,
    pack_len: u64,
    shard_len: u64,
    shards: &[Option<Vec<u8>>],
) -> Result<(), ErasureError> {
    code.validate()?;
    if shards.len() != code.total() as usize {
        return Err(ErasureError::WrongShardCount {
            got: shards.len(),
            expected: code.total(),
        });
    }
    let expected = code.shard_len(pack_len);
    if shard_len != expected {
        return Err(ErasureError::ShardLenMismatch {
            code,
            pack_len,
            shard_len,
            expected,
        });
    }
    let mut present = 0u32;
    for (index, slot) in shards.iter().enumerate() {
        if let Some(payload) = slot {
            if payload.len() as u64 != shard_len {
                return Err(ErasureError::ShardLength {
                    index: index as u32,
                    len: payload.len() as u64,
                    expected: shard_len,
                });
            }
            present += 1;
        }
    }
    if present < code.data {
        return Err(ErasureError::TooFewShards {
            present,
            needed: code.data,
            total: code.total(),
        });
    }
    Ok(())
}

/// Rebuilds a pack from any k of its shard payloads.
///
/// `shards[i]` holds the payload of shard `i` or `None` if it is missing;
/// payloads must already be verified (see [`parse_shard_file`]). When all
/// data shards are present no decoding happens.
pub fn decode_pack(
    code: Code,
    pack_len: u64,
    shard_len: u64,
    mut shards: Vec<Option<Vec<u8>>>,
) -> Result<Vec<u8>, ErasureError> {
    check_slots(code, pack_len, shard_len, &shards)?;
    let k = code.data as usize;
    if shards[..k].iter().any(Option::is_none) {
        code.codec()?
            .reconstruct_data(&mut shards)
            .map_err(ErasureError::Codec)?;
    }
    let pack_len_usize = to_usize(pack_len)?;
    let mut pack = Vec::with_capacity(pack_len_usize);
    for slot in &shards[..k] {
        // reconstruct_data fills every data slot or returns an error; should
        // it ever not, report the codec's own "too few shards" rather than panic.
        let payload = slot.as_ref().ok_or(ErasureError::Codec(
            reed_solomon_erasure::Error::TooFewShardsPresent,
        ))?;
        let take = (pack_len_usize - pack.len()).min(payload.len());
        pack.extend_from_slice(&payload[..take]);
    }
    Ok(pack)
}

/// Fills every missing slot (data and parity) from any k present payloads;
/// returns the indices that were rebuilt. Used by repair to recreate lost
/// shards; wrap each with [`EncodedShard::from_payload`].
pub fn reconstruct_shards(
    code: Code,
    pack_len: u64,
    shard_len: u64,
    shards: &mut [Option<Vec<u8>>],
) -> Result<Vec<u32>, ErasureError> {
    check_slots(code, pack_len, shard_len, shards)?;
    let missing: Vec<u32> = shards
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| i as u32)
        .collect();
    if !missing.is_empty() {
        code.codec()?
            .reconstruct(shards)
            .map_err(ErasureError::Codec)?;
    }
    Ok(missing)
}

/// Which data shards hold the bytes `offset..offset+len` of a pack.
///
/// Returns a range of data shard indices (empty for `len == 0`), or an error
/// if the byte range does not lie inside the pack. Data shard `i` holds pack
/// bytes `i*shard_len .. (i+1)*shard_len`.
pub fn data_shard_span(
    code: Code,
    pack_len: u64,
    offset: u64,
    len: u64,
) -> Result<Range<u32>, ErasureError> {
    code.validate()?;
    let out_of_pack = ErasureError::RangeOutOfPack {
        offset,
        len,
        pack_len,
    };
    let end = offset.checked_add(len).ok_or(out_of_pack)?;
    if end > pack_len {
        return Err(ErasureError::RangeOutOfPack {
            offset,
            len,
            pack_len,
        });
    }
    if len == 0 {
        return Ok(0..0);
    }
    let shard_len = code.shard_len(pack_len);
    // end <= pack_len <= k * shard_len, so both quotients are below k (≤ 32).
    let first = (offset / shard_len) as u32;
    let last = ((end - 1) / shard_len) as u32;
    Ok(first..last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pack_of(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn encode(code: Code, pack: &[u8]) -> Vec<EncodedShard> {
        encode_pack(code, *blake3::hash(pack).as_bytes(), pack)
    }

    fn slots(shards: &[EncodedShard], keep: impl Fn(usize) -> bool) -> Vec<Option<Vec<u8>>> {
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| keep(i).then(|| s.payload.clone()))
            .collect()
    }

    #[test]
    fn code_parse_display_and_limits() {
        assert_eq!("4+2".parse::<Code>(), Ok(Code { data: 4, parity: 2 }));
        assert_eq!(
            " 10 + 4 ".parse::<Code>(),
            Ok(Code::new(10, 4).expect("valid"))
        );
        assert_eq!(Code::default().to_string(), "4+2");
        assert_eq!("30+2".parse::<Code>().map(|c| c.total()), Ok(32));
        assert!(matches!(
            "4".parse::<Code>(),
            Err(ErasureError::CodeSyntax { .. })
        ));
        assert!(matches!(
            "4+x".parse::<Code>(),
            Err(ErasureError::CodeSyntax { .. })
        ));
        assert!(matches!(
            "-1+2".parse::<Code>(),
            Err(ErasureError::CodeSyntax { .. })
        ));
        assert_eq!("0+2".parse::<Code>(), Err(ErasureError::NoDataShards));
        assert_eq!("4+0".parse::<Code>(), Err(ErasureError::NoParityShards));
        assert!(matches!(
            "31+2".parse::<Code>(),
            Err(ErasureError::TooManyShards { total: 33, .. })
        ));
        assert!(matches!(
            "4294967295+4294967295".parse::<Code>(),
            Err(ErasureError::TooManyShards { .. })
        ));
        let json = serde_json::to_string(&Code::default()).expect("serialize");
        assert_eq!(json, "\"4+2\"");
        assert!(serde_json::from_str::<Code>("\"0+1\"").is_err());
    }

    #[test]
    fn invalid_code_is_an_error_not_a_panic() {
        let bad = Code { data: 0, parity: 2 };
        assert!(matches!(bad.validate(), Err(ErasureError::NoDataShards)));
        assert!(decode_pack(bad, 1, 1, vec![]).is_err());
    }

    #[test]
    fn round_trip_and_shard_shape() {
        let code = Code::default();
        for len in [0usize, 1, 3, 4, 5, 1000, 4096, 65_537] {
            let pack = pack_of(len, 7);
            let shards = encode(code, &pack);
            assert_eq!(shards.len(), 6);
            for (i, s) in shards.iter().enumerate() {
                assert_eq!(s.header.index, i as u32);
                assert_eq!(s.header.pack_len, len as u64);
                assert_eq!(s.payload.len() as u64, code.shard_len(len as u64));
                let file = s.to_file_bytes();
                let (h, payload) = parse_shard_file(&file).expect("own output parses");
                assert_eq!(h, s.header);
                assert_eq!(payload, &s.payload[..]);
            }
            let back = decode_pack(
                code,
                len as u64,
                code.shard_len(len as u64),
                slots(&shards, |_| true),
            )
            .expect("decode");
            assert_eq!(back, pack);
        }
    }

    #[test]
    fn decode_from_every_k_subset_of_4_plus_2() {
        let code = Code::default();
        let pack = pack_of(10_001, 3);
        let shards = encode(code, &pack);
        let shard_len = code.shard_len(pack.len() as u64);
        let mut subsets = 0;
        for mask in 0u32..(1 << 6) {
            if mask.count_ones() != 4 {
                continue;
            }
            subsets += 1;
            let back = decode_pack(
                code,
                pack.len() as u64,
                shard_len,
                slots(&shards, |i| mask & (1 << i) != 0),
            )
            .expect("any 4 of 6 decode");
            assert_eq!(back, pack, "subset {mask:06b}");
            let mut s = slots(&shards, |i| mask & (1 << i) != 0);
            let rebuilt = reconstruct_shards(code, pack.len() as u64, shard_len, &mut s)
                .expect("reconstruct");
            assert_eq!(rebuilt.len(), 2);
            for (i, slot) in s.iter().enumerate() {
                assert_eq!(
                    slot.as_deref(),
                    Some(&shards[i].payload[..]),
                    "shard {i} rebuilt wrong"
                );
            }
        }
        assert_eq!(subsets, 15);
    }

    #[test]
    fn too_few_shards_names_counts() {
        let code = Code::default();
        let pack = pack_of(100, 1);
        let shards = encode(code, &pack);
        let err = decode_pack(code, 100, 25, slots(&shards, |i| i < 3)).expect_err("3 of 6");
        assert!(matches!(
            err,
            ErasureError::TooFewShards {
                present: 3,
                needed: 4,
                total: 6
            }
        ));
        assert!(err.to_string().contains("only 3 of 6"));
        let mut wrong_len = slots(&shards, |_| true);
        wrong_len[2] = Some(vec![0; 24]);
        assert!(matches!(
            decode_pack(code, 100, 25, wrong_len),
            Err(ErasureError::ShardLength {
                index: 2,
                len: 24,
                expected: 25
            })
        ));
        assert!(matches!(
            decode_pack(code, 100, 26, slots(&shards, |_| true)),
            Err(ErasureError::ShardLenMismatch { .. })
        ));
        assert!(matches!(
            decode_pack(code, 100, 25, slots(&shards, |_| true)[..5].to_vec()),
            Err(ErasureError::WrongShardCount {
                got: 5,
                expected: 6
            })
        ));
    }

    #[test]
    fn every_header_byte_flip_is_caught() {
        let pack = pack_of(77, 9);
        let file = encode(Code::default(), &pack)[4].to_file_bytes();
        for pos in 0..file.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = file.clone();
                bad[pos] ^= bit;
                let err = parse_shard_file(&bad).expect_err("flipped byte must be caught");
                if pos >= HEADER_LEN {
                    assert_eq!(err, ShardFormatError::PayloadChecksum);
                }
            }
        }
        assert_eq!(
            parse_shard_file(&file[..file.len() - 1]),
            Err(ShardFormatError::PayloadLength {
                expected: 20,
                actual: 19
            })
        );
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            parse_shard_file(&longer),
            Err(ShardFormatError::PayloadLength { .. })
        ));
        assert_eq!(
            parse_shard_file(&file[..10]),
            Err(ShardFormatError::TooShort { len: 10 })
        );
    }

    #[test]
    fn header_with_valid_checksum_but_bad_fields_is_refused() {
        // A consistent header over inconsistent fields: the checksum alone must
        // not make a header acceptable.
        let mut h = encode(Code::default(), b"abcdef")[0].header.clone();
        h.shard_len = 3;
        assert!(matches!(
            ShardHeader::decode(&h.to_bytes()),
            Err(ShardFormatError::ShardLenMismatch { .. })
        ));
        let mut h = encode(Code::default(), b"abcdef")[0].header.clone();
        h.index = 6;
        assert!(matches!(
            ShardHeader::decode(&h.to_bytes()),
            Err(ShardFormatError::IndexOutOfRange { index: 6, .. })
        ));
        let mut h = encode(Code::default(), b"abcdef")[0].header.clone();
        h.code = Code { data: 4, parity: 0 };
        assert_eq!(
            ShardHeader::decode(&h.to_bytes()),
            Err(ShardFormatError::InvalidCode { data: 4, parity: 0 })
        );
        let mut v2 = encode(Code::default(), b"abcdef")[0].header.to_bytes();
        v2[OFF_VERSION] = 2;
        assert_eq!(
            ShardHeader::decode(&v2),
            Err(ShardFormatError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn shard_files_equal_the_encoded_shards_as_files() {
        for (code, len) in [
            (Code::default(), 1usize),
            (Code::default(), 4097),
            (Code::default(), 100_003),
            (Code::new(3, 1).expect("code"), 9),
            (Code::new(10, 4).expect("code"), 65_537),
        ] {
            let pack = pack_of(len, 7);
            let id = *blake3::hash(&pack).as_bytes();
            let files = encode_pack_files(code, id, &pack);
            let shards = encode_pack(code, id, &pack);
            assert_eq!(files.len(), shards.len());
            for (file, shard) in files.iter().zip(&shards) {
                assert_eq!(file.header, shard.header);
                assert_eq!(&file.bytes[..], &shard.to_file_bytes()[..]);
                let (header, payload) = parse_shard_file(&file.bytes).expect("parses");
                assert_eq!(header, file.header);
                assert_eq!(payload, &shard.payload[..]);
            }
        }
    }

    #[test]
    fn from_payload_rebuilds_the_same_file() {
        let pack = pack_of(1234, 5);
        let shards = encode(Code::default(), &pack);
        let s = &shards[5];
        let again = EncodedShard::from_payload(
            Code::default(),
            5,
            s.header.pack_id,
            1234,
            s.payload.clone(),
        )
        .expect("valid");
        assert_eq!(again.to_file_bytes(), s.to_file_bytes());
        assert!(matches!(
            EncodedShard::from_payload(Code::default(), 6, [0; 32], 1234, s.payload.clone()),
            Err(ErasureError::IndexOutOfRange { index: 6, .. })
        ));
        assert!(matches!(
            EncodedShard::from_payload(Code::default(), 1, [0; 32], 1237, s.payload.clone()),
            Err(ErasureError::ShardLength { .. })
        ));
    }

    #[test]
    fn data_shard_span_examples() {
        let code = Code::default();
        // 100-byte pack, 25-byte shards.
        assert_eq!(data_shard_span(code, 100, 0, 100).ok(), Some(0..4));
        assert_eq!(data_shard_span(code, 100, 0, 25).ok(), Some(0..1));
        assert_eq!(data_shard_span(code, 100, 24, 2).ok(), Some(0..2));
        assert_eq!(data_shard_span(code, 100, 25, 1).ok(), Some(1..2));
        assert_eq!(data_shard_span(code, 100, 99, 1).ok(), Some(3..4));
        assert_eq!(data_shard_span(code, 100, 50, 0).ok(), Some(0..0));
        assert!(matches!(
            data_shard_span(code, 100, 99, 2),
            Err(ErasureError::RangeOutOfPack { .. })
        ));
        assert!(matches!(
            data_shard_span(code, 100, u64::MAX, 2),
            Err(ErasureError::RangeOutOfPack { .. })
        ));
    }

    /// The golden vector pins format version 1: the same pack must always
    /// encode to exactly these bytes, and these bytes must always decode.
    /// Old vectors are never edited; a new format version adds a new file.
    #[test]
    fn golden_vector_v1() {
        let text = include_str!("../tests/vectors/shard-v1-4+2.txt");
        let mut pack = None;
        let mut files = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once(' ').expect("vector line is `key hex`");
            let bytes = hex::decode(value.trim()).expect("vector value is hex");
            if key == "pack" {
                pack = Some(bytes);
            } else {
                let index: usize = key
                    .strip_prefix("shard.")
                    .and_then(|i| i.parse().ok())
                    .expect("shard.N");
                assert_eq!(index, files.len(), "shards listed in order");
                files.push(bytes);
            }
        }
        let pack = pack.expect("vector has a pack line");
        let code = Code::default();
        let encoded = encode(code, &pack);
        assert_eq!(encoded.len(), files.len());
        for (shard, file) in encoded.iter().zip(&files) {
            assert_eq!(
                &shard.to_file_bytes(),
                file,
                "shard {} bytes changed",
                shard.header.index
            );
        }
        // And the checked-in bytes decode (from parity only where possible).
        let mut s: Vec<Option<Vec<u8>>> = files
            .iter()
            .map(|f| Some(parse_shard_file(f).expect("golden parses").1.to_vec()))
            .collect();
        s[0] = None;
        s[2] = None;
        let header = ShardHeader::decode(&files[0]).expect("golden header");
        assert_eq!(header.pack_id, *blake3::hash(&pack).as_bytes());
        assert_eq!(
            decode_pack(code, header.pack_len, header.shard_len, s).expect("decode"),
            pack
        );
    }

    fn arb_code() -> impl Strategy<Value = Code> {
        (1u32..=12, 1u32..=6).prop_map(|(data, parity)| Code { data, parity })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_k_of_n_decodes(
            code in arb_code(),
            pack in prop::collection::vec(any::<u8>(), 0..3000),
            seed in any::<u64>(),
        ) {
            let shards = encode(code, &pack);
            prop_assert_eq!(shards.len() as u32, code.total());
            // Drop `parity` shards chosen by the seed (the worst case allowed).
            let n = code.total() as usize;
            let mut order: Vec<usize> = (0..n).collect();
            let mut x = seed;
            for i in (1..n).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (x >> 33) as usize % (i + 1));
            }
            let dropped: Vec<usize> = order[..code.parity as usize].to_vec();
            let shard_len = code.shard_len(pack.len() as u64);
            let back = decode_pack(code, pack.len() as u64, shard_len, slots(&shards, |i| !dropped.contains(&i)));
            prop_assert_eq!(back.ok(), Some(pack.clone()));
            let mut s = slots(&shards, |i| !dropped.contains(&i));
            let rebuilt = reconstruct_shards(code, pack.len() as u64, shard_len, &mut s).expect("reconstruct");
            prop_assert_eq!(rebuilt.len(), code.parity as usize);
            for (i, slot) in s.iter().enumerate() {
                prop_assert_eq!(slot.as_deref(), Some(&shards[i].payload[..]));
            }
            // One more loss is one too many.
            let mut too_few = slots(&shards, |i| !dropped.contains(&i));
            if let Some(slot) = too_few.iter_mut().find(|s| s.is_some()) {
                *slot = None;
            }
            let too_few_result = decode_pack(code, pack.len() as u64, shard_len, too_few);
            prop_assert!(
                matches!(too_few_result, Err(ErasureError::TooFewShards { .. })),
                "expected TooFewShards"
            );
        }

        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_shard_file(&bytes);
            let _ = ShardHeader::decode(&bytes);
        }

        #[test]
        fn parse_never_panics_on_a_mangled_header(
            pack in prop::collection::vec(any::<u8>(), 0..200),
            edits in prop::collection::vec((0usize..HEADER_LEN, any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let file = encode(Code::default(), &pack)[1].to_file_bytes();
            let mut bad = file.clone();
            for (pos, v) in edits {
                bad[pos] = v;
            }
            match parse_shard_file(&bad) {
                Ok(_) => prop_assert_eq!(&bad, &file, "a changed file was accepted"),
                Err(_) => prop_assert_ne!(&bad, &file),
            }
            let _ = parse_shard_file(&bad[..cut.index(bad.len() + 1)]);
        }

        #[test]
        fn span_covers_exactly_the_range(
            code in arb_code(),
            pack_len in 0u64..5000,
            a in any::<prop::sample::Index>(),
            b in any::<prop::sample::Index>(),
        ) {
            let offset = a.index(pack_len as usize + 1) as u64;
            let len = b.index((pack_len - offset) as usize + 1) as u64;
            let span = data_shard_span(code, pack_len, offset, len).expect("in range");
            let shard_len = code.shard_len(pack_len);
            if len == 0 {
                prop_assert!(span.is_empty());
            } else {
                prop_assert!(span.end <= code.data);
                prop_assert!(u64::from(span.start) * shard_len <= offset);
                prop_assert!(u64::from(span.end) * shard_len >= offset + len);
                // Tight: dropping either end shard would lose bytes.
                prop_assert!(u64::from(span.start + 1) * shard_len > offset);
                prop_assert!(u64::from(span.end - 1) * shard_len < offset + len);
            }
        }
    }
}
