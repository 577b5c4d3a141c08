//! Restore: snapshot → trees → plan → packs → checked chunks → files.
//!
//! Trees are fetched level by level, then every needed chunk is located and
//! its packs are read once each, a few at a time. Each chunk is decrypted
//! and checked against its id before a single byte of it is written. Paths
//! come from the snapshot, which may be hostile: every name is checked,
//! no write follows a symlink, and symlinks are created only after all file
//! data is written, so none can redirect a write outside the target.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::backup::Progress;
use crate::error::{ClientError, Result};
use crate::path_guard::{check_name, check_no_symlink_in_parents, safe_join};
use crate::repo::{Located, Repository, Snapshot};
use crate::seal::BlobId;
use crate::tree::{EntryKind, TreeEntry};

/// Packs fetched at once during a restore.
const PACKS_IN_FLIGHT_MAX: usize = 6;

/// One entry of a snapshot with its path from the root.
#[derive(Debug, Clone)]
pub struct Item {
    /// Path components below the snapshot root.
    pub path: Vec<String>,
    pub entry: TreeEntry,
}

impl Item {
    pub fn path_string(&self) -> String {
        self.path.join("/")
    }
}

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Globs on the path below the snapshot root; empty = everything.
    pub include: Vec<String>,
    /// Regions to read nothing from (failover drills).
    pub exclude_regions: Vec<String>,
}

/// What a restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub time_to_first_byte_s: f64,
    pub duration_s: f64,
}

/// Every entry of a snapshot, parents before children, trees fetched a
/// level at a time.
pub async fn walk(
    repo: &Repository,
    snapshot: &Snapshot,
    exclude_regions: &[String],
) -> Result<Vec<Item>> {
    let trees = repo
        .load_trees(&snapshot.root_tree, exclude_regions)
        .await?;
    let mut items = Vec::new();
    let mut level: Vec<(Vec<String>, BlobId)> = vec![(Vec::new(), snapshot.root_tree)];
    while !level.is_empty() {
        let mut next = Vec::new();
        for (prefix, id) in level {
            let tree = trees
                .get(&id)
                .ok_or_else(|| ClientError::integrity("tree missing from the walk"))?;
            for entry in &tree.entries {
                check_name(&entry.name)?;
                let mut path = prefix.clone();
                path.push(entry.name.clone());
                if let EntryKind::Dir { subtree } = &entry.kind {
                    next.push((path.clone(), *subtree));
                }
                items.push(Item {
                    path,
                    entry: entry.clone(),
                });
            }
        }
        level = next;
    }
    Ok(items)
}

fn build_globs(patterns: &[String]) -> Result<Option<GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob =
            Glob::new(pattern.trim_start_matches('/')).map_err(|e| ClientError::BadPattern {
                pattern: pattern.clone(),
                reason: e.to_string(),
            })?;
        builder.add(glob);
    }
    builder
        .build()
        .map(Some)
        .map_err(|e| ClientError::BadPattern {
            pattern: patterns.join(" "),
            reason: e.to_string(),
        })
}

/// Keeps items matching a glob, the contents of matching directories, and
/// the directories leading to them.
fn select(items: Vec<Item>, globs: Option<&GlobSet>) -> Vec<Item> {
    let Some(globs) = globs else {
        return items;
    };
    let matches = |path: &[String]| (1..=path.len()).any(|n| globs.is_match(path[..n].join("/")));
    let mut keep_dirs: std::collections::HashSet<Vec<String>> = Default::default();
    for item in &items {
        if matches(&item.path) {
            for n in 1..item.path.len() {
                keep_dirs.insert(item.path[..n].to_vec());
            }
        }
    }
    items
        .into_iter()
        .filter(|item| matches(&item.path) || keep_dirs.contains(&item.path))
        .collect()
}

fn no_follow_open(path: &Path, create: bool) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).custom_flags(libc::O_NOFOLLOW);
    if create {
        options.create(true).truncate(true);
    }
    options.open(path)
}

fn set_mtime(path: &Path, mtime_ns: i64) -> std::io::Result<()> {
    let time = if mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64)
    } else {
        UNIX_EPOCH
    };
    let file = File::open(path)?;
    file.set_modified(time)
}

/// A chunk's destinations: (file index, offset in the file).
type Destinations = Vec<(usize, u64)>;

