//! Garbage collection's records in the metadata state: pack lives and
//! backup sessions, snapshot reference lists with the GC epoch check, index
//! sweeps, dropped and repacked packs (layout in `state.rs`).
//!
//! Safety rests on two counters checked here, inside the state machine:
//! the GC epoch (bumped by every sweep; a commit carries the epoch its
//! references were checked at) and the catalog sequence (bumped by every
//! commit; a sweep carries the sequence its mark saw). Whichever of a
//! commit and a sweep applies second is refused, so a committed snapshot
//! never references a swept blob.

use std::collections::BTreeSet;

use super::codec;
use super::state::{
    CATALOG_SEQ_KEY, GC_EPOCH_KEY, PACK_LIFE, SNAPSHOT_LIFE, StateError, StateView, add_pack,
    blob_key, pack_key, pack_life_key, session_key, snapshot_key, snapshot_life_key, tenant_prefix,
};
use super::types::{
    BlobLocation, Command, CommandResult, Id32, MetaStats, PackLife, PackRecord, SessionId,
    SessionRecord, SnapshotLife,
};
use crate::kv::{WriteBatch, prefix_end};

impl StateView {
    /// The GC epoch: how many sweeps of index entries applied (0 before any).
    pub fn gc_epoch(&self) -> Result<u64, StateError> {
        Ok(self.get("gc epoch", GC_EPOCH_KEY)?.unwrap_or(0))
    }

    /// The catalog sequence: how many snapshot commits applied.
    pub fn catalog_seq(&self) -> Result<u64, StateError> {
        Ok(self.get("catalog seq", CATALOG_SEQ_KEY)?.unwrap_or(0))
    }

    /// A snapshot's life record (`None` for snapshots committed before
    /// reference lists existed, or unknown ones).
    pub fn snapshot_life(
        &self,
        tenant: &str,
        id: &Id32,
    ) -> Result<Option<SnapshotLife>, StateError> {
        self.get("snapshot life", &snapshot_life_key(tenant, id))
    }

    /// Every life record of the tenant's snapshots, by snapshot id.
    pub fn snapshot_lives(&self, tenant: &str) -> Result<Vec<(Id32, SnapshotLife)>, StateError> {
        let prefix = tenant_prefix(SNAPSHOT_LIFE, tenant);
        let pairs = self.kv().scan_prefix(&prefix)?;
        Self::decode_by_id("snapshot life", &prefix, pairs)
    }

    /// A pack's life record (`None` for packs stored before they existed).
    pub fn pack_life(&self, id: &Id32) -> Result<Option<PackLife>, StateError> {
        self.get("pack life", &pack_life_key(id))
    }

    /// A backup session's record.
    pub fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StateError> {
        self.get("session record", &session_key(id))
    }

    /// Up to `limit` of the tenant's index entries with `start <= id` and,
    /// if given, `id < end`, in id order: the collector pages through the
    /// index with it and never holds all of it.
    pub fn blob_page(
        &self,
        tenant: &str,
        start: &Id32,
        end: Option<&Id32>,
        limit: usize,
    ) -> Result<Vec<(Id32, BlobLocation)>, StateError> {
        let prefix = tenant_prefix(super::state::BLOB, tenant);
        let end_key = match end {
            Some(end) => Some(blob_key(tenant, end)),
            None => prefix_end(&prefix),
        };
        let pairs = self
            .kv()
            .range(&blob_key(tenant, start), end_key.as_deref(), limit)?;
        Self::decode_by_id("blob location", &prefix, pairs)
    }

    /// Up to `limit` pack records with ids after `after` (from the first
    /// when `None`), in id order, with their life records.
    pub fn pack_page(
        &self,
        after: Option<&Id32>,
        limit: usize,
    ) -> Result<Vec<(PackRecord, Option<PackLife>)>, StateError> {
        let start = match after {
            Some(id) => {
                let mut key = pack_key(id);
                key.push(0);
                key
            }
            None => pack_key(&[0; 32]),
        };
        let end = [super::state::PACK + 1];
        let mut out = Vec::new();
        for (_, value) in self.kv().range(&start, Some(&end), limit)? {
            let pack: PackRecord = codec::decode("pack record", &value)?;
            let life = self.pack_life(&pack.id)?;
            out.push((pack, life));
        }
        Ok(out)
    }

