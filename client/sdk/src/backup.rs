//! Backup: walk → chunk → id → dedup → compress+seal → pack → upload → commit.
//!
//! Files are processed in parallel (bounded); each file is chunked in a
//! blocking thread, its new chunks are sealed there and appended to the
//! shared data pack builder; trees go to a pack builder of their own, so a
//! lost data pack never hides the directory structure of a snapshot. Full
//! packs go through a bounded channel to the uploader.
//!
//! The walk stores names as the file system's bytes and applies the one
//! name rule restore applies ([`crate::path_guard::check_name`]); every tree
//! is validated before it is stored, so a snapshot never holds what restore
//! would refuse. Hard links (same device and inode, more than one link)
//! share a hard-link group; FIFOs and device nodes are recorded; sockets
//! and anything unreadable as a kind are skipped and named in
//! [`BackupSummary::skipped`]. `--exclude` patterns follow restic: a
//! pattern starting with `/` matches the absolute path, any other pattern
//! matches the end of the path (so a pattern without a slash matches any
//! base name); an excluded directory is not descended into. Unchanged files (same size, mtime and mode as in the parent
//! snapshot) are not read at all. The snapshot is committed only after every
//! pack is acknowledged, so an interrupted backup leaves no snapshot, and a
//! rerun finds its uploaded chunks in the index.
//!
//! Levels ([`Level`]) only choose the parent the walk compares with: every
//! snapshot's trees list every chunk, so each restores on its own.
//!
//! Garbage collection: every blob the snapshot references (every tree, the
//! unchanged ones too, and every chunk of every file) is collected while
//! the trees are stored, and stored at the end as reference-list segments
//! ([`cairn_proto::refs`], unsealed, in a pack of their own). Every pack is
//! uploaded in one random session, and the commit carries the segments, the
//! session and the GC epoch read before the first index look-up. If the
//! cluster swept blobs this backup found in the index meanwhile, it refuses
//! the commit (`Aborted`) and the backup reruns once as a full backup,
//! which uploads again whatever is gone.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use tokio::sync::{Semaphore, mpsc};
use tracing::warn;

use crate::chunker::{Chunker, chunk_bytes_with_seed};
use crate::error::{ClientError, Result};
use crate::pack::{BlobKind, PACK_TARGET_BYTES, Pack, PackBuilder};
use crate::path_guard::{check_name, display_name};
use crate::repo::{Repository, Snapshot, SnapshotInfo};
use crate::seal::BlobId;
use crate::tree::{ChunkRef, EntryKind, Tree, TreeEntry};

/// Chunks a file worker hands over at once while reading a file.
const DEDUP_BATCH_CHUNKS: usize = 64;
/// Chunks looked up in the index per request: new chunks of every file
/// worker wait in one shared batch, so a tree of small files costs one
/// look-up per five hundred files instead of one per file.
const LOOKUP_BATCH_CHUNKS: usize = 512;
/// Plaintext bytes a look-up batch holds at most (bounds client memory).
const LOOKUP_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Files read whole (then cut in memory) rather than streamed: below this a
/// streaming chunker's buffer costs more than the file.
const READ_WHOLE_BYTES_MAX: u64 = 1024 * 1024;
/// Packs waiting for upload (each up to a pack of memory).
const PACKS_QUEUED_MAX: usize = 1;
/// Packs uploading at once.
const UPLOADS_IN_FLIGHT_MAX: usize = 2;

/// Live counters a progress display can read.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_added: AtomicU64,
    pub packs: AtomicU64,
}

/// Which earlier snapshot a backup compares with (its files with the same
/// size, mtime and mode are not read again). Recorded as the snapshot's kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Compare with nothing: every file is read (and still deduplicated
    /// against the index, so unchanged data is not uploaded again).
    Full,
    /// Compare with the dataset's latest snapshot of any kind.
    #[default]
    Incremental,
    /// Compare with the dataset's latest full snapshot, so a restore chain
    /// is never longer than full + one differential in restic terms of
    /// change tracking (every snapshot restores on its own anyway).
    Differential,
}

impl Level {
    /// The snapshot kind this level records: "full", "incremental" or
    /// "differential".
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Full => "full",
            Level::Incremental => "incremental",
            Level::Differential => "differential",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Level {
    type Err = ClientError;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "full" => Ok(Level::Full),
            "incremental" | "incr" => Ok(Level::Incremental),
            "differential" | "diff" => Ok(Level::Differential),
            _ => Err(ClientError::BadInput {
                what: format!(
                    "unknown backup level {text:?}: use full, incremental or differential"
                ),
            }),
        }
    }
}

/// The parent a backup compares with and the kind it records.
#[derive(Debug, Clone)]
pub struct ParentChoice<'a> {
    pub parent: Option<&'a Snapshot>,
    /// The kind recorded (a level without its parent becomes a full).
    pub kind: Level,
    /// Why the kind differs from the level asked, if it does.
    pub note: Option<String>,
}

/// Chooses the parent of a backup at `level` among `snapshots` (the
/// dataset's, oldest first). `use_parent: false` compares with nothing.
pub fn choose_parent<'a>(
    level: Level,
    use_parent: bool,
    dataset: &str,
    snapshots: &'a [Snapshot],
) -> ParentChoice<'a> {
    let mine = || snapshots.iter().filter(|s| s.dataset == dataset);
    let level = if use_parent { level } else { Level::Full };
    match level {
        Level::Full => ParentChoice {
            parent: None,
            kind: Level::Full,
            note: None,
        },
        Level::Incremental => match mine().next_back() {
            Some(parent) => ParentChoice {
                parent: Some(parent),
                kind: Level::Incremental,
                note: None,
            },
            None => ParentChoice {
                parent: None,
                kind: Level::Full,
                note: None,
            },
        },
        Level::Differential => match mine().rfind(|s| s.kind == Level::Full.as_str()) {
            Some(parent) => ParentChoice {
                parent: Some(parent),
                kind: Level::Differential,
                note: None,
            },
            None => ParentChoice {
                parent: None,
                kind: Level::Full,
                note: Some(format!(
                    "dataset {dataset:?} has no full snapshot to compare with yet: this backup is a full one"
                )),
            },
        },
    }
}

