//! The tenant's catalog behind the gateway: key slots, dedup look-ups, blob
//! locations and snapshot records. Everything here is sealed by the client;
//! the gateway checks shapes and bounds, never contents.

use cairn_proto::v1 as pb;

use super::{Gateway, GatewayError, check_name, id32, ids, invalid};
use crate::auth::Caller;
use crate::auth::audit::actor_of;
use crate::meta::state::key_slot_id;
use crate::meta::types::{Command, CommandResult, SnapshotRecord};

/// Largest key slot accepted (a sealed master key with its KDF parameters).
const KEY_SLOT_BYTES_MAX: usize = 64 * 1024;

/// `cmd` wrapped so that applying it also appends its audit entry.
pub(super) fn audited(caller: &Caller, action: &str, target: String, cmd: Command) -> Command {
    Command::Audited {
        at: 0,
        actor: actor_of(caller),
        action: action.to_string(),
        target,
        cmd: Box::new(cmd),
    }
}

impl Gateway {
    /// Proposes `cmd` with its audit entry; a token revoked or expired by
    /// the time the entry applies is refused there ([`CommandResult::ActorRefused`]).
    pub(super) async fn write_audited(
        &self,
        caller: &Caller,
        action: &str,
        target: String,
        cmd: Command,
    ) -> Result<CommandResult, GatewayError> {
        match self
            .meta
            .write(audited(caller, action, target, cmd))
            .await?
        {
            CommandResult::ActorRefused => Err(GatewayError::Unauthenticated),
            other => Ok(other),
        }
    }
}

fn check_key_slot(slot: &[u8]) -> Result<(), GatewayError> {
    if slot.is_empty() || slot.len() > KEY_SLOT_BYTES_MAX {
        return Err(invalid("key slot must be 1 byte to 64 KiB"));
    }
    Ok(())
}

