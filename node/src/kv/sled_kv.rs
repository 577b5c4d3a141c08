//! [`SledKv`]: the [`KvStore`] trait over one `sled::Tree` (sled 0.34.7).
//!
//! Several stores share one [`SledDb`] (one directory, one file lock), each on
//! its own tree, e.g. the Raft log and the state machine.
//!
//! sled traps handled here, not by callers:
//! - `flush_async` deadlocks when polled concurrently (sled#1308): only the
//!   blocking `flush` is ever called; async callers wrap it in `spawn_blocking`.
//! - sled's flush ends in `sync_file_range`, which neither flushes the drive's
//!   cache nor file metadata (sled#1452). After it, [`KvStore::flush`] fsyncs
//!   every file of the database directory and the directory itself.
//! - The directory stays locked until the last `Db`/`Tree` clone is dropped;
//!   [`SledDb::release_watch`] lets an owner wait for that before reopening.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use super::{BatchOp, KvError, KvPair, KvStore, WriteBatch};

#[derive(Debug)]
struct Shared {
    db: sled::Db,
    dir: PathBuf,
}

/// An open sled database directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SledDb {
    shared: Arc<Shared>,
}

/// Tells whether every handle of a [`SledDb`] (and its trees) has been dropped.
#[derive(Debug, Clone)]
pub struct ReleaseWatch(Weak<Shared>);

impl ReleaseWatch {
    /// True once no [`SledDb`] or [`SledKv`] of that database is alive, so the
    /// directory can be opened again.
    pub fn is_released(&self) -> bool {
        self.0.strong_count() == 0
    }
}

/// Page cache of one sled database.
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl SledDb {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, KvError> {
        let db = sled::Config::new()
            .path(dir)
            // A Raft log is insert-then-delete, sled's worst case for space
            // growth; low-space mode trades some speed for less amplification.
            .mode(sled::Mode::LowSpace)
            // sled's default cache is 1 GiB (or the cgroup limit): metadata
            // is small and the node's budget is 512 MiB in all.
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(|source| KvError::Sled {
                op: "open the database",
                source,
            })?;
        Ok(Self {
            shared: Arc::new(Shared {
                db,
                dir: dir.to_path_buf(),
            }),
        })
    }

    /// The store living in tree `name` (created if absent).
    pub fn tree(&self, name: &str) -> Result<SledKv, KvError> {
        let tree = self
            .shared
            .db
            .open_tree(name)
            .map_err(|source| KvError::Sled {
                op: "open a tree",
                source,
            })?;
        Ok(SledKv {
            tree,
            shared: self.shared.clone(),
        })
    }

    /// A watch telling when all handles of this database are gone.
    pub fn release_watch(&self) -> ReleaseWatch {
        ReleaseWatch(Arc::downgrade(&self.shared))
    }

    /// The directory the database lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

/// A [`KvStore`] on one tree of a [`SledDb`].
#[derive(Debug, Clone)]
pub struct SledKv {
    tree: sled::Tree,
    shared: Arc<Shared>,
}

fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> KvError {
    move |source| KvError::Sled { op, source }
}

fn collect(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    op: &'static str,
) -> Result<Vec<KvPair>, KvError> {
    iter.map(|item| {
        item.map(|(k, v)| (k.to_vec(), v.to_vec()))
            .map_err(sled_err(op))
    })
    .collect()
}

/// fsyncs every regular file under `dir` (recursively) and then the
/// directories, so renames and file sizes are durable too.
fn fsync_tree(dir: &Path) -> Result<(), KvError> {
    let io_err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| KvError::Io { op, path, source }
    };
    let entries = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_err("inspect", &path))?;
        if file_type.is_dir() {
            fsync_tree(&path)?;
            continue;
        }
        if !file_type.is_file() {
            continue;
        }
        match File::open(&path) {
            Ok(file) => file.sync_all().map_err(io_err("fsync", &path))?,
            // sled renames and removes its own snapshot files concurrently; a
            // file gone since the listing has nothing left to sync.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("open for fsync", &path)(e)),
        }
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

impl KvStore for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self
            .tree
            .get(key)
            .map_err(sled_err("read"))?
            .map(|v| v.to_vec()))
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.tree.insert(key, value).map_err(sled_err("write"))?;
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> Result<(), KvError> {
        self.tree.remove(key).map_err(sled_err("delete"))?;
        Ok(())
    }

    fn apply_batch(&self, batch: WriteBatch) -> Result<(), KvError> {
        let mut sled_batch = sled::Batch::default();
        for op in batch.into_ops() {
            match op {
                BatchOp::Put { key, value } => sled_batch.insert(key, value),
                BatchOp::Delete { key } => sled_batch.remove(key),
            }
        }
        self.tree
            .apply_batch(sled_batch)
            .map_err(sled_err("apply a batch"))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KvPair>, KvError> {
        collect(self.tree.scan_prefix(prefix), "scan")
    }

    fn range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, KvError> {
        match end {
            Some(end) if end <= start => Ok(Vec::new()),
            Some(end) => collect(self.tree.range(start..end).take(limit), "scan a range"),
            None => collect(self.tree.range(start..).take(limit), "scan a range"),
        }
    }

    fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<KvPair>, KvError> {
        self.tree
            .scan_prefix(prefix)
            .next_back()
            .transpose()
            .map(|found| found.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .map_err(sled_err("scan"))
    }

    fn flush(&self) -> Result<(), KvError> {
        // Never `flush_async` (see module docs). The pagecache is shared by all
        // trees, so this makes every tree's earlier writes durable.
        self.tree.flush().map_err(sled_err("flush"))?;
        fsync_tree(&self.shared.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn sled_kv_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SledDb::open(dir.path()).expect("open sled");
        let next = AtomicUsize::new(0);
        // A fresh tree per case: cases must not see each other's keys.
        crate::kv::conformance::run_all(|| {
            let n = next.fetch_add(1, Ordering::Relaxed);
            db.tree(&format!("case-{n}")).expect("open tree")
        });
    }

    #[test]
    fn sled_kv_keeps_flushed_data_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watch = {
            let db = SledDb::open(dir.path()).expect("open sled");
            let log = db.tree("log").expect("tree");
            let state = db.tree("state").expect("tree");
            crate::kv::conformance::write_reopen_fixture(&log, &state);
            log.flush().expect("flush");
            db.release_watch()
        };
        assert!(watch.is_released(), "all handles dropped");
        let db = SledDb::open(dir.path()).expect("reopen sled");
        let log = db.tree("log").expect("tree");
        let state = db.tree("state").expect("tree");
        crate::kv::conformance::check_reopen_fixture(&log, &state);
    }

    #[test]
    fn second_open_of_a_locked_directory_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _db = SledDb::open(dir.path()).expect("open sled");
        assert!(
            SledDb::open(dir.path()).is_err(),
            "sled must lock its directory"
        );
    }
}
