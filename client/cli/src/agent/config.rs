//! The agent's TOML file: the cluster to reach, where state lives, and the
//! jobs. Read once at start and validated whole, so a typo is one error
//! line naming the job and the field before anything runs. Secrets are
//! never inline: the file names the files that hold them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cairn_client::backup::Level;
use cairn_client::lifecycle::KeepRules;
use cairn_client::repo::DataSubset;
use serde::Deserialize;

use super::schedule::Schedule;

/// Retries of a failed run when a job does not say.
pub const RETRIES_DEFAULT: u32 = 2;
/// The first pause before a retry when a job does not say; it doubles.
pub const RETRY_BACKOFF_DEFAULT: Duration = Duration::from_secs(30);
/// The most retries a job may ask for: a job that keeps failing is an
/// alert, not a loop.
pub const RETRIES_MAX: u32 = 10;
/// The longest pause between two attempts, however the backoff doubles.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    cluster: ClusterFile,
    state_dir: PathBuf,
    metrics_listen: Option<String>,
    #[serde(default = "utc")]
    time_zone: String,
    /// Jobs that run at the same time (different datasets); 1 by default,
    /// so the agent's memory is one job's, not the sum of several.
    #[serde(default = "one")]
    max_concurrent_jobs: usize,
    #[serde(default, rename = "job")]
    jobs: Vec<JobFile>,
}

fn utc() -> String {
    "UTC".into()
}

fn one() -> usize {
    1
}

/// How to reach the cluster and unlock the tenant's key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Node addresses, any regions.
    pub addresses: Vec<String>,
    /// The cluster CA (PEM); without it, plaintext (--insecure clusters).
    pub ca_file: Option<PathBuf>,
    /// The default bearer token of the jobs (a job may name its own).
    pub token_file: Option<PathBuf>,
    /// The passphrase of the tenant's key.
    pub password_file: PathBuf,
    pub tenant: Option<String>,
    /// This client's region: reads prefer its nodes.
    pub region: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: String,
    schedule: String,
    time_zone: Option<String>,
    kind: String,
    token_file: Option<PathBuf>,
    retries: Option<u32>,
    retry_backoff: Option<String>,
    // backup
    dataset: Option<String>,
    level: Option<String>,
    #[serde(default)]
    paths: Vec<PathBuf>,
    #[serde(default)]
    exclude: Vec<String>,
    command: Option<String>,
    stdin_filename: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    // forget
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
    keep_within: Option<String>,
    #[serde(default)]
    keep_tags: Vec<String>,
    prune: Option<bool>,
    // check
    read_data: Option<bool>,
    read_data_subset: Option<String>,
    // drill
    scratch_dir: Option<PathBuf>,
    rto_target: Option<String>,
}

/// The whole validated configuration.
#[derive(Debug)]
pub struct Config {
    pub cluster: ClusterFile,
    pub state_dir: PathBuf,
    pub metrics_listen: Option<String>,
    /// Jobs that may run at the same time (at least 1).
    pub max_concurrent_jobs: usize,
    pub jobs: Vec<Job>,
}

/// One job: when, what, and how hard to try.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub schedule: Schedule,
    pub token_file: Option<PathBuf>,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub work: Work,
}

impl Job {
    /// The metric label `kind`.
    pub fn kind(&self) -> &'static str {
        match self.work {
            Work::Backup { .. } => "backup",
            Work::Forget { .. } => "forget",
            Work::Prune => "prune",
            Work::Check { .. } => "check",
            Work::Drill { .. } => "drill",
            Work::Compact { .. } => "compact",
        }
    }

    /// The dataset the job works on, if one: jobs of one dataset never run
    /// at the same time.
    pub fn dataset(&self) -> Option<&str> {
        match &self.work {
            Work::Backup { dataset, .. }
            | Work::Forget { dataset, .. }
            | Work::Drill { dataset, .. }
            | Work::Compact { dataset } => Some(dataset),
            Work::Prune | Work::Check { .. } => None,
        }
    }
}

