//! One attempt of a job's work, through the SDK in-process (the same code
//! as `cairn backup`, `forget`, `prune`, `check`, `restore` and `stream
//! compact`; the agent never shells out to `cairn`). What an attempt did comes back as a
//! [`RunOutput`] even when it failed, so a drill over its target still
//! records the time it measured.

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use cairn_client::backup::{self, BackupOptions, Progress};
use cairn_client::lifecycle::ForgetOptions;
use cairn_client::repo::{DataRead, DataSubset};
use cairn_client::restore::{self, RestoreOptions};
use cairn_client::stream::compact::{self, CompactOptions};
use cairn_client::{Cluster, Repository};
use zeroize::Zeroizing;

use super::config::{CheckRead, ClusterFile, Job, Source, Work};
use crate::access;

/// The most of a dump command's standard error kept for its error message.
const COMMAND_STDERR_MAX_BYTES: usize = 2048;

/// What an attempt did (filled as far as it got).
#[derive(Debug, Default, Clone)]
pub struct RunOutput {
    pub snapshot: Option<String>,
    pub parent: Option<String>,
    pub level: Option<String>,
    pub bytes_added: u64,
    /// Drills: restore-and-verify wall time.
    pub rto_s: Option<f64>,
    /// Checks: the slice read.
    pub slice: Option<DataSubset>,
    /// A short summary for the log line.
    pub detail: Option<String>,
}

/// A failure that another attempt would not change (problems a check
/// found, a drill over its target): not retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Final(pub String);

/// Opens the tenant's repository with the job's token (or the cluster's).
pub async fn open_repository(
    cluster: &ClusterFile,
    token_file: Option<&Path>,
) -> anyhow::Result<Arc<Repository>> {
    let token = access::read_token(token_file.or(cluster.token_file.as_deref()), None)?;
    let ca = access::read_ca(cluster.ca_file.as_deref())?;
    let mut connection =
        Cluster::with_options(&cluster.addresses, access::cluster_options(ca, token)?)?;
    if let Some(region) = &cluster.region {
        connection = connection.prefer_region(region).await?;
    }
    let tenant = connection.resolve_tenant(cluster.tenant.as_deref()).await?;
    let passphrase = read_password(&cluster.password_file)?;
    let repo = Repository::open(connection, &tenant, &passphrase)
        .await?
        .with_warning_sink(Arc::new(|w: &cairn_client::repo::CatalogWarning| {
            tracing::warn!(warning = %w.message, "catalog record skipped");
        }));
    Ok(Arc::new(match &cluster.region {
        Some(region) => repo.with_region(region),
        None => repo,
    }))
}

fn read_password(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let text = Zeroizing::new(
        std::fs::read(path)
            .with_context(|| format!("cannot read password file {}", path.display()))?,
    );
    let trimmed = text
        .strip_suffix(b"\n")
        .map(|t| t.strip_suffix(b"\r").unwrap_or(t))
        .unwrap_or(&text);
    Ok(Zeroizing::new(trimmed.to_vec()))
}

