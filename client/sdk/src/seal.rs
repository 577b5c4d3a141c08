//! Keys and encryption: the tenant's master key, blob ids, authenticated
//! encryption of blobs and other records, and passphrase-protected key
//! slots.
//!
//! This module owns every use of key material in the client. It must not do
//! I/O, and nothing it returns for storage may contain plaintext or key
//! bytes in the clear: nodes see only sealed bytes (invariant 1, zero
//! knowledge). Byte layouts are specified in `docs/format.md, part 1`.
//!
//! # Construction
//!
//! A [`MasterKey`] is 64 random bytes: a 32-byte *id key* that keys blake3
//! to name chunks ([`MasterKey::blob_id`]), and a 32-byte *encryption key*.
//! Keyed ids mean a node cannot confirm a guess of a chunk's content by
//! hashing it.
//!
//! [`MasterKey::seal`] uses AES-256-GCM (ring). GCM breaks if a nonce ever
//! repeats under one key, and a 96-bit random nonce is only safe for about
//! 2^32 messages, which a busy tenant could reach. So every seal draws a
//! fresh random 32-byte salt, derives a one-time subkey
//! `blake3::derive_key("cairn 2025 seal subkey v1", enc_key || salt)` and
//! encrypts under that subkey with a fixed all-zero nonce. Each subkey seals
//! exactly one message, so a (key, nonce) pair repeats only if two salts
//! collide: 2^-256 per pair, about 2^-128 after 2^64 seals. This is the same
//! argument as XChaCha20's HChaCha20 step: extend the nonce by hashing part
//! of it into the key. The header (magic and version) and a caller-supplied
//! associated data are authenticated, so a sealed record cannot be moved to
//! a context it was not made for; blobs use their id as associated data, so
//! the index cannot swap one blob for another.
//!
//! Blobs ([`MasterKey::encode_blob`]) are compressed with zstd level 1 (or
//! stored raw when that saves less than 1/64 of the size, e.g. JPEG), framed
//! with their exact plaintext length, then sealed. Decoding refuses a stated
//! length above [`MAX_BLOB_BYTES`] before allocating, so a hostile blob
//! cannot make the client allocate or inflate without bound, and checks the
//! decoded plaintext against its keyed id (invariant 6).
//!
//! Key slots wrap the master key under a key derived from a passphrase with
//! argon2id. The parameters travel in the slot and are capped on open
//! ([`KDF_MAX_M_KIB`], [`KDF_MAX_T`], [`KDF_MAX_P`]) so that a hostile slot
//! served by the metadata group cannot make a client allocate 100 GiB.
//!
//! Key material is wiped when dropped (`zeroize`): the master key, its
//! serialized bytes, the argon2 key-encryption key, the one-time subkeys and
//! the hasher that derives them. (The AES key schedules inside `ring` are
//! outside our reach.) The `Debug` impl never prints a key.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use rand::RngCore;
use rand::rngs::OsRng;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A blob's id: blake3 keyed with the tenant's id key, over the plaintext.
pub type BlobId = [u8; 32];

/// Largest plaintext a blob may hold, and the cap on decompression output.
///
/// Data chunks are at most [`crate::chunker::MAX_CHUNK`], but a tree lists
/// 36 bytes per chunk of each file, so one file of ~28 GiB (at the 32 KiB
/// average chunk) fills a 32 MiB tree. The cap keeps a pack holding such a
/// tree (after up to [`crate::pack::PACK_TARGET_BYTES`] of other blobs)
/// under the 64 MiB gRPC message limit.
pub const MAX_BLOB_BYTES: usize = 32 * 1024 * 1024;

/// Magic and version opening every sealed record.
const SEAL_MAGIC: [u8; 2] = *b"CS";
const SEAL_VERSION: u8 = 1;
const SEAL_HEADER_LEN: usize = SEAL_MAGIC.len() + 1;
const SALT_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Bytes [`MasterKey::seal`] adds to a plaintext: header, salt and GCM tag.
pub const SEAL_OVERHEAD: usize = SEAL_HEADER_LEN + SALT_LEN + TAG_LEN;
const SUBKEY_CONTEXT: &str = "cairn 2025 seal subkey v1";
const CHUNKER_SEED_CONTEXT: &str = "cairn 2025 chunker seed v1";
const ROOM_KEY_CONTEXT: &str = "cairn 2026 stream room key v1";

/// Magic and version of a snapshot record's sealed part (format v2; v1 was
/// a bare sealed record bound to the snapshot id only). See
/// `docs/format.md`, "Snapshot records".
const SNAPSHOT_MAGIC: [u8; 4] = *b"CSNP";
/// Version of the snapshot record format this client writes.
pub const SNAPSHOT_RECORD_VERSION: u8 = 2;
const SNAPSHOT_HEADER_LEN: usize = SNAPSHOT_MAGIC.len() + 1;
/// Domain separation of the associated data of a v2 snapshot record.
const SNAPSHOT_AAD_CONTEXT: &[u8] = b"cairn 2026 snapshot record v2\0";

/// Codec byte at the start of a blob's inner frame.
const CODEC_STORED: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// zstd with a compression dictionary: the dictionary's id (32 bytes)
/// follows the length, then the zstd frame.
const CODEC_ZSTD_DICT: u8 = 2;
const BLOB_FRAME_LEN: usize = 1 + 4;
/// Associated data of a sealed dictionary: this context, then its id.
const DICTIONARY_AAD_CONTEXT: &[u8] = b"cairn 2026 compression dictionary v1\0";
/// Dictionaries' prepared decompression contexts kept per thread.
const DICT_DECOMPRESSORS_PER_THREAD: usize = 8;
/// zstd level: level 1 is the fast end; backups are CPU-bound on 2 cores.
const ZSTD_LEVEL: i32 = 1;

/// Key slot layout constants (see `docs/format.md, part 1`).
const SLOT_MAGIC: [u8; 8] = *b"CAIRNKEY";
const SLOT_VERSION: u8 = 1;
const SLOT_SALT_LEN: usize = 16;
const SLOT_HEADER_LEN: usize = SLOT_MAGIC.len() + 1 + 3 * 4 + SLOT_SALT_LEN + NONCE_LEN;
const MASTER_KEY_LEN: usize = 64;
/// Exact length of a version 1 key slot.
pub const KEY_SLOT_LEN: usize = SLOT_HEADER_LEN + MASTER_KEY_LEN + TAG_LEN;

/// Largest argon2 memory cost accepted, in KiB (1 GiB).
pub const KDF_MAX_M_KIB: u32 = 1024 * 1024;
/// Largest argon2 pass count accepted.
pub const KDF_MAX_T: u32 = 16;
/// Largest argon2 lane count accepted.
pub const KDF_MAX_P: u32 = 16;
/// Smallest argon2 memory cost accepted, in KiB; also argon2's own floor
/// of 8 KiB per lane applies.
pub const KDF_MIN_M_KIB: u32 = 8 * 1024;

