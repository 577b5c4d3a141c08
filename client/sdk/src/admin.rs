//! Administration over a [`Cluster`]: bearer tokens and the audit log.
//!
//! Nothing here needs the tenant's key: a token is checked by the nodes
//! (they keep only its hash), and the audit log is a hash chain anyone with
//! the right role can verify ([`cairn_proto::audit::ChainVerifier`]), the
//! same code the nodes append with.

use std::time::Duration;

use cairn_proto::audit::{ChainBreak, ChainVerifier};
use cairn_proto::v1 as pb;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::connection::Cluster;
use crate::error::{ClientError, Result};

/// Entries asked for per AuditLog call (the node may cap it lower).
pub const AUDIT_PAGE: u32 = 1000;

/// The roles a token can have (see the design's trust boundary).
pub const ROLES: [&str; 5] = ["cluster-admin", "admin", "backup", "restore", "monitor"];

/// A token just created: its secret, shown this once, and its public info.
pub struct CreatedToken {
    /// The bearer secret; wiped from memory when dropped.
    pub secret: Zeroizing<String>,
    pub info: pb::TokenInfo,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("secret", &"<redacted>")
            .field("info", &self.info)
            .finish()
    }
}

/// Creates a token of `role` for `tenant` (empty: the caller's tenant, or
/// cluster-wide for `cluster-admin` and `monitor`), expiring after `ttl`.
pub async fn create_token(
    cluster: &Cluster,
    role: &str,
    tenant: &str,
    ttl: Option<Duration>,
    label: &str,
) -> Result<CreatedToken> {
    if !ROLES.contains(&role) {
        return Err(ClientError::BadInput {
            what: format!("unknown role {role:?}: one of {}", ROLES.join(", ")),
        });
    }
    let request = pb::CreateTokenRequest {
        role: role.to_string(),
        tenant: tenant.to_string(),
        // Less than a second would be "no expiry" (0): round up.
        ttl_seconds: ttl.map(|t| t.as_secs().max(1)).unwrap_or(0),
        label: label.to_string(),
    };
    // Not idempotent (each call mints a secret), but a retry after a lost
    // answer only leaves an unused token behind, listed and revocable.
    let reply = cluster
        .call("create token", |mut c| {
            let request = request.clone();
            async move { c.create_token(request).await }
        })
        .await?;
    let pb::CreateTokenReply { info, token } = reply;
    let secret = Zeroizing::new(token);
    let info = info.ok_or_else(|| ClientError::integrity("create token: answer without info"))?;
    if secret.is_empty() {
        return Err(ClientError::integrity(
            "create token: answer without a token",
        ));
    }
    Ok(CreatedToken { secret, info })
}

/// Every token the caller may see (its tenant's, or all for `cluster-admin`).
pub async fn list_tokens(cluster: &Cluster) -> Result<Vec<pb::TokenInfo>> {
    let reply = cluster
        .call("list tokens", |mut c| async move {
            c.list_tokens(pb::ListTokensRequest {}).await
        })
        .await?;
    Ok(reply.tokens)
}

/// Revokes token `id`: every node refuses it from then on.
pub async fn revoke_token(cluster: &Cluster, id: &str) -> Result<()> {
    let result = cluster
        .call("revoke token", |mut c| {
            let request = pb::RevokeTokenRequest { id: id.to_string() };
            async move { c.revoke_token(request).await }
        })
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(ClientError::Server {
            code: tonic::Code::NotFound,
            ..
        }) => Err(ClientError::BadInput {
            what: format!("no token with id {id:?}"),
        }),
        Err(e) => Err(e),
    }
}

/// One page of the audit log: entries after `after_seq`, oldest first.
pub async fn audit_page(cluster: &Cluster, after_seq: u64) -> Result<pb::AuditLogReply> {
    cluster
        .call("read the audit log", |mut c| async move {
            c.audit_log(pb::AuditLogRequest {
                after_seq,
                limit: AUDIT_PAGE,
            })
            .await
        })
        .await
}

/// Visits every audit entry after `after_seq`, page by page; returns the
/// head (seq and hash) the last page reported.
pub async fn audit_entries(
    cluster: &Cluster,
    after_seq: u64,
    mut visit: impl FnMut(&[pb::AuditEntry]),
) -> Result<(u64, Vec<u8>)> {
    let mut after = after_seq;
    // A head reported beyond the last entry sent may be an entry appended
    // between the node's two reads: look again a few times before the
    // caller treats it as a cut log.
    let mut catch_up = 3;
    loop {
        let page = audit_page(cluster, after).await?;
        visit(&page.entries);
        let last = page.entries.last().map(|e| e.seq);
        if let Some(seq) = last
            && seq <= after
        {
            return Err(ClientError::integrity(
                "audit log: a page went backwards (entries at or before the last one seen)",
            ));
        }
        let progressed = last.is_some();
        if let Some(seq) = last {
            after = seq;
        }
        if page.more {
            if !progressed {
                return Err(ClientError::integrity(
                    "audit log: the node said more entries follow but sent none",
                ));
            }
            continue;
        }
        if page.head_seq > after && catch_up > 0 {
            catch_up -= 1;
            continue;
        }
        return Ok((page.head_seq, page.head_hash));
    }
}

/// What `cairn audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditVerification {
    /// Every entry verified (no break).
    pub ok: bool,
    /// Entries checked before the end or the break.
    pub entries: u64,
    /// The last verified entry: keep its hash elsewhere to detect a rollback.
    pub head_seq: u64,
    pub head_hash: String,
    /// Where the chain breaks, in a sentence naming the entry.
    pub broken: Option<String>,
    /// The seq of the entry that broke it.
    pub broken_seq: Option<u64>,
}

