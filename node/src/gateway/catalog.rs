//! The tenant's catalog behind the gateway: key slots, dedup look-ups, blob
//! locations and snapshot records. Everything here is sealed by the client;
//! the gateway checks shapes and bounds, never contents.

use cairn_proto::v1 as pb;

use super::{Gateway, GatewayError, check_name, id32, ids, invalid};
use crate::auth::Caller;
use crate::auth::audit::actor_of;
use crate::meta::state::key_slot_id;
use crate::meta::types::{
    Command, CommandResult, Id32, RefSegment, SessionId, SnapshotLife, SnapshotRecord,
};

/// Commits tried when garbage collection keeps moving the epoch.
const COMMIT_ATTEMPTS_MAX: u32 = 5;
/// Ids checked against the index at once when verifying references.
const VERIFY_BATCH: usize = 8192;
/// Most segments in one reference list (the wire caps the list too).
const SEGMENTS_MAX: usize = 1024;

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

    /// `PutDictionary`: the first dictionary of a dataset stays; the reply
    /// names the dataset's dictionary either way.
    pub(super) async fn put_dictionary_inner(
        &self,
        req: pb::PutDictionaryRequest,
        caller: &Caller,
    ) -> Result<pb::PutDictionaryReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        check_name(&req.dataset, "dataset")?;
        let id = id32(&req.id, "id")?;
        if req.sealed.is_empty() || req.sealed.len() > cairn_proto::DICTIONARY_SEALED_BYTES_MAX {
            return Err(invalid(format!(
                "sealed dictionary must be 1 byte to {} KiB",
                cairn_proto::DICTIONARY_SEALED_BYTES_MAX / 1024
            )));
        }
        let target = format!(
            "tenant {}, dataset {}, dictionary {}",
            req.tenant,
            req.dataset,
            hex::encode(&id[..8])
        );
        let cmd = Command::PutDictionary {
            tenant: req.tenant,
            dataset: req.dataset,
            id,
            sealed: req.sealed,
        };
        match self
            .write_audited(caller, "PutDictionary", target, cmd)
            .await?
        {
            CommandResult::Dictionary { id, stored } => Ok(pb::PutDictionaryReply {
                id: id.to_vec(),
                stored,
            }),
            CommandResult::TooManyDictionaries => Ok(pb::PutDictionaryReply {
                id: Vec::new(),
                stored: false,
            }),
            CommandResult::UnknownTenant => Err(GatewayError::NotFound {
                what: "a key for this tenant (run init first)".into(),
            }),
            other => Err(invalid(format!(
                "dictionary not stored: {}",
                other.audit_text()
            ))),
        }
    }

    /// `ListDictionaries`: every dictionary of the tenant, after a read
    /// barrier (a dictionary stored through another node is listed).
    pub(super) async fn list_dictionaries_inner(
        &self,
        req: pb::ListDictionariesRequest,
    ) -> Result<pb::ListDictionariesReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        self.catch_up().await;
        let entries = self.meta.dictionaries(&req.tenant)?;
        Ok(pb::ListDictionariesReply {
            dictionaries: entries
                .into_iter()
                .map(|e| pb::DictionaryInfo {
                    dataset: e.dataset,
                    id: e.record.id.to_vec(),
                    sealed: e.record.sealed,
                })
                .collect(),
        })
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
        // A stale "absent" only costs a re-upload. A "present" may be
        // swept later by garbage collection: the epoch read here, *before*
        // the look-up, makes the commit re-check it (a sweep landing
        // between the two reads then shows as a changed epoch).
        let view = self.meta.view()?;
        let gc_epoch = view.gc_epoch()?;
        let present = view.find_blobs(&req.tenant, &ids(&req.ids)?)?;
        Ok(pb::FindBlobsReply { present, gc_epoch })
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
        let refs = refs_from_wire(&req.refs)?;
        let session = session_from_wire(&req.session)?;
        let tree = hex::encode(snapshot.root_tree);
        let target = format!(
            "tenant {}, snapshot {}, dataset {}",
            req.tenant,
            hex::encode(snapshot.id),
            snapshot.dataset
        );
        let retire = super::stream::retire_ids(&req.retire_segments)?;
        // Retired segments leave in the same entry as the commit.
        let retiring = |cmd: Command| {
            if retire.is_empty() {
                cmd
            } else {
                Command::RetiringSegments {
                    tenant: req.tenant.clone(),
                    dataset: snapshot.dataset.clone(),
                    segments: retire.clone(),
                    cmd: Box::new(cmd),
                }
            }
        };
        if refs.is_empty() {
            // An older client: no reference list, so garbage collection
            // leaves this tenant alone from now on.
            let cmd = retiring(Command::CommitSnapshot {
                tenant: req.tenant.clone(),
                snapshot: snapshot.clone(),
            });
            return match self
                .write_audited(caller, "CommitSnapshot", target, cmd)
                .await?
            {
                CommandResult::MissingRootTree => Err(GatewayError::MissingRootTree { tree }),
                CommandResult::SegmentsChanged => Err(segments_changed()),
                CommandResult::NeedsReferences => Err(GatewayError::Precondition {
                    what: "this tenant's snapshots carry reference lists for garbage collection and this client sends none; upgrade the client".into(),
                }),
                _ => Ok(pb::CommitSnapshotReply {}),
            };
        }
        self.catch_up().await;
        let view = self.meta.view()?;
        let segment_ids: Vec<Id32> = refs.iter().map(|r| r.blob).collect();
        if let Some(i) = view
            .find_blobs(&req.tenant, &segment_ids)?
            .iter()
            .position(|present| !present)
        {
            return Err(invalid(format!(
                "reference segment {} is not stored; upload it before the commit",
                hex::encode(segment_ids[i])
            )));
        }
        let mut epoch = view.gc_epoch()?;
        if epoch != req.gc_epoch {
            self.verify_references(&req.tenant, &refs).await?;
        }
        for _attempt in 0..COMMIT_ATTEMPTS_MAX {
            let cmd = retiring(Command::CommitSnapshotWithRefs {
                tenant: req.tenant.clone(),
                snapshot: snapshot.clone(),
                refs: refs.clone(),
                expect_epoch: epoch,
                session,
            });
            match self
                .write_audited(caller, "CommitSnapshot", target.clone(), cmd)
                .await?
            {
                CommandResult::MissingRootTree => {
                    return Err(GatewayError::MissingRootTree { tree });
                }
                CommandResult::SegmentsChanged => return Err(segments_changed()),
                CommandResult::GcRaced => {
                    // A sweep applied since the check: look again at what
                    // is still indexed, under the new epoch.
                    self.catch_up().await;
                    epoch = self.meta.view()?.gc_epoch()?;
                    self.verify_references(&req.tenant, &refs).await?;
                }
                _ => return Ok(pb::CommitSnapshotReply {}),
            }
        }
        Err(GatewayError::GcRaced {
            attempts: COMMIT_ATTEMPTS_MAX,
        })
    }

    /// Reads every reference segment through the pack read path, checks it
    /// against its id, and checks that every id it lists is still indexed.
    async fn verify_references(
        &self,
        tenant: &str,
        refs: &[RefSegment],
    ) -> Result<(), GatewayError> {
        for segment in refs {
            let ids = self.read_segment(tenant, segment).await?;
            for batch in ids.chunks(VERIFY_BATCH) {
                let present = self.meta.find_blobs(tenant, batch)?;
                let missing = present.iter().filter(|p| !**p).count() as u64;
                if let Some(i) = present.iter().position(|p| !p) {
                    return Err(GatewayError::ReferencesCollected {
                        missing,
                        example: hex::encode(batch[i]),
                    });
                }
            }
        }
        Ok(())
    }

    /// The ids one reference segment lists, read and checked
    /// (`cairn_proto::refs::decode`) against its id and description.
    pub(crate) async fn read_segment(
        &self,
        tenant: &str,
        segment: &RefSegment,
    ) -> Result<Vec<Id32>, GatewayError> {
        let location = self
            .meta
            .locate_blob(tenant, &segment.blob)?
            .ok_or_else(|| GatewayError::ReferencesCollected {
                missing: 1,
                example: hex::encode(segment.blob),
            })?;
        let bytes = self
            .read_pack_ranges(
                &location.pack_id,
                &[(location.offset, u64::from(location.length))],
            )
            .await?
            .into_iter()
            .next()
            .unwrap_or_default();
        let ids = cairn_proto::refs::decode(&segment.blob, &bytes).map_err(|e| {
            GatewayError::Precondition {
                what: format!("reference segment {}: {e}", hex::encode(segment.blob)),
            }
        })?;
        if ids.len() != segment.count as usize
            || ids.first() != Some(&segment.first)
            || ids.last() != Some(&segment.last)
        {
            return Err(GatewayError::Precondition {
                what: format!(
                    "reference segment {} does not match its description (count, first, last)",
                    hex::encode(segment.blob)
                ),
            });
        }
        Ok(ids)
    }

    pub(super) async fn list_snapshots_inner(
        &self,
        req: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        self.catch_up().await;
        let dataset = (!req.dataset.is_empty()).then_some(req.dataset.as_str());
        let view = self.meta.view()?;
        let mut snapshots = Vec::new();
        let locks = view.locks(&req.tenant)?;
        for record in view.snapshots(&req.tenant, dataset)? {
            let life = view.snapshot_life(&req.tenant, &record.id)?;
            let lock = locks.get(&record.id);
            snapshots.push(snapshot_to_wire(record, life.as_ref(), lock));
        }
        Ok(pb::ListSnapshotsReply { snapshots })
    }
}

