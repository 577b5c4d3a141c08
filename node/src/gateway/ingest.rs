//! Pack ingest: verify, erasure-code, place, write shards in parallel, index.
//!
//! A pack is acknowledged only when at least k+1 of its shards are durable on
//! distinct nodes and its placement and blob index are committed through
//! Raft. Shards that could not be written where planned are re-placed on
//! other live nodes; the pack is then marked for rebalancing.

use std::collections::{BTreeMap, BTreeSet};

use cairn_proto::v1 as pb;
use futures::future::join_all;
use tracing::{debug, warn};

use super::{Gateway, GatewayError, id32, invalid};
use crate::erasure::encode_pack_files;
use crate::meta::types::{
    BlobIndex, BlobLocation, Command, Id32, NodeId, PackRecord, ShardPlacement,
};
use crate::placement::{Candidate, ack_allowed, complete, fully_protected};

/// Rounds of re-placement for shards whose node failed.
const PLACEMENT_ROUNDS_MAX: usize = 3;

/// A client's pack checked before any work is done on it: sizes first, then
/// its id against the blake3 of its bytes, then every blob entry inside it.
/// Returns the id and the blob index to commit with it (`PutPack` and each
/// `AppendStream` batch).
pub(super) fn check_pack(
    pack_id: &[u8],
    data: &[u8],
    entries: &[pb::BlobEntry],
) -> Result<(Id32, Vec<(Id32, BlobLocation)>), GatewayError> {
    let pack_id = id32(pack_id, "pack id")?;
    if data.is_empty() {
        return Err(invalid("empty pack"));
    }
    if data.len() > cairn_proto::PACK_BYTES_MAX {
        return Err(invalid(format!(
            "pack of {} bytes, at most {}",
            data.len(),
            cairn_proto::PACK_BYTES_MAX
        )));
    }
    // The blob list becomes one Raft entry: capped so that no entry exceeds
    // what a follower accepts in one append.
    if entries.len() > cairn_proto::BLOBS_PER_PACK_MAX {
        return Err(invalid(format!(
            "{} blobs in one pack, at most {}",
            entries.len(),
            cairn_proto::BLOBS_PER_PACK_MAX
        )));
    }
    if *blake3::hash(data).as_bytes() != pack_id {
        return Err(invalid("pack id is not the blake3 hash of the pack bytes"));
    }
    let mut blobs = Vec::with_capacity(entries.len());
    for blob in entries {
        let end = blob.offset.checked_add(u64::from(blob.length));
        if blob.length == 0 || end.is_none_or(|end| end > data.len() as u64) {
            return Err(invalid("blob entry outside the pack"));
        }
        blobs.push((
            id32(&blob.id, "blob id")?,
            BlobLocation {
                pack_id,
                offset: blob.offset,
                length: blob.length,
            },
        ));
    }
    Ok((pack_id, blobs))
}

impl Gateway {
    pub(super) async fn put_pack_inner(
        &self,
        req: pb::PutPackRequest,
    ) -> Result<pb::PutPackReply, GatewayError> {
        super::check_name(&req.tenant, "tenant")?;
        let (pack_id, blobs) = check_pack(&req.pack_id, &req.data, &req.blobs)?;
        let session = super::catalog::session_from_wire(&req.session)?;
        if self.meta.pack(&pack_id)?.is_some() {
            return Ok(pb::PutPackReply {
                shards_written: 0,
                degraded: false,
                existed: true,
            });
        }

        let record = self.store_pack(&req.tenant, pack_id, req.data).await?;
        let degraded = record.needs_rebalance;
        let shards_written = record.shards.len() as u32;
        // Leader-stamped: the pack's life records its creation in cluster time.
        self.meta
            .write(Command::Timed {
                at: 0,
                cmd: Box::new(Command::AddPackIndexed {
                    index: BlobIndex::new(&blobs),
                    pack: record,
                    session,
                }),
            })
            .await?;
        debug!(pack_id = %hex::encode(pack_id), shards = shards_written, degraded, "pack stored");
        Ok(pb::PutPackReply {
            shards_written,
            degraded,
            existed: false,
        })
    }

