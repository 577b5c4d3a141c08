//! Restore: snapshot → trees → plan → packs → checked chunks → files.
//!
//! Trees are fetched level by level, then every needed chunk is located and
//! its packs are read once each, a few at a time. Each chunk is decrypted
//! and checked against its id before a single byte of it is written.
//!
//! Writes never touch the user's files in place: each file is written to a
//! temporary name in its directory (created `0600` with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`), its data written, its mode and mtime set,
//! made durable, and only then renamed over its final name; the
//! directories renamed into are `fsync`ed at the end.
//!
//! Durability is batched: the files one pack writes whole are written and
//! closed, then made durable together by one `syncfs` per file system (on
//! a directory descriptor opened before the batch's first write), and
//! renamed only if every sync succeeded; a file spanning packs gets its own
//! `fdatasync`. A final name therefore only ever points at old content or
//! at complete content already on stable storage, because no rename is
//! issued before the sync covering its data has returned success. Since
//! Linux 5.8 `syncfs` reports any writeback error on the file system since
//! the descriptor was opened, so a lost write of the batch fails the whole
//! batch: every file of it is reported in [`RestoreSummary::failed`], its
//! temporary file removed and its final name untouched; on older or other
//! kernels, where `syncfs` may hide errors, every file is synced on its
//! own. A crash leaves at most hidden temporary names, never a partial
//! file under a final name; a failure or a cancel removes them. A file that cannot
//! be completed (its pack unreadable, a chunk failing its check, a write
//! error) keeps its old content or stays absent, its temporary file is
//! removed, and it is named in [`RestoreSummary::failed`] with the reason
//! (the pack id for an unreadable pack); restore goes on with every other
//! file. Whatever exists at a restored name (a symlink, a hard link to
//! elsewhere, a FIFO, a device) is replaced by the rename, never followed
//! or written through; a directory that exists as anything but a real
//! directory is refused with everything below it.
//!
//! Resources are bounded independently of the snapshot's size: at most
//! [`RESTORE_BYTES_IN_FLIGHT_MAX`] sealed bytes are fetched and not yet
//! written, chunks are decrypted one at a time just before their write (no
//! pack's plaintext is held whole), at most [`PACKS_IN_FLIGHT_MAX`] packs
//! are in progress, each written by at most [`FILE_WRITERS_PER_PACK_MAX`]
//! threads holding one file open each. Memory per file is a few words.
//!
//! Paths come from the snapshot, which may be hostile: every name is
//! checked, no write follows a symlink, and symlinks are created only after
//! all file data is written, so none can redirect a write outside the
//! target. Hard links, FIFOs and (as root) device nodes are recreated;
//! what cannot be is named in [`RestoreSummary::skipped`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, FileTimes, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::backup::{Progress, Skipped};
use crate::error::{ClientError, Result};
use crate::path_guard::{check_name, check_no_symlink_in_parents, display_name, safe_join};
use crate::repo::{Located, Repository, Snapshot};
use crate::seal::BlobId;
use crate::tree::{EntryKind, TreeEntry};

/// Packs being fetched, written or synced at once during a restore (each
/// also bounded by [`RESTORE_BYTES_IN_FLIGHT_MAX`]).
pub const PACKS_IN_FLIGHT_MAX: usize = 12;
/// Sealed bytes fetched and not yet written, at most, during a restore:
/// what bounds the restore's memory, whatever the snapshot's size. (The
/// transport may hold a reply twice while decoding it.)
pub const RESTORE_BYTES_IN_FLIGHT_MAX: usize = 64 * 1024 * 1024;
/// Threads writing the files of one pack at once (when it holds many files).
pub const FILE_WRITERS_PER_PACK_MAX: usize = 8;
/// Files in a pack from which it is written by several threads.
const FILES_PER_PARALLEL_WRITER_MIN: usize = 16;
/// Attempts at a fresh temporary name before giving up on a file.
const TEMP_NAME_ATTEMPTS_MAX: usize = 16;
/// Failed files named in the error of [`restore`] (all are in the summary).
const FAILURES_IN_ERROR_MAX: usize = 20;

/// One entry of a snapshot with its path from the root.
#[derive(Debug, Clone)]
pub struct Item {
    /// Path components below the snapshot root, as the file system's bytes.
    pub path: Vec<Vec<u8>>,
    pub entry: TreeEntry,
}

impl Item {
    /// The path for people: components joined with `/`, control characters
    /// and bytes that are not UTF-8 escaped (see
    /// [`crate::path_guard::display_name`]).
    pub fn path_string(&self) -> String {
        self.path
            .iter()
            .map(|c| display_name(c))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The path below the snapshot root, exactly as stored.
    pub fn rel_path(&self) -> PathBuf {
        self.path
            .iter()
            .map(|c| OsStr::from_bytes(c))
            .collect::<PathBuf>()
    }
}

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Globs on the path below the snapshot root; empty = everything.
    pub include: Vec<String>,
    /// Regions to read nothing from (failover drills).
    pub exclude_regions: Vec<String>,
    /// Skip the `fsync` of each file and directory. Files are still
    /// renamed into place only when complete, so a crash of the restore
    /// leaves no half-written file, but after a power loss a renamed file
    /// may be empty. For throw-away restores (tests, drills).
    pub no_fsync: bool,
}

/// A file or entry a restore could not restore, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    /// The path below the target, escaped for display.
    pub path: String,
    /// Why (an unreadable pack names the pack id).
    pub reason: String,
}