    /// How many pack life records exist (tests and stats).
    pub fn pack_life_count(&self) -> Result<usize, StateError> {
        Ok(self.kv().scan_prefix(&[PACK_LIFE])?.len())
    }
}

/// Queues a session's record: opened by its first pack, active at `now`,
/// closed by its commit. A closed session is never reopened.
fn touch_session(
    view: &StateView,
    id: &SessionId,
    now: i64,
    close: bool,
    batch: &mut WriteBatch,
) -> Result<(), StateError> {
    let record = match view.session(id)? {
        Some(record) if record.closed => return Ok(()),
        Some(record) => SessionRecord {
            active_unix_ms: now.max(record.active_unix_ms),
            closed: close,
            ..record
        },
        None => SessionRecord {
            opened_unix_ms: now,
            active_unix_ms: now,
            closed: close,
        },
    };
    batch.put(session_key(id), codec::encode("session record", &record)?);
    Ok(())
}

fn put_u64(
    batch: &mut WriteBatch,
    key: &[u8],
    what: &'static str,
    value: u64,
) -> Result<(), StateError> {
    batch.put(key.to_vec(), codec::encode(what, &value)?);
    Ok(())
}

/// A pack uploaded in a backup session: its record and index, its life
/// (creation time, session, blob bytes), and the session kept alive.
fn add_pack_in_session(
    view: &StateView,
    pack: &PackRecord,
    blobs: &[(Id32, BlobLocation)],
    session: Option<&SessionId>,
    now: i64,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    let result = add_pack(view, pack, blobs, batch, stats)?;
    if result == CommandResult::Ok {
        let life = PackLife {
            created_unix_ms: now,
            session: session.copied(),
            blob_bytes: blobs.iter().map(|(_, l)| u64::from(l.length)).sum(),
            repacked: false,
        };
        batch.put(pack_life_key(&pack.id), codec::encode("pack life", &life)?);
    }
    // A retried upload still shows the session alive.
    if let Some(session) = session {
        touch_session(view, session, now, false, batch)?;
    }
    Ok(result)
}

