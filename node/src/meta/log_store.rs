//! openraft's `RaftLogStorage` and `RaftLogReader` over a [`KvStore`]: the
//! Raft log, the vote, the last purged and the committed log ids.
//!
//! This is an openraft adapter: a move to openraft 0.10 touches it, nothing
//! above it. It must not interpret entries.
//!
//! Layout (values `codec::encode`d):
//! ```text
//! 00 "format"     -> FORMAT_MAGIC
//! 00 "vote"       -> Vote
//! 00 "purged"     -> LogId     (last purged; entries <= it are gone)
//! 00 "committed"  -> LogId
//! 'e' index:u64-BE -> Entry    (big-endian so key order is index order)
//! ```
//! Durability contract (openraft's, DEPENDENCIES §3/§8): `save_vote` is durable
//! on return; `append` fires its callback only after `flush` (sled flush +
//! fsync). Truncate, purge and committed are not flushed themselves: the store
//! makes writes durable in order, so the next flush covers them, and losing
//! them in a crash only brings back entries that are safe to have (uncommitted
//! ones a later append overwrites, or committed ones already in a snapshot).
//! Purge writes `purged` and deletes entries in one batch, so there is never a
//! hole between `purged` and the first entry.

#![allow(
    clippy::result_large_err,
    reason = "openraft's storage traits return its (large) StorageError; the helpers share that type"
)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use super::codec::{self, CodecError};
use super::types::{NodeId, TypeConfig};
use crate::kv::{KvError, KvStore, WriteBatch};

/// Marker stored under the format key of the log tree.
pub const FORMAT_MAGIC: &[u8] = b"cairn-meta-log/1";

const FORMAT_KEY: &[u8] = b"\x00format";
const VOTE_KEY: &[u8] = b"\x00vote";
const PURGED_KEY: &[u8] = b"\x00purged";
const COMMITTED_KEY: &[u8] = b"\x00committed";
const ENTRY: u8 = b'e';

/// Most entries one read returns; replication asks again for the rest.
const MAX_READ_ENTRIES: usize = 4096;

/// Why the log store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("raft log storage: {0}")]
    Kv(#[from] KvError),
    #[error("raft log tree has format {found:?}, expected {FORMAT_MAGIC:?}; refusing to touch it")]
    Format { found: String },
}

fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [ENTRY; 9];
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

/// The Raft log on a [`KvStore`]. Clones share the store (and are the log readers).
#[derive(Clone)]
pub struct LogStore {
    kv: Arc<dyn KvStore>,
}

impl LogStore {
    /// Wraps `kv`, writing the format marker into an empty tree and refusing a foreign one.
    pub fn open(kv: Arc<dyn KvStore>) -> Result<Self, LogStoreError> {
        match kv.get(FORMAT_KEY)? {
            Some(found) if found == FORMAT_MAGIC => {}
            Some(found) => {
                return Err(LogStoreError::Format {
                    found: String::from_utf8_lossy(&found).into_owned(),
                });
            }
            None if kv.last_with_prefix(b"")?.is_none() => kv.put(FORMAT_KEY, FORMAT_MAGIC)?,
            None => {
                return Err(LogStoreError::Format {
                    found: "(no marker in a non-empty tree)".into(),
                });
            }
        }
        Ok(Self { kv })
    }

    /// True if the store holds nothing Raft wrote: no vote, no entry, no
    /// purge mark (the format marker alone does not count). A node whose
    /// store is empty cannot tell a first start from a wiped disk by itself.
    pub fn is_empty(&self) -> Result<bool, LogStoreError> {
        Ok(self.kv.get(VOTE_KEY)?.is_none()
            && self.kv.get(PURGED_KEY)?.is_none()
            && self.kv.last_with_prefix(&[ENTRY])?.is_none())
    }

    fn get_value<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError<NodeId>> {
        match self.kv.get(key).map_err(read_err)? {
            Some(bytes) => Ok(Some(codec::decode(what, &bytes).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    /// Makes earlier writes durable without blocking the async runtime.
    async fn flush(&self) -> Result<(), KvError> {
        crate::kv::flush_blocking(&self.kv).await
    }
}

fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, CodecError> {
    codec::decode("log entry", bytes)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1).map(entry_key),
            Bound::Excluded(i) => Some(entry_key(*i)),
            Bound::Unbounded => None,
        }
        // Past the last index: stop at the end of the entry keyspace.
        .unwrap_or([ENTRY + 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        self.kv
            .range(&entry_key(start), Some(&end), MAX_READ_ENTRIES)
            .map_err(read_err)?
            .into_iter()
            .map(|(_, v)| decode_entry(&v).map_err(read_err))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.get_value("purged log id", PURGED_KEY)?;
        let last = match self.kv.last_with_prefix(&[ENTRY]).map_err(read_err)? {
            Some((_, v)) => Some(decode_entry(&v).map_err(read_err)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = codec::encode("vote", vote)
            .map_err(|e| StorageError::from(StorageIOError::write_vote(AnyError::new(&e))))?;
        let vote_err =
            |e: KvError| StorageError::from(StorageIOError::write_vote(AnyError::new(&e)));
        self.kv.put(VOTE_KEY, &bytes).map_err(vote_err)?;
        // A vote forgotten in a crash could let this node vote twice in a term.
        self.flush().await.map_err(vote_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_value("vote", VOTE_KEY)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        match committed {
            Some(log_id) => {
                let bytes = codec::encode("committed log id", &log_id).map_err(write_err)?;
                self.kv.put(COMMITTED_KEY, &bytes).map_err(write_err)
            }
            None => self.kv.delete(COMMITTED_KEY).map_err(write_err),
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.get_value("committed log id", COMMITTED_KEY)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::new();
        for entry in entries {
            let bytes = codec::encode("log entry", &entry).map_err(write_err)?;
            batch.put(entry_key(entry.log_id.index).to_vec(), bytes);
        }
        self.kv.apply_batch(batch).map_err(write_err)?;
        // Flushing inline keeps every log write in submission order; the
        // callback tells openraft the entries are durable, so it fires only now.
        match self.flush().await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let doomed = self
            .kv
            .range(&entry_key(log_id.index), Some(&[ENTRY + 1]), usize::MAX)
            .map_err(write_err)?;
        let mut batch = WriteBatch::new();
        for (key, _) in doomed {
            batch.delete(key);
        }
        self.kv.apply_batch(batch).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let end = match log_id.index.checked_add(1) {
            Some(next) => entry_key(next).to_vec(),
            None => vec![ENTRY + 1],
        };
        let doomed = self
            .kv
            .range(&entry_key(0), Some(&end), usize::MAX)
            .map_err(write_err)?;
        let mut batch = WriteBatch::new();
        batch.put(
            PURGED_KEY.to_vec(),
            codec::encode("purged log id", &log_id).map_err(write_err)?,
        );
        for (key, _) in doomed {
            batch.delete(key);
        }
        self.kv.apply_batch(batch).map_err(write_err)
    }
}
