//! Trees: one directory listing of a snapshot (names, metadata, and the
//! chunk ids of each file, or the id of a subdirectory's tree).
//!
//! This module owns the tree encoding (magic, version, then postcard) and
//! its validation. It does not encrypt or store trees: an encoded tree is a
//! blob like any chunk (`encode` → [`crate::seal::MasterKey::encode_blob`]
//! → pack), so nodes never see names (invariant 1).
//!
//! Version 2 (written) stores names and symlink targets as bytes, so every
//! name Linux allows round-trips, UTF-8 or not, and adds hard-link groups,
//! FIFOs and device nodes. Version 1 (names and targets as UTF-8 strings,
//! files, directories and symlinks only) is still read, converted to the
//! version 2 model.
//!
//! Invariants of a valid tree, checked by [`Tree::new`] and
//! [`Tree::validate`] when building and by [`Tree::decode`] when reading:
//! entries are sorted by name (byte order) with no duplicates; every name
//! passes [`crate::path_guard::check_name`] (the same rule backup applies
//! to what it reads, so backup never stores a name restore refuses) and
//! every symlink target [`crate::path_guard::check_symlink_target`], so a
//! restore built on a decoded tree cannot be steered outside its target by a
//! name; a file has chunks exactly when its size is non-zero; at most
//! [`MAX_TREE_ENTRIES`] entries in at most [`MAX_TREE_BYTES`].
//! [`Tree::encode`] is canonical: the same entries give the same bytes,
//! hence the same blob id, which lets unchanged directories deduplicate.
//! Decoding never panics.

use serde::{Deserialize, Serialize};

use crate::path_guard::{self, PathError, display_name};
use crate::seal::{BlobId, MAX_BLOB_BYTES};

/// Magic and version opening an encoded tree.
const TREE_MAGIC: [u8; 7] = *b"CAIRNTR";
/// Version written.
const TREE_VERSION: u8 = 2;
/// Oldest version read.
const TREE_VERSION_V1: u8 = 1;
const TREE_HEADER_LEN: usize = TREE_MAGIC.len() + 1;

/// Most entries one directory listing may hold.
pub const MAX_TREE_ENTRIES: usize = 1_000_000;
/// Largest encoded tree: a tree is stored as one blob.
pub const MAX_TREE_BYTES: usize = MAX_BLOB_BYTES;

/// A directory listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Entries sorted by name, names unique.
    pub entries: Vec<TreeEntry>,
}

/// One name in a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// One path component as the file system's bytes (see
    /// [`crate::path_guard::check_name`]); not necessarily UTF-8.
    pub name: Vec<u8>,
    /// What the entry is, with what restore needs for each kind.
    pub kind: EntryKind,
    /// Unix mode bits as read at backup (`st_mode`); restore decides which
    /// to apply.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
}

impl TreeEntry {
    /// The name for people (see [`crate::path_guard::display_name`]).
    pub fn display_name(&self) -> String {
        display_name(&self.name)
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file: its size and its chunks in order.
    File {
        /// Size in bytes (the sum of the chunk lengths).
        size: u64,
        /// Chunks, in file order.
        chunks: Vec<ChunkRef>,
        /// Hard-link group: files of one snapshot with the same value were
        /// one inode (same device and inode number, more than one link) and
        /// are restored as hard links of one file. `None` for a file with a
        /// single link.
        hardlink: Option<u64>,
    },
    /// A directory and the id of its own tree blob.
    Dir {
        /// Blob id of the subdirectory's encoded tree.
        subtree: BlobId,
    },
    /// A symbolic link, restored as-is and never followed.
    Symlink {
        /// The link's target, as the file system's bytes.
        target: Vec<u8>,
    },
    /// A named pipe (FIFO), restored with `mkfifo`.
    Fifo,
    /// A device node, restored with `mknod` when restore runs as root and
    /// reported as skipped otherwise.
    Device {
        /// Character (true) or block (false) device.
        character: bool,
        /// Device number (`st_rdev`).
        rdev: u64,
    },
}

impl EntryKind {
    /// A short word for listings: `file`, `dir`, `symlink`, `fifo`, `chardev`, `blockdev`.
    pub fn word(&self) -> &'static str {
        match self {
            EntryKind::File { .. } => "file",
            EntryKind::Dir { .. } => "dir",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::Fifo => "fifo",
            EntryKind::Device {
                character: true, ..
            } => "chardev",
            EntryKind::Device { .. } => "blockdev",
        }
    }
}

