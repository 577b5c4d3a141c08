//! Process-wide allocator tuning for the binaries (`cairn-node`, `cairn`).
//!
//! glibc gives every thread that allocates its own malloc arena, and the
//! multi-MiB pack and shard buffers freed in one arena are not reused by the
//! others, so resident memory grows with the number of threads rather than
//! with the work in flight. Measured on 1 GB of chat data (`cairn backup`,
//! `/usr/bin/time`): peak RSS 210-255 MiB with glibc's default, 134 MiB with
//! two arenas, and the backup no slower.

/// Caps glibc at two malloc arenas. Call first thing in `main`, before any
/// thread starts. Does nothing on other C libraries.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)] // the workspace's one audited exception, see Cargo.toml
pub fn limit_arenas() {
    // SAFETY: mallopt only sets an allocator tunable; it is called once,
    // before the process has started any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Caps glibc at two malloc arenas (nothing to do on this C library).
#[cfg(not(target_env = "gnu"))]
pub fn limit_arenas() {}

/// Largest allocation served from an arena rather than its own mapping. glibc
/// refuses thresholds above half its 64 MiB arena heap, so 32 MiB is the top.
pub const NODE_MMAP_THRESHOLD_BYTES: usize = 32 * 1024 * 1024;
/// Free memory an arena keeps at its top before giving it back to the system.
pub const NODE_TRIM_THRESHOLD_BYTES: usize = 64 * 1024 * 1024;

/// Keeps a node's multi-MiB pack and shard buffers in the arenas. glibc's
/// default maps each buffer above its (moving) threshold afresh and trims the
/// arena top back to the system, so every pack's buffers are faulted in and
/// zeroed by the kernel again. With fixed thresholds a freed buffer is reused
/// by the next pack. Measured on one backup of 1 GB of chat data to the local
/// 6-node cluster: node CPU 8.0-8.8 s before, 7.2 s after, node max RSS
/// unchanged (~160 MiB). The retained memory is bounded: two arenas
/// ([`limit_arenas`]) plus the main one, each keeping at most
/// [`NODE_TRIM_THRESHOLD_BYTES`] free at its top. Call first thing in `main`,
/// before any thread starts. Returns whether glibc took both settings.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)] // the workspace's one audited exception, see Cargo.toml
pub fn keep_large_buffers() -> bool {
    let as_int = |bytes: usize| libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets allocator tunables (glibc documents it as
    // thread-safe); it takes no pointer.
    unsafe {
        let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, as_int(NODE_MMAP_THRESHOLD_BYTES));
        let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, as_int(NODE_TRIM_THRESHOLD_BYTES));
        mmap == 1 && trim == 1
    }
}

/// Keeps large buffers in the arenas (nothing to do on this C library).
#[cfg(not(target_env = "gnu"))]
pub fn keep_large_buffers() -> bool {
    true
}

/// Size from which the `cairn` client maps a buffer on its own (see
/// [`map_large_buffers`]).
pub const CLIENT_MMAP_THRESHOLD_BYTES: usize = 4 * 1024 * 1024;

/// Gives the client's multi-MiB buffers (packs being built and uploaded,
/// look-up batches, fetched pack ranges) mappings of their own, returned to
/// the system when freed. With glibc's moving threshold they come from the
/// arenas instead, whose free holes make resident memory grow with the
/// amount backed up. Measured with `cairn backup` of 1 GB of chat data to
/// the local 6-node cluster: max RSS 180 MB with the default, 136 MB with
/// this, same time. Call first thing in `main`, before any thread starts.
/// Returns whether glibc took the setting.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)] // the workspace's one audited exception, see Cargo.toml
pub fn map_large_buffers() -> bool {
    let bytes = libc::c_int::try_from(CLIENT_MMAP_THRESHOLD_BYTES).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets an allocator tunable; it takes no pointer.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
}

/// Maps large buffers on their own (nothing to do on this C library).
#[cfg(not(target_env = "gnu"))]
pub fn map_large_buffers() -> bool {
    true
}

/// Returns the free pages of every arena to the system. A long-running
/// client (the agent) calls it after a burst of work, so that hours of idle
/// time between jobs do not hold a backup's peak in resident memory.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)] // the workspace's one audited exception, see Cargo.toml
pub fn release_free_memory() {
    // SAFETY: malloc_trim only releases memory the allocator holds free; it
    // is thread-safe and takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns free memory to the system (nothing to do on this C library).
#[cfg(not(target_env = "gnu"))]
pub fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_the_client_threshold() {
        assert!(map_large_buffers());
    }

    #[test]
    fn glibc_accepts_the_node_thresholds() {
        // A threshold glibc refuses (above half its arena heap) would leave
        // the default in place silently: this keeps the constants valid.
        assert!(keep_large_buffers());
        let big = vec![7u8; NODE_MMAP_THRESHOLD_BYTES - 4096];
        assert_eq!(
            big.iter().map(|&b| u64::from(b)).sum::<u64>(),
            7 * big.len() as u64
        );
    }
}