/// A compaction lost the race to another one (or to a max-age drop).
fn segments_changed() -> GatewayError {
    GatewayError::Precondition {
        what:
            "stream segments changed since they were listed (another compaction ran); compact again"
                .into(),
    }
}

/// A reference list from the wire: ids of 32 bytes, 1..=SEGMENT_IDS_MAX
/// ids per segment, first <= last, segments ascending and not overlapping.
fn refs_from_wire(refs: &[pb::RefSegment]) -> Result<Vec<RefSegment>, GatewayError> {
    if refs.len() > SEGMENTS_MAX {
        return Err(invalid(format!(
            "{} reference segments, at most {SEGMENTS_MAX}",
            refs.len()
        )));
    }
    let mut out: Vec<RefSegment> = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let segment = RefSegment {
            blob: id32(&r.blob, "reference segment blob")?,
            first: id32(&r.first, "reference segment first id")?,
            last: id32(&r.last, "reference segment last id")?,
            count: r.count,
        };
        if segment.count == 0 || segment.count as usize > cairn_proto::refs::SEGMENT_IDS_MAX {
            return Err(invalid(format!(
                "reference segment {i} lists {} ids, expected 1..={}",
                segment.count,
                cairn_proto::refs::SEGMENT_IDS_MAX
            )));
        }
        if segment.first > segment.last || (segment.count == 1) != (segment.first == segment.last) {
            return Err(invalid(format!(
                "reference segment {i}: first and last id do not match its count"
            )));
        }
        if out.last().is_some_and(|prev| prev.last >= segment.first) {
            return Err(invalid(format!(
                "reference segment {i} overlaps or precedes the one before it; segments must be in ascending id order"
            )));
        }
        out.push(segment);
    }
    Ok(out)
}