/// What to back up into which dataset.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub dataset: String,
    pub tags: Vec<String>,
    /// Which snapshot to compare with to skip unchanged files.
    pub level: Level,
    /// `false`: compare with no snapshot at all (the same as
    /// [`Level::Full`], whatever `level` says).
    pub use_parent: bool,
    /// Files read in parallel.
    pub files_in_flight_max: usize,
    /// Patterns of paths not to back up (restic's `--exclude`; see the
    /// module doc and [`read_exclude_file`]).
    pub excludes: Vec<String>,
    /// Stream compaction only: ids of live segments (from
    /// [`Repository::list_segments`]) whose records this snapshot holds,
    /// retired in the same commit. Empty for every other backup.
    pub retire_segments: Vec<Vec<u8>>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            dataset: "default".into(),
            tags: Vec::new(),
            level: Level::default(),
            use_parent: true,
            files_in_flight_max: std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4),
            excludes: Vec::new(),
            retire_segments: Vec::new(),
        }
    }
}

/// Something the walk (or a restore) left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// The path, escaped for display (see [`crate::path_guard::display_name`]).
    pub path: String,
    /// Why it was left out.
    pub reason: String,
}

/// Reads an exclude file: one pattern per line, blank lines and lines
/// starting with `#` ignored, surrounding white space trimmed.
pub fn read_exclude_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| ClientError::io(path, e))?;
    Ok(parse_exclude_lines(&text))
}

fn parse_exclude_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Builds the matcher of exclude patterns (restic's meaning): `/abs/...`
/// matches from the root, anything else the end of the path, so `*.log`
/// or `cache` match a base name anywhere and `a/b` matches `.../a/b`.
/// `*` and `?` never cross a `/`; `**` does.
pub fn exclude_matcher(patterns: &[String]) -> Result<Option<GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let trimmed = pattern.trim();
        let trimmed = if trimmed.len() > 1 {
            trimmed.trim_end_matches('/')
        } else {
            trimmed
        };
        if trimmed.is_empty() {
            continue;
        }
        let full = if trimmed.starts_with('/') {
            trimmed.to_owned()
        } else {
            format!("**/{trimmed}")
        };
        let glob = GlobBuilder::new(&full)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| ClientError::BadExclude {
                pattern: pattern.clone(),
                reason: e.to_string(),
            })?;
        builder.add(glob);
    }
    builder
        .build()
        .map(Some)
        .map_err(|e| ClientError::BadExclude {
            pattern: patterns.join(" "),
            reason: e.to_string(),
        })
}

/// The result of a committed backup.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub snapshot_id: String,
    pub dataset: String,
    pub parent: Option<String>,
    /// The kind recorded: "full", "incremental" or "differential".
    pub level: String,
    /// Why the level differs from the one asked (a differential without a
    /// full yet), or that the backup was rerun as a full one.
    pub note: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// Bytes stored for this snapshot: new blobs, compressed and sealed.
    pub bytes_added: u64,
    pub packs: u64,
    pub duration_s: f64,
    /// What the walk left out (sockets, unreadable kinds), each with why.
    pub skipped: Vec<Skipped>,
}

/// The parent snapshot's trees, loaded once, by id.
type ParentTrees = Arc<HashMap<BlobId, Tree>>;

/// State shared by every file worker of one backup.
struct Session {
    repo: Arc<Repository>,
    runtime: tokio::runtime::Handle,
    /// Blob ids claimed by this session: the first claimant uploads.
    seen: Mutex<HashSet<BlobId>>,
    /// Claimed blobs waiting for their index look-up (see [`LOOKUP_BATCH_CHUNKS`]).
    pending: Mutex<LookupBatch>,
    /// File chunks.
    data_builder: Mutex<PackBuilder>,
    /// Trees only: a lost data pack must not take the listings with it.
    tree_builder: Mutex<PackBuilder>,
    /// Reference-list segments only, unsealed.
    refs_builder: Mutex<PackBuilder>,
    /// Every blob id the snapshot references (see [`tree_refs`]).
    refs: Mutex<HashSet<BlobId>>,
    excludes: Option<GlobSet>,
    skipped: Mutex<Vec<Skipped>>,
    packs: mpsc::Sender<Pack>,
    progress: Arc<Progress>,
    files: AtomicU64,
    /// The dataset's compression dictionary for data chunks.
    dictionary: crate::dictionary::DatasetDictionary,
}

