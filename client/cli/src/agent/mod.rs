//! `cairn agent`: the client-side scheduler. Jobs (backups of paths or of a
//! command's output at a level, forget, prune, check with a data subset,
//! restore drills) run on cron schedules in named time zones, through the
//! SDK in-process.
//!
//! - `config`: the TOML file, validated whole at start.
//! - `schedule`: when a job is due (catch-up once after downtime).
//! - `state`: per-job JSON state and the run locks (never twice at once).
//! - `jobs`: one attempt of a job's work.
//! - `metrics`: the Prometheus page and the textfile for `--once`.
//!
//! Backup jobs of one dataset form a scheme (weekly full, daily
//! differential, hourly incremental): when several are due in the same
//! pass, only the strongest level runs (full > differential > incremental)
//! and the others are recorded as satisfied by it, with its outcome. Jobs
//! of one dataset run one at a time; each run retries with exponential
//! backoff (bounded) and ends with one JSON log line on stderr.

pub mod config;
pub mod jobs;
pub mod metrics;
pub mod schedule;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_client::backup::Level;
use chrono::{DateTime, Utc};
use futures::future::join_all;

use config::{CheckRead, Config, Job, RETRY_BACKOFF_MAX, Work};
use jobs::{Final, RunOutput};
use metrics::Running;
use state::{JobState, StateDir};

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Run every due job once and exit.
    pub once: bool,
    /// The scheduler's clock starts here instead of the system clock (tests
    /// and drills stepping through a week).
    pub now: Option<DateTime<Utc>>,
    /// Overrides the config's `metrics_listen`.
    pub metrics_listen: Option<String>,
    pub metrics_file: Option<PathBuf>,
}

/// The scheduler's clock: the system's, or a given start that advances in
/// real time.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Option<(DateTime<Utc>, Instant)>,
}

impl Clock {
    fn now(&self) -> DateTime<Utc> {
        match self.start {
            Some((at, since)) => {
                at + chrono::Duration::from_std(since.elapsed()).unwrap_or_default()
            }
            None => Utc::now(),
        }
    }
}

fn unix(time: DateTime<Utc>) -> f64 {
    time.timestamp_millis() as f64 / 1e3
}

/// Runs the agent. `Ok(false)`: some job failed (`--once` exits non-zero).
pub async fn run(options: Options) -> anyhow::Result<bool> {
    let config = Config::load(&options.config)?;
    if options.now.is_some() && !options.once {
        anyhow::bail!("--now only goes with --once (it sets the clock of one pass)");
    }
    let states = StateDir::open(&config.state_dir)?;
    let agent = Arc::new(Agent {
        clock: Clock {
            start: options.now.map(|at| (at, Instant::now())),
        },
        jobs: Arc::new(config.jobs.clone()),
        cluster: config.cluster.clone(),
        states,
        running: Running::default(),
        datasets: Default::default(),
        slots: tokio::sync::Semaphore::new(config.max_concurrent_jobs),
        metrics_file: options.metrics_file.clone(),
    });
    if options.once {
        let ok = agent.clone().pass(&Default::default()).await;
        agent.write_metrics_file()?;
        return Ok(ok);
    }
    let listen = options.metrics_listen.or(config.metrics_listen);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = match listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "agent metrics listening");
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics::Sources {
                    jobs: agent.jobs.clone(),
                    states: agent.states.clone(),
                    running: agent.running.clone(),
                },
                async move {
                    let _ = stop.changed().await;
                },
            )))
        }
        None => None,
    };
    let result = agent.run_forever().await;
    let _ = stop_tx.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
    result.map(|()| true)
}

struct Agent {
    clock: Clock,
    jobs: Arc<Vec<Job>>,
    cluster: config::ClusterFile,
    states: StateDir,
    /// Jobs in flight in this process (running, or waiting for their
    /// dataset): the `running` gauge, and not started again.
    running: Running,
    /// One lock per dataset: its jobs run one at a time.
    datasets: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `max_concurrent_jobs` permits, taken after the dataset lock: jobs
    /// beyond it wait their turn (they are in flight, so a fire time
    /// arriving meanwhile is skipped, never queued twice).
    slots: tokio::sync::Semaphore,
    metrics_file: Option<PathBuf>,
}

/// A job to run for a fire time, with the weaker jobs of its scheme it
/// satisfies.
struct Planned {
    job: Job,
    fire: DateTime<Utc>,
    satisfies: Vec<(Job, DateTime<Utc>)>,
}

