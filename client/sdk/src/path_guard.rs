//! Path sanitising for restore: a snapshot, even a hostile one, cannot make
//! a restore write outside its target directory (invariant 8).
//!
//! This module owns the rules for what a name in a tree may be
//! ([`check_name`]), how restore paths are built ([`safe_join`]), the check
//! that no symlink sits between the target root and a path about to be
//! written ([`check_no_symlink_in_parents`]), and what a symlink target may
//! be ([`check_symlink_target`]). Apart from the `lstat` calls of
//! [`check_no_symlink_in_parents`], it is pure: it never creates, opens or
//! follows anything.
//!
//! Rules restore relies on:
//! - Names are bytes (a Linux file name need not be UTF-8). Every name is
//!   one path component: not empty, not `.` or `..`, no `/`, no NUL, at
//!   most [`NAME_MAX_BYTES`]. That is exactly what Linux allows in a
//!   directory entry, so every name a walk can read is accepted, and a
//!   joined path never leaves the root lexically. Backup and restore use the
//!   same [`check_name`]: a backup never commits a name restore refuses.
//! - Symlinks are restored as they were (absolute or relative targets,
//!   `..` included: that is the user's data), and restore never follows
//!   one: before writing `root/a/b/f`, every existing ancestor below root
//!   must be a real directory, checked with `lstat`. A symlink restored
//!   earlier (`a -> /etc`) therefore cannot redirect a later write.
//! - The leaf itself is the caller's: create files with
//!   `OpenOptions::create_new(true)` (`O_CREAT|O_EXCL` fails on an existing
//!   symlink instead of following it) or remove what is there first.
//!
//! The checks assume no other process races the restore inside the target
//! directory; restoring into a directory an attacker can write to at the
//! same time is outside this guarantee.

use std::io;
use std::path::{Component, Path, PathBuf};

/// Longest name accepted, in bytes (Linux `NAME_MAX`).
pub const NAME_MAX_BYTES: usize = 255;
/// Longest symlink target accepted, in bytes (Linux `PATH_MAX` minus the NUL).
pub const SYMLINK_TARGET_MAX_BYTES: usize = 4095;

/// Why a name or path is refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// An empty name.
    #[error("empty file name")]
    EmptyName,
    /// `.` or `..`.
    #[error("file name {name:?} refers to a directory itself or its parent")]
    DotName {
        /// The name.
        name: String,
    },
    /// A character that would split or end the name.
    #[error("file name {name:?} contains the forbidden character {ch:?}")]
    ForbiddenChar {
        /// The name.
        name: String,
        /// `/`, `\` or NUL.
        ch: char,
    },
    /// Longer than any file system accepts.
    #[error("file name of {len} bytes exceeds the {NAME_MAX_BYTES}-byte limit")]
    NameTooLong {
        /// Length in bytes.
        len: usize,
    },
    /// A relative path with a component that is not a plain name.
    #[error("path {path:?} is not a plain relative path (absolute, or has `.`/`..` components)")]
    NotRelative {
        /// The path.
        path: PathBuf,
    },
    /// A symlink between the root and the path to write.
    #[error(
        "refusing to write through {path:?}: it is a symbolic link, which restore never follows"
    )]
    SymlinkInPath {
        /// The offending ancestor.
        path: PathBuf,
    },
    /// An ancestor exists but is not a directory.
    #[error("cannot write below {path:?}: it exists and is not a directory")]
    NotADirectory {
        /// The offending ancestor.
        path: PathBuf,
    },
    /// `lstat` failed for another reason.
    #[error("cannot inspect {path:?}: {source}")]
    Io {
        /// The path inspected.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An empty symlink target (Linux cannot create one).
    #[error("empty symbolic link target")]
    EmptySymlinkTarget,
    /// A NUL in a symlink target.
    #[error("symbolic link target {target:?} contains a NUL byte")]
    NulInSymlinkTarget {
        /// The target, escaped for display.
        target: String,
    },
    /// Too long for any file system.
    #[error(
        "symbolic link target of {len} bytes exceeds the {SYMLINK_TARGET_MAX_BYTES}-byte limit"
    )]
    SymlinkTargetTooLong {
        /// Length in bytes.
        len: usize,
    },
}

