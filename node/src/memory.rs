//! Giving memory back to the system, for a node that mostly waits.
//!
//! glibc keeps freed memory in per-thread arenas; a node that just synced
//! ten thousand files would hold tens of megabytes it no longer uses. The
//! node caps the arenas at start and trims the heap when a folder becomes
//! idle. Other allocators and systems: both are no-ops.

/// Caps glibc's malloc arenas at two (call before threads start).
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; any value is
    // accepted or refused with a return code, which we may ignore.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns free heap memory to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim walks the allocator's own free lists under its
    // locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
