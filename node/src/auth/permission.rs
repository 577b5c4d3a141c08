//! Who may do what (DESIGN, *Trust boundary*): one table from a caller and an
//! operation to allowed or refused, and the tenant a request acts on. The
//! tenant of a tenant-bound token always wins over what the request names;
//! a request naming another tenant is refused without echoing that name.
//!
//! Decisions the design table leaves open:
//! - an `admin` creates `admin`, `backup`, `restore` and `monitor` tokens of
//!   its own tenant (never `cluster-admin`, never cluster-wide ones), lists
//!   and revokes its tenant's tokens only (another tenant's are "not found");
//! - `admin` and `monitor` may read `cluster status`; `backup` and `restore`
//!   may not;
//! - nodes may report faults and send the calls a gateway forwards to the
//!   leader (`Repair`, `RemoveNode`, `ReportFaults`); a forwarded call also
//!   carries the caller's token, so the leader authorizes and audits it as
//!   that caller;
//! - the audit log is for `cluster-admin` only.

use super::{Caller, Role};

/// An operation a caller asks for: each RPC of the Cairn service, and the
/// metrics page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    InitTenant,
    GetKeySlots,
    FindBlobs,
    LocateBlobs,
    PutPack,
    ReadPack,
    CommitSnapshot,
    ListSnapshots,
    ClusterStatus,
    CheckPacks {
        read_data: bool,
    },
    Repair,
    ReportFaults,
    AddNode,
    RemoveNode,
    CreateToken,
    ListTokens,
    RevokeToken,
    AddKeySlot,
    RemoveKeySlot,
    AuditLog,
    WhoAmI,
    Metrics,
    Forget,
    Prune,
    LockSnapshot,
    /// Unlock; `bypass` = remove a governance lock before it expires.
    UnlockSnapshot {
        bypass: bool,
    },
    SetPolicy,
    GetPolicies,
    Stats,
    AppendStream,
    ListSegments,
    PutDictionary,
    ListDictionaries,
}

impl Op {
    /// The RPC name, as audit entries record it.
    pub fn name(self) -> &'static str {
        match self {
            Op::InitTenant => "InitTenant",
            Op::GetKeySlots => "GetKeySlots",
            Op::FindBlobs => "FindBlobs",
            Op::LocateBlobs => "LocateBlobs",
            Op::PutPack => "PutPack",
            Op::ReadPack => "ReadPack",
            Op::CommitSnapshot => "CommitSnapshot",
            Op::ListSnapshots => "ListSnapshots",
            Op::ClusterStatus => "ClusterStatus",
            Op::CheckPacks { .. } => "CheckPacks",
            Op::Repair => "Repair",
            Op::ReportFaults => "ReportFaults",
            Op::AddNode => "AddNode",
            Op::RemoveNode => "RemoveNode",
            Op::CreateToken => "CreateToken",
            Op::ListTokens => "ListTokens",
            Op::RevokeToken => "RevokeToken",
            Op::AddKeySlot => "AddKeySlot",
            Op::RemoveKeySlot => "RemoveKeySlot",
            Op::AuditLog => "AuditLog",
            Op::WhoAmI => "WhoAmI",
            Op::Metrics => "Metrics",
            Op::Forget => "Forget",
            Op::Prune => "Prune",
            Op::LockSnapshot => "LockSnapshot",
            Op::UnlockSnapshot { .. } => "UnlockSnapshot",
            Op::SetPolicy => "SetPolicy",
            Op::GetPolicies => "GetPolicies",
            Op::Stats => "Stats",
            Op::AppendStream => "AppendStream",
            Op::ListSegments => "ListSegments",
            Op::PutDictionary => "PutDictionary",
            Op::ListDictionaries => "ListDictionaries",
        }
    }

    /// The RPC named by the last segment of a gRPC path
    /// (`/cairn.v1.Cairn/PutPack`); `None` for an unknown method.
    pub fn from_path(path: &str) -> Option<Op> {
        let method = path.rsplit('/').next()?;
        Some(match method {
            "InitTenant" => Op::InitTenant,
            "GetKeySlots" => Op::GetKeySlots,
            "FindBlobs" => Op::FindBlobs,
            "LocateBlobs" => Op::LocateBlobs,
            "PutPack" => Op::PutPack,
            "ReadPack" => Op::ReadPack,
            "CommitSnapshot" => Op::CommitSnapshot,
            "ListSnapshots" => Op::ListSnapshots,
            "ClusterStatus" => Op::ClusterStatus,
            "CheckPacks" => Op::CheckPacks { read_data: true },
            "Repair" => Op::Repair,
            "ReportFaults" => Op::ReportFaults,
            "AddNode" => Op::AddNode,
            "RemoveNode" => Op::RemoveNode,
            "CreateToken" => Op::CreateToken,
            "ListTokens" => Op::ListTokens,
            "RevokeToken" => Op::RevokeToken,
            "AddKeySlot" => Op::AddKeySlot,
            "RemoveKeySlot" => Op::RemoveKeySlot,
            "AuditLog" => Op::AuditLog,
            "WhoAmI" => Op::WhoAmI,
            "Forget" => Op::Forget,
            "Prune" => Op::Prune,
            "LockSnapshot" => Op::LockSnapshot,
            "UnlockSnapshot" => Op::UnlockSnapshot { bypass: true },
            "SetPolicy" => Op::SetPolicy,
            "GetPolicies" => Op::GetPolicies,
            "Stats" => Op::Stats,
            "AppendStream" => Op::AppendStream,
            "ListSegments" => Op::ListSegments,
            "PutDictionary" => Op::PutDictionary,
            "ListDictionaries" => Op::ListDictionaries,
            _ => return None,
        })
    }
}