/// A backup session id from the wire: empty (none) or 16 bytes.
pub(super) fn session_from_wire(raw: &[u8]) -> Result<Option<SessionId>, GatewayError> {
    match raw.len() {
        0 => Ok(None),
        16 => {
            let mut id = [0u8; 16];
            id.copy_from_slice(raw);
            Ok(Some(id))
        }
        n => Err(invalid(format!(
            "session must be empty or 16 bytes, got {n}"
        ))),
    }
}

/// A catalog record on the wire, with what its life record adds: the
/// commit time (cluster time; the client's time for snapshots committed
/// before life records existed) and whether it carries references.
pub(super) fn snapshot_to_wire(
    s: SnapshotRecord,
    life: Option<&SnapshotLife>,
    lock: Option<&crate::meta::types::RetentionLock>,
) -> pb::SnapshotRecord {
    let committed_unix_ms = life.map_or(s.time_unix_ms, |l| l.committed_unix_ms);
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
        committed_unix_ms,
        lock: lock.map(super::lifecycle::lock_to_wire),
        has_refs: life.is_some_and(|l| !l.refs.is_empty()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(blob: u8, first: u8, last: u8, count: u32) -> pb::RefSegment {
        pb::RefSegment {
            blob: vec![blob; 32],
            first: vec![first; 32],
            last: vec![last; 32],
            count,
        }
    }

    #[test]
    fn reference_lists_are_checked_for_shape_and_order() {
        let good = vec![
            segment(1, 1, 5, 3),
            segment(2, 6, 6, 1),
            segment(3, 9, 200, 100),
        ];
        assert_eq!(refs_from_wire(&good).expect("valid").len(), 3);
        assert!(refs_from_wire(&[]).expect("old clients").is_empty());
        let refused = [
            vec![segment(1, 1, 5, 0)],
            vec![segment(
                1,
                1,
                5,
                cairn_proto::refs::SEGMENT_IDS_MAX as u32 + 1,
            )],
            vec![segment(1, 5, 1, 3)],
            vec![segment(1, 5, 5, 3)],
            vec![segment(1, 1, 5, 1)],
            vec![segment(1, 1, 5, 3), segment(2, 5, 9, 3)],
            vec![segment(1, 6, 9, 3), segment(2, 1, 5, 3)],
            vec![pb::RefSegment {
                blob: vec![1; 31],
                ..segment(1, 1, 5, 3)
            }],
        ];
        for refs in refused {
            assert!(refs_from_wire(&refs).is_err(), "{refs:?}");
        }
        let too_many: Vec<pb::RefSegment> = (0..=SEGMENTS_MAX as u32)
            .map(|i| {
                let mut s = segment(1, 0, 0, 1);
                s.first[..4].copy_from_slice(&i.to_be_bytes());
                s.last = s.first.clone();
                s
            })
            .collect();
        assert!(refs_from_wire(&too_many).is_err());
        assert!(refs_from_wire(&too_many[..SEGMENTS_MAX]).is_ok());
    }

    #[test]
    fn sessions_are_empty_or_sixteen_bytes() {
        assert_eq!(session_from_wire(&[]).expect("none"), None);
        assert_eq!(session_from_wire(&[3; 16]).expect("one"), Some([3; 16]));
        assert!(session_from_wire(&[3; 15]).is_err());
        assert!(session_from_wire(&[3; 32]).is_err());
    }
}