/// Restores a snapshot (or the part matching `include`) under `target`.
pub async fn restore(
    repo: &Repository,
    snapshot: &Snapshot,
    target: &Path,
    options: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let globs = build_globs(&options.include)?;
    let items = select(
        walk(repo, snapshot, &options.exclude_regions).await?,
        globs.as_ref(),
    );
    std::fs::create_dir_all(target).map_err(|e| ClientError::io(target, e))?;
    let target = target
        .canonicalize()
        .map_err(|e| ClientError::io(target, e))?;

    // Directories and empty files first; all checked against the target.
    let mut summary = RestoreSummary::default();
    let mut files: Vec<(PathBuf, &Item)> = Vec::new();
    let mut wanted: HashMap<BlobId, Destinations> = HashMap::new();
    for item in &items {
        let parts: Vec<&str> = item.path.iter().map(String::as_str).collect();
        let path = safe_join(&target, &parts)?;
        let rel = path.strip_prefix(&target).unwrap_or(&path).to_path_buf();
        check_no_symlink_in_parents(&target, &rel)?;
        match &item.entry.kind {
            EntryKind::Dir { .. } => {
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        return Err(ClientError::io(
                            &path,
                            std::io::Error::other("exists and is not a directory"),
                        ));
                    }
                    Err(_) => std::fs::create_dir(&path).map_err(|e| ClientError::io(&path, e))?,
                }
                summary.dirs += 1;
            }
            EntryKind::File { size, chunks } => {
                if let Ok(meta) = std::fs::symlink_metadata(&path)
                    && meta.file_type().is_symlink()
                {
                    std::fs::remove_file(&path).map_err(|e| ClientError::io(&path, e))?;
                }
                let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
                if total != *size {
                    return Err(ClientError::integrity(format!(
                        "{}: chunks add up to {total} bytes, the entry says {size}",
                        item.path_string()
                    )));
                }
                let file = no_follow_open(&path, true).map_err(|e| ClientError::io(&path, e))?;
                file.set_len(*size).map_err(|e| ClientError::io(&path, e))?;
                let index = files.len();
                let mut offset = 0u64;
                for chunk in chunks {
                    wanted.entry(chunk.id).or_default().push((index, offset));
                    offset += u64::from(chunk.len);
                }
                files.push((path, item));
                summary.files += 1;
                summary.bytes += size;
            }
            EntryKind::Symlink { .. } => summary.symlinks += 1,
        }
    }

    let ids: Vec<BlobId> = wanted.keys().copied().collect();
    let located = repo.locate(&ids).await?;
    let packs = plan_packs(wanted, &located)?;
    let paths = Arc::new(files.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>());
    let first_byte = Arc::new(OnceLock::new());
    let failures = fetch_and_write(
        repo,
        &packs,
        paths,
        options,
        progress,
        started,
        first_byte.clone(),
    )
    .await;

    // Metadata after data; symlinks last.
    for (path, item) in &files {
        let mode = item.entry.mode & 0o1777; // never setuid/setgid from a snapshot
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
        let _ = set_mtime(path, item.entry.mtime_ns);
    }
    for item in &items {
        if let EntryKind::Symlink { target: link } = &item.entry.kind {
            let parts: Vec<&str> = item.path.iter().map(String::as_str).collect();
            let path = safe_join(&target, &parts)?;
            let rel = path.strip_prefix(&target).unwrap_or(&path).to_path_buf();
            check_no_symlink_in_parents(&target, &rel)?;
            crate::path_guard::check_symlink_target(link)?;
            if std::fs::symlink_metadata(&path).is_ok() {
                std::fs::remove_file(&path).map_err(|e| ClientError::io(&path, e))?;
            }
            std::os::unix::fs::symlink(link, &path).map_err(|e| ClientError::io(&path, e))?;
        }
    }
    let mut dirs: Vec<&Item> = items
        .iter()
        .filter(|i| matches!(i.entry.kind, EntryKind::Dir { .. }))
        .collect();
    dirs.sort_by_key(|i| std::cmp::Reverse(i.path.len()));
    for item in dirs {
        let parts: Vec<&str> = item.path.iter().map(String::as_str).collect();
        let path = safe_join(&target, &parts)?;
        let _ = std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(item.entry.mode & 0o1777),
        );
        let _ = set_mtime(&path, item.entry.mtime_ns);
    }

    summary.duration_s = started.elapsed().as_secs_f64();
    summary.time_to_first_byte_s = first_byte.get().copied().unwrap_or(summary.duration_s);
    if !failures.is_empty() {
        let mut names: Vec<String> = failures.iter().map(|&i| files[i].1.path_string()).collect();
        names.sort();
        names.dedup();
        let count = names.len();
        names.truncate(20);
        return Err(ClientError::RestoreFailed {
            count,
            files: names.join(", "),
        });
    }
    Ok(summary)
}

/// Every chunk to fetch, grouped by pack, with where its bytes go.
type PackPlan = BTreeMap<[u8; 32], Vec<(BlobId, Located, Destinations)>>;

fn plan_packs(
    wanted: HashMap<BlobId, Destinations>,
    located: &HashMap<BlobId, Located>,
) -> Result<PackPlan> {
    let mut packs: PackPlan = BTreeMap::new();
    for (id, destinations) in wanted {
        let loc = located.get(&id).ok_or_else(|| {
            ClientError::integrity(format!("chunk {} is not in the index", hex::encode(id)))
        })?;
        packs
            .entry(loc.pack_id)
            .or_default()
            .push((id, *loc, destinations));
    }
    for blobs in packs.values_mut() {
        blobs.sort_by_key(|(_, loc, _)| loc.offset);
    }
    Ok(packs)
}

