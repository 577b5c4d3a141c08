//! Feeding the audit log from the request path: who the actor was, and
//! refused calls recorded through a token bucket, so a flood of refusals
//! costs a bounded number of Raft entries (the count of those left out goes
//! into the next recorded one).

use std::sync::Mutex;
use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

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
}
