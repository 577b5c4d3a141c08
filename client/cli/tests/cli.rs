//! The `cairn` binary as a script sees it: one error line on stderr, the
//! cause named once, a non-zero exit. (Also makes `cargo test --workspace`
//! build the binary the multi-node tests drive.)

use std::process::Command;

#[test]
fn an_unreadable_password_file_is_one_line_with_its_cause_once() {
    let output = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "--cluster",
            "127.0.0.1:1",
            "--password-file",
            "/nonexistent/cairn-password",
            "snapshots",
        ])
        .env_remove("CAIRN_PASSWORD")
        .output()
        .expect("cairn runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: cannot read password file /nonexistent/cairn-password: No such file or directory (os error 2)",
    );
    assert!(output.stdout.is_empty(), "nothing on stdout");
}

#[test]
fn a_missing_passphrase_says_how_to_give_one() {
    let output = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--cluster", "127.0.0.1:1", "snapshots"])
        .env_remove("CAIRN_PASSWORD")
        .output()
        .expect("cairn runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CAIRN_PASSWORD") && stderr.contains("--password-file"),
        "{stderr}"
    );
}

fn cairn_offline(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
    command
        .args(["--cluster", "127.0.0.1:1"])
        .args(args)
        .env_remove("CAIRN_TOKEN")
        .env_remove("CAIRN_CA")
        .env_remove("CAIRN_TENANT")
        .env_remove("CAIRN_NEW_PASSWORD");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("cairn runs")
}

