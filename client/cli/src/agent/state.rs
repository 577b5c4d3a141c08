//! What the agent remembers between runs: one small JSON file per job in
//! the state directory (the fire time last handled, the last success, the
//! counters the metrics export, the check slice), and the lock files that
//! keep a job from running twice at once.
//!
//! Every change is a read-modify-write under the directory's state lock
//! (a short exclusive `flock`), written to a temporary file, synced and
//! renamed over the old one, so a crash leaves the old or the new state,
//! and two agent processes never lose each other's counts. The run lock of
//! a job is a second, long-held `flock` on `JOB.lock`: whoever holds it runs
//! the job, anyone else records `skipped`. The kernel drops both locks when
//! a process dies, so a crashed agent never leaves a job locked.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The persisted state of one job. New fields are added with
/// `#[serde(default)]` so an older file still loads.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct JobState {
    /// The fire time (Unix seconds) the last run or skip was for.
    pub last_handled_unix: Option<i64>,
    /// End of the last successful run (Unix seconds, scheduler clock).
    pub last_success_unix: Option<f64>,
    /// End of the last attempt.
    pub last_run_unix: Option<f64>,
    pub last_duration_s: f64,
    pub runs_success: u64,
    pub runs_failure: u64,
    pub runs_skipped: u64,
    pub failures_total: u64,
    pub consecutive_failures: u64,
    pub bytes_added_total: u64,
    /// The last snapshot this job made (hex id).
    pub last_snapshot: Option<String>,
    pub last_error: Option<String>,
    /// Rotating checks: the slice the next run reads (1-based).
    pub check_slice_next: u32,
    /// Drills: the last measured restore time and the dataset.
    pub drill_rto_s: Option<f64>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// A job's run lock, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl StateDir {
    /// Creates the directory if needed (mode 0700: the state names
    /// snapshots and errors).
    pub fn open(root: &Path) -> anyhow::Result<StateDir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("cannot create state_dir {}", root.display()))?;
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    fn state_path(&self, job: &str) -> PathBuf {
        self.root.join(format!("{job}.json"))
    }

    fn open_lock(&self, name: &str) -> anyhow::Result<File> {
        let path = self.root.join(name);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))
    }

    /// The job's state (default before its first run).
    pub fn load(&self, job: &str) -> anyhow::Result<JobState> {
        let path = self.state_path(job);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "state file {} is damaged; move it away to start the job afresh",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(JobState::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Applies `change` to the job's state and writes it atomically, under
    /// the directory's state lock.
    pub fn update<T>(
        &self,
        job: &str,
        change: impl FnOnce(&mut JobState) -> T,
    ) -> anyhow::Result<T> {
        let lock = self.open_lock(".state.lock")?;
        lock.lock().context("cannot lock the state directory")?;
        let mut state = self.load(job)?;
        let out = change(&mut state);
        let path = self.state_path(job);
        let tmp = self.root.join(format!(".{job}.json.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&self.root)?.sync_all()
        };
        write().with_context(|| format!("cannot write {}", path.display()))?;
        Ok(out)
    }

    /// The job's run lock, or `None` when another run holds it.
    pub fn try_run_lock(&self, job: &str) -> anyhow::Result<Option<RunLock>> {
        let file = self.open_lock(&format!("{job}.lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RunLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock job {job}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_held_run_lock_refuses_a_second() {
        let dir = tempfile::tempdir().expect("dir");
        let states = StateDir::open(&dir.path().join("state")).expect("open");
        assert_eq!(states.load("j").expect("empty"), JobState::default());
        states
            .update("j", |s| {
                s.runs_success = 3;
                s.last_handled_unix = Some(42);
            })
            .expect("update");
        let state = states.load("j").expect("load");
        assert_eq!((state.runs_success, state.last_handled_unix), (3, Some(42)));
        let held = states.try_run_lock("j").expect("lock").expect("free");
        // A second open file description (another process, or another
        // run in this one) cannot take it while it is held.
        assert!(states.try_run_lock("j").expect("lock").is_none());
        drop(held);
        assert!(states.try_run_lock("j").expect("lock").is_some());
    }

    #[test]
    fn a_damaged_state_file_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let states = StateDir::open(dir.path()).expect("open");
        std::fs::write(dir.path().join("j.json"), b"{not json").expect("write");
        let error = format!("{:#}", states.load("j").expect_err("damaged"));
        assert!(
            error.contains("j.json") && error.contains("damaged"),
            "{error}"
        );
    }
}