impl Session {
    /// Claims the chunks this session has not seen yet and queues them for
    /// the shared index look-up; the worker that fills the batch looks it
    /// up and seals the new ones into the pack. A chunk's id is known before
    /// its look-up, so the file (or tree) referencing it need not wait.
    fn store_chunks(&self, chunks: &mut Vec<(BlobId, Vec<u8>)>, kind: BlobKind) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let full = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (id, data) in chunks.drain(..) {
                if seen.insert(id) {
                    pending.push(id, data, kind);
                }
            }
            pending.is_full().then(|| std::mem::take(&mut *pending))
        };
        match full {
            Some(batch) => self.look_up_and_store(batch),
            None => Ok(()),
        }
    }

    /// One index look-up for the batch; the blobs the cluster lacks are
    /// sealed into their pack.
    fn look_up_and_store(&self, batch: LookupBatch) -> Result<()> {
        if batch.blobs.is_empty() {
            return Ok(());
        }
        let ids: Vec<BlobId> = batch.blobs.iter().map(|(id, _, _)| *id).collect();
        let present = self.runtime.block_on(self.repo.find_blobs(&ids))?;
        for ((id, data, kind), known) in batch.blobs.into_iter().zip(present) {
            if !known {
                let encoded = match kind {
                    BlobKind::Data => {
                        self.dictionary
                            .encode(&self.repo, &self.runtime, &id, &data)?
                    }
                    _ => self.repo.key().encode_blob(&id, &data)?,
                };
                self.add_to_pack(id, kind, &encoded)?;
            }
        }
        Ok(())
    }

    fn add_to_pack(&self, id: BlobId, kind: BlobKind, encoded: &[u8]) -> Result<()> {
        self.progress
            .bytes_added
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        let builder = match kind {
            BlobKind::Data => &self.data_builder,
            BlobKind::Tree => &self.tree_builder,
            BlobKind::Refs => &self.refs_builder,
        };
        let full = {
            let mut builder = builder.lock().unwrap_or_else(|p| p.into_inner());
            builder.add(id, kind, encoded);
            if builder.is_full() {
                Some(std::mem::replace(
                    &mut *builder,
                    PackBuilder::new(PACK_TARGET_BYTES),
                ))
            } else {
                None
            }
        };
        if let Some(full) = full {
            self.send_pack(full)?;
        }
        Ok(())
    }

    fn send_pack(&self, builder: PackBuilder) -> Result<()> {
        let pack = builder.finish(self.repo.key())?;
        self.packs
            .blocking_send(pack)
            .map_err(|_| ClientError::BadInput {
                what: "upload stopped (see the upload error)".into(),
            })
    }

    /// Chunks a reader, storing new chunks; returns the chunk ids and size.
    fn chunk_reader(&self, reader: impl Read, path: &Path) -> Result<(Vec<ChunkRef>, u64)> {
        let mut chunks = Chunker::with_seed(reader, self.repo.key().chunker_seed())
            .map(|chunk| chunk.map_err(|e| ClientError::io(path, std::io::Error::other(e))));
        self.store_file_chunks(&mut chunks)
    }

    /// Chunks data already in memory (same boundaries as [`Self::chunk_reader`]).
    fn chunk_bytes(&self, data: &[u8]) -> Result<(Vec<ChunkRef>, u64)> {
        let ranges = chunk_bytes_with_seed(data, self.repo.key().chunker_seed());
        self.store_file_chunks(&mut ranges.into_iter().map(|r| Ok(data[r].to_vec())))
    }

    /// Chunks one file: small files are read whole and cut in memory.
    fn chunk_file(&self, path: &Path, len: u64) -> Result<(Vec<ChunkRef>, u64)> {
        let mut file = std::fs::File::open(path).map_err(|e| ClientError::io(path, e))?;
        if len > READ_WHOLE_BYTES_MAX {
            return self.chunk_reader(file, path);
        }
        let mut data = Vec::with_capacity(len as usize + 1);
        file.read_to_end(&mut data)
            .map_err(|e| ClientError::io(path, e))?;
        self.chunk_bytes(&data)
    }

    /// Ids the chunks, hands the new ones to the look-up batch; returns the
    /// chunk references and the size.
    fn store_file_chunks(
        &self,
        chunks: &mut dyn Iterator<Item = Result<Vec<u8>>>,
    ) -> Result<(Vec<ChunkRef>, u64)> {
        let mut ids = Vec::new();
        let mut size = 0u64;
        let mut batch = Vec::with_capacity(DEDUP_BATCH_CHUNKS);
        for chunk in chunks {
            let chunk = chunk?;
            let id = self.repo.key().blob_id(&chunk);
            size += chunk.len() as u64;
            self.progress
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            ids.push(ChunkRef {
                id,
                len: chunk.len() as u32,
            });
            batch.push((id, chunk));
            if batch.len() >= DEDUP_BATCH_CHUNKS {
                self.store_chunks(&mut batch, BlobKind::Data)?;
            }
        }
        self.store_chunks(&mut batch, BlobKind::Data)?;
        Ok((ids, size))
    }

    fn store_tree(&self, tree: &Tree, parent_id: Option<BlobId>) -> Result<BlobId> {
        // Never store what restore would refuse.
        tree.validate()?;
        let encoded = tree.encode();
        let id = self.repo.key().blob_id(&encoded);
        // Referenced whether stored now or unchanged from the parent.
        self.refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(tree_refs(&id, tree));
        if parent_id == Some(id) {
            return Ok(id); // unchanged directory: the parent's tree is stored
        }
        self.store_chunks(&mut vec![(id, encoded)], BlobKind::Tree)?;
        Ok(id)
    }

    fn skip(&self, path: &Path, reason: impl Into<String>) {
        let skipped = Skipped {
            path: display_name(path.as_os_str().as_bytes()),
            reason: reason.into(),
        };
        warn!(path = %skipped.path, reason = %skipped.reason, "not backed up");
        self.skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(skipped);
    }

    fn excluded(&self, path: &Path) -> bool {
        self.excludes.as_ref().is_some_and(|g| g.is_match(path))
    }

    /// Stores the reference list of everything stored or reused so far as
    /// segments (deduplicated against the index like any blob, in packs of
    /// their own) and returns their descriptions for the commit. Call after
    /// the root tree is stored.
    fn store_refs(&self) -> Result<Vec<cairn_proto::v1::RefSegment>> {
        let ids: Vec<BlobId> =
            std::mem::take(&mut *self.refs.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        let segments = cairn_proto::refs::build(ids);
        let claimed: Vec<&cairn_proto::refs::Segment> = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            segments.iter().filter(|s| seen.insert(s.id)).collect()
        };
        let ids: Vec<BlobId> = claimed.iter().map(|s| s.id).collect();
        let present = self.runtime.block_on(self.repo.find_blobs(&ids))?;
        for (segment, known) in claimed.into_iter().zip(present) {
            if !known {
                // Unsealed: nodes read it without the tenant's key.
                self.add_to_pack(segment.id, BlobKind::Refs, &segment.bytes)?;
            }
        }
        Ok(segments.iter().map(|s| s.to_wire()).collect())
    }

    /// Looks up what is still queued, then sends whatever the builders hold.
    fn flush_packs(&self) -> Result<()> {
        let last = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        self.look_up_and_store(last)?;
        for builder in [&self.tree_builder, &self.data_builder, &self.refs_builder] {
            let last = std::mem::replace(
                &mut *builder.lock().unwrap_or_else(|p| p.into_inner()),
                PackBuilder::new(PACK_TARGET_BYTES),
            );
            if !last.is_empty() {
                self.send_pack(last)?;
            }
        }
        Ok(())
    }
}

/// New blobs of one session waiting for their index look-up.
#[derive(Default)]
struct LookupBatch {
    blobs: Vec<(BlobId, Vec<u8>, BlobKind)>,
    bytes: usize,
}

impl LookupBatch {
    fn push(&mut self, id: BlobId, data: Vec<u8>, kind: BlobKind) {
        self.bytes += data.len();
        self.blobs.push((id, data, kind));
    }

    fn is_full(&self) -> bool {
        self.blobs.len() >= LOOKUP_BATCH_CHUNKS || self.bytes >= LOOKUP_BATCH_BYTES
    }
}

