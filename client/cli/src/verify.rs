//! Byte-for-byte comparison of two directory trees: what a drill, the demo
//! and the tests use to prove a restore is identical to its source.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Differences between `expected` and `actual` (empty = identical): entry
/// kinds, file contents, permission bits, symlink targets, file mtimes.
pub fn compare_dirs(expected: &Path, actual: &Path) -> Vec<String> {
    let mut differences = Vec::new();
    compare(expected, actual, PathBuf::new(), &mut differences);
    differences
}

fn names(dir: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

fn compare(expected: &Path, actual: &Path, rel: PathBuf, out: &mut Vec<String>) {
    let show = || {
        if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.display().to_string()
        }
    };
    let (e, a) = match (
        std::fs::symlink_metadata(expected),
        std::fs::symlink_metadata(actual),
    ) {
        (Ok(e), Ok(a)) => (e, a),
        (Ok(_), Err(_)) => return out.push(format!("{}: missing", show())),
        (Err(_), Ok(_)) => return out.push(format!("{}: unexpected", show())),
        (Err(_), Err(_)) => return,
    };
    if e.file_type() != a.file_type() {
        return out.push(format!("{}: kind differs", show()));
    }
    if e.file_type().is_symlink() {
        if std::fs::read_link(expected).ok() != std::fs::read_link(actual).ok() {
            out.push(format!("{}: symlink target differs", show()));
        }
        return;
    }
    if e.mode() & 0o7777 != a.mode() & 0o7777 {
        out.push(format!(
            "{}: mode {:o} != {:o}",
            show(),
            e.mode() & 0o7777,
            a.mode() & 0o7777
        ));
    }
    if e.is_file() {
        if e.len() != a.len() {
            out.push(format!("{}: size {} != {}", show(), e.len(), a.len()));
        } else if !same_contents(expected, actual) {
            out.push(format!("{}: contents differ", show()));
        }
        if (e.mtime(), e.mtime_nsec()) != (a.mtime(), a.mtime_nsec()) {
            out.push(format!("{}: mtime differs", show()));
        }
        return;
    }
    if e.is_dir() {
        let (Ok(en), Ok(an)) = (names(expected), names(actual)) else {
            return out.push(format!("{}: unreadable directory", show()));
        };
        for name in en.iter().filter(|n| !an.contains(n)) {
            out.push(format!("{}: missing", rel.join(name).display()));
        }
        for name in an.iter().filter(|n| !en.contains(n)) {
            out.push(format!("{}: unexpected", rel.join(name).display()));
        }
        for name in en.iter().filter(|n| an.contains(n)) {
            compare(
                &expected.join(name),
                &actual.join(name),
                rel.join(name),
                out,
            );
        }
    }
}

fn same_contents(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let mut ba = vec![0u8; 1 << 16];
    let mut bb = vec![0u8; 1 << 16];
    loop {
        let Ok(n) = fa.read(&mut ba) else {
            return false;
        };
        if n == 0 {
            return fb.read(&mut bb).ok() == Some(0);
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}
