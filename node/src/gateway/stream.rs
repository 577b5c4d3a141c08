//! Live record streams: `AppendStream` (one bidirectional call per writer)
//! and `ListSegments`.
//!
//! A batch is checked before any work, stored exactly like a `PutPack`
//! (erasure coded, placed, at least k+1 durable shards) and committed with
//! its segments in one Raft entry that deduplicates by sequence number.
//! Batches of one call are handled one at a time, in order, each answered
//! before the next is read: with HTTP/2's windows, that is the flow
//! control (a slow cluster slows its writers, nothing queues here). Each
//! message's bytes are reserved in the gateway pool from its length prefix
//! until it is answered (`limits::CheckedFrames`).
//! Nodes never see room names or record text: segments arrive as sealed
//! blobs named by keyed room hashes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use cairn_proto::v1 as pb;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::debug;

use super::{Gateway, GatewayError, check_name, id32, invalid};
use crate::meta::types::{
    BlobLocation, Command, CommandResult, Id32, SegmentId, SegmentRecord, StreamSegment,
};

/// Most segments (rooms) in one batch.
pub const SEGMENTS_PER_BATCH_MAX: usize = 4096;
/// Most segments in one `ListSegments` page.
pub const SEGMENTS_PER_PAGE_MAX: usize = 10_000;
/// Segments read per page at most, matching or not: bounds one call's work
/// when the time filter leaves out most of them.
const SEGMENTS_SCANNED_PER_PAGE_MAX: usize = 100_000;
/// Longest writer name.
pub const WRITER_LEN_MAX: usize = 64;

type Labels = Vec<(String, String)>;

/// What this node's stream calls did (metrics).
pub struct StreamStats {
    /// Open `AppendStream` calls on this node.
    pub writers: AtomicI64,
    batches: Family<Labels, Counter>,
    records: Counter,
    commit_seconds: Histogram,
}

impl Default for StreamStats {
    fn default() -> Self {
        let stats = Self {
            writers: AtomicI64::new(0),
            batches: Family::default(),
            records: Counter::default(),
            // 1 ms .. ~33 s.
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        };
        // Every outcome has a series from the start.
        for outcome in Outcome::ALL {
            let _created = stats.batches.get_or_create(&outcome.labels());
        }
        stats
    }
}

/// How one batch ended, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Committed,
    Duplicate,
    Overlap,
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Committed,
        Outcome::Duplicate,
        Outcome::Overlap,
        Outcome::Failed,
    ];

    fn labels(self) -> Labels {
        let name = match self {
            Outcome::Committed => "committed",
            Outcome::Duplicate => "duplicate",
            Outcome::Overlap => "overlap",
            Outcome::Failed => "failed",
        };
        vec![("outcome".to_string(), name.to_string())]
    }
}