/// The blob ids the tree stored as `id` makes its snapshot reference: the
/// tree itself, its subtrees and every chunk of every file it lists. The
/// union over every tree of a snapshot is its reference list.
pub fn tree_refs<'a>(id: &BlobId, tree: &'a Tree) -> impl Iterator<Item = BlobId> + 'a {
    let own = *id;
    std::iter::once(own).chain(tree.entries.iter().flat_map(|entry| {
        let ids: Box<dyn Iterator<Item = BlobId> + 'a> = match &entry.kind {
            EntryKind::File { chunks, .. } => Box::new(chunks.iter().map(|c| c.id)),
            EntryKind::Dir { subtree } => Box::new(std::iter::once(*subtree)),
            _ => Box::new(std::iter::empty()),
        };
        ids
    }))
}

/// Hard-link group of an inode: stable across backups of the same file
/// system, so unchanged directories keep the same tree blob.
fn hardlink_group(meta: &std::fs::Metadata) -> Option<u64> {
    if meta.nlink() < 2 {
        return None;
    }
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&meta.dev().to_le_bytes());
    key[8..].copy_from_slice(&meta.ino().to_le_bytes());
    let hash = blake3::hash(&key);
    let mut group = [0u8; 8];
    group.copy_from_slice(&hash.as_bytes()[..8]);
    Some(u64::from_le_bytes(group))
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Backs up files and directories into a new snapshot of `options.dataset`.
pub async fn backup_paths(
    repo: Arc<Repository>,
    paths: &[PathBuf],
    options: &BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupSummary> {
    if paths.is_empty() {
        return Err(ClientError::BadInput {
            what: "nothing to back up: give at least one path".into(),
        });
    }
    let mut tops = Vec::new();
    for path in paths {
        let meta = std::fs::symlink_metadata(path).map_err(|e| ClientError::io(path, e))?;
        let absolute = std::path::absolute(path).map_err(|e| ClientError::io(path, e))?;
        let name = absolute
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_else(|| b"root".to_vec());
        if tops
            .iter()
            .any(|(n, _, _): &(Vec<u8>, PathBuf, std::fs::Metadata)| *n == name)
        {
            return Err(ClientError::BadInput {
                what: format!(
                    "two paths end in the same name {:?}; back them up separately",
                    display_name(&name)
                ),
            });
        }
        tops.push((name, absolute, meta));
    }
    let info_paths = paths.iter().map(|p| p.display().to_string()).collect();
    let files_max = options.files_in_flight_max.max(1);
    run_backup(
        repo,
        options,
        progress,
        info_paths,
        true,
        move |session, parent, trees| {
            // Each run (a rerun as full too) walks the same top paths.
            let tops = tops.clone();
            Box::pin(async move {
                let mut entries = Vec::new();
                let permits = Arc::new(Semaphore::new(files_max));
                for (name, path, meta) in tops {
                    if session.excluded(&path) {
                        continue;
                    }
                    let parent_entry = parent.as_ref().and_then(|t| find_entry(t, &name));
                    let entry = backup_entry(
                        session.clone(),
                        permits.clone(),
                        trees.clone(),
                        name,
                        path,
                        meta,
                        parent_entry,
                    )
                    .await?;
                    entries.extend(entry);
                }
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Tree { entries })
            })
        },
    )
    .await
}

/// Backs up a stream (a database dump) as one file named `filename`.
pub async fn backup_stream(
    repo: Arc<Repository>,
    reader: impl Read + Send + 'static,
    filename: &str,
    options: &BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupSummary> {
    check_name(filename.as_bytes())?;
    let name = filename.as_bytes().to_vec();
    // A stream is read once: there is no rerun (see `run_backup`).
    let mut reader = Some(reader);
    run_backup(
        repo,
        options,
        progress,
        vec![format!("<stdin> as {filename}")],
        false,
        move |session, _parent, _trees| {
            let reader = reader.take();
            let name = name.clone();
            Box::pin(async move {
                let reader = reader.ok_or_else(|| ClientError::BadInput {
                    what: "the stream was already read and cannot be read again".into(),
                })?;
                let worker = session.clone();
                let (chunks, size) = tokio::task::spawn_blocking(move || {
                    worker.chunk_reader(reader, Path::new("<stdin>"))
                })
                .await
                .map_err(|e| ClientError::BadInput {
                    what: format!("reading stdin: {e}"),
                })??;
                session.files.fetch_add(1, Ordering::Relaxed);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as i64;
                Ok(Tree {
                    entries: vec![TreeEntry {
                        name,
                        kind: EntryKind::File {
                            size,
                            chunks,
                            hardlink: None,
                        },
                        mode: 0o100644,
                        mtime_ns: now,
                        uid: 0,
                        gid: 0,
                    }],
                })
            })
        },
    )
    .await
}

/// What a tree-building closure of [`backup_tree`] stores through: the
/// backup's own chunker, deduplication, packs and reference list. Its
/// methods block (they look blobs up in the index): call them from the
/// closure, which runs on a blocking thread.
pub struct TreeWriter {
    session: Arc<Session>,
}

impl TreeWriter {
    /// Stores one file's content (chunked with the tenant's chunker, new
    /// chunks sealed and packed) and returns its tree entry kind.
    pub fn file(&self, data: &[u8]) -> Result<EntryKind> {
        let (chunks, size) = self.session.chunk_bytes(data)?;
        self.session.files.fetch_add(1, Ordering::Relaxed);
        self.session.progress.files.fetch_add(1, Ordering::Relaxed);
        Ok(EntryKind::File {
            size,
            chunks,
            hardlink: None,
        })
    }

    /// Counts a file carried over unchanged from the parent (its entry is
    /// reused as is: nothing is read or uploaded; the tree that lists it
    /// references its chunks).
    pub fn reuse_file(&self, size: u64) {
        self.session.files.fetch_add(1, Ordering::Relaxed);
        self.session.progress.files.fetch_add(1, Ordering::Relaxed);
        self.session
            .progress
            .bytes
            .fetch_add(size, Ordering::Relaxed);
    }

    /// Validates and stores a directory's tree and returns its id; `previous`
    /// is the id of the same directory in the parent snapshot, if any (an
    /// identical tree is then not uploaded again). Every tree of the
    /// snapshot except the root must go through here, unchanged ones too,
    /// so the snapshot's reference list is complete.
    pub fn tree(&self, tree: &Tree, previous: Option<BlobId>) -> Result<BlobId> {
        self.session.store_tree(tree, previous)
    }
}

/// Backs up a tree built in memory by `build` (stream compaction: per-room
/// day files) into a new snapshot of `options.dataset`, recorded with
/// `parent` and `options.level` as its kind, through the same upload,
/// reference-list and commit path as every backup (`options.retire_segments`
/// go into the commit). `build` returns the root tree; it is not rerun, so a
/// commit refused because garbage collection swept blobs meanwhile is an
/// error ([`ClientError::CollectedDuringBackup`]): build and back up again.
pub async fn backup_tree<F>(
    repo: Arc<Repository>,
    options: &BackupOptions,
    parent: Option<Snapshot>,
    info_paths: Vec<String>,
    progress: Arc<Progress>,
    build: F,
) -> Result<BackupSummary>
where
    F: FnOnce(&TreeWriter) -> Result<Tree> + Send + 'static,
{
    let mut build = Some(build);
    let mut build_root =
        move |session: Arc<Session>, _parent: Option<Tree>, _trees: ParentTrees| {
            let build = build.take();
            let fut: BoxFuture<'static, Result<Tree>> = Box::pin(async move {
                let build = build.ok_or_else(|| ClientError::BadInput {
                    what: "an in-memory tree is built once and cannot be rebuilt".into(),
                })?;
                let writer = TreeWriter { session };
                tokio::task::spawn_blocking(move || build(&writer))
                    .await
                    .map_err(|e| ClientError::BadInput {
                        what: format!("tree builder task: {e}"),
                    })?
            });
            fut
        };
    match run_once(
        repo,
        options,
        progress,
        info_paths,
        ParentMode::Fixed(parent.map(Box::new)),
        &mut build_root,
    )
    .await
    {
        Err(ClientError::Server {
            code: tonic::Code::Aborted,
            message,
            ..
        }) => Err(ClientError::CollectedDuringBackup {
            detail: format!(
                "the in-memory tree is not rebuilt automatically; the node said: {message}"
            ),
        }),
        other => other,
    }
}

