//! The monitoring files of `deploy/prometheus/` against the real tools and
//! real nodes: promtool checks and unit-tests the rules (every alert fires
//! on a faulty series and stays quiet on a healthy one), a real Prometheus
//! scraping a real process cluster sees the node-down alert go pending then
//! firing after a SIGKILL, and every metric name the dashboard and the rules
//! query is one a node or the agent exports.
//!
//! Needs Debian's `prometheus` package (`promtool`, `prometheus`); `.ci/run`
//! installs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_node::local_cluster::wait_until;
use cairn_tests::init_logging;
use cairn_tests::process::{ProcessCluster, ProcessOptions, cli_binary, free_port};

const DOWN_AFTER: &str = "3s";
/// The alert the live test watches.
const NODE_DOWN: &str = "CairnNodeDown";

/// The agent's metric names, the contract its alerts and dashboard panels
/// rely on; a real `cairn agent --once` run must export every one.
const AGENT_METRICS: &[&str] = &[
    "cairn_agent_job_last_success_timestamp_seconds",
    "cairn_agent_job_last_run_timestamp_seconds",
    "cairn_agent_job_last_duration_seconds",
    "cairn_agent_job_interval_seconds",
    "cairn_agent_job_next_run_timestamp_seconds",
    "cairn_agent_job_runs_total",
    "cairn_agent_job_failures_total",
    "cairn_agent_job_consecutive_failures",
    "cairn_agent_job_running",
    "cairn_agent_job_bytes_added_total",
    "cairn_agent_drill_rto_seconds",
    "cairn_agent_drill_rto_target_seconds",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("prometheus")
}

fn rules_file() -> PathBuf {
    deploy_dir().join("cairn-alerts.rules.yml")
}

fn unit_test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("tests"))
        .expect("deploy/prometheus/tests")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".test.yml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.test.yml under deploy/prometheus/tests"
    );
    files
}

/// Runs a Prometheus tool; panics with the install hint when it is missing.
fn must_run(tool: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {tool} ({e}): install Debian's prometheus package \
             (`apt-get install prometheus`; .ci/run does it)"
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

fn yaml(path: &Path) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every alerting rule of the rule file, by name.
fn alert_rules() -> BTreeMap<String, serde_yaml_ng::Value> {
    let rules = yaml(&rules_file());
    let mut alerts = BTreeMap::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                assert!(
                    alerts.insert(name.to_string(), rule.clone()).is_none(),
                    "alert {name} is defined twice"
                );
            }
        }
    }
    alerts
}

