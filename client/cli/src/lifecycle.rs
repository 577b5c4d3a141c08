//! `forget`, `prune`, `lock`, `unlock`, `policy` and `stats`: their
//! arguments, how they are turned into SDK calls, and their output (human
//! tables like restic's, and the `--json` documents).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use cairn_client::lifecycle::{
    ForgetDecision, ForgetReport, KeepRules, LockInfo, LockUntil, PolicySpec, PruneReport, Stats,
};
use clap::Args;

use crate::access::time_or_none;

/// restic's `--keep-*` rules.
#[derive(Debug, Clone, Default, Args)]
pub struct KeepArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest snapshot of each of the last N weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
    /// Keep every snapshot within DUR of the dataset's newest (e.g. 7d, 1y).
    #[arg(long, value_name = "DUR")]
    pub keep_within: Option<String>,
    /// Keep every snapshot with this tag. Repeatable.
    #[arg(long = "keep-tag", value_name = "TAG")]
    pub keep_tags: Vec<String>,
}

impl KeepArgs {
    /// The rules these flags give (a bad duration is named with its flag).
    pub fn to_rules(&self) -> anyhow::Result<KeepRules> {
        Ok(KeepRules {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within: self
                .keep_within
                .as_deref()
                .map(|d| parse_duration("--keep-within", d))
                .transpose()?,
            tags: self.keep_tags.clone(),
        })
    }
}

/// A duration flag: `30d`, `12h`, `3y`, `1y 6months` (humantime).
pub fn parse_duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    let d = parse_duration_or_zero(flag, text)?;
    if d.is_zero() {
        bail!("invalid {flag} {text:?}: must be longer than zero");
    }
    Ok(d)
}

/// A duration flag where zero means "at once" (`--cold-after 0s`).
pub fn parse_duration_or_zero(flag: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text.trim())
        .map_err(|e| anyhow::anyhow!("invalid {flag} {text:?}: {e} (e.g. 12h, 30d, 3y)"))
}

/// `lock --until`: an RFC 3339 time or a date (midnight UTC), which must be
/// in the future; or `lock --for`: a duration.
pub fn lock_until(
    until: Option<&str>,
    for_: Option<&str>,
    now: SystemTime,
) -> anyhow::Result<LockUntil> {
    match (until, for_) {
        (Some(text), None) => {
            let text = text.trim();
            let time = humantime::parse_rfc3339_weak(text)
                .or_else(|_| humantime::parse_rfc3339_weak(&format!("{text}T00:00:00Z")))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "invalid --until {text:?}: give an RFC 3339 time (2027-01-31T08:00:00Z) or a date (2027-01-31)"
                    )
                })?;
            if time <= now {
                bail!(
                    "--until {text} is in the past: a lock must end in the future (or use --for DUR)"
                );
            }
            Ok(LockUntil::At(time))
        }
        (None, Some(text)) => Ok(LockUntil::For(parse_duration("--for", text)?)),
        (Some(_), Some(_)) => bail!("give either --until TIME or --for DUR, not both"),
        (None, None) => bail!("give how long the lock holds: --until TIME or --for DUR"),
    }
}

/// RFC 3339 (seconds) of Unix ms, "-" when not set.
pub fn time_text(ms: i64) -> String {
    time_or_none(ms).unwrap_or_else(|| "-".into())
}

fn lock_json(lock: &Option<LockInfo>) -> serde_json::Value {
    match lock {
        Some(l) => serde_json::json!({"mode": l.mode, "until": time_or_none(l.until_unix_ms)}),
        None => serde_json::Value::Null,
    }
}

fn decision_json(d: &ForgetDecision) -> serde_json::Value {
    serde_json::json!({
        "id": d.id, "dataset": d.dataset, "time": time_or_none(d.committed_unix_ms),
        "kind": d.kind, "tags": d.tags, "lock": lock_json(&d.lock), "reasons": d.reasons,
    })
}

/// The `forget --json` document.
pub fn forget_json(
    report: &ForgetReport,
    dry_run: bool,
    prune: Option<&PruneReport>,
) -> serde_json::Value {
    serde_json::json!({
        "keep": report.kept().map(decision_json).collect::<Vec<_>>(),
        "remove": report.to_remove().map(decision_json).collect::<Vec<_>>(),
        "removed": report.removed,
        "dry_run": dry_run,
        "prune": prune,
    })
}

