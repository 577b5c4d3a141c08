//! The shard store: one file per shard on this node's disk.
//!
//! It owns the directory it is opened on: the layout
//! `<dir>/<first 2 hex digits of pack id>/<pack id hex>.<shard index>`, the
//! temporary files of writes in flight (`….tmp-…`, removed at open), and the
//! shard and byte counters. It must not decide which shards a node holds
//! (placement, repair) nor serve the network ([`service`] does).
//!
//! Invariants:
//! - a shard is verified (header and payload checksums) before it is
//!   written and again after it is read: bad bytes are refused on the way in
//!   and reported as `Corrupt` on the way out, never returned as data;
//! - a shard is durable when `put` returns: written to a temporary file,
//!   `sync_all`, renamed into place, directory fsynced. A failed write (disk
//!   full included) never leaves a partial file under the final name;
//! - the counters equal what a scan of the directory would find: they are
//!   initialised by a scan at open and every rename or removal updates them
//!   under one lock.

pub mod service;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use crate::erasure::{ShardFormatError, ShardHeader, parse_shard_file};
use crate::meta::types::Id32;

/// Marker in the names of temporary files; anything carrying it is a write
/// that never finished and is deleted at open.
const TMP_MARKER: &str = ".tmp-";

/// Errors of the shard store.
#[derive(Debug, thiserror::Error)]
pub enum ShardStoreError {
    /// The store directory cannot be created or scanned.
    #[error("cannot open shard store at {}: {source}; check the data directory and its permissions", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// A shard offered to `put` is malformed or fails its checksums; nothing was written.
    #[error("shard refused, nothing written: {0}")]
    BadShard(#[from] ShardFormatError),
    /// No such shard on this node.
    #[error("shard {index} of pack {} is not stored on this node", hex::encode(.pack_id))]
    NotFound { pack_id: Id32, index: u32 },
    /// The stored shard fails verification: it must be rebuilt from other shards.
    #[error("shard {index} of pack {} is corrupt on disk ({reason}); read another shard, repair will rewrite it", hex::encode(.pack_id))]
    Corrupt {
        pack_id: Id32,
        index: u32,
        reason: ShardFormatError,
    },
    /// The file under this name holds another shard (wrong pack or index).
    #[error("file for shard {index} of pack {} holds shard {found_index} of pack {}; treat it as lost, repair will rewrite it", hex::encode(.pack_id), hex::encode(.found_pack_id))]
    Misfiled {
        pack_id: Id32,
        index: u32,
        found_pack_id: Id32,
        found_index: u32,
    },
    /// A different valid shard is already stored under this pack id and index.
    #[error("a different valid shard {index} of pack {} is already stored; delete it first to replace it", hex::encode(.pack_id))]
    Conflict { pack_id: Id32, index: u32 },
    /// The disk (or quota) is full; no partial shard was left behind.
    #[error("disk full while storing a shard under {}; free space or add nodes, the gateway places the shard elsewhere", dir.display())]
    DiskFull { dir: PathBuf },
    /// Any other I/O failure.
    #[error("shard store I/O error while trying to {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A blocking I/O task panicked or was cancelled.
    #[error("shard store task failed before finishing: {reason}")]
    TaskFailed { reason: String },
}

fn is_disk_full(e: &io::Error) -> bool {
    // ENOSPC (28 on Linux) maps to StorageFull; EDQUOT to QuotaExceeded.
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Wraps an I/O error, turning "no space" into `DiskFull` wherever it occurs
/// (create, write, fsync and rename can all report it).
fn io_error(op: &'static str, path: &Path, source: io::Error, root: &Path) -> ShardStoreError {
    if is_disk_full(&source) {
        ShardStoreError::DiskFull {
            dir: root.to_path_buf(),
        }
    } else {
        ShardStoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    shards: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Guards every rename into and removal from the final names, so the
    /// counters always match the directory.
    counters: Mutex<Counters>,
    /// Makes temporary names unique among concurrent writes in this process.
    tmp_seq: AtomicU64,
    /// Test hook: the next temp-file write fails half-way with ENOSPC.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
}

/// One shard file found by [`ShardStore::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredShard {
    pub pack_id: Id32,
    pub index: u32,
    /// Length of the whole file.
    pub bytes: u64,
    /// Last write (or re-sync by an idempotent put).
    pub modified: std::time::SystemTime,
}

/// Shards stored as files under one directory. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct ShardStore {
    inner: Arc<Inner>,
}

/// Name of the file of shard `index` of `pack_id`, relative to the root.
fn relative_path(pack_id: &Id32, index: u32) -> PathBuf {
    let hex = hex::encode(pack_id);
    Path::new(&hex[..2]).join(format!("{hex}.{index}"))
}

/// Parses `<64 hex>.<index>` back into a shard key; `None` for other names.
fn parse_file_name(name: &str) -> Option<(Id32, u32)> {
    let (hex_id, index) = name.split_once('.')?;
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex_id, &mut id).ok()?;
    // Only the canonical spelling counts: lowercase, no sign or leading zeros.
    if hex_id != hex::encode(id) {
        return None;
    }
    let index: u32 = index.parse().ok()?;
    (index.to_string() == name[hex_id.len() + 1..]).then_some((id, index))
}

