//! The SDK's error type: every failure a caller can act on, with what to do.

use std::path::PathBuf;

/// Everything the SDK can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no reachable node: tried {}{hint}", format_tried(.tried))]
    NoNodeReachable {
        tried: Vec<(String, String)>,
        /// What to check, when the failures suggest it (e.g. plaintext
        /// to a TLS cluster); empty or starting with "; ".
        hint: &'static str,
    },
    #[error("quorum lost: {detail}; the metadata group cannot serve until enough regions return")]
    QuorumLost { detail: String },
    #[error("no cluster address given: pass --cluster ADDR[,ADDR...] or set CAIRN_CLUSTER")]
    NoAddresses,
    #[error("invalid cluster address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("wrong password")]
    WrongPassword,
    #[error("tenant {tenant:?} has no key yet: run `cairn init` first")]
    NotInitialized { tenant: String },
    #[error("tenant {tenant:?} is already initialized; nothing was changed")]
    AlreadyInitialized { tenant: String },
    #[error("no snapshot matches {query:?}")]
    SnapshotNotFound { query: String },
    #[error(
        "snapshot prefix {query:?} is ambiguous ({matches} snapshots match); give more characters"
    )]
    AmbiguousSnapshot { query: String, matches: usize },
    #[error("snapshot ids are hex, at least 8 characters (or `latest`): {query:?}")]
    BadSnapshotId { query: String },
    #[error("{path}: not found in snapshot")]
    PathNotInSnapshot { path: String },
    #[error(
        "the token was refused: unknown, revoked or expired — give a valid one with --token-file or CAIRN_TOKEN"
    )]
    TokenRefused,
    #[error(
        "the cluster requires a token: give one with --token-file or CAIRN_TOKEN (and its CA with --ca-file or CAIRN_CA)"
    )]
    TokenRequired,
    #[error("invalid CA (--ca-file or CAIRN_CA): {reason}")]
    BadCa { reason: &'static str },
    #[error("invalid token: {reason}")]
    BadToken { reason: &'static str },
    /// `reason` is the node's own sentence (why: the role, or another
    /// tenant), shown after the operation when the node gave one.
    #[error("this token's role may not {op}{}", detail(.reason))]
    PermissionDenied { op: &'static str, reason: String },
    #[error(
        "key slot {id} unlocked this session and cannot be removed; unlock with another passphrase first (or use `cairn key passwd`)"
    )]
    KeySlotInUse { id: String },
    #[error(
        "key slot {id} is the tenant's last: without a key slot the data cannot be read; add another first"
    )]
    LastKeySlot { id: String },
    #[error("no key slot matches {query:?}")]
    KeySlotNotFound { query: String },
    #[error("key slot prefix {query:?} is ambiguous ({matches} slots match); give more characters")]
    AmbiguousKeySlot { query: String, matches: usize },
    #[error("{op} failed on {addr}: {message}")]
    Server {
        op: &'static str,
        addr: String,
        code: tonic::Code,
        message: String,
    },
    /// The cause is part of the message and deliberately not also a
    /// `source()`: a reporter that prints the chain would show it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("data integrity: {what}")]
    Integrity { what: String },
    /// The cause is part of the message (not also a `source()`).
    #[error("unsafe path in snapshot: {0}")]
    UnsafePath(crate::path_guard::PathError),
    #[error("restore incomplete: {count} file(s) could not be restored: {files}")]
    RestoreFailed { count: usize, files: String },
    #[error("invalid --include pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("invalid input: {what}")]
    BadInput { what: String },
    #[error("invalid --exclude pattern {pattern:?}: {reason}")]
    BadExclude { pattern: String, reason: String },
    /// A backup's commit was refused because garbage collection removed
    /// blobs it references while it ran, and the automatic full rerun
    /// (which uploads whatever is gone) hit the same or was impossible.
    #[error(
        "backup not committed: garbage collection removed blobs it references while it ran ({detail}); no snapshot was lost, run the backup again, ideally when no prune is running"
    )]
    CollectedDuringBackup { detail: String },
    /// A lifecycle call refused for the token's role; `advice` says which
    /// token may do it.
    #[error("this token's role{} cannot {what}; {advice}{}", role_text(.role), unless_role(.role, .reason))]
    LifecycleRefused {
        what: &'static str,
        /// The role the node named, when it did.
        role: Option<String>,
        advice: &'static str,
        reason: String,
    },
    #[error(
        "no policy was specified, no snapshots will be removed: give --keep-* rules or snapshot ids"
    )]
    NoForgetPolicy,
    /// A stream's segment listing kept changing under compactions.
    #[error(
        "the live segments of dataset {dataset:?} changed during each of {attempts} listings (compactions or retention running); try again"
    )]
    StreamListingUnstable { dataset: String, attempts: usize },
    /// A compaction's commit found some of its segments already retired.
    #[error("another compaction retired these segments first; run compact again ({detail})")]
    CompactionRaced { detail: String },
}

fn role_text(role: &Option<String>) -> String {
    role.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
}

/// The node's reason, when the role alone does not say it.
fn unless_role(role: &Option<String>, reason: &str) -> String {
    if role.is_some() {
        String::new()
    } else {
        detail(reason)
    }
}

fn detail(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

fn format_tried(tried: &[(String, String)]) -> String {
    tried
        .iter()
        .map(|(addr, why)| format!("{addr} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ClientError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn integrity(what: impl Into<String>) -> Self {
        ClientError::Integrity { what: what.into() }
    }
}

impl From<crate::path_guard::PathError> for ClientError {
    fn from(e: crate::path_guard::PathError) -> Self {
        ClientError::UnsafePath(e)
    }
}

/// `error` and its causes, each once: a cause already quoted in the message
/// before it (the `"{source}"`-and-`#[source]` pattern) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

impl From<crate::seal::SealError> for ClientError {
    fn from(e: crate::seal::SealError) -> Self {
        ClientError::integrity(error_chain(&e))
    }
}

impl From<crate::tree::TreeError> for ClientError {
    fn from(e: crate::tree::TreeError) -> Self {
        ClientError::integrity(error_chain(&e))
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_names_its_cause_once() {
        let error = ClientError::io(
            "/nonexistent",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let text = error_chain(&error);
        assert_eq!(text, "/nonexistent: entity not found");
        assert!(std::error::Error::source(&error).is_none());
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {source}")]
        struct Outer {
            #[source]
            source: std::io::Error,
        }
        let error = Outer {
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(error_chain(&error), "outer: disk on fire");
    }
}