/// The human report of a forget, per dataset like restic: the snapshots
/// kept with why, then those removed.
pub fn forget_text(report: &ForgetReport, dry_run: bool) -> String {
    let mut out = String::new();
    let datasets: std::collections::BTreeSet<&str> = report
        .decisions
        .iter()
        .map(|d| d.dataset.as_str())
        .collect();
    for dataset in datasets {
        out.push_str(&format!("dataset {dataset}\n"));
        let of = |keep: bool| -> Vec<&ForgetDecision> {
            report
                .decisions
                .iter()
                .filter(|d| d.dataset == dataset && d.keep == keep)
                .collect()
        };
        for (keep, label) in [(true, "keep"), (false, "remove")] {
            let rows = of(keep);
            if rows.is_empty() {
                continue;
            }
            out.push_str(&format!("{label} {} snapshot(s):\n", rows.len()));
            out.push_str(&format!(
                "{:<10} {:<20} {:<12} {:<16} {}\n",
                "id", "time", "kind", "tags", "reasons"
            ));
            for d in rows {
                // The lock, unless a reason already names it.
                let lock = match &d.lock {
                    Some(l) if !d.reasons.iter().any(|r| r.starts_with("locked")) => {
                        format!(" [locked {} until {}]", l.mode, time_text(l.until_unix_ms))
                    }
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "{:<10} {:<20} {:<12} {:<16} {}{}\n",
                    d.id.get(..8).unwrap_or(&d.id),
                    time_text(d.committed_unix_ms),
                    d.kind,
                    d.tags.join(","),
                    d.reasons.join(", "),
                    lock
                ));
            }
        }
        out.push('\n');
    }
    let to_remove = report.to_remove().count();
    if dry_run {
        out.push_str(&format!(
            "dry run: {to_remove} snapshot(s) would be removed, nothing was changed\n"
        ));
    } else {
        out.push_str(&format!(
            "{} snapshot(s) removed; their data is freed by `cairn prune` (or the cluster's next collection)\n",
            report.removed
        ));
    }
    out
}

/// Bytes in a unit a person reads (powers of 1024).
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// The human report of a prune.
pub fn prune_text(r: &PruneReport) -> String {
    let verb = if r.dry_run { "would be" } else { "were" };
    let mut out = format!(
        "{}{} pack(s) {verb} deleted and {} repacked ({} live bytes copied); {} freed ({} bytes), {} shard file(s); {} blob(s) removed, {} live; {} pack(s) kept in grace for backups still running; {:.2}s\n",
        if r.dry_run { "dry run: " } else { "" },
        r.packs_deleted,
        r.packs_repacked,
        r.bytes_repacked,
        bytes_text(r.bytes_freed),
        r.bytes_freed,
        r.shards_deleted,
        r.blobs_removed,
        r.blobs_live,
        r.packs_in_grace,
        r.duration_ms as f64 / 1000.0
    );
    for skipped in &r.skipped {
        out.push_str(&format!("skipped: {skipped}\n"));
    }
    out
}

/// The human report of `stats`.
pub fn stats_text(s: &Stats) -> String {
    format!(
        "snapshots:           {}\n\
         logical bytes:       {} ({})\n\
         stored bytes:        {} ({}) in {} blob(s)\n\
         dedup+compression:   {:.2}x\n\
         packs:               {} ({} before erasure coding)\n\
         raw bytes on nodes:  {} ({})\n\
         erasure overhead:    {:.2}x\n\
         datasets:            {}\n",
        s.snapshots,
        bytes_text(s.logical_bytes),
        s.logical_bytes,
        bytes_text(s.stored_bytes),
        s.stored_bytes,
        s.blobs,
        s.dedup_compression_ratio,
        s.packs,
        bytes_text(s.pack_bytes),
        bytes_text(s.raw_bytes),
        s.raw_bytes,
        s.erasure_overhead,
        if s.datasets.is_empty() {
            "-".to_string()
        } else {
            s.datasets.join(", ")
        }
    )
}

fn duration_text(d: Option<Duration>) -> String {
    d.map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|| "-".into())
}

