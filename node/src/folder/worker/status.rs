//! Progress, problems and the folder's status: what `shoal status`, the
//! `sync_progress` events and the guard's held changes report.

use super::*;

impl Worker {
    /// Counts `n` bytes of transfer progress.
    pub(in crate::folder) fn progress(&self, rel: &str, n: u64) {
        let mut p = self.prog();
        if let Some(left) = p.queued.get_mut(rel) {
            *left = left.saturating_sub(n);
        }
        let now = Instant::now();
        // One entry per tenth of a second at most: ten thousand small
        // files would otherwise leave a deque of ten thousand behind.
        match p.window.back_mut() {
            Some((t, m)) if now.duration_since(*t) < Duration::from_millis(100) => *m += n,
            _ => p.window.push_back((now, n)),
        }
        while p
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(10))
        {
            p.window.pop_front();
        }
    }

    pub(super) fn problem(&self, path: &str, error: String) {
        warn!(space = %self.space.short(), path, %error, "folder problem");
        {
            let mut p = self.prog();
            p.problems.push_back(format!("{path}: {error}"));
            while p.problems.len() > MAX_PROBLEMS {
                p.problems.pop_front();
            }
        }
        self.shared.emit(Event::FolderError {
            space: self.space.to_owned(),
            path: path.to_string(),
            error,
        });
    }

    /// The folder's status now.
    pub(in crate::folder) fn status(&self) -> FolderStatus {
        let p = self.prog();
        // Paths no member can serve are counted apart: the folder has all
        // that can be had.
        let unavailable = p.unavailable.len() as u64;
        let pending =
            (self.shared.blobs.pending_count(&self.space) as u64).saturating_sub(unavailable);
        let bytes_left: u64 = p.queued.values().sum();
        let span = p
            .window
            .front()
            .map(|(t, _)| t.elapsed().as_secs_f64())
            .unwrap_or(0.0)
            .max(1.0);
        let rate = (p.window.iter().map(|(_, n)| *n).sum::<u64>() as f64 / span) as u64;
        let held = self.guard.lock().unwrap_or_else(|p| p.into_inner()).held();
        let held_n: usize = held.iter().map(|(_, n)| n).sum();
        let mut detail = p.detail.clone();
        if !held.is_empty() {
            let who: Vec<String> = held
                .iter()
                .map(|(d, n)| format!("{n} from device …{}", d.short()))
                .collect();
            detail = Some(format!(
                "holding deletions and overwrites ({}): more of the folder at once than the \
                 guard allows; `shoal folder accept SPACE` applies them, or restore",
                who.join(", ")
            ));
        }
        let state = if p.scanning {
            FolderState::Scanning
        } else if !held.is_empty()
            || p.detail
                .as_deref()
                .is_some_and(|d| d.starts_with("disk full"))
        {
            FolderState::Paused
        } else if pending > 0 {
            FolderState::Syncing
        } else {
            FolderState::InSync
        };
        let files = self.shared.blobs.local_count(&self.space) as u64;
        // Files, not bytes: the bytes of files not yet started are unknown
        // until their manifests arrive.
        let progress = if pending == 0 {
            100.0
        } else {
            (1000.0 * files as f64 / (files + pending) as f64).floor() / 10.0
        };
        FolderStatus {
            space: self.space.to_string(),
            path: self.root.display().to_string(),
            state,
            progress,
            detail,
            files_left: pending,
            unavailable,
            bytes_left,
            rate,
            eta_secs: (rate > 0 && bytes_left > 0).then(|| bytes_left / rate),
            peers: 0,
            files,
            problems: p.problems.iter().cloned().collect(),
            held: held_n as u64,
        }
    }

    /// The user confirmed what the guard holds; returns how many changes.
    pub(in crate::folder) fn accept_held(&self) -> usize {
        let n = self
            .guard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept();
        self.released.store(true, Ordering::SeqCst);
        n
    }

    /// Emits a progress event unless the folder is in sync, was at the
    /// last tick too, and did nothing since (`seen` is the activity count
    /// at the last tick); returns whether it is in sync now. On reaching
    /// sync it calls `settle` (the caller gives back the room its queues
    /// grew to), then returns freed memory to the system.
    pub(super) fn report_progress(
        &self,
        was_in_sync: bool,
        seen: &mut u64,
        settle: impl FnOnce(),
    ) -> bool {
        let now = self.activity.load(Ordering::Relaxed);
        let was_in_sync = was_in_sync && now == *seen;
        *seen = now;
        // A quiet folder costs one look at the pending set, not a full
        // status (which counts every file the store knows).
        let quiet = || {
            self.shared.blobs.pending_count(&self.space) == 0 && {
                let p = self.prog();
                !p.scanning && p.detail.is_none()
            }
        };
        if was_in_sync && quiet() {
            return true;
        }
        let st = self.status();
        let in_sync = st.state == FolderState::InSync;
        if !(in_sync && was_in_sync) {
            self.shared.emit(Event::SyncProgress {
                space: self.space,
                state: st.state,
                progress: st.progress,
                files_left: st.files_left,
                bytes_left: st.bytes_left,
                rate: st.rate,
                eta_secs: st.eta_secs,
            });
        }
        if in_sync && !was_in_sync {
            // Done for now: what the sync allocated goes back, the room
            // its queues grew to too.
            settle();
            {
                let mut p = self.prog();
                if p.queued.is_empty() {
                    p.queued = HashMap::new();
                }
            }
            tokio::task::spawn_blocking(crate::memory::trim);
        }
        in_sync
    }
}