fn is_shard_dir_name(name: &str) -> bool {
    name.len() == 2
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn fsync_dir(dir: &Path, root: &Path) -> Result<(), ShardStoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("fsync directory", dir, e, root))
}

impl ShardStore {
    /// Opens (creating if needed) the store in `dir`, removes temporary files
    /// of writes that never finished, and counts the shards present.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ShardStoreError> {
        let root = dir.as_ref().to_path_buf();
        let open_err = |source| ShardStoreError::Open {
            path: root.clone(),
            source,
        };
        fs::create_dir_all(&root).map_err(open_err)?;
        let mut counters = Counters::default();
        let mut removed = 0u64;
        for sub in fs::read_dir(&root).map_err(open_err)? {
            let sub = sub.map_err(open_err)?;
            let name = sub.file_name();
            if !sub.file_type().map_err(open_err)?.is_dir()
                || !name.to_str().is_some_and(is_shard_dir_name)
            {
                continue;
            }
            for entry in fs::read_dir(sub.path()).map_err(open_err)? {
                let entry = entry.map_err(open_err)?;
                let file_name = entry.file_name();
                let Some(file_name) = file_name.to_str() else {
                    continue;
                };
                if file_name.contains(TMP_MARKER) {
                    fs::remove_file(entry.path()).map_err(open_err)?;
                    removed += 1;
                } else if parse_file_name(file_name).is_some() {
                    counters.shards += 1;
                    counters.bytes += entry.metadata().map_err(open_err)?.len();
                }
            }
        }
        info!(shards = counters.shards, bytes = counters.bytes, stale_temp_files = removed,
            dir = %root.display(), "shard store opened");
        Ok(ShardStore {
            inner: Arc::new(Inner {
                root,
                counters: Mutex::new(counters),
                tmp_seq: AtomicU64::new(0),
                #[cfg(test)]
                fail_next_write: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// Verifies a whole shard file and stores it durably; returns its header.
    ///
    /// Idempotent: storing a shard that is already present byte for byte
    /// succeeds (and re-syncs it). A present file that fails verification is
    /// replaced; a present *valid* but different shard is a `Conflict`.
    pub async fn put(
        &self,
        file_bytes: impl Into<prost::bytes::Bytes>,
    ) -> Result<ShardHeader, ShardStoreError> {
        let file_bytes = file_bytes.into();
        let inner = self.inner.clone();
        blocking(move || inner.put(&file_bytes)).await
    }

    /// Reads and verifies one shard; returns the whole file (header + payload).
    pub async fn get(&self, pack_id: &Id32, index: u32) -> Result<Vec<u8>, ShardStoreError> {
        let inner = self.inner.clone();
        let pack_id = *pack_id;
        blocking(move || inner.get(&pack_id, index)).await
    }

    /// Removes one shard durably. Returns whether it was present (deleting a
    /// missing shard succeeds, so retries are harmless).
    pub async fn delete(&self, pack_id: &Id32, index: u32) -> Result<bool, ShardStoreError> {
        let inner = self.inner.clone();
        let pack_id = *pack_id;
        blocking(move || inner.delete(&pack_id, index)).await
    }

    /// `(shards, bytes)` stored, bytes counting whole files.
    pub fn stats(&self) -> (u64, u64) {
        let c = self.inner.lock_counters();
        (c.shards, c.bytes)
    }

    /// Every stored shard as `(pack id, index)`, sorted. Scans the disk:
    /// call it from a blocking context for large stores.
    pub fn list(&self) -> Result<Vec<(Id32, u32)>, ShardStoreError> {
        let root = &self.inner.root;
        let scan_err = |path: &Path, e| io_error("list", path, e, root);
        let mut out = Vec::new();
        for sub in fs::read_dir(root).map_err(|e| scan_err(root, e))? {
            let sub = sub.map_err(|e| scan_err(root, e))?;
            if !sub.file_name().to_str().is_some_and(is_shard_dir_name) {
                continue;
            }
            let sub_path = sub.path();
            for entry in fs::read_dir(&sub_path).map_err(|e| scan_err(&sub_path, e))? {
                let entry = entry.map_err(|e| scan_err(&sub_path, e))?;
                if let Some(key) = entry.file_name().to_str().and_then(parse_file_name) {
                    out.push(key);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every stored shard with its size and mtime, sorted; scans the disk
    /// off the async runtime. A file removed during the scan is skipped.
    pub async fn scan(&self) -> Result<Vec<StoredShard>, ShardStoreError> {
        let store = self.clone();
        blocking(move || {
            let mut out = Vec::new();
            for (pack_id, index) in store.list()? {
                if let Some(found) = store.inner.stat(&pack_id, index) {
                    out.push(found);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Size and mtime of one stored shard, `None` if absent (or unreadable).
    pub async fn stat(&self, pack_id: &Id32, index: u32) -> Option<StoredShard> {
        let inner = self.inner.clone();
        let pack_id = *pack_id;
        blocking(move || Ok(inner.stat(&pack_id, index)))
            .await
            .ok()
            .flatten()
    }

    /// Whether a file for this shard exists (verified or not).
    pub async fn contains(&self, pack_id: &Id32, index: u32) -> bool {
        self.stat(pack_id, index).await.is_some()
    }

    /// Test hook: makes the next temporary-file write fail half-way with ENOSPC.
    #[cfg(test)]
    fn fail_next_write(&self) {
        self.inner.fail_next_write.store(true, Ordering::SeqCst);
    }
}

/// Runs blocking I/O off the async runtime; a panic there becomes an error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ShardStoreError> + Send + 'static,
) -> Result<T, ShardStoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ShardStoreError::TaskFailed {
            reason: e.to_string(),
        })?
}

impl Inner {
    fn lock_counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        // The counters are plain integers updated after each successful
        // rename/remove; a panic elsewhere cannot leave them half-written.
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stat(&self, pack_id: &Id32, index: u32) -> Option<StoredShard> {
        let meta = fs::metadata(self.root.join(relative_path(pack_id, index))).ok()?;
        Some(StoredShard {
            pack_id: *pack_id,
            index,
            bytes: meta.len(),
            modified: meta.modified().ok()?,
        })
    }

    fn put(&self, bytes: &[u8]) -> Result<ShardHeader, ShardStoreError> {
        // First check of the pair: nothing unverified reaches the disk.
        let (header, _) = parse_shard_file(bytes)?;
        let rel = relative_path(&header.pack_id, header.index);
        let path = self.root.join(&rel);
        let sub = path
            .parent()
            .expect("shard paths always have a fan-out directory")
            .to_path_buf();
        let (pack_id, index) = (header.pack_id, header.index);
        let pack_hex = hex::encode(pack_id);

        match fs::create_dir(&sub) {
            // A new fan-out directory must itself be durable in the root.
            Ok(()) => fsync_dir(&self.root, &self.root)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("create directory", &sub, e, &self.root)),
        }

        match fs::read(&path) {
            Ok(existing) if existing == bytes => {
                // Same shard again (a retried write, or a repair rewriting a
                // leftover copy): make sure it is durable, and refresh its
                // mtime so the orphan sweep treats it as just written.
                let synced = File::options().write(true).open(&path).and_then(|f| {
                    f.set_modified(std::time::SystemTime::now())?;
                    f.sync_all()
                });
                match synced {
                    Ok(()) => {
                        fsync_dir(&sub, &self.root)?;
                        debug!(pack_id = %pack_hex, shard_idx = index, "shard already stored");
                        return Ok(header);
                    }
                    // Deleted since it was read (a concurrent delete): the
                    // caller still wants it stored, so it is written afresh.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("fsync", &path, e, &self.root)),
                }
            }
            Ok(existing) => match parse_shard_file(&existing) {
                Ok((found, _)) if found.pack_id != pack_id || found.index != index => {
                    // A misfiled file (another shard under this name) is
                    // not this shard at all: the verified one replaces it.
                    warn!(pack_id = %pack_hex, shard_idx = index,
                        found_pack_id = %hex::encode(found.pack_id), found_shard_idx = found.index,
                        "stored file holds another shard, replacing it with the verified one offered");
                }
                Ok(_) => return Err(ShardStoreError::Conflict { pack_id, index }),
                Err(reason) => {
                    warn!(pack_id = %pack_hex, shard_idx = index, %reason,
                        "stored shard is corrupt, replacing it with the verified one offered");
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("read", &path, e, &self.root)),
        }

        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = sub.join(format!(
            "{pack_hex}.{index}{TMP_MARKER}{}-{seq}",
            std::process::id()
        ));
        if let Err(e) = self.write_tmp(&tmp, bytes) {
            // Never leave a partial file behind, under any name.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }

        {
            let mut counters = self.lock_counters();
            let previous = fs::metadata(&path).ok().map(|m| m.len());
            if let Err(e) = fs::rename(&tmp, &path) {
                drop(counters);
                let _ = fs::remove_file(&tmp);
                return Err(io_error("rename", &path, e, &self.root));
            }
            match previous {
                Some(len) => counters.bytes = counters.bytes.saturating_sub(len),
                None => counters.shards += 1,
            }
            counters.bytes += bytes.len() as u64;
        }
        fsync_dir(&sub, &self.root)?;
        debug!(pack_id = %pack_hex, shard_idx = index, bytes = bytes.len(), "shard stored");
        Ok(header)
    }

    fn write_tmp(&self, tmp: &Path, bytes: &[u8]) -> Result<(), ShardStoreError> {
        let err = |op, e| io_error(op, tmp, e, &self.root);
        let mut file = File::create_new(tmp).map_err(|e| err("create", e))?;
        #[cfg(test)]
        if self.fail_next_write.swap(false, Ordering::SeqCst) {
            file.write_all(&bytes[..bytes.len() / 2])
                .map_err(|e| err("write", e))?;
            return Err(err("write", io::Error::from(io::ErrorKind::StorageFull)));
        }
        file.write_all(bytes).map_err(|e| err("write", e))?;
        file.sync_all().map_err(|e| err("fsync", e))
    }

    fn get(&self, pack_id: &Id32, index: u32) -> Result<Vec<u8>, ShardStoreError> {
        let path = self.root.join(relative_path(pack_id, index));
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ShardStoreError::NotFound {
                    pack_id: *pack_id,
                    index,
                });
            }
            Err(e) => return Err(io_error("read", &path, e, &self.root)),
        };
        // Second check of the pair: what comes off the disk is verified again.
        let header = match parse_shard_file(&bytes) {
            Ok((header, _)) => header,
            Err(reason) => {
                warn!(pack_id = %hex::encode(pack_id), shard_idx = index, %reason,
                    "corrupt shard on disk, left in place for repair to overwrite");
                return Err(ShardStoreError::Corrupt {
                    pack_id: *pack_id,
                    index,
                    reason,
                });
            }
        };
        if header.pack_id != *pack_id || header.index != index {
            warn!(pack_id = %hex::encode(pack_id), shard_idx = index,
                "shard file holds another shard, left in place for repair to overwrite");
            return Err(ShardStoreError::Misfiled {
                pack_id: *pack_id,
                index,
                found_pack_id: header.pack_id,
                found_index: header.index,
            });
        }
        Ok(bytes)
    }

    fn delete(&self, pack_id: &Id32, index: u32) -> Result<bool, ShardStoreError> {
        let path = self.root.join(relative_path(pack_id, index));
        {
            let mut counters = self.lock_counters();
            let len = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io_error("stat", &path, e, &self.root)),
            };
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io_error("remove", &path, e, &self.root)),
            }
            counters.shards = counters.shards.saturating_sub(1);
            counters.bytes = counters.bytes.saturating_sub(len);
        }
        if let Some(sub) = path.parent() {
            fsync_dir(sub, &self.root)?;
        }
        debug!(pack_id = %hex::encode(pack_id), shard_idx = index, "shard deleted");
        Ok(true)
    }
}

/// Conformance suite of the shard store: what any implementation (this one,
/// or a future one behind a trait) must do.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::erasure::{Code, EncodedShard, HEADER_LEN, encode_pack};

    fn shards(pack: &[u8]) -> Vec<EncodedShard> {
        encode_pack(Code::default(), *blake3::hash(pack).as_bytes(), pack)
    }

    fn open(dir: &tempfile::TempDir) -> ShardStore {
        ShardStore::open(dir.path().join("shards")).expect("open store")
    }

    fn files_under(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for sub in fs::read_dir(root).expect("root") {
            let sub = sub.expect("entry").path();
            if sub.is_dir() {
                for f in fs::read_dir(&sub).expect("sub") {
                    out.push(f.expect("entry").file_name().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn put_get_round_trip_and_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let encoded = shards(b"some ciphertext bytes of a pack");
        let mut total = 0;
        for s in &encoded {
            let file = s.to_file_bytes();
            total += file.len() as u64;
            let header = store.put(file.clone()).await.expect("put");
            assert_eq!(header, s.header);
            assert_eq!(
                store
                    .get(&s.header.pack_id, s.header.index)
                    .await
                    .expect("get"),
                file
            );
        }
        assert_eq!(store.stats(), (6, total));
        let id = encoded[0].header.pack_id;
        let hex_id = hex::encode(id);
        assert!(
            store
                .dir()
                .join(&hex_id[..2])
                .join(format!("{hex_id}.5"))
                .is_file()
        );
        assert_eq!(
            store.list().expect("list"),
            (0..6).map(|i| (id, i)).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn put_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let file = shards(b"abc")[2].to_file_bytes();
        store.put(file.clone()).await.expect("first put");
        store.put(file.clone()).await.expect("same put again");
        assert_eq!(store.stats(), (1, file.len() as u64));
    }

    #[tokio::test]
    async fn corrupt_byte_on_disk_is_reported_not_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = &shards(b"0123456789abcdef")[1];
        store.put(s.to_file_bytes()).await.expect("put");
        let path = store.dir().join(relative_path(&s.header.pack_id, 1));
        for pos in [3, HEADER_LEN - 1, HEADER_LEN + 2] {
            let mut bytes = fs::read(&path).expect("read");
            bytes[pos] ^= 0x40;
            fs::write(&path, &bytes).expect("corrupt it");
            let err = store.get(&s.header.pack_id, 1).await.expect_err("corrupt");
            assert!(
                matches!(err, ShardStoreError::Corrupt { index: 1, .. }),
                "byte {pos}: {err}"
            );
            bytes[pos] ^= 0x40;
            fs::write(&path, &bytes).expect("restore it");
            store.get(&s.header.pack_id, 1).await.expect("intact again");
        }
        // A corrupt stored copy (bit rot: same length) is replaced by a verified put.
        let len = s.to_file_bytes().len();
        fs::write(&path, vec![0xee; len]).expect("corrupt it");
        assert!(store.get(&s.header.pack_id, 1).await.is_err());
        store.put(s.to_file_bytes()).await.expect("repair put");
        store.get(&s.header.pack_id, 1).await.expect("repaired");
        assert_eq!(store.stats(), (1, s.to_file_bytes().len() as u64));
    }

    #[tokio::test]
    async fn misfiled_shard_is_not_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = shards(b"misfiled");
        store.put(s[0].to_file_bytes()).await.expect("put");
        let from = store.dir().join(relative_path(&s[0].header.pack_id, 0));
        let to = store.dir().join(relative_path(&s[0].header.pack_id, 3));
        fs::rename(from, to).expect("move");
        assert!(matches!(
            store.get(&s[0].header.pack_id, 3).await,
            Err(ShardStoreError::Misfiled {
                index: 3,
                found_index: 0,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_misfiled_file_is_replaced_by_the_right_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = shards(b"swapped files");
        store.put(s[0].to_file_bytes()).await.expect("put");
        let from = store.dir().join(relative_path(&s[0].header.pack_id, 0));
        let to = store.dir().join(relative_path(&s[0].header.pack_id, 3));
        fs::rename(from, to).expect("move");
        // Before the fix this was a Conflict, so repair could never rewrite it.
        store
            .put(s[3].to_file_bytes())
            .await
            .expect("the right shard replaces the misfiled one");
        assert_eq!(
            store.get(&s[3].header.pack_id, 3).await.expect("get"),
            s[3].to_file_bytes()
        );
    }

    #[tokio::test]
    async fn an_idempotent_put_refreshes_the_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = &shards(b"old leftover")[2];
        store.put(s.to_file_bytes()).await.expect("put");
        let path = store.dir().join(relative_path(&s.header.pack_id, 2));
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(old))
            .expect("age it");
        store.put(s.to_file_bytes()).await.expect("put again");
        let found = store.stat(&s.header.pack_id, 2).await.expect("present");
        assert!(found.modified > old + std::time::Duration::from_secs(3600));
        assert_eq!(store.scan().await.expect("scan"), vec![found]);
    }

    #[tokio::test]
    async fn missing_is_not_found_and_delete_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = &shards(b"xyz")[0];
        assert!(matches!(
            store.get(&s.header.pack_id, 0).await,
            Err(ShardStoreError::NotFound { index: 0, .. })
        ));
        store.put(s.to_file_bytes()).await.expect("put");
        assert!(store.delete(&s.header.pack_id, 0).await.expect("delete"));
        assert!(
            !store
                .delete(&s.header.pack_id, 0)
                .await
                .expect("delete again")
        );
        assert_eq!(store.stats(), (0, 0));
        assert!(matches!(
            store.get(&s.header.pack_id, 0).await,
            Err(ShardStoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn tampered_or_malformed_put_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let mut file = shards(b"tamper with me")[4].to_file_bytes();
        let last = file.len() - 1;
        file[last] ^= 1;
        assert!(matches!(
            store.put(file).await,
            Err(ShardStoreError::BadShard(ShardFormatError::PayloadChecksum))
        ));
        assert!(matches!(
            store.put(b"not a shard".to_vec()).await,
            Err(ShardStoreError::BadShard(ShardFormatError::TooShort { .. }))
        ));
        assert_eq!(store.stats(), (0, 0));
        assert!(files_under(store.dir()).is_empty());
    }

    #[tokio::test]
    async fn different_valid_shard_under_same_name_is_a_conflict() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let pack = b"conflicting";
        let a = encode_pack(Code::default(), [7; 32], pack);
        let b = encode_pack(Code::new(3, 3).expect("valid"), [7; 32], pack);
        store.put(a[0].to_file_bytes()).await.expect("put");
        assert!(matches!(
            store.put(b[0].to_file_bytes()).await,
            Err(ShardStoreError::Conflict { index: 0, .. })
        ));
        assert_eq!(
            store.get(&[7; 32], 0).await.expect("kept"),
            a[0].to_file_bytes()
        );
    }

    #[tokio::test]
    async fn disk_full_is_distinct_and_leaves_no_partial_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = &shards(&[9u8; 4000])[3];
        store.fail_next_write();
        let err = store.put(s.to_file_bytes()).await.expect_err("disk full");
        assert!(matches!(err, ShardStoreError::DiskFull { .. }), "{err}");
        assert!(
            files_under(store.dir()).is_empty(),
            "partial file left behind"
        );
        assert_eq!(store.stats(), (0, 0));
        assert!(matches!(
            store.get(&s.header.pack_id, 3).await,
            Err(ShardStoreError::NotFound { .. })
        ));
        // Space back: the same put succeeds.
        store
            .put(s.to_file_bytes())
            .await
            .expect("put after space freed");
        assert!(is_disk_full(&io::Error::from_raw_os_error(28)), "ENOSPC");
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_counters_and_cleans_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let encoded = shards(&[1u8; 1000]);
        for s in &encoded[..4] {
            store.put(s.to_file_bytes()).await.expect("put");
        }
        let stats = store.stats();
        let hex_id = hex::encode(encoded[0].header.pack_id);
        let sub = store.dir().join(&hex_id[..2]);
        let stale = sub.join(format!("{hex_id}.4{TMP_MARKER}1-0"));
        fs::write(&stale, b"half a shard").expect("stale temp");
        fs::write(store.dir().join("README"), b"not a shard").expect("foreign file");
        drop(store);

        let store = open(&dir);
        assert_eq!(store.stats(), stats);
        assert!(!stale.exists(), "stale temp file survived open");
        assert_eq!(store.list().expect("list").len(), 4);
        for s in &encoded[..4] {
            assert_eq!(
                store
                    .get(&s.header.pack_id, s.header.index)
                    .await
                    .expect("get"),
                s.to_file_bytes()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_puts_and_deletes_keep_counters_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let encoded = shards(&[5u8; 3000]);
        let mut tasks = Vec::new();
        for round in 0..4 {
            for s in &encoded {
                let store = store.clone();
                let file = s.to_file_bytes();
                let (id, index) = (s.header.pack_id, s.header.index);
                tasks.push(tokio::spawn(async move {
                    store.put(file).await.expect("put");
                    if round == 3 && index % 2 == 0 {
                        store.delete(&id, index).await.expect("delete");
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("task");
        }
        let listed = store.list().expect("list");
        let bytes: u64 = listed
            .iter()
            .map(|(id, i)| {
                fs::metadata(store.dir().join(relative_path(id, *i)))
                    .expect("stat")
                    .len()
            })
            .sum();
        assert_eq!(store.stats(), (listed.len() as u64, bytes));
        drop(store);
        assert_eq!(open(&dir).stats().0, listed.len() as u64);
    }

    #[test]
    fn file_names_round_trip_and_reject_lookalikes() {
        let id = [0xab; 32];
        let rel = relative_path(&id, 17);
        let name = rel.file_name().and_then(|n| n.to_str()).expect("utf-8");
        assert_eq!(parse_file_name(name), Some((id, 17)));
        assert_eq!(rel.parent(), Some(Path::new("ab")));
        let hex_id = hex::encode(id);
        assert_eq!(parse_file_name(&format!("{hex_id}.017")), None);
        assert_eq!(parse_file_name(&format!("{hex_id}.+1")), None);
        assert_eq!(
            parse_file_name(&format!("{}.1", hex_id.to_uppercase())),
            None
        );
        assert_eq!(parse_file_name(&format!("{hex_id}.1{TMP_MARKER}9-9")), None);
        assert_eq!(parse_file_name("README"), None);
    }
}
