//! The audit log's hash chain, shared by the nodes that append to it and the
//! clients that verify it (`cairn audit verify`), so both compute one thing.

use prost::Message;

use crate::v1::AuditEntry;

/// `prev_hash` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// The hash of an entry: keyed blake3 over its protobuf encoding with `hash`
/// cleared. Every other field, `prev_hash` included, is covered, so changing
/// or removing any entry breaks every hash after it.
pub fn entry_hash(entry: &AuditEntry) -> [u8; 32] {
    let mut covered = entry.clone();
    covered.hash.clear();
    let mut hasher = blake3::Hasher::new_derive_key("cairn audit entry v1");
    hasher.update(&covered.encode_to_vec());
    *hasher.finalize().as_bytes()
}

/// Where a chain of entries (oldest first, starting at seq 1) breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// Entry `seq` does not follow the one before it (one was removed or reordered).
    Gap { expected: u64, found: u64 },
    /// Entry `seq` does not name the previous entry's hash.
    PrevMismatch { seq: u64 },
    /// Entry `seq` was altered: its stored hash is not the hash of its fields.
    Altered { seq: u64 },
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gap { expected, found } => {
                write!(f, "entry {expected} is missing (next entry is {found})")
            }
            Self::PrevMismatch { seq } => write!(
                f,
                "entry {seq} does not chain to the entry before it (removed or replaced)"
            ),
            Self::Altered { seq } => write!(f, "entry {seq} was altered after it was written"),
        }
    }
}

/// Walks a chain, carrying the last verified seq and hash, so a long log can
/// be checked page by page.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    pub seq: u64,
    pub head: [u8; 32],
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            seq: 0,
            head: GENESIS,
        }
    }
}

impl ChainVerifier {
    /// Checks the next entry and makes it the head.
    pub fn push(&mut self, entry: &AuditEntry) -> Result<(), ChainBreak> {
        if entry.seq != self.seq + 1 {
            return Err(ChainBreak::Gap {
                expected: self.seq + 1,
                found: entry.seq,
            });
        }
        if entry.prev_hash.as_slice() != self.head.as_slice() {
            return Err(ChainBreak::PrevMismatch { seq: entry.seq });
        }
        let hash = entry_hash(entry);
        if entry.hash.as_slice() != hash.as_slice() {
            return Err(ChainBreak::Altered { seq: entry.seq });
        }
        self.seq = entry.seq;
        self.head = hash;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let mut entry = AuditEntry {
                    seq,
                    time_unix_ms: 1_000 + seq as i64,
                    actor_kind: "token".into(),
                    token_id: "abcd".into(),
                    role: "admin".into(),
                    tenant: "chat".into(),
                    action: "CommitSnapshot".into(),
                    target: format!("snapshot {seq}"),
                    result: "ok".into(),
                    prev_hash: prev.to_vec(),
                    ..Default::default()
                };
                entry.hash = entry_hash(&entry).to_vec();
                prev = entry_hash(&entry);
                entry
            })
            .collect()
    }

    fn verify(entries: &[AuditEntry]) -> Result<(), ChainBreak> {
        let mut verifier = ChainVerifier::default();
        entries.iter().try_for_each(|e| verifier.push(e))
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(()));
    }

    #[test]
    fn an_edited_entry_is_caught() {
        let mut entries = chain(5);
        entries[2].result = "refused".into();
        assert_eq!(verify(&entries), Err(ChainBreak::Altered { seq: 3 }));
    }

    #[test]
    fn a_rehashed_edit_breaks_the_next_link() {
        let mut entries = chain(5);
        entries[2].target = "other".into();
        entries[2].hash = entry_hash(&entries[2]).to_vec();
        assert_eq!(verify(&entries), Err(ChainBreak::PrevMismatch { seq: 4 }));
    }

    #[test]
    fn a_removed_entry_is_caught() {
        let mut entries = chain(5);
        entries.remove(1);
        assert_eq!(
            verify(&entries),
            Err(ChainBreak::Gap {
                expected: 2,
                found: 3
            })
        );
    }
}