/// Checks a whole log page by page; pure, so it is tested on edited chains.
#[derive(Debug, Default)]
pub struct AuditChecker {
    verifier: ChainVerifier,
    entries: u64,
    broken: Option<ChainBreak>,
}

impl AuditChecker {
    /// Feeds the next entries (oldest first); after a break the rest are ignored.
    pub fn push(&mut self, entries: &[pb::AuditEntry]) {
        for entry in entries {
            if self.broken.is_some() {
                return;
            }
            match self.verifier.push(entry) {
                Ok(()) => self.entries += 1,
                Err(e) => self.broken = Some(e),
            }
        }
    }

    /// The verdict, given the head the node reported (`head_seq` 0: none).
    /// A chain that verifies but stops short of the reported head, or ends
    /// on another hash, was cut.
    pub fn finish(self, head_seq: u64, head_hash: &[u8]) -> AuditVerification {
        let mut broken = self.broken.map(|b| {
            let seq = match &b {
                ChainBreak::Gap { expected, .. } => *expected,
                ChainBreak::PrevMismatch { seq } | ChainBreak::Altered { seq } => *seq,
            };
            (seq, b.to_string())
        });
        if broken.is_none() && head_seq != 0 {
            if head_seq != self.verifier.seq {
                broken = Some((
                    self.verifier.seq + 1,
                    format!(
                        "the log ends at entry {} but the node reports its head at entry {head_seq}",
                        self.verifier.seq
                    ),
                ));
            } else if !head_hash.is_empty() && head_hash != self.verifier.head.as_slice() {
                broken = Some((
                    head_seq,
                    format!("entry {head_seq} does not have the head hash the node reports"),
                ));
            }
        }
        AuditVerification {
            ok: broken.is_none(),
            entries: self.entries,
            head_seq: self.verifier.seq,
            head_hash: hex::encode(self.verifier.head),
            broken_seq: broken.as_ref().map(|(seq, _)| *seq),
            broken: broken.map(|(_, text)| text),
        }
    }
}

/// Recomputes the whole audit chain from the first entry.
pub async fn audit_verify(cluster: &Cluster) -> Result<AuditVerification> {
    let mut checker = AuditChecker::default();
    let (head_seq, head_hash) = audit_entries(cluster, 0, |page| checker.push(page)).await?;
    Ok(checker.finish(head_seq, &head_hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::audit::{GENESIS, entry_hash};

    fn chain(n: u64) -> Vec<pb::AuditEntry> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let mut entry = pb::AuditEntry {
                    seq,
                    time_unix_ms: 1_000 * seq as i64,
                    actor_kind: "token".into(),
                    token_id: "ab12".into(),
                    role: "backup".into(),
                    tenant: "chat".into(),
                    action: "CommitSnapshot".into(),
                    target: format!("snapshot {seq}"),
                    result: "ok".into(),
                    prev_hash: prev.to_vec(),
                    ..Default::default()
                };
                prev = entry_hash(&entry);
                entry.hash = prev.to_vec();
                entry
            })
            .collect()
    }

    fn verify_in_pages(entries: &[pb::AuditEntry], page: usize) -> AuditVerification {
        let mut checker = AuditChecker::default();
        for chunk in entries.chunks(page) {
            checker.push(chunk);
        }
        let head = entries.last().map(|e| (e.seq, e.hash.clone()));
        let (seq, hash) = head.unwrap_or_default();
        checker.finish(seq, &hash)
    }

    #[test]
    fn a_clean_chain_verifies_across_pages_and_reports_its_head() {
        let entries = chain(7);
        let report = verify_in_pages(&entries, 3);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.entries, 7);
        assert_eq!(report.head_seq, 7);
        assert_eq!(report.head_hash, hex::encode(&entries[6].hash));
        assert_eq!(report.broken, None);
    }

    #[test]
    fn an_empty_log_is_clean_at_genesis() {
        let report = AuditChecker::default().finish(0, &[]);
        assert!(report.ok);
        assert_eq!(report.head_seq, 0);
        assert_eq!(report.head_hash, hex::encode(GENESIS));
    }

    #[test]
    fn an_edited_entry_is_named() {
        let mut entries = chain(6);
        entries[3].result = "refused: role backup may not RemoveNode".into();
        let report = verify_in_pages(&entries, 4);
        assert!(!report.ok);
        assert_eq!(report.broken_seq, Some(4));
        assert_eq!(report.entries, 3);
        assert_eq!(report.head_seq, 3, "the head is the last verified entry");
        assert!(
            report
                .broken
                .as_deref()
                .unwrap_or_default()
                .contains("entry 4")
        );
    }

    #[test]
    fn a_removed_entry_is_named() {
        let mut entries = chain(6);
        entries.remove(2);
        let report = verify_in_pages(&entries, 2);
        assert_eq!(report.broken_seq, Some(3), "{report:?}");
    }

    #[test]
    fn a_cut_tail_is_caught_against_the_reported_head() {
        let entries = chain(6);
        let mut checker = AuditChecker::default();
        checker.push(&entries[..4]);
        let report = checker.finish(6, &entries[5].hash);
        assert!(!report.ok);
        assert_eq!(report.broken_seq, Some(5));
        let mut checker = AuditChecker::default();
        checker.push(&entries);
        let report = checker.finish(6, &[9; 32]);
        assert!(!report.ok, "a head hash that differs is a break");
    }

    #[test]
    fn the_secret_of_a_created_token_is_not_in_its_debug() {
        let created = CreatedToken {
            secret: Zeroizing::new("cairn_secret_value".into()),
            info: pb::TokenInfo::default(),
        };
        assert!(!format!("{created:?}").contains("cairn_secret_value"));
    }
}
