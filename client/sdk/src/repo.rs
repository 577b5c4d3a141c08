//! The SDK's entry point: a tenant's repository on a Cairn cluster.
//!
//! A [`Repository`] is a cluster connection plus the tenant's master key,
//! unlocked on the client with the passphrase. Snapshots are listed and
//! resolved here; blobs are fetched and checked here; the pipelines in
//! `backup` and `restore` build on it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cairn_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::connection::Cluster;
use crate::error::{ClientError, Result};
use crate::pack::Pack;
use crate::seal::{
    BlobId, Dictionary, KdfParams, MasterKey, SealError, SnapshotAuth, SnapshotFields,
    create_key_slot, open_key_slot,
};
use crate::tree::Tree;

/// The tenant used when none is given.
pub const DEFAULT_TENANT: &str = "default";
/// Blob ids per LocateBlobs/FindBlobs request.
const IDS_PER_CALL: usize = 10_000;
/// Bytes fetched per ReadPack request.
const READ_BYTES_PER_CALL: u64 = 32 * 1024 * 1024;

/// A backup run's upload session: 16 random bytes in every pack upload and
/// the commit.
pub type SessionId = [u8; 16];

/// A fresh random session id.
pub fn new_session() -> SessionId {
    let mut id = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut id[..]);
    id
}

/// What the client seals into a snapshot record: names the nodes must not see.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The paths given to `backup`, as typed.
    pub paths: Vec<String>,
    pub hostname: String,
}

/// Which shards a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRead {
    /// None: the index of every pack is checked, no shard is read.
    None,
    /// Every shard of every pack.
    All,
    /// The shards of the packs in one slice (see [`DataSubset`]).
    Subset(DataSubset),
}

/// Slice `index` (1-based) of `count`: the packs a node assigns to it by
/// their id, so `count` checks with `index` = 1..=`count` read every pack
/// once (a month of daily `1/30`, `2/30`... checks reads everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DataSubset {
    pub index: u32,
    pub count: u32,
}

impl std::str::FromStr for DataSubset {
    type Err = ClientError;

    /// `N/M` with 1 <= N <= M.
    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| ClientError::BadInput {
            what: format!("invalid data subset {text:?}: {why} (e.g. 3/30)"),
        };
        let (n, m) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("give it as N/M"))?;
        let index: u32 = n.trim().parse().map_err(|_| bad("N is not a number"))?;
        let count: u32 = m.trim().parse().map_err(|_| bad("M is not a number"))?;
        if count == 0 || index == 0 || index > count {
            return Err(bad("N must lie in 1..=M"));
        }
        Ok(DataSubset { index, count })
    }
}

impl std::fmt::Display for DataSubset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
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
    /// Cluster time the record was committed (Unix ms), which retention and
    /// lock expiry use; 0 from a node that predates it. Set by the cluster,
    /// so it is not covered by the record's seal (`time_unix_ms`, the
    /// client's clock, is).
    pub committed_unix_ms: i64,
    /// The retention lock holding the snapshot, if any (expired or not:
    /// compare `until_unix_ms` with cluster time).
    pub lock: Option<crate::lifecycle::LockInfo>,
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

    /// The time to show and reason with: the cluster's commit time when the
    /// node gave one, else the client's clock at backup.
    pub fn time_ms(&self) -> i64 {
        if self.committed_unix_ms > 0 {
            self.committed_unix_ms
        } else {
            self.time_unix_ms
        }
    }

    /// [`Snapshot::time_ms`] as a `SystemTime`.
    pub fn time(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.time_ms().max(0) as u64)
    }
}

/// A catalog record that was left out of a listing, or listed with a caveat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogWarning {
    /// Hex of the record's snapshot id (or of its bytes, if not an id).
    pub snapshot_id: String,
    /// What is wrong, in a sentence a user can act on.
    pub message: String,
}

/// The catalog as this client could open it.
#[derive(Debug, Clone, Default)]
pub struct SnapshotList {
    /// Records that opened, oldest first.
    pub snapshots: Vec<Snapshot>,
    /// Records that did not open (undecodable, tampered with, another key):
    /// left out, so one bad record cannot hide every good one.
    pub skipped: Vec<CatalogWarning>,
    /// Format v1 records among `snapshots`: their clear fields (root tree,
    /// time, tags...) are not authenticated.
    pub unauthenticated: Vec<CatalogWarning>,
}