/// A refused call: the reason, safe to show the caller (names no tenant).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: {0}")]
pub struct Denied(pub String);

/// Whether `role` may call `op` at all (tenant aside).
pub fn role_allows(role: Role, op: Op) -> bool {
    use Op::*;
    match role {
        // Everything but the node-only fault intake.
        Role::ClusterAdmin => op != ReportFaults,
        // Everything of its tenant; no membership, repair or audit log, and
        // governance locks yield only to cluster-admin.
        Role::Admin => matches!(
            op,
            InitTenant
                | GetKeySlots
                | FindBlobs
                | LocateBlobs
                | PutPack
                | ReadPack
                | CommitSnapshot
                | ListSnapshots
                | ClusterStatus
                | CheckPacks { .. }
                | CreateToken
                | ListTokens
                | RevokeToken
                | AddKeySlot
                | RemoveKeySlot
                | WhoAmI
                | Forget
                | Prune
                | LockSnapshot
                | UnlockSnapshot { bypass: false }
                | SetPolicy
                | GetPolicies
                | Stats
                | AppendStream
                | ListSegments
                | PutDictionary
                | ListDictionaries
        ),
        // Append-only: never deletes, never changes keys or tokens.
        Role::Backup => matches!(
            op,
            FindBlobs
                | LocateBlobs
                | PutPack
                | ReadPack
                | CommitSnapshot
                | ListSnapshots
                | GetKeySlots
                | WhoAmI
                | AppendStream
                | ListSegments
                | PutDictionary
                | ListDictionaries
        ),
        Role::Restore => matches!(
            op,
            GetKeySlots
                | LocateBlobs
                | ReadPack
                | ListSnapshots
                | WhoAmI
                | ListSegments
                | ListDictionaries
        ),
        Role::Monitor => matches!(
            op,
            ClusterStatus
                | CheckPacks { read_data: false }
                | Metrics
                | WhoAmI
                | GetPolicies
                | Stats
        ),
    }
}

/// Calls a member node makes of another: fault reports, and the calls a
/// gateway forwards to the leader (authorized and audited where they arrived).
fn node_allows(op: Op) -> bool {
    matches!(
        op,
        Op::ReportFaults | Op::Repair | Op::RemoveNode | Op::ClusterStatus | Op::WhoAmI
    )
}

/// Decides whether `caller` may call `op` naming `requested` as tenant, and
/// returns the tenant the call acts on: a tenant-bound token's own tenant
/// (the request may leave it empty), else the request's (possibly empty).
pub fn authorize(caller: &Caller, op: Op, requested: &str) -> Result<String, Denied> {
    match caller {
        Caller::Insecure => Ok(requested.to_string()),
        Caller::Node(_) if node_allows(op) => Ok(requested.to_string()),
        Caller::Node(_) => Err(Denied(format!(
            "{} needs a client token, not a node certificate",
            op.name()
        ))),
        Caller::Token { role, tenant, .. } => {
            if op == Op::ReportFaults {
                return Err(Denied("ReportFaults is for member nodes only".into()));
            }
            if !role_allows(*role, op) {
                return Err(Denied(format!("a {role} token may not call {}", op.name())));
            }
            match tenant {
                // "No tenant data": not even a per-tenant pack count.
                None if *role == Role::Monitor && !requested.is_empty() => Err(Denied(
                    "a cluster-wide monitor token sees no tenant's data".into(),
                )),
                None => Ok(requested.to_string()),
                Some(own) if requested.is_empty() || requested == own => Ok(own.clone()),
                Some(_) => Err(Denied(
                    "this token is bound to another tenant than the one requested".into(),
                )),
            }
        }
    }
}

