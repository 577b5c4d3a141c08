//! The SDK's entry point: a tenant's repository on a Cairn cluster.
//!
//! A [`Repository`] is a cluster connection plus the tenant's master key,
//! unlocked on the client with the passphrase. Snapshots are listed and
//! resolved here; blobs are fetched and checked here; the pipelines in
//! `backup` and `restore` build on it.

use std::collections::{BTreeMap, HashMap};

use cairn_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::connection::Cluster;
use crate::error::{ClientError, Result};
use crate::pack::Pack;
use crate::seal::{BlobId, KdfParams, MasterKey, create_key_slot, open_key_slot};
use crate::tree::Tree;

/// The tenant used when none is given.
pub const DEFAULT_TENANT: &str = "default";
/// Blob ids per LocateBlobs/FindBlobs request.
const IDS_PER_CALL: usize = 10_000;
/// Bytes fetched per ReadPack request.
const READ_BYTES_PER_CALL: u64 = 32 * 1024 * 1024;

/// What the client seals into a snapshot record: names the nodes must not see.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The paths given to `backup`, as typed.
    pub paths: Vec<String>,
    pub hostname: String,
}

/// A snapshot of the catalog, opened with the tenant key.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    #[serde(serialize_with = "hex_id")]
    pub id: BlobId,
    pub dataset: String,
    #[serde(serialize_with = "hex_opt_id")]
    pub parent: Option<BlobId>,
    pub time_unix_ms: i64,
    pub kind: String,
    #[serde(serialize_with = "hex_id")]
    pub root_tree: BlobId,
    pub info: SnapshotInfo,
    pub files: u64,
    pub bytes: u64,
    pub bytes_added: u64,
    pub tags: Vec<String>,
}

fn hex_id<S: serde::Serializer>(id: &BlobId, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(id))
}

fn hex_opt_id<S: serde::Serializer>(
    id: &Option<BlobId>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_str(&hex::encode(id)),
        None => s.serialize_none(),
    }
}

impl Snapshot {
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
    pub fn short_id(&self) -> String {
        hex::encode(&self.id[..4])
    }
}

/// Where a blob lives, as the index says.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    pub pack_id: [u8; 32],
    pub offset: u64,
    pub length: u32,
}

/// A tenant's repository on a cluster, unlocked.
pub struct Repository {
    cluster: Cluster,
    tenant: String,
    key: MasterKey,
    region: String,
}

fn id32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| ClientError::integrity(format!("{what}: not a 32-byte id")))
}