#[test]
fn a_malformed_token_is_refused_before_connecting_without_echoing_it() {
    let output = cairn_offline(&["token", "list"], &[("CAIRN_TOKEN", "secret part two")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: invalid token: it must be printable ASCII without spaces"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}

#[test]
fn an_unreadable_ca_or_token_file_is_named() {
    let output = cairn_offline(&["--ca-file", "/nonexistent/ca.pem", "token", "list"], &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: cannot read CA file /nonexistent/ca.pem"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").expect("write");
    let path = not_pem.to_string_lossy().to_string();
    let output = cairn_offline(&["--ca-file", &path, "token", "list"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: invalid CA (--ca-file or CAIRN_CA): it holds no PEM certificate"
    );
    let output = cairn_offline(
        &["--token-file", "/nonexistent/token", "token", "whoami"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: cannot read token file /nonexistent/token"),
        "{stderr}"
    );
}

#[test]
fn bad_since_ttl_and_missing_new_passphrase_fail_before_connecting() {
    let output = cairn_offline(&["audit", "log", "--since", "last tuesday"], &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid --since"));
    let output = cairn_offline(
        &["token", "create", "--role", "backup", "--ttl", "soon"],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid --ttl"));
    let output = cairn_offline(&["key", "add"], &[("CAIRN_PASSWORD", "pw")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no new passphrase") && stderr.contains("--new-password-file"),
        "{stderr}"
    );
}

/// End to end against an in-process cluster with tokens and TLS: these
/// need the node side of issue 7 (tokens, key slots, audit log).
mod secured {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::time::Duration;

    use cairn_cli::demo::Transport;
    use cairn_node::local_cluster::LocalCluster;
    use serde_json::Value;

    struct Env {
        _dir: tempfile::TempDir,
        dir: PathBuf,
        cluster: LocalCluster,
        addrs: String,
        /// `--ca-file` when the cluster runs TLS.
        ca_args: Vec<String>,
        /// The bootstrap cluster-admin token's file.
        admin_token: PathBuf,
    }

    impl Env {
        async fn start() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().to_path_buf();
            let cluster =
                LocalCluster::start_secure(&path.join("cluster"), &[2, 2, 2], "4+2", |_| {})
                    .await
                    .expect("cluster starts");
            cluster
                .wait_ready(Duration::from_secs(30))
                .await
                .expect("cluster ready");
            let admin_token = path.join("admin.token");
            std::fs::write(&admin_token, cluster.admin_token()).expect("token");
            let options = cairn_cli::demo::client_options(&cluster, Transport::Tls)
                .expect("the cluster's credentials");
            let mut ca_args = Vec::new();
            if let Some(pem) = &options.ca_pem {
                let ca = path.join("ca.pem");
                std::fs::write(&ca, pem).expect("write the CA");
                ca_args = vec!["--ca-file".to_string(), ca.to_string_lossy().to_string()];
            }
            Self {
                addrs: cluster.addrs().join(","),
                cluster,
                ca_args,
                admin_token,
                dir: path,
                _dir: dir,
            }
        }

        /// Runs `cairn` with the token in `token_file` and `env`, off the
        /// async threads (the nodes run on them).
        async fn cairn(&self, token_file: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
            let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
            command
                .args(["--cluster", &self.addrs])
                .args(&self.ca_args)
                .arg("--token-file")
                .arg(token_file)
                .args(args)
                .env_remove("CAIRN_TOKEN")
                .env_remove("CAIRN_TENANT")
                .env_remove("CAIRN_PASSWORD")
                .env_remove("CAIRN_CA");
            for (key, value) in env {
                command.env(key, value);
            }
            tokio::task::spawn_blocking(move || command.output().expect("cairn runs"))
                .await
                .expect("joins")
        }

        async fn ok_json(&self, token_file: &Path, args: &[&str], env: &[(&str, &str)]) -> Value {
            let mut with_json = args.to_vec();
            with_json.push("--json");
            let output = self.cairn(token_file, &with_json, env).await;
            assert!(
                output.status.success(),
                "cairn {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            serde_json::from_slice(&output.stdout).expect("one JSON document")
        }

        /// Creates a token with `token_file`'s token; returns (id, file of the new token).
        async fn create_token(
            &self,
            token_file: &Path,
            args: &[&str],
            name: &str,
        ) -> (String, PathBuf, Value) {
            let mut create = vec!["token", "create"];
            create.extend_from_slice(args);
            let created = self.ok_json(token_file, &create, &[]).await;
            let secret = created["token"].as_str().expect("token").to_string();
            let file = self.dir.join(name);
            std::fs::write(&file, format!("{secret}\n")).expect("write token");
            (
                created["id"].as_str().expect("id").to_string(),
                file,
                created,
            )
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    fn stderr(output: &Output) -> String {
        String::from_utf8_lossy(&output.stderr).to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_created_token_backs_up_and_is_refused_once_revoked() {
        let env = Env::start().await;
        let admin = env.admin_token.clone();
        // Without the CA: one round of nodes, then what to give.
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .args(["--cluster", &env.addrs, "--token-file"])
            .arg(&admin)
            .args(["cluster", "status"])
            .env_remove("CAIRN_CA")
            .env_remove("CAIRN_TOKEN");
        let output = tokio::task::spawn_blocking(move || command.output().expect("cairn runs"))
            .await
            .expect("joins");
        let said = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(!output.status.success());
        assert!(
            said.contains("if the cluster runs TLS, give its CA with --ca-file or CAIRN_CA"),
            "{said}"
        );
        let (_, chat_admin, created) = env
            .create_token(
                &admin,
                &["--role", "admin", "--tenant", "chat"],
                "chat-admin.token",
            )
            .await;
        assert_eq!(created["role"], "admin");
        assert_eq!(created["tenant"], "chat");
        assert_eq!(created["expires"], Value::Null);
        let password = [("CAIRN_PASSWORD", "chat passphrase")];
        // The tenant comes from the token (WhoAmI).
        let init = env.ok_json(&chat_admin, &["init"], &password).await;
        assert_eq!(init["tenant"], "chat");
        let (backup_id, backup, created) = env
            .create_token(
                &chat_admin,
                &["--role", "backup", "--ttl", "1h"],
                "backup.token",
            )
            .await;
        assert_eq!(created["tenant"], "chat");
        assert!(created["expires"].is_string(), "{created}");
        let me = env.ok_json(&backup, &["token", "whoami"], &[]).await;
        assert_eq!(me["role"], "backup");
        assert_eq!(me["tenant"], "chat");

        let source = env.dir.join("source");
        std::fs::create_dir_all(&source).expect("mkdir");
        std::fs::write(source.join("log.txt"), "hello\n".repeat(1000)).expect("write");
        let source_arg = source.to_string_lossy().to_string();
        env.ok_json(
            &backup,
            &["backup", &source_arg, "--dataset", "d"],
            &password,
        )
        .await;
        let listed = env.ok_json(&backup, &["snapshots"], &password).await;
        assert_eq!(listed.as_array().map(Vec::len), Some(1));

        // The list shows the token but never a secret.
        let tokens = env.ok_json(&chat_admin, &["token", "list"], &[]).await;
        let secret = std::fs::read_to_string(&backup).expect("read");
        assert!(!tokens.to_string().contains(secret.trim()));
        assert!(tokens.to_string().contains(&backup_id));

        // A backup token may not remove a node.
        let refused = env
            .cairn(&backup, &["cluster", "remove-node", "6"], &[])
            .await;
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            stderr(&refused).starts_with("error: this token's role may not remove node"),
            "{}",
            stderr(&refused)
        );
        assert!(env.cluster.is_running(6), "node 6 is still a member");

        let revoked = env
            .ok_json(&chat_admin, &["token", "revoke", &backup_id], &[])
            .await;
        assert_eq!(revoked["revoked"], backup_id.as_str());
        let refused = env.cairn(&backup, &["snapshots"], &password).await;
        assert_eq!(refused.status.code(), Some(1));
        assert_eq!(
            stderr(&refused).trim_end(),
            "error: the token was refused: unknown, revoked or expired — give a valid one with --token-file or CAIRN_TOKEN"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_removed_key_slots_passphrase_says_wrong_password() {
        let env = Env::start().await;
        let admin = env.admin_token.clone();
        let tenant = ["--tenant", "keys"];
        let old = [("CAIRN_PASSWORD", "old passphrase")];
        let new = [("CAIRN_PASSWORD", "new passphrase")];
        let third = [("CAIRN_PASSWORD", "third passphrase")];
        env.ok_json(&admin, &[&tenant[..], &["init"]].concat(), &old)
            .await;
        let new_file = env.write("new.pw", "new passphrase\n");
        let new_arg = new_file.to_string_lossy().to_string();
        let added = env
            .ok_json(
                &admin,
                &[
                    &tenant[..],
                    &["key", "add", "--new-password-file", &new_arg],
                ]
                .concat(),
                &old,
            )
            .await;
        let new_id = added["added"].as_str().expect("id").to_string();
        let slots = env
            .ok_json(&admin, &[&tenant[..], &["key", "list"]].concat(), &old)
            .await;
        let slots = slots.as_array().expect("list").clone();
        assert_eq!(slots.len(), 2);
        let old_id = slots
            .iter()
            .find(|s| s["current"] == true)
            .and_then(|s| s["id"].as_str())
            .expect("the slot in use is marked")
            .to_string();
        assert_ne!(old_id, new_id);

        // The slot in use cannot be removed...
        let refused = env
            .cairn(
                &admin,
                &[&tenant[..], &["key", "remove", &old_id]].concat(),
                &old,
            )
            .await;
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            stderr(&refused).contains("unlocked this session"),
            "{}",
            stderr(&refused)
        );
        // ...but from a session unlocked with the new passphrase it can.
        env.ok_json(
            &admin,
            &[&tenant[..], &["key", "remove", &old_id]].concat(),
            &new,
        )
        .await;
        let wrong = env
            .cairn(&admin, &[&tenant[..], &["snapshots"]].concat(), &old)
            .await;
        assert_eq!(wrong.status.code(), Some(1));
        assert_eq!(stderr(&wrong).trim_end(), "error: wrong password");

        // passwd: the new passphrase is replaced by a third.
        let third_file = env.write("third.pw", "third passphrase\n");
        let third_arg = third_file.to_string_lossy().to_string();
        env.ok_json(
            &admin,
            &[
                &tenant[..],
                &["key", "passwd", "--new-password-file", &third_arg],
            ]
            .concat(),
            &new,
        )
        .await;
        let wrong = env
            .cairn(&admin, &[&tenant[..], &["snapshots"]].concat(), &new)
            .await;
        assert_eq!(stderr(&wrong).trim_end(), "error: wrong password");
        let slots = env
            .ok_json(&admin, &[&tenant[..], &["key", "list"]].concat(), &third)
            .await;
        let slots = slots.as_array().expect("list").clone();
        assert_eq!(slots.len(), 1);
        // The last slot (also the one in use) cannot be removed.
        let only = slots[0]["id"].as_str().expect("id").to_string();
        let refused = env
            .cairn(
                &admin,
                &[&tenant[..], &["key", "remove", &only]].concat(),
                &third,
            )
            .await;
        assert_eq!(refused.status.code(), Some(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn audit_verify_is_clean_after_work_and_the_log_names_it() {
        let env = Env::start().await;
        let admin = env.admin_token.clone();
        let (backup_id, _, _) = env
            .create_token(
                &admin,
                &["--role", "backup", "--tenant", "audited"],
                "b.token",
            )
            .await;
        env.ok_json(
            &admin,
            &["--tenant", "audited", "init"],
            &[("CAIRN_PASSWORD", "pw")],
        )
        .await;
        env.ok_json(&admin, &["token", "revoke", &backup_id], &[])
            .await;
        let report = env.ok_json(&admin, &["audit", "verify"], &[]).await;
        assert_eq!(report["ok"], true, "{report}");
        assert!(
            report["head_seq"].as_u64().unwrap_or_default() >= 3,
            "{report}"
        );
        assert_eq!(report["head_hash"].as_str().map(str::len), Some(64));
        let log = env
            .ok_json(&admin, &["audit", "log", "--since", "1h"], &[])
            .await;
        let actions: Vec<&str> = log
            .as_array()
            .expect("entries")
            .iter()
            .filter_map(|e| e["action"].as_str())
            .collect();
        for action in ["CreateToken", "InitTenant", "RevokeToken"] {
            assert!(actions.contains(&action), "{action} in {actions:?}");
        }
        let future = env
            .ok_json(&admin, &["audit", "log", "--since", "2999-01-01"], &[])
            .await;
        assert_eq!(future.as_array().map(Vec::len), Some(0));
        let text = env.cairn(&admin, &["audit", "verify"], &[]).await;
        assert!(text.status.success());
        assert!(
            String::from_utf8_lossy(&text.stdout).starts_with("audit log intact: "),
            "{}",
            String::from_utf8_lossy(&text.stdout)
        );
    }
}