#[test]
fn promtool_accepts_the_rules_and_every_alert_fires_in_its_unit_tests() {
    let rules = rules_file();
    let checked = must_run(
        "promtool",
        &["check".as_ref(), "rules".as_ref(), rules.as_os_str()],
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tests = unit_test_files();
    let mut args: Vec<&std::ffi::OsStr> = vec!["test".as_ref(), "rules".as_ref()];
    args.extend(tests.iter().map(|p| p.as_os_str()));
    let tested = must_run("promtool", &args);
    assert!(!tested.contains("FAILED"), "{tested}");
    let config = deploy_dir().join("prometheus.yml");
    must_run(
        "promtool",
        &[
            "check".as_ref(),
            "config".as_ref(),
            "--syntax-only".as_ref(),
            config.as_os_str(),
        ],
    );

    // The dashboard's queries are valid PromQL: promtool parses them as
    // recording rules of a scratch file.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard(), &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let records: Vec<serde_yaml_ng::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let mut rule = serde_yaml_ng::Mapping::new();
            rule.insert("record".into(), format!("dashboard:query_{i}").into());
            rule.insert("expr".into(), expr.as_str().into());
            rule.into()
        })
        .collect();
    let mut group = serde_yaml_ng::Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), records.into());
    let mut file = serde_yaml_ng::Mapping::new();
    file.insert(
        "groups".into(),
        vec![serde_yaml_ng::Value::from(group)].into(),
    );
    let scratch = dir.path().join("dashboard-queries.yml");
    std::fs::write(&scratch, serde_yaml_ng::to_string(&file).expect("yaml")).expect("write");
    must_run(
        "promtool",
        &["check".as_ref(), "rules".as_ref(), scratch.as_os_str()],
    );

    // What the pager needs on every alert.
    let alerts = alert_rules();
    for (name, rule) in &alerts {
        assert!(rule["for"].as_str().is_some(), "{name} has no `for`");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["page", "ticket"].contains(&severity),
            "{name}: severity must be page or ticket, not {severity:?}"
        );
        let team = rule["labels"]["team"].as_str().unwrap_or_default();
        let agent = rule["expr"].as_str().unwrap_or_default().contains("agent");
        let expected_team = if agent { "platform" } else { "storage-sre" };
        assert_eq!(team, expected_team, "{name}: team");
        for annotation in ["summary", "description", "runbook"] {
            let text = rule["annotations"][annotation].as_str().unwrap_or_default();
            assert!(!text.trim().is_empty(), "{name} has no {annotation}");
        }
        let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
        assert!(
            runbook.contains("`cairn "),
            "{name}: the runbook names no cairn command"
        );
    }

    // Every alert is seen firing in some unit test, and seen quiet in another.
    let (mut fired, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for file in &tests {
        let doc = yaml(file);
        for test in doc["tests"].as_sequence().expect("tests") {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().expect("alertname").to_string();
                let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
                if expected > 0 {
                    fired.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    let names: BTreeSet<String> = alerts.keys().cloned().collect();
    let never_fired: Vec<_> = names.difference(&fired).collect();
    let never_quiet: Vec<_> = names.difference(&quiet).collect();
    assert!(
        never_fired.is_empty(),
        "alerts no unit test fires: {never_fired:?}"
    );
    assert!(
        never_quiet.is_empty(),
        "alerts no unit test shows quiet: {never_quiet:?}"
    );
    assert!(names.len() >= 15, "{names:?}");
}

fn dashboard() -> serde_json::Value {
    let path = deploy_dir().join("grafana").join("cairn-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// GET over plain HTTP (blocking, on a blocking thread); `Err` carries the reason.
async fn http_get(url: String, token: Option<String>) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let mut request = ureq::get(&url);
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        request
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("GET {url}: body: {e}"))
    })
    .await
    .map_err(|e| format!("GET task: {e}"))?
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` with a config scraping `targets` (job
    /// `cairn-node`) every second and evaluating the real rule file every
    /// second.
    fn start(dir: &Path, targets: &[String]) -> Self {
        std::fs::create_dir_all(dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 rule_files:\n  - \"{}\"\n\
                 scrape_configs:\n  - job_name: cairn-node\n    static_configs:\n      - targets: [{}]\n",
                rules_file().display(),
                targets.join(", ")
            ),
        )
        .expect("config");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run prometheus ({e}): install Debian's prometheus package \
                     (`apt-get install prometheus`; .ci/run does it)"
                )
            });
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    async fn api(&self, path: &str) -> Result<serde_json::Value, String> {
        let text = http_get(format!("{}{path}", self.url), None).await?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{path}: {e}: {text}"))?;
        if value["status"] != "success" {
            return Err(format!("{path}: {value}"));
        }
        Ok(value["data"].clone())
    }

    /// The state (`pending`/`firing`) of every active `alertname` alert, by instance.
    async fn alerts(&self, alertname: &str) -> Result<BTreeMap<String, String>, String> {
        let data = self.api("/api/v1/alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == alertname)
            .map(|a| {
                (
                    a["labels"]["instance"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    a["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_raises_node_down_pending_then_firing_in_a_real_prometheus() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = ProcessCluster::start_with(
        &dir.path().join("cluster"),
        &[1, 1, 1],
        DOWN_AFTER,
        ProcessOptions {
            erasure: "1+2".into(),
            ..ProcessOptions::default()
        },
    );
    let leader = cluster.wait_ready(Duration::from_secs(60)).await.leader_id;
    let targets: Vec<String> = cluster
        .ids()
        .iter()
        .map(|id| cluster.metrics_addr(*id).to_string())
        .collect();
    let prometheus = Prometheus::start(&dir.path().join("prometheus"), &targets);

    // Every node scraped, then a rule evaluation after that: only then does
    // "no node-down alert" mean something.
    wait_until(
        "prometheus to scrape all three nodes",
        Duration::from_secs(60),
        || async {
            let data = prometheus
                .api("/api/v1/query?query=sum(up%7Bjob%3D%22cairn-node%22%7D)")
                .await?;
            let up = data["result"][0]["value"][1]
                .as_str()
                .unwrap_or("0")
                .to_string();
            if up == "3" {
                Ok(())
            } else {
                Err(format!("{up} of 3 targets up"))
            }
        },
    )
    .await;
    let last_evaluation = || async {
        let data = prometheus.api("/api/v1/rules").await?;
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["name"] == "cairn-cluster")
            .map(|g| g["lastEvaluation"].to_string())
            .ok_or_else(|| "no cairn-cluster rule group loaded".to_string())
    };
    let seen_up = last_evaluation().await.expect("rules");
    wait_until(
        "a rule evaluation after every node was scraped",
        Duration::from_secs(30),
        || async {
            let now = last_evaluation().await?;
            if now != seen_up {
                Ok(())
            } else {
                Err(format!("last evaluation still {now}"))
            }
        },
    )
    .await;
    let before = prometheus.alerts(NODE_DOWN).await.expect("alerts");
    assert!(
        before.is_empty(),
        "a node-down alert before any node was killed: {before:?}"
    );

    // A follower, so the leader's election does not blur the figure.
    let victim = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let victim_target = cluster.metrics_addr(victim).to_string();
    cluster.kill(victim);
    let killed = Instant::now();

    let pending_after = std::sync::Mutex::new(None);
    let firing_after = wait_until(
        "the node-down alert to fire",
        Duration::from_secs(120),
        || async {
            let alerts = prometheus
                .alerts(NODE_DOWN)
                .await
                .map_err(|e| format!("{e}\n{}", prometheus.log_tail()))?;
            for (instance, _) in alerts.iter() {
                assert_eq!(instance, &victim_target, "only the killed node is down");
            }
            match alerts.get(&victim_target).map(String::as_str) {
                Some("pending") => {
                    pending_after
                        .lock()
                        .expect("pending time")
                        .get_or_insert(killed.elapsed());
                    Err("pending".to_string())
                }
                Some("firing") => Ok(killed.elapsed()),
                other => Err(format!("state {other:?}")),
            }
        },
    )
    .await;
    let pending_after = pending_after
        .into_inner()
        .expect("pending time")
        .expect("the alert was seen pending before firing");
    assert!(pending_after <= firing_after);
    let data = prometheus.api("/api/v1/alerts").await.expect("alerts");
    let alert = data["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["labels"]["alertname"] == NODE_DOWN)
        .cloned()
        .expect("the firing alert");
    assert_eq!(alert["labels"]["severity"], "ticket");
    assert_eq!(alert["labels"]["team"], "storage-sre");
    assert!(
        alert["annotations"]["runbook"]
            .as_str()
            .unwrap_or_default()
            .contains("cairn cluster status"),
        "{alert}"
    );
    println!(
        "figure: node {victim} killed (SIGKILL) -> {NODE_DOWN} pending after {:.1} s, firing after {:.1} s \
         (scrape and evaluation every 1 s, `for` 1 m)",
        pending_after.as_secs_f64(),
        firing_after.as_secs_f64()
    );
}

/// The metric names (with their `_total`, `_bucket`, `_count`, `_sum`
/// forms) a metrics page declares or shows.
fn exported_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_string());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_count", "_sum"],
                _ => &[],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The `cairn_*` metric names a PromQL expression uses.
fn queried_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("cairn_") {
                names.insert(word.clone());
            }
            word.clear();
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_rules_query_only_metrics_that_exist() {
    init_logging();
    let dashboard = dashboard();
    assert!(dashboard["title"].is_string(), "dashboard title");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} twice");
    }
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let dashboard_names: BTreeSet<String> = exprs.iter().flat_map(|e| queried_names(e)).collect();
    // The views the issue asks for are there.
    for needed in [
        "cairn_gateway_ingest_bytes_total",
        "cairn_gateway_read_bytes_total",
        "cairn_protection_packs",
        "cairn_region_nodes_up",
        "cairn_repair_queue_packs",
        "cairn_rpc_duration_seconds_bucket",
        "cairn_shard_read_duration_seconds_bucket",
        "cairn_agent_job_last_success_timestamp_seconds",
        "cairn_agent_job_last_duration_seconds",
        "cairn_agent_job_failures_total",
        "cairn_agent_drill_rto_seconds",
    ] {
        assert!(
            dashboard_names.contains(needed),
            "the dashboard shows no {needed}"
        );
    }
    let rule_names: BTreeSet<String> = alert_rules()
        .values()
        .flat_map(|rule| queried_names(rule["expr"].as_str().unwrap_or_default()))
        .collect();

    // A real secure node's page (TLS expiry is only there with TLS).
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = ProcessCluster::start_with(
        &dir.path().join("cluster"),
        &[1, 1, 1],
        DOWN_AFTER,
        ProcessOptions {
            secure: true,
            erasure: "1+2".into(),
            ..ProcessOptions::default()
        },
    );
    cluster.wait_ready(Duration::from_secs(60)).await;
    let token = cluster.tls().expect("secure cluster").token.clone();
    let url = format!("http://{}/metrics", cluster.metrics_addr(1));
    let page = wait_until(
        "node 1's metrics page with the audit chain checked",
        Duration::from_secs(60),
        || async {
            let page = http_get(url.clone(), Some(token.clone())).await?;
            if page.contains("cairn_audit_chain_valid 1") {
                Ok(page)
            } else {
                Err("no valid audit chain on the page yet".into())
            }
        },
    )
    .await;
    let mut exported = exported_names(&page);
    for name in [
        "cairn_disk_capacity_bytes",
        "cairn_disk_available_bytes",
        "cairn_tls_certificate_expiry_timestamp_seconds",
        "cairn_audit_entries",
        "cairn_gateway_ingest_bytes_total",
        "cairn_rpc_duration_seconds_bucket",
        "cairn_rpc_errors_total",
        "cairn_region_nodes_up",
    ] {
        assert!(
            exported.contains(name),
            "the node exports no {name}:\n{page}"
        );
    }
    assert!(
        page.contains("cairn_tls_certificate_expiry_timestamp_seconds{certificate=\"ca\"}"),
        "{page}"
    );
    let agent_page = run_agent_once(&cluster, dir.path());
    let agent_names = exported_names(&agent_page);
    for name in AGENT_METRICS {
        assert!(
            agent_names.contains(*name),
            "the agent exports no {name}:\n{agent_page}"
        );
    }
    exported.extend(agent_names);
    let unknown: Vec<_> = dashboard_names.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries {unknown:?}, which nothing exports"
    );
    let unknown: Vec<_> = rule_names.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the rules query {unknown:?}, which nothing exports"
    );
}

/// The sum of a metric's samples whose line starts with `prefix` (name and
/// labels), over several pages.
fn sum_samples(pages: &[String], prefix: &str) -> f64 {
    pages
        .iter()
        .flat_map(|page| page.lines())
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_bytes_rpc_latency_and_errors_are_counted_on_a_real_cluster() {
    use cairn_proto::v1 as pb;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics_ports = ports.clone();
    let cluster = cairn_node::local_cluster::LocalCluster::start_tuned(
        &dir.path().join("cluster"),
        &[1, 1, 1],
        "1+2",
        move |node| {
            // Also called on a template without an id.
            if let Some(id) = node.node_id {
                node.metrics_listen = Some(([127, 0, 0, 1], metrics_ports[id as usize - 1]).into());
            }
        },
    )
    .await
    .expect("cluster");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    let scrape_all = || async {
        let mut pages = Vec::new();
        for port in &ports {
            pages.push(http_get(format!("http://127.0.0.1:{port}/metrics"), None).await?);
        }
        Ok::<_, String>(pages)
    };
    let before = scrape_all().await.expect("scrape");
    assert_eq!(
        sum_samples(&before, "cairn_gateway_ingest_bytes_total"),
        0.0
    );

    let repo = cairn_tests::must_init(&cluster).await;
    let source = dir.path().join("source");
    cairn_cli::datagen::generate(&source, 2, 7).expect("data");
    let summary = cairn_tests::must_backup(&repo, &source, "chat").await;
    cairn_tests::must_restore_identical(&repo, "latest", &source, dir.path(), &[]).await;
    // One refused PutPack on node 1: its id is not the hash of its bytes.
    let node1 = cairn_client::Cluster::new(&cluster.addrs()[..1]).expect("address");
    let refused = node1
        .call("put pack", |mut c| async move {
            c.put_pack(pb::PutPackRequest {
                tenant: cairn_tests::TENANT.into(),
                pack_id: vec![7; 32],
                data: vec![1, 2, 3].into(),
                blobs: vec![],
                session: vec![],
            })
            .await
        })
        .await;
    assert!(
        refused.is_err(),
        "a pack whose id is not its hash is refused"
    );

    let pages = scrape_all().await.expect("scrape");
    let ingested = sum_samples(&pages, "cairn_gateway_ingest_bytes_total");
    let read = sum_samples(&pages, "cairn_gateway_read_bytes_total");
    println!(
        "backup added {} bytes; gateways counted {ingested} ingested, {read} read",
        summary.bytes_added
    );
    assert!(ingested > 0.0, "no ingest bytes counted");
    assert!(read > 0.0, "no read bytes counted");
    assert!(
        sum_samples(
            &pages,
            "cairn_rpc_duration_seconds_count{method=\"PutPack\"}"
        ) >= 1.0,
        "PutPack calls not timed"
    );
    assert!(
        sum_samples(
            &pages,
            "cairn_rpc_duration_seconds_count{method=\"ReadPack\"}"
        ) >= 1.0,
        "ReadPack calls not timed"
    );
    assert_eq!(
        sum_samples(
            &pages[..1],
            "cairn_rpc_errors_total{method=\"PutPack\",code=\"invalid_argument\"}"
        ),
        1.0,
        "{}",
        pages[0]
    );
    let capacity = sum_samples(&pages[..1], "cairn_disk_capacity_bytes ");
    let available = sum_samples(&pages[..1], "cairn_disk_available_bytes ");
    assert!(capacity > 0.0 && available > 0.0 && available <= capacity);
    assert!(
        sum_samples(&pages[..1], "cairn_audit_entries ") >= 1.0,
        "{}",
        pages[0]
    );
    assert_eq!(sum_samples(&pages[..1], "cairn_audit_chain_valid "), 1.0);
    assert_eq!(
        sum_samples(&pages[..1], "cairn_region_nodes_up{region=\"r2\"}"),
        1.0
    );
    // Insecure nodes have no certificate to report.
    assert!(!pages[0].contains("cairn_tls_certificate_expiry_timestamp_seconds{"));
    cluster.shutdown().await.expect("shutdown");
}

/// `cairn` with the cluster's addresses, CA and `token_file`, as tenant
/// `alerts`; panics with its stderr unless it succeeds.
fn cairn(cluster: &ProcessCluster, token_file: &Path, args: &[&str]) -> String {
    let tls = cluster.tls().expect("secure cluster");
    let output = Command::new(cli_binary())
        .args([
            "--cluster",
            &cluster.addrs().join(","),
            "--tenant",
            "alerts",
        ])
        .arg("--ca-file")
        .arg(tls.dir.join("ca.pem"))
        .arg("--token-file")
        .arg(token_file)
        .args(args)
        .env("CAIRN_PASSWORD", "alerts passphrase")
        .stdin(Stdio::null())
        .output()
        .expect("cairn runs");
    assert!(
        output.status.success(),
        "cairn {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A real agent over TLS with a `backup` token (a backup job) and the admin
/// token (a drill), run once: the metrics file it writes.
fn run_agent_once(cluster: &ProcessCluster, dir: &Path) -> String {
    let tls = cluster.tls().expect("secure cluster");
    let admin = tls.dir.join("bootstrap-token");
    cairn(cluster, &admin, &["init"]);
    let created: serde_json::Value = serde_json::from_str(&cairn(
        cluster,
        &admin,
        &[
            "token", "create", "--role", "backup", "--tenant", "alerts", "--json",
        ],
    ))
    .expect("token create --json");
    let root = dir.join("agent");
    let data = root.join("data");
    std::fs::create_dir_all(&data).expect("agent dirs");
    std::fs::write(data.join("room-42.log"), "hello\n".repeat(1000)).expect("data");
    let backup_token = root.join("backup-token");
    std::fs::write(&backup_token, created["token"].as_str().expect("token")).expect("token");
    std::fs::write(root.join("password"), "alerts passphrase").expect("password");
    let addrs: Vec<String> = cluster.addrs().iter().map(|a| format!("{a:?}")).collect();
    let config = format!(
        r#"state_dir = {state:?}
time_zone = "UTC"
[cluster]
addresses = [{addrs}]
ca_file = {ca:?}
token_file = {backup_token:?}
password_file = {password:?}
tenant = "alerts"

[[job]]
name = "rooms-hourly"
kind = "backup"
schedule = "0 * * * *"
dataset = "rooms"
level = "incremental"
paths = [{data:?}]

[[job]]
name = "rooms-drill"
kind = "drill"
schedule = "0 3 * * 0"
token_file = {admin:?}
dataset = "rooms"
scratch_dir = {scratch:?}
rto_target = "1h"
"#,
        state = root.join("state"),
        addrs = addrs.join(", "),
        ca = tls.dir.join("ca.pem"),
        password = root.join("password"),
        scratch = root.join("scratch"),
    );
    std::fs::write(root.join("agent.toml"), config).expect("agent config");
    let metrics = root.join("agent.prom");
    let output = Command::new(cli_binary())
        .arg("agent")
        .arg("--config")
        .arg(root.join("agent.toml"))
        .arg("--once")
        .arg("--metrics-file")
        .arg(&metrics)
        .stdin(Stdio::null())
        .output()
        .expect("cairn agent runs");
    assert!(
        output.status.success(),
        "cairn agent --once: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let page = std::fs::read_to_string(&metrics).expect("the agent wrote its metrics file");
    // node_exporter's textfile collector parses the classic text format:
    // promtool's linter reads the same parser.
    let lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&metrics).expect("metrics file"))
        .output()
        .expect("promtool runs (apt-get install prometheus)");
    assert!(
        lint.status.success(),
        "promtool check metrics rejects the agent's file: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    for job in ["rooms-hourly", "rooms-drill"] {
        assert!(
            page.lines()
                .any(|l| l.starts_with("cairn_agent_job_runs_total")
                    && l.contains(&format!("job=\"{job}\""))
                    && l.contains("outcome=\"success\"")
                    && l.ends_with(" 1")),
            "job {job} did not succeed once over TLS:\n{page}"
        );
    }
    page
}