impl SnapshotList {
    /// Every warning of this listing, skipped records first.
    pub fn warnings(&self) -> impl Iterator<Item = &CatalogWarning> {
        self.skipped.iter().chain(&self.unauthenticated)
    }
}

/// Called once per catalog warning and record per [`Repository`].
pub type WarningSink = Arc<dyn Fn(&CatalogWarning) + Send + Sync>;

/// Where a blob lives, as the index says.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    pub pack_id: [u8; 32],
    pub offset: u64,
    pub length: u32,
}

/// One of the tenant's key slots: another passphrase wrapping the same
/// master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySlot {
    /// Short hex id given by the metadata group.
    pub id: String,
    /// When it was added (cluster time); 0 when not recorded.
    pub created_unix_ms: i64,
    /// This session was unlocked with it.
    pub current: bool,
}

/// The id of a slot listed by a node that gives none: blake3 of the slot,
/// first 8 bytes in hex, as the metadata group names slots.
pub fn key_slot_id(slot: &[u8]) -> String {
    hex::encode(&blake3::hash(slot).as_bytes()[..8])
}

/// Every slot of a GetKeySlots answer with its id (the `slots` field, or
/// the ids computed for the older `key_slots` field).
fn slots_with_ids(reply: pb::GetKeySlotsReply) -> Vec<pb::KeySlotInfo> {
    if !reply.slots.is_empty() {
        return reply.slots;
    }
    reply
        .key_slots
        .into_iter()
        .map(|slot| pb::KeySlotInfo {
            id: key_slot_id(&slot),
            slot,
            created_unix_ms: 0,
        })
        .collect()
}

/// Which slot `query` (an id or a unique prefix of one) names, refusing
/// what restic's `key remove` refuses: the slot in use and the last slot.
fn slot_to_remove(slots: &[KeySlot], query: &str) -> Result<String> {
    let query_lower = query.trim().to_ascii_lowercase();
    let mut matches: Vec<&KeySlot> = if query_lower.is_empty() {
        Vec::new()
    } else {
        slots
            .iter()
            .filter(|s| s.id.to_ascii_lowercase().starts_with(&query_lower))
            .collect()
    };
    if let Some(exact) = slots
        .iter()
        .find(|s| s.id.to_ascii_lowercase() == query_lower)
    {
        matches = vec![exact];
    }
    let slot = match matches.as_slice() {
        [] => {
            return Err(ClientError::KeySlotNotFound {
                query: query.to_string(),
            });
        }
        [one] => *one,
        many => {
            return Err(ClientError::AmbiguousKeySlot {
                query: query.to_string(),
                matches: many.len(),
            });
        }
    };
    if slot.current {
        return Err(ClientError::KeySlotInUse {
            id: slot.id.clone(),
        });
    }
    if slots.len() <= 1 {
        return Err(ClientError::LastKeySlot {
            id: slot.id.clone(),
        });
    }
    Ok(slot.id.clone())
}

/// A tenant's repository on a cluster, unlocked.
pub struct Repository {
    cluster: Cluster,
    tenant: String,
    key: MasterKey,
    /// Id of the key slot this session was unlocked with (after `passwd`,
    /// the slot that replaced it).
    unlocked_slot: Mutex<Option<String>>,
    region: String,
    warn: WarningSink,
    /// Records already warned about, so a listing repeated by one command
    /// (backup's parent, then restore) warns once.
    warned: Mutex<HashSet<String>>,
    /// Each dataset's compression dictionary (the dictionaries themselves
    /// are loaded into the key, for decoding).
    dataset_dictionaries: Mutex<HashMap<String, Arc<Dictionary>>>,
}

fn log_warning(warning: &CatalogWarning) {
    tracing::warn!(snapshot_id = %warning.snapshot_id, "{}", warning.message);
}

fn id32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| ClientError::integrity(format!("{what}: not a 32-byte id")))
}