/// Reads every pack once and writes its checked chunks; returns the files
/// that could not be completed.
async fn fetch_and_write(
    repo: &Repository,
    packs: &PackPlan,
    paths: Arc<Vec<PathBuf>>,
    options: &RestoreOptions,
    progress: Arc<Progress>,
    started: Instant,
    first_byte: Arc<OnceLock<f64>>,
) -> Vec<usize> {
    let results = futures::stream::iter(packs.iter())
        .map(|(pack_id, blobs)| {
            let progress = progress.clone();
            let first_byte = first_byte.clone();
            let paths = paths.clone();
            async move {
                let ranges: Vec<(u64, u64)> = blobs
                    .iter()
                    .map(|(_, l, _)| (l.offset, u64::from(l.length)))
                    .collect();
                let data = match repo
                    .read_ranges(pack_id, &ranges, &options.exclude_regions)
                    .await
                {
                    Ok(data) => data,
                    Err(e) => {
                        tracing::error!(pack_id = %hex::encode(pack_id), error = %e,
                            "pack unreadable; its files are reported as failed");
                        return blobs
                            .iter()
                            .flat_map(|(_, _, d)| d.iter().map(|(f, _)| *f))
                            .collect();
                    }
                };
                let key = repo.key().clone();
                let work: Vec<(BlobId, Destinations, Vec<u8>)> = blobs
                    .iter()
                    .zip(data)
                    .map(|((id, _, d), sealed)| (*id, d.clone(), sealed))
                    .collect();
                let written = tokio::task::spawn_blocking(move || {
                    write_chunks(&key, work, &paths, &progress, started, &first_byte)
                })
                .await;
                match written {
                    Ok(failed) => failed,
                    Err(e) => {
                        tracing::error!(error = %e, "restore writer task failed");
                        blobs
                            .iter()
                            .flat_map(|(_, _, d)| d.iter().map(|(f, _)| *f))
                            .collect()
                    }
                }
            }
        })
        .buffer_unordered(PACKS_IN_FLIGHT_MAX)
        .collect::<Vec<_>>()
        .await;
    let mut failed: Vec<usize> = results.into_iter().flatten().collect();
    failed.sort_unstable();
    failed.dedup();
    failed
}

/// Decrypts, checks and writes the chunks of one pack. A chunk that fails
/// its check is not written; its files are returned as failed.
fn write_chunks(
    key: &crate::seal::MasterKey,
    work: Vec<(BlobId, Destinations, Vec<u8>)>,
    paths: &[PathBuf],
    progress: &Progress,
    started: Instant,
    first_byte: &OnceLock<f64>,
) -> Vec<usize> {
    let mut failed = Vec::new();
    let mut handles: HashMap<usize, File> = HashMap::new();
    for (id, destinations, sealed) in work {
        let plain = match key.decode_blob(&id, &sealed) {
            Ok(plain) => plain,
            Err(e) => {
                tracing::error!(blob = %hex::encode(id), error = %e, "chunk failed its check; not written");
                failed.extend(destinations.iter().map(|(f, _)| *f));
                continue;
            }
        };
        for &(file, offset) in &destinations {
            let handle = match handles.entry(file) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match no_follow_open(&paths[file], false) {
                        Ok(f) => e.insert(f),
                        Err(err) => {
                            tracing::error!(path = %paths[file].display(), error = %err, "cannot open for writing");
                            failed.push(file);
                            continue;
                        }
                    }
                }
            };
            if let Err(err) = handle.write_all_at(&plain, offset) {
                tracing::error!(path = %paths[file].display(), error = %err, "write failed");
                failed.push(file);
                continue;
            }
            progress
                .bytes
                .fetch_add(plain.len() as u64, Ordering::Relaxed);
            let _ = first_byte.set(started.elapsed().as_secs_f64());
        }
    }
    failed
}

/// Writes one file of a snapshot to `out`, chunk by chunk, each checked.
pub async fn dump(
    repo: &Repository,
    snapshot: &Snapshot,
    path: &str,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    let wanted: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut tree = repo.load_tree(&snapshot.root_tree).await?;
    for (depth, name) in wanted.iter().enumerate() {
        let entry = tree
            .entries
            .iter()
            .find(|e| e.name == *name)
            .cloned()
            .ok_or_else(|| ClientError::PathNotInSnapshot {
                path: path.to_string(),
            })?;
        let last = depth + 1 == wanted.len();
        match (&entry.kind, last) {
            (EntryKind::Dir { subtree }, false) => tree = repo.load_tree(subtree).await?,
            (EntryKind::File { chunks, .. }, true) => {
                let mut written = 0u64;
                for batch in chunks.chunks(64) {
                    let ids: Vec<BlobId> = batch.iter().map(|c| c.id).collect();
                    let blobs = repo.read_blobs(&ids, &[]).await?;
                    for id in &ids {
                        let data = blobs.get(id).ok_or_else(|| {
                            ClientError::integrity("chunk missing from the answer")
                        })?;
                        out.write_all(data)
                            .map_err(|e| ClientError::io("<stdout>", e))?;
                        written += data.len() as u64;
                    }
                }
                out.flush().map_err(|e| ClientError::io("<stdout>", e))?;
                return Ok(written);
            }
            _ => break,
        }
    }
    Err(ClientError::PathNotInSnapshot {
        path: format!("{path} (not a regular file)"),
    })
}
