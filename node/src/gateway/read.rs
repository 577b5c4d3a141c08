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
use crate::erasure::{Code, decode_pack};
use crate::meta::types::{Id32, NodeId, PackRecord, ShardPlacement};
use crate::placement::{read_order, region_loss_fatal};
use crate::shard_io::{Members, verify_shard};

/// Most bytes one ReadPack may return.
const READ_BYTES_MAX: u64 = cairn_proto::READ_PACK_BYTES_MAX as u64;

/// A data shard slower than this gets a spare read started beside it.
const HEDGE_AFTER: std::time::Duration = std::time::Duration::from_millis(800);

/// Why a shard read failed, and whether the stored shard itself is bad
/// (corrupt, misfiled, missing, not matching the index) rather than its
/// node merely unreachable: bad shards are reported to repair at once.
#[derive(Debug, Clone)]
pub(super) struct ShardFailure {
    reason: String,
    shard_fault: bool,
}

/// A shard payload that passed every check, or why it did not.
type ShardResult = Result<Vec<u8>, ShardFailure>;

fn fault_of(
    pack: &PackRecord,
    placement: &ShardPlacement,
    failure: &ShardFailure,
) -> pb::ShardFault {
    pb::ShardFault {
        pack_id: pack.id.to_vec(),
        index: placement.index,
        node_id: placement.node,
        fault: failure.reason.clone(),
    }
}

/// The data shards (indices) holding the bytes of `ranges` (offset,
/// length) of a pack cut into data shards of `shard_len` bytes.
pub fn covering_data_shards(shard_len: u64, ranges: &[(u64, u64)]) -> BTreeSet<u32> {
    let shard_len = shard_len.max(1);
    let mut wanted = BTreeSet::new();
    for &(offset, length) in ranges.iter().filter(|r| r.1 > 0) {
        let first = offset / shard_len;
        let last = (offset + length - 1) / shard_len;
        wanted.extend((first..=last).map(|i| i as u32));
    }
    wanted
}

/// Bytes `offset..offset+length` of the pack, copied out of its data shard
/// payloads; `None` if a covering shard is absent or too short.
pub fn copy_range(
    shards: &BTreeMap<u32, Vec<u8>>,
    shard_len: u64,
    offset: u64,
    length: u64,
) -> Option<Vec<u8>> {
    let shard_len = shard_len.max(1);
    let mut out = Vec::with_capacity(length as usize);
    let mut pos = offset;
    let end = offset.checked_add(length)?;
    while pos < end {
        let index = u32::try_from(pos / shard_len).ok()?;
        let within = (pos % shard_len) as usize;
        let take = ((end - pos) as usize).min(shard_len as usize - within);
        out.extend_from_slice(shards.get(&index)?.get(within..within + take)?);
        pos += take as u64;
    }
    Some(out)
}

