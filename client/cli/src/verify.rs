//! Byte-for-byte comparison of two directory trees: what a drill, the demo
//! and the tests use to prove a restore is identical to its source.
//!
//! Names are compared as bytes (non-UTF-8 names included); FIFOs and
//! devices by kind (and device number); hard links by structure: two paths
//! that are one inode in `expected` must be one inode in `actual`, and the
//! other way round.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Differences between `expected` and `actual` (empty = identical): entry
/// kinds, file contents, permission bits, symlink targets, file mtimes,
/// device numbers and hard-link structure.
pub fn compare_dirs(expected: &Path, actual: &Path) -> Vec<String> {
    let mut differences = Vec::new();
    let mut links = Links::default();
    compare(
        expected,
        actual,
        PathBuf::new(),
        &mut differences,
        &mut links,
    );
    differences
}

/// For each side, the first path seen of every multiply-linked inode.
#[derive(Default)]
struct Links {
    expected: HashMap<(u64, u64), PathBuf>,
    actual: HashMap<(u64, u64), PathBuf>,
}

impl Links {
    /// The first path of `meta`'s inode on one side (the path itself when
    /// the inode has a single link or is seen first).
    fn first(
        map: &mut HashMap<(u64, u64), PathBuf>,
        meta: &std::fs::Metadata,
        rel: &Path,
    ) -> PathBuf {
        if meta.nlink() < 2 {
            return rel.to_path_buf();
        }
        map.entry((meta.dev(), meta.ino()))
            .or_insert_with(|| rel.to_path_buf())
            .clone()
    }
}

fn names(dir: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

fn compare(expected: &Path, actual: &Path, rel: PathBuf, out: &mut Vec<String>, links: &mut Links) {
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
    if e.file_type().is_char_device() || e.file_type().is_block_device() {
        if e.rdev() != a.rdev() {
            out.push(format!("{}: device number differs", show()));
        }
        return;
    }
    if e.is_file() {
        let (first_e, first_a) = (
            Links::first(&mut links.expected, &e, &rel),
            Links::first(&mut links.actual, &a, &rel),
        );
        if first_e != first_a {
            out.push(format!(
                "{}: hard links differ (expected one inode with {}, found one with {})",
                show(),
                first_e.display(),
                first_a.display()
            ));
        }
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
                links,
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
