//! What the command line reads to reach a secured cluster, and how it shows
//! tokens, key slots and the audit log: the pure half of `cairn token`,
//! `cairn key` and `cairn audit`, kept here so it is tested without a node.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use cairn_client::ClusterOptions;
use cairn_proto::v1 as pb;
use zeroize::Zeroizing;

/// Environment variable holding the token itself (not a file name).
pub const TOKEN_ENV: &str = "CAIRN_TOKEN";

/// The token to present: `--token-file` first, else `CAIRN_TOKEN` (`env`
/// is the variable's value, passed in so tests need not touch the process
/// environment). Errors name the file, never the token.
pub fn read_token(
    token_file: Option<&Path>,
    env: Option<String>,
) -> anyhow::Result<Option<Zeroizing<String>>> {
    if let Some(path) = token_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read token file {}", path.display()))?,
        );
        if text.trim().is_empty() {
            bail!("token file {} is empty", path.display());
        }
        return Ok(Some(text));
    }
    Ok(env.filter(|t| !t.trim().is_empty()).map(Zeroizing::new))
}

/// The cluster CA: a PEM file, or the PEM itself when `CAIRN_CA` holds
/// certificate text rather than a file name.
pub fn read_ca(ca: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(ca) = ca else { return Ok(None) };
    let text = ca.as_os_str().as_encoded_bytes();
    if text.starts_with(b"-----BEGIN") {
        return Ok(Some(text.to_vec()));
    }
    std::fs::read(ca)
        .map(Some)
        .with_context(|| format!("cannot read CA file {}", ca.display()))
}

/// TLS when a CA is given, and the token when one is.
pub fn cluster_options(
    ca_pem: Option<Vec<u8>>,
    token: Option<Zeroizing<String>>,
) -> anyhow::Result<ClusterOptions> {
    let mut options = ClusterOptions::default();
    if let Some(pem) = ca_pem {
        options = options.ca_pem(pem);
    }
    if let Some(token) = token {
        options.credentials = cairn_client::Credentials::token(token)?;
    }
    Ok(options)
}

/// `--since`: an RFC 3339 time (or a date), or a duration before `now`
/// ("24h", "7d", "90min"). Unix milliseconds.
pub fn parse_since(text: &str, now: SystemTime) -> anyhow::Result<i64> {
    let text = text.trim();
    let time = if let Ok(ago) = humantime::parse_duration(text) {
        now.checked_sub(ago).unwrap_or(UNIX_EPOCH)
    } else if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        time
    } else if let Ok(time) = humantime::parse_rfc3339_weak(&format!("{text}T00:00:00Z")) {
        time
    } else {
        bail!(
            "invalid --since {text:?}: give an RFC 3339 time (2026-01-31T08:00:00Z), a date (2026-01-31) or a duration ago (24h, 7d)"
        );
    };
    Ok(time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(i64::MAX))
}

/// `--ttl`: a duration ("30d", "12h").
pub fn parse_ttl(text: &str) -> anyhow::Result<Duration> {
    let ttl = humantime::parse_duration(text.trim())
        .map_err(|e| anyhow::anyhow!("invalid --ttl {text:?}: {e} (e.g. 12h, 30d)"))?;
    if ttl.is_zero() {
        bail!("invalid --ttl {text:?}: must be longer than zero (leave it out for no expiry)");
    }
    Ok(ttl)
}

/// RFC 3339 (seconds) of Unix milliseconds; `None` for 0 (not set).
pub fn time_or_none(ms: i64) -> Option<String> {
    (ms > 0).then(|| {
        let time = UNIX_EPOCH + Duration::from_millis(ms as u64);
        humantime::format_rfc3339_seconds(time).to_string()
    })
}

/// A token as `--json` shows it (never its secret).
pub fn token_json(info: &pb::TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": info.id, "role": info.role, "tenant": tenant_or_null(&info.tenant),
        "created": time_or_none(info.created_unix_ms),
        "expires": time_or_none(info.expires_unix_ms), "revoked": info.revoked,
        "label": info.label, "created_by": info.created_by,
    })
}

