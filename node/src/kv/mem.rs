//! [`MemKv`]: a `BTreeMap` behind a lock, for tests and as the reference
//! behaviour of the [`KvStore`] contract. Nothing is durable; `flush` is a no-op.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{BatchOp, KvError, KvPair, KvStore, WriteBatch};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An in-memory [`KvStore`]. Batches are atomic because they run under the write lock.
#[derive(Debug, Default)]
pub struct MemKv {
    map: RwLock<Map>,
}

impl MemKv {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Map>, KvError> {
        self.map.read().map_err(|_| KvError::Poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Map>, KvError> {
        self.map.write().map_err(|_| KvError::Poisoned)
    }
}

impl KvStore for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.read()?.get(key).cloned())
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.write()?.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> Result<(), KvError> {
        self.write()?.remove(key);
        Ok(())
    }

    fn apply_batch(&self, batch: WriteBatch) -> Result<(), KvError> {
        let mut map = self.write()?;
        for op in batch.into_ops() {
            match op {
                BatchOp::Put { key, value } => {
                    map.insert(key, value);
                }
                BatchOp::Delete { key } => {
                    map.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KvPair>, KvError> {
        Ok(self
            .read()?
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, KvError> {
        let upper = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        Ok(self
            .read()?
            .range::<[u8], _>((Bound::Included(start), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<KvPair>, KvError> {
        let map = self.read()?;
        let mut in_prefix = match super::prefix_end(prefix) {
            Some(end) => map.range::<[u8], _>((Bound::Included(prefix), Bound::Excluded(&end[..]))),
            None => map.range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded)),
        };
        Ok(in_prefix.next_back().map(|(k, v)| (k.clone(), v.clone())))
    }

    fn flush(&self) -> Result<(), KvError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_kv_passes_the_conformance_suite() {
        crate::kv::conformance::run_all(MemKv::new);
    }
}