/// What a restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files restored as hard links of another restored file.
    pub hardlinks: u64,
    /// FIFOs and device nodes restored.
    pub special: u64,
    pub bytes: u64,
    pub time_to_first_byte_s: f64,
    pub duration_s: f64,
    /// Entries deliberately not restored (device nodes without root), with why.
    pub skipped: Vec<Skipped>,
    /// Entries that could not be restored, with why; they keep whatever was
    /// at their name before (or stay absent).
    pub failed: Vec<Failure>,
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
    let mut level: Vec<(Vec<Vec<u8>>, BlobId)> = vec![(Vec::new(), snapshot.root_tree)];
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
/// the directories leading to them. Globs match the path's bytes, so
/// non-UTF-8 names can be selected too.
fn select(items: Vec<Item>, globs: Option<&GlobSet>) -> Vec<Item> {
    let Some(globs) = globs else {
        return items;
    };
    let joined = |path: &[Vec<u8>]| {
        path.iter()
            .map(|c| OsStr::from_bytes(c))
            .collect::<PathBuf>()
    };
    let matches = |path: &[Vec<u8>]| (1..=path.len()).any(|n| globs.is_match(joined(&path[..n])));
    let mut keep_dirs: HashSet<Vec<Vec<u8>>> = Default::default();
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

fn system_time(mtime_ns: i64) -> SystemTime {
    if mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Mode bits a restore applies: never setuid or setgid from a snapshot.
fn restored_mode(mode: u32) -> u32 {
    mode & 0o1777
}

fn set_mtime(path: &Path, mtime_ns: i64) -> std::io::Result<()> {
    let file = File::open(path)?;
    file.set_modified(system_time(mtime_ns))
}

/// A fresh temporary name in `dir`: hidden, short (whatever the final
/// name's length), unique within this process and unlikely across
/// processes; creation with `O_EXCL` settles the rest.
fn temp_name(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let noise: u32 = rand::random();
    dir.join(format!(
        ".cairn-restore-{}-{n}-{noise:08x}.tmp",
        std::process::id()
    ))
}

/// Runs `create` on fresh temporary names in `dir` until one does not exist yet.
fn with_temp_name<T>(
    dir: &Path,
    mut create: impl FnMut(&Path) -> std::io::Result<T>,
) -> std::io::Result<(PathBuf, T)> {
    let mut last = None;
    for _ in 0..TEMP_NAME_ATTEMPTS_MAX {
        let tmp = temp_name(dir);
        match create(&tmp) {
            Ok(value) => return Ok((tmp, value)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

/// Creates a new temporary file (`0600`, never through a symlink).
fn create_temp_file(dir: &Path) -> std::io::Result<(PathBuf, File)> {
    with_temp_name(dir, |tmp| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(tmp)
    })
}

/// Mode bits and mtime of a special file placed at a temporary name.
fn set_mode_and_mtime(tmp: &Path, mode: u32, mtime_ns: i64) -> std::io::Result<()> {
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))?;
    set_mtime_no_follow(tmp, mtime_ns)
}

/// Sets the mtime (and atime) of `path` itself, never of what a symlink
/// points to.
fn set_mtime_no_follow(path: &Path, mtime_ns: i64) -> std::io::Result<()> {
    let time = rustix::fs::Timespec {
        tv_sec: mtime_ns.max(0) / 1_000_000_000,
        tv_nsec: (mtime_ns.max(0) % 1_000_000_000) as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(std::io::Error::from)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Mode and mtime of a completed temporary file.
fn set_metadata(slot: &FileSlot, handle: &File) -> std::result::Result<(), String> {
    handle
        .set_permissions(std::fs::Permissions::from_mode(restored_mode(slot.mode)))
        .map_err(|e| format!("setting the mode: {e}"))?;
    handle
        .set_times(FileTimes::new().set_modified(system_time(slot.mtime_ns)))
        .map_err(|e| format!("setting the mtime: {e}"))
}

/// Whether `syncfs` returns writeback errors: Linux since 5.8 does (earlier
/// kernels return 0 whatever happened, so a batch sync would hide a lost
/// write). Anything unknown answers no, and files are synced one by one.
fn syncfs_reports_errors() -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (5, 8),
        _ => false,
    }
}

/// Flushes the whole file system holding `dir` (data and inodes) and
/// returns any writeback error on it since `dir` was opened.
#[cfg(target_os = "linux")]
fn sync_file_system(dir: &File) -> std::io::Result<()> {
    rustix::fs::syncfs(dir).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn sync_file_system(_dir: &File) -> std::io::Result<()> {
    // Never reached: batches are only opened where `syncfs` exists.
    Err(std::io::Error::other("syncfs is not available here"))
}

/// Files of one pack written whole to their temporary names, then made
/// durable together by one `syncfs` per file system and only then renamed
/// into place ([`Writer::commit_batch`]). Holds one directory descriptor
/// per file system, opened before the batch's first write: `syncfs`
/// reports a writeback error that happened on that file system at any time
/// since, so no lost write of the batch goes unreported (at worst another
/// pack's error fails this batch too).
struct Batch {
    file_systems: Vec<File>,
    /// Files written, mode and mtime set, closed, awaiting sync and rename.
    staged: Mutex<Vec<usize>>,
}

/// A regular file being restored.
struct FileSlot {
    final_path: PathBuf,
    dir: PathBuf,
    display: String,
    size: u64,
    mode: u32,
    mtime_ns: i64,
    /// Chunk writes the whole file takes: a pack that makes all of them
    /// wrote the whole file, so the pack's batch sync covers it.
    writes_total: usize,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The temporary file, once created and until renamed or removed.
    tmp: Option<PathBuf>,
    /// Chunk writes still to come.
    remaining: usize,
    /// Why the file cannot be completed (first reason wins).
    failed: Option<String>,
    /// Renamed into place.
    done: bool,
}

impl SlotState {
    /// The last step of a file: `step` on its temporary file (complete it,
    /// or rename it into place). Done on success; on failure the temporary
    /// file is removed and the reason kept, so the final name is untouched.
    fn finish(&mut self, step: impl FnOnce(&Path) -> std::result::Result<(), String>) {
        let Some(tmp) = self.tmp.take() else {
            self.failed = Some("temporary file vanished".into());
            return;
        };
        match step(&tmp) {
            Ok(()) => self.done = true,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                self.failed = Some(e);
            }
        }
    }
}

/// Shared by the pack workers of one restore. Dropping it (a finished,
/// failed or cancelled restore) removes every temporary file left.
struct Writer {
    files: Vec<FileSlot>,
    fsync: bool,
    /// Make files written whole by one pack durable with one `syncfs` per
    /// pack instead of one `fdatasync` each (see [`Batch`]); only where
    /// `syncfs` reports writeback errors.
    batch_sync: bool,
    /// How a batch's file system is synced: [`sync_file_system`]; a seam
    /// so that tests can make it fail.
    sync_fs: fn(&File) -> std::io::Result<()>,
    /// Directories that received a rename, synced once at the end.
    renamed_into: Mutex<HashSet<PathBuf>>,
    /// Set when the restore is dropped (cancelled): pack workers still
    /// running stop at the next file and complete nothing more.
    cancelled: std::sync::atomic::AtomicBool,
}

/// Held by the restore future: dropping it (the future finished or was
/// cancelled) tells pack workers still running to stop writing.
struct CancelOnDrop(Arc<Writer>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        for slot in &mut self.files {
            let state = slot.state.get_mut().unwrap_or_else(|p| p.into_inner());
            if let Some(tmp) = state.tmp.take() {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

impl Writer {
    fn slot(&self, file: usize) -> std::sync::MutexGuard<'_, SlotState> {
        self.files[file]
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn fail(&self, file: usize, reason: impl FnOnce() -> String) {
        let mut state = self.slot(file);
        if state.failed.is_none() {
            state.failed = Some(reason());
        }
        if let Some(tmp) = state.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }

    /// Opens the file's temporary file for writing, creating it (pre-sized,
    /// so chunks of zeros can stay holes) on the first write.
    fn open_for_write(&self, file: usize) -> std::result::Result<Option<File>, String> {
        let slot = &self.files[file];
        let mut state = self.slot(file);
        if state.failed.is_some() || state.done || self.is_cancelled() {
            return Ok(None);
        }
        if let Some(tmp) = &state.tmp {
            return OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(tmp)
                .map(Some)
                .map_err(|e| format!("reopening the temporary file: {e}"));
        }
        let (tmp, handle) = create_temp_file(&slot.dir)
            .map_err(|e| format!("creating a temporary file in its directory: {e}"))?;
        state.tmp = Some(tmp);
        handle
            .set_len(slot.size)
            .map_err(|e| format!("sizing the temporary file: {e}"))?;
        Ok(Some(handle))
    }

    /// Counts `writes` done on `handle`; the last writer of a file
    /// completes it: fsync, mode, mtime, rename into place. A file written
    /// whole under `batch` only gets its mode and mtime here and is staged:
    /// [`Writer::commit_batch`] syncs and renames it.
    fn written(&self, file: usize, handle: File, writes: usize, batch: Option<&Batch>) {
        let slot = &self.files[file];
        let mut state = self.slot(file);
        state.remaining = state.remaining.saturating_sub(writes);
        // Cancelled: the temporary file stays in the slot for Drop to remove.
        if state.remaining > 0 || state.failed.is_some() || state.done || self.is_cancelled() {
            return;
        }
        if let Some(batch) = batch.filter(|_| writes == slot.writes_total) {
            if state.tmp.is_none() {
                state.failed = Some("temporary file vanished".into());
                return;
            }
            match set_metadata(slot, &handle) {
                Ok(()) => batch
                    .staged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(file),
                Err(e) => {
                    if let Some(tmp) = state.tmp.take() {
                        let _ = std::fs::remove_file(tmp);
                    }
                    state.failed = Some(e);
                }
            }
            // Closed now: open files stay bounded by the writers, not the batch.
            drop(handle);
            return;
        }
        state.finish(|tmp| self.complete(slot, &handle, tmp));
    }

    fn complete(
        &self,
        slot: &FileSlot,
        handle: &File,
        tmp: &Path,
    ) -> std::result::Result<(), String> {
        if self.fsync {
            // Data and size; mode and mtime follow, and the rename is made
            // durable by the directory fsync at the end.
            handle.sync_data().map_err(|e| format!("fsync: {e}"))?;
        }
        set_metadata(slot, handle)?;
        self.rename_into_place(tmp, &slot.final_path, &slot.dir)
    }

    /// Starts a batch for `files` (those one pack writes): `None` when
    /// files are synced one by one (batching off, or a file system of the
    /// batch could not be opened, which per-file fsync then reports).
    /// Called before any of the batch's data is written, so that `syncfs`
    /// on these descriptors reports every writeback error of those writes.
    fn open_batch(&self, files: impl Iterator<Item = usize>) -> Option<Batch> {
        if !self.batch_sync {
            return None;
        }
        let mut devices: HashSet<u64> = HashSet::new();
        let mut checked: HashSet<&Path> = HashSet::new();
        let mut file_systems = Vec::new();
        for file in files {
            let dir = self.files[file].dir.as_path();
            if !checked.insert(dir) {
                continue;
            }
            let opened = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(dir)
                .and_then(|d| {
                    use std::os::unix::fs::MetadataExt;
                    let dev = d.metadata()?.dev();
                    Ok((dev, d))
                });
            match opened {
                Ok((dev, d)) => {
                    if devices.insert(dev) {
                        file_systems.push(d);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e,
                        "directory not openable for a batch sync; this pack's files are synced one by one");
                    return None;
                }
            }
        }
        Some(Batch {
            file_systems,
            staged: Mutex::new(Vec::new()),
        })
    }

    /// Makes every staged file of `batch` durable with one `syncfs` per
    /// file system, then renames each into place. If a sync fails, every
    /// staged file fails: its temporary file is removed, its final name
    /// untouched.
    fn commit_batch(&self, batch: Batch) {
        let staged = batch.staged.into_inner().unwrap_or_else(|p| p.into_inner());
        if staged.is_empty() || self.is_cancelled() {
            // Cancelled: the temporary files stay in their slots for Drop.
            return;
        }
        let synced = batch
            .file_systems
            .iter()
            .try_for_each(|fs| (self.sync_fs)(fs));
        if let Err(e) = synced {
            tracing::error!(files = staged.len(), error = %e,
                "batch sync failed; its files are reported as failed and keep their old content, restore goes on");
            for file in staged {
                self.fail(file, || format!("syncing the file system: {e}"));
            }
            return;
        }
        for file in staged {
            let slot = &self.files[file];
            let mut state = self.slot(file);
            if self.is_cancelled() {
                return;
            }
            if state.failed.is_some() || state.done {
                continue;
            }
            state.finish(|tmp| self.rename_into_place(tmp, &slot.final_path, &slot.dir));
        }
    }

    fn rename_into_place(
        &self,
        tmp: &Path,
        dest: &Path,
        dir: &Path,
    ) -> std::result::Result<(), String> {
        std::fs::rename(tmp, dest).map_err(|e| format!("renaming into place: {e}"))?;
        self.renamed_into
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.to_path_buf());
        Ok(())
    }

    /// Writes an empty file (no chunks) at once.
    fn write_empty(&self, file: usize, batch: Option<&Batch>) {
        match self.open_for_write(file) {
            Ok(Some(handle)) => self.written(file, handle, 0, batch),
            Ok(None) => {}
            Err(e) => self.fail(file, || e),
        }
    }

    /// Puts a non-file entry (symlink, FIFO, device, hard link) in place:
    /// `create` makes it at a temporary name, then it is renamed over `dest`.
    fn place(
        &self,
        dest: &Path,
        create: impl FnMut(&Path) -> std::io::Result<()>,
        after: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> std::result::Result<(), String> {
        let dir = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
        let (tmp, ()) = with_temp_name(&dir, create).map_err(|e| format!("creating: {e}"))?;
        let result = after(&tmp)
            .map_err(|e| format!("setting metadata: {e}"))
            .and_then(|()| self.rename_into_place(&tmp, dest, &dir));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// A chunk's destinations: (file index, offset in the file).
type Destinations = Vec<(usize, u64)>;

/// Restores a snapshot (or the part matching `include`) under `target`;
/// any entry that could not be restored makes it an error
/// ([`ClientError::RestoreFailed`]) after everything else is restored. Use
/// [`restore_report`] to get every failure with its reason.
pub async fn restore(
    repo: &Repository,
    snapshot: &Snapshot,
    target: &Path,
    options: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary> {
    let summary = restore_report(repo, snapshot, target, options, progress).await?;
    failures_to_error(&summary)?;
    Ok(summary)
}

/// The error of a summary with failures (`Ok` without).
pub fn failures_to_error(summary: &RestoreSummary) -> Result<()> {
    if summary.failed.is_empty() {
        return Ok(());
    }
    let mut names: Vec<String> = summary
        .failed
        .iter()
        .take(FAILURES_IN_ERROR_MAX)
        .map(|f| format!("{} ({})", f.path, f.reason))
        .collect();
    if summary.failed.len() > FAILURES_IN_ERROR_MAX {
        names.push(format!(
            "and {} more",
            summary.failed.len() - FAILURES_IN_ERROR_MAX
        ));
    }
    Err(ClientError::RestoreFailed {
        count: summary.failed.len(),
        files: names.join("; "),
    })
}

/// Restores what it can and reports the rest: `Err` only when nothing can
/// be restored (the snapshot's trees unreadable, the target not creatable);
/// every entry that failed is in [`RestoreSummary::failed`].
pub async fn restore_report(
    repo: &Repository,
    snapshot: &Snapshot,
    target: &Path,
    options: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    // A dictionary stored since this repository was opened (another host's
    // first backup of a dataset) decodes that dataset's chunks. Without
    // the listing, the restore goes on with the dictionaries it has.
    if let Err(error) = repo.refresh_dictionaries().await {
        tracing::warn!(%error, "compression dictionaries not re-listed; using those loaded at open");
    }
    let globs = build_globs(&options.include)?;
    let items = select(
        walk(repo, snapshot, &options.exclude_regions).await?,
        globs.as_ref(),
    );
    std::fs::create_dir_all(target).map_err(|e| ClientError::io(target, e))?;
    let target = target
        .canonicalize()
        .map_err(|e| ClientError::io(target, e))?;

    let mut summary = RestoreSummary::default();
    let mut failed: Vec<Failure> = Vec::new();
    // Directories not restored: nothing below them is written.
    let mut failed_dirs: HashSet<Vec<Vec<u8>>> = HashSet::new();
    let mut slots: Vec<FileSlot> = Vec::new();
    let mut file_items: Vec<&Item> = Vec::new();
    let mut wanted: HashMap<BlobId, Destinations> = HashMap::new();
    // Hard-link group → the file restored with data; later members link to it.
    let mut leaders: HashMap<u64, usize> = HashMap::new();
    let mut links: Vec<(usize, PathBuf, &Item)> = Vec::new();
    let mut others: Vec<(PathBuf, &Item)> = Vec::new();
    let mut dirs: Vec<(PathBuf, &Item)> = Vec::new();

    // Directories first (parents before children), files planned.
    for item in &items {
        if (1..item.path.len()).any(|n| failed_dirs.contains(&item.path[..n])) {
            failed.push(Failure {
                path: item.path_string(),
                reason: "its directory could not be restored".into(),
            });
            continue;
        }
        let checked = safe_join(&target, &item.path).and_then(|path| {
            check_no_symlink_in_parents(&target, &item.rel_path())?;
            Ok(path)
        });
        let path = match checked {
            Ok(path) => path,
            Err(e) => {
                if matches!(item.entry.kind, EntryKind::Dir { .. }) {
                    failed_dirs.insert(item.path.clone());
                }
                failed.push(Failure {
                    path: item.path_string(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        match &item.entry.kind {
            EntryKind::Dir { .. } => {
                let made = match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => Ok(()),
                    Ok(_) => Err("exists and is not a directory (restore never follows or replaces a symlink to a directory)".to_string()),
                    Err(_) => std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(|e| format!("creating the directory: {e}")),
                };
                match made {
                    Ok(()) => {
                        summary.dirs += 1;
                        dirs.push((path, item));
                    }
                    Err(reason) => {
                        failed_dirs.insert(item.path.clone());
                        failed.push(Failure {
                            path: item.path_string(),
                            reason,
                        });
                    }
                }
            }
            EntryKind::File {
                size,
                chunks,
                hardlink,
            } => {
                if let Some(group) = hardlink {
                    if let Some(&leader) = leaders.get(group) {
                        links.push((leader, path, item));
                        continue;
                    }
                    leaders.insert(*group, slots.len());
                }
                let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
                if total != *size {
                    return Err(ClientError::integrity(format!(
                        "{}: chunks add up to {total} bytes, the entry says {size}",
                        item.path_string()
                    )));
                }
                let index = slots.len();
                let mut offset = 0u64;
                for chunk in chunks {
                    wanted.entry(chunk.id).or_default().push((index, offset));
                    offset += u64::from(chunk.len);
                }
                slots.push(FileSlot {
                    dir: path.parent().unwrap_or(&target).to_path_buf(),
                    final_path: path,
                    display: item.path_string(),
                    size: *size,
                    mode: item.entry.mode,
                    mtime_ns: item.entry.mtime_ns,
                    state: Mutex::new(SlotState {
                        remaining: chunks.len(),
                        ..SlotState::default()
                    }),
                    writes_total: chunks.len(),
                });
                file_items.push(item);
            }
            EntryKind::Symlink { .. } | EntryKind::Fifo | EntryKind::Device { .. } => {
                others.push((path, item))
            }
        }
    }

    let writer = Arc::new(Writer {
        files: slots,
        fsync: !options.no_fsync,
        batch_sync: !options.no_fsync && syncfs_reports_errors(),
        sync_fs: sync_file_system,
        renamed_into: Mutex::new(HashSet::new()),
        cancelled: std::sync::atomic::AtomicBool::new(false),
    });
    let _cancel_on_drop = CancelOnDrop(writer.clone());
    let empty: Vec<usize> = (0..writer.files.len())
        .filter(|&index| writer.files[index].size == 0)
        .collect();
    let batch = writer.open_batch(empty.iter().copied());
    for &index in &empty {
        writer.write_empty(index, batch.as_ref());
    }
    if let Some(batch) = batch {
        writer.commit_batch(batch);
    }

    let first_byte = Arc::new(OnceLock::new());
    if !wanted.is_empty() {
        let ids: Vec<BlobId> = wanted.keys().copied().collect();
        let located = repo.locate(&ids).await?;
        let packs = plan_packs(wanted, &located, &writer);
        fetch_and_write(
            repo,
            packs,
            writer.clone(),
            options,
            progress,
            started,
            first_byte.clone(),
        )
        .await;
    }

    // Every file is now complete or failed.
    for (index, slot) in writer.files.iter().enumerate() {
        let mut state = writer.slot(index);
        if state.done {
            summary.files += 1;
            summary.bytes += slot.size;
            continue;
        }
        if let Some(tmp) = state.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
        failed.push(Failure {
            path: slot.display.clone(),
            reason: state
                .failed
                .clone()
                .unwrap_or_else(|| "some of its data never arrived".into()),
        });
    }

    // Hard links of restored files.
    for (leader, path, item) in links {
        let source = &writer.files[leader];
        if !writer.slot(leader).done {
            failed.push(Failure {
                path: item.path_string(),
                reason: format!(
                    "hard link of {}, which could not be restored",
                    source.display
                ),
            });
            continue;
        }
        let placed = writer.place(
            &path,
            |tmp| std::fs::hard_link(&source.final_path, tmp),
            |_| Ok(()),
        );
        match placed {
            Ok(()) => summary.hardlinks += 1,
            Err(reason) => failed.push(Failure {
                path: item.path_string(),
                reason,
            }),
        }
    }

    // Symlinks, FIFOs and devices after all data.
    for (path, item) in others {
        let mode = restored_mode(item.entry.mode);
        let mtime_ns = item.entry.mtime_ns;
        let placed = match &item.entry.kind {
            EntryKind::Symlink { target: link } => {
                if let Err(e) = crate::path_guard::check_symlink_target(link) {
                    Err(e.to_string())
                } else {
                    writer
                        .place(
                            &path,
                            |tmp| std::os::unix::fs::symlink(OsStr::from_bytes(link), tmp),
                            |tmp| set_mtime_no_follow(tmp, mtime_ns),
                        )
                        .map(|()| summary.symlinks += 1)
                }
            }
            EntryKind::Fifo => writer
                .place(
                    &path,
                    |tmp| {
                        rustix::fs::mkfifoat(
                            rustix::fs::CWD,
                            tmp,
                            rustix::fs::Mode::from_raw_mode(0o600),
                        )
                        .map_err(std::io::Error::from)
                    },
                    |tmp| set_mode_and_mtime(tmp, mode, mtime_ns),
                )
                .map(|()| summary.special += 1),
            EntryKind::Device { character, rdev } => {
                if !is_root() {
                    summary.skipped.push(Skipped {
                        path: item.path_string(),
                        reason: "device node not restored: creating one needs root".into(),
                    });
                    continue;
                }
                let kind = if *character {
                    rustix::fs::FileType::CharacterDevice
                } else {
                    rustix::fs::FileType::BlockDevice
                };
                writer
                    .place(
                        &path,
                        |tmp| {
                            rustix::fs::mknodat(
                                rustix::fs::CWD,
                                tmp,
                                kind,
                                rustix::fs::Mode::from_raw_mode(0o600),
                                *rdev,
                            )
                            .map_err(std::io::Error::from)
                        },
                        |tmp| set_mode_and_mtime(tmp, mode, mtime_ns),
                    )
                    .map(|()| summary.special += 1)
            }
            EntryKind::Dir { .. } | EntryKind::File { .. } => Ok(()),
        };
        if let Err(reason) = placed {
            failed.push(Failure {
                path: item.path_string(),
                reason,
            });
        }
    }

    // Directory metadata deepest first, then one fsync per directory written to.
    dirs.sort_by_key(|(_, i)| std::cmp::Reverse(i.path.len()));
    for (path, item) in &dirs {
        let _ = std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(restored_mode(item.entry.mode)),
        );
        let _ = set_mtime(path, item.entry.mtime_ns);
    }
    if writer.fsync {
        let renamed: Vec<PathBuf> = writer
            .renamed_into
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        // Overlapping fsyncs commit together; one after another, a
        // restore of many directories would wait for each.
        let share = renamed.len().div_ceil(FILE_WRITERS_PER_PACK_MAX).max(1);
        std::thread::scope(|scope| {
            for dirs in renamed.chunks(share) {
                scope.spawn(move || {
                    for dir in dirs {
                        let synced = OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                            .open(dir)
                            .and_then(|d| d.sync_all());
                        if let Err(e) = synced {
                            tracing::warn!(path = %dir.display(), error = %e,
                                "directory fsync failed; the restored names may not survive a power loss");
                        }
                    }
                });
            }
        });
    }

    failed.sort_by(|a, b| a.path.cmp(&b.path));
    summary.failed = failed;
    summary.duration_s = started.elapsed().as_secs_f64();
    summary.time_to_first_byte_s = first_byte.get().copied().unwrap_or(summary.duration_s);
    Ok(summary)
}

/// Every chunk to fetch, grouped by pack, with where its bytes go.
type PackPlan = BTreeMap<[u8; 32], Vec<(BlobId, Located, Destinations)>>;

/// Groups chunks by pack; a chunk the index does not know fails its files.
fn plan_packs(
    wanted: HashMap<BlobId, Destinations>,
    located: &HashMap<BlobId, Located>,
    writer: &Writer,
) -> PackPlan {
    let mut packs: PackPlan = BTreeMap::new();
    for (id, destinations) in wanted {
        let Some(loc) = located.get(&id) else {
            for (file, _) in destinations {
                writer.fail(file, || {
                    format!("chunk {} is not in the index", hex::encode(id))
                });
            }
            continue;
        };
        packs
            .entry(loc.pack_id)
            .or_default()
            .push((id, *loc, destinations));
    }
    for blobs in packs.values_mut() {
        blobs.sort_by_key(|(_, loc, _)| loc.offset);
    }
    packs
}

/// Units of [`RESTORE_BYTES_IN_FLIGHT_MAX`] the byte budget counts in.
const BUDGET_UNIT: u64 = 64 * 1024;

/// Budget units a pack read of `bytes` takes: never more than the whole
/// budget, so that one read larger than the budget still runs (alone).
fn budget_units(bytes: u64) -> u32 {
    let total = (RESTORE_BYTES_IN_FLIGHT_MAX as u64 / BUDGET_UNIT).max(1);
    bytes.div_ceil(BUDGET_UNIT).clamp(1, total) as u32
}

/// Reads every pack once and writes its checked chunks; files that cannot
/// be completed are marked failed in `writer`.
///
/// Memory is bounded by bytes, not packs: a pack's sealed bytes take their
/// share of [`RESTORE_BYTES_IN_FLIGHT_MAX`] before they are asked for and
/// give it back as soon as the pack's chunks are written, before the
/// batch's sync. Chunks are decrypted, checked and written one at a time
/// by the threads writing the pack's files, so no pack's plaintext is ever
/// held whole. Fetches of further packs overlap the writing and syncing of
/// earlier ones.
async fn fetch_and_write(
    repo: &Repository,
    packs: PackPlan,
    writer: Arc<Writer>,
    options: &RestoreOptions,
    progress: Arc<Progress>,
    started: Instant,
    first_byte: Arc<OnceLock<f64>>,
) {
    let budget = Arc::new(tokio::sync::Semaphore::new(budget_units(
        RESTORE_BYTES_IN_FLIGHT_MAX as u64,
    ) as usize));
    futures::stream::iter(packs)
        .map(|(pack_id, blobs)| {
            let progress = progress.clone();
            let first_byte = first_byte.clone();
            let writer = writer.clone();
            let budget = budget.clone();
            async move {
                let ranges: Vec<(u64, u64)> = blobs
                    .iter()
                    .map(|(_, l, _)| (l.offset, u64::from(l.length)))
                    .collect();
                let fail_all = |writer: &Writer, why: &str| {
                    for (_, _, destinations) in &blobs {
                        for &(file, _) in destinations {
                            writer.fail(file, || why.to_string());
                        }
                    }
                };
                let sealed_bytes: u64 = ranges.iter().map(|r| r.1).sum();
                // The semaphore is never closed: an error cannot happen,
                // but would only fail this pack's files.
                let permit = match budget.acquire_many_owned(budget_units(sealed_bytes)).await {
                    Ok(permit) => permit,
                    Err(e) => {
                        fail_all(&writer, &format!("restore memory budget: {e}"));
                        return;
                    }
                };
                if writer.is_cancelled() {
                    return;
                }
                let data = match repo
                    .read_ranges(&pack_id, &ranges, &options.exclude_regions)
                    .await
                {
                    Ok(data) => data,
                    Err(e) => {
                        tracing::error!(pack_id = %hex::encode(pack_id), error = %e,
                            "pack unreadable; its files are reported as failed, restore goes on");
                        fail_all(
                            &writer,
                            &format!("pack {} unreadable: {e}", hex::encode(pack_id)),
                        );
                        return;
                    }
                };
                let key = repo.key().clone();
                let work: Vec<(BlobId, Destinations, prost::bytes::Bytes)> = blobs
                    .iter()
                    .zip(data)
                    .map(|((id, _, d), sealed)| (*id, d.clone(), sealed))
                    .collect();
                let pack_hex = hex::encode(pack_id);
                let task_writer = writer.clone();
                let written = tokio::task::spawn_blocking(move || {
                    write_chunks(
                        &key,
                        work,
                        &task_writer,
                        &pack_hex,
                        &progress,
                        started,
                        &first_byte,
                        permit,
                    )
                })
                .await;
                if let Err(e) = written {
                    tracing::error!(error = %e, "restore writer task failed");
                    fail_all(&writer, &format!("restore writer task failed: {e}"));
                }
            }
        })
        .buffer_unordered(PACKS_IN_FLIGHT_MAX)
        .collect::<Vec<()>>()
        .await;
}

/// Writes the chunks of one pack file by file, each writer thread holding
/// one file open and decrypting and checking each chunk just before
/// writing it. A chunk that fails its check is not written; its files
/// fail. `budget` (the pack's share of the memory budget) is released once
/// the sealed chunks are dropped, before the batch is synced.
#[allow(clippy::too_many_arguments)]
fn write_chunks(
    key: &crate::seal::MasterKey,
    work: Vec<(BlobId, Destinations, prost::bytes::Bytes)>,
    writer: &Writer,
    pack_hex: &str,
    progress: &Progress,
    started: Instant,
    first_byte: &OnceLock<f64>,
    budget: tokio::sync::OwnedSemaphorePermit,
) {
    let mut by_file: BTreeMap<usize, Vec<(u64, usize)>> = BTreeMap::new();
    for (chunk, (_, destinations, _)) in work.iter().enumerate() {
        for &(file, offset) in destinations {
            by_file.entry(file).or_default().push((offset, chunk));
        }
    }
    // Many small files: a few writers share the pack's files, so their
    // fsyncs overlap (the file system commits them together) instead of
    // queueing one behind another, and their chunks are decoded on every
    // core. Each writer holds one file open.
    let by_file: Vec<(usize, Vec<(u64, usize)>)> = by_file.into_iter().collect();
    let writers = if by_file.len() >= FILES_PER_PARALLEL_WRITER_MIN {
        FILE_WRITERS_PER_PACK_MAX
    } else {
        1
    };
    let share = by_file.len().div_ceil(writers).max(1);
    // Files this pack writes whole are made durable together after all of
    // them are written; files spanning packs are synced one by one.
    let batch = writer.open_batch(by_file.iter().map(|(file, _)| *file));
    let chunks = Chunks {
        key,
        work: &work,
        pack_hex,
    };
    let write_files = |files: &[(usize, Vec<(u64, usize)>)]| {
        for (file, writes) in files {
            if writer.is_cancelled() {
                return;
            }
            let handle = write_file(
                writer, *file, writes, &chunks, progress, started, first_byte,
            );
            if let Some(handle) = handle {
                writer.written(*file, handle, writes.len(), batch.as_ref());
            }
        }
    };
    if writers == 1 {
        write_files(&by_file);
    } else {
        std::thread::scope(|scope| {
            for files in by_file.chunks(share) {
                scope.spawn(|| write_files(files));
            }
        });
    }
    // Everything of this pack is on its way to disk: its memory goes back
    // to the budget before the (slow) sync.
    drop(work);
    drop(budget);
    if let Some(batch) = batch {
        writer.commit_batch(batch);
    }
}

/// The sealed chunks of one pack, opened one at a time on demand.
struct Chunks<'a> {
    key: &'a crate::seal::MasterKey,
    work: &'a [(BlobId, Destinations, prost::bytes::Bytes)],
    pack_hex: &'a str,
}

impl Chunks<'_> {
    /// Chunk `index` decrypted and checked against its id, or why not.
    fn open(&self, index: usize) -> std::result::Result<Vec<u8>, String> {
        let (id, _, sealed) = &self.work[index];
        self.key.decode_blob(id, sealed).map_err(|e| {
            tracing::error!(blob = %hex::encode(id), pack_id = %self.pack_hex, error = %e,
                "chunk failed its check; not written");
            format!(
                "chunk {} of pack {} failed its check: {e}",
                hex::encode(id),
                self.pack_hex
            )
        })
    }
}

/// Writes one file's chunks of a pack into its temporary file, each
/// decrypted and checked just before, and returns it for
/// [`Writer::written`] (`None`: nothing to do, or the file failed).
fn write_file(
    writer: &Writer,
    file: usize,
    writes: &[(u64, usize)],
    chunks: &Chunks<'_>,
    progress: &Progress,
    started: Instant,
    first_byte: &OnceLock<f64>,
) -> Option<File> {
    let handle = match writer.open_for_write(file) {
        Ok(Some(handle)) => handle,
        Ok(None) => return None,
        Err(e) => {
            writer.fail(file, || e);
            return None;
        }
    };
    for &(offset, chunk) in writes {
        let data = match chunks.open(chunk) {
            Ok(data) => data,
            Err(e) => {
                drop(handle);
                writer.fail(file, || e);
                return None;
            }
        };
        // The temporary file is pre-sized: zeros can stay a hole.
        if data.iter().all(|&b| b == 0) {
            continue;
        }
        if let Err(e) = handle.write_all_at(&data, offset) {
            drop(handle);
            writer.fail(file, || format!("writing: {e}"));
            return None;
        }
        progress
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let _ = first_byte.set(started.elapsed().as_secs_f64());
    }
    Some(handle)
}

/// Writes one file of a snapshot to `out`, chunk by chunk, each checked.
pub async fn dump(
    repo: &Repository,
    snapshot: &Snapshot,
    path: &str,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    let wanted: Vec<&[u8]> = path
        .as_bytes()
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    let mut tree = repo.load_tree(&snapshot.root_tree).await?;
    for (depth, name) in wanted.iter().enumerate() {
        let entry = tree
            .entries
            .iter()
            .find(|e| e.name.as_slice() == *name)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn writer_for(dir: &Path, names: &[&str], sync_fs: fn(&File) -> std::io::Result<()>) -> Writer {
        let files: Vec<(&str, u64, usize)> = names.iter().map(|name| (*name, 5, 1)).collect();
        writer_with(dir, &files, sync_fs)
    }

    /// A writer for files (name, size, chunk writes).
    fn writer_with(
        dir: &Path,
        files: &[(&str, u64, usize)],
        sync_fs: fn(&File) -> std::io::Result<()>,
    ) -> Writer {
        let files = files
            .iter()
            .map(|&(name, size, writes)| FileSlot {
                final_path: dir.join(name),
                dir: dir.to_path_buf(),
                display: name.to_string(),
                size,
                mode: 0o644,
                mtime_ns: 0,
                writes_total: writes,
                state: Mutex::new(SlotState {
                    remaining: writes,
                    ..SlotState::default()
                }),
            })
            .collect();
        Writer {
            files,
            fsync: true,
            batch_sync: true,
            sync_fs,
            renamed_into: Mutex::new(HashSet::new()),
            cancelled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Writes "fresh" into every file of `writer` as one batch and commits it.
    fn restore_batch(writer: &Writer) {
        let batch = writer
            .open_batch(0..writer.files.len())
            .expect("the test directory opens");
        for file in 0..writer.files.len() {
            let handle = writer
                .open_for_write(file)
                .expect("temporary file created")
                .expect("file still wanted");
            handle.write_all_at(b"fresh", 0).expect("written");
            writer.written(file, handle, 1, Some(&batch));
        }
        writer.commit_batch(batch);
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("test directory readable")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn restore_batch_renames_only_after_its_sync() {
        let dir = tempfile::tempdir().expect("temp dir");
        let writer = writer_for(dir.path(), &["a", "b", "c"], sync_file_system);
        restore_batch(&writer);
        for (index, name) in ["a", "b", "c"].iter().enumerate() {
            assert!(writer.slot(index).done);
            assert_eq!(
                std::fs::read(dir.path().join(name)).expect("restored"),
                b"fresh"
            );
        }
        assert_eq!(names_in(dir.path()), ["a", "b", "c"]);
    }

    #[test]
    fn restore_batch_sync_failure_fails_every_file_and_keeps_old_content() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a"), b"old").expect("old content");
        let writer = writer_for(dir.path(), &["a", "b", "c"], |_| {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        });
        restore_batch(&writer);
        for index in 0..3 {
            let state = writer.slot(index);
            assert!(!state.done);
            assert!(state.tmp.is_none(), "temporary file left in the slot");
            let reason = state.failed.as_deref().expect("failure reported");
            assert!(reason.contains("syncing the file system"), "{reason}");
        }
        // Old content kept, absent names stay absent, no temporary file left.
        assert_eq!(
            std::fs::read(dir.path().join("a")).expect("old file"),
            b"old"
        );
        assert_eq!(names_in(dir.path()), ["a"]);
    }

    #[test]
    fn budget_units_round_up_and_never_exceed_the_budget() {
        let total = (RESTORE_BYTES_IN_FLIGHT_MAX as u64 / BUDGET_UNIT) as u32;
        assert_eq!(budget_units(0), 1);
        assert_eq!(budget_units(1), 1);
        assert_eq!(budget_units(BUDGET_UNIT), 1);
        assert_eq!(budget_units(BUDGET_UNIT + 1), 2);
        assert_eq!(budget_units(RESTORE_BYTES_IN_FLIGHT_MAX as u64), total);
        // A read larger than the whole budget still gets to run, alone.
        assert_eq!(budget_units(u64::MAX), total);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_chunk_failing_its_check_fails_only_its_files_and_the_budget_comes_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("b"), b"old").expect("old content");
        // a = hello; b = world + (a chunk that fails its check); c = world.
        let writer = writer_with(
            dir.path(),
            &[("a", 5, 1), ("b", 10, 2), ("c", 5, 1)],
            sync_file_system,
        );
        let key = crate::seal::MasterKey::generate();
        let sealed = |plain: &[u8]| {
            let id = key.blob_id(plain);
            (id, key.encode_blob(&id, plain).expect("encodes"))
        };
        let (hello, hello_sealed) = sealed(b"hello");
        let (world, world_sealed) = sealed(b"world");
        let (bad, mut bad_sealed) = sealed(b"again");
        let last = bad_sealed.len() - 1;
        bad_sealed[last] ^= 1;
        let work = vec![
            (hello, vec![(0, 0)], prost::bytes::Bytes::from(hello_sealed)),
            (
                world,
                vec![(1, 0), (2, 0)],
                prost::bytes::Bytes::from(world_sealed),
            ),
            (bad, vec![(1, 5)], prost::bytes::Bytes::from(bad_sealed)),
        ];
        let budget = Arc::new(tokio::sync::Semaphore::new(4));
        let permit = budget
            .clone()
            .try_acquire_many_owned(4)
            .expect("free budget");
        let progress = Progress::default();
        write_chunks(
            &key,
            work,
            &writer,
            "pack",
            &progress,
            Instant::now(),
            &OnceLock::new(),
            permit,
        );
        assert_eq!(
            budget.available_permits(),
            4,
            "the pack's budget is released"
        );
        assert_eq!(std::fs::read(dir.path().join("a")).expect("a"), b"hello");
        assert_eq!(std::fs::read(dir.path().join("c")).expect("c"), b"world");
        // b keeps its old content and says which chunk of which pack failed.
        assert_eq!(std::fs::read(dir.path().join("b")).expect("b"), b"old");
        let reason = writer.slot(1).failed.clone().expect("b failed");
        assert!(reason.contains(&hex::encode(bad)), "{reason}");
        assert!(reason.contains("of pack pack failed its check"), "{reason}");
        assert_eq!(names_in(dir.path()), ["a", "b", "c"]);
    }
}
