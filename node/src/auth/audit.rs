//! Feeding the audit log from the request path: who the actor was, and
//! refused calls recorded through a token bucket, so a flood of refusals
//! costs a bounded number of Raft entries (the count of those left out goes
//! into the next recorded one). [`ChainWatch`] re-verifies this node's copy
//! of the chain incrementally for the `cairn_audit_chain_valid` metric.

use std::sync::Mutex;
use std::time::Instant;

use cairn_proto::audit::{ChainBreak, ChainVerifier};
use cairn_proto::v1::AuditEntry;

use super::Caller;
use crate::meta::types::{Actor, Command};
use crate::meta::{Meta, MetaError};

/// Refusals recorded in a burst, and per second after it, per node.
pub const REFUSALS_BURST: f64 = 20.0;
pub const REFUSALS_PER_SECOND: f64 = 2.0;

/// The audit actor of a caller (never a secret: the token's public id).
pub fn actor_of(caller: &Caller) -> Actor {
    match caller {
        Caller::Insecure => Actor {
            kind: "insecure".into(),
            ..Actor::default()
        },
        Caller::Node(id) => Actor {
            kind: "node".into(),
            node_id: *id,
            ..Actor::default()
        },
        Caller::Token { id, role, tenant } => Actor {
            kind: "token".into(),
            token_id: id.clone(),
            role: role.as_str().into(),
            tenant: tenant.clone().unwrap_or_default(),
            node_id: 0,
        },
    }
}

/// A caller without valid credentials; `token_id` names the token it
/// presented, if any (the public id only).
pub fn anonymous(token_id: Option<String>) -> Actor {
    Actor {
        kind: "anonymous".into(),
        token_id: token_id.unwrap_or_default(),
        ..Actor::default()
    }
}

/// A token bucket over refusals: [`REFUSALS_BURST`] at once, then
/// [`REFUSALS_PER_SECOND`]; counts what it turns away.
struct Bucket {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Self {
            tokens: REFUSALS_BURST,
            refilled: now,
            suppressed: 0,
        }
    }

    /// `Some(refusals turned away since the last admitted one)` if one more
    /// may be recorded at `now`.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let refill =
            now.saturating_duration_since(self.refilled).as_secs_f64() * REFUSALS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(REFUSALS_BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Writes audit entries for this node's requests.
pub struct Auditor {
    meta: Meta,
    bucket: Mutex<Bucket>,
}

impl Auditor {
    pub fn new(meta: Meta) -> Self {
        Self {
            meta,
            bucket: Mutex::new(Bucket::new(Instant::now())),
        }
    }

    /// Takes one refusal from the bucket: `Some(suppressed since the last
    /// recorded one)` if this one may be recorded.
    fn admit(&self) -> Option<u64> {
        self.bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now())
    }

    /// Records a refused call without making the caller wait for the commit
    /// (rate-limited; a refusal that is not recorded is counted).
    pub fn refused(&self, actor: Actor, action: &str, target: &str, reason: &str) {
        let Some(suppressed) = self.admit() else {
            return;
        };
        let mut result = format!("refused: {reason}");
        if suppressed > 0 {
            result.push_str(&format!(
                " ({suppressed} earlier refusal(s) not recorded: rate limit)"
            ));
        }
        let command = Command::Audit {
            at: 0,
            actor,
            action: action.to_string(),
            target: target.to_string(),
            result,
        };
        let meta = self.meta.clone();
        tokio::spawn(async move {
            if let Err(error) = meta.write(command).await {
                tracing::warn!(%error, "a refused call could not be written to the audit log");
            }
        });
    }

    /// Records a privileged call that does not change metadata by itself
    /// (membership changes, repair), once it has run.
    pub async fn record(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        result: &str,
    ) -> Result<(), MetaError> {
        self.meta
            .write(Command::Audit {
                at: 0,
                actor: actor_of(caller),
                action: action.to_string(),
                target: target.to_string(),
                result: result.to_string(),
            })
            .await
            .map(|_| ())
    }
}