impl Gateway {
    pub(super) async fn init_tenant_inner(
        &self,
        req: pb::InitTenantRequest,
        caller: &Caller,
    ) -> Result<pb::InitTenantReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        check_key_slot(&req.key_slot)?;
        let tenant = req.tenant.clone();
        let target = format!("tenant {tenant}, key slot {}", key_slot_id(&req.key_slot));
        let cmd = Command::InitTenant {
            tenant: req.tenant,
            key_slot: req.key_slot,
        };
        match self
            .write_audited(caller, "InitTenant", target, cmd)
            .await?
        {
            CommandResult::AlreadyExists => Err(GatewayError::AlreadyExists {
                what: format!("a key for tenant {tenant:?}"),
            }),
            _ => Ok(pb::InitTenantReply {}),
        }
    }

    pub(super) async fn get_key_slots_inner(
        &self,
        req: pb::GetKeySlotsRequest,
    ) -> Result<pb::GetKeySlotsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        self.catch_up().await;
        let entries = self.meta.key_slot_entries(&req.tenant)?;
        Ok(pb::GetKeySlotsReply {
            key_slots: entries.iter().map(|e| e.slot.clone()).collect(),
            slots: entries
                .into_iter()
                .map(|e| pb::KeySlotInfo {
                    id: e.id,
                    slot: e.slot,
                    created_unix_ms: e.created_unix_ms,
                })
                .collect(),
        })
    }

    pub(super) async fn add_key_slot_inner(
        &self,
        req: pb::AddKeySlotRequest,
        caller: &Caller,
    ) -> Result<pb::AddKeySlotReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        check_key_slot(&req.key_slot)?;
        let id = key_slot_id(&req.key_slot);
        let target = format!("tenant {}, key slot {id}", req.tenant);
        let cmd = Command::AddKeySlot {
            tenant: req.tenant,
            key_slot: req.key_slot,
        };
        match self
            .write_audited(caller, "AddKeySlot", target, cmd)
            .await?
        {
            CommandResult::UnknownTenant => Err(GatewayError::NotFound {
                what: "a key for this tenant (run init first)".into(),
            }),
            CommandResult::AlreadyExists => Err(GatewayError::AlreadyExists {
                what: format!("key slot {id}"),
            }),
            _ => Ok(pb::AddKeySlotReply { id }),
        }
    }

    pub(super) async fn remove_key_slot_inner(
        &self,
        req: pb::RemoveKeySlotRequest,
        caller: &Caller,
    ) -> Result<pb::RemoveKeySlotReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        if req.id.len() != 16 || !req.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("key slot id must be 16 hex digits"));
        }
        let id = req.id.to_ascii_lowercase();
        let target = format!("tenant {}, key slot {id}", req.tenant);
        let cmd = Command::RemoveKeySlot {
            tenant: req.tenant,
            id: id.clone(),
        };
        match self
            .write_audited(caller, "RemoveKeySlot", target, cmd)
            .await?
        {
            CommandResult::UnknownTenant | CommandResult::UnknownKeySlot => {
                Err(GatewayError::NotFound {
                    what: format!("key slot {id}"),
                })
            }
            CommandResult::LastKeySlot => Err(GatewayError::Precondition {
                what: format!(
                    "key slot {id} is the last one: add another passphrase before removing it"
                ),
            }),
            _ => Ok(pb::RemoveKeySlotReply {}),
        }
    }

    pub(super) async fn find_blobs_inner(
        &self,
        req: pb::FindBlobsRequest,
    ) -> Result<pb::FindBlobsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        // A stale "absent" only costs a re-upload; "present" is never
        // stale because index entries are added only for durable packs.
        let present = self.meta.find_blobs(&req.tenant, &ids(&req.ids)?)?;
        Ok(pb::FindBlobsReply {
            present,
            gc_epoch: self.meta.view()?.gc_epoch()?,
        })
    }

    pub(super) async fn locate_blobs_inner(
        &self,
        req: pb::LocateBlobsRequest,
    ) -> Result<pb::LocateBlobsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        let ids = ids(&req.ids)?;
        let mut found = Vec::with_capacity(ids.len());
        let mut barrier_done = false;
        for id in &ids {
            let mut location = self.meta.locate_blob(&req.tenant, id)?;
            if location.is_none() && !barrier_done {
                // This node may lag the leader: catch up once, then answer.
                self.catch_up().await;
                barrier_done = true;
                location = self.meta.locate_blob(&req.tenant, id)?;
            }
            found.push(match location {
                Some(loc) => pb::BlobLocation {
                    id: id.to_vec(),
                    found: true,
                    pack_id: loc.pack_id.to_vec(),
                    offset: loc.offset,
                    length: loc.length,
                },
                None => pb::BlobLocation {
                    id: id.to_vec(),
                    found: false,
                    ..Default::default()
                },
            });
        }
        Ok(pb::LocateBlobsReply { locations: found })
    }

    pub(super) async fn commit_snapshot_inner(
        &self,
        req: pb::CommitSnapshotRequest,
        caller: &Caller,
    ) -> Result<pb::CommitSnapshotReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        let snapshot = snapshot_from_wire(
            req.snapshot
                .ok_or_else(|| invalid("snapshot record missing"))?,
        )?;
        let tree = hex::encode(snapshot.root_tree);
        let target = format!(
            "tenant {}, snapshot {}, dataset {}",
            req.tenant,
            hex::encode(snapshot.id),
            snapshot.dataset
        );
        let cmd = Command::CommitSnapshot {
            tenant: req.tenant,
            snapshot,
        };
        match self
            .write_audited(caller, "CommitSnapshot", target, cmd)
            .await?
        {
            CommandResult::MissingRootTree => Err(GatewayError::MissingRootTree { tree }),
            _ => Ok(pb::CommitSnapshotReply {}),
        }
    }

    pub(super) async fn list_snapshots_inner(
        &self,
        req: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        self.catch_up().await;
        let dataset = (!req.dataset.is_empty()).then_some(req.dataset.as_str());
        let snapshots = self
            .meta
            .snapshots(&req.tenant, dataset)?
            .into_iter()
            .map(snapshot_to_wire)
            .collect();
        Ok(pb::ListSnapshotsReply { snapshots })
    }
}

pub(super) fn snapshot_to_wire(s: SnapshotRecord) -> pb::SnapshotRecord {
    pb::SnapshotRecord {
        id: s.id.to_vec(),
        dataset: s.dataset,
        parent: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        time_unix_ms: s.time_unix_ms,
        kind: s.kind,
        root_tree: s.root_tree.to_vec(),
        sealed_info: s.sealed_info,
        files: s.files,
        bytes: s.bytes,
        bytes_added: s.bytes_added,
        tags: s.tags,
        // Filled in by the lifecycle (commit time, lock, reference list).
        committed_unix_ms: 0,
        lock: None,
        has_refs: false,
    }
}

fn snapshot_from_wire(s: pb::SnapshotRecord) -> Result<SnapshotRecord, GatewayError> {
    check_name(&s.dataset, "dataset")?;
    if !matches!(s.kind.as_str(), "full" | "incremental" | "differential") {
        return Err(invalid(format!("unknown snapshot kind {:?}", s.kind)));
    }
    if s.sealed_info.len() > 1024 * 1024 || s.tags.len() > 64 {
        return Err(invalid("snapshot info too large"));
    }
    for tag in &s.tags {
        check_name(tag, "tag")?;
    }
    Ok(SnapshotRecord {
        id: id32(&s.id, "snapshot id")?,
        dataset: s.dataset,
        parent: if s.parent.is_empty() {
            None
        } else {
            Some(id32(&s.parent, "parent")?)
        },
        time_unix_ms: s.time_unix_ms,
        kind: s.kind,
        root_tree: id32(&s.root_tree, "root tree")?,
        sealed_info: s.sealed_info,
        files: s.files,
        bytes: s.bytes,
        bytes_added: s.bytes_added,
        tags: s.tags,
    })
}