/// One chunk of a file: its id and plaintext length. Lengths let a restore
/// place every chunk at its offset before any data arrives, so chunks can be
/// written in whatever order their packs come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Keyed blake3 of the chunk's plaintext.
    pub id: BlobId,
    /// Plaintext length in bytes, 1 to [`MAX_BLOB_BYTES`].
    pub len: u32,
}

/// The version 1 model, only read.
mod v1 {
    use serde::Deserialize;

    use super::ChunkRef;
    use crate::seal::BlobId;

    #[derive(Deserialize)]
    pub(super) struct Tree {
        pub(super) entries: Vec<TreeEntry>,
    }

    #[derive(Deserialize)]
    pub(super) struct TreeEntry {
        pub(super) name: String,
        pub(super) kind: EntryKind,
        pub(super) mode: u32,
        pub(super) mtime_ns: i64,
        pub(super) uid: u32,
        pub(super) gid: u32,
    }

    #[derive(Deserialize)]
    pub(super) enum EntryKind {
        File { size: u64, chunks: Vec<ChunkRef> },
        Dir { subtree: BlobId },
        Symlink { target: String },
    }

    impl From<Tree> for super::Tree {
        fn from(tree: Tree) -> Self {
            super::Tree {
                entries: tree
                    .entries
                    .into_iter()
                    .map(|e| super::TreeEntry {
                        name: e.name.into_bytes(),
                        kind: match e.kind {
                            EntryKind::File { size, chunks } => super::EntryKind::File {
                                size,
                                chunks,
                                hardlink: None,
                            },
                            EntryKind::Dir { subtree } => super::EntryKind::Dir { subtree },
                            EntryKind::Symlink { target } => super::EntryKind::Symlink {
                                target: target.into_bytes(),
                            },
                        },
                        mode: e.mode,
                        mtime_ns: e.mtime_ns,
                        uid: e.uid,
                        gid: e.gid,
                    })
                    .collect(),
            }
        }
    }
}

/// Why a tree is refused.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Does not start with the tree magic.
    #[error("not a Cairn tree (bad magic)")]
    BadMagic,
    /// Written by a newer client.
    #[error(
        "tree version {version} is not supported by this client (it reads {TREE_VERSION_V1} to {TREE_VERSION}); upgrade the client"
    )]
    UnsupportedVersion {
        /// Version byte found.
        version: u8,
    },
    /// Larger than a tree may be.
    #[error("encoded tree of {size} bytes exceeds the {MAX_TREE_BYTES}-byte limit")]
    TooLarge {
        /// Size in bytes.
        size: usize,
    },
    /// The body is not a valid encoding.
    #[error("tree encoding is malformed: {source}")]
    Malformed {
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// Bytes left over after the listing.
    #[error("tree has {count} unexpected bytes after its entries")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// More entries than a tree may hold.
    #[error(
        "tree has {count} entries, more than the limit of {MAX_TREE_ENTRIES}; split the directory"
    )]
    TooManyEntries {
        /// How many.
        count: usize,
    },
    /// A name that could escape the restore target or is not a single component.
    #[error("tree entry name refused: {source}")]
    BadName {
        /// Why.
        #[source]
        source: PathError,
    },
    /// Names out of order or repeated.
    #[error("tree entries must be sorted with unique names, but {name:?} follows {previous:?}")]
    Unsorted {
        /// The earlier name, escaped for display.
        previous: String,
        /// The offending name, escaped for display.
        name: String,
    },
    /// A symlink target that cannot be restored.
    #[error("symbolic link {name:?} has a bad target: {source}")]
    BadSymlink {
        /// The link's name.
        name: String,
        /// Why.
        #[source]
        source: PathError,
    },
    /// A file whose size and chunk list disagree.
    #[error(
        "file {name:?} has size {size} but {chunks} chunks adding up to {total} bytes (a file has chunks exactly when it is not empty, and they add up to its size)"
    )]
    FileChunks {
        /// The file's name.
        name: String,
        /// Stated size.
        size: u64,
        /// Number of chunk ids.
        chunks: usize,
        /// Sum of the chunk lengths.
        total: u64,
    },
    /// A chunk of length 0 or above the blob limit.
    #[error("file {name:?} lists a chunk of {len} bytes; chunks hold 1 to {MAX_BLOB_BYTES} bytes")]
    ChunkLength {
        /// The file's name.
        name: String,
        /// The chunk length.
        len: u32,
    },
}