/// What a backup reads.
#[derive(Debug, Clone)]
pub enum Source {
    /// Files and directories, with restic-style excludes.
    Paths {
        paths: Vec<PathBuf>,
        excludes: Vec<String>,
    },
    /// The standard output of `sh -c command`, stored as one file.
    Command { command: String, filename: String },
}

/// How much of the data a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckRead {
    /// The index only.
    None,
    /// Every shard.
    All,
    /// A fixed slice every run.
    Fixed(DataSubset),
    /// Slice 1 of `count`, then 2, ... one more each run, round and round.
    Rotating { count: u32 },
}

#[derive(Debug, Clone)]
pub enum Work {
    Backup {
        dataset: String,
        level: Level,
        source: Source,
        tags: Vec<String>,
    },
    Forget {
        dataset: String,
        keep: KeepRules,
        prune: bool,
    },
    Prune,
    Check {
        read: CheckRead,
    },
    Drill {
        dataset: String,
        scratch_dir: PathBuf,
        rto_target: Duration,
    },
    /// A live stream's segments folded into a snapshot (`cairn stream compact`).
    Compact {
        dataset: String,
    },
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agent config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("agent config {}", path.display()))
    }

    /// Validates the text of a config file.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let file: File = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if file.cluster.addresses.is_empty() {
            bail!("[cluster] addresses: give at least one node address (host:port)");
        }
        let mut names = BTreeSet::new();
        let mut jobs = Vec::new();
        for job in file.jobs {
            if !names.insert(job.name.clone()) {
                bail!(
                    "job {:?}: two jobs have this name; names must be unique",
                    job.name
                );
            }
            let name = job.name.clone();
            jobs.push(validate(job, &file.time_zone).with_context(|| format!("job {name:?}"))?);
        }
        if jobs.is_empty() {
            bail!("no [[job]] tables: nothing to schedule");
        }
        if file.max_concurrent_jobs == 0 {
            bail!("max_concurrent_jobs: must be at least 1");
        }
        Ok(Config {
            cluster: file.cluster,
            state_dir: file.state_dir,
            metrics_listen: file.metrics_listen,
            max_concurrent_jobs: file.max_concurrent_jobs,
            jobs,
        })
    }
}

/// A job name becomes a file name in the state directory and a metric label.
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        bail!(
            "name: use 1 to 64 of A-Z a-z 0-9 - _ . (not starting with a dot); it names the job's state file"
        );
    }
    Ok(())
}

fn duration(field: &str, text: &str) -> anyhow::Result<Duration> {
    crate::lifecycle::parse_duration(field, text)
}