/// Applies the garbage-collection commands (see [`Command`]).
pub(super) fn apply(
    view: &StateView,
    cmd: &Command,
    now: i64,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    match cmd {
        Command::AddPackInSession {
            pack,
            blobs,
            session,
        } => add_pack_in_session(view, pack, blobs, session.as_ref(), now, batch, stats),
        Command::AddPackIndexed {
            pack,
            index,
            session,
        } => {
            let blobs = index.locations(pack.id);
            add_pack_in_session(view, pack, &blobs, session.as_ref(), now, batch, stats)
        }
        Command::CommitSnapshotWithRefs {
            tenant,
            snapshot,
            refs,
            expect_epoch,
            session,
        } => {
            if view.gc_epoch()? != *expect_epoch {
                return Ok(CommandResult::GcRaced);
            }
            if view
                .kv()
                .get(&blob_key(tenant, &snapshot.root_tree))?
                .is_none()
            {
                return Ok(CommandResult::MissingRootTree);
            }
            let key = snapshot_key(tenant, &snapshot.id);
            if view.kv().get(&key)?.is_some() {
                return Ok(CommandResult::AlreadyExists);
            }
            let seq = view.catalog_seq()?.saturating_add(1);
            let life = SnapshotLife {
                committed_unix_ms: now,
                catalog_seq: seq,
                refs: refs.clone(),
            };
            batch.put(key, codec::encode("snapshot record", snapshot)?);
            batch.put(
                snapshot_life_key(tenant, &snapshot.id),
                codec::encode("snapshot life", &life)?,
            );
            put_u64(batch, CATALOG_SEQ_KEY, "catalog seq", seq)?;
            stats.snapshots += 1;
            if let Some(session) = session {
                touch_session(view, session, now, true, batch)?;
            }
            Ok(CommandResult::Ok)
        }
        Command::SweepBlobs {
            tenant,
            ids,
            catalog_seq,
        } => {
            if view.catalog_seq()? != *catalog_seq {
                return Ok(CommandResult::CatalogChanged);
            }
            let mut removed = 0u64;
            let mut seen = BTreeSet::new();
            for id in ids {
                let key = blob_key(tenant, id);
                if !seen.insert(*id) || view.kv().get(&key)?.is_none() {
                    continue;
                }
                // A live stream segment's blob is a root whatever the
                // collector marked: the segment may have been committed
                // after its mark (streams do not move the catalog sequence).
                if view.blob_in_live_segment(tenant, id)? {
                    continue;
                }
                batch.delete(key);
                removed += 1;
            }
            stats.blobs = stats.blobs.saturating_sub(removed);
            // The epoch says "no index entry was removed since": a sweep
            // that removed nothing need not make commits re-verify.
            if removed > 0 {
                put_u64(
                    batch,
                    GC_EPOCH_KEY,
                    "gc epoch",
                    view.gc_epoch()?.saturating_add(1),
                )?;
            }
            Ok(CommandResult::Ok)
        }
        Command::DropPack { id } => {
            let Some(pack) = view.pack(id)? else {
                return Ok(CommandResult::UnknownPack);
            };
            drop_pack(&pack, batch, stats);
            Ok(CommandResult::Ok)
        }
        Command::Repack { old, new, blobs } => {
            let Some(old_pack) = view.pack(old)? else {
                return Ok(CommandResult::UnknownPack);
            };
            // Repacking a pack into the same bytes would drop the very
            // record its entries point at (and the collector its shards).
            if new.id == *old {
                return Ok(CommandResult::AlreadyExists);
            }
            if view.pack(&new.id)?.is_none() {
                batch.put(pack_key(&new.id), codec::encode("pack record", new)?);
                let life = PackLife {
                    created_unix_ms: now,
                    session: None,
                    blob_bytes: blobs.iter().map(|(_, l)| u64::from(l.length)).sum(),
                    repacked: true,
                };
                batch.put(pack_life_key(&new.id), codec::encode("pack life", &life)?);
                stats.packs += 1;
                if new.needs_rebalance {
                    stats.packs_needing_rebalance += 1;
                }
            }
            for (blob_id, location) in blobs {
                let key = blob_key(&old_pack.tenant, blob_id);
                // Only entries still in the old pack move: an entry swept
                // meanwhile stays gone, one elsewhere stays where it is.
                let current: Option<BlobLocation> = view.get("blob location", &key)?;
                if current.is_some_and(|c| c.pack_id == *old) {
                    batch.put(key, codec::encode("blob location", location)?);
                }
            }
            drop_pack(&old_pack, batch, stats);
            Ok(CommandResult::Ok)
        }
        _ => Ok(CommandResult::UnknownPack),
    }
}