/// Errors from sealing, opening, blob coding and key slots.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The input is shorter than the smallest valid record of its kind.
    #[error("sealed record truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes given.
        len: usize,
        /// Smallest valid size.
        min: usize,
    },
    /// The input does not start with the sealed-record magic.
    #[error("not a sealed Cairn record (bad magic)")]
    BadMagic,
    /// Written by a newer client.
    #[error(
        "sealed record version {version} is not supported by this client (it reads {SEAL_VERSION}); upgrade the client"
    )]
    UnsupportedVersion {
        /// Version byte found.
        version: u8,
    },
    /// Tag check failed.
    #[error(
        "authentication failed: the record is corrupted or tampered with, or belongs to another key or context"
    )]
    Authentication,
    /// A snapshot record written by a newer client.
    #[error(
        "snapshot record version {version} is not supported by this client (it reads 1 and {SNAPSHOT_RECORD_VERSION}); upgrade the client"
    )]
    UnsupportedSnapshotVersion {
        /// Version byte found.
        version: u8,
    },
    /// A blob's codec byte names no known codec.
    #[error("blob uses unknown codec {codec}; upgrade the client")]
    UnknownCodec {
        /// Codec byte found.
        codec: u8,
    },
    /// A blob plaintext is larger than any blob may be.
    #[error("blob of {size} bytes exceeds the {max}-byte limit")]
    BlobTooLarge {
        /// Size given or claimed.
        size: usize,
        /// [`MAX_BLOB_BYTES`].
        max: usize,
    },
    /// zstd failed to compress. (The cause is in the message, so it is
    /// not also a `source()`.)
    #[error("zstd compression failed: {error}")]
    Compress {
        /// zstd's error.
        error: std::io::Error,
    },
    /// zstd failed to decompress, or the output would exceed the stated size.
    #[error("blob decompression failed: {error}")]
    Decompress {
        /// zstd's error.
        error: std::io::Error,
    },
    /// The decoded blob is not as long as its frame says.
    #[error("blob frame says {stated} bytes but {actual} were decoded")]
    LengthMismatch {
        /// Length written in the frame.
        stated: usize,
        /// Length decoded.
        actual: usize,
    },
    /// The plaintext does not hash to the id it was stored or requested under.
    #[error(
        "blob content does not match its id {expected} (content hashes to {actual}); the index points at the wrong blob or the data is corrupt"
    )]
    IdMismatch {
        /// Hex of the id asked for.
        expected: String,
        /// Hex of the id of the content.
        actual: String,
    },
    /// A blob was compressed with a dictionary this client has not loaded.
    #[error(
        "blob needs compression dictionary {id}, which is not loaded: the tenant's dictionaries do not include it (stored by another client after this one listed them, or lost from the metadata group)"
    )]
    UnknownDictionary {
        /// Hex of the dictionary id the blob names.
        id: String,
    },
    /// A sealed dictionary whose bytes do not hash to its id.
    #[error(
        "compression dictionary {id} does not match its id; the metadata group served a wrong or damaged record"
    )]
    DictionaryMismatch {
        /// Hex of the id it was stored under.
        id: String,
    },
    /// The passphrase did not open the key slot (or the slot is damaged).
    #[error("wrong password")]
    WrongPassword,
    /// An empty passphrase was given to protect a key.
    #[error("refusing to protect the master key with an empty password")]
    EmptyPassword,
    /// The bytes are not a key slot.
    #[error("not a Cairn key slot (bad magic or length {len}, expected {KEY_SLOT_LEN})")]
    NotAKeySlot {
        /// Bytes given.
        len: usize,
    },
    /// The key slot was written by a newer client.
    #[error(
        "key slot version {version} is not supported by this client (it reads {SLOT_VERSION}); upgrade the client"
    )]
    UnsupportedKeySlotVersion {
        /// Version byte found.
        version: u8,
    },
    /// KDF parameters outside the accepted range.
    #[error(
        "argon2 parameters m={m_kib} KiB, t={t}, p={p} are outside the accepted range (m {KDF_MIN_M_KIB}..={KDF_MAX_M_KIB} KiB and >= 8*p, t 1..={KDF_MAX_T}, p 1..={KDF_MAX_P})"
    )]
    KdfParamsOutOfRange {
        /// Memory cost in KiB.
        m_kib: u32,
        /// Passes.
        t: u32,
        /// Lanes.
        p: u32,
    },
    /// argon2 itself failed (not expected once parameters are validated).
    #[error("argon2 key derivation failed: {reason}")]
    Kdf {
        /// argon2's description (its error type is not `std::error::Error` here).
        reason: String,
    },
}

/// The fields of a snapshot record that the metadata group stores in the
/// clear, which a v2 record authenticates together with its sealed part.
///
/// A node that edits any of them (a swapped root tree, a re-labelled time
/// that would change `latest`), or moves a sealed part to another record or
/// tenant, makes the record fail to open.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotFields<'a> {
    pub tenant: &'a str,
    pub id: &'a BlobId,
    pub dataset: &'a str,
    pub parent: Option<&'a BlobId>,
    pub time_unix_ms: i64,
    pub kind: &'a str,
    pub root_tree: &'a BlobId,
    pub files: u64,
    pub bytes: u64,
    pub bytes_added: u64,
    pub tags: &'a [String],
}

impl SnapshotFields<'_> {
    /// The associated data: the record header, then every field in a fixed
    /// order, variable-length ones prefixed with their u32 LE length, so
    /// two different field sets never encode alike.
    fn aad(&self, header: &[u8]) -> Vec<u8> {
        fn text(out: &mut Vec<u8>, value: &str) {
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(SNAPSHOT_AAD_CONTEXT);
        out.extend_from_slice(header);
        text(&mut out, self.tenant);
        out.extend_from_slice(self.id);
        text(&mut out, self.dataset);
        match self.parent {
            Some(parent) => {
                out.push(1);
                out.extend_from_slice(parent);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.time_unix_ms.to_le_bytes());
        text(&mut out, self.kind);
        out.extend_from_slice(self.root_tree);
        out.extend_from_slice(&self.files.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out.extend_from_slice(&self.bytes_added.to_le_bytes());
        out.extend_from_slice(&(self.tags.len() as u32).to_le_bytes());
        for tag in self.tags {
            text(&mut out, tag);
        }
        out
    }
}

/// How much of an opened snapshot record was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAuth {
    /// Format v2: the sealed part and every clear field.
    Full,
    /// Format v1 (written before v2 existed): only the sealed part and the
    /// snapshot id; the clear fields could have been edited by a node.
    SealedPartOnly,
}

/// The tenant's master key: an id key for keyed blake3 and an encryption key.
///
/// Never leaves the client except wrapped in a key slot, and is wiped from
/// memory when dropped.
#[derive(Clone)]
pub struct MasterKey {
    id_key: [u8; 32],
    enc_key: [u8; 32],
    /// Compression dictionaries loaded for this tenant, by id; shared by
    /// the clones of the key (a repository's workers), so one loaded or
    /// trained by any of them serves every decode.
    dictionaries: Arc<RwLock<HashMap<DictionaryId, Arc<Dictionary>>>>,
}

/// A compression dictionary's id: blake3 keyed with the tenant's id key
/// over the dictionary bytes ([`MasterKey::blob_id`]).
pub type DictionaryId = [u8; 32];

/// A zstd compression dictionary of a tenant (plaintext: trained on its
/// data; stored only sealed, see [`MasterKey::seal_dictionary`]).
pub struct Dictionary {
    id: DictionaryId,
    bytes: Vec<u8>,
}

impl Dictionary {
    /// The dictionary's id.
    pub fn id(&self) -> &DictionaryId {
        &self.id
    }

    /// The raw dictionary.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Dictionary({}, {} bytes)",
            hex::encode(&self.id[..8]),
            self.bytes.len()
        )
    }
}