fn validate(job: JobFile, default_zone: &str) -> anyhow::Result<Job> {
    check_name(&job.name)?;
    let zone = job.time_zone.as_deref().unwrap_or(default_zone);
    let schedule = Schedule::new(&job.schedule, zone)?;
    let retries = job.retries.unwrap_or(RETRIES_DEFAULT);
    if retries > RETRIES_MAX {
        bail!("retries: {retries} is more than {RETRIES_MAX}");
    }
    let retry_backoff = match &job.retry_backoff {
        Some(text) => duration("retry_backoff", text)?,
        None => RETRY_BACKOFF_DEFAULT,
    };
    let kind = job.kind.as_str();
    // Fields that only some kinds take: refuse them elsewhere rather than
    // ignore them, so `keep_last` on a backup job is not silently a no-op.
    let given = |present: bool, field: &str, kinds: &str| -> anyhow::Result<()> {
        if present && !kinds.split('|').any(|k| k == kind) {
            bail!("{field}: only a {kinds} job takes it, this one is a {kind} job");
        }
        Ok(())
    };
    given(
        job.dataset.is_some(),
        "dataset",
        "backup|forget|drill|compact",
    )?;
    given(job.level.is_some(), "level", "backup")?;
    given(!job.paths.is_empty(), "paths", "backup")?;
    given(!job.exclude.is_empty(), "exclude", "backup")?;
    given(job.command.is_some(), "command", "backup")?;
    given(job.stdin_filename.is_some(), "stdin_filename", "backup")?;
    given(!job.tags.is_empty(), "tags", "backup")?;
    let keeps = [
        job.keep_last,
        job.keep_hourly,
        job.keep_daily,
        job.keep_weekly,
        job.keep_monthly,
        job.keep_yearly,
    ];
    given(
        keeps.iter().any(Option::is_some) || job.keep_within.is_some() || !job.keep_tags.is_empty(),
        "keep_*",
        "forget",
    )?;
    given(job.prune.is_some(), "prune", "forget")?;
    given(job.read_data.is_some(), "read_data", "check")?;
    given(job.read_data_subset.is_some(), "read_data_subset", "check")?;
    given(job.scratch_dir.is_some(), "scratch_dir", "drill")?;
    given(job.rto_target.is_some(), "rto_target", "drill")?;
    let dataset = || -> anyhow::Result<String> {
        match &job.dataset {
            Some(d) if !d.trim().is_empty() => Ok(d.clone()),
            _ => bail!("dataset: a {kind} job needs one"),
        }
    };
    let work = match kind {
        "backup" => {
            let level: Level = job
                .level
                .as_deref()
                .unwrap_or("incremental")
                .parse()
                .map_err(|e| anyhow::anyhow!("level: {e}"))?;
            let source = match (&job.command, job.paths.is_empty()) {
                (Some(_), false) => bail!("paths and command: give one or the other"),
                (None, true) => bail!("paths or command: a backup job needs one"),
                (Some(command), true) => {
                    if !job.exclude.is_empty() {
                        bail!("exclude: only a backup of paths takes it");
                    }
                    let filename = job
                        .stdin_filename
                        .clone()
                        .unwrap_or_else(|| format!("{}.out", job.name));
                    cairn_client::path_guard::check_name(filename.as_bytes())
                        .map_err(|e| anyhow::anyhow!("stdin_filename: {e}"))?;
                    Source::Command {
                        command: command.clone(),
                        filename,
                    }
                }
                (None, false) => {
                    if job.stdin_filename.is_some() {
                        bail!("stdin_filename: only a backup of a command takes it");
                    }
                    cairn_client::backup::exclude_matcher(&job.exclude)
                        .map_err(|e| anyhow::anyhow!("exclude: {e}"))?;
                    Source::Paths {
                        paths: job.paths.clone(),
                        excludes: job.exclude.clone(),
                    }
                }
            };
            Work::Backup {
                dataset: dataset()?,
                level,
                source,
                tags: job.tags.clone(),
            }
        }
        "forget" => {
            let keep = KeepRules {
                last: job.keep_last.unwrap_or(0),
                hourly: job.keep_hourly.unwrap_or(0),
                daily: job.keep_daily.unwrap_or(0),
                weekly: job.keep_weekly.unwrap_or(0),
                monthly: job.keep_monthly.unwrap_or(0),
                yearly: job.keep_yearly.unwrap_or(0),
                within: job
                    .keep_within
                    .as_deref()
                    .map(|d| duration("keep_within", d))
                    .transpose()?,
                tags: job.keep_tags.clone(),
            };
            if keep.is_empty() {
                bail!(
                    "keep_*: a forget job needs at least one keep rule (it would forget everything)"
                );
            }
            Work::Forget {
                dataset: dataset()?,
                keep,
                prune: job.prune.unwrap_or(false),
            }
        }
        "prune" => Work::Prune,
        "check" => {
            let read = match (job.read_data_subset.as_deref(), job.read_data) {
                (Some(_), Some(true)) => {
                    bail!("read_data and read_data_subset: give one or the other")
                }
                (Some(text), _) => {
                    match text.trim().strip_prefix("auto/") {
                        Some(count) => {
                            let count: u32 = count.trim().parse().ok().filter(|c| *c > 0).ok_or_else(
                            || anyhow::anyhow!("read_data_subset {text:?}: auto/M needs M >= 1 (e.g. auto/30)"),
                        )?;
                            CheckRead::Rotating { count }
                        }
                        None => CheckRead::Fixed(
                            text.parse()
                                .map_err(|e| anyhow::anyhow!("read_data_subset: {e}"))?,
                        ),
                    }
                }
                (None, Some(true)) => CheckRead::All,
                (None, _) => CheckRead::None,
            };
            Work::Check { read }
        }
        "drill" => Work::Drill {
            dataset: dataset()?,
            scratch_dir: job
                .scratch_dir
                .clone()
                .ok_or_else(|| anyhow::anyhow!("scratch_dir: a drill job needs one"))?,
            rto_target: duration(
                "rto_target",
                job.rto_target.as_deref().ok_or_else(|| {
                    anyhow::anyhow!("rto_target: a drill job needs one (e.g. \"1h\")")
                })?,
            )?,
        },
        "compact" => Work::Compact {
            dataset: dataset()?,
        },
        other => bail!("kind {other:?}: use backup, forget, prune, check, drill or compact"),
    };
    Ok(Job {
        name: job.name,
        schedule,
        token_file: job.token_file,
        retries,
        retry_backoff,
        work,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = r#"
state_dir = "/var/lib/cairn-agent"
time_zone = "Europe/Berlin"
[cluster]
addresses = ["127.0.0.1:7000"]
password_file = "/etc/cairn/password"
"#;

    fn parse(jobs: &str) -> anyhow::Result<Config> {
        Config::parse(&format!("{HEAD}{jobs}"))
    }

    fn error(jobs: &str) -> String {
        format!("{:#}", parse(jobs).expect_err("refused"))
    }

    #[test]
    fn one_job_at_a_time_unless_told_otherwise() {
        let job = "[[job]]\nname = \"p\"\nschedule = \"@daily\"\nkind = \"prune\"\n";
        assert_eq!(parse(job).expect("parses").max_concurrent_jobs, 1);
        let two = Config::parse(&format!("max_concurrent_jobs = 2\n{HEAD}{job}")).expect("two");
        assert_eq!(two.max_concurrent_jobs, 2);
        let zero = Config::parse(&format!("max_concurrent_jobs = 0\n{HEAD}{job}"))
            .expect_err("zero is refused");
        assert!(zero.to_string().contains("at least 1"), "{zero}");
    }

    #[test]
    fn a_hybrid_scheme_and_every_kind_parse() {
        let config = parse(
            r#"
[[job]]
name = "files-weekly"
schedule = "0 0 * * MON"
kind = "backup"
dataset = "files"
level = "full"
paths = ["/srv"]
exclude = ["*.tmp"]
[[job]]
name = "db"
schedule = "30 2 * * *"
time_zone = "UTC"
kind = "backup"
dataset = "db"
command = "pg_dump app"
stdin_filename = "app.sql"
retries = 0
[[job]]
name = "forget"
schedule = "0 5 * * *"
kind = "forget"
dataset = "files"
keep_daily = 7
keep_within = "30d"
prune = true
[[job]]
name = "check"
schedule = "0 4 * * *"
kind = "check"
read_data_subset = "auto/30"
[[job]]
name = "drill"
schedule = "0 6 * * SUN"
kind = "drill"
dataset = "db"
scratch_dir = "/var/tmp/drill"
rto_target = "1h"
"#,
        )
        .expect("parses");
        assert_eq!(config.jobs.len(), 5);
        assert!(matches!(
            &config.jobs[0].work,
            Work::Backup { level: Level::Full, source: Source::Paths { excludes, .. }, .. } if excludes == &["*.tmp"]
        ));
        assert!(matches!(
            &config.jobs[1].work,
            Work::Backup { source: Source::Command { filename, .. }, .. } if filename == "app.sql"
        ));
        assert_eq!(config.jobs[1].retries, 0);
        assert_eq!(config.jobs[0].retries, RETRIES_DEFAULT);
        assert!(matches!(
            &config.jobs[2].work,
            Work::Forget { keep, prune: true, .. } if keep.daily == 7
        ));
        assert!(matches!(
            config.jobs[3].work,
            Work::Check {
                read: CheckRead::Rotating { count: 30 }
            }
        ));
        assert!(matches!(
            &config.jobs[4].work,
            Work::Drill { rto_target, .. } if *rto_target == Duration::from_secs(3600)
        ));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let example = include_str!("../../../../deploy/systemd/agent.toml.example");
        let config = Config::parse(example).expect("agent.toml.example parses");
        assert_eq!(config.jobs.len(), 8);
        assert!(
            config
                .jobs
                .iter()
                .any(|j| matches!(&j.work, Work::Compact { dataset } if dataset == "chat-live"))
        );
    }

    #[test]
    fn errors_name_the_job_and_the_field() {
        let job = |body: &str| format!("[[job]]\nname = \"j\"\nschedule = \"0 * * * *\"\n{body}\n");
        for (body, words) in [
            ("kind = \"backup\"\ndataset = \"d\"", "paths or command"),
            ("kind = \"backup\"\npaths = [\"/a\"]", "dataset"),
            ("kind = \"compact\"", "dataset"),
            (
                "kind = \"compact\"\ndataset = \"d\"\nkeep_last = 1",
                "keep_*",
            ),
            (
                "kind = \"backup\"\ndataset = \"d\"\npaths = [\"/a\"]\nlevel = \"weekly\"",
                "level",
            ),
            (
                "kind = \"backup\"\ndataset = \"d\"\npaths = [\"/a\"]\nkeep_last = 2",
                "keep_*",
            ),
            (
                "kind = \"forget\"\ndataset = \"d\"",
                "at least one keep rule",
            ),
            (
                "kind = \"check\"\nread_data_subset = \"31/30\"",
                "read_data_subset",
            ),
            ("kind = \"check\"\nread_data_subset = \"auto/0\"", "auto/M"),
            (
                "kind = \"drill\"\ndataset = \"d\"\nscratch_dir = \"/t\"",
                "rto_target",
            ),
            ("kind = \"restore\"", "kind \"restore\""),
            ("kind = \"prune\"\nretries = 99", "retries"),
            ("kind = \"prune\"\nsurprise = 1", "surprise"),
        ] {
            let text = error(&job(body));
            assert!(text.contains(words), "{body}: {text}");
            if !body.contains("surprise") {
                assert!(text.contains("job \"j\""), "{body}: {text}");
            }
        }
        let bad_schedule =
            error("[[job]]\nname = \"j\"\nschedule = \"61 * * * *\"\nkind = \"prune\"\n");
        assert!(
            bad_schedule.contains("job \"j\"") && bad_schedule.contains("schedule"),
            "{bad_schedule}"
        );
        let bad_zone = error(
            "[[job]]\nname = \"j\"\nschedule = \"0 * * * *\"\ntime_zone = \"Mars/Olympus\"\nkind = \"prune\"\n",
        );
        assert!(
            bad_zone.contains("time_zone") && bad_zone.contains("Mars/Olympus"),
            "{bad_zone}"
        );
        let twice = error(
            "[[job]]\nname = \"j\"\nschedule = \"0 * * * *\"\nkind = \"prune\"\n[[job]]\nname = \"j\"\nschedule = \"0 * * * *\"\nkind = \"prune\"\n",
        );
        assert!(twice.contains("unique"), "{twice}");
        let path = error("[[job]]\nname = \"../x\"\nschedule = \"0 * * * *\"\nkind = \"prune\"\n");
        assert!(path.contains("name:"), "{path}");
    }
}
