//! Cairn client SDK.
//!
//! Everything that touches plaintext or keys happens here: chunking,
//! hashing, compression and encryption before data leaves the process.
//! Nodes receive sealed blobs in packs, sealed trees and sealed snapshot
//! info, never a key or a name.
//!
//! ```no_run
//! # async fn example() -> Result<(), cairn_client::ClientError> {
//! use std::sync::Arc;
//! use cairn_client::{Cluster, Repository, backup, restore};
//!
//! // `Cluster::new` speaks plaintext without a token (an `--insecure`
//! // cluster); `ClusterOptions` adds the cluster CA and a bearer token.
//! let options = cairn_client::ClusterOptions::default()
//!     .ca_pem(b"-----BEGIN CERTIFICATE-----...".to_vec())
//!     .token("the token")?;
//! let cluster = Cluster::with_options(&["127.0.0.1:7101".into(), "127.0.0.1:7201".into()], options)?;
//! let tenant = cluster.resolve_tenant(None).await?; // the token's tenant
//! let repo = Arc::new(Repository::open(cluster, &tenant, b"passphrase").await?);
//! let options = backup::BackupOptions { dataset: "chat-messages".into(), ..Default::default() };
//! let summary = backup::backup_paths(repo.clone(), &["/var/lib/chat".into()], &options,
//!     Default::default()).await?;
//! let snapshot = repo.find_snapshot(&summary.snapshot_id, None).await?;
//! restore::restore(&repo, &snapshot, "/tmp/restore".as_ref(), &Default::default(),
//!     Default::default()).await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod backup;
pub mod chunker;
pub mod connection;
pub mod dictionary;
pub mod error;
pub mod lifecycle;
pub mod pack;
pub mod path_guard;
pub mod repo;
pub mod restore;
pub mod seal;
pub mod stream;
pub mod tree;

pub use connection::{Cluster, ClusterOptions, Credentials};
pub use error::ClientError;
pub use lifecycle::{
    ForgetDecision, ForgetOptions, ForgetReport, KeepRules, LockInfo, LockMode, LockUntil,
    PolicySpec, PruneReport, Stats,
};
pub use repo::{CatalogWarning, KeySlot, Repository, Snapshot, SnapshotList};