impl Gateway {
    /// `tenant`: the caller's tenant when its token is bound to one; the
    /// pack must then be that tenant's.
    pub(super) async fn read_pack_inner(
        &self,
        req: pb::ReadPackRequest,
        tenant: Option<&str>,
    ) -> Result<pb::ReadPackReply, GatewayError> {
        let pack_id = id32(&req.pack_id, "pack id")?;
        let pack = self.pack_record(&pack_id).await?;
        if tenant.is_some_and(|t| t != pack.tenant) {
            return Err(crate::auth::permission::Denied(format!(
                "pack {} is not one of this token's tenant",
                hex::encode(pack_id)
            ))
            .into());
        }
        if req.ranges.len() > cairn_proto::READ_RANGES_MAX {
            return Err(invalid(format!(
                "{} ranges in one read, at most {}",
                req.ranges.len(),
                cairn_proto::READ_RANGES_MAX
            )));
        }
        let mut total = 0u64;
        for range in &req.ranges {
            let end = range.offset.checked_add(range.length);
            if end.is_none_or(|end| end > pack.pack_len) {
                return Err(invalid("range outside the pack"));
            }
            total = total.saturating_add(range.length);
        }
        if total > READ_BYTES_MAX {
            return Err(invalid(format!(
                "{total} bytes requested, at most {READ_BYTES_MAX} per read"
            )));
        }
        // The shards read (k of them when reconstructing: the whole pack),
        // the answer and its encoding: reserved before a byte is fetched.
        let _reserved = self
            .budget
            .gateway
            .reserve(
                usize::try_from(pack.pack_len.saturating_add(total.saturating_mul(2)))
                    .unwrap_or(usize::MAX),
            )
            .await
            .map_err(|status| GatewayError::Busy {
                what: status.message().to_string(),
            })?;
        let preferred = if req.preferred_region.is_empty() {
            self.region.clone()
        } else {
            req.preferred_region.clone()
        };
        let members = self.members();
        let order = self.shard_order(&pack, &members, &preferred, &req.exclude_regions);

        // The data shards covering the ranges.
        let shard_len = pack.shard_len.max(1);
        let ranges: Vec<(u64, u64)> = req.ranges.iter().map(|r| (r.offset, r.length)).collect();
        let wanted = covering_data_shards(shard_len, &ranges);
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
        let mut faults = Vec::new();
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
                    Some((placement, Ok(payload))) => {
                        good.insert(placement.index, payload);
                    }
                    Some((placement, Err(failure))) => {
                        if failure.shard_fault {
                            faults.push(fault_of(&pack, &placement, &failure));
                        }
                        failures.push(failure.reason);
                        reconstruct = true;
                    }
                    None => {}
                },
                _ = &mut hedge, if !reconstruct => reconstruct = true,
            }
        }
        drop(in_flight);
        // Every bad shard this read met goes to repair now, not at the next scrub.
        if !faults.is_empty() {
            let count = faults.len();
            match self.report_to_leader(faults).await {
                Ok(()) => {
                    warn!(pack_id = %hex::encode(pack_id), count, "read met bad shards; reported, repair scheduled")
                }
                Err(error) => warn!(pack_id = %hex::encode(pack_id), %error,
                    "read met bad shards but could not report them; scrub will find them"),
            }
        }
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
                .map(|r| {
                    prost::bytes::Bytes::copy_from_slice(
                        &whole[r.offset as usize..(r.offset + r.length) as usize],
                    )
                })
                .collect();
            return Ok(pb::ReadPackReply {
                ranges,
                shards_repaired_around: repaired_around,
            });
        }

        let mut out = Vec::with_capacity(ranges.len());
        for &(offset, length) in &ranges {
            out.push(copy_range(&good, shard_len, offset, length).ok_or_else(|| {
                GatewayError::Unrecoverable {
                    pack: hex::encode(pack_id),
                    good: good.len(),
                    needed: k,
                    failures: "a data shard is shorter than the index records".into(),
                }
            })?);
        }
        let ranges = out.into_iter().map(prost::bytes::Bytes::from).collect();
        Ok(pb::ReadPackReply {
            ranges,
            shards_repaired_around: repaired_around,
        })
    }

    /// Byte ranges `(offset, length)` of a pack through the normal read
    /// path (covering shards, checksums, reconstruction), split into reads
    /// within the per-read limits. For the node's own work (reference
    /// lists, repacking): no tenant scope.
    pub(crate) async fn read_pack_ranges(
        &self,
        pack_id: &Id32,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, GatewayError> {
        let mut out = Vec::with_capacity(ranges.len());
        let mut batch: Vec<pb::ByteRange> = Vec::new();
        let mut bytes = 0u64;
        for (i, &(offset, length)) in ranges.iter().enumerate() {
            batch.push(pb::ByteRange { offset, length });
            bytes += length;
            let next = ranges.get(i + 1).map_or(0, |r| r.1);
            let full = batch.len() >= cairn_proto::READ_RANGES_MAX
                || bytes + next > READ_BYTES_MAX
                || i + 1 == ranges.len();
            if full {
                let req = pb::ReadPackRequest {
                    pack_id: pack_id.to_vec(),
                    ranges: std::mem::take(&mut batch),
                    ..Default::default()
                };
                let reply = self.read_pack_inner(req, None).await?;
                out.extend(reply.ranges.into_iter().map(Vec::from));
                bytes = 0;
            }
        }
        Ok(out)
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
        members: &Members,
        preferred_region: &str,
        excluded: &[String],
    ) -> Vec<ShardPlacement> {
        let nodes: BTreeMap<NodeId, (String, bool)> = members
            .iter()
            .map(|(id, view)| (*id, (view.region.clone(), self.io.presumed_up(*id))))
            .collect();
        read_order(&pack.shards, &nodes, preferred_region, excluded)
    }

    /// [`Gateway::fetch_verified`], tagged with the shard's placement.
    async fn fetch_tagged(
        &self,
        pack: &PackRecord,
        placement: &ShardPlacement,
        members: &Members,
    ) -> (ShardPlacement, ShardResult) {
        (
            placement.clone(),
            self.fetch_verified(pack, placement, members).await,
        )
    }

    /// Fetches one shard and checks header, payload checksum and the
    /// checksum the index recorded for it.
    pub(super) async fn fetch_verified(
        &self,
        pack: &PackRecord,
        placement: &ShardPlacement,
        members: &Members,
    ) -> ShardResult {
        let started = std::time::Instant::now();
        let fetched = self
            .io
            .get(placement.node, &pack.id, placement.index, members)
            .await;
        // Labelled by the tier of the node read: a cold read shows in metrics.
        let class = members
            .get(&placement.node)
            .map(|view| view.storage_class)
            .unwrap_or_default();
        self.tiering().observe_shard_read(class, started.elapsed());
        let file = fetched.map_err(|e| ShardFailure {
            shard_fault: e.kind().is_shard_fault(),
            reason: e.to_string(),
        })?;
        verify_shard(pack, placement, &file).map_err(|reason| ShardFailure {
            reason,
            shard_fault: true,
        })
    }

    pub(super) async fn check_packs_inner(
        &self,
        req: pb::CheckPacksRequest,
    ) -> Result<pb::CheckPacksReply, GatewayError> {
        let slice = super::check::Slice::from_request(req.subset_index, req.subset_count)?;
        self.catch_up().await;
        let members = self.members();
        let mut reply = pb::CheckPacksReply {
            subset_index: req.subset_index,
            subset_count: req.subset_count,
            ..Default::default()
        };
        let mut faults = Vec::new();
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
            // A region loss would leave fewer than k shards: a problem of
            // its own (misplaced, awaiting rebalance), even if all are good.
            let region_of = |n: NodeId| members.get(&n).map(|view| view.region.as_str());
            let code = Code {
                data: pack.data_shards,
                parity: pack.parity_shards,
            };
            if region_loss_fatal(code, pack.shards.iter().map(|s| s.node), region_of) {
                reply.misplaced.push(pack.id.to_vec());
            }
            let mut good = 0usize;
            if req.read_data && slice.is_none_or(|s| s.holds(&pack.id)) {
                reply.packs_read += 1;
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
                        Err(failure) => {
                            if failure.shard_fault {
                                faults.push(fault_of(&pack, placement, &failure));
                            }
                            reply.problems.push(pb::CheckProblem {
                                node_id: placement.node,
                                pack_id: pack.id.to_vec(),
                                shard_index: placement.index,
                                fault: failure.reason,
                            })
                        }
                    }
                }
            } else {
                good = pack.shards.len();
            }
            if good < pack.data_shards as usize {
                reply.unrecoverable.push(pack.id.to_vec());
            }
        }
        // What this check found bad goes to repair now, so `check --repair`
        // (and the worker) rebuild it without waiting for a scrub.
        reply.faults_reported = faults.len() as u64;
        if let Err(error) = self.report_to_leader(faults).await {
            warn!(%error, "check found bad shards but could not report them; the next check or scrub will");
            reply.faults_reported = 0;
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any range of a pack copied out of the data shards that cover it
        /// equals the same bytes of the pack, and needs no other shard.
        #[test]
        fn ranges_come_from_exactly_their_covering_shards(
            pack in prop::collection::vec(any::<u8>(), 1..400),
            k in 1u64..6,
            a in 0usize..400,
            b in 0usize..400,
        ) {
            let shard_len = (pack.len() as u64).div_ceil(k);
            let (lo, hi) = (a.min(b) % pack.len(), (a.max(b) % pack.len()).max(a.min(b) % pack.len()));
            let (offset, length) = (lo as u64, (hi - lo) as u64);
            let wanted = covering_data_shards(shard_len, &[(offset, length)]);
            let mut shards = BTreeMap::new();
            for (i, chunk) in pack.chunks(shard_len as usize).enumerate() {
                if wanted.contains(&(i as u32)) {
                    let mut payload = chunk.to_vec();
                    payload.resize(shard_len as usize, 0);
                    shards.insert(i as u32, payload);
                }
            }
            prop_assert!(wanted.iter().all(|i| u64::from(*i) < k));
            let copied = copy_range(&shards, shard_len, offset, length);
            prop_assert_eq!(copied.as_deref(), Some(&pack[lo..hi]));
            if length > 0 {
                for index in &wanted {
                    let mut without = shards.clone();
                    without.remove(index);
                    prop_assert!(copy_range(&without, shard_len, offset, length).is_none());
                }
            } else {
                prop_assert!(wanted.is_empty());
            }
        }
    }
}
