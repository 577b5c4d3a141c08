//! Pack reads and verification.
//!
//! Reads fetch the data shards that cover the requested ranges, each checked
//! against the checksum recorded in the index; where a shard is missing,
//! unreachable or corrupt, the gateway reconstructs from any k good shards,
//! trying the reader's region first. Wrong bytes are never returned.

use std::collections::{BTreeMap, BTreeSet};

use cairn_proto::v1 as pb;
use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use tracing::warn;

use super::{Gateway, GatewayError, id32, invalid};
use crate::erasure::{Code, decode_pack, parse_shard_file};
use crate::meta::types::{Id32, NodeId, NodeInfo, PackRecord, ShardPlacement};
use crate::placement::read_order;

/// Most bytes one ReadPack may return.
const READ_BYTES_MAX: u64 = cairn_proto::MAX_MESSAGE_BYTES as u64 - 1024 * 1024;

/// A data shard slower than this gets a spare read started beside it.
const HEDGE_AFTER: std::time::Duration = std::time::Duration::from_millis(800);

/// A shard payload that passed every check, or why it did not.
type ShardResult = Result<Vec<u8>, String>;

impl Gateway {
    pub(super) async fn read_pack_inner(
        &self,
        req: pb::ReadPackRequest,
    ) -> Result<pb::ReadPackReply, GatewayError> {
        let pack_id = id32(&req.pack_id, "pack id")?;
        let pack = self.pack_record(&pack_id).await?;
        let _permit = self
            .read_permits
            .acquire()
            .await
            .expect("the read semaphore is never closed");
        let mut total = 0u64;
        for range in &req.ranges {
            let end = range.offset.checked_add(range.length);
            if end.is_none_or(|end| end > pack.pack_len) {
                return Err(invalid("range outside the pack"));
            }
            total += range.length;
        }
        if total > READ_BYTES_MAX {
            return Err(invalid(format!(
                "{total} bytes requested, at most {READ_BYTES_MAX} per request"
            )));
        }
        let preferred = if req.preferred_region.is_empty() {
            self.region.clone()
        } else {
            req.preferred_region.clone()
        };
        let members = self.members();
        let order = self.shard_order(&pack, &members, &preferred, &req.exclude_regions);

        // The data shards covering the ranges.
        let shard_len = pack.shard_len.max(1);
        let mut wanted: BTreeSet<u32> = BTreeSet::new();
        for range in req.ranges.iter().filter(|r| r.length > 0) {
            let first = range.offset / shard_len;
            let last = (range.offset + range.length - 1) / shard_len;
            wanted.extend((first..=last).map(|i| i as u32));
        }
        // Fetch the covering data shards; when one fails or is slow (a
        // straggler), start spares from the read order, so the read
        // completes with whichever k shards answer first.
        let k = pack.data_shards as usize;
        let mut spares = order.iter().filter(|p| !wanted.contains(&p.index));
        let mut in_flight = FuturesUnordered::new();
        for placement in order.iter().filter(|p| wanted.contains(&p.index)) {
            in_flight.push(self.fetch_tagged(&pack, placement, &members));
        }
        let mut good: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut failures = Vec::new();
        let hedge = tokio::time::sleep(HEDGE_AFTER);
        tokio::pin!(hedge);
        // Set once a wanted shard failed or straggled: from then on keep
        // enough reads in flight to reach k shards and decode.
        // A wanted shard with no readable copy in the read order (its region
        // excluded, its node unknown) means decoding from the start.
        let mut reconstruct = !wanted.iter().all(|i| order.iter().any(|p| p.index == *i));
        loop {
            let have_wanted = wanted.iter().all(|i| good.contains_key(i));
            if have_wanted || good.len() >= k {
                break;
            }
            if in_flight.is_empty() {
                reconstruct = true;
            }
            if reconstruct {
                let short = k.saturating_sub(good.len() + in_flight.len());
                for spare in spares.by_ref().take(short) {
                    in_flight.push(self.fetch_tagged(&pack, spare, &members));
                }
            }
            if in_flight.is_empty() {
                break;
            }
            tokio::select! {
                next = in_flight.next() => match next {
                    Some((index, Ok(payload))) => {
                        good.insert(index, payload);
                    }
                    Some((_, Err(reason))) => {
                        failures.push(reason);
                        reconstruct = true;
                    }
                    None => {}
                },
                _ = &mut hedge, if !reconstruct => reconstruct = true,
            }
        }
        drop(in_flight);
        let mut repaired_around = 0u32;
        if !wanted.iter().all(|i| good.contains_key(i)) {
            repaired_around = wanted.iter().filter(|i| !good.contains_key(i)).count() as u32;
            warn!(pack_id = %hex::encode(pack_id), missing = repaired_around,
                "data shards unavailable or slow, reconstructing from parity");
            if good.len() < k {
                return Err(GatewayError::Unrecoverable {
                    pack: hex::encode(pack_id),
                    good: good.len(),
                    needed: k,
                    failures: failures.join("; "),
                });
            }
            let code = Code {
                data: pack.data_shards,
                parity: pack.parity_shards,
            };
            let total_shards = (pack.data_shards + pack.parity_shards) as usize;
            let mut slots: Vec<Option<Vec<u8>>> = vec![None; total_shards];
            for (index, payload) in std::mem::take(&mut good) {
                if let Some(slot) = slots.get_mut(index as usize) {
                    *slot = Some(payload);
                }
            }
            let (pack_len, shard_len) = (pack.pack_len, pack.shard_len);
            let whole =
                tokio::task::spawn_blocking(move || decode_pack(code, pack_len, shard_len, slots))
                    .await
                    .expect("erasure decoding does not panic")
                    .map_err(|e| GatewayError::Unrecoverable {
                        pack: hex::encode(pack_id),
                        good: k,
                        needed: k,
                        failures: e.to_string(),
                    })?;
            let ranges = req
                .ranges
                .iter()
                .map(|r| whole[r.offset as usize..(r.offset + r.length) as usize].to_vec())
                .collect();
            return Ok(pb::ReadPackReply {
                ranges,
                shards_repaired_around: repaired_around,
            });
        }

        let ranges = req
            .ranges
            .iter()
            .map(|r| {
                let mut out = Vec::with_capacity(r.length as usize);
                let mut pos = r.offset;
                let end = r.offset + r.length;
                while pos < end {
                    let index = (pos / shard_len) as u32;
                    let within = (pos % shard_len) as usize;
                    let take = ((end - pos) as usize).min(shard_len as usize - within);
                    let shard = good.get(&index).expect("every wanted shard was fetched");
                    out.extend_from_slice(&shard[within..within + take]);
                    pos += take as u64;
                }
                out
            })
            .collect();
        Ok(pb::ReadPackReply {
            ranges,
            shards_repaired_around: repaired_around,
        })
    }