    /// Encodes `data` (whose blake3 is `pack_id`), places its shards and
    /// writes them in parallel, re-placing around failed nodes; returns the
    /// record to commit once at least k+1 shards are durable. Nothing is
    /// committed here: client uploads and repacking commit it their own
    /// way. On failure the shards written are deleted again.
    pub(crate) async fn store_pack(
        &self,
        tenant: &str,
        pack_id: Id32,
        data: prost::bytes::Bytes,
    ) -> Result<PackRecord, GatewayError> {
        let _permit = self
            .pack_permits
            .acquire()
            .await
            .map_err(|_| GatewayError::Busy {
                what: "the node is shutting down".into(),
            })?;
        let code = self.config.code;
        let shards = tokio::task::spawn_blocking(move || encode_pack_files(code, pack_id, &data))
            .await
            .map_err(|e| GatewayError::Busy {
                what: format!(
                    "erasure encoding of pack {} did not complete: {e}",
                    hex::encode(pack_id)
                ),
            })?;
        let shard_len = shards
            .first()
            .map(|s| s.header.shard_len)
            .unwrap_or_default();
        let pack_len = shards
            .first()
            .map(|s| s.header.pack_len)
            .unwrap_or_default();

        let members = self.members();
        let mut durable: BTreeMap<u32, ShardPlacement> = BTreeMap::new();
        let mut failed_nodes: BTreeSet<NodeId> = BTreeSet::new();
        let mut failures = Vec::new();
        for _round in 0..PLACEMENT_ROUNDS_MAX {
            let candidates: Vec<Candidate> = members
                .iter()
                .map(|(id, view)| Candidate {
                    node: *id,
                    region: view.region.clone(),
                    up: durable.values().any(|p| p.node == *id)
                        || (!failed_nodes.contains(id)
                            && self.io.presumed_up(*id)
                            && !self.repairer.is_draining(*id)),
                    class: view.storage_class,
                })
                .collect();
            // Shards already durable stay where they are; only the rest is placed.
            let keep: Vec<(u32, NodeId)> = durable.values().map(|p| (p.index, p.node)).collect();
            let plan = complete(code, &pack_id, &candidates, &keep)?;
            let writes = plan
                .shards
                .iter()
                .filter(|(index, _)| !durable.contains_key(index))
                .map(|&(index, node)| {
                    let shard = &shards[index as usize];
                    // A shared handle on the encoded file: no copy per write or retry.
                    let file = shard.bytes.clone();
                    let checksum = shard.header.checksum;
                    let members = &members;
                    async move {
                        let result = self.io.put(node, file, members).await;
                        (index, node, checksum, result)
                    }
                })
                .collect::<Vec<_>>();
            if writes.is_empty() {
                break;
            }
            for (index, node, checksum, result) in join_all(writes).await {
                match result {
                    Ok(()) => {
                        durable.insert(
                            index,
                            ShardPlacement {
                                index,
                                node,
                                checksum,
                            },
                        );
                    }
                    Err(error) => {
                        warn!(pack_id = %hex::encode(pack_id), shard_idx = index, node_id = node, %error,
                            "shard write failed, placing it on another node");
                        failed_nodes.insert(node);
                        failures.push(error.to_string());
                    }
                }
            }
            if durable.len() == shards.len() {
                break;
            }
        }

        // Acknowledge only k+1 durable shards or more, none of them doubled
        // up beyond m on a node: any one node may still fail afterwards.
        let needed = code.data as usize + 1;
        let durable_at: Vec<(u32, NodeId)> = durable.values().map(|p| (p.index, p.node)).collect();
        if !ack_allowed(code, &durable_at) {
            // Nothing is acknowledged: what did get written is removed now
            // (the orphan sweep catches whatever this misses).
            for &(index, node) in &durable_at {
                if let Err(error) = self.io.delete(node, &pack_id, index, &members).await {
                    debug!(pack_id = %hex::encode(pack_id), shard_idx = index, node_id = node, %error,
                        "shard of a refused pack not deleted; the orphan sweep removes it");
                }
            }
            return Err(GatewayError::TooFewShards {
                pack: hex::encode(pack_id),
                durable: durable.len(),
                needed,
                failures: failures.join("; "),
            });
        }
        let placement: Vec<ShardPlacement> = durable.into_values().collect();
        let at: Vec<(u32, NodeId)> = placement.iter().map(|p| (p.index, p.node)).collect();
        let degraded = !fully_protected(
            code,
            &at,
            |n| members.get(&n).map(|view| view.region.as_str()),
            members.len(),
        );
        let record = PackRecord {
            id: pack_id,
            tenant: tenant.to_string(),
            data_shards: code.data,
            parity_shards: code.parity,
            pack_len,
            shard_len,
            shards: placement,
            needs_rebalance: degraded,
        };
        Ok(record)
    }
}