/// Runs a backup; if its commit is refused because garbage collection
/// removed blobs it references while it ran, runs it once more as a full
/// backup (fresh session and epoch), which uploads whatever is gone. A
/// stream (`repeatable: false`) cannot be read twice, so it is not rerun.
async fn run_backup<F>(
    repo: Arc<Repository>,
    options: &BackupOptions,
    progress: Arc<Progress>,
    info_paths: Vec<String>,
    repeatable: bool,
    mut build_root: F,
) -> Result<BackupSummary>
where
    F: FnMut(Arc<Session>, Option<Tree>, ParentTrees) -> BoxFuture<'static, Result<Tree>>
        + Send
        + 'static,
{
    let first = run_once(
        repo.clone(),
        options,
        progress.clone(),
        info_paths.clone(),
        ParentMode::ByLevel,
        &mut build_root,
    )
    .await;
    let message = match first {
        Err(ClientError::Server {
            code: tonic::Code::Aborted,
            message,
            ..
        }) => message,
        other => return other,
    };
    if !repeatable {
        return Err(ClientError::CollectedDuringBackup {
            detail: format!(
                "a stream cannot be read again for the automatic full rerun; the node said: {message}"
            ),
        });
    }
    warn!(dataset = %options.dataset, reason = %message, "commit refused: rerunning as a full backup");
    for counter in [
        &progress.files,
        &progress.bytes,
        &progress.bytes_added,
        &progress.packs,
    ] {
        counter.store(0, Ordering::Relaxed);
    }
    let full = BackupOptions {
        level: Level::Full,
        ..options.clone()
    };
    match run_once(
        repo,
        &full,
        progress,
        info_paths,
        ParentMode::ByLevel,
        &mut build_root,
    )
    .await
    {
        Ok(mut summary) => {
            summary.note = Some(format!(
                "rerun as a full backup: blobs the first attempt referenced were garbage-collected while it ran ({message})"
            ));
            Ok(summary)
        }
        Err(ClientError::Server {
            code: tonic::Code::Aborted,
            message,
            ..
        }) => Err(ClientError::CollectedDuringBackup {
            detail: format!("again during the full rerun: {message}"),
        }),
        Err(e) => Err(e),
    }
}

/// How a backup attempt finds the parent it records.
enum ParentMode {
    /// [`choose_parent`] by the options' level; its trees are loaded so the
    /// walk can skip unchanged files.
    ByLevel,
    /// This one (a compaction's listed snapshot), recorded with the
    /// options' level as kind; its trees are not loaded (the caller has
    /// what it needs).
    Fixed(Option<Box<Snapshot>>),
}