impl Repository {
    /// Creates the tenant's master key and stores its first key slot.
    /// Fails if the tenant already has one.
    pub async fn init(
        cluster: Cluster,
        tenant: &str,
        passphrase: &[u8],
        kdf: KdfParams,
    ) -> Result<Self> {
        let key = MasterKey::generate();
        let slot = create_key_slot(&key, passphrase, kdf)?;
        let result = cluster
            .call("init", |mut c| {
                let request = pb::InitTenantRequest {
                    tenant: tenant.to_string(),
                    key_slot: slot.clone(),
                };
                async move { c.init_tenant(request).await }
            })
            .await;
        match result {
            Ok(_) => {}
            Err(ClientError::Server {
                code: tonic::Code::AlreadyExists,
                ..
            }) => {
                return Err(ClientError::AlreadyInitialized {
                    tenant: tenant.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
        Ok(Self {
            cluster,
            tenant: tenant.to_string(),
            key,
            region: String::new(),
        })
    }

    /// Unlocks the tenant's key with the passphrase.
    pub async fn open(cluster: Cluster, tenant: &str, passphrase: &[u8]) -> Result<Self> {
        let reply = cluster
            .call("get key", |mut c| {
                let request = pb::GetKeySlotsRequest {
                    tenant: tenant.to_string(),
                };
                async move { c.get_key_slots(request).await }
            })
            .await?;
        if reply.key_slots.is_empty() {
            return Err(ClientError::NotInitialized {
                tenant: tenant.to_string(),
            });
        }
        let mut last_error = ClientError::WrongPassword;
        for slot in &reply.key_slots {
            let slot = slot.clone();
            let passphrase = passphrase.to_vec();
            // argon2 is deliberately slow: keep it off the async threads.
            let opened = tokio::task::spawn_blocking(move || open_key_slot(&slot, &passphrase))
                .await
                .map_err(|e| ClientError::integrity(format!("key derivation task: {e}")))?;
            match opened {
                Ok(key) => {
                    return Ok(Self {
                        cluster,
                        tenant: tenant.to_string(),
                        key,
                        region: String::new(),
                    });
                }
                Err(crate::seal::SealError::WrongPassword) => {}
                Err(e) => last_error = e.into(),
            }
        }
        Err(last_error)
    }

    /// Prefer reading shards from this region (the client's own).
    pub fn with_region(mut self, region: &str) -> Self {
        self.region = region.to_string();
        self
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub(crate) fn key(&self) -> &MasterKey {
        &self.key
    }

    /// Every snapshot (of one dataset, or all), oldest first.
    pub async fn snapshots(&self, dataset: Option<&str>) -> Result<Vec<Snapshot>> {
        let reply = self
            .cluster
            .call("list snapshots", |mut c| {
                let request = pb::ListSnapshotsRequest {
                    tenant: self.tenant.clone(),
                    dataset: dataset.unwrap_or_default().to_string(),
                };
                async move { c.list_snapshots(request).await }
            })
            .await?;
        let mut snapshots = reply
            .snapshots
            .into_iter()
            .map(|record| self.open_snapshot(record))
            .collect::<Result<Vec<_>>>()?;
        snapshots.sort_by_key(|s| (s.time_unix_ms, s.id));
        Ok(snapshots)
    }

    fn open_snapshot(&self, record: pb::SnapshotRecord) -> Result<Snapshot> {
        let id = id32(&record.id, "snapshot id")?;
        let info_bytes = self.key.open(&record.sealed_info, &id)?;
        let info: SnapshotInfo = serde_json::from_slice(&info_bytes)
            .map_err(|e| ClientError::integrity(format!("snapshot info: {e}")))?;
        Ok(Snapshot {
            id,
            dataset: record.dataset,
            parent: if record.parent.is_empty() {
                None
            } else {
                Some(id32(&record.parent, "parent id")?)
            },
            time_unix_ms: record.time_unix_ms,
            kind: record.kind,
            root_tree: id32(&record.root_tree, "root tree id")?,
            info,
            files: record.files,
            bytes: record.bytes,
            bytes_added: record.bytes_added,
            tags: record.tags,
        })
    }

    /// Resolves `latest` (of `dataset`, or of all) or a hex prefix of ≥ 8 characters.
    pub async fn find_snapshot(&self, query: &str, dataset: Option<&str>) -> Result<Snapshot> {
        let snapshots = self.snapshots(dataset).await?;
        if query == "latest" {
            return snapshots
                .into_iter()
                .last()
                .ok_or_else(|| ClientError::SnapshotNotFound {
                    query: match dataset {
                        Some(d) => format!("latest of dataset {d}"),
                        None => "latest".into(),
                    },
                });
        }
        let query_lower = query.to_ascii_lowercase();
        if query_lower.len() < 8 || !query_lower.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ClientError::BadSnapshotId {
                query: query.to_string(),
            });
        }
        let mut matches: Vec<Snapshot> = snapshots
            .into_iter()
            .filter(|s| s.id_hex().starts_with(&query_lower))
            .collect();
        match matches.len() {
            0 => Err(ClientError::SnapshotNotFound {
                query: query.to_string(),
            }),
            1 => Ok(matches.remove(0)),
            n => Err(ClientError::AmbiguousSnapshot {
                query: query.to_string(),
                matches: n,
            }),
        }
    }

    /// Commits a snapshot record: after this, it exists.
    pub(crate) async fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let info = serde_json::to_vec(&snapshot.info)
            .map_err(|e| ClientError::integrity(format!("snapshot info: {e}")))?;
        let record = pb::SnapshotRecord {
            id: snapshot.id.to_vec(),
            dataset: snapshot.dataset.clone(),
            parent: snapshot.parent.map(|p| p.to_vec()).unwrap_or_default(),
            time_unix_ms: snapshot.time_unix_ms,
            kind: snapshot.kind.clone(),
            root_tree: snapshot.root_tree.to_vec(),
            sealed_info: self.key.seal(&info, &snapshot.id),
            files: snapshot.files,
            bytes: snapshot.bytes,
            bytes_added: snapshot.bytes_added,
            tags: snapshot.tags.clone(),
        };
        self.cluster
            .call("commit snapshot", |mut c| {
                let request = pb::CommitSnapshotRequest {
                    tenant: self.tenant.clone(),
                    snapshot: Some(record.clone()),
                };
                async move { c.commit_snapshot(request).await }
            })
            .await?;
        Ok(())
    }

    /// Which of `ids` the index already holds.
    pub(crate) async fn find_blobs(&self, ids: &[BlobId]) -> Result<Vec<bool>> {
        let mut present = Vec::with_capacity(ids.len());
        for batch in ids.chunks(IDS_PER_CALL) {
            let reply = self
                .cluster
                .call("find blobs", |mut c| {
                    let request = pb::FindBlobsRequest {
                        tenant: self.tenant.clone(),
                        ids: batch.iter().map(|id| id.to_vec()).collect(),
                    };
                    async move { c.find_blobs(request).await }
                })
                .await?;
            if reply.present.len() != batch.len() {
                return Err(ClientError::integrity(
                    "find blobs: answer of the wrong length",
                ));
            }
            present.extend(reply.present);
        }
        Ok(present)
    }

    /// Uploads one pack; idempotent (a pack is named by its content).
    pub(crate) async fn put_pack(&self, pack: Pack) -> Result<pb::PutPackReply> {
        let blobs: Vec<pb::BlobEntry> = pack
            .blobs
            .iter()
            .map(|b| pb::BlobEntry {
                id: b.id.to_vec(),
                offset: b.offset,
                length: b.length,
            })
            .collect();
        let data = prost::bytes::Bytes::from(pack.data);
        self.cluster
            .call("upload pack", |mut c| {
                let request = pb::PutPackRequest {
                    tenant: self.tenant.clone(),
                    pack_id: pack.id.to_vec(),
                    data: data.clone(),
                    blobs: blobs.clone(),
                };
                async move { c.put_pack(request).await }
            })
            .await
    }

    /// Where each blob lives; a blob missing from the index is an error.
    pub async fn locate(&self, ids: &[BlobId]) -> Result<HashMap<BlobId, Located>> {
        let mut out = HashMap::with_capacity(ids.len());
        for batch in ids.chunks(IDS_PER_CALL) {
            let reply = self
                .cluster
                .call("locate blobs", |mut c| {
                    let request = pb::LocateBlobsRequest {
                        tenant: self.tenant.clone(),
                        ids: batch.iter().map(|id| id.to_vec()).collect(),
                    };
                    async move { c.locate_blobs(request).await }
                })
                .await?;
            for location in reply.locations {
                let id = id32(&location.id, "blob id")?;
                if !location.found {
                    return Err(ClientError::integrity(format!(
                        "blob {} is referenced but not in the index",
                        hex::encode(id)
                    )));
                }
                out.insert(
                    id,
                    Located {
                        pack_id: id32(&location.pack_id, "pack id")?,
                        offset: location.offset,
                        length: location.length,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Reads byte ranges of one pack (split into requests of bounded size).
    pub(crate) async fn read_ranges(
        &self,
        pack_id: &[u8; 32],
        ranges: &[(u64, u64)],
        exclude_regions: &[String],
    ) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(ranges.len());
        let mut start = 0;
        while start < ranges.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < ranges.len()
                && (end == start || bytes + ranges[end].1 <= READ_BYTES_PER_CALL)
            {
                bytes += ranges[end].1;
                end += 1;
            }
            let batch = &ranges[start..end];
            let reply = self
                .cluster
                .call_spread("read pack", |mut c| {
                    let request = pb::ReadPackRequest {
                        pack_id: pack_id.to_vec(),
                        ranges: batch
                            .iter()
                            .map(|&(offset, length)| pb::ByteRange { offset, length })
                            .collect(),
                        preferred_region: self.region.clone(),
                        exclude_regions: exclude_regions.to_vec(),
                    };
                    async move { c.read_pack(request).await }
                })
                .await?;
            if reply.ranges.len() != batch.len()
                || reply
                    .ranges
                    .iter()
                    .zip(batch)
                    .any(|(data, (_, len))| data.len() as u64 != *len)
            {
                return Err(ClientError::integrity(
                    "read pack: answer of the wrong shape",
                ));
            }
            out.extend(reply.ranges);
            start = end;
        }
        Ok(out)
    }

    /// Asks the cluster to verify every pack of this tenant (and with
    /// `read_data`, to read and checksum every shard).
    pub async fn check_packs(&self, read_data: bool) -> Result<pb::CheckPacksReply> {
        self.cluster
            .call("check packs", |mut c| {
                let request = pb::CheckPacksRequest {
                    read_data,
                    tenant: self.tenant.clone(),
                };
                async move { c.check_packs(request).await }
            })
            .await
    }

    /// Runs a repair pass on the leader now; returns (packs queued, repaired, errors).
    pub async fn repair_now(&self) -> Result<pb::RepairReply> {
        self.cluster
            .call("repair", |mut c| async move {
                c.repair(pb::RepairRequest {}).await
            })
            .await
    }

    /// Fetches, decrypts and checks blobs (small ones: trees, single files).
    pub(crate) async fn read_blobs(
        &self,
        ids: &[BlobId],
        exclude_regions: &[String],
    ) -> Result<HashMap<BlobId, Vec<u8>>> {
        let located = self.locate(ids).await?;
        let mut by_pack: BTreeMap<[u8; 32], Vec<(BlobId, Located)>> = BTreeMap::new();
        for (id, loc) in &located {
            by_pack.entry(loc.pack_id).or_default().push((*id, *loc));
        }
        let mut out = HashMap::with_capacity(ids.len());
        for (pack_id, blobs) in by_pack {
            let ranges: Vec<(u64, u64)> = blobs
                .iter()
                .map(|(_, l)| (l.offset, u64::from(l.length)))
                .collect();
            let data = self.read_ranges(&pack_id, &ranges, exclude_regions).await?;
            for ((id, _), sealed) in blobs.into_iter().zip(data) {
                let plain = self.key.decode_blob(&id, &sealed)?;
                out.insert(id, plain);
            }
        }
        Ok(out)
    }

    /// Every tree reachable from `root`, fetched a level at a time (one
    /// request per pack per level), so a walk costs a handful of round trips
    /// instead of one per directory.
    pub async fn load_trees(
        &self,
        root: &BlobId,
        exclude_regions: &[String],
    ) -> Result<HashMap<BlobId, Tree>> {
        let mut trees: HashMap<BlobId, Tree> = HashMap::new();
        let mut level = vec![*root];
        while !level.is_empty() {
            level.sort();
            level.dedup();
            level.retain(|id| !trees.contains_key(id));
            let blobs = self.read_blobs(&level, exclude_regions).await?;
            let mut next = Vec::new();
            for id in &level {
                let bytes = blobs
                    .get(id)
                    .ok_or_else(|| ClientError::integrity("tree missing from the answer"))?;
                let tree = Tree::decode(bytes)?;
                for entry in &tree.entries {
                    if let crate::tree::EntryKind::Dir { subtree } = &entry.kind {
                        next.push(*subtree);
                    }
                }
                trees.insert(*id, tree);
            }
            level = next;
        }
        Ok(trees)
    }

    /// Fetches and decodes one tree.
    pub async fn load_tree(&self, id: &BlobId) -> Result<Tree> {
        self.load_tree_excluding(id, &[]).await
    }

    pub(crate) async fn load_tree_excluding(
        &self,
        id: &BlobId,
        exclude_regions: &[String],
    ) -> Result<Tree> {
        let mut blobs = self.read_blobs(&[*id], exclude_regions).await?;
        let bytes = blobs
            .remove(id)
            .ok_or_else(|| ClientError::integrity("tree blob missing from the answer"))?;
        Ok(Tree::decode(&bytes)?)
    }
}