/// The rules as the flags that give them ("--keep-last 3 --keep-daily 7").
pub fn rules_text(k: &KeepRules) -> String {
    let mut parts = Vec::new();
    for (flag, n) in [
        ("last", k.last),
        ("hourly", k.hourly),
        ("daily", k.daily),
        ("weekly", k.weekly),
        ("monthly", k.monthly),
        ("yearly", k.yearly),
    ] {
        if n > 0 {
            parts.push(format!("--keep-{flag} {n}"));
        }
    }
    if let Some(within) = k.within {
        parts.push(format!(
            "--keep-within {}",
            humantime::format_duration(within)
        ));
    }
    for tag in &k.tags {
        parts.push(format!("--keep-tag {tag}"));
    }
    if parts.is_empty() {
        "(no keep rule)".into()
    } else {
        parts.join(" ")
    }
}

/// The human report of `policy show`.
pub fn policies_text(policies: &[PolicySpec], warnings: &[String]) -> String {
    let mut out = String::new();
    for p in policies {
        out.push_str(&format!(
            "dataset {}: {}; max age {}; cold after {}; updated {}, last applied {}\n",
            p.dataset,
            rules_text(&p.keep),
            duration_text(p.max_age),
            duration_text(p.cold_after),
            time_text(p.updated_unix_ms),
            time_or_none(p.applied_unix_ms).unwrap_or_else(|| "never".into())
        ));
    }
    out.push_str(&match policies.len() {
        1 => "1 policy\n".to_string(),
        n => format!("{n} policies\n"),
    });
    for w in warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// The `policy show --json` document.
pub fn policies_json(policies: &[PolicySpec], warnings: &[String]) -> serde_json::Value {
    serde_json::json!({
        "policies": policies.iter().map(|p| serde_json::json!({
            "dataset": p.dataset, "keep": p.keep,
            "max_age": p.max_age.map(|d| humantime::format_duration(d).to_string()),
            "cold_after": p.cold_after.map(|d| humantime::format_duration(d).to_string()),
            "updated": time_or_none(p.updated_unix_ms),
            "applied": time_or_none(p.applied_unix_ms),
        })).collect::<Vec<_>>(),
        "warnings": warnings,
    })
}

/// The policy `policy set` gives.
pub fn policy_spec(
    dataset: &str,
    keep: &KeepArgs,
    max_age: Option<&str>,
    cold_after: Option<&str>,
) -> anyhow::Result<PolicySpec> {
    let spec = PolicySpec {
        dataset: dataset.to_string(),
        keep: keep.to_rules()?,
        max_age: max_age
            .map(|d| parse_duration("--max-age", d))
            .transpose()?,
        cold_after: cold_after
            .map(|d| parse_duration_or_zero("--cold-after", d))
            .transpose()?,
        updated_unix_ms: 0,
        applied_unix_ms: 0,
    };
    if spec.keep.is_empty() && spec.max_age.is_none() && spec.cold_after.is_none() {
        bail!(
            "policy set: give at least one of --keep-*, --max-age, --cold-after (to drop the policy: cairn policy remove --dataset {dataset})"
        );
    }
    Ok(spec)
}

/// Unix ms of a system time (for messages).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// `--mode` of `lock`.
pub fn lock_mode(text: &str) -> anyhow::Result<cairn_client::LockMode> {
    text.parse()
        .with_context(|| format!("invalid --mode {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_after_may_be_zero_but_max_age_may_not() {
        let keep = KeepArgs::default();
        let spec = policy_spec("chat", &keep, None, Some("0s")).expect("0s tiers at once");
        assert_eq!(spec.cold_after, Some(Duration::ZERO));
        let error = policy_spec("chat", &keep, Some("0s"), None).expect_err("max-age 0s");
        assert!(error.to_string().contains("longer than zero"), "{error}");
        assert!(policy_spec("chat", &keep, None, Some("soon")).is_err());
    }

    fn decision(id: u8, dataset: &str, keep: bool, reasons: &[&str]) -> ForgetDecision {
        ForgetDecision {
            id: hex::encode([id; 32]),
            dataset: dataset.into(),
            kind: "full".into(),
            committed_unix_ms: 1_764_000_000_000 + i64::from(id),
            tags: vec!["nightly".into()],
            lock: (id == 2).then(|| LockInfo {
                mode: "compliance".into(),
                until_unix_ms: 1_900_000_000_000,
            }),
            keep,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn report() -> ForgetReport {
        ForgetReport {
            decisions: vec![
                decision(1, "chat", false, &["no rule keeps it"]),
                decision(2, "chat", true, &["locked (compliance) until 2030-03-17"]),
                decision(3, "chat", true, &["last 1", "latest"]),
            ],
            removed: 1,
        }
    }

    #[test]
    fn forget_json_has_the_contract_shape() {
        let prune = PruneReport {
            bytes_freed: 42,
            ..Default::default()
        };
        let json = forget_json(&report(), false, Some(&prune));
        let keep = json["keep"].as_array().expect("keep");
        let remove = json["remove"].as_array().expect("remove");
        assert_eq!(keep.len(), 2);
        assert_eq!(remove.len(), 1);
        for row in keep.iter().chain(remove) {
            for field in ["id", "dataset", "time", "kind", "reasons"] {
                assert!(row.get(field).is_some(), "{field} missing in {row}");
            }
        }
        assert_eq!(remove[0]["id"], hex::encode([1u8; 32]));
        assert_eq!(remove[0]["time"], "2025-11-24T16:00:00Z");
        assert_eq!(keep[1]["reasons"], serde_json::json!(["last 1", "latest"]));
        assert_eq!(keep[0]["lock"]["mode"], "compliance");
        assert_eq!(json["removed"], 1);
        assert_eq!(json["dry_run"], false);
        assert_eq!(json["prune"]["bytes_freed"], 42);
        let dry = forget_json(&report(), true, None);
        assert!(dry["prune"].is_null());
        assert_eq!(dry["dry_run"], true);
    }

    #[test]
    fn forget_text_lists_kept_then_removed_per_dataset() {
        let text = forget_text(&report(), true);
        let keep = text.find("keep 2 snapshot(s):").expect("keep table");
        let remove = text.find("remove 1 snapshot(s):").expect("remove table");
        assert!(keep < remove, "{text}");
        assert!(text.contains("last 1, latest"), "{text}");
        // The lock is named once, by its reason.
        assert!(text.contains("locked (compliance) until"), "{text}");
        assert!(!text.contains("[locked"), "{text}");
        assert!(
            text.contains("dry run: 1 snapshot(s) would be removed"),
            "{text}"
        );
    }

    #[test]
    fn durations_and_lock_times() {
        assert_eq!(
            parse_duration("--for", "30d").expect("30d"),
            Duration::from_secs(30 * 86_400)
        );
        assert!(parse_duration("--for", "3y").is_ok());
        assert!(parse_duration("--for", "0s").is_err());
        let err = parse_duration("--keep-within", "soon").expect_err("bad");
        assert!(err.to_string().contains("--keep-within"), "{err}");
        let now = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        assert_eq!(
            lock_until(None, Some("12h"), now).expect("for"),
            LockUntil::For(Duration::from_secs(12 * 3600))
        );
        let LockUntil::At(at) = lock_until(Some("2030-01-31"), None, now).expect("date") else {
            panic!("an absolute time");
        };
        assert_eq!(unix_ms(at), 1_896_048_000_000);
        assert!(lock_until(Some("2030-01-31T08:00:00Z"), None, now).is_ok());
        assert!(lock_until(Some("2001-01-01"), None, now).is_err());
        assert!(lock_until(Some("tomorrow"), None, now).is_err());
        assert!(lock_until(None, None, now).is_err());
        assert!(lock_until(Some("2030-01-31"), Some("1d"), now).is_err());
    }

    #[test]
    fn keep_flags_become_rules() {
        let args = KeepArgs {
            keep_last: 3,
            keep_within: Some("7d".into()),
            keep_tags: vec!["monthly".into()],
            ..Default::default()
        };
        let rules = args.to_rules().expect("rules");
        assert_eq!(rules.last, 3);
        assert_eq!(rules.within, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(
            rules_text(&rules),
            "--keep-last 3 --keep-within 7days --keep-tag monthly"
        );
        assert!(KeepArgs::default().to_rules().expect("none").is_empty());
        assert!(policy_spec("chat", &KeepArgs::default(), None, None).is_err());
        let spec = policy_spec("chat", &KeepArgs::default(), Some("7y"), None).expect("max age");
        assert!(spec.max_age.is_some());
    }
}