/// One backup attempt: walk, upload in one session, commit.
async fn run_once<F>(
    repo: Arc<Repository>,
    options: &BackupOptions,
    progress: Arc<Progress>,
    info_paths: Vec<String>,
    parent_mode: ParentMode,
    build_root: &mut F,
) -> Result<BackupSummary>
where
    F: FnMut(Arc<Session>, Option<Tree>, ParentTrees) -> BoxFuture<'static, Result<Tree>>
        + Send
        + 'static,
{
    let started = Instant::now();
    // Before any index look-up: whatever is found in the index from here on
    // was there at this epoch.
    let gc_epoch = repo.gc_epoch().await?;
    let upload_session = crate::repo::new_session();
    let (kind, note, parent, load_parent) = match parent_mode {
        ParentMode::ByLevel => {
            let snapshots = if options.use_parent && options.level != Level::Full {
                repo.snapshots(Some(&options.dataset)).await?
            } else {
                Vec::new()
            };
            let choice = choose_parent(
                options.level,
                options.use_parent,
                &options.dataset,
                &snapshots,
            );
            (choice.kind, choice.note, choice.parent.cloned(), true)
        }
        ParentMode::Fixed(parent) => (options.level, None, parent.map(|p| *p), false),
    };
    let mut parent_trees = match &parent {
        Some(p) if load_parent => repo.load_trees(&p.root_tree, &[]).await?,
        _ => HashMap::new(),
    };
    let parent_tree = parent
        .as_ref()
        .and_then(|p| parent_trees.remove(&p.root_tree));
    let parent_trees: ParentTrees = Arc::new(parent_trees);
    let excludes = exclude_matcher(&options.excludes)?;
    let (tx, rx) = mpsc::channel::<Pack>(PACKS_QUEUED_MAX);
    let session = Arc::new(Session {
        repo: repo.clone(),
        runtime: tokio::runtime::Handle::current(),
        seen: Mutex::new(HashSet::new()),
        pending: Mutex::new(LookupBatch::default()),
        data_builder: Mutex::new(PackBuilder::new(PACK_TARGET_BYTES)),
        tree_builder: Mutex::new(PackBuilder::new(PACK_TARGET_BYTES)),
        refs_builder: Mutex::new(PackBuilder::new(PACK_TARGET_BYTES)),
        refs: Mutex::new(HashSet::new()),
        excludes,
        skipped: Mutex::new(Vec::new()),
        packs: tx,
        progress: progress.clone(),
        files: AtomicU64::new(0),
        dictionary: crate::dictionary::DatasetDictionary::new(&repo, &options.dataset),
    });
    let uploader = {
        let repo = repo.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut uploads = tokio_stream_from(rx)
                .map(|pack| {
                    let repo = repo.clone();
                    async move { repo.put_pack(pack, &upload_session).await }
                })
                .buffer_unordered(UPLOADS_IN_FLIGHT_MAX);
            while let Some(result) = uploads.next().await {
                result?;
                progress.packs.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), ClientError>(())
        })
    };

    let root = build_root(session.clone(), parent_tree, parent_trees).await;
    // Whatever happened, close the pack stream so the uploader ends.
    let finished = match root {
        Ok(root) => {
            let worker = session.clone();
            let parent_root = parent.as_ref().map(|p| p.root_tree);
            tokio::task::spawn_blocking(move || -> Result<(BlobId, Vec<_>)> {
                let root_id = worker.store_tree(&root, parent_root)?;
                let refs = worker.store_refs()?;
                worker.flush_packs()?;
                Ok((root_id, refs))
            })
            .await
            .map_err(|e| ClientError::BadInput {
                what: format!("backup worker: {e}"),
            })
            .and_then(|r| r)
        }
        Err(e) => Err(e),
    };
    let files = session.files.load(Ordering::Relaxed);
    let mut skipped =
        std::mem::take(&mut *session.skipped.lock().unwrap_or_else(|p| p.into_inner()));
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    drop(session);
    let uploaded = uploader.await.map_err(|e| ClientError::BadInput {
        what: format!("upload task: {e}"),
    })?;
    // An upload error explains a closed channel better than the channel does.
    uploaded?;
    let (root_id, refs) = finished?;

    let mut id = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut id[..]);
    let snapshot = Snapshot {
        id,
        dataset: options.dataset.clone(),
        parent: parent.as_ref().map(|p| p.id),
        time_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64,
        kind: kind.as_str().into(),
        root_tree: root_id,
        info: SnapshotInfo {
            paths: info_paths,
            hostname: hostname(),
        },
        files,
        bytes: progress.bytes.load(Ordering::Relaxed),
        bytes_added: progress.bytes_added.load(Ordering::Relaxed),
        tags: options.tags.clone(),
        committed_unix_ms: 0,
        lock: None,
    };
    repo.commit_snapshot(
        &snapshot,
        &refs,
        gc_epoch,
        &upload_session,
        &options.retire_segments,
    )
    .await?;
    Ok(BackupSummary {
        snapshot_id: snapshot.id_hex(),
        dataset: snapshot.dataset,
        parent: parent.map(|p| p.id_hex()),
        level: kind.as_str().into(),
        note,
        files,
        bytes: snapshot.bytes,
        bytes_added: snapshot.bytes_added,
        packs: progress.packs.load(Ordering::Relaxed),
        duration_s: started.elapsed().as_secs_f64(),
        skipped,
    })
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn find_entry(tree: &Tree, name: &[u8]) -> Option<TreeEntry> {
    tree.entries
        .binary_search_by(|e| e.name.as_slice().cmp(name))
        .ok()
        .map(|i| tree.entries[i].clone())
}

/// The tree entry of `meta` holding `kind`.
fn base_entry(name: Vec<u8>, meta: &std::fs::Metadata, kind: EntryKind) -> TreeEntry {
    TreeEntry {
        name,
        kind,
        mode: meta.mode(),
        mtime_ns: mtime_ns(meta),
        uid: meta.uid(),
        gid: meta.gid(),
    }
}

/// The parent snapshot's entry of a file unchanged since (same size, mode
/// and mtime), reused without reading the file.
fn reused_file(
    session: &Session,
    meta: &std::fs::Metadata,
    parent: Option<&TreeEntry>,
) -> Option<EntryKind> {
    let Some(TreeEntry {
        kind: EntryKind::File { size, chunks, .. },
        mode,
        mtime_ns: old_mtime,
        ..
    }) = parent
    else {
        return None;
    };
    if *size != meta.len() || *mode != meta.mode() || *old_mtime != mtime_ns(meta) {
        return None;
    }
    session.progress.bytes.fetch_add(*size, Ordering::Relaxed);
    session.progress.files.fetch_add(1, Ordering::Relaxed);
    Some(EntryKind::File {
        size: *size,
        chunks: chunks.clone(),
        hardlink: hardlink_group(meta),
    })
}

/// Reads and chunks one regular file (blocking); the caller holds a permit.
fn read_file(session: &Session, path: &Path, meta: &std::fs::Metadata) -> Result<EntryKind> {
    let (chunks, size) = session.chunk_file(path, meta.len())?;
    session.progress.files.fetch_add(1, Ordering::Relaxed);
    Ok(EntryKind::File {
        size,
        chunks,
        hardlink: hardlink_group(meta),
    })
}

/// One entry of a directory listing, with what the walk knows of it.
struct Child {
    name: Vec<u8>,
    path: PathBuf,
    meta: std::fs::Metadata,
    parent: Option<TreeEntry>,
}

impl Child {
    /// A regular file small enough to go through [`backup_files`] in a
    /// group.
    fn is_small_file(&self) -> bool {
        self.meta.file_type().is_file() && self.meta.len() <= SMALL_FILE_BYTES_MAX
    }
}

/// Files up to this size are backed up in groups: a task per file costs
/// two thread hand-overs (tens of microseconds), more than reading and
/// chunking a file of a few hundred bytes. Larger files keep a task each,
/// so the cores share a directory's work evenly.
const SMALL_FILE_BYTES_MAX: u64 = 64 * 1024;
/// Small files of one directory handled by one blocking task: at most this
/// many files...
const SMALL_FILES_PER_TASK: usize = 64;
/// ...or this many bytes.
const SMALL_FILE_BYTES_PER_TASK: u64 = 1024 * 1024;