/// The catalog record of `snapshot` (format v2): its info sealed with its
/// clear fields as associated data.
fn seal_snapshot(key: &MasterKey, tenant: &str, snapshot: &Snapshot) -> Result<pb::SnapshotRecord> {
    let info = serde_json::to_vec(&snapshot.info)
        .map_err(|e| ClientError::integrity(format!("snapshot info: {e}")))?;
    let fields = SnapshotFields {
        tenant,
        id: &snapshot.id,
        dataset: &snapshot.dataset,
        parent: snapshot.parent.as_ref(),
        time_unix_ms: snapshot.time_unix_ms,
        kind: &snapshot.kind,
        root_tree: &snapshot.root_tree,
        files: snapshot.files,
        bytes: snapshot.bytes,
        bytes_added: snapshot.bytes_added,
        tags: &snapshot.tags,
    };
    Ok(pb::SnapshotRecord {
        id: snapshot.id.to_vec(),
        dataset: snapshot.dataset.clone(),
        parent: snapshot.parent.map(|p| p.to_vec()).unwrap_or_default(),
        time_unix_ms: snapshot.time_unix_ms,
        kind: snapshot.kind.clone(),
        root_tree: snapshot.root_tree.to_vec(),
        sealed_info: key.seal_snapshot_info(&fields, &info),
        files: snapshot.files,
        bytes: snapshot.bytes,
        bytes_added: snapshot.bytes_added,
        tags: snapshot.tags.clone(),
        ..Default::default()
    })
}

/// Opens every record of a catalog listing that opens; the others are
/// skipped with the reason. Pure: no I/O, no warnings sent.
fn open_catalog(key: &MasterKey, tenant: &str, records: Vec<pb::SnapshotRecord>) -> SnapshotList {
    let mut list = SnapshotList::default();
    for record in records {
        let snapshot_id = hex::encode(&record.id);
        match open_snapshot(key, tenant, record) {
            Ok((snapshot, SnapshotAuth::Full)) => list.snapshots.push(snapshot),
            Ok((snapshot, SnapshotAuth::SealedPartOnly)) => {
                list.unauthenticated.push(CatalogWarning {
                    message: format!(
                        "snapshot {snapshot_id} is a format v1 record: its root tree, time and tags are not authenticated; a new backup of dataset {:?} supersedes it",
                        snapshot.dataset
                    ),
                    snapshot_id,
                });
                list.snapshots.push(snapshot);
            }
            Err(e) => list.skipped.push(CatalogWarning {
                message: format!("snapshot record {snapshot_id} skipped: {e}"),
                snapshot_id,
            }),
        }
    }
    list.snapshots.sort_by_key(|s| (s.time_unix_ms, s.id));
    list
}

/// Opens one catalog record: its sealed part must authenticate its clear
/// fields (format v2), or at least its id (format v1).
fn open_snapshot(
    key: &MasterKey,
    tenant: &str,
    record: pb::SnapshotRecord,
) -> Result<(Snapshot, SnapshotAuth)> {
    let id = id32(&record.id, "snapshot id")?;
    let parent = if record.parent.is_empty() {
        None
    } else {
        Some(id32(&record.parent, "parent id")?)
    };
    let root_tree = id32(&record.root_tree, "root tree id")?;
    let fields = SnapshotFields {
        tenant,
        id: &id,
        dataset: &record.dataset,
        parent: parent.as_ref(),
        time_unix_ms: record.time_unix_ms,
        kind: &record.kind,
        root_tree: &root_tree,
        files: record.files,
        bytes: record.bytes,
        bytes_added: record.bytes_added,
        tags: &record.tags,
    };
    let (info_bytes, auth) = key.open_snapshot_info(&fields, &record.sealed_info)?;
    let lock = record.lock.map(crate::lifecycle::LockInfo::from_wire);
    let info: SnapshotInfo = serde_json::from_slice(&info_bytes)
        .map_err(|e| ClientError::integrity(format!("snapshot info: {e}")))?;
    let snapshot = Snapshot {
        id,
        dataset: record.dataset,
        parent,
        time_unix_ms: record.time_unix_ms,
        kind: record.kind,
        root_tree,
        info,
        files: record.files,
        bytes: record.bytes,
        bytes_added: record.bytes_added,
        tags: record.tags,
        committed_unix_ms: record.committed_unix_ms,
        lock,
    };
    Ok((snapshot, auth))
}