impl StreamStats {
    fn record(&self, outcome: Outcome, records: u64, started: Instant) {
        self.batches.get_or_create(&outcome.labels()).inc();
        if outcome == Outcome::Committed {
            self.records.inc_by(records);
        }
        self.commit_seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// Streams' part of `/metrics`.
pub fn register_metrics(registry: &mut Registry, gateway: &Gateway) {
    let stats = gateway.streams();
    registry.register(
        "cairn_stream_batches",
        "Stream batches answered by this node, by outcome",
        stats.batches.clone(),
    );
    registry.register(
        "cairn_stream_records",
        "Stream records committed through this node",
        stats.records.clone(),
    );
    crate::metrics::gauge(
        registry,
        "cairn_stream_writers",
        "Open AppendStream calls on this node",
        stats.writers.load(Ordering::Relaxed),
    );
    let segments = gateway
        .meta()
        .view()
        .and_then(|v| v.stream_segment_count().map_err(Into::into))
        .unwrap_or(0);
    crate::metrics::gauge(
        registry,
        "cairn_stream_segments",
        "Live stream segments in the metadata state (all tenants)",
        i64::try_from(segments).unwrap_or(i64::MAX),
    );
    registry.register(
        "cairn_stream_commit_seconds",
        "Time from receiving a stream batch to answering it",
        stats.commit_seconds.clone(),
    );
}

/// Counts an open `AppendStream` call while it lives, and holds the
/// gateway for its reply stream.
pub(super) struct WriterGuard(std::sync::Arc<Gateway>);

impl WriterGuard {
    pub(super) fn new(gateway: std::sync::Arc<Gateway>) -> Self {
        gateway.streams().writers.fetch_add(1, Ordering::Relaxed);
        Self(gateway)
    }

    pub(super) fn gateway(&self) -> &Gateway {
        &self.0
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.0.streams().writers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The stream a call appends to, checked.
#[derive(Debug, Clone)]
pub(super) struct OpenStream {
    pub tenant: String,
    pub dataset: String,
    pub writer: String,
}

/// 1..=64 bytes of `[A-Za-z0-9._-]`.
fn check_writer(writer: &str) -> Result<(), GatewayError> {
    let ok = !writer.is_empty()
        && writer.len() <= WRITER_LEN_MAX
        && writer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(invalid(format!(
            "writer must be 1..={WRITER_LEN_MAX} bytes of [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

/// A batch checked against every limit before any work is done.
struct CheckedBatch {
    first_seq: u64,
    last_seq: u64,
    pack_id: Id32,
    data: prost::bytes::Bytes,
    blobs: Vec<(Id32, BlobLocation)>,
    segments: Vec<StreamSegment>,
    records: u64,
}

fn check_batch(batch: pb::StreamBatch) -> Result<CheckedBatch, GatewayError> {
    if batch.first_seq > batch.last_seq {
        return Err(invalid("batch first_seq is after its last_seq"));
    }
    if batch.segments.is_empty() || batch.segments.len() > SEGMENTS_PER_BATCH_MAX {
        return Err(invalid(format!(
            "{} segments in one batch, expected 1..={SEGMENTS_PER_BATCH_MAX}",
            batch.segments.len()
        )));
    }
    let (pack_id, blobs) = super::ingest::check_pack(&batch.pack_id, &batch.data, &batch.blobs)?;
    let in_pack: std::collections::HashSet<&Id32> = blobs.iter().map(|(id, _)| id).collect();
    let mut segments = Vec::with_capacity(batch.segments.len());
    let mut records = 0u64;
    for segment in &batch.segments {
        let room = id32(&segment.room, "segment room")?;
        let blob = id32(&segment.blob, "segment blob")?;
        if !in_pack.contains(&blob) {
            return Err(invalid(format!(
                "segment blob {} is not one of the pack's blobs",
                hex::encode(blob)
            )));
        }
        if segment.first_ts_ms > segment.last_ts_ms {
            return Err(invalid("segment first_ts_ms is after its last_ts_ms"));
        }
        if segment.records == 0 {
            return Err(invalid("segment without records"));
        }
        records += u64::from(segment.records);
        segments.push(StreamSegment {
            room,
            blob,
            first_ts_ms: segment.first_ts_ms,
            last_ts_ms: segment.last_ts_ms,
            records: segment.records,
        });
    }
    Ok(CheckedBatch {
        first_seq: batch.first_seq,
        last_seq: batch.last_seq,
        pack_id,
        data: batch.data.into(),
        blobs,
        segments,
        records,
    })
}

fn reply(
    outcome: pb::append_stream_reply::Outcome,
    last_seq: u64,
    committed_seq: u64,
) -> pb::AppendStreamReply {
    pb::AppendStreamReply {
        outcome: outcome as i32,
        last_seq,
        committed_seq,
    }
}

impl Gateway {
    /// Checks a call's `open` message (the caller is authorized already,
    /// `tenant` is the one the token allows) and answers OPENED with the
    /// writer's committed sequence, read after a read barrier.
    pub(super) async fn open_stream(
        &self,
        tenant: String,
        open: pb::StreamOpen,
    ) -> Result<(OpenStream, pb::AppendStreamReply), GatewayError> {
        check_name(&tenant, "tenant")?;
        check_name(&open.dataset, "dataset")?;
        check_writer(&open.writer)?;
        self.catch_up().await;
        let committed = self
            .meta
            .view()?
            .stream_committed_seq(&tenant, &open.dataset, &open.writer)?
            .unwrap_or(0);
        let stream = OpenStream {
            tenant,
            dataset: open.dataset,
            writer: open.writer,
        };
        Ok((
            stream,
            reply(pb::append_stream_reply::Outcome::Opened, 0, committed),
        ))
    }

    /// Handles one batch of an open stream: checked, stored, committed.
    pub(super) async fn append_batch(
        &self,
        stream: &OpenStream,
        batch: pb::StreamBatch,
    ) -> Result<pb::AppendStreamReply, GatewayError> {
        let started = Instant::now();
        let mut records = 0;
        let outcome = async {
            let batch = check_batch(batch)?;
            records = batch.records;
            self.append_checked(stream, batch).await
        }
        .await;
        let label = match &outcome {
            Ok((label, _)) => *label,
            Err(_) => Outcome::Failed,
        };
        self.streams().record(label, records, started);
        outcome.map(|(_, reply)| reply)
    }

    async fn append_checked(
        &self,
        stream: &OpenStream,
        batch: CheckedBatch,
    ) -> Result<(Outcome, pb::AppendStreamReply), GatewayError> {
        use pb::append_stream_reply::Outcome as Wire;
        let committed = |gw: &Gateway| -> Result<u64, GatewayError> {
            Ok(gw
                .meta
                .view()?
                .stream_committed_seq(&stream.tenant, &stream.dataset, &stream.writer)?
                .unwrap_or(0))
        };
        // A re-send this node already knows to be committed costs nothing
        // (a lagging state only sends it on to the check in the entry).
        if let Some(seq) = self.meta.view()?.stream_committed_seq(
            &stream.tenant,
            &stream.dataset,
            &stream.writer,
        )? && batch.last_seq <= seq
        {
            return Ok((
                Outcome::Duplicate,
                reply(Wire::Duplicate, batch.last_seq, seq),
            ));
        }
        // The batch's bytes (pack, shards, buffers) are reserved already,
        // from its length prefix, by the route (`limits::CheckedFrames`),
        // and held by the caller until this batch is answered.
        let record = self
            .store_pack(&stream.tenant, batch.pack_id, batch.data)
            .await?;
        let written: Vec<(u32, u64)> = record.shards.iter().map(|p| (p.index, p.node)).collect();
        let result = self
            .meta
            .write(Command::Timed {
                at: 0,
                cmd: Box::new(Command::AppendStream {
                    tenant: stream.tenant.clone(),
                    dataset: stream.dataset.clone(),
                    writer: stream.writer.clone(),
                    first_seq: batch.first_seq,
                    last_seq: batch.last_seq,
                    pack: record,
                    blobs: batch.blobs,
                    segments: batch.segments,
                }),
            })
            .await;
        let result = match result {
            Ok(result) => result,
            Err(error) => {
                // Unknown whether it committed: the shards stay (the
                // orphan sweep removes them if it did not); the client
                // retries and learns the outcome from the sequence.
                return Err(error.into());
            }
        };
        let (outcome, wire) = match result {
            CommandResult::Ok => (Outcome::Committed, Wire::Committed),
            CommandResult::StreamDuplicate => (Outcome::Duplicate, Wire::Duplicate),
            CommandResult::StreamOverlap => (Outcome::Overlap, Wire::Overlap),
            other => {
                return Err(GatewayError::Precondition {
                    what: format!("stream batch refused: {}", other.audit_text()),
                });
            }
        };
        if outcome != Outcome::Committed {
            self.delete_unused_shards(&batch.pack_id, &written).await;
        }
        debug!(pack_id = %hex::encode(batch.pack_id), outcome = ?outcome, "stream batch answered");
        Ok((outcome, reply(wire, batch.last_seq, committed(self)?)))
    }

    /// Deletes the shards of a batch that was not committed, unless the
    /// same pack is committed (then they may be the very shards its record
    /// names; the orphan sweep removes any left over).
    async fn delete_unused_shards(&self, pack_id: &Id32, written: &[(u32, u64)]) {
        match self.meta.pack(pack_id) {
            Ok(None) => {}
            _ => return,
        }
        let members = self.members();
        for &(index, node) in written {
            if let Err(error) = self.io.delete(node, pack_id, index, &members).await {
                debug!(pack_id = %hex::encode(pack_id), shard_idx = index, node_id = node, %error,
                    "shard of an uncommitted stream batch not deleted; the orphan sweep removes it");
            }
        }
    }

    pub(super) async fn list_segments_inner(
        &self,
        req: pb::ListSegmentsRequest,
    ) -> Result<pb::ListSegmentsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        check_name(&req.dataset, "dataset")?;
        let room = if req.room.is_empty() {
            None
        } else {
            Some(id32(&req.room, "room")?)
        };
        let after = if req.page.is_empty() {
            None
        } else {
            Some(
                SegmentId::from_wire(&req.page)
                    .ok_or_else(|| invalid("page is not one this node handed out"))?,
            )
        };
        let (from, to) = (req.from_ts_ms, req.to_ts_ms);
        let to = if to == 0 && from == 0 { i64::MAX } else { to };
        // A record acknowledged before this call is always listed.
        self.catch_up().await;
        let view = self.meta.view()?;
        let scanned = view.segment_page(
            &req.tenant,
            &req.dataset,
            room.as_ref(),
            after.as_ref(),
            SEGMENTS_SCANNED_PER_PAGE_MAX,
        )?;
        let full_scan = scanned.len() == SEGMENTS_SCANNED_PER_PAGE_MAX;
        let mut segments = Vec::new();
        let mut last: Option<SegmentId> = None;
        let mut more = full_scan;
        for (id, record) in scanned {
            if segments.len() == SEGMENTS_PER_PAGE_MAX {
                more = true;
                break;
            }
            last = Some(id);
            if record.last_ts_ms < from || record.first_ts_ms > to {
                continue;
            }
            segments.push(segment_to_wire(&id, record));
        }
        let snapshot = view
            .snapshots(&req.tenant, Some(&req.dataset))?
            .last()
            .map(|s| s.id.to_vec())
            .unwrap_or_default();
        let generation = view.stream_dataset(&req.tenant, &req.dataset)?.generation;
        Ok(pb::ListSegmentsReply {
            segments,
            next_page: match (more, last) {
                (true, Some(last)) => last.to_wire(),
                _ => Vec::new(),
            },
            snapshot,
            generation,
        })
    }
}

fn segment_to_wire(id: &SegmentId, record: SegmentRecord) -> pb::SegmentInfo {
    pb::SegmentInfo {
        id: id.to_wire(),
        room: id.room.to_vec(),
        blob: record.blob.to_vec(),
        first_ts_ms: record.first_ts_ms,
        last_ts_ms: record.last_ts_ms,
        records: record.records,
        writer: record.writer,
        committed_unix_ms: record.committed_unix_ms,
    }
}

/// Segment ids named by a commit's `retire_segments`.
pub(super) fn retire_ids(raw: &[Vec<u8>]) -> Result<Vec<SegmentId>, GatewayError> {
    if raw.len() > super::IDS_PER_REQUEST_MAX {
        return Err(invalid(format!(
            "{} segments to retire in one commit, at most {}",
            raw.len(),
            super::IDS_PER_REQUEST_MAX
        )));
    }
    raw.iter()
        .map(|id| {
            SegmentId::from_wire(id).ok_or_else(|| {
                invalid(format!(
                    "segment id of {} bytes is not one ListSegments handed out",
                    id.len()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> pb::StreamBatch {
        let data = vec![7u8; 100];
        pb::StreamBatch {
            first_seq: 1,
            last_seq: 3,
            pack_id: blake3::hash(&data).as_bytes().to_vec(),
            data,
            blobs: vec![pb::BlobEntry {
                id: vec![1; 32],
                offset: 0,
                length: 100,
            }],
            segments: vec![pb::StreamSegment {
                room: vec![2; 32],
                blob: vec![1; 32],
                first_ts_ms: 5,
                last_ts_ms: 6,
                records: 3,
            }],
        }
    }

    #[test]
    fn batches_are_checked_before_any_work() {
        assert_eq!(check_batch(batch()).map(|b| b.records).ok(), Some(3));
        let refused = |change: fn(&mut pb::StreamBatch)| {
            let mut b = batch();
            change(&mut b);
            check_batch(b).is_err()
        };
        assert!(refused(|b| b.first_seq = 4));
        assert!(refused(|b| b.pack_id = vec![0; 32]));
        assert!(refused(|b| b.blobs[0].length = 101));
        assert!(refused(|b| b.segments.clear()));
        assert!(refused(|b| b.segments[0].blob = vec![9; 32]));
        assert!(refused(|b| b.segments[0].room = vec![2; 31]));
        assert!(refused(|b| b.segments[0].first_ts_ms = 7));
        assert!(refused(|b| b.segments[0].records = 0));
        assert!(refused(|b| {
            let s = b.segments[0].clone();
            b.segments = vec![s; SEGMENTS_PER_BATCH_MAX + 1];
        }));
    }

    #[test]
    fn writer_names_are_short_and_plain() {
        assert!(check_writer("ingest-1.eu_west").is_ok());
        assert!(check_writer("").is_err());
        assert!(check_writer(&"w".repeat(65)).is_err());
        assert!(check_writer("a/b").is_err());
        assert!(check_writer("é").is_err());
    }

    #[test]
    fn retire_ids_take_only_listed_forms() {
        let id = SegmentId {
            room: [3; 32],
            number: 9,
        };
        assert_eq!(retire_ids(&[id.to_wire()]).ok(), Some(vec![id]));
        assert!(retire_ids(&[vec![0; 8]]).is_err());
        assert!(retire_ids(&[vec![0; 41]]).is_err());
    }
}
