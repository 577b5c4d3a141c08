//! A narrow ordered key-value interface and its engines.
//!
//! This module owns the [`KvStore`] trait, the only way the metadata group
//! (Raft log, vote, state machine) touches its storage engine, and two
//! implementations: [`SledKv`] (one `sled::Tree`; several stores may share one
//! [`SledDb`]) and [`MemKv`] (a `BTreeMap`, for tests). Keeping the trait this
//! small is what lets sled be swapped for redb or fjall without touching any
//! openraft code.
//!
//! It must not know what the keys mean: no Raft types, no encodings. Callers
//! build their own key layouts on top of ordered byte strings.
//!
//! Invariants every implementation keeps (checked by the conformance suite in
//! `conformance.rs`, which runs against every engine):
//! - keys iterate in lexicographic byte order;
//! - a [`WriteBatch`] is applied all or nothing, its operations in order (a
//!   later operation on the same key wins), and is visible in full on return;
//! - [`KvStore::flush`] returns only when every write that returned before it
//!   is durable, including on-disk metadata (a real `fsync`, not only sled's
//!   `sync_file_range`).

mod mem;
mod sled_kv;

#[cfg(test)]
mod conformance;

use std::path::PathBuf;
use std::sync::Arc;

pub use mem::MemKv;
pub use sled_kv::{ReleaseWatch, SledDb, SledKv};

/// A key and its value, as returned by scans.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The storage engine itself reported an error (I/O, corruption).
    #[error(
        "storage engine failed to {op}: {source}; the store may need to be restored from a peer"
    )]
    Sled {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    /// Syncing the database files to disk failed; the last writes may not be durable.
    #[error("could not {op} {path}: {source}; check the disk and its free space")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking task running a flush did not complete (runtime shutting
    /// down, or a panic inside the engine); nothing since the last flush is
    /// known to be durable.
    #[error("background flush did not complete: {reason}; the last writes may not be durable")]
    FlushTask { reason: String },
    /// Another thread panicked while holding the in-memory store's lock.
    #[error("in-memory store lock poisoned by a panicked writer; the store is unusable")]
    Poisoned,
}

/// One operation inside a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Sets `key` to `value`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Removes `key` (a no-op if absent).
    Delete { key: Vec<u8> },
}

/// An ordered list of writes applied atomically by [`KvStore::apply_batch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<BatchOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `key = value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put {
            key: key.into(),
            value: value.into(),
        });
    }

    /// Queues the removal of `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete { key: key.into() });
    }

    /// Number of queued operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The queued operations, in the order they will be applied.
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }

    /// Consumes the batch into its operations.
    pub fn into_ops(self) -> Vec<BatchOp> {
        self.ops
    }
}

/// An ordered byte-string map with atomic batches and an explicit durability point.
///
/// Methods are synchronous and may block on disk I/O; async callers run
/// [`KvStore::flush`] (the slow one) in `spawn_blocking`.
pub trait KvStore: Send + Sync + 'static {
    /// The value stored under `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;

    /// Sets `key` to `value` (not durable until [`KvStore::flush`]).
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), KvError>;

    /// Removes `key`; removing an absent key is not an error.
    fn delete(&self, key: &[u8]) -> Result<(), KvError>;

    /// Applies every operation of `batch`, in order, atomically: after a crash
    /// either all of it or none of it is there.
    fn apply_batch(&self, batch: WriteBatch) -> Result<(), KvError>;

    /// Every pair whose key starts with `prefix`, in key order. The empty
    /// prefix lists the whole store (the snapshot iteration of the trait; it is
    /// point-in-time only if no writer runs concurrently, so callers that need
    /// a consistent view serialize their writers against it).
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KvPair>, KvError>;

    /// Pairs with `start <= key` and, if given, `key < end`, in key order,
    /// at most `limit` of them.
    fn range(&self, start: &[u8], end: Option<&[u8]>, limit: usize)
    -> Result<Vec<KvPair>, KvError>;

    /// The pair with the greatest key starting with `prefix`.
    fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<KvPair>, KvError>;

    /// Returns once every write that completed before the call is durable on disk.
    fn flush(&self) -> Result<(), KvError>;
}

/// Runs [`KvStore::flush`] on the blocking pool, so an async caller never
/// stalls a runtime worker on disk I/O (and never needs sled's deadlocking
/// `flush_async`).
pub async fn flush_blocking(kv: &Arc<dyn KvStore>) -> Result<(), KvError> {
    let kv = kv.clone();
    tokio::task::spawn_blocking(move || kv.flush())
        .await
        .map_err(|join| KvError::FlushTask {
            reason: join.to_string(),
        })?
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// if there is none (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn batch_keeps_operations_in_order() {
        let mut batch = WriteBatch::new();
        assert!(batch.is_empty());
        batch.put(b"k".to_vec(), b"v".to_vec());
        batch.delete(b"k".to_vec());
        assert_eq!(batch.len(), 2);
        assert_eq!(
            batch.into_ops(),
            vec![
                BatchOp::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec()
                },
                BatchOp::Delete { key: b"k".to_vec() }
            ]
        );
    }
}