/// The tenant's key slots, as stored.
async fn get_key_slots(cluster: &Cluster, tenant: &str) -> Result<pb::GetKeySlotsReply> {
    cluster
        .call("get key", |mut c| {
            let request = pb::GetKeySlotsRequest {
                tenant: tenant.to_string(),
            };
            async move { c.get_key_slots(request).await }
        })
        .await
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
        let slot_id = key_slot_id(&slot);
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
        Ok(Self::unlocked(cluster, tenant, key, Some(slot_id)))
    }

    fn unlocked(cluster: Cluster, tenant: &str, key: MasterKey, slot: Option<String>) -> Self {
        Self {
            cluster,
            tenant: tenant.to_string(),
            key,
            unlocked_slot: Mutex::new(slot),
            region: String::new(),
            warn: Arc::new(log_warning),
            warned: Mutex::new(HashSet::new()),
            dataset_dictionaries: Mutex::new(HashMap::new()),
        }
    }

    /// Unlocks the tenant's key with the passphrase, trying each key slot.
    pub async fn open(cluster: Cluster, tenant: &str, passphrase: &[u8]) -> Result<Self> {
        let slots = slots_with_ids(get_key_slots(&cluster, tenant).await?);
        if slots.is_empty() {
            return Err(ClientError::NotInitialized {
                tenant: tenant.to_string(),
            });
        }
        let mut last_error = ClientError::WrongPassword;
        for info in slots {
            let slot = info.slot;
            let passphrase = Zeroizing::new(passphrase.to_vec());
            // argon2 is deliberately slow: keep it off the async threads.
            let opened = tokio::task::spawn_blocking(move || open_key_slot(&slot, &passphrase))
                .await
                .map_err(|e| ClientError::integrity(format!("key derivation task: {e}")))?;
            match opened {
                Ok(key) => {
                    let repo = Self::unlocked(cluster, tenant, key, Some(info.id));
                    repo.refresh_dictionaries().await?;
                    return Ok(repo);
                }
                Err(crate::seal::SealError::WrongPassword) => {}
                Err(e) => last_error = e.into(),
            }
        }
        Err(last_error)
    }

    /// Loads the tenant's compression dictionaries (again): each is opened
    /// with the key and checked against its id, then serves every decode.
    /// Called on open; call it again when a blob names a dictionary stored
    /// since ([`SealError::UnknownDictionary`]). A node without dictionaries
    /// (an older version) lists none.
    pub async fn refresh_dictionaries(&self) -> Result<()> {
        let tenant = self.tenant.clone();
        let reply = self
            .cluster
            .call("list dictionaries", |mut c| {
                let request = pb::ListDictionariesRequest {
                    tenant: tenant.clone(),
                };
                async move { c.list_dictionaries(request).await }
            })
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(ClientError::Server {
                code: tonic::Code::Unimplemented,
                ..
            }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut by_dataset = HashMap::new();
        for info in reply.dictionaries {
            let opened = id32(&info.id, "dictionary id")
                .and_then(|id| Ok(self.key.open_dictionary(&id, &info.sealed)?));
            match opened {
                Ok(dictionary) => {
                    self.key.add_dictionary(dictionary.clone());
                    by_dataset.insert(info.dataset, dictionary);
                }
                // Blobs naming it fail with an error that names it; the
                // rest of the tenant stays readable.
                Err(e) => tracing::warn!(
                    dataset = %info.dataset,
                    dictionary = %hex::encode(&info.id),
                    error = %e,
                    "compression dictionary skipped"
                ),
            }
        }
        *self
            .dataset_dictionaries
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = by_dataset;
        Ok(())
    }

    /// The dataset's compression dictionary, as last loaded.
    pub(crate) fn dataset_dictionary(&self, dataset: &str) -> Option<Arc<Dictionary>> {
        self.dataset_dictionaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dataset)
            .cloned()
    }

    /// Stores `dictionary` as the dataset's unless it has one already, and
    /// returns the dataset's dictionary to compress with: this one, the one
    /// another client stored first, or `None` (the tenant holds the most
    /// dictionaries allowed, or the cluster predates dictionaries).
    pub(crate) async fn put_dictionary(
        &self,
        dataset: &str,
        dictionary: Arc<Dictionary>,
    ) -> Result<Option<Arc<Dictionary>>> {
        let sealed = self.key.seal_dictionary(&dictionary);
        let request = pb::PutDictionaryRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_string(),
            id: dictionary.id().to_vec(),
            sealed,
        };
        let reply = self
            .cluster
            .call("put dictionary", |mut c| {
                let request = request.clone();
                async move { c.put_dictionary(request).await }
            })
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(ClientError::Server {
                code: tonic::Code::Unimplemented,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if reply.id.is_empty() {
            return Ok(None);
        }
        if reply.id == dictionary.id() {
            self.key.add_dictionary(dictionary.clone());
            self.dataset_dictionaries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(dataset.to_string(), dictionary.clone());
            return Ok(Some(dictionary));
        }
        // Another backup of the dataset stored one first: use that one.
        self.refresh_dictionaries().await?;
        Ok(self
            .dataset_dictionary(dataset)
            .filter(|d| d.id()[..] == reply.id[..]))
    }

    /// Prefer reading shards from this region (the client's own).
    pub fn with_region(mut self, region: &str) -> Self {
        self.region = region.to_string();
        self
    }

    /// Where catalog warnings go (a record skipped, a v1 record); by
    /// default a `tracing` warning. The CLI prints them on stderr.
    pub fn with_warning_sink(mut self, sink: WarningSink) -> Self {
        self.warn = sink;
        self
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub(crate) fn key(&self) -> &MasterKey {
        &self.key
    }

    /// The cluster connection this repository uses.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Id of the key slot that unlocked this session.
    pub fn unlocked_slot(&self) -> Option<String> {
        self.unlocked_slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The tenant's key slots, oldest first, the one in use marked.
    pub async fn key_slots(&self) -> Result<Vec<KeySlot>> {
        let current = self.unlocked_slot();
        let mut slots: Vec<KeySlot> =
            slots_with_ids(get_key_slots(&self.cluster, &self.tenant).await?)
                .into_iter()
                .map(|info| KeySlot {
                    current: current.as_deref() == Some(info.id.as_str()),
                    id: info.id,
                    created_unix_ms: info.created_unix_ms,
                })
                .collect();
        slots.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(slots)
    }

    /// Adds a key slot: `passphrase` then unlocks the same master key.
    /// Returns the new slot's id.
    pub async fn add_key_slot(&self, passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        let key = self.key.clone();
        let passphrase = Zeroizing::new(passphrase.to_vec());
        // argon2 is deliberately slow: keep it off the async threads.
        let slot = tokio::task::spawn_blocking(move || create_key_slot(&key, &passphrase, kdf))
            .await
            .map_err(|e| ClientError::integrity(format!("key derivation task: {e}")))??;
        let reply = self
            .cluster
            .call("add key slot", |mut c| {
                let request = pb::AddKeySlotRequest {
                    tenant: self.tenant.clone(),
                    key_slot: slot.clone(),
                };
                async move { c.add_key_slot(request).await }
            })
            .await?;
        Ok(if reply.id.is_empty() {
            key_slot_id(&slot)
        } else {
            reply.id
        })
    }

    /// Removes the key slot `query` names (an id or a unique prefix); its
    /// passphrase then says "wrong password". The slot that unlocked this
    /// session and the last slot are refused. Returns the removed id.
    pub async fn remove_key_slot(&self, query: &str) -> Result<String> {
        let id = slot_to_remove(&self.key_slots().await?, query)?;
        self.remove_slot_by_id(&id).await?;
        Ok(id)
    }

    async fn remove_slot_by_id(&self, id: &str) -> Result<()> {
        let result = self
            .cluster
            .call("remove key slot", |mut c| {
                let request = pb::RemoveKeySlotRequest {
                    tenant: self.tenant.clone(),
                    id: id.to_string(),
                };
                async move { c.remove_key_slot(request).await }
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(ClientError::Server {
                code: tonic::Code::NotFound,
                ..
            }) => Err(ClientError::KeySlotNotFound {
                query: id.to_string(),
            }),
            Err(ClientError::Server {
                code: tonic::Code::FailedPrecondition,
                ..
            }) => Err(ClientError::LastKeySlot { id: id.to_string() }),
            Err(e) => Err(e),
        }
    }

    /// Changes this session's passphrase: adds a slot for `new_passphrase`,
    /// then removes the slot that unlocked this session (so the old
    /// passphrase stops working). Returns the new slot's id.
    pub async fn change_passphrase(&self, new_passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        let old = self.unlocked_slot();
        let new = self.add_key_slot(new_passphrase, kdf).await?;
        if let Some(old) = old.filter(|old| *old != new) {
            self.remove_slot_by_id(&old).await?;
        }
        *self.unlocked_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(new.clone());
        Ok(new)
    }

    /// Every snapshot (of one dataset, or all), oldest first. Records that
    /// do not open are left out and reported to the warning sink, once each.
    pub async fn snapshots(&self, dataset: Option<&str>) -> Result<Vec<Snapshot>> {
        Ok(self.list_snapshots(dataset).await?.snapshots)
    }

    /// The catalog: the snapshots that open, oldest first, and the records
    /// skipped or not fully authenticated, each also sent once to the
    /// warning sink.
    pub async fn list_snapshots(&self, dataset: Option<&str>) -> Result<SnapshotList> {
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
        let list = open_catalog(&self.key, &self.tenant, reply.snapshots);
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        for warning in list.warnings() {
            if warned.insert(warning.snapshot_id.clone()) {
                (self.warn)(warning);
            }
        }
        Ok(list)
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

    /// Commits a snapshot record with its reference list: after this, it
    /// exists. `gc_epoch` is [`Repository::gc_epoch`] read when the backup
    /// started; `session` closes the backup's upload session. An `Aborted`
    /// answer (blobs it references were collected meanwhile) is returned as
    /// is, not failed over: the caller reruns the backup.
    ///
    /// `retire_segments` (stream compaction) names live segments whose
    /// records the snapshot now holds: they are removed in the same commit,
    /// or, if any is gone already, nothing is committed and the node answers
    /// `FailedPrecondition`, returned as is.
    pub(crate) async fn commit_snapshot(
        &self,
        snapshot: &Snapshot,
        refs: &[pb::RefSegment],
        gc_epoch: u64,
        session: &SessionId,
        retire_segments: &[Vec<u8>],
    ) -> Result<()> {
        let record = seal_snapshot(&self.key, &self.tenant, snapshot)?;
        self.cluster
            .call_answering("commit snapshot", &[tonic::Code::Aborted], |mut c| {
                let request = pb::CommitSnapshotRequest {
                    tenant: self.tenant.clone(),
                    snapshot: Some(record.clone()),
                    refs: refs.to_vec(),
                    gc_epoch,
                    session: session.to_vec(),
                    retire_segments: retire_segments.to_vec(),
                };
                async move { c.commit_snapshot(request).await }
            })
            .await?;
        Ok(())
    }

    /// One page of a stream dataset's live segments (`room`: a room key
    /// from [`crate::stream::record::room_key`], `None` = every room) whose
    /// time span meets `[from_ts_ms, to_ts_ms]`. `page` is the previous
    /// reply's `next_page` (empty: the first page). Linearizable: the node
    /// answers after a read barrier. A whole listing must be checked for a
    /// concurrent compaction (see [`crate::stream::export`]).
    pub async fn list_segments(
        &self,
        dataset: &str,
        room: Option<&[u8; 32]>,
        from_ts_ms: i64,
        to_ts_ms: i64,
        page: &[u8],
    ) -> Result<pb::ListSegmentsReply> {
        self.cluster
            .call("list segments", |mut c| {
                let request = pb::ListSegmentsRequest {
                    tenant: self.tenant.clone(),
                    dataset: dataset.to_string(),
                    room: room.map(|r| r.to_vec()).unwrap_or_default(),
                    from_ts_ms,
                    to_ts_ms,
                    page: page.to_vec(),
                };
                async move { c.list_segments(request).await }
            })
            .await
    }

    /// The cluster's garbage-collection epoch now (a FindBlobs call with no
    /// ids). A backup reads it before its first index look-up and sends it
    /// with its commit, so the cluster can tell whether anything it found in
    /// the index may have been swept since.
    pub async fn gc_epoch(&self) -> Result<u64> {
        let reply = self
            .cluster
            .call("find blobs", |mut c| {
                let request = pb::FindBlobsRequest {
                    tenant: self.tenant.clone(),
                    ids: Vec::new(),
                };
                async move { c.find_blobs(request).await }
            })
            .await?;
        Ok(reply.gc_epoch)
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

    /// Uploads one pack in a backup session; idempotent (a pack is named by
    /// its content). The session keeps the pack's unreferenced blobs from
    /// garbage collection until the backup commits or goes quiet.
    pub(crate) async fn put_pack(
        &self,
        pack: Pack,
        session: &SessionId,
    ) -> Result<pb::PutPackReply> {
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
                    session: session.to_vec(),
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
    /// Each range is a slice of the received reply, not a copy.
    pub(crate) async fn read_ranges(
        &self,
        pack_id: &[u8; 32],
        ranges: &[(u64, u64)],
        exclude_regions: &[String],
    ) -> Result<Vec<prost::bytes::Bytes>> {
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
        let read = if read_data {
            DataRead::All
        } else {
            DataRead::None
        };
        self.check_packs_reading(read).await
    }

    /// Verifies every pack of this tenant, reading the shards `read` says:
    /// none, all, or one slice of the packs (`check --read-data-subset`).
    pub async fn check_packs_reading(&self, read: DataRead) -> Result<pb::CheckPacksReply> {
        let (subset_index, subset_count) = match read {
            DataRead::Subset(s) => (s.index, s.count),
            DataRead::None | DataRead::All => (0, 0),
        };
        self.cluster
            .call("check packs", |mut c| {
                let request = pb::CheckPacksRequest {
                    read_data: read != DataRead::None,
                    tenant: self.tenant.clone(),
                    subset_index,
                    subset_count,
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
                let plain = match self.key.decode_blob(&id, &sealed) {
                    // Stored by another client since this one listed them.
                    Err(SealError::UnknownDictionary { .. }) => {
                        self.refresh_dictionaries().await?;
                        self.key.decode_blob(&id, &sealed)?
                    }
                    other => other?,
                };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, current: bool) -> KeySlot {
        KeySlot {
            id: id.into(),
            created_unix_ms: 0,
            current,
        }
    }

    #[test]
    fn key_remove_refuses_the_slot_in_use_and_the_last_slot() {
        let slots = vec![
            slot("aaaa1111", true),
            slot("bbbb2222", false),
            slot("bbbb3333", false),
        ];
        assert_eq!(
            slot_to_remove(&slots, "bbbb2222").expect("exact id"),
            "bbbb2222"
        );
        assert_eq!(
            slot_to_remove(&slots, "BBBB3").expect("unique prefix"),
            "bbbb3333"
        );
        assert!(matches!(
            slot_to_remove(&slots, "bbbb"),
            Err(ClientError::AmbiguousKeySlot { matches: 2, .. })
        ));
        assert!(matches!(
            slot_to_remove(&slots, "cccc"),
            Err(ClientError::KeySlotNotFound { .. })
        ));
        assert!(matches!(
            slot_to_remove(&slots, ""),
            Err(ClientError::KeySlotNotFound { .. })
        ));
        assert!(matches!(
            slot_to_remove(&slots, "aaaa"),
            Err(ClientError::KeySlotInUse { .. })
        ));
        // Unlocked with a slot whose id this list does not show: the last
        // remaining slot is still refused.
        let only = vec![slot("bbbb2222", false)];
        assert!(matches!(
            slot_to_remove(&only, "bbbb2222"),
            Err(ClientError::LastKeySlot { .. })
        ));
    }

    #[test]
    fn slots_from_an_older_node_get_the_metadata_groups_ids() {
        let key = MasterKey::generate();
        let slot = create_key_slot(&key, b"pw", KdfParams::fast_for_tests()).expect("slot");
        let reply = pb::GetKeySlotsReply {
            key_slots: vec![slot.clone()],
            slots: Vec::new(),
        };
        let listed = slots_with_ids(reply);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, key_slot_id(&slot));
        assert_eq!(listed[0].id.len(), 16);
        let given = pb::KeySlotInfo {
            id: "given".into(),
            slot,
            created_unix_ms: 5,
        };
        let reply = pb::GetKeySlotsReply {
            key_slots: Vec::new(),
            slots: vec![given.clone()],
        };
        assert_eq!(slots_with_ids(reply), vec![given]);
    }

    fn snapshot(id: u8, time_unix_ms: i64, root_tree: u8) -> Snapshot {
        Snapshot {
            id: [id; 32],
            dataset: "chat-messages".into(),
            parent: None,
            time_unix_ms,
            kind: "full".into(),
            root_tree: [root_tree; 32],
            info: SnapshotInfo {
                paths: vec!["/srv/chat".into()],
                hostname: "h".into(),
            },
            files: 3,
            bytes: 300,
            bytes_added: 30,
            tags: vec!["daily".into()],
            committed_unix_ms: 0,
            lock: None,
        }
    }

    fn ids(list: &SnapshotList) -> Vec<u8> {
        list.snapshots.iter().map(|s| s.id[0]).collect()
    }

    fn skipped(list: &SnapshotList) -> Vec<String> {
        list.skipped.iter().map(|w| w.snapshot_id.clone()).collect()
    }

    #[test]
    fn good_records_open_oldest_first() {
        let key = MasterKey::generate();
        let records = vec![
            seal_snapshot(&key, "t", &snapshot(2, 2000, 20)).expect("seals"),
            seal_snapshot(&key, "t", &snapshot(1, 1000, 10)).expect("seals"),
        ];
        let list = open_catalog(&key, "t", records);
        assert_eq!(ids(&list), vec![1, 2]);
        assert!(list.skipped.is_empty() && list.unauthenticated.is_empty());
        assert_eq!(list.snapshots[1].root_tree, [20; 32]);
        assert_eq!(list.snapshots[1].info.paths, vec!["/srv/chat".to_string()]);
    }

    #[test]
    fn one_bad_record_is_skipped_by_name_and_the_rest_listed() {
        let key = MasterKey::generate();
        let old = seal_snapshot(&key, "t", &snapshot(1, 1000, 10)).expect("seals");
        let new = seal_snapshot(&key, "t", &snapshot(2, 2000, 20)).expect("seals");
        let junk = pb::SnapshotRecord {
            id: vec![3; 32],
            sealed_info: b"not sealed at all".to_vec(),
            ..new.clone()
        };
        let short_id = pb::SnapshotRecord {
            id: vec![4; 5],
            ..new.clone()
        };
        // A node swaps the root tree of the newest record...
        let swapped_root = pb::SnapshotRecord {
            root_tree: vec![10; 32],
            ..new.clone()
        };
        // ...re-labels the old record as the newest to roll `latest` back...
        let relabelled = pb::SnapshotRecord {
            time_unix_ms: 9000,
            ..old.clone()
        };
        // ...or moves the old record's sealed part onto a new id.
        let moved = pb::SnapshotRecord {
            id: vec![5; 32],
            time_unix_ms: 9500,
            ..old.clone()
        };
        let undecodable_info =
            seal_snapshot(&key, "other-tenant", &snapshot(6, 500, 10)).expect("seals");
        let list = open_catalog(
            &key,
            "t",
            vec![
                junk,
                old.clone(),
                short_id,
                swapped_root,
                relabelled,
                moved,
                undecodable_info,
                new,
            ],
        );
        assert_eq!(ids(&list), vec![1, 2], "only the genuine records open");
        assert_eq!(
            skipped(&list),
            vec![
                hex::encode([3; 32]),
                hex::encode([4; 5]),
                hex::encode([2; 32]),
                hex::encode([1; 32]),
                hex::encode([5; 32]),
                hex::encode([6; 32]),
            ]
        );
        for warning in &list.skipped {
            assert!(
                warning.message.starts_with(&format!(
                    "snapshot record {} skipped: ",
                    warning.snapshot_id
                )),
                "{}",
                warning.message
            );
        }
        assert_eq!(list.snapshots.last().map(|s| s.root_tree), Some([20; 32]));
    }

    #[test]
    fn v1_records_open_with_a_warning_that_names_them() {
        let key = MasterKey::generate();
        let s = snapshot(7, 1000, 10);
        let info = serde_json::to_vec(&s.info).expect("json");
        let v1 = pb::SnapshotRecord {
            sealed_info: key.seal(&info, &s.id),
            ..seal_snapshot(&key, "t", &s).expect("seals")
        };
        let list = open_catalog(&key, "t", vec![v1]);
        assert_eq!(ids(&list), vec![7]);
        assert!(list.skipped.is_empty());
        assert_eq!(list.unauthenticated.len(), 1);
        let warning = &list.unauthenticated[0];
        assert_eq!(warning.snapshot_id, hex::encode([7; 32]));
        assert!(
            warning.message.contains("not authenticated"),
            "{}",
            warning.message
        );
    }
}