/// Runs the job's work once. `check_slice` is the slice a rotating check
/// reads this time.
pub async fn run_once(
    repo: Arc<Repository>,
    job: &Job,
    check_slice: u32,
    output: &mut RunOutput,
) -> anyhow::Result<()> {
    match &job.work {
        Work::Backup {
            dataset,
            level,
            source,
            tags,
        } => {
            let options = BackupOptions {
                dataset: dataset.clone(),
                tags: tags.clone(),
                level: *level,
                excludes: match source {
                    Source::Paths { excludes, .. } => excludes.clone(),
                    Source::Command { .. } => Vec::new(),
                },
                ..BackupOptions::default()
            };
            let progress = Arc::new(Progress::default());
            let summary = match source {
                Source::Paths { paths, .. } => {
                    backup::backup_paths(repo, paths, &options, progress).await?
                }
                Source::Command { command, filename } => {
                    let output = CommandOutput::spawn(command)?;
                    backup::backup_stream(repo, output, filename, &options, progress).await?
                }
            };
            output.snapshot = Some(summary.snapshot_id.clone());
            output.parent = summary.parent.clone();
            output.level = Some(summary.level.clone());
            output.bytes_added = summary.bytes_added;
            output.detail = Some(format!(
                "{} files, {} bytes read",
                summary.files, summary.bytes
            ));
        }
        Work::Forget {
            dataset,
            keep,
            prune,
        } => {
            let report = repo
                .forget(&ForgetOptions {
                    dataset: Some(dataset.clone()),
                    ids: Vec::new(),
                    keep: keep.clone(),
                    dry_run: false,
                    bypass_governance: false,
                })
                .await?;
            let mut detail = format!("{} kept, {} removed", report.kept().count(), report.removed);
            if *prune {
                let pruned = repo.prune(false).await?;
                detail.push_str(&format!(
                    "; prune freed {} bytes in {} packs",
                    pruned.bytes_freed, pruned.packs_deleted
                ));
            }
            output.detail = Some(detail);
        }
        Work::Prune => {
            let pruned = repo.prune(false).await?;
            output.detail = Some(format!(
                "freed {} bytes: {} packs deleted, {} repacked",
                pruned.bytes_freed, pruned.packs_deleted, pruned.packs_repacked
            ));
        }
        Work::Check { read } => check(&repo, *read, check_slice, output).await?,
        Work::Compact { dataset } => {
            let options = CompactOptions {
                dataset: dataset.clone(),
                before_ms: None,
            };
            let summary = compact::compact(repo, &options).await?;
            output.snapshot = summary.snapshot_id.clone();
            output.detail = Some(format!(
                "{} segments ({} records, {} rooms) into {} day files",
                summary.segments, summary.records, summary.rooms, summary.day_files
            ));
        }
        Work::Drill {
            dataset,
            scratch_dir,
            rto_target,
        } => {
            let rto = drill(&repo, dataset, scratch_dir, output).await?;
            output.rto_s = Some(rto);
            if rto > rto_target.as_secs_f64() {
                return Err(Final(format!(
                    "restore drill of dataset {dataset} took {rto:.3}s, over its rto_target of {:.3}s",
                    rto_target.as_secs_f64()
                ))
                .into());
            }
        }
    }
    Ok(())
}

/// The index of every pack, the data of the slice asked, and every
/// snapshot's trees with their chunks located: what `cairn check` checks.
async fn check(
    repo: &Repository,
    read: CheckRead,
    rotating_slice: u32,
    output: &mut RunOutput,
) -> anyhow::Result<()> {
    let read = match read {
        CheckRead::None => DataRead::None,
        CheckRead::All => DataRead::All,
        CheckRead::Fixed(subset) => DataRead::Subset(subset),
        CheckRead::Rotating { count } => DataRead::Subset(DataSubset {
            index: rotating_slice.clamp(1, count),
            count,
        }),
    };
    if let DataRead::Subset(subset) = read {
        output.slice = Some(subset);
    }
    let outcome = crate::check::check_once(repo, read).await?;
    let problems: Vec<String> = outcome
        .problems
        .iter()
        .map(|p| match p.get("fault").and_then(|f| f.as_str()) {
            Some(fault) => {
                let what = ["pack", "snapshot"]
                    .iter()
                    .find_map(|k| {
                        p.get(*k)
                            .and_then(|v| v.as_str())
                            .map(|v| format!("{k} {v}"))
                    })
                    .unwrap_or_default();
                format!("{what}: {fault}")
            }
            None => p.to_string(),
        })
        .collect();
    output.detail = Some(format!(
        "{} snapshots, {} packs checked, {} read, {} shards read, {} problems",
        outcome.snapshots,
        outcome.packs_checked,
        outcome.packs_read,
        outcome.shards_checked,
        problems.len()
    ));
    if !problems.is_empty() {
        let shown: Vec<_> = problems.iter().take(5).cloned().collect();
        return Err(Final(format!(
            "check found {} problem(s): {}{}; bad shards were reported to repair",
            problems.len(),
            shown.join("; "),
            if problems.len() > 5 { "; ..." } else { "" }
        ))
        .into());
    }
    Ok(())
}

