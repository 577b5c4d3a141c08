//! Who is calling: the principals of the trust boundary (DESIGN, *Trust
//! boundary*). Nodes prove their id with a certificate of the cluster CA;
//! clients present a bearer token bound to a role and (but for cluster-wide
//! roles) a tenant. Handlers decide on a [`Caller`], never on what a request
//! claims about itself.
//!
//! `token` (generation, hashing, the bootstrap file), `layer` (caller
//! resolution in front of the Cairn service, before decoding),
//! `permission` (the role table and the tenant a call acts on), `audit`
//! (actors and rate-limited refusal records).

use std::fmt;
use std::str::FromStr;

use crate::model::NodeId;

/// A node id proven by the peer's TLS certificate (chained to the cluster CA
/// and valid for `node-<id>.cairn`). Put into a request's extensions by the
/// server before any service sees the request; absent on plaintext or when
/// the peer presented no node certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedPeer(pub NodeId);

/// What a token may do (DESIGN, *Trust boundary*). Stored in token records
/// (postcard encodes the variant index): only ever append roles.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Role {
    /// Everything, on any tenant: membership, repair, tokens and tenants.
    ClusterAdmin,
    /// Everything of its tenant: init, keys, its tokens, later forget,
    /// prune, locks and policies; plus backup and restore.
    Admin,
    /// Append-only: upload, commit, list and read its tenant's snapshots.
    Backup,
    /// List and read its tenant's snapshots.
    Restore,
    /// Cluster status, check without data, metrics; no tenant data.
    Monitor,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::ClusterAdmin,
        Role::Admin,
        Role::Backup,
        Role::Restore,
        Role::Monitor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ClusterAdmin => "cluster-admin",
            Role::Admin => "admin",
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Monitor => "monitor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of the five.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: one of cluster-admin, admin, backup, restore, monitor")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// The principal behind one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An `--insecure` cluster: nobody is authenticated, everything is allowed.
    Insecure,
    /// A member node, proven by its certificate.
    Node(NodeId),
    /// A client with a valid (known, unexpired, unrevoked) token.
    Token {
        /// Public token id (never the secret).
        id: String,
        role: Role,
        /// `None`: cluster-wide (cluster-admin, monitor).
        tenant: Option<String>,
    },
}

pub mod audit;
pub mod layer;
pub mod permission;
pub mod token;

impl Caller {
    /// The caller a handler was given by [`layer::AuthService`]; a request
    /// that did not pass through it (an in-process call that forgot to say
    /// who it is) is refused.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("no caller identified for this call"))
    }
}