/// Checks what token `caller` may create: `Ok(tenant)` with the tenant the
/// new token gets. Admins create tokens of their own tenant only, and never
/// `cluster-admin` ones.
pub fn may_create_token(
    caller: &Caller,
    role: Role,
    requested: &str,
) -> Result<Option<String>, Denied> {
    let tenant = authorize(caller, Op::CreateToken, requested)?;
    if let Caller::Token {
        role: Role::Admin, ..
    } = caller
        && role == Role::ClusterAdmin
    {
        return Err(Denied(
            "an admin token may not create cluster-admin tokens".into(),
        ));
    }
    Ok((!tenant.is_empty()).then_some(tenant))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(role: Role, tenant: Option<&str>) -> Caller {
        Caller::Token {
            id: "0011223344556677".into(),
            role,
            tenant: tenant.map(str::to_string),
        }
    }

    #[test]
    fn backup_is_append_only_and_restore_read_only() {
        let backup = token(Role::Backup, Some("a"));
        for op in [
            Op::PutPack,
            Op::CommitSnapshot,
            Op::ListSnapshots,
            Op::ReadPack,
        ] {
            assert_eq!(authorize(&backup, op, "a"), Ok("a".into()), "{op:?}");
        }
        for op in [
            Op::RemoveNode,
            Op::CreateToken,
            Op::RemoveKeySlot,
            Op::AddKeySlot,
            Op::InitTenant,
            Op::Repair,
            Op::AuditLog,
        ] {
            assert!(authorize(&backup, op, "a").is_err(), "{op:?}");
        }
        let restore = token(Role::Restore, Some("a"));
        assert!(authorize(&restore, Op::CommitSnapshot, "a").is_err());
        assert!(authorize(&restore, Op::PutPack, "a").is_err());
        assert_eq!(authorize(&restore, Op::ReadPack, ""), Ok("a".into()));
    }

    #[test]
    fn dictionaries_are_stored_by_backups_and_listed_by_readers() {
        let backup = token(Role::Backup, Some("a"));
        let restore = token(Role::Restore, Some("a"));
        let monitor = token(Role::Monitor, Some("a"));
        let admin = token(Role::Admin, Some("a"));
        for caller in [&backup, &admin] {
            assert_eq!(authorize(caller, Op::PutDictionary, ""), Ok("a".into()));
            assert_eq!(authorize(caller, Op::ListDictionaries, ""), Ok("a".into()));
        }
        assert!(authorize(&restore, Op::PutDictionary, "a").is_err());
        assert_eq!(
            authorize(&restore, Op::ListDictionaries, "a"),
            Ok("a".into())
        );
        assert!(authorize(&monitor, Op::ListDictionaries, "a").is_err());
        assert!(authorize(&monitor, Op::PutDictionary, "a").is_err());
        assert!(authorize(&backup, Op::ListDictionaries, "b").is_err());
    }

    #[test]
    fn the_tenant_comes_from_the_token_and_another_is_refused_without_its_name() {
        let admin = token(Role::Admin, Some("alpha"));
        assert_eq!(authorize(&admin, Op::ListSnapshots, ""), Ok("alpha".into()));
        let refused =
            authorize(&admin, Op::ListSnapshots, "secret-beta").expect_err("another tenant");
        assert!(!refused.to_string().contains("secret-beta"));
        assert!(!refused.to_string().contains("alpha"));
        // No squatting: an admin of alpha cannot initialize another tenant.
        assert!(authorize(&admin, Op::InitTenant, "beta").is_err());
        assert_eq!(
            authorize(&admin, Op::InitTenant, "alpha"),
            Ok("alpha".into())
        );
    }

    #[test]
    fn cluster_roles_and_nodes() {
        let root = token(Role::ClusterAdmin, None);
        assert_eq!(authorize(&root, Op::ListSnapshots, "b"), Ok("b".into()));
        assert!(authorize(&root, Op::RemoveNode, "").is_ok());
        assert!(authorize(&root, Op::ReportFaults, "").is_err());
        let monitor = token(Role::Monitor, None);
        assert!(authorize(&monitor, Op::ClusterStatus, "").is_ok());
        assert!(authorize(&monitor, Op::CheckPacks { read_data: false }, "").is_ok());
        assert!(authorize(&monitor, Op::CheckPacks { read_data: true }, "").is_err());
        assert!(authorize(&monitor, Op::CheckPacks { read_data: false }, "a").is_err());
        assert!(authorize(&monitor, Op::GetKeySlots, "a").is_err());
        let node = Caller::Node(3);
        assert!(authorize(&node, Op::ReportFaults, "").is_ok());
        assert!(authorize(&node, Op::GetKeySlots, "a").is_err());
        assert!(authorize(&Caller::Insecure, Op::GetKeySlots, "a").is_ok());
    }

    #[test]
    fn admins_create_tokens_of_their_tenant_only() {
        let admin = token(Role::Admin, Some("a"));
        assert_eq!(
            may_create_token(&admin, Role::Backup, ""),
            Ok(Some("a".into()))
        );
        assert!(may_create_token(&admin, Role::Backup, "b").is_err());
        assert!(may_create_token(&admin, Role::ClusterAdmin, "").is_err());
        let root = token(Role::ClusterAdmin, None);
        assert_eq!(
            may_create_token(&root, Role::Admin, "new"),
            Ok(Some("new".into()))
        );
        assert!(may_create_token(&token(Role::Backup, Some("a")), Role::Backup, "").is_err());
    }
}