/// Backs up regular files of one directory: those unchanged since the
/// parent snapshot are reused at once; the others are read in one blocking
/// task holding one permit (a group of small files, or one file). Returns
/// their entries.
async fn backup_files(
    session: Arc<Session>,
    permits: Arc<Semaphore>,
    files: Vec<Child>,
) -> Result<Vec<TreeEntry>> {
    let mut entries = Vec::with_capacity(files.len());
    let mut to_read = Vec::new();
    for file in files {
        if let Err(e) = check_name(&file.name) {
            session.skip(&file.path, format!("name refused: {e}"));
            continue;
        }
        session.files.fetch_add(1, Ordering::Relaxed);
        match reused_file(&session, &file.meta, file.parent.as_ref()) {
            Some(kind) => entries.push(base_entry(file.name, &file.meta, kind)),
            None => to_read.push(file),
        }
    }
    if to_read.is_empty() {
        return Ok(entries);
    }
    let _permit = permits
        .acquire_owned()
        .await
        .expect("the file semaphore is never closed");
    let read = tokio::task::spawn_blocking(move || {
        to_read
            .into_iter()
            .map(|file| {
                let kind = read_file(&session, &file.path, &file.meta)?;
                Ok(base_entry(file.name, &file.meta, kind))
            })
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ClientError::BadInput {
        what: format!("file task: {e}"),
    })??;
    entries.extend(read);
    Ok(entries)
}

/// Lists a directory (blocking): every entry not excluded, with its
/// metadata and its entry in the parent snapshot's tree.
fn list_dir(session: &Session, path: &Path, parent_tree: Option<&Tree>) -> Result<Vec<Child>> {
    let mut children = Vec::new();
    let read = std::fs::read_dir(path).map_err(|e| ClientError::io(path, e))?;
    for item in read {
        let item = item.map_err(|e| ClientError::io(path, e))?;
        let name = item.file_name().into_vec();
        let child_path = item.path();
        if session.excluded(&child_path) {
            continue;
        }
        let meta =
            std::fs::symlink_metadata(&child_path).map_err(|e| ClientError::io(&child_path, e))?;
        let parent = parent_tree.and_then(|t| find_entry(t, &name));
        children.push(Child {
            name,
            path: child_path,
            meta,
            parent,
        });
    }
    Ok(children)
}

/// Backs up one filesystem entry; `None` for kinds that are skipped.
fn backup_entry(
    session: Arc<Session>,
    permits: Arc<Semaphore>,
    parent_trees: ParentTrees,
    name: Vec<u8>,
    path: PathBuf,
    meta: std::fs::Metadata,
    parent: Option<TreeEntry>,
) -> BoxFuture<'static, Result<Option<TreeEntry>>> {
    Box::pin(async move {
        // The one rule restore applies; a name read from a directory always
        // passes it, but a snapshot must never hold one that does not.
        if let Err(e) = check_name(&name) {
            session.skip(&path, format!("name refused: {e}"));
            return Ok(None);
        }
        let file_type = meta.file_type();
        let base = |kind| base_entry(name.clone(), &meta, kind);
        if file_type.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| ClientError::io(&path, e))?;
            let target = target.into_os_string().into_vec();
            if let Err(e) = crate::path_guard::check_symlink_target(&target) {
                session.skip(&path, format!("symlink target refused: {e}"));
                return Ok(None);
            }
            return Ok(Some(base(EntryKind::Symlink { target })));
        }
        if file_type.is_dir() {
            // The parent snapshot's tree of this directory, if it has one.
            let parent_id = match parent.as_ref().map(|p| &p.kind) {
                Some(EntryKind::Dir { subtree }) if parent_trees.contains_key(subtree) => {
                    Some(*subtree)
                }
                _ => None,
            };
            let listed = {
                let worker = session.clone();
                let dir = path.clone();
                let trees = parent_trees.clone();
                tokio::task::spawn_blocking(move || {
                    list_dir(&worker, &dir, parent_id.and_then(|id| trees.get(&id)))
                })
                .await
                .map_err(|e| ClientError::BadInput {
                    what: format!("directory task: {e}"),
                })??
            };
            // Small files go in groups, anything else in a task of its own.
            let mut tasks: Vec<tokio::task::JoinHandle<Result<Vec<TreeEntry>>>> = Vec::new();
            let mut group: Vec<Child> = Vec::new();
            let mut group_bytes = 0u64;
            for child in listed {
                if child.is_small_file() {
                    group_bytes += child.meta.len();
                    group.push(child);
                    if group.len() >= SMALL_FILES_PER_TASK
                        || group_bytes >= SMALL_FILE_BYTES_PER_TASK
                    {
                        let files = std::mem::take(&mut group);
                        group_bytes = 0;
                        tasks.push(tokio::spawn(backup_files(
                            session.clone(),
                            permits.clone(),
                            files,
                        )));
                    }
                    continue;
                }
                let entry = backup_entry(
                    session.clone(),
                    permits.clone(),
                    parent_trees.clone(),
                    child.name,
                    child.path,
                    child.meta,
                    child.parent,
                );
                tasks.push(tokio::spawn(async move {
                    entry.await.map(|e| e.into_iter().collect())
                }));
            }
            if !group.is_empty() {
                tasks.push(tokio::spawn(backup_files(
                    session.clone(),
                    permits.clone(),
                    group,
                )));
            }
            let mut entries = Vec::new();
            for task in tasks {
                let done = task.await.map_err(|e| ClientError::BadInput {
                    what: format!("backup task: {e}"),
                })??;
                entries.extend(done);
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let tree = Tree { entries };
            let worker = session.clone();
            let subtree = tokio::task::spawn_blocking(move || worker.store_tree(&tree, parent_id))
                .await
                .map_err(|e| ClientError::BadInput {
                    what: format!("tree task: {e}"),
                })??;
            return Ok(Some(base(EntryKind::Dir { subtree })));
        }
        if file_type.is_file() {
            let file = Child {
                name: name.clone(),
                path,
                meta: meta.clone(),
                parent,
            };
            return Ok(backup_files(session, permits, vec![file]).await?.pop());
        }
        if file_type.is_fifo() {
            return Ok(Some(base(EntryKind::Fifo)));
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return Ok(Some(base(EntryKind::Device {
                character: file_type.is_char_device(),
                rdev: meta.rdev(),
            })));
        }
        let what = if file_type.is_socket() {
            "a socket (it only exists while its program runs)"
        } else {
            "of an unknown file type"
        };
        session.skip(&path, format!("not backed up: {what}"));
        Ok(None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(patterns: &[&str], path: &str) -> bool {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        exclude_matcher(&patterns)
            .expect("patterns compile")
            .is_some_and(|g| g.is_match(Path::new(path)))
    }

    #[test]
    fn excludes_follow_restic() {
        // No slash: any base name or component.
        assert!(excluded(&["*.log"], "/srv/chat/app.log"));
        assert!(excluded(&["*.log"], "/app.log"));
        assert!(!excluded(&["*.log"], "/srv/chat/app.log.gz"));
        assert!(excluded(&["cache"], "/home/u/cache"));
        assert!(!excluded(&["cache"], "/home/u/cached"));
        // `*` does not cross a slash; `**` does.
        assert!(!excluded(&["/srv/*.log"], "/srv/chat/app.log"));
        assert!(excluded(&["/srv/**/*.log"], "/srv/chat/app.log"));
        // Absolute patterns match from the root only.
        assert!(excluded(&["/srv/chat"], "/srv/chat"));
        assert!(!excluded(&["/srv/chat"], "/x/srv/chat"));
        // Relative with a slash: the end of the path.
        assert!(excluded(&["chat/tmp"], "/srv/chat/tmp"));
        assert!(!excluded(&["chat/tmp"], "/srv/chat/tmpx"));
        // A trailing slash names a directory the same way.
        assert!(excluded(&["tmp/"], "/srv/tmp"));
        // Non-UTF-8 paths are matched by their bytes.
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"/srv/\xff.log");
        let set = exclude_matcher(&["*.log".to_string()])
            .expect("compiles")
            .expect("some");
        assert!(set.is_match(Path::new(odd)));
        assert!(exclude_matcher(&[]).expect("empty").is_none());
        assert!(matches!(
            exclude_matcher(&["a[".to_string()]),
            Err(ClientError::BadExclude { .. })
        ));
    }

    fn snap(id: u8, dataset: &str, kind: &str) -> Snapshot {
        Snapshot {
            id: [id; 32],
            dataset: dataset.into(),
            parent: None,
            time_unix_ms: i64::from(id),
            kind: kind.into(),
            root_tree: [id; 32],
            info: SnapshotInfo::default(),
            files: 0,
            bytes: 0,
            bytes_added: 0,
            tags: Vec::new(),
            committed_unix_ms: 0,
            lock: None,
        }
    }

    fn parent_id(choice: &ParentChoice<'_>) -> Option<u8> {
        choice.parent.map(|p| p.id[0])
    }

    #[test]
    fn the_level_chooses_the_parent_and_the_kind() {
        let history = vec![
            snap(1, "chat", "full"),
            snap(2, "chat", "incremental"),
            snap(3, "other", "full"),
            snap(4, "chat", "differential"),
            snap(5, "other", "incremental"),
        ];
        let full = choose_parent(Level::Full, true, "chat", &history);
        assert_eq!((parent_id(&full), full.kind), (None, Level::Full));
        assert!(full.note.is_none());
        let incr = choose_parent(Level::Incremental, true, "chat", &history);
        assert_eq!((parent_id(&incr), incr.kind), (Some(4), Level::Incremental));
        let diff = choose_parent(Level::Differential, true, "chat", &history);
        assert_eq!(
            (parent_id(&diff), diff.kind),
            (Some(1), Level::Differential)
        );
        // use_parent: false compares with nothing, whatever the level.
        let none = choose_parent(Level::Incremental, false, "chat", &history);
        assert_eq!((parent_id(&none), none.kind), (None, Level::Full));
        // Nothing yet: a full backup; a differential says why.
        let first = choose_parent(Level::Incremental, true, "new", &history);
        assert_eq!((parent_id(&first), first.kind), (None, Level::Full));
        assert!(first.note.is_none());
        let no_full = vec![snap(7, "logs", "incremental")];
        let diff = choose_parent(Level::Differential, true, "logs", &no_full);
        assert_eq!((parent_id(&diff), diff.kind), (None, Level::Full));
        let note = diff.note.expect("a note");
        assert!(note.contains("no full snapshot"), "{note}");
    }

    #[test]
    fn levels_parse_and_print() {
        for level in [Level::Full, Level::Incremental, Level::Differential] {
            assert_eq!(level.as_str().parse::<Level>().ok(), Some(level));
            assert_eq!(level.to_string(), level.as_str());
        }
        assert_eq!(Level::default(), Level::Incremental);
        assert_eq!("DIFF".parse::<Level>().ok(), Some(Level::Differential));
        let error = "weekly".parse::<Level>().expect_err("unknown");
        assert!(
            error
                .to_string()
                .contains("full, incremental or differential")
        );
    }

    #[test]
    fn a_trees_references_are_itself_its_subtrees_and_every_chunk() {
        let file = |name: &str, chunks: &[u8]| TreeEntry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::File {
                size: chunks.len() as u64,
                chunks: chunks
                    .iter()
                    .map(|&c| ChunkRef {
                        id: [c; 32],
                        len: 1,
                    })
                    .collect(),
                hardlink: None,
            },
            mode: 0o100644,
            mtime_ns: 0,
            uid: 0,
            gid: 0,
        };
        let tree = Tree {
            entries: vec![
                file("a", &[1, 2, 2]),
                TreeEntry {
                    kind: EntryKind::Dir { subtree: [9; 32] },
                    ..file("d", &[])
                },
                TreeEntry {
                    kind: EntryKind::Symlink {
                        target: b"a".to_vec(),
                    },
                    ..file("l", &[])
                },
                file("z", &[3]),
            ],
        };
        let mut refs: Vec<BlobId> = tree_refs(&[7; 32], &tree).collect();
        refs.sort_unstable();
        refs.dedup();
        assert_eq!(refs, vec![[1; 32], [2; 32], [3; 32], [7; 32], [9; 32]]);
    }

    #[test]
    fn exclude_file_lines() {
        let text = "# caches\n*.tmp\n\n   /srv/chat/tmp  \n#*.log\n";
        assert_eq!(parse_exclude_lines(text), ["*.tmp", "/srv/chat/tmp"]);
    }
}
