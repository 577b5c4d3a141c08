//! The SDK's error type: every failure a caller can act on, with what to do.

use std::path::PathBuf;

/// Everything the SDK can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no reachable node: tried {}", format_tried(.tried))]
    NoNodeReachable { tried: Vec<(String, String)> },
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
    #[error("{op} failed on {addr}: {message}")]
    Server {
        op: &'static str,
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data integrity: {what}")]
    Integrity { what: String },
    #[error("unsafe path in snapshot: {0}")]
    UnsafePath(#[from] crate::path_guard::PathError),
    #[error("restore incomplete: {count} file(s) could not be restored: {files}")]
    RestoreFailed { count: usize, files: String },
    #[error("invalid --include pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("backup input: {what}")]
    BadInput { what: String },
    #[error("invalid --exclude pattern {pattern:?}: {reason}")]
    BadExclude { pattern: String, reason: String },
}

fn format_tried(tried: &[(String, String)]) -> String {
    tried
        .iter()
        .map(|(addr, why)| format!("{addr} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ClientError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn integrity(what: impl Into<String>) -> Self {
        ClientError::Integrity { what: what.into() }
    }
}

impl From<crate::seal::SealError> for ClientError {
    fn from(e: crate::seal::SealError) -> Self {
        ClientError::integrity(e.to_string())
    }
}

impl From<crate::tree::TreeError> for ClientError {
    fn from(e: crate::tree::TreeError) -> Self {
        ClientError::integrity(e.to_string())
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