/// Audit entries read per page while the chain watch catches up.
pub const CHAIN_PAGE_ENTRIES: usize = 1000;

/// Where [`ChainWatch`] reads the chain from (this node's metadata state;
/// a trait so the watch is tested without a Raft group).
pub trait AuditSource {
    /// Seq and hash of the newest entry.
    fn head(&self) -> Result<(u64, [u8; 32]), MetaError>;
    /// Up to `limit` entries after `seq`, oldest first.
    fn entries_after(&self, seq: u64, limit: usize) -> Result<Vec<AuditEntry>, MetaError>;
}

impl AuditSource for Meta {
    fn head(&self) -> Result<(u64, [u8; 32]), MetaError> {
        self.audit_head()
    }

    fn entries_after(&self, seq: u64, limit: usize) -> Result<Vec<AuditEntry>, MetaError> {
        Ok(self
            .audit_entries(seq, limit)?
            .iter()
            .map(|record| record.to_wire())
            .collect())
    }
}

/// What the last check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStatus {
    /// No break found in the entries verified so far, and they reach the head.
    pub valid: bool,
    /// Seq of the newest entry (the number of entries in the log).
    pub entries: u64,
}

#[derive(Default)]
struct Watched {
    verifier: ChainVerifier,
    /// The first break found; the chain stays invalid after it.
    broken: Option<ChainBreak>,
}

/// Verifies the audit chain incrementally: each check hashes only the
/// entries appended since the last one (the last verified seq and hash are
/// kept), so a scrape never re-hashes the whole log. Entries already
/// verified are not read again; `cairn audit verify` walks the whole chain.
#[derive(Default)]
pub struct ChainWatch {
    state: Mutex<Watched>,
}