fn strength(level: Level) -> u8 {
    match level {
        Level::Full => 2,
        Level::Differential => 1,
        Level::Incremental => 0,
    }
}

/// Folds the due backup jobs of each dataset into the strongest one (the
/// first in the file among equals); other jobs pass through.
fn plan(due: Vec<(Job, DateTime<Utc>)>) -> Vec<Planned> {
    let mut planned: Vec<Planned> = Vec::new();
    let mut scheme: BTreeMap<String, usize> = BTreeMap::new();
    let level_of = |job: &Job| match &job.work {
        Work::Backup { level, .. } => Some(*level),
        _ => None,
    };
    for (job, fire) in due {
        let (Some(level), Some(dataset)) = (level_of(&job), job.dataset().map(str::to_string))
        else {
            planned.push(Planned {
                job,
                fire,
                satisfies: Vec::new(),
            });
            continue;
        };
        match scheme.get(&dataset) {
            Some(&at) => {
                let current = &mut planned[at];
                let stronger =
                    level_of(&current.job).is_none_or(|held| strength(level) > strength(held));
                if stronger {
                    let weaker = std::mem::replace(&mut current.job, job);
                    let weaker_fire = std::mem::replace(&mut current.fire, fire);
                    current.satisfies.push((weaker, weaker_fire));
                } else {
                    current.satisfies.push((job, fire));
                }
            }
            None => {
                scheme.insert(dataset, planned.len());
                planned.push(Planned {
                    job,
                    fire,
                    satisfies: Vec::new(),
                });
            }
        }
    }
    planned
}

/// One structured line per run on stderr.
fn log_line(fields: serde_json::Value) {
    eprintln!("{fields}");
}