/// Queues the removal of a pack record and its life record.
fn drop_pack(pack: &PackRecord, batch: &mut WriteBatch, stats: &mut MetaStats) {
    batch.delete(pack_key(&pack.id));
    batch.delete(pack_life_key(&pack.id));
    stats.packs = stats.packs.saturating_sub(1);
    if pack.needs_rebalance {
        stats.packs_needing_rebalance = stats.packs_needing_rebalance.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::state::testing::{id, pack, run_at, view};
    use crate::meta::types::{BlobIndex, RefSegment, SnapshotRecord};

    fn run(view: &StateView, cmd: Command) -> CommandResult {
        run_at(view, 1_000, cmd)
    }

    fn at(pack: u8, offset: u64) -> BlobLocation {
        BlobLocation {
            pack_id: id(pack),
            offset,
            length: 10,
        }
    }

    fn add(pack_n: u8, blobs: &[u8], session: Option<SessionId>) -> Command {
        Command::AddPackInSession {
            pack: pack(pack_n),
            blobs: blobs
                .iter()
                .enumerate()
                .map(|(i, b)| (id(*b), at(pack_n, i as u64 * 10)))
                .collect(),
            session,
        }
    }

    fn commit(snap: u8, root: u8, epoch: u64, session: Option<SessionId>) -> Command {
        Command::CommitSnapshotWithRefs {
            tenant: "t".into(),
            snapshot: SnapshotRecord {
                id: id(snap),
                dataset: "d".into(),
                parent: None,
                time_unix_ms: 5,
                kind: "full".into(),
                root_tree: id(root),
                sealed_info: vec![],
                files: 0,
                bytes: 0,
                bytes_added: 0,
                tags: vec![],
            },
            refs: vec![RefSegment {
                blob: id(root),
                first: id(root),
                last: id(root),
                count: 1,
            }],
            expect_epoch: epoch,
            session,
        }
    }

    fn sweep(ids: &[u8], seq: u64) -> Command {
        Command::SweepBlobs {
            tenant: "t".into(),
            ids: ids.iter().map(|n| id(*n)).collect(),
            catalog_seq: seq,
        }
    }

    /// The stored counters equal a recount of the records.
    fn assert_stats_exact(v: &StateView) {
        let stats = v.stats().expect("stats");
        let blobs = v
            .blob_page("t", &[0; 32], None, usize::MAX)
            .expect("page")
            .len() as u64;
        let packs = v.packs().expect("packs");
        assert_eq!(stats.blobs, blobs, "blob count");
        assert_eq!(stats.packs, packs.len() as u64, "pack count");
        assert_eq!(
            stats.packs_needing_rebalance,
            packs.iter().filter(|p| p.needs_rebalance).count() as u64
        );
        assert_eq!(
            stats.snapshots,
            v.snapshots("t", None).expect("snapshots").len() as u64
        );
    }

    #[test]
    fn a_packed_blob_index_applies_like_the_listed_one() {
        let listed = view();
        let packed = view();
        let Command::AddPackInSession {
            pack,
            blobs,
            session,
        } = add(1, &[10, 11, 12, 11], Some([7; 16]))
        else {
            unreachable!("add builds AddPackInSession")
        };
        let indexed = Command::AddPackIndexed {
            index: BlobIndex::new(&blobs),
            pack: pack.clone(),
            session,
        };
        // Through the log's encoding, as a follower receives it.
        let indexed: Command = codec::decode(
            "command",
            &codec::encode("command", &indexed).expect("encode"),
        )
        .expect("decode");
        let Command::AddPackIndexed { index, .. } = &indexed else {
            unreachable!("decoded as encoded")
        };
        assert_eq!(index.len(), 4);
        assert_eq!(index.locations(pack.id), blobs);
        assert_eq!(
            run(&listed, add(1, &[10, 11, 12, 11], Some([7; 16]))),
            CommandResult::Ok
        );
        assert_eq!(run(&packed, indexed.clone()), CommandResult::Ok);
        for n in [10, 11, 12] {
            assert_eq!(
                packed.locate_blob("t", &id(n)).expect("read"),
                listed.locate_blob("t", &id(n)).expect("read"),
            );
        }
        // The first location of a blob listed twice wins, as before.
        assert_eq!(
            packed.locate_blob("t", &id(11)).expect("read"),
            Some(at(1, 10))
        );
        assert_eq!(
            packed.pack_life(&id(1)).expect("read"),
            listed.pack_life(&id(1)).expect("read")
        );
        assert_eq!(
            packed.stats().expect("stats"),
            listed.stats().expect("stats")
        );
        assert_eq!(run(&packed, indexed), CommandResult::AlreadyExists);
        assert_stats_exact(&packed);
    }

    #[test]
    fn a_blob_index_of_partial_records_is_refused() {
        let bytes = codec::encode("bytes", &serde_bytes_of(45)).expect("encode");
        assert!(codec::decode::<BlobIndex>("blob index", &bytes).is_err());
        let bytes = codec::encode("bytes", &serde_bytes_of(88)).expect("encode");
        let index: BlobIndex = codec::decode("blob index", &bytes).expect("two records");
        assert_eq!(index.len(), 2);
    }

    /// `len` bytes serialized as a byte string, as [`BlobIndex`] is.
    fn serde_bytes_of(len: usize) -> impl serde::Serialize {
        struct Raw(Vec<u8>);
        impl serde::Serialize for Raw {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }
        Raw(vec![3; len])
    }

    #[test]
    fn packs_in_a_session_record_their_life_and_the_commit_closes_it() {
        let v = view();
        let s = [9u8; 16];
        assert_eq!(
            run_at(&v, 100, add(1, &[10, 11], Some(s))),
            CommandResult::Ok
        );
        assert_eq!(run_at(&v, 200, add(2, &[12], Some(s))), CommandResult::Ok);
        assert_eq!(
            v.pack_life(&id(1)).expect("read"),
            Some(PackLife {
                created_unix_ms: 100,
                session: Some(s),
                blob_bytes: 20,
                repacked: false,
            })
        );
        let open = v.session(&s).expect("read").expect("recorded");
        assert_eq!(
            (open.opened_unix_ms, open.active_unix_ms, open.closed),
            (100, 200, false)
        );
        assert_eq!(
            run_at(&v, 300, commit(1, 10, 0, Some(s))),
            CommandResult::Ok
        );
        assert!(v.session(&s).expect("read").expect("kept").closed);
        // A later pack in the same session never reopens it.
        assert_eq!(run_at(&v, 400, add(3, &[13], Some(s))), CommandResult::Ok);
        assert!(v.session(&s).expect("read").expect("kept").closed);
        let life = v.snapshot_life("t", &id(1)).expect("read").expect("life");
        assert_eq!((life.committed_unix_ms, life.catalog_seq), (300, 1));
        assert_eq!(v.catalog_seq().expect("seq"), 1);
        // A commit without packs still records its session closed.
        let other = [8u8; 16];
        assert_eq!(
            run_at(&v, 500, commit(2, 10, 0, Some(other))),
            CommandResult::Ok
        );
        assert!(v.session(&other).expect("read").expect("recorded").closed);
        assert_stats_exact(&v);
    }

    #[test]
    fn a_commit_with_a_stale_epoch_is_refused() {
        let v = view();
        run(&v, add(1, &[10, 11], None));
        assert_eq!(run(&v, sweep(&[11], 0)), CommandResult::Ok);
        assert_eq!(v.gc_epoch().expect("epoch"), 1);
        assert_eq!(run(&v, commit(1, 10, 0, None)), CommandResult::GcRaced);
        assert!(v.snapshots("t", None).expect("read").is_empty());
        assert_eq!(v.catalog_seq().expect("seq"), 0);
        assert_eq!(
            run(&v, commit(1, 11, 1, None)),
            CommandResult::MissingRootTree
        );
        assert_eq!(run(&v, commit(1, 10, 1, None)), CommandResult::Ok);
        assert_eq!(
            run(&v, commit(1, 10, 1, None)),
            CommandResult::AlreadyExists
        );
        assert_stats_exact(&v);
    }

    #[test]
    fn a_sweep_after_a_commit_is_refused_and_a_sweep_bumps_the_epoch() {
        let v = view();
        run(&v, add(1, &[10, 11, 12], None));
        assert_eq!(run(&v, commit(1, 10, 0, None)), CommandResult::Ok);
        // The collector marked at seq 0: the commit at seq 1 came after.
        assert_eq!(run(&v, sweep(&[11], 0)), CommandResult::CatalogChanged);
        assert_eq!(v.find_blobs("t", &[id(11)]).expect("read"), vec![true]);
        assert_eq!(v.gc_epoch().expect("epoch"), 0);
        // Duplicates and ids not indexed are counted once / not at all.
        assert_eq!(run(&v, sweep(&[11, 11, 12, 99], 1)), CommandResult::Ok);
        assert_eq!(v.gc_epoch().expect("epoch"), 1);
        assert_eq!(
            v.find_blobs("t", &[id(10), id(11), id(12)]).expect("read"),
            vec![true, false, false]
        );
        assert_eq!(v.stats().expect("stats").blobs, 1);
        // Nothing left to remove: the epoch stays.
        assert_eq!(run(&v, sweep(&[11], 1)), CommandResult::Ok);
        assert_eq!(v.gc_epoch().expect("epoch"), 1);
        assert_stats_exact(&v);
    }

    #[test]
    fn an_old_style_commit_moves_the_catalog_sequence_too() {
        let v = view();
        run(&v, add(1, &[10, 11], None));
        let old = Command::CommitSnapshot {
            tenant: "t".into(),
            snapshot: match commit(1, 10, 0, None) {
                Command::CommitSnapshotWithRefs { snapshot, .. } => snapshot,
                _ => unreachable!(),
            },
        };
        assert_eq!(run(&v, old), CommandResult::Ok);
        assert_eq!(run(&v, sweep(&[11], 0)), CommandResult::CatalogChanged);
        assert_stats_exact(&v);
    }

    #[test]
    fn drop_pack_removes_the_record_and_its_life() {
        let v = view();
        let mut degraded = add(1, &[10], None);
        if let Command::AddPackInSession { pack, .. } = &mut degraded {
            pack.needs_rebalance = true;
        }
        run(&v, degraded);
        assert_eq!(run(&v, sweep(&[10], 0)), CommandResult::Ok);
        assert_eq!(run(&v, Command::DropPack { id: id(1) }), CommandResult::Ok);
        assert_eq!(
            run(&v, Command::DropPack { id: id(1) }),
            CommandResult::UnknownPack
        );
        assert!(v.pack(&id(1)).expect("read").is_none());
        assert!(v.pack_life(&id(1)).expect("read").is_none());
        assert_eq!(v.stats().expect("stats").packs_needing_rebalance, 0);
        assert_stats_exact(&v);
    }

    #[test]
    fn repack_repoints_only_entries_still_in_the_old_pack() {
        let v = view();
        run(&v, add(1, &[10, 11, 12], None));
        // 13 lives in pack 2, listed by mistake: it must not move.
        run(&v, add(2, &[13], None));
        run(&v, sweep(&[11], 0));
        let new = PackRecord {
            pack_len: 30,
            ..pack(3)
        };
        let repack = Command::Repack {
            old: id(1),
            new: new.clone(),
            blobs: vec![
                (id(10), at(3, 0)),
                (id(11), at(3, 10)),
                (id(12), at(3, 20)),
                (id(13), at(3, 30)),
            ],
        };
        assert_eq!(run_at(&v, 7_777, repack.clone()), CommandResult::Ok);
        assert_eq!(v.locate_blob("t", &id(10)).expect("read"), Some(at(3, 0)));
        assert_eq!(v.locate_blob("t", &id(12)).expect("read"), Some(at(3, 20)));
        assert_eq!(
            v.locate_blob("t", &id(11)).expect("read"),
            None,
            "swept stays gone"
        );
        assert_eq!(v.locate_blob("t", &id(13)).expect("read"), Some(at(2, 0)));
        assert!(v.pack(&id(1)).expect("read").is_none());
        assert!(v.pack_life(&id(1)).expect("read").is_none());
        assert_eq!(v.pack(&id(3)).expect("read"), Some(new));
        assert_eq!(
            v.pack_life(&id(3)).expect("read"),
            Some(PackLife {
                created_unix_ms: 7_777,
                session: None,
                blob_bytes: 40,
                repacked: true,
            })
        );
        assert_eq!(run(&v, repack), CommandResult::UnknownPack);
        assert_stats_exact(&v);
    }

    #[test]
    fn blob_pages_stay_in_their_range_and_tenant() {
        let v = view();
        run(&v, add(1, &[10, 20, 30, 40], None));
        let mut other = add(2, &[25], None);
        if let Command::AddPackInSession { pack, .. } = &mut other {
            pack.tenant = "u".into();
        }
        run(&v, other);
        let ids = |page: Vec<(Id32, BlobLocation)>| {
            page.into_iter().map(|(i, _)| i[0]).collect::<Vec<_>>()
        };
        assert_eq!(
            ids(v.blob_page("t", &id(15), Some(&id(40)), 10).expect("page")),
            vec![20, 30]
        );
        assert_eq!(
            ids(v.blob_page("t", &id(20), None, 2).expect("page")),
            vec![20, 30]
        );
        assert_eq!(
            ids(v.blob_page("u", &[0; 32], None, 10).expect("page")),
            vec![25]
        );
        let packs = v.pack_page(None, 1).expect("page");
        assert_eq!(packs[0].0.id, id(1));
        let next = v.pack_page(Some(&id(1)), 10).expect("page");
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].0.id, id(2));
        assert!(next[0].1.is_some());
    }
}