/// Restores the dataset's latest snapshot into a fresh directory under
/// `scratch_dir` (every chunk checked against its id by the SDK), then
/// counts the restored files and bytes against the snapshot's own figures.
/// Returns the wall time of restore and verification; the directory is
/// removed afterwards.
async fn drill(
    repo: &Repository,
    dataset: &str,
    scratch_dir: &Path,
    output: &mut RunOutput,
) -> anyhow::Result<f64> {
    let snapshot = repo.find_snapshot("latest", Some(dataset)).await?;
    output.snapshot = Some(snapshot.id_hex());
    std::fs::create_dir_all(scratch_dir)
        .with_context(|| format!("cannot create scratch_dir {}", scratch_dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("cairn-drill-")
        .tempdir_in(scratch_dir)
        .with_context(|| format!("cannot make a directory in {}", scratch_dir.display()))?;
    let started = Instant::now();
    let summary = restore::restore(
        repo,
        &snapshot,
        scratch.path(),
        &RestoreOptions::default(),
        Arc::new(Progress::default()),
    )
    .await?;
    let root = scratch.path().to_path_buf();
    let (files, bytes) = tokio::task::spawn_blocking(move || count_files(&root))
        .await
        .map_err(|e| anyhow!("drill verification task: {e}"))??;
    let rto = started.elapsed().as_secs_f64();
    output.detail = Some(format!(
        "restored {} files, {} bytes of snapshot {}",
        files,
        bytes,
        snapshot.short_id()
    ));
    if (files, bytes) != (snapshot.files, snapshot.bytes) {
        bail!(Final(format!(
            "drill of snapshot {}: restored {files} files and {bytes} bytes, the snapshot records {} files and {} bytes ({} skipped)",
            snapshot.short_id(),
            snapshot.files,
            snapshot.bytes,
            summary.skipped.len()
        )));
    }
    Ok(rto)
}

/// Regular files (each hard-linked name counted, as backup counts them) and
/// their bytes below `root`, symlinks not followed.
fn count_files(root: &Path) -> anyhow::Result<(u64, u64)> {
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let meta = entry
                .metadata()
                .with_context(|| format!("cannot stat {}", entry.path().display()))?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    Ok((files, bytes))
}

/// The standard output of `sh -c COMMAND`, read by the backup. At EOF it
/// waits for the command: a non-zero exit is an `io::Error`, which fails
/// the backup before its commit, so nothing is committed. Dropped before
/// EOF (the backup failed first), it kills the command.
struct CommandOutput {
    child: Child,
    stdout: ChildStdout,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    finished: bool,
}

impl CommandOutput {
    fn spawn(command: &str) -> anyhow::Result<CommandOutput> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the backup command with sh -c")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the backup command has no standard output"))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        // Standard error is drained on its own thread (a full pipe would
        // stall the command) and its first bytes kept for the error.
        let stderr_reader = child.stderr.take().map(|mut pipe| {
            let kept = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut kept) = kept.lock() {
                        let room = COMMAND_STDERR_MAX_BYTES.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            })
        });
        Ok(CommandOutput {
            child,
            stdout,
            stderr,
            stderr_reader,
            finished: false,
        })
    }

    fn exit_error(&mut self) -> Option<std::io::Error> {
        self.finished = true;
        let status = match self.child.wait() {
            Ok(status) => status,
            Err(e) => return Some(e),
        };
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        if status.success() {
            return None;
        }
        let stderr = self
            .stderr
            .lock()
            .map(|s| String::from_utf8_lossy(&s).trim().to_string())
            .unwrap_or_default();
        Some(std::io::Error::other(format!(
            "the backup command failed ({status}){}; nothing was committed",
            if stderr.is_empty() {
                String::new()
            } else {
                format!(", its stderr: {stderr}")
            }
        )))
    }
}

impl Read for CommandOutput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.finished {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n == 0
            && !buf.is_empty()
            && let Some(error) = self.exit_error()
        {
            return Err(error);
        }
        Ok(n)
    }
}

impl Drop for CommandOutput {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_fails_after_writing_is_an_error_at_eof() {
        let mut out = CommandOutput::spawn("printf data; echo oops >&2; exit 3").expect("spawn");
        let mut text = Vec::new();
        let error = out.read_to_end(&mut text).expect_err("exit 3");
        assert_eq!(text, b"data");
        let message = error.to_string();
        assert!(
            message.contains("exit status: 3") && message.contains("oops"),
            "{message}"
        );
        let mut ok = CommandOutput::spawn("printf fine").expect("spawn");
        let mut text = Vec::new();
        ok.read_to_end(&mut text).expect("exit 0");
        assert_eq!(text, b"fine");
    }

    #[test]
    fn files_and_bytes_are_counted_without_following_symlinks() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("a"), b"12345").expect("a");
        std::fs::write(dir.path().join("sub/b"), b"123").expect("b");
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).expect("link");
        assert_eq!(count_files(dir.path()).expect("count"), (2, 8));
    }
}