impl Zeroize for MasterKey {
    fn zeroize(&mut self) {
        self.id_key.zeroize();
        self.enc_key.zeroize();
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for MasterKey {}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        OsRng.fill_bytes(bytes.as_mut());
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8; MASTER_KEY_LEN]) -> Self {
        let (id, enc) = bytes.split_at(32);
        let mut key = Self {
            id_key: [0; 32],
            enc_key: [0; 32],
            dictionaries: Arc::default(),
        };
        key.id_key.copy_from_slice(id);
        key.enc_key.copy_from_slice(enc);
        key
    }

    fn to_bytes(&self) -> Zeroizing<[u8; MASTER_KEY_LEN]> {
        let mut bytes = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        bytes[..32].copy_from_slice(&self.id_key);
        bytes[32..].copy_from_slice(&self.enc_key);
        bytes
    }

    /// The id of a chunk or tree: blake3 keyed with the id key.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        *blake3::keyed_hash(&self.id_key, plaintext).as_bytes()
    }

    /// A secret, stable seed for [`crate::chunker::Chunker::with_seed`], so
    /// that chunk boundaries (and the blob sizes nodes see) depend on the
    /// tenant's key as well as on the content.
    pub fn chunker_seed(&self) -> u64 {
        let derived = blake3::derive_key(CHUNKER_SEED_CONTEXT, &self.id_key);
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&derived[..8]);
        u64::from_le_bytes(seed)
    }

    /// The key a stream's room is indexed by on nodes
    /// ([`crate::stream::record::room_key`]): a keyed hash of the dataset and
    /// the room name, with a key derived from the id key.
    pub fn room_key(&self, dataset: &[u8], room: &[u8]) -> [u8; 32] {
        let key = Zeroizing::new(blake3::derive_key(ROOM_KEY_CONTEXT, &self.id_key));
        let mut hasher = blake3::Hasher::new_keyed(&key);
        hasher.update(&(dataset.len() as u64).to_le_bytes());
        hasher.update(dataset);
        hasher.update(room);
        let out = *hasher.finalize().as_bytes();
        hasher.zeroize();
        out
    }

    fn subkey(&self, salt: &[u8]) -> LessSafeKey {
        let mut hasher = blake3::Hasher::new_derive_key(SUBKEY_CONTEXT);
        hasher.update(&self.enc_key);
        hasher.update(salt);
        let subkey = Zeroizing::new(*hasher.finalize().as_bytes());
        hasher.zeroize();
        let unbound = UnboundKey::new(&AES_256_GCM, subkey.as_ref())
            .expect("a 32-byte key is always valid for AES-256-GCM");
        LessSafeKey::new(unbound)
    }

    /// Encrypt and authenticate `plaintext`, binding `aad` (which is not
    /// stored: the opener must supply the same bytes).
    ///
    /// Two seals of the same input differ (fresh salt).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut salt = [0u8; SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        self.seal_with_salt(plaintext, aad, &salt)
    }

    /// [`MasterKey::seal`] with a given salt. Private: a repeated salt
    /// repeats the (subkey, nonce) pair; only golden tests pass a fixed one.
    fn seal_with_salt(&self, plaintext: &[u8], aad: &[u8], salt: &[u8; SALT_LEN]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        out.extend_from_slice(&SEAL_MAGIC);
        out.push(SEAL_VERSION);
        out.extend_from_slice(salt);
        out.extend_from_slice(plaintext);
        let full_aad = [&out[..SEAL_HEADER_LEN], aad].concat();
        let key = self.subkey(salt);
        let tag = key
            .seal_in_place_separate_tag(
                zero_nonce(),
                Aad::from(&full_aad[..]),
                &mut out[SEAL_HEADER_LEN + SALT_LEN..],
            )
            // ring refuses only inputs above GCM's 64 GiB per-key limit;
            // everything Cairn seals (blobs, trailers, records) is far smaller.
            .expect("AES-GCM input below 64 GiB");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Verify and decrypt a record made by [`MasterKey::seal`] with the same `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Truncated {
                len: sealed.len(),
                min: SEAL_OVERHEAD,
            });
        }
        if sealed[..SEAL_MAGIC.len()] != SEAL_MAGIC {
            return Err(SealError::BadMagic);
        }
        let version = sealed[SEAL_MAGIC.len()];
        if version != SEAL_VERSION {
            return Err(SealError::UnsupportedVersion { version });
        }
        let (header, rest) = sealed.split_at(SEAL_HEADER_LEN);
        let (salt, ciphertext) = rest.split_at(SALT_LEN);
        let full_aad = [header, aad].concat();
        let mut buf = ciphertext.to_vec();
        let plain_len = self
            .subkey(salt)
            .open_in_place(zero_nonce(), Aad::from(&full_aad[..]), &mut buf)
            .map_err(|_| SealError::Authentication)?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }

    /// The sealed part of a snapshot record (format v2): `info` sealed with
    /// every clear field of the record as associated data.
    pub fn seal_snapshot_info(&self, fields: &SnapshotFields<'_>, info: &[u8]) -> Vec<u8> {
        let mut salt = [0u8; SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        self.seal_snapshot_info_with_salt(fields, info, &salt)
    }

    fn seal_snapshot_info_with_salt(
        &self,
        fields: &SnapshotFields<'_>,
        info: &[u8],
        salt: &[u8; SALT_LEN],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER_LEN + SEAL_OVERHEAD + info.len());
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_RECORD_VERSION);
        let aad = fields.aad(&out);
        out.extend_from_slice(&self.seal_with_salt(info, &aad, salt));
        out
    }

    /// Opens the sealed part of a snapshot record, checking it against the
    /// record's clear fields. Format v1 records (a bare sealed record bound
    /// only to the snapshot id) still open, reported as
    /// [`SnapshotAuth::SealedPartOnly`] so the caller can warn.
    pub fn open_snapshot_info(
        &self,
        fields: &SnapshotFields<'_>,
        sealed: &[u8],
    ) -> Result<(Vec<u8>, SnapshotAuth), SealError> {
        if sealed.starts_with(&SNAPSHOT_MAGIC) {
            let Some(&version) = sealed.get(SNAPSHOT_MAGIC.len()) else {
                return Err(SealError::Truncated {
                    len: sealed.len(),
                    min: SNAPSHOT_HEADER_LEN + SEAL_OVERHEAD,
                });
            };
            if version != SNAPSHOT_RECORD_VERSION {
                return Err(SealError::UnsupportedSnapshotVersion { version });
            }
            let (header, rest) = sealed.split_at(SNAPSHOT_HEADER_LEN);
            let info = self.open(rest, &fields.aad(header))?;
            return Ok((info, SnapshotAuth::Full));
        }
        // v1: `seal(info, id)`. It cannot be made from a v2 record (the
        // associated data differs), so there is no downgrade path.
        let info = self.open(sealed, fields.id)?;
        Ok((info, SnapshotAuth::SealedPartOnly))
    }

    /// Compress (zstd level 1, or stored raw if that does not help) and seal
    /// a chunk or tree under its id. `id` must be `self.blob_id(plaintext)`;
    /// this is checked, so a wrong id fails here rather than at restore.
    pub fn encode_blob(&self, id: &BlobId, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.encode_blob_with(id, plaintext, None)
            .map(|(blob, _)| blob)
    }

    /// [`MasterKey::encode_blob`], compressing with `dictionary` if given
    /// (which must be stored for the tenant before the blob is: a reader
    /// needs it). Also says whether the blob was compressed (false: stored
    /// raw, as incompressible).
    pub fn encode_blob_with(
        &self,
        id: &BlobId,
        plaintext: &[u8],
        dictionary: Option<&Arc<Dictionary>>,
    ) -> Result<(Vec<u8>, bool), SealError> {
        if plaintext.len() > MAX_BLOB_BYTES {
            return Err(SealError::BlobTooLarge {
                size: plaintext.len(),
                max: MAX_BLOB_BYTES,
            });
        }
        self.check_id(id, plaintext)?;
        let (codec, compressed) = match dictionary {
            Some(dictionary) => (CODEC_ZSTD_DICT, zstd_compress_with(plaintext, dictionary)),
            None => (CODEC_ZSTD, zstd_compress(plaintext)),
        };
        let compressed = compressed.map_err(|error| SealError::Compress { error })?;
        let dictionary_id = match dictionary {
            Some(dictionary) => &dictionary.id[..],
            None => &[][..],
        };
        // Keep zstd only when it saves at least 1/64 (counting the
        // dictionary id): decompression is not free, and already-compressed
        // media would gain nothing.
        let worth_it =
            compressed.len() + dictionary_id.len() < plaintext.len() - plaintext.len() / 64;
        let (codec, prefix, payload) = if worth_it {
            (codec, dictionary_id, &compressed[..])
        } else {
            (CODEC_STORED, &[][..], plaintext)
        };
        let stated = u32::try_from(plaintext.len())
            .expect("MAX_BLOB_BYTES fits in u32 and was checked above");
        let mut frame = Vec::with_capacity(BLOB_FRAME_LEN + prefix.len() + payload.len());
        frame.push(codec);
        frame.extend_from_slice(&stated.to_le_bytes());
        frame.extend_from_slice(prefix);
        frame.extend_from_slice(payload);
        Ok((self.seal(&frame, id), worth_it))
    }

    /// Open, decompress (bounded by [`MAX_BLOB_BYTES`]) and verify a blob
    /// made by [`MasterKey::encode_blob`]. Fails with
    /// [`SealError::IdMismatch`] if the content does not hash to `id`, and
    /// with [`SealError::UnknownDictionary`] if it was compressed with a
    /// dictionary this key has not loaded ([`MasterKey::add_dictionary`]).
    pub fn decode_blob(&self, id: &BlobId, blob: &[u8]) -> Result<Vec<u8>, SealError> {
        let frame = self.open(blob, id)?;
        if frame.len() < BLOB_FRAME_LEN {
            return Err(SealError::Truncated {
                len: frame.len(),
                min: BLOB_FRAME_LEN,
            });
        }
        let codec = frame[0];
        let mut stated_bytes = [0u8; 4];
        stated_bytes.copy_from_slice(&frame[1..BLOB_FRAME_LEN]);
        let stated = u32::from_le_bytes(stated_bytes) as usize;
        if stated > MAX_BLOB_BYTES {
            return Err(SealError::BlobTooLarge {
                size: stated,
                max: MAX_BLOB_BYTES,
            });
        }
        let payload = &frame[BLOB_FRAME_LEN..];
        let plaintext = match codec {
            CODEC_STORED => {
                let mut frame = frame;
                frame.drain(..BLOB_FRAME_LEN);
                frame
            }
            // The capacity is both the allocation and the hard cap: zstd
            // fails rather than write more, so no bomb gets past `stated`.
            CODEC_ZSTD => {
                zstd_decompress(payload, stated).map_err(|error| SealError::Decompress { error })?
            }
            CODEC_ZSTD_DICT => {
                let Some((dictionary_id, payload)) = payload.split_first_chunk::<32>() else {
                    return Err(SealError::Truncated {
                        len: frame.len(),
                        min: BLOB_FRAME_LEN + 32,
                    });
                };
                let dictionary =
                    self.dictionary(dictionary_id)
                        .ok_or_else(|| SealError::UnknownDictionary {
                            id: hex::encode(dictionary_id),
                        })?;
                zstd_decompress_with(payload, stated, &dictionary)
                    .map_err(|error| SealError::Decompress { error })?
            }
            codec => return Err(SealError::UnknownCodec { codec }),
        };
        if plaintext.len() != stated {
            return Err(SealError::LengthMismatch {
                stated,
                actual: plaintext.len(),
            });
        }
        self.check_id(id, &plaintext)?;
        Ok(plaintext)
    }

    /// A dictionary of raw zstd dictionary bytes, named by this key.
    pub fn make_dictionary(&self, bytes: Vec<u8>) -> Arc<Dictionary> {
        Arc::new(Dictionary {
            id: self.blob_id(&bytes),
            bytes,
        })
    }

    /// The dictionary sealed for the metadata group, bound to its id.
    pub fn seal_dictionary(&self, dictionary: &Dictionary) -> Vec<u8> {
        self.seal(&dictionary.bytes, &dictionary_aad(&dictionary.id))
    }

    /// Opens a dictionary sealed by [`MasterKey::seal_dictionary`] under
    /// `id`, checking its bytes against the id.
    pub fn open_dictionary(
        &self,
        id: &DictionaryId,
        sealed: &[u8],
    ) -> Result<Arc<Dictionary>, SealError> {
        let bytes = self.open(sealed, &dictionary_aad(id))?;
        let dictionary = self.make_dictionary(bytes);
        if &dictionary.id != id {
            return Err(SealError::DictionaryMismatch {
                id: hex::encode(id),
            });
        }
        Ok(dictionary)
    }

    /// Makes `dictionary` available to [`MasterKey::decode_blob`] of this
    /// key and its clones.
    pub fn add_dictionary(&self, dictionary: Arc<Dictionary>) {
        self.dictionaries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dictionary.id, dictionary);
    }

    /// The loaded dictionary with this id.
    pub fn dictionary(&self, id: &DictionaryId) -> Option<Arc<Dictionary>> {
        self.dictionaries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn check_id(&self, id: &BlobId, plaintext: &[u8]) -> Result<(), SealError> {
        let actual = self.blob_id(plaintext);
        if &actual != id {
            return Err(SealError::IdMismatch {
                expected: hex::encode(id),
                actual: hex::encode(actual),
            });
        }
        Ok(())
    }
}

thread_local! {
    // One zstd context per thread, reused: creating one per 32 KiB chunk
    // cost ~20 % of compression time (measured on chat logs, level 1).
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
    // With a dictionary: the context keeps the dictionary loaded (zstd
    // prepares it once, on first use), so each chunk pays only its own
    // compression. Keyed by the dictionary itself (pointer), not its id.
    static DICT_COMPRESSOR: RefCell<Option<(Arc<Dictionary>, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DICT_DECOMPRESSORS: RefCell<Vec<(Arc<Dictionary>, zstd::bulk::Decompressor<'static>)>> =
        const { RefCell::new(Vec::new()) };
}

fn dictionary_aad(id: &DictionaryId) -> Vec<u8> {
    [DICTIONARY_AAD_CONTEXT, &id[..]].concat()
}

/// [`zstd_compress`] with `dictionary`, on this thread's context for it.
fn zstd_compress_with(data: &[u8], dictionary: &Arc<Dictionary>) -> std::io::Result<Vec<u8>> {
    DICT_COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((d, _)) if Arc::ptr_eq(d, dictionary)) {
            *slot = None;
            let compressor =
                zstd::bulk::Compressor::with_dictionary(ZSTD_LEVEL, &dictionary.bytes)?;
            *slot = Some((dictionary.clone(), compressor));
        }
        match &mut *slot {
            Some((_, compressor)) => compressor.compress(data),
            None => Err(std::io::Error::other("no compression context")),
        }
    })
}

/// [`zstd_decompress`] with `dictionary`, on this thread's context for it
/// (a few kept per thread, the oldest dropped first).
fn zstd_decompress_with(
    data: &[u8],
    capacity: usize,
    dictionary: &Arc<Dictionary>,
) -> std::io::Result<Vec<u8>> {
    DICT_DECOMPRESSORS.with(|cell| {
        let mut contexts = cell.borrow_mut();
        let index = match contexts
            .iter()
            .position(|(d, _)| Arc::ptr_eq(d, dictionary))
        {
            Some(index) => index,
            None => {
                if contexts.len() >= DICT_DECOMPRESSORS_PER_THREAD {
                    contexts.remove(0);
                }
                let decompressor = zstd::bulk::Decompressor::with_dictionary(&dictionary.bytes)?;
                contexts.push((dictionary.clone(), decompressor));
                contexts.len() - 1
            }
        };
        contexts[index].1.decompress(data, capacity)
    })
}

/// `zstd::bulk::compress(data, ZSTD_LEVEL)` on this thread's reused context.
fn zstd_compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match &mut *slot {
            Some(c) => c,
            empty => empty.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        compressor.compress(data)
    })
}

/// `zstd::bulk::decompress(data, capacity)` on this thread's reused
/// context: fails rather than produce more than `capacity` bytes.
fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match &mut *slot {
            Some(d) => d,
            empty => empty.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(data, capacity)
    })
}

fn zero_nonce() -> Nonce {
    // Safe only because every subkey seals exactly one message (module doc).
    Nonce::assume_unique_for_key([0u8; NONCE_LEN])
}

/// argon2id cost parameters for a key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_kib: u32,
    /// Number of passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for KdfParams {
    /// Interactive strength: 64 MiB, 3 passes, 1 lane (well under a second).
    fn default() -> Self {
        Self {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only: 8 MiB, 1 pass.
    pub fn fast_for_tests() -> Self {
        Self {
            m_kib: KDF_MIN_M_KIB,
            t: 1,
            p: 1,
        }
    }

    fn validate(self) -> Result<argon2::Params, SealError> {
        let out_of_range = SealError::KdfParamsOutOfRange {
            m_kib: self.m_kib,
            t: self.t,
            p: self.p,
        };
        let ok = (1..=KDF_MAX_P).contains(&self.p)
            && (1..=KDF_MAX_T).contains(&self.t)
            && (KDF_MIN_M_KIB..=KDF_MAX_M_KIB).contains(&self.m_kib)
            && self.m_kib >= 8 * self.p;
        if !ok {
            return Err(out_of_range);
        }
        argon2::Params::new(self.m_kib, self.t, self.p, Some(32)).map_err(|_| out_of_range)
    }

    fn derive(self, passphrase: &[u8], salt: &[u8]) -> Result<LessSafeKey, SealError> {
        let params = self.validate()?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase, salt, kek.as_mut())
            .map_err(|e| SealError::Kdf {
                reason: e.to_string(),
            })?;
        let unbound = UnboundKey::new(&AES_256_GCM, kek.as_ref())
            .expect("a 32-byte key is always valid for AES-256-GCM");
        Ok(LessSafeKey::new(unbound))
    }
}

/// Wrap `master` under `passphrase`: argon2id (random 16-byte salt) derives
/// a key-encryption key that seals the master key with AES-256-GCM.
///
/// The slot is safe to store on nodes; it is [`KEY_SLOT_LEN`] bytes.
pub fn create_key_slot(
    master: &MasterKey,
    passphrase: &[u8],
    params: KdfParams,
) -> Result<Vec<u8>, SealError> {
    if passphrase.is_empty() {
        return Err(SealError::EmptyPassword);
    }
    let mut salt = [0u8; SLOT_SALT_LEN];
    OsRng.fill_bytes(&mut salt);
    // A random nonce is fine here: each slot has its own salt, hence its own
    // KEK, and a KEK seals exactly one message.
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let kek = params.derive(passphrase, &salt)?;

    let mut slot = Vec::with_capacity(KEY_SLOT_LEN);
    slot.extend_from_slice(&SLOT_MAGIC);
    slot.push(SLOT_VERSION);
    slot.extend_from_slice(&params.m_kib.to_le_bytes());
    slot.extend_from_slice(&params.t.to_le_bytes());
    slot.extend_from_slice(&params.p.to_le_bytes());
    slot.extend_from_slice(&salt);
    slot.extend_from_slice(&nonce);
    debug_assert_eq!(slot.len(), SLOT_HEADER_LEN);
    let header = slot.clone();
    slot.extend_from_slice(master.to_bytes().as_ref());
    let tag = kek
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&header[..]),
            &mut slot[SLOT_HEADER_LEN..],
        )
        .expect("64 bytes are below AES-GCM's input limit");
    slot.extend_from_slice(tag.as_ref());
    debug_assert_eq!(slot.len(), KEY_SLOT_LEN);
    Ok(slot)
}

/// Unwrap the master key from a slot made by [`create_key_slot`].
///
/// A wrong passphrase (or a damaged slot: the two cannot be told apart)
/// gives [`SealError::WrongPassword`]. Parameters beyond the caps are
/// refused before any memory is allocated for argon2.
pub fn open_key_slot(slot: &[u8], passphrase: &[u8]) -> Result<MasterKey, SealError> {
    if slot.len() < SLOT_MAGIC.len() + 1 || slot[..SLOT_MAGIC.len()] != SLOT_MAGIC {
        return Err(SealError::NotAKeySlot { len: slot.len() });
    }
    let version = slot[SLOT_MAGIC.len()];
    if version != SLOT_VERSION {
        return Err(SealError::UnsupportedKeySlotVersion { version });
    }
    if slot.len() != KEY_SLOT_LEN {
        return Err(SealError::NotAKeySlot { len: slot.len() });
    }
    let u32_at = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&slot[at..at + 4]);
        u32::from_le_bytes(b)
    };
    let params = KdfParams {
        m_kib: u32_at(9),
        t: u32_at(13),
        p: u32_at(17),
    };
    let salt = &slot[21..21 + SLOT_SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&slot[21 + SLOT_SALT_LEN..SLOT_HEADER_LEN]);
    let kek = params.derive(passphrase, salt)?;
    let mut buf = Zeroizing::new(slot[SLOT_HEADER_LEN..].to_vec());
    let plain = kek
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&slot[..SLOT_HEADER_LEN]),
            &mut buf,
        )
        .map_err(|_| SealError::WrongPassword)?;
    let bytes: &[u8; MASTER_KEY_LEN] = (&*plain)
        .try_into()
        .expect("slot length is fixed, so the plaintext is exactly 64 bytes");
    Ok(MasterKey::from_bytes(bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    #[test]
    fn a_slot_added_with_a_new_passphrase_unlocks_the_same_master_key() {
        let key = MasterKey::generate();
        let params = KdfParams::fast_for_tests();
        let first = create_key_slot(&key, b"old passphrase", params).expect("slot");
        let unlocked = open_key_slot(&first, b"old passphrase").expect("opens");
        // `cairn key add`: the unlocked key wrapped under a new passphrase.
        let second = create_key_slot(&unlocked, b"new passphrase", params).expect("slot");
        let reopened = open_key_slot(&second, b"new passphrase").expect("opens");
        assert_eq!(reopened.to_bytes(), key.to_bytes());
        assert_eq!(reopened.blob_id(b"chunk"), key.blob_id(b"chunk"));
        let sealed = key.seal(b"data", b"aad");
        assert_eq!(reopened.open(&sealed, b"aad").expect("opens"), b"data");
        assert!(matches!(
            open_key_slot(&second, b"old passphrase"),
            Err(SealError::WrongPassword)
        ));
    }

    #[test]
    fn key_material_is_wiped() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<MasterKey>();
        let mut key = MasterKey::generate();
        assert_ne!(*key.to_bytes(), [0u8; MASTER_KEY_LEN]);
        key.zeroize();
        assert_eq!(*key.to_bytes(), [0u8; MASTER_KEY_LEN]);
        assert_eq!(format!("{key:?}"), "MasterKey(<redacted>)");
    }

    /// The key of the golden vectors: bytes 0, 1, ..., 63 (id key first).
    pub(crate) fn golden_key() -> MasterKey {
        let mut bytes = [0u8; MASTER_KEY_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        MasterKey::from_bytes(&bytes)
    }

    /// A golden vector from `client/sdk/tests/vectors/`. Vectors are written
    /// once (run the tests with `CAIRN_WRITE_VECTORS=1` to create missing
    /// files) and never edited afterwards: new format versions add files.
    pub(crate) fn golden_vector(name: &str, make: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/vectors")
            .join(name);
        match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::env::var_os("CAIRN_WRITE_VECTORS").is_some() =>
            {
                let bytes = make();
                std::fs::create_dir_all(path.parent().expect("vectors dir")).expect("mkdir");
                std::fs::write(&path, &bytes).expect("write vector");
                bytes
            }
            Err(e) => panic!("golden vector {} missing: {e}", path.display()),
        }
    }

    /// Plaintexts of the golden blobs.
    pub(crate) const GOLDEN_TEXT: &[u8] =
        b"{\"room\":\"000001\",\"user\":42,\"msg\":\"666 666 666\"}\n\
        {\"room\":\"000001\",\"user\":43,\"msg\":\"666 666 666\"}\n\
        {\"room\":\"000001\",\"user\":44,\"msg\":\"666 666 666\"}\n";

    pub(crate) fn golden_noise() -> Vec<u8> {
        let mut out = vec![0u8; 200];
        blake3::Hasher::new()
            .update(b"cairn golden noise")
            .finalize_xof()
            .fill(&mut out);
        out
    }

    #[test]
    fn golden_sealed_record_v1() {
        let key = golden_key();
        let make = || key.seal_with_salt(b"cairn golden sealed record", b"golden aad", &[0x5a; 32]);
        let golden = golden_vector("sealed-record-v1.bin", make);
        // Byte-exact both ways: this client writes v1 as specified, and reads it.
        assert_eq!(golden, make());
        assert_eq!(
            key.open(&golden, b"golden aad").expect("opens"),
            b"cairn golden sealed record"
        );
    }

    #[test]
    fn golden_blobs_v1() {
        let key = golden_key();
        let text_id = key.blob_id(GOLDEN_TEXT);
        let zstd = golden_vector("blob-v1-zstd.bin", || {
            key.encode_blob(&text_id, GOLDEN_TEXT).expect("encodes")
        });
        assert_eq!(
            key.decode_blob(&text_id, &zstd).expect("decodes"),
            GOLDEN_TEXT
        );
        assert_eq!(key.open(&zstd, &text_id).expect("opens")[0], CODEC_ZSTD);

        let noise = golden_noise();
        let noise_id = key.blob_id(&noise);
        let stored = golden_vector("blob-v1-stored.bin", || {
            key.encode_blob(&noise_id, &noise).expect("encodes")
        });
        assert_eq!(key.decode_blob(&noise_id, &stored).expect("decodes"), noise);
        assert_eq!(
            key.open(&stored, &noise_id).expect("opens")[0],
            CODEC_STORED
        );
        // Blob ids are part of the format too (keyed blake3, unchanged).
        assert_eq!(
            hex::encode(text_id),
            hex::encode(blake3::keyed_hash(&key.id_key, GOLDEN_TEXT).as_bytes())
        );
    }

    #[test]
    fn golden_key_slot_v1() {
        let slot = golden_vector("keyslot-v1.bin", || {
            create_key_slot(
                &golden_key(),
                b"golden password",
                KdfParams::fast_for_tests(),
            )
            .expect("slot")
        });
        let opened = open_key_slot(&slot, b"golden password").expect("opens");
        assert_eq!(opened.to_bytes(), golden_key().to_bytes());
        assert!(matches!(
            open_key_slot(&slot, b"golden passwore"),
            Err(SealError::WrongPassword)
        ));
    }

    const GOLDEN_SNAPSHOT_INFO: &[u8] = br#"{"paths":["/srv/chat"],"hostname":"golden"}"#;

    /// The clear fields of the golden v2 snapshot record.
    fn with_golden_fields<T>(f: impl FnOnce(&SnapshotFields<'_>) -> T) -> T {
        let tags = vec!["daily".to_string(), "golden".to_string()];
        f(&SnapshotFields {
            tenant: "golden-tenant",
            id: &[0x11; 32],
            dataset: "chat-messages",
            parent: Some(&[0x22; 32]),
            time_unix_ms: 1_790_000_000_000,
            kind: "incremental",
            root_tree: &[0x33; 32],
            files: 7,
            bytes: 4096,
            bytes_added: 512,
            tags: &tags,
        })
    }

    #[test]
    fn golden_snapshot_record_v2() {
        let key = golden_key();
        let make = || {
            with_golden_fields(|fields| {
                key.seal_snapshot_info_with_salt(fields, GOLDEN_SNAPSHOT_INFO, &[0x6b; 32])
            })
        };
        let golden = golden_vector("snapshot-record-v2.bin", make);
        assert_eq!(golden, make());
        assert_eq!(&golden[..5], b"CSNP\x02");
        let (info, auth) =
            with_golden_fields(|fields| key.open_snapshot_info(fields, &golden)).expect("opens");
        assert_eq!(info, GOLDEN_SNAPSHOT_INFO);
        assert_eq!(auth, SnapshotAuth::Full);
    }

    #[test]
    fn every_clear_field_of_a_snapshot_record_is_authenticated() {
        let key = MasterKey::generate();
        let sealed = with_golden_fields(|f| key.seal_snapshot_info(f, b"info"));
        let other: BlobId = [0x99; 32];
        let tags = vec!["daily".to_string()];
        let more_tags = vec!["daily".to_string(), "golden".to_string(), "x".to_string()];
        with_golden_fields(|fields| {
            assert!(key.open_snapshot_info(fields, &sealed).is_ok());
            // Each edit changes one clear field, as a hostile node could.
            let edits: Vec<(&str, SnapshotFields<'_>)> = vec![
                (
                    "tenant",
                    SnapshotFields {
                        tenant: "another-tenant",
                        ..*fields
                    },
                ),
                (
                    "id",
                    SnapshotFields {
                        id: &other,
                        ..*fields
                    },
                ),
                (
                    "dataset",
                    SnapshotFields {
                        dataset: "gift-records",
                        ..*fields
                    },
                ),
                (
                    "parent",
                    SnapshotFields {
                        parent: None,
                        ..*fields
                    },
                ),
                (
                    "parent id",
                    SnapshotFields {
                        parent: Some(&other),
                        ..*fields
                    },
                ),
                (
                    "time",
                    SnapshotFields {
                        time_unix_ms: fields.time_unix_ms + 1,
                        ..*fields
                    },
                ),
                (
                    "kind",
                    SnapshotFields {
                        kind: "full",
                        ..*fields
                    },
                ),
                (
                    "root tree",
                    SnapshotFields {
                        root_tree: &other,
                        ..*fields
                    },
                ),
                (
                    "files",
                    SnapshotFields {
                        files: fields.files + 1,
                        ..*fields
                    },
                ),
                (
                    "bytes",
                    SnapshotFields {
                        bytes: fields.bytes - 1,
                        ..*fields
                    },
                ),
                (
                    "bytes added",
                    SnapshotFields {
                        bytes_added: 0,
                        ..*fields
                    },
                ),
                (
                    "tags",
                    SnapshotFields {
                        tags: &tags,
                        ..*fields
                    },
                ),
                (
                    "more tags",
                    SnapshotFields {
                        tags: &more_tags,
                        ..*fields
                    },
                ),
            ];
            for (what, changed) in &edits {
                assert!(
                    matches!(
                        key.open_snapshot_info(changed, &sealed),
                        Err(SealError::Authentication)
                    ),
                    "an edited {what} went unnoticed"
                );
            }
        });
    }

    #[test]
    fn snapshot_sealed_parts_cannot_be_swapped_or_downgraded() {
        let key = MasterKey::generate();
        let tags: Vec<String> = Vec::new();
        let old = SnapshotFields {
            tenant: "t",
            id: &[1; 32],
            dataset: "d",
            parent: None,
            time_unix_ms: 1000,
            kind: "full",
            root_tree: &[2; 32],
            files: 1,
            bytes: 1,
            bytes_added: 1,
            tags: &tags,
        };
        let new = SnapshotFields {
            id: &[3; 32],
            time_unix_ms: 2000,
            root_tree: &[4; 32],
            ..old
        };
        let old_sealed = key.seal_snapshot_info(&old, b"old");
        // The old record's sealed part under the new record's fields (or
        // the other way round) does not open.
        assert!(key.open_snapshot_info(&new, &old_sealed).is_err());
        // Stripping the v2 header to pass it off as v1 does not open either.
        assert!(matches!(
            key.open_snapshot_info(&old, &old_sealed[SNAPSHOT_HEADER_LEN..]),
            Err(SealError::Authentication)
        ));
        // A v1 record opens, reported as authenticating only its sealed part.
        let v1 = key.seal(b"legacy", old.id);
        let (info, auth) = key.open_snapshot_info(&old, &v1).expect("v1 opens");
        assert_eq!(
            (info.as_slice(), auth),
            (&b"legacy"[..], SnapshotAuth::SealedPartOnly)
        );
        // A newer version is named, junk is refused.
        let mut newer = old_sealed.clone();
        newer[4] = 3;
        assert!(matches!(
            key.open_snapshot_info(&old, &newer),
            Err(SealError::UnsupportedSnapshotVersion { version: 3 })
        ));
        assert!(key.open_snapshot_info(&old, b"CSNP").is_err());
        assert!(key.open_snapshot_info(&old, b"junk").is_err());
    }

    fn noise(len: usize, seed: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut h = blake3::Hasher::new();
        h.update(&[seed]);
        let mut reader = h.finalize_xof();
        out.resize(len, 0);
        reader.fill(&mut out);
        out
    }

    #[test]
    fn seal_open_round_trip() {
        let key = MasterKey::generate();
        for len in [0, 1, 15, 16, 17, 1000, 70_000] {
            let msg = noise(len, len as u8);
            let sealed = key.seal(&msg, b"ctx");
            assert_eq!(sealed.len(), msg.len() + SEAL_OVERHEAD);
            assert_eq!(key.open(&sealed, b"ctx").expect("opens"), msg);
        }
    }

    #[test]
    fn sealed_bytes_do_not_contain_the_plaintext() {
        let key = MasterKey::generate();
        let msg = b"the room chat says hello hello hello hello".repeat(4);
        let sealed = key.seal(&msg, b"");
        assert!(!sealed.windows(16).any(|w| msg.windows(16).any(|m| m == w)));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let key = MasterKey::generate();
        let sealed = key.seal(b"gift record 42: 3 rockets", b"aad");
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                key.open(&bad, b"aad").is_err(),
                "bit {i} flip went unnoticed"
            );
        }
    }

    #[test]
    fn wrong_aad_or_key_fails_authentication() {
        let key = MasterKey::generate();
        let sealed = key.seal(b"profile", b"id-1");
        assert!(matches!(
            key.open(&sealed, b"id-2"),
            Err(SealError::Authentication)
        ));
        assert!(matches!(
            key.open(&sealed, b""),
            Err(SealError::Authentication)
        ));
        let other = MasterKey::generate();
        assert!(matches!(
            other.open(&sealed, b"id-1"),
            Err(SealError::Authentication)
        ));
    }

    #[test]
    fn truncation_and_header_damage_have_specific_errors() {
        let key = MasterKey::generate();
        let sealed = key.seal(b"x", b"");
        assert!(matches!(
            key.open(&sealed[..10], b""),
            Err(SealError::Truncated { .. })
        ));
        let mut bad = sealed.clone();
        bad[0] = b'X';
        assert!(matches!(key.open(&bad, b""), Err(SealError::BadMagic)));
        let mut newer = sealed;
        newer[2] = 2;
        assert!(matches!(
            key.open(&newer, b""),
            Err(SealError::UnsupportedVersion { version: 2 })
        ));
    }

    #[test]
    fn two_seals_of_the_same_plaintext_differ() {
        let key = MasterKey::generate();
        assert_ne!(key.seal(b"same", b""), key.seal(b"same", b""));
    }

    #[test]
    fn blob_ids_are_keyed() {
        let (a, b) = (MasterKey::generate(), MasterKey::generate());
        assert_eq!(a.blob_id(b"chunk"), a.blob_id(b"chunk"));
        assert_ne!(a.blob_id(b"chunk"), b.blob_id(b"chunk"));
        assert_ne!(a.blob_id(b"chunk"), *blake3::hash(b"chunk").as_bytes());
        assert_ne!(a.chunker_seed(), b.chunker_seed());
    }

    #[test]
    fn blob_round_trip_compressible_and_incompressible() {
        let key = MasterKey::generate();
        let text = b"{\"room\":12,\"msg\":\"666 hello\"}\n".repeat(2000);
        let random = noise(100_000, 1);
        for plain in [&text[..], &random[..], &[][..]] {
            let id = key.blob_id(plain);
            let blob = key.encode_blob(&id, plain).expect("encodes");
            assert_eq!(key.decode_blob(&id, &blob).expect("decodes"), plain);
        }
        // Text shrinks; random data is stored with only the fixed overhead.
        let text_blob = key
            .encode_blob(&key.blob_id(&text), &text)
            .expect("encodes");
        assert!(text_blob.len() < text.len() / 10);
        let random_blob = key
            .encode_blob(&key.blob_id(&random), &random)
            .expect("encodes");
        assert_eq!(
            random_blob.len(),
            random.len() + BLOB_FRAME_LEN + SEAL_OVERHEAD
        );
    }

    #[test]
    fn decode_with_another_id_fails() {
        let key = MasterKey::generate();
        let (a, b) = (b"chunk a".to_vec(), b"chunk b".to_vec());
        let (ida, idb) = (key.blob_id(&a), key.blob_id(&b));
        let blob = key.encode_blob(&ida, &a).expect("encodes");
        // The id is the associated data, so a swapped blob fails to open.
        assert!(matches!(
            key.decode_blob(&idb, &blob),
            Err(SealError::Authentication)
        ));
        // encode refuses a wrong id up front.
        assert!(matches!(
            key.encode_blob(&idb, &a),
            Err(SealError::IdMismatch { .. })
        ));
    }

    #[test]
    fn decode_checks_content_against_id() {
        // A blob sealed under id X whose content hashes elsewhere (a buggy
        // or malicious writer) is caught after decryption.
        let key = MasterKey::generate();
        let id = key.blob_id(b"real");
        let mut frame = vec![CODEC_STORED];
        frame.extend_from_slice(&4u32.to_le_bytes());
        frame.extend_from_slice(b"fake");
        let blob = key.seal(&frame, &id);
        assert!(matches!(
            key.decode_blob(&id, &blob),
            Err(SealError::IdMismatch { .. })
        ));
    }

    fn chat_lines(n: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n as u64 {
            let x = i.wrapping_mul(2654435761).wrapping_add(seed);
            out.extend_from_slice(
                format!(
                    "{{\"ts\":{},\"room\":\"room-{}\",\"user\":\"u{}\",\"type\":\"message\",\"text\":\"hello {} there\"}}\n",
                    1_700_000_000 + x % 100_000,
                    x % 17,
                    x % 1000,
                    x % 7919
                )
                .as_bytes(),
            );
        }
        out
    }

    #[test]
    fn dictionary_blobs_round_trip_and_name_their_dictionary() {
        let key = MasterKey::generate();
        // Raw-content dictionary: zstd takes any bytes as one.
        let dictionary = key.make_dictionary(chat_lines(600, 99));
        assert_eq!(dictionary.id(), &key.blob_id(dictionary.bytes()));
        let plain = chat_lines(300, 1);
        let id = key.blob_id(&plain);
        let (with, compressed) = key
            .encode_blob_with(&id, &plain, Some(&dictionary))
            .expect("encodes");
        assert!(compressed);
        let without = key.encode_blob(&id, &plain).expect("encodes");
        let frame = key.open(&with, &id).expect("opens");
        assert_eq!(frame[0], CODEC_ZSTD_DICT);
        assert_eq!(&frame[BLOB_FRAME_LEN..BLOB_FRAME_LEN + 32], dictionary.id());

        // Not loaded: a clear error naming the dictionary.
        match key.decode_blob(&id, &with) {
            Err(SealError::UnknownDictionary { id: named }) => {
                assert_eq!(named, hex::encode(dictionary.id()));
                assert!(
                    SealError::UnknownDictionary { id: named.clone() }
                        .to_string()
                        .contains(&named)
                );
            }
            other => panic!("expected UnknownDictionary, got {other:?}"),
        }
        // Loaded in a clone: every clone of the key sees it.
        let clone = key.clone();
        clone.add_dictionary(dictionary.clone());
        assert_eq!(key.decode_blob(&id, &with).expect("decodes"), plain);
        // Plain zstd blobs (codec 1) still decode alongside.
        assert_eq!(key.decode_blob(&id, &without).expect("decodes"), plain);
        // Incompressible data is stored raw, without naming the dictionary.
        let noise = noise(40_000, 3);
        let noise_id = key.blob_id(&noise);
        let (raw, compressed) = key
            .encode_blob_with(&noise_id, &noise, Some(&dictionary))
            .expect("encodes");
        assert!(!compressed);
        assert_eq!(key.open(&raw, &noise_id).expect("opens")[0], CODEC_STORED);
        assert_eq!(key.decode_blob(&noise_id, &raw).expect("decodes"), noise);
    }

    #[test]
    fn a_wrong_dictionary_under_the_right_id_fails() {
        let key = MasterKey::generate();
        let right = key.make_dictionary(chat_lines(600, 99));
        let plain = chat_lines(300, 1);
        let id = key.blob_id(&plain);
        let (blob, _) = key
            .encode_blob_with(&id, &plain, Some(&right))
            .expect("encodes");
        // Another key (tenant) that somehow holds other bytes under this id:
        // decoding fails (zstd's dictionary check or the content id), never
        // returns wrong bytes.
        let other = MasterKey::from_bytes(&key.to_bytes());
        other.add_dictionary(Arc::new(Dictionary {
            id: *right.id(),
            bytes: chat_lines(600, 12345),
        }));
        assert!(other.decode_blob(&id, &blob).is_err());
        // A truncated dictionary frame is refused by its length.
        let mut frame = vec![CODEC_ZSTD_DICT];
        frame.extend_from_slice(&(plain.len() as u32).to_le_bytes());
        frame.extend_from_slice(&[7u8; 10]);
        assert!(matches!(
            key.decode_blob(&id, &key.seal(&frame, &id)),
            Err(SealError::Truncated { .. })
        ));
    }

    #[test]
    fn sealed_dictionaries_are_bound_to_their_id() {
        let key = MasterKey::generate();
        let a = key.make_dictionary(chat_lines(100, 1));
        let b = key.make_dictionary(chat_lines(100, 2));
        let sealed = key.seal_dictionary(&a);
        assert!(!sealed.windows(40).any(|w| w == &a.bytes()[..40]));
        let opened = key.open_dictionary(a.id(), &sealed).expect("opens");
        assert_eq!(opened.bytes(), a.bytes());
        // Moved under another id: refused.
        assert!(matches!(
            key.open_dictionary(b.id(), &sealed),
            Err(SealError::Authentication)
        ));
        // Another tenant's key cannot open it.
        assert!(
            MasterKey::generate()
                .open_dictionary(a.id(), &sealed)
                .is_err()
        );
    }

    #[test]
    fn zstd_bomb_is_refused() {
        let key = MasterKey::generate();
        let id = [7u8; 32];
        // 40 MiB of zeros compress to a few KiB; claim it is small.
        let bomb = zstd::bulk::compress(&vec![0u8; 40 * 1024 * 1024], 1).expect("compresses");
        for stated in [1000u32, MAX_BLOB_BYTES as u32] {
            let mut frame = vec![CODEC_ZSTD];
            frame.extend_from_slice(&stated.to_le_bytes());
            frame.extend_from_slice(&bomb);
            let blob = key.seal(&frame, &id);
            assert!(matches!(
                key.decode_blob(&id, &blob),
                Err(SealError::Decompress { .. })
            ));
        }
        let mut frame = vec![CODEC_ZSTD];
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        frame.extend_from_slice(&bomb);
        let blob = key.seal(&frame, &id);
        assert!(matches!(
            key.decode_blob(&id, &blob),
            Err(SealError::BlobTooLarge { .. })
        ));
        // The thread's reused zstd context still works after the failures.
        let text = b"after the bomb ".repeat(100);
        let text_id = key.blob_id(&text);
        let good = key.encode_blob(&text_id, &text).expect("encodes");
        assert_eq!(key.decode_blob(&text_id, &good).expect("decodes"), text);
    }

    #[test]
    fn oversized_plaintext_is_refused() {
        let key = MasterKey::generate();
        let big = vec![1u8; MAX_BLOB_BYTES + 1];
        assert!(matches!(
            key.encode_blob(&key.blob_id(&big), &big),
            Err(SealError::BlobTooLarge { .. })
        ));
    }

    #[test]
    fn key_slot_round_trip_and_wrong_password() {
        let key = MasterKey::generate();
        let slot =
            create_key_slot(&key, b"correct horse", KdfParams::fast_for_tests()).expect("slot");
        assert_eq!(slot.len(), KEY_SLOT_LEN);
        assert_eq!(&slot[..8], b"CAIRNKEY");
        let opened = open_key_slot(&slot, b"correct horse").expect("opens");
        assert_eq!(opened.to_bytes(), key.to_bytes());
        let err = open_key_slot(&slot, b"battery staple").expect_err("wrong password");
        assert!(matches!(err, SealError::WrongPassword));
        assert_eq!(err.to_string(), "wrong password");
    }

    #[test]
    fn key_slot_does_not_contain_the_key() {
        let key = MasterKey::generate();
        let slot = create_key_slot(&key, b"pw", KdfParams::fast_for_tests()).expect("slot");
        let raw = key.to_bytes();
        assert!(!slot.windows(8).any(|w| raw.windows(8).any(|r| r == w)));
    }

    #[test]
    fn key_slot_params_are_bound_and_capped() {
        let key = MasterKey::generate();
        let slot = create_key_slot(&key, b"pw", KdfParams::fast_for_tests()).expect("slot");
        // Raising t within bounds changes the KEK: reads as a wrong password.
        let mut bumped = slot.clone();
        bumped[13] = 2;
        assert!(matches!(
            open_key_slot(&bumped, b"pw"),
            Err(SealError::WrongPassword)
        ));
        // A hostile memory cost is refused before argon2 allocates it.
        let mut hostile = slot.clone();
        hostile[9..13].copy_from_slice(&(100u32 * 1024 * 1024).to_le_bytes());
        assert!(matches!(
            open_key_slot(&hostile, b"pw"),
            Err(SealError::KdfParamsOutOfRange { .. })
        ));
        let too_strong = KdfParams {
            m_kib: KDF_MAX_M_KIB + 1,
            t: 1,
            p: 1,
        };
        assert!(create_key_slot(&key, b"pw", too_strong).is_err());
        assert!(matches!(
            create_key_slot(&key, b"", KdfParams::fast_for_tests()),
            Err(SealError::EmptyPassword)
        ));
        let mut newer = slot;
        newer[8] = 9;
        assert!(matches!(
            open_key_slot(&newer, b"pw"),
            Err(SealError::UnsupportedKeySlotVersion { version: 9 })
        ));
    }

    #[test]
    fn default_params_are_interactive() {
        assert_eq!(
            KdfParams::default(),
            KdfParams {
                m_kib: 65536,
                t: 3,
                p: 1
            }
        );
        assert!(KdfParams::default().validate().is_ok());
        assert!(KdfParams::fast_for_tests().validate().is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn open_and_decode_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let key = MasterKey::generate();
            let _ = key.open(&bytes, b"");
            let _ = key.decode_blob(&[0u8; 32], &bytes);
            // With a valid header the authentication path is exercised too.
            let mut framed = b"CS\x01".to_vec();
            framed.extend_from_slice(&bytes);
            prop_assert!(key.open(&framed, b"").is_err());
        }

        #[test]
        fn open_key_slot_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Params in arbitrary bytes are almost always out of range, so this
            // stays fast; a valid-looking header is covered by the slot tests.
            let mut slot = b"CAIRNKEY\x01".to_vec();
            slot.extend_from_slice(&bytes);
            let _ = open_key_slot(&slot, b"pw");
            let _ = open_key_slot(&bytes, b"pw");
        }

        #[test]
        fn blob_round_trips(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let key = MasterKey::generate();
            let id = key.blob_id(&data);
            let blob = key.encode_blob(&id, &data).expect("encodes");
            prop_assert_eq!(key.decode_blob(&id, &blob).expect("decodes"), data);
        }
    }
}
