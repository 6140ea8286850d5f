//! Giving memory back to the system, for a node that mostly waits.
//!
//! glibc keeps freed memory in per-thread arenas; a node that just synced
//! ten thousand files would hold tens of megabytes it no longer uses. The
//! node caps the arenas at start, gives buffers of half a megabyte and
//! more their own mappings (returned whole when freed, instead of leaving
//! holes in the heap), and trims the heap when a folder becomes idle.
//! Other allocators and systems: all are no-ops.

/// Caps glibc's malloc arenas at two and maps allocations of 512 KiB and
/// more on their own (call before threads start). A fixed threshold also
/// stops glibc from raising it after the first large buffer is freed,
/// which would put the next ones in the heap.
///
/// Why 512 KiB: sled allocates 41 zeroed histograms of exactly 512 KiB
/// (its metrics, unused). Mapped on their own they stay untouched zero
/// pages; carved from the heap they are written with zeros and resident.
/// A store of 20,000 keys measured 7.5 MB anonymous memory at 512 KiB and
/// 13 MB at 1 MiB. Chunk buffers (nearly all under 512 KiB) stay in the
/// heap.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; any value is
    // accepted or refused with a return code, which we may ignore.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 10);
    }
}

/// Returns free heap memory to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters, and
        // malloc_trim walks the allocator's own free lists under its locks;
        // both are safe to call from any thread at any time.
        let (before, after) = unsafe {
            let before = libc::mallinfo2();
            libc::malloc_trim(0);
            (before, libc::mallinfo2())
        };
        tracing::debug!(
            in_use = after.uordblks,
            mmapped = after.hblkhd,
            free_before = before.fordblks,
            free_after = after.fordblks,
            arena = after.arena,
            "heap trimmed"
        );
    }
}