fn tenant_or_null(tenant: &str) -> Option<&str> {
    (!tenant.is_empty()).then_some(tenant)
}

/// `cairn token create --json`: the contract's fields, the secret included.
pub fn created_token_json(info: &pb::TokenInfo, secret: &str) -> serde_json::Value {
    serde_json::json!({
        "id": info.id, "token": secret, "role": info.role,
        "tenant": tenant_or_null(&info.tenant),
        "expires": time_or_none(info.expires_unix_ms),
    })
}

/// One line of `cairn token list`.
pub fn token_line(info: &pb::TokenInfo, now_ms: i64) -> String {
    let state = if info.revoked {
        "revoked"
    } else if info.expires_unix_ms > 0 && info.expires_unix_ms <= now_ms {
        "expired"
    } else {
        "active"
    };
    format!(
        "{:<18} {:<14} {:<16} {:<8} {:<21} {:<21} {}",
        info.id,
        info.role,
        if info.tenant.is_empty() {
            "(all)"
        } else {
            &info.tenant
        },
        state,
        time_or_none(info.created_unix_ms).unwrap_or_else(|| "-".into()),
        time_or_none(info.expires_unix_ms).unwrap_or_else(|| "never".into()),
        info.label
    )
}

/// Header of `cairn token list`.
pub fn token_header() -> String {
    format!(
        "{:<18} {:<14} {:<16} {:<8} {:<21} {:<21} label",
        "id", "role", "tenant", "state", "created", "expires"
    )
}

/// Who did it, in a few words: the token (id, role, tenant) or the node.
pub fn actor(entry: &pb::AuditEntry) -> String {
    match entry.actor_kind.as_str() {
        "node" => format!("node {}", entry.node_id),
        "token" => {
            let mut text = format!("token {} ({}", entry.token_id, entry.role);
            if !entry.tenant.is_empty() {
                text.push_str(&format!(", tenant {}", entry.tenant));
            }
            text.push(')');
            text
        }
        "" => "-".into(),
        other => other.to_string(),
    }
}

/// One line of `cairn audit log`.
pub fn audit_line(entry: &pb::AuditEntry) -> String {
    format!(
        "{:>6}  {}  {}  {}  {}  {}",
        entry.seq,
        time_or_none(entry.time_unix_ms).unwrap_or_else(|| "-".into()),
        actor(entry),
        entry.action,
        if entry.target.is_empty() {
            "-"
        } else {
            &entry.target
        },
        entry.result
    )
}

