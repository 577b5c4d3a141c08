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
