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

struct Bucket {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
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
            bucket: Mutex::new(Bucket {
                tokens: REFUSALS_BURST,
                refilled: Instant::now(),
                suppressed: 0,
            }),
        }
    }

    /// Takes one refusal from the bucket: `Some(suppressed since the last
    /// recorded one)` if this one may be recorded.
    fn admit(&self) -> Option<u64> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(bucket.refilled).as_secs_f64() * REFUSALS_PER_SECOND;
        bucket.tokens = (bucket.tokens + refill).min(REFUSALS_BURST);
        bucket.refilled = now;
        if bucket.tokens < 1.0 {
            bucket.suppressed += 1;
            return None;
        }
        bucket.tokens -= 1.0;
        Some(std::mem::take(&mut bucket.suppressed))
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