/// One entry as `cairn audit log --json` shows it.
pub fn audit_json(entry: &pb::AuditEntry) -> serde_json::Value {
    serde_json::json!({
        "seq": entry.seq, "time": time_or_none(entry.time_unix_ms),
        "actor_kind": entry.actor_kind, "token_id": entry.token_id, "role": entry.role,
        "tenant": tenant_or_null(&entry.tenant),
        "node_id": (entry.node_id != 0).then_some(entry.node_id),
        "action": entry.action, "target": entry.target, "result": entry.result,
        "prev_hash": hex::encode(&entry.prev_hash), "hash": hex::encode(&entry.hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).expect("valid time")
    }

    #[test]
    fn since_takes_a_time_a_date_or_a_duration_ago() {
        let now = at("2026-11-29T12:00:00Z");
        let ms = |t: &str| {
            at(t)
                .duration_since(UNIX_EPOCH)
                .expect("after epoch")
                .as_millis() as i64
        };
        assert_eq!(
            parse_since("24h", now).expect("duration"),
            ms("2026-11-28T12:00:00Z")
        );
        assert_eq!(
            parse_since("7d", now).expect("days"),
            ms("2026-11-22T12:00:00Z")
        );
        assert_eq!(
            parse_since("2026-11-01T08:30:00Z", now).expect("rfc3339"),
            ms("2026-11-01T08:30:00Z")
        );
        assert_eq!(
            parse_since("2026-11-01", now).expect("date"),
            ms("2026-11-01T00:00:00Z")
        );
        let error = parse_since("yesterday", now).expect_err("refused");
        assert!(error.to_string().contains("--since"), "{error}");
    }

    #[test]
    fn ttl_must_be_a_positive_duration() {
        assert_eq!(
            parse_ttl("30d").expect("valid"),
            Duration::from_secs(30 * 86_400)
        );
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("forever").is_err());
    }

    #[test]
    fn the_token_file_wins_over_the_environment_and_errors_never_show_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").expect("write");
        let token = read_token(Some(&file), Some("from-env".into())).expect("reads");
        assert_eq!(token.as_deref().map(|t| t.trim()), Some("from-file"));
        let token = read_token(None, Some("from-env".into())).expect("env");
        assert_eq!(token.as_deref().map(String::as_str), Some("from-env"));
        assert!(
            read_token(None, Some("  ".into()))
                .expect("blank")
                .is_none()
        );
        assert!(read_token(None, None).expect("none").is_none());
        std::fs::write(&file, "\n").expect("write");
        let error = read_token(Some(&file), None).expect_err("empty file");
        assert!(error.to_string().contains("is empty"), "{error}");
        std::fs::write(&file, "bad token with spaces").expect("write");
        let token = read_token(Some(&file), None).expect("reads");
        let error = cluster_options(None, token).expect_err("refused");
        assert!(!format!("{error:#}").contains("bad token"), "{error:#}");
    }

    #[test]
    fn a_ca_is_a_file_or_pem_text() {
        assert!(read_ca(None).expect("none").is_none());
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let inline = read_ca(Some(Path::new(pem))).expect("inline");
        assert_eq!(inline.as_deref(), Some(pem.as_bytes()));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, pem).expect("write");
        assert_eq!(
            read_ca(Some(&file)).expect("file").as_deref(),
            Some(pem.as_bytes())
        );
        let missing = dir.path().join("missing.pem");
        let error = read_ca(Some(&missing)).expect_err("missing");
        assert!(
            error.to_string().starts_with("cannot read CA file"),
            "{error}"
        );
    }

    #[test]
    fn created_tokens_print_the_contract_fields() {
        let info = pb::TokenInfo {
            id: "a1b2".into(),
            role: "backup".into(),
            tenant: "chat".into(),
            expires_unix_ms: 0,
            ..Default::default()
        };
        let json = created_token_json(&info, "s3cret");
        let mut keys: Vec<&str> = json
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["expires", "id", "role", "tenant", "token"]);
        assert_eq!(json["expires"], serde_json::Value::Null);
        assert!(!token_json(&info).to_string().contains("s3cret"));
    }

    #[test]
    fn token_list_lines_say_revoked_and_expired() {
        let mut info = pb::TokenInfo {
            id: "a1b2".into(),
            role: "monitor".into(),
            expires_unix_ms: 1_000,
            ..Default::default()
        };
        assert!(token_line(&info, 2_000).contains("expired"));
        assert!(token_line(&info, 500).contains("active"));
        info.revoked = true;
        assert!(token_line(&info, 500).contains("revoked"));
        assert!(token_line(&info, 500).contains("(all)"));
    }

    #[test]
    fn audit_lines_name_the_actor() {
        let entry = pb::AuditEntry {
            seq: 3,
            time_unix_ms: 1_764_000_000_000,
            actor_kind: "token".into(),
            token_id: "ab12".into(),
            role: "backup".into(),
            tenant: "chat".into(),
            action: "RemoveNode".into(),
            target: "node 6".into(),
            result: "refused: role backup may not RemoveNode".into(),
            ..Default::default()
        };
        let line = audit_line(&entry);
        assert!(line.contains("token ab12 (backup, tenant chat)"), "{line}");
        assert!(line.contains("RemoveNode  node 6  refused"), "{line}");
        let node = pb::AuditEntry {
            actor_kind: "node".into(),
            node_id: 4,
            ..entry
        };
        assert_eq!(actor(&node), "node 4");
        assert_eq!(audit_json(&node)["node_id"], 4);
    }
}