/// Check that `name` is one safe path component (see the module doc): the
/// one rule both backup and restore apply.
pub fn check_name(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::EmptyName);
    }
    if name == b"." || name == b".." {
        return Err(PathError::DotName {
            name: display_name(name),
        });
    }
    if let Some(&b) = name.iter().find(|&&b| b == b'/' || b == 0) {
        return Err(PathError::ForbiddenChar {
            name: display_name(name),
            ch: char::from(b),
        });
    }
    if name.len() > NAME_MAX_BYTES {
        return Err(PathError::NameTooLong { len: name.len() });
    }
    Ok(())
}

/// A name or path for people: UTF-8 as is, except that control characters
/// (a newline would split a listing line) and bytes that are not UTF-8 are
/// escaped as `\n`, `\t`, `\xNN`. Not reversible for names that contain
/// such escapes literally; machine-readable output carries the raw bytes.
pub fn display_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `root` joined with `components`, each checked with [`check_name`]; the
/// result is always `root` followed by exactly those plain components.
pub fn safe_join<N: AsRef<[u8]>>(root: &Path, components: &[N]) -> Result<PathBuf, PathError> {
    use std::os::unix::ffi::OsStrExt;
    let mut path = root.to_path_buf();
    for name in components {
        let name = name.as_ref();
        check_name(name)?;
        path.push(std::ffi::OsStr::from_bytes(name));
    }
    Ok(path)
}

/// Check that every existing ancestor of `root/rel` strictly below `root`
/// is a real directory, not a symlink (checked with `lstat`, never
/// following). Ancestors that do not exist yet are fine: restore creates
/// them. `rel` must consist of plain names only. The leaf is not checked
/// (see the module doc).
pub fn check_no_symlink_in_parents(root: &Path, rel: &Path) -> Result<(), PathError> {
    let mut names = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(name) => names.push(name),
            _ => {
                return Err(PathError::NotRelative {
                    path: rel.to_path_buf(),
                });
            }
        }
    }
    let mut path = root.to_path_buf();
    let parents = names.len().saturating_sub(1);
    for name in &names[..parents] {
        path.push(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(PathError::SymlinkInPath { path });
            }
            Ok(_) => return Err(PathError::NotADirectory { path }),
            // Nothing below a missing directory can exist either.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(PathError::Io { path, source }),
        }
    }
    Ok(())
}

