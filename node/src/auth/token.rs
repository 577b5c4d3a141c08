//! Bearer tokens: generation, the key they are stored under, the bootstrap
//! file. A token is an opaque string; nodes keep only
//! `blake3::derive_key("cairn token v1", token)`, so a copy of the metadata
//! group gives no usable credential, and a look-up by that key needs no
//! secret comparison at all (no timing side channel).

use std::path::Path;

use rand::RngCore;

use crate::model::Id32;

/// Prefix of generated tokens (lets secret scanners find leaked ones).
pub const TOKEN_PREFIX: &str = "cairn_";
/// Shortest and longest token accepted from a file.
pub const TOKEN_LEN_MIN: usize = 24;
pub const TOKEN_LEN_MAX: usize = 256;

/// A new random token: `cairn_` + 64 hex digits of 32 random bytes.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The key a token is stored and looked up under.
pub fn token_key(token: &str) -> Id32 {
    blake3::derive_key("cairn token v1", token.as_bytes())
}

/// The public id of a token: hex of its key's first 8 bytes.
pub fn token_id(token: &str) -> String {
    crate::meta::state::token_id(&token_key(token))
}

/// Why `--bootstrap-token-file` cannot be used. Says nothing of the file's
/// path or content.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapFileError {
    #[error("--bootstrap-token-file cannot be read: {0}")]
    Read(std::io::ErrorKind),
    #[error(
        "--bootstrap-token-file must hold one token of {TOKEN_LEN_MIN} to {TOKEN_LEN_MAX} printable ASCII characters (no spaces)"
    )]
    Malformed,
}

/// Checks a token's shape: what a file or header may carry.
pub fn well_formed(token: &str) -> bool {
    (TOKEN_LEN_MIN..=TOKEN_LEN_MAX).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads the bootstrap token: one token, surrounding whitespace trimmed.
pub fn read_bootstrap_file(path: &Path) -> Result<String, BootstrapFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| BootstrapFileError::Read(e.kind()))?;
    let token = text.trim();
    if !well_formed(token) {
        return Err(BootstrapFileError::Malformed);
    }
    Ok(token.to_string())
}

/// Proposes the bootstrap token until it is committed (or a token already
/// exists), once a leader is known. Every initial node given the file runs
/// this; the command applies only while no token was ever created, so they
/// all agree on one first `cluster-admin` token.
pub async fn bootstrap(
    meta: crate::meta::Meta,
    key: Id32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::meta::types::Command;
    let node = meta.node_id();
    loop {
        if *stop.borrow() {
            return;
        }
        if meta.tokens().is_ok_and(|tokens| !tokens.is_empty()) {
            return;
        }
        let command = Command::BootstrapToken { at: 0, node, key };
        let written = tokio::select! {
            written = meta.write(command) => written,
            _ = stop.changed() => return,
        };
        match written {
            Ok(result) => {
                tracing::info!(node_id = node, ?result, "bootstrap token proposed");
                return;
            }
            Err(error) => {
                tracing::debug!(node_id = node, %error, "bootstrap token not committed yet; retrying");
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let (a, b) = (generate(), generate());
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert!(well_formed(&a));
        assert_ne!(a, b);
        assert_ne!(token_key(&a), token_key(&b));
        assert_eq!(token_id(&a).len(), 16);
    }

    #[test]
    fn bootstrap_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  abcdefghijklmnopqrstuvwxyz0123\n").expect("write");
        assert_eq!(
            read_bootstrap_file(&path).expect("read"),
            "abcdefghijklmnopqrstuvwxyz0123"
        );
        std::fs::write(&path, "short\n").expect("write");
        assert!(matches!(
            read_bootstrap_file(&path),
            Err(BootstrapFileError::Malformed)
        ));
        std::fs::write(&path, "two tokens separated by a space ok").expect("write");
        assert!(read_bootstrap_file(&path).is_err());
        let missing = read_bootstrap_file(&dir.path().join("absent"));
        assert!(matches!(missing, Err(BootstrapFileError::Read(_))));
        assert!(
            !missing
                .expect_err("missing file")
                .to_string()
                .contains("absent")
        );
    }
}