    /// The pack's record, catching up with the leader once if this node lags.
    async fn pack_record(&self, pack_id: &Id32) -> Result<PackRecord, GatewayError> {
        if let Some(pack) = self.meta.pack(pack_id)? {
            return Ok(pack);
        }
        self.catch_up().await;
        self.meta
            .pack(pack_id)?
            .ok_or_else(|| GatewayError::NotFound {
                what: format!("pack {}", hex::encode(pack_id)),
            })
    }

    fn shard_order(
        &self,
        pack: &PackRecord,
        members: &BTreeMap<NodeId, (NodeInfo, bool)>,
        preferred_region: &str,
        excluded: &[String],
    ) -> Vec<ShardPlacement> {
        let nodes: BTreeMap<NodeId, (String, bool)> = members
            .iter()
            .map(|(id, (info, _))| (*id, (info.region.clone(), self.peers.presumed_up(*id))))
            .collect();
        read_order(&pack.shards, &nodes, preferred_region, excluded)
    }

    /// [`Gateway::fetch_verified`], tagged with the shard index.
    async fn fetch_tagged(
        &self,
        pack: &PackRecord,
        placement: &ShardPlacement,
        members: &BTreeMap<NodeId, (NodeInfo, bool)>,
    ) -> (u32, ShardResult) {
        (
            placement.index,
            self.fetch_verified(pack, placement, members).await,
        )
    }

    /// Fetches one shard and checks header, payload checksum and the
    /// checksum the index recorded for it.
    pub(super) async fn fetch_verified(
        &self,
        pack: &PackRecord,
        placement: &ShardPlacement,
        members: &BTreeMap<NodeId, (NodeInfo, bool)>,
    ) -> ShardResult {
        let file = self
            .fetch_shard(placement.node, &pack.id, placement.index, members)
            .await?;
        verify_shard(pack, placement, &file)
    }

    pub(super) async fn check_packs_inner(
        &self,
        req: pb::CheckPacksRequest,
    ) -> Result<pb::CheckPacksReply, GatewayError> {
        self.catch_up().await;
        let members = self.members();
        let mut reply = pb::CheckPacksReply::default();
        for pack in self.meta.packs()? {
            if !req.tenant.is_empty() && pack.tenant != req.tenant {
                continue;
            }
            reply.packs_checked += 1;
            let expected = (pack.data_shards + pack.parity_shards) as usize;
            let present: BTreeSet<u32> = pack.shards.iter().map(|p| p.index).collect();
            for index in 0..expected as u32 {
                if !present.contains(&index) {
                    reply.problems.push(pb::CheckProblem {
                        node_id: 0,
                        pack_id: pack.id.to_vec(),
                        shard_index: index,
                        fault: "no node holds this shard (pack written while nodes were down)"
                            .into(),
                    });
                }
            }
            let mut good = 0usize;
            if req.read_data {
                let results = join_all(
                    pack.shards
                        .iter()
                        .map(|p| self.fetch_verified(&pack, p, &members)),
                )
                .await;
                for (placement, result) in pack.shards.iter().zip(results) {
                    reply.shards_checked += 1;
                    match result {
                        Ok(_) => good += 1,
                        Err(fault) => reply.problems.push(pb::CheckProblem {
                            node_id: placement.node,
                            pack_id: pack.id.to_vec(),
                            shard_index: placement.index,
                            fault,
                        }),
                    }
                }
            } else {
                good = pack.shards.len();
            }
            if good < pack.data_shards as usize {
                reply.unrecoverable.push(pack.id.to_vec());
            }
        }
        Ok(reply)
    }
}

/// The pair of checks on a shard read back: its own header and checksum,
/// then agreement with what the index recorded when it was written.
fn verify_shard(pack: &PackRecord, placement: &ShardPlacement, file: &[u8]) -> ShardResult {
    let (header, payload) = parse_shard_file(file)
        .map_err(|e| format!("node {}: shard {}: {e}", placement.node, placement.index))?;
    if header.pack_id != pack.id
        || header.index != placement.index
        || header.checksum != placement.checksum
        || header.shard_len != pack.shard_len
    {
        return Err(format!(
            "node {}: shard {} does not match the index (wrong pack, index or checksum)",
            placement.node, placement.index
        ));
    }
    Ok(payload.to_vec())
}