impl Agent {
    /// Runs until SIGINT or SIGTERM. Runs in flight are abandoned: their
    /// fire time is not marked handled, so the next start runs them again.
    async fn run_forever(self: Arc<Self>) -> anyhow::Result<()> {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot watch SIGTERM")?;
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let now = self.clock.now();
            let in_flight = self.running.lock().map(|r| r.clone()).unwrap_or_default();
            let agent = self.clone();
            tasks.spawn(async move {
                agent.pass(&in_flight).await;
            });
            while tasks.try_join_next().is_some() {}
            // Wake at the next fire time of any job, at least every minute
            // (a changed clock is noticed), never busy-looping.
            let next = self
                .jobs
                .iter()
                .filter_map(|j| j.schedule.next_after(now))
                .min();
            let wait = next
                .and_then(|t| (t - self.clock.now()).to_std().ok())
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(200), Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tokio::signal::ctrl_c() => break,
                _ = terminate.recv() => break,
            }
        }
        tracing::info!(
            "agent stopping: runs in flight are abandoned and run again at the next start"
        );
        tasks.abort_all();
        Ok(())
    }

    /// One pass: every due job runs (or is recorded skipped or satisfied).
    /// `in_flight`: jobs this process is already running, which a new fire
    /// time records as skipped. `false` if any run failed.
    async fn pass(self: Arc<Self>, in_flight: &std::collections::BTreeSet<String>) -> bool {
        let now = self.clock.now();
        let mut due = Vec::new();
        let mut ok = true;
        for job in self.jobs.iter() {
            let state = match self.states.load(&job.name) {
                Ok(state) => state,
                Err(error) => {
                    log_line(serde_json::json!({"job": job.name, "kind": job.kind(),
                        "outcome": "failure", "error": format!("{error:#}")}));
                    ok = false;
                    continue;
                }
            };
            let handled = state
                .last_handled_unix
                .and_then(|s| DateTime::from_timestamp(s, 0));
            if let Some(fire) = job.schedule.due(handled, now) {
                if in_flight.contains(&job.name) {
                    self.record_skip(job, fire, "its previous run is still going");
                } else {
                    due.push((job.clone(), fire));
                }
            }
        }
        let mut groups: BTreeMap<Option<String>, Vec<Planned>> = BTreeMap::new();
        for (i, planned) in plan(due).into_iter().enumerate() {
            // Jobs without a dataset each run on their own.
            let key = planned
                .job
                .dataset()
                .map(|d| format!("d:{d}"))
                .or_else(|| Some(format!("j:{i}")));
            groups.entry(key).or_default().push(planned);
        }
        let runs = groups.into_values().map(|group| {
            let agent = self.clone();
            async move {
                let mut ok = true;
                for planned in group {
                    ok &= agent.run_planned(planned).await;
                }
                ok
            }
        });
        let results = join_all(runs).await;
        if !results.is_empty() {
            // Idle until the next fire time without a backup's peak resident.
            cairn_node::malloc::release_free_memory();
        }
        ok && results.into_iter().all(|r| r)
    }

    fn dataset_lock(&self, dataset: Option<&str>) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let dataset = dataset?;
        let mut locks = self.datasets.lock().ok()?;
        Some(locks.entry(dataset.to_string()).or_default().clone())
    }

    fn record_skip(&self, job: &Job, fire: DateTime<Utc>, why: &str) {
        let recorded = self.states.update(&job.name, |s| {
            s.runs_skipped += 1;
            s.last_handled_unix = Some(
                s.last_handled_unix
                    .unwrap_or(i64::MIN)
                    .max(fire.timestamp()),
            );
        });
        log_line(
            serde_json::json!({"ts": self.clock.now().to_rfc3339(), "job": job.name,
            "kind": job.kind(), "outcome": "skipped", "fire_time": fire.to_rfc3339(),
            "reason": why, "error": recorded.err().map(|e| format!("{e:#}"))}),
        );
    }

    /// Runs one planned job (with retries) and records it and the jobs it
    /// satisfies. `false` if it failed.
    async fn run_planned(&self, planned: Planned) -> bool {
        let Planned {
            job,
            fire,
            satisfies,
        } = planned;
        let names: Vec<String> = std::iter::once(job.name.clone())
            .chain(satisfies.iter().map(|(j, _)| j.name.clone()))
            .collect();
        if let Ok(mut running) = self.running.lock() {
            running.extend(names.iter().cloned());
        }
        let ok = self.run_locked(&job, fire, &satisfies).await;
        if let Ok(mut running) = self.running.lock() {
            for name in &names {
                running.remove(name);
            }
        }
        if let Err(error) = self.write_metrics_file() {
            tracing::warn!(error = %format!("{error:#}"), "metrics file not written; the next run writes it again");
        }
        ok
    }

    async fn run_locked(
        &self,
        job: &Job,
        fire: DateTime<Utc>,
        satisfies: &[(Job, DateTime<Utc>)],
    ) -> bool {
        // The run lock first: another process (or an earlier run still
        // going) holding it makes this a skip, not a wait.
        let lock = match self.states.try_run_lock(&job.name) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                self.record_skip(job, fire, "another run of this job holds its lock");
                return true;
            }
            Err(error) => {
                log_line(serde_json::json!({"job": job.name, "kind": job.kind(),
                    "outcome": "failure", "error": format!("{error:#}")}));
                return false;
            }
        };
        let dataset_lock = self.dataset_lock(job.dataset());
        let _dataset = match &dataset_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        let check_slice = self
            .states
            .load(&job.name)
            .map(|s| s.check_slice_next.max(1))
            .unwrap_or(1);
        let started = Instant::now();
        let mut attempt = 0u32;
        let (output, result) = loop {
            attempt += 1;
            let mut output = RunOutput::default();
            let result = match jobs::open_repository(&self.cluster, job.token_file.as_deref()).await
            {
                Ok(repo) => jobs::run_once(repo, job, check_slice, &mut output).await,
                Err(error) => Err(error),
            };
            let Err(error) = &result else {
                break (output, result);
            };
            let retryable = error.downcast_ref::<Final>().is_none();
            if !retryable || attempt > job.retries {
                break (output, result);
            }
            let backoff = job
                .retry_backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(RETRY_BACKOFF_MAX);
            log_line(
                serde_json::json!({"ts": self.clock.now().to_rfc3339(), "job": job.name,
                "kind": job.kind(), "outcome": "retry", "attempt": attempt,
                "retry_in_s": backoff.as_secs_f64(), "error": format!("{error:#}")}),
            );
            tokio::time::sleep(backoff).await;
        };
        let duration = started.elapsed().as_secs_f64();
        let end = unix(self.clock.now());
        let error = result.err().map(|e| format!("{e:#}"));
        let success = error.is_none();
        let record = |state: &mut JobState, fire: DateTime<Utc>, ran: bool| {
            state.last_handled_unix = Some(
                state
                    .last_handled_unix
                    .unwrap_or(i64::MIN)
                    .max(fire.timestamp()),
            );
            state.last_run_unix = Some(end);
            state.last_duration_s = duration;
            if success {
                state.runs_success += 1;
                state.last_success_unix = Some(end);
                state.consecutive_failures = 0;
                state.last_error = None;
            } else {
                state.runs_failure += 1;
                state.failures_total += 1;
                state.consecutive_failures += 1;
                state.last_error = error.clone();
            }
            if ran {
                state.bytes_added_total += output.bytes_added;
                if output.snapshot.is_some() {
                    state.last_snapshot = output.snapshot.clone();
                }
                if output.rto_s.is_some() {
                    state.drill_rto_s = output.rto_s;
                }
                // A rotating check moves on once a slice was read, found
                // problems or not (a retry of a dead connection does not).
                if let (
                    Work::Check {
                        read: CheckRead::Rotating { count },
                    },
                    Some(slice),
                ) = (&job.work, output.slice)
                    && (success || output.detail.is_some())
                {
                    state.check_slice_next = slice.index % count + 1;
                }
            }
        };
        let saved = self.states.update(&job.name, |s| record(s, fire, true));
        log_line(
            serde_json::json!({"ts": self.clock.now().to_rfc3339(), "job": job.name,
            "kind": job.kind(), "dataset": job.dataset(),
            "outcome": if success { "success" } else { "failure" }, "attempt": attempt,
            "fire_time": fire.to_rfc3339(), "duration_s": duration,
            "snapshot": output.snapshot, "parent": output.parent, "level": output.level,
            "bytes_added": output.bytes_added, "rto_s": output.rto_s,
            "slice": output.slice.map(|s| s.to_string()), "detail": output.detail,
            "error": error,
            "state_error": saved.err().map(|e| format!("{e:#}"))}),
        );
        for (weaker, weaker_fire) in satisfies {
            let saved = self
                .states
                .update(&weaker.name, |s| record(s, *weaker_fire, false));
            log_line(
                serde_json::json!({"ts": self.clock.now().to_rfc3339(), "job": weaker.name,
                "kind": weaker.kind(), "dataset": weaker.dataset(), "outcome": "satisfied",
                "by": job.name, "by_outcome": if success { "success" } else { "failure" },
                "fire_time": weaker_fire.to_rfc3339(), "snapshot": output.snapshot,
                "state_error": saved.err().map(|e| format!("{e:#}"))}),
            );
        }
        drop(lock);
        success
    }

    fn write_metrics_file(&self) -> anyhow::Result<()> {
        let Some(path) = &self.metrics_file else {
            return Ok(());
        };
        let text = metrics::render(&self.jobs, &self.states, &self.running, self.clock.now())?;
        metrics::write_file(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(text: &str) -> Vec<Job> {
        Config::parse(&format!(
            "state_dir = \"/tmp/s\"\n[cluster]\naddresses = [\"a:1\"]\npassword_file = \"/p\"\n{text}"
        ))
        .expect("config")
        .jobs
    }

    fn backup(name: &str, dataset: &str, level: &str) -> String {
        format!(
            "[[job]]\nname = \"{name}\"\nschedule = \"0 * * * *\"\nkind = \"backup\"\ndataset = \"{dataset}\"\nlevel = \"{level}\"\npaths = [\"/srv\"]\n"
        )
    }

    #[test]
    fn the_strongest_due_level_of_a_dataset_runs_and_satisfies_the_others() {
        let all = jobs(&format!(
            "{}{}{}{}[[job]]\nname = \"forget\"\nschedule = \"0 * * * *\"\nkind = \"forget\"\ndataset = \"files\"\nkeep_last = 2\n",
            backup("hourly", "files", "incremental"),
            backup("weekly", "files", "full"),
            backup("daily", "files", "differential"),
            backup("db", "db", "incremental"),
        ));
        let fire = Utc::now();
        let planned = plan(all.into_iter().map(|j| (j, fire)).collect());
        let names: Vec<(&str, Vec<&str>)> = planned
            .iter()
            .map(|p| {
                (
                    p.job.name.as_str(),
                    p.satisfies.iter().map(|(j, _)| j.name.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("weekly", vec!["hourly", "daily"]),
                ("db", vec![]),
                ("forget", vec![]),
            ]
        );
    }
}
