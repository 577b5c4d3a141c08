//! The tenant's catalog behind the gateway: key slots, dedup look-ups, blob
//! locations and snapshot records. Everything here is sealed by the client;
//! the gateway checks shapes and bounds, never contents.

use cairn_proto::v1 as pb;

use super::{Gateway, GatewayError, check_name, id32, ids, invalid};
use crate::meta::types::{Command, CommandResult, SnapshotRecord};

impl Gateway {
    pub(super) async fn init_tenant_inner(
        &self,
        req: pb::InitTenantRequest,
    ) -> Result<pb::InitTenantReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        if req.key_slot.is_empty() || req.key_slot.len() > 64 * 1024 {
            return Err(invalid("key slot must be 1 byte to 64 KiB"));
        }
        let tenant = req.tenant.clone();
        match self
            .meta
            .write(Command::InitTenant {
                tenant: req.tenant,
                key_slot: req.key_slot,
            })
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
        let key_slots = self.meta.key_slots(&req.tenant)?;
        Ok(pb::GetKeySlotsReply {
            key_slots,
            slots: Vec::new(),
        })
    }

    pub(super) async fn find_blobs_inner(
        &self,
        req: pb::FindBlobsRequest,
    ) -> Result<pb::FindBlobsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        // A stale "absent" only costs a re-upload; "present" is never
        // stale because index entries are added only for durable packs.
        let present = self.meta.find_blobs(&req.tenant, &ids(&req.ids)?)?;
        Ok(pb::FindBlobsReply { present })
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
    ) -> Result<pb::CommitSnapshotReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        let snapshot = snapshot_from_wire(
            req.snapshot
                .ok_or_else(|| invalid("snapshot record missing"))?,
        )?;
        let tree = hex::encode(snapshot.root_tree);
        match self
            .meta
            .write(Command::CommitSnapshot {
                tenant: req.tenant,
                snapshot,
            })
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

fn snapshot_to_wire(s: SnapshotRecord) -> pb::SnapshotRecord {
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
