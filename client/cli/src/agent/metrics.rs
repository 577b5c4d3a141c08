//! The agent's Prometheus metrics, rendered from the persisted job states
//! at scrape time (so a second agent process's runs show too, and
//! counters survive restarts), served on `--metrics-listen` and written
//! atomically to `--metrics-file` (node_exporter's textfile collector) by
//! `--once` runs. The names are a contract with the alert rules.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::config::{Job, Work};
use super::state::{JobState, StateDir};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Family<Labels, Gauge<f64, AtomicU64>>;

/// Jobs running in this process now (`cairn_agent_job_running`).
pub type Running = Arc<Mutex<BTreeSet<String>>>;

/// The metrics text of every job, from its persisted state.
pub fn render(
    jobs: &[Job],
    states: &StateDir,
    running: &Running,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    let mut registry = Registry::default();
    let gauge = |registry: &mut Registry, name: &str, help: &str| {
        let family = FloatGauge::default();
        registry.register(name, help, family.clone());
        family
    };
    let counter = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<Labels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    };
    let last_success = gauge(
        &mut registry,
        "cairn_agent_job_last_success_timestamp_seconds",
        "End of the job's last successful run (Unix seconds)",
    );
    let last_run = gauge(
        &mut registry,
        "cairn_agent_job_last_run_timestamp_seconds",
        "End of the job's last attempt (Unix seconds)",
    );
    let last_duration = gauge(
        &mut registry,
        "cairn_agent_job_last_duration_seconds",
        "Wall time of the job's last run",
    );
    let interval = gauge(
        &mut registry,
        "cairn_agent_job_interval_seconds",
        "The schedule's nominal period (gap between its next two fire times)",
    );
    let next_run = gauge(
        &mut registry,
        "cairn_agent_job_next_run_timestamp_seconds",
        "The job's next fire time (Unix seconds)",
    );
    let runs = counter(
        &mut registry,
        "cairn_agent_job_runs",
        "Runs of the job by outcome (success, failure, skipped: another run held it)",
    );
    let failures = counter(
        &mut registry,
        "cairn_agent_job_failures",
        "Failed runs of the job",
    );
    let consecutive = gauge(
        &mut registry,
        "cairn_agent_job_consecutive_failures",
        "Failed runs since the job's last success",
    );
    let running_gauge = gauge(
        &mut registry,
        "cairn_agent_job_running",
        "1 while the job runs in this agent",
    );
    let bytes_added = counter(
        &mut registry,
        "cairn_agent_job_bytes_added",
        "Bytes newly stored by the job's backups",
    );
    let rto = gauge(
        &mut registry,
        "cairn_agent_drill_rto_seconds",
        "The last drill's measured restore-and-verify time",
    );
    let rto_target = gauge(
        &mut registry,
        "cairn_agent_drill_rto_target_seconds",
        "The drill job's rto_target",
    );
    let running_now = running.lock().map(|r| r.clone()).unwrap_or_default();
    for job in jobs {
        let state: JobState = states.load(&job.name)?;
        let labels: Labels = vec![("job", job.name.clone()), ("kind", job.kind().into())];
        if let Some(t) = state.last_success_unix {
            last_success.get_or_create(&labels).set(t);
        }
        if let Some(t) = state.last_run_unix {
            last_run.get_or_create(&labels).set(t);
            last_duration
                .get_or_create(&labels)
                .set(state.last_duration_s);
        }
        if let Some(period) = job.schedule.interval_after(now) {
            interval
                .get_or_create(&labels)
                .set(period.num_milliseconds() as f64 / 1e3);
        }
        if let Some(next) = job.schedule.next_after(now) {
            next_run.get_or_create(&labels).set(next.timestamp() as f64);
        }
        for (outcome, count) in [
            ("success", state.runs_success),
            ("failure", state.runs_failure),
            ("skipped", state.runs_skipped),
        ] {
            let mut with_outcome = labels.clone();
            with_outcome.push(("outcome", outcome.into()));
            runs.get_or_create(&with_outcome).inc_by(count);
        }
        failures.get_or_create(&labels).inc_by(state.failures_total);
        consecutive
            .get_or_create(&labels)
            .set(state.consecutive_failures as f64);
        running_gauge
            .get_or_create(&labels)
            .set(if running_now.contains(&job.name) {
                1.0
            } else {
                0.0
            });
        if let Work::Backup { .. } = job.work {
            bytes_added
                .get_or_create(&labels)
                .inc_by(state.bytes_added_total);
        }
        if let Work::Drill {
            dataset,
            rto_target: target,
            ..
        } = &job.work
        {
            let drill: Labels = vec![("job", job.name.clone()), ("dataset", dataset.clone())];
            if let Some(seconds) = state.drill_rto_s {
                rto.get_or_create(&drill).set(seconds);
            }
            rto_target.get_or_create(&drill).set(target.as_secs_f64());
        }
    }
    let mut text = String::new();
    encode(&mut text, &registry).context("cannot encode the metrics")?;
    Ok(text)
}

/// OpenMetrics text (what the encoder writes and the endpoint serves) as
/// the classic Prometheus text format node_exporter's textfile collector
/// parses: a counter family is named after its `_total` samples, and the
/// `# EOF` and `# UNIT` lines go.
pub fn classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Writes the metrics to `path` atomically (temporary file, rename), in the
/// classic text format node_exporter's textfile collector reads.
pub fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let text = classic_text(text);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write metrics next to {}", path.display()))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())
        .with_context(|| format!("cannot write metrics file {}", path.display()))?;
    // The collector reads it as any user may: 0644, not the temp file's 0600.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot write metrics file {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot write metrics file {}", path.display()))?;
    Ok(())
}

/// What the endpoint renders from.
#[derive(Clone)]
pub struct Sources {
    pub jobs: Arc<Vec<Job>>,
    pub states: StateDir,
    pub running: Running,
}

/// Serves `GET /metrics` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Sources,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let sources = sources.clone();
            async move {
                let rendered = tokio::task::spawn_blocking(move || {
                    render(&sources.jobs, &sources.states, &sources.running, Utc::now())
                })
                .await;
                match rendered {
                    Ok(Ok(text)) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Ok(Err(error)) => {
                        tracing::warn!(error = %format!("{error:#}"), "agent metrics not rendered; the next scrape tries again");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%error, "agent metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::classic_text;

    #[test]
    fn counters_are_named_after_their_samples_and_eof_goes() {
        let open = "# HELP cairn_agent_job_runs Runs.\n# TYPE cairn_agent_job_runs counter\ncairn_agent_job_runs_total{job=\"a\"} 2\n# HELP cairn_agent_job_running Running.\n# TYPE cairn_agent_job_running gauge\ncairn_agent_job_running{job=\"a\"} 0\n# EOF\n";
        assert_eq!(
            classic_text(open),
            "# HELP cairn_agent_job_runs_total Runs.\n# TYPE cairn_agent_job_runs_total counter\ncairn_agent_job_runs_total{job=\"a\"} 2\n# HELP cairn_agent_job_running Running.\n# TYPE cairn_agent_job_running gauge\ncairn_agent_job_running{job=\"a\"} 0\n"
        );
    }
}