impl Tree {
    /// A valid tree from entries in any order: sorts them by name and checks
    /// everything [`Tree::decode`] will check.
    pub fn new(mut entries: Vec<TreeEntry>) -> Result<Tree, TreeError> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let tree = Tree { entries };
        tree.validate()?;
        Ok(tree)
    }

    /// Check the invariants listed in the module doc.
    pub fn validate(&self) -> Result<(), TreeError> {
        if self.entries.len() > MAX_TREE_ENTRIES {
            return Err(TreeError::TooManyEntries {
                count: self.entries.len(),
            });
        }
        let mut previous: Option<&[u8]> = None;
        for entry in &self.entries {
            path_guard::check_name(&entry.name).map_err(|source| TreeError::BadName { source })?;
            if let Some(prev) = previous
                && prev >= entry.name.as_slice()
            {
                return Err(TreeError::Unsorted {
                    previous: display_name(prev),
                    name: entry.display_name(),
                });
            }
            previous = Some(&entry.name);
            match &entry.kind {
                EntryKind::File { size, chunks, .. } => {
                    let mut total = 0u64;
                    for chunk in chunks {
                        if chunk.len == 0 || chunk.len as usize > MAX_BLOB_BYTES {
                            return Err(TreeError::ChunkLength {
                                name: entry.display_name(),
                                len: chunk.len,
                            });
                        }
                        // Cannot overflow (a tree holds < 2^25 chunks), but
                        // a decoder of hostile bytes must not rely on it.
                        total = total.saturating_add(u64::from(chunk.len));
                    }
                    // With non-empty chunks, size 0 <=> no chunks follows.
                    if total != *size {
                        return Err(TreeError::FileChunks {
                            name: entry.display_name(),
                            size: *size,
                            chunks: chunks.len(),
                            total,
                        });
                    }
                }
                EntryKind::Dir { .. } | EntryKind::Fifo | EntryKind::Device { .. } => {}
                EntryKind::Symlink { target } => {
                    path_guard::check_symlink_target(target).map_err(|source| {
                        TreeError::BadSymlink {
                            name: entry.display_name(),
                            source,
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Encode: magic, version, then the postcard encoding of the tree.
    ///
    /// Entries are written in name order whatever their order in memory,
    /// so the encoding is canonical. Call [`Tree::validate`] (or build with
    /// [`Tree::new`]) first: an invalid tree encodes, but will not decode.
    pub fn encode(&self) -> Vec<u8> {
        let mut sorted: Vec<&TreeEntry> = self.entries.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        // `&T` serialises exactly as `T`, so this is the encoding of `Tree`.
        let wire = TreeRef { entries: sorted };
        let mut out = Vec::with_capacity(TREE_HEADER_LEN + 64 * self.entries.len());
        out.extend_from_slice(&TREE_MAGIC);
        out.push(TREE_VERSION);
        postcard::to_io(&wire, &mut out)
            .expect("postcard encodes these plain types infallibly into a Vec");
        out
    }

    /// Decode and validate bytes from [`Tree::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeError> {
        if bytes.len() > MAX_TREE_BYTES {
            return Err(TreeError::TooLarge { size: bytes.len() });
        }
        if bytes.len() < TREE_HEADER_LEN || bytes[..TREE_MAGIC.len()] != TREE_MAGIC {
            return Err(TreeError::BadMagic);
        }
        let body = &bytes[TREE_HEADER_LEN..];
        let (tree, rest): (Tree, &[u8]) = match bytes[TREE_MAGIC.len()] {
            TREE_VERSION => postcard::take_from_bytes(body),
            TREE_VERSION_V1 => postcard::take_from_bytes::<v1::Tree>(body)
                .map(|(tree, rest)| (Tree::from(tree), rest)),
            version => return Err(TreeError::UnsupportedVersion { version }),
        }
        .map_err(|source| TreeError::Malformed { source })?;
        if !rest.is_empty() {
            return Err(TreeError::TrailingBytes { count: rest.len() });
        }
        tree.validate()?;
        Ok(tree)
    }
}

/// Borrowing twin of [`Tree`] for canonical encoding without cloning.
#[derive(Serialize)]
struct TreeRef<'a> {
    entries: Vec<&'a TreeEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(name: &str, size: u64, chunks: usize) -> TreeEntry {
        TreeEntry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::File {
                hardlink: None,
                size,
                chunks: (0..chunks)
                    .map(|i| ChunkRef {
                        id: [i as u8; 32],
                        len: if i + 1 == chunks {
                            (size - (size / chunks as u64) * (chunks as u64 - 1)) as u32
                        } else {
                            (size / chunks as u64) as u32
                        },
                    })
                    .collect(),
            },
            mode: 0o100644,
            mtime_ns: 1_730_000_000_123_456_789,
            uid: 1000,
            gid: 1000,
        }
    }

    fn sample() -> Tree {
        Tree::new(vec![
            file("room=000001.jsonl", 70_000, 3),
            TreeEntry {
                name: b"media".to_vec(),
                kind: EntryKind::Dir { subtree: [9; 32] },
                mode: 0o40755,
                mtime_ns: -5,
                uid: 0,
                gid: 0,
            },
            TreeEntry {
                name: b"latest".to_vec(),
                kind: EntryKind::Symlink {
                    target: b"../2024-11-01".to_vec(),
                },
                mode: 0o120777,
                mtime_ns: 0,
                uid: 1,
                gid: 2,
            },
            file("empty", 0, 0),
        ])
        .expect("valid")
    }

    #[test]
    fn round_trip() {
        let tree = sample();
        let names: Vec<String> = tree.entries.iter().map(|e| e.display_name()).collect();
        assert_eq!(names, ["empty", "latest", "media", "room=000001.jsonl"]);
        let bytes = tree.encode();
        assert_eq!(&bytes[..8], b"CAIRNTR\x02");
        assert_eq!(Tree::decode(&bytes).expect("decodes"), tree);
        assert_eq!(
            Tree::decode(&Tree::default().encode()).expect("empty"),
            Tree::default()
        );
    }

    /// The tree of the v1 golden vector, in the current model; never
    /// change it (add a new vector).
    fn golden_tree_v1() -> Tree {
        Tree {
            entries: vec![
                TreeEntry {
                    name: b"2024-11-01.jsonl".to_vec(),
                    kind: EntryKind::File {
                        size: 40_000,
                        chunks: vec![
                            ChunkRef {
                                id: [0x11; 32],
                                len: 32_768,
                            },
                            ChunkRef {
                                id: [0x22; 32],
                                len: 7_232,
                            },
                        ],
                        hardlink: None,
                    },
                    mode: 0o100644,
                    mtime_ns: 1_730_419_200_000_000_001,
                    uid: 1000,
                    gid: 100,
                },
                TreeEntry {
                    name: b"latest".to_vec(),
                    kind: EntryKind::Symlink {
                        target: b"2024-11-01.jsonl".to_vec(),
                    },
                    mode: 0o120777,
                    mtime_ns: -1,
                    uid: 0,
                    gid: 0,
                },
                TreeEntry {
                    name: b"media".to_vec(),
                    kind: EntryKind::Dir {
                        subtree: [0x33; 32],
                    },
                    mode: 0o40755,
                    mtime_ns: 0,
                    uid: 1000,
                    gid: 100,
                },
                TreeEntry {
                    name: "空.txt".as_bytes().to_vec(),
                    kind: EntryKind::File {
                        size: 0,
                        chunks: vec![],
                        hardlink: None,
                    },
                    mode: 0o100600,
                    mtime_ns: 1,
                    uid: 4_000_000_000,
                    gid: 1,
                },
            ],
        }
    }

    #[test]
    fn golden_tree_v1_still_decodes() {
        let golden = crate::seal::tests::golden_vector("tree-v1.bin", || {
            unreachable!("version 1 is no longer written; its vector must exist")
        });
        assert_eq!(&golden[..8], b"CAIRNTR\x01");
        assert_eq!(Tree::decode(&golden).expect("decodes"), golden_tree_v1());
    }

    fn entry(name: &[u8], kind: EntryKind, mode: u32) -> TreeEntry {
        TreeEntry {
            name: name.to_vec(),
            kind,
            mode,
            mtime_ns: 1_730_419_200_000_000_002,
            uid: 1000,
            gid: 100,
        }
    }

    /// The tree of the v2 golden vector: the names v1 could not hold,
    /// hard-link groups, a FIFO and a device. Never change it.
    fn golden_tree_v2_model() -> Tree {
        let chunk = ChunkRef {
            id: [0x44; 32],
            len: 5,
        };
        let linked = |name: &[u8]| {
            entry(
                name,
                EntryKind::File {
                    size: 5,
                    chunks: vec![chunk],
                    hardlink: Some(0x0123_4567_89ab_cdef),
                },
                0o100644,
            )
        };
        Tree {
            entries: vec![
                entry(b"-rf", EntryKind::Fifo, 0o10644),
                linked(b"a\\b"),
                linked(b"line\nbreak"),
                entry(
                    b"null",
                    EntryKind::Device {
                        character: true,
                        rdev: 0x0103,
                    },
                    0o20666,
                ),
                entry(
                    b"odd\xff\xfe",
                    EntryKind::Symlink {
                        target: b"../\xff:*?".to_vec(),
                    },
                    0o120777,
                ),
            ],
        }
    }

    #[test]
    fn golden_tree_v2() {
        let tree = golden_tree_v2_model();
        tree.validate().expect("the golden tree is valid");
        let golden = crate::seal::tests::golden_vector("tree-v2.bin", || tree.encode());
        // Byte-exact both ways: the encoding is canonical and stable.
        assert_eq!(golden, tree.encode());
        assert_eq!(Tree::decode(&golden).expect("decodes"), tree);
    }

    #[test]
    fn encoding_is_canonical() {
        let tree = sample();
        let mut shuffled = tree.clone();
        shuffled.entries.reverse();
        assert_eq!(shuffled.encode(), tree.encode());
    }

    /// Encode entries as-is, bypassing `Tree::new`, as a hostile writer would.
    fn raw(entries: Vec<TreeEntry>) -> Vec<u8> {
        let mut out = b"CAIRNTR\x02".to_vec();
        out.extend_from_slice(&postcard::to_allocvec(&Tree { entries }).expect("encodes"));
        out
    }

    #[test]
    fn decode_rejects_hostile_names() {
        for bad in ["..", ".", "a/b", "/etc", "", "x\0y"] {
            let err = Tree::decode(&raw(vec![file(bad, 1, 1)])).expect_err("refused");
            assert!(matches!(err, TreeError::BadName { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn decode_rejects_duplicates_and_disorder() {
        let dup = raw(vec![file("a", 1, 1), file("a", 2, 1)]);
        assert!(matches!(
            Tree::decode(&dup),
            Err(TreeError::Unsorted { .. })
        ));
        let disorder = raw(vec![file("b", 1, 1), file("a", 1, 1)]);
        assert!(matches!(
            Tree::decode(&disorder),
            Err(TreeError::Unsorted { .. })
        ));
        assert!(matches!(
            Tree::new(vec![file("a", 1, 1), file("a", 1, 1)]),
            Err(TreeError::Unsorted { .. })
        ));
    }

    #[test]
    fn decode_rejects_bad_symlinks_and_inconsistent_files() {
        let mut link = file("l", 0, 0);
        link.kind = EntryKind::Symlink {
            target: b"a\0b".to_vec(),
        };
        assert!(matches!(
            Tree::decode(&raw(vec![link])),
            Err(TreeError::BadSymlink { .. })
        ));
        assert!(matches!(
            Tree::decode(&raw(vec![file("f", 10, 0)])),
            Err(TreeError::FileChunks { total: 0, .. })
        ));
        let mut short = file("f", 300, 3);
        if let EntryKind::File { size, .. } = &mut short.kind {
            *size -= 1;
        }
        assert!(matches!(
            Tree::decode(&raw(vec![short])),
            Err(TreeError::FileChunks { total: 300, .. })
        ));
        assert!(matches!(
            Tree::decode(&raw(vec![file("f", 0, 2)])),
            Err(TreeError::ChunkLength { len: 0, .. })
        ));
        let mut huge = file("f", 1, 1);
        if let EntryKind::File { size, chunks, .. } = &mut huge.kind {
            chunks[0].len = u32::MAX;
            *size = u64::from(u32::MAX);
        }
        assert!(matches!(
            Tree::decode(&raw(vec![huge])),
            Err(TreeError::ChunkLength { .. })
        ));
    }

    #[test]
    fn decode_rejects_framing_errors() {
        let bytes = sample().encode();
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            Tree::decode(&trailing),
            Err(TreeError::TrailingBytes { count: 1 })
        ));
        assert!(matches!(
            Tree::decode(&bytes[..bytes.len() - 1]),
            Err(TreeError::Malformed { .. })
        ));
        let mut newer = bytes.clone();
        newer[7] = 3;
        assert!(matches!(
            Tree::decode(&newer),
            Err(TreeError::UnsupportedVersion { version: 3 })
        ));
        assert!(matches!(Tree::decode(b"CAIRN"), Err(TreeError::BadMagic)));
        // A huge claimed entry count with no bytes behind it fails cleanly.
        let mut huge = b"CAIRNTR\x01".to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Tree::decode(&huge).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Tree::decode(&bytes);
            for version in [1u8, 2] {
                let mut framed = b"CAIRNTR".to_vec();
                framed.push(version);
                framed.extend_from_slice(&bytes);
                let _ = Tree::decode(&framed);
            }
        }

        #[test]
        fn valid_trees_round_trip(
            names in proptest::collection::btree_set(proptest::collection::vec(any::<u8>(), 1..40), 0..20),
            size in 2u64..1_000_000,
        ) {
            // Every name Linux allows (any bytes but `/` and NUL, not `.`
            // or `..`) is a valid tree name and survives encoding.
            let entries: Vec<TreeEntry> = names
                .iter()
                .filter(|n| !n.contains(&b'/') && !n.contains(&0) && n.as_slice() != b"." && n.as_slice() != b"..")
                .map(|n| {
                    let mut e = file("x", size, 2);
                    e.name = n.clone();
                    e
                })
                .collect();
            let tree = Tree::new(entries).expect("valid");
            prop_assert_eq!(Tree::decode(&tree.encode()).expect("decodes"), tree);
        }
    }
}