/// Check a symlink target before restoring the link as-is.
///
/// Absolute and `..` targets are allowed: the link is recreated, never
/// followed by restore, and [`check_no_symlink_in_parents`] stops later
/// writes from going through it.
pub fn check_symlink_target(target: &[u8]) -> Result<(), PathError> {
    if target.is_empty() {
        return Err(PathError::EmptySymlinkTarget);
    }
    if target.contains(&0) {
        return Err(PathError::NulInSymlinkTarget {
            target: display_name(target),
        });
    }
    if target.len() > SYMLINK_TARGET_MAX_BYTES {
        return Err(PathError::SymlinkTargetTooLong { len: target.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_are_checked() {
        let long = "n".repeat(255);
        let ok: [&[u8]; 14] = [
            b"a",
            b"file.txt",
            b"...",
            b".hidden",
            b"a b",
            "日志.jsonl".as_bytes(),
            b"x..y",
            b"a\\b",
            b"..\\x",
            b"-rf",
            b"line\nbreak",
            b":*?<>|\"",
            b"\xff\xfe not utf-8",
            long.as_bytes(),
        ];
        for name in ok {
            assert!(check_name(name).is_ok(), "{name:?} should pass");
        }
        assert!(matches!(check_name(b""), Err(PathError::EmptyName)));
        assert!(matches!(check_name(b"."), Err(PathError::DotName { .. })));
        assert!(matches!(check_name(b".."), Err(PathError::DotName { .. })));
        for bad in ["a/b", "/", "/etc", "a\0b", "\0"] {
            assert!(
                matches!(
                    check_name(bad.as_bytes()),
                    Err(PathError::ForbiddenChar { .. })
                ),
                "{bad:?} should be refused"
            );
        }
        assert!(matches!(
            check_name("n".repeat(256).as_bytes()),
            Err(PathError::NameTooLong { .. })
        ));
    }

    #[test]
    fn display_escapes_what_would_break_a_line() {
        assert_eq!(display_name(b"plain.txt"), "plain.txt");
        assert_eq!(display_name("日志".as_bytes()), "日志");
        assert_eq!(display_name(b"a\nb\tc"), "a\\nb\\tc");
        assert_eq!(display_name(b"\xffx\x01"), "\\xffx\\x01");
    }

    #[test]
    fn safe_join_refuses_escapes() {
        let root = Path::new("/restore/target");
        assert_eq!(
            safe_join(root, &["a", "b.txt"]).expect("plain"),
            PathBuf::from("/restore/target/a/b.txt")
        );
        assert!(safe_join(root, &["..", "etc"]).is_err());
        assert!(safe_join(root, &["/etc/passwd"]).is_err());
        assert!(safe_join(root, &["a", "../../x"]).is_err());
        assert_eq!(safe_join::<&str>(root, &[]).expect("root"), root);
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_parent_is_refused() {
        let outside = tempfile::tempdir().expect("tempdir");
        let root = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("a")).expect("symlink");
        let err = check_no_symlink_in_parents(root.path(), Path::new("a/x")).expect_err("refused");
        assert!(matches!(err, PathError::SymlinkInPath { ref path } if path.ends_with("a")));
        // Deeper paths through the link are refused too.
        assert!(check_no_symlink_in_parents(root.path(), Path::new("a/b/c/x")).is_err());
        // A link to /tmp, as an attacker would plant, is no different.
        std::os::unix::fs::symlink("/tmp", root.path().join("t")).expect("symlink");
        assert!(check_no_symlink_in_parents(root.path(), Path::new("t/x")).is_err());
        // The link itself as the leaf is the caller's concern (create_new).
        assert!(check_no_symlink_in_parents(root.path(), Path::new("a")).is_ok());
    }

    #[test]
    fn real_and_missing_directories_pass_and_files_do_not() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("d/e")).expect("mkdir");
        std::fs::write(root.path().join("f"), b"x").expect("write");
        assert!(check_no_symlink_in_parents(root.path(), Path::new("d/e/x")).is_ok());
        assert!(check_no_symlink_in_parents(root.path(), Path::new("d/new/deeper/x")).is_ok());
        assert!(matches!(
            check_no_symlink_in_parents(root.path(), Path::new("f/x")),
            Err(PathError::NotADirectory { .. })
        ));
        for bad in ["../x", "/abs/x", "d/../x", "./x"] {
            assert!(
                matches!(
                    check_no_symlink_in_parents(root.path(), Path::new(bad)),
                    Err(PathError::NotRelative { .. })
                ),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn symlink_targets() {
        assert!(check_symlink_target(b"/etc/passwd").is_ok());
        assert!(check_symlink_target(b"../../up").is_ok());
        assert!(check_symlink_target(b"\xff\\odd").is_ok());
        assert!(matches!(
            check_symlink_target(b""),
            Err(PathError::EmptySymlinkTarget)
        ));
        assert!(matches!(
            check_symlink_target(b"a\0b"),
            Err(PathError::NulInSymlinkTarget { .. })
        ));
        assert!(check_symlink_target("x".repeat(4096).as_bytes()).is_err());
    }

    fn component() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("/".to_owned()),
            Just("/etc".to_owned()),
            Just("a/../..".to_owned()),
            Just("..\\..".to_owned()),
            "[a-z.]{1,4}",
            any::<String>(),
        ]
    }

    proptest! {
        #[test]
        fn safe_join_never_escapes(names in proptest::collection::vec(component(), 0..6)) {
            let root = Path::new("/srv/restore");
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Ok(path) = safe_join(root, &refs) {
                prop_assert!(path.starts_with(root));
                prop_assert!(path.components().all(|c| !matches!(c, Component::ParentDir | Component::CurDir)));
                // Exactly one component per name: nothing split or swallowed.
                let below: Vec<_> = path.strip_prefix(root).expect("starts with root").components().collect();
                prop_assert_eq!(below.len(), names.len());
                prop_assert!(below.iter().all(|c| matches!(c, Component::Normal(_))));
            }
        }
    }
}
