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