impl ChainWatch {
    /// Verifies the entries appended since the last check, up to the head.
    pub fn check(&self, source: &impl AuditSource) -> Result<ChainStatus, MetaError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // The head first: entries appended after it are left for the next check.
        let (head_seq, head_hash) = source.head()?;
        if state.broken.is_none() {
            let found = Self::advance(&mut state.verifier, source, head_seq, head_hash)?;
            if let Some(chain_break) = found {
                tracing::error!(
                    %chain_break,
                    "audit chain broken on this node: the metadata store was edited; run `cairn audit verify` and restore this node's metadata from a healthy peer"
                );
                state.broken = Some(chain_break);
            }
        }
        Ok(ChainStatus {
            valid: state.broken.is_none(),
            entries: head_seq,
        })
    }

    fn advance(
        verifier: &mut ChainVerifier,
        source: &impl AuditSource,
        head_seq: u64,
        head_hash: [u8; 32],
    ) -> Result<Option<ChainBreak>, MetaError> {
        while verifier.seq < head_seq {
            let page = source.entries_after(verifier.seq, CHAIN_PAGE_ENTRIES)?;
            let page: Vec<_> = page.into_iter().filter(|e| e.seq <= head_seq).collect();
            if page.is_empty() {
                // The head names entries the log does not hold.
                return Ok(Some(ChainBreak::Gap {
                    expected: verifier.seq + 1,
                    found: head_seq,
                }));
            }
            for entry in &page {
                if let Err(chain_break) = verifier.push(entry) {
                    return Ok(Some(chain_break));
                }
            }
        }
        if verifier.seq > head_seq {
            // The head moved back: entries were removed from the end.
            return Ok(Some(ChainBreak::Gap {
                expected: verifier.seq,
                found: head_seq,
            }));
        }
        if verifier.head != head_hash {
            return Ok(Some(ChainBreak::Altered { seq: head_seq }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use cairn_proto::audit::{GENESIS, entry_hash};

    use super::*;

    #[test]
    fn a_flood_of_refusals_is_bounded_and_counted() {
        let start = Instant::now();
        let mut bucket = Bucket::new(start);
        let admitted = (0..1000).filter(|_| bucket.admit(start).is_some()).count();
        assert_eq!(admitted, REFUSALS_BURST as usize);
        // Half a second later: one more, carrying the count of the rest.
        let later = start + Duration::from_millis(500);
        assert_eq!(bucket.admit(later), Some(1000 - admitted as u64));
        assert_eq!(bucket.admit(later), None);
        assert_eq!(
            bucket.admit(later + Duration::from_secs(1)),
            Some(1),
            "the count restarts after it was reported"
        );
    }

    #[test]
    fn actors_carry_ids_never_secrets() {
        let actor = actor_of(&Caller::Token {
            id: "0011223344556677".into(),
            role: crate::auth::Role::Backup,
            tenant: Some("t".into()),
        });
        assert_eq!(
            (
                actor.kind.as_str(),
                actor.role.as_str(),
                actor.tenant.as_str()
            ),
            ("token", "backup", "t")
        );
        assert_eq!(actor_of(&Caller::Node(4)).node_id, 4);
    }

    /// An in-memory log that counts the entries it hands out.
    #[derive(Default)]
    struct Log {
        entries: Mutex<Vec<AuditEntry>>,
        read: AtomicUsize,
    }

    impl Log {
        fn append(&self, n: u64) {
            let mut entries = self.entries.lock().expect("log");
            for _ in 0..n {
                let prev = entries.last().map_or(GENESIS, entry_hash);
                let mut entry = AuditEntry {
                    seq: entries.len() as u64 + 1,
                    action: "CreateToken".into(),
                    prev_hash: prev.to_vec(),
                    ..Default::default()
                };
                entry.hash = entry_hash(&entry).to_vec();
                entries.push(entry);
            }
        }
    }

    impl AuditSource for Log {
        fn head(&self) -> Result<(u64, [u8; 32]), MetaError> {
            let entries = self.entries.lock().expect("log");
            Ok(entries
                .last()
                .map_or((0, GENESIS), |e| (e.seq, entry_hash(e))))
        }

        fn entries_after(&self, seq: u64, limit: usize) -> Result<Vec<AuditEntry>, MetaError> {
            let page: Vec<_> = self
                .entries
                .lock()
                .expect("log")
                .iter()
                .filter(|e| e.seq > seq)
                .take(limit)
                .cloned()
                .collect();
            self.read.fetch_add(page.len(), Ordering::Relaxed);
            Ok(page)
        }
    }

    #[test]
    fn the_chain_watch_hashes_each_entry_once_and_stays_broken_after_an_edit() {
        let log = Log::default();
        let watch = ChainWatch::default();
        assert_eq!(
            watch.check(&log).expect("empty"),
            ChainStatus {
                valid: true,
                entries: 0
            }
        );
        log.append(2500);
        assert!(watch.check(&log).expect("check").valid);
        assert_eq!(log.read.load(Ordering::Relaxed), 2500, "paged once");
        log.append(3);
        let status = watch.check(&log).expect("check");
        assert_eq!((status.valid, status.entries), (true, 2503));
        assert_eq!(
            log.read.load(Ordering::Relaxed),
            2503,
            "only the new entries"
        );
        // An entry edited after it was written, beyond the verified part.
        log.append(2);
        log.entries.lock().expect("log")[2503].target = "edited".into();
        let status = watch.check(&log).expect("check");
        assert_eq!((status.valid, status.entries), (false, 2505));
        log.append(1);
        assert!(!watch.check(&log).expect("check").valid, "stays broken");
    }

    #[test]
    fn the_chain_watch_sees_removed_entries() {
        let log = Log::default();
        log.append(5);
        let watch = ChainWatch::default();
        assert!(watch.check(&log).expect("check").valid);
        // The two newest entries removed: the head moves back.
        log.entries.lock().expect("log").truncate(3);
        assert!(!watch.check(&log).expect("check").valid);
        // A gap in the middle of the unverified part.
        let log = Log::default();
        log.append(5);
        log.entries.lock().expect("log").remove(2);
        assert!(!ChainWatch::default().check(&log).expect("check").valid);
    }
}
