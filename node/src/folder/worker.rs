//! One space's folder: the loop that scans, publishes and reconciles.
//!
//! Local side: watcher events (debounced) and periodic rescans find paths
//! whose stat differs from what the blob index last recorded; those are
//! hashed and, when their content differs from the index's winner, written
//! to the index as this device's version. A file that changes while it is
//! hashed is tried again later, never recorded torn.
//!
//! Remote side: when an index shard changes, the paths that changed since
//! the shard's cursor are recorded as pending (with the cursor, in one
//! batch), then each is reconciled: its winner is placed on disk, fetched
//! when its content is not here. A path leaves the pending set only once
//! its file matches, so a crash at any moment resumes the work.
//!
//! File-system changes that race (placing a fetched file, recording a
//! scanned one) take the worker's `fs` lock; each re-checks the stat it
//! acted on under the lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use notify::Watcher;
use shoal_protocol::files::{self, Entry, Kind};
use shoal_protocol::plan;
use shoal_protocol::{DocId, SpaceId};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::fetch::TransferError;
use super::place::{self, TMP_DIR, VERSIONS_DIR};
use super::scan::{self, Hashed, Rules};
use super::{FolderState, FolderStatus, Shared};
use crate::engine::{FileOrigin, IndexCommand};
use crate::error::Error;
use crate::store::blobs::{LocalFile, Stat};
use crate::Event;

/// Paths reconciled per round.
const RECONCILE_BATCH: usize = 1000;
/// Index entries written per engine command.
const PUBLISH_BATCH: usize = 2000;
/// Watcher events buffered before the worker falls back to a full rescan.
const WATCH_QUEUE: usize = 8192;
/// Dirty paths remembered before a full rescan is cheaper.
const MAX_DIRTY: usize = 4096;
/// Problems kept for status.
const MAX_PROBLEMS: usize = 20;
/// Wait before a file that changed while it was hashed is read again.
const AGAIN_AFTER: Duration = Duration::from_millis(100);
/// Longest wait before a failed path is tried again.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often held paths are looked at again without an accept (a restore
/// over them, or a newer change, is found then or on its own event).
const HELD_RECHECK: Duration = Duration::from_secs(60);
/// How often old versions are thinned (also whenever over the byte budget).
const RETAIN_EVERY: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Progress {
    /// Whether a scan is running.
    scanning: bool,
    detail: Option<String>,
    /// Bytes still to fetch for queued transfers, by path.
    queued: HashMap<String, u64>,
    window: VecDeque<(Instant, u64)>,
    problems: VecDeque<String>,
    /// Pending paths whose version no connected member could serve at the
    /// last try: reported apart, so the folder is not "syncing" for good.
    unavailable: HashSet<String>,
}

/// The worker of one space's folder.
pub struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) space: SpaceId,
    pub(super) root: PathBuf,
    pub(super) fs: tokio::sync::Mutex<()>,
    pub(super) sync: super::SyncGate,
    progress: Mutex<Progress>,
    stop: Notify,
    stopped: AtomicBool,
    /// The ignore rules (they know the files they were read from).
    rules: RwLock<Rules>,
    /// Files placed and scans that recorded changes: progress reports
    /// say "in sync" again after any, however quick.
    activity: AtomicU64,
    /// Paths renamed into place whose record is not written yet: the
    /// scanner leaves them for later, or it would take the placed content
    /// for a local edit (and publish it over a newer version).
    placing: Mutex<HashSet<String>>,
    /// Local changes were refused because this device did not know the
    /// space's members yet: scan everything again once `members` changes.
    unshared: AtomicBool,
    /// Bytes the kept old versions hold (as of the last retention pass,
    /// plus what was kept since).
    pub(super) kept_bytes: AtomicU64,
    /// Retention should run soon (over the byte budget, or its hour came).
    pub(super) retain_due: AtomicBool,
    /// The mass-delete guard.
    guard: Mutex<super::guard::MassGuard>,
    /// The user accepted what the guard held: decide those paths again.
    released: AtomicBool,
}

/// A path the scanner found changed.
enum Found {
    File(String, Hashed),
    Dir(String, Stat),
    Link(String, Stat, String),
}

impl Found {
    fn rel(&self) -> &str {
        match self {
            Found::File(r, _) | Found::Dir(r, _) | Found::Link(r, _, _) => r,
        }
    }
}

#[derive(Default)]
struct ScanResult {
    found: Vec<Found>,
    gone: Vec<String>,
    /// Paths that changed while being read: scan again soon.
    again: Vec<String>,
    problems: Vec<(String, String)>,
    /// Ignore files found that the rules were not read from.
    new_rules: Vec<String>,
}

/// A transfer waiting for a slot: path, winner, every version, pending mark.
type Queued = (String, Entry, Vec<Entry>, Vec<u8>);

/// What reconciling one path needs.
enum Action {
    Done,
    Transfer(Entry, Vec<Entry>),
    /// Not yet (a folder that still has contents): try again later.
    Later,
}

/// Schedules `rel` for another try, waiting longer each time.
fn backoff(retry: &mut HashMap<String, (Instant, u32)>, rel: &str) {
    let n = retry.get(rel).map(|(_, n)| n + 1).unwrap_or(0);
    let wait = Duration::from_millis(500 * 2u64.pow(n.min(6))).min(MAX_RETRY);
    retry.insert(rel.to_string(), (Instant::now() + wait, n));
}

fn entries(values: &[Vec<u8>]) -> Vec<Entry> {
    values
        .iter()
        .filter_map(|v| Entry::decode(v).ok())
        .collect()
}

pub(super) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Worker {
    pub(super) fn new(shared: Arc<Shared>, space: SpaceId, root: PathBuf) -> Self {
        // The folder's own files are read by the first scan, a full one,
        // before anything is reconciled.
        let rules = Rules::defaults(&root);
        Self {
            shared,
            space,
            root,
            fs: tokio::sync::Mutex::new(()),
            sync: super::SyncGate::default(),
            progress: Mutex::new(Progress {
                scanning: true,
                ..Default::default()
            }),
            stop: Notify::new(),
            stopped: AtomicBool::new(false),
            rules: RwLock::new(rules),
            activity: AtomicU64::new(0),
            placing: Mutex::new(HashSet::new()),
            unshared: AtomicBool::new(false),
            kept_bytes: AtomicU64::new(0),
            // The first pass at start also counts what is kept.
            retain_due: AtomicBool::new(true),
            guard: Mutex::new(Default::default()),
            released: AtomicBool::new(false),
        }
    }

    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop.notify_one();
    }

    fn prog(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rules(&self) -> Rules {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the rules are out of date (see [`Rules::changed`]).
    fn rules_changed(&self) -> bool {
        self.rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .changed(&self.root)
    }

    /// Reads the `.shoalignore` files again (a walk of the folder's
    /// directories, off the async threads) and reports their problems.
    async fn reload_rules(&self) -> Rules {
        let root = self.root.clone();
        let (r, problems) = match tokio::task::spawn_blocking(move || Rules::load(&root)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                // Keep the rules we have rather than sync what they ignore.
                self.problem(
                    scan::IGNORE_FILE,
                    format!("cannot read the ignore files: {e}"),
                );
                return self.rules();
            }
        };
        for (path, e) in problems {
            self.problem(&path, e);
        }
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = r.clone();
        r
    }

    /// Counts `n` bytes of transfer progress.
    pub(super) fn progress(&self, rel: &str, n: u64) {
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

    fn problem(&self, path: &str, error: String) {
        warn!(space = %self.space.short(), path, %error, "folder problem");
        {
            let mut p = self.prog();
            p.problems.push_back(format!("{path}: {error}"));
            while p.problems.len() > MAX_PROBLEMS {
                p.problems.pop_front();
            }
        }
        self.shared.emit(Event::FolderError {
            space: self.space.to_string(),
            path: path.to_string(),
            error,
        });
    }

    /// The folder's status now.
    pub(super) fn status(&self) -> FolderStatus {
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
    pub(super) fn accept_held(&self) -> usize {
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
    fn report_progress(&self, was_in_sync: bool, seen: &mut u64, settle: impl FnOnce()) -> bool {
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
                space: st.space,
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

    pub(super) async fn run(self: Arc<Self>) {
        if let Some(gate) = &self.shared.settings.hold_start {
            let _ = gate.acquire().await;
        }
        for d in [TMP_DIR, VERSIONS_DIR] {
            if let Err(e) = fs::create_dir_all(self.root.join(d)) {
                self.problem(d, e.to_string());
            }
        }
        let (watch_tx, mut watch_rx) = mpsc::channel::<PathBuf>(WATCH_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let _watcher = match self.watch(watch_tx, Arc::clone(&overflow)) {
            Ok(w) => Some(w),
            Err(e) => {
                self.problem("", format!("cannot watch the folder (rescans only): {e}"));
                None
            }
        };
        let mut events = self.shared.events.subscribe();
        let mut dirty_shards: HashSet<DocId> = files::shards().collect();
        let mut dirty_paths: HashSet<String> = HashSet::new();
        let mut debounce_at: Option<tokio::time::Instant> = None;
        let mut full_scan = true;
        let mut transfers: JoinSet<(String, Result<(), TransferError>)> = JoinSet::new();
        let mut active: HashSet<String> = HashSet::new();
        let mut queue: VecDeque<Queued> = VecDeque::new();
        let mut retry: HashMap<String, (Instant, u32)> = HashMap::new();
        let mut rescan = tokio::time::interval(self.shared.settings.rescan);
        rescan.tick().await;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut thin = tokio::time::interval(RETAIN_EVERY);
        let mut reconcile = true;
        let mut was_in_sync = true;
        let mut activity_seen = 0u64;
        info!(space = %self.space.short(), folder = %self.root.display(), "folder sync started");
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                break;
            }
            if full_scan || overflow.swap(false, Ordering::SeqCst) {
                full_scan = false;
                dirty_paths.clear();
                let again = self.scan(None).await;
                if !again.is_empty() {
                    dirty_paths.extend(again);
                    debounce_at = Some(tokio::time::Instant::now() + AGAIN_AFTER);
                }
            }
            if !dirty_shards.is_empty() {
                for shard in dirty_shards.drain().collect::<Vec<_>>() {
                    match self.pull(&shard).await {
                        Ok(n) => reconcile |= n > 0,
                        Err(e) => {
                            debug!(error = %e, "index pull failed");
                            dirty_shards.insert(shard);
                            break;
                        }
                    }
                }
            }
            if reconcile {
                reconcile = false;
                self.reconcile(&mut transfers, &mut active, &mut queue, &mut retry)
                    .await;
            }
            tokio::select! {
                _ = self.stop.notified() => break,
                ev = events.recv() => match ev {
                    Ok(Event::DocChanged { space, doc, .. }) if space == self.space.to_string() => {
                        if let Ok(d) = doc.parse::<DocId>() {
                            if files::is_index(&d) {
                                dirty_shards.insert(d);
                            } else if d.is_members() && self.unshared.swap(false, Ordering::SeqCst) {
                                full_scan = true;
                            }
                        }
                    }
                    Ok(Event::MemberVerified { space, .. }) if space == self.space.to_string() => {
                        // A peer that may have what we wait for is here.
                        retry.clear();
                        reconcile = true;
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        dirty_shards.extend(files::shards());
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(p) = watch_rx.recv() => {
                    if let Some(rel) = scan::rel_of(&self.root, &p) {
                        if scan::is_ignore_file(&rel) {
                            // The full scan checks the rules; its walk meets new ones.
                            full_scan = true;
                        }
                        dirty_paths.insert(rel);
                        if dirty_paths.len() > MAX_DIRTY {
                            full_scan = true;
                        }
                        debounce_at = Some(tokio::time::Instant::now() + self.shared.settings.debounce);
                    }
                }
                _ = async { tokio::time::sleep_until(debounce_at.unwrap_or_else(tokio::time::Instant::now)).await }, if debounce_at.is_some() => {
                    debounce_at = None;
                    let paths: Vec<String> = dirty_paths.drain().collect();
                    let again = self.scan(Some(paths)).await;
                    if !again.is_empty() {
                        dirty_paths.extend(again);
                        debounce_at = Some(tokio::time::Instant::now() + AGAIN_AFTER);
                    }
                }
                _ = rescan.tick() => full_scan = true,
                _ = thin.tick() => self.retain_due.store(true, Ordering::SeqCst),
                _ = tick.tick() => {
                    was_in_sync = self.report_progress(was_in_sync, &mut activity_seen, || {
                        dirty_paths.shrink_to_fit();
                        active.shrink_to_fit();
                        queue.shrink_to_fit();
                        retry.shrink_to_fit();
                    });
                    if self.released.swap(false, Ordering::SeqCst) {
                        // The held paths wait in `retry`: decide them now.
                        retry.clear();
                        reconcile = true;
                    }
                    if self.retain_due.swap(false, Ordering::SeqCst) {
                        self.retain().await;
                    }
                    let now = Instant::now();
                    if !queue.is_empty()
                        || retry.values().any(|(at, _)| *at <= now)
                        || self.shared.blobs.pending_count(&self.space) > active.len()
                    {
                        reconcile = true;
                    }
                }
                Some(done) = transfers.join_next(), if !transfers.is_empty() => {
                    if let Ok((path, r)) = done {
                        active.remove(&path);
                        self.prog().queued.remove(&path);
                        match r {
                            Ok(()) => {
                                retry.remove(&path);
                                let mut p = self.prog();
                                p.unavailable.remove(&path);
                                if p.detail.as_deref().is_some_and(|d| d.starts_with("disk full")) {
                                    p.detail = None;
                                }
                            }
                            Err(e) => {
                                backoff(&mut retry, &path);
                                match &e {
                                    TransferError::DiskFull(_) => {
                                        self.prog().detail = Some(e.to_string());
                                        self.problem(&path, e.to_string());
                                    }
                                    TransferError::NoPeers => {}
                                    TransferError::Unavailable(_) => {
                                        if self.prog().unavailable.insert(path.clone()) {
                                            self.problem(&path, e.to_string());
                                        }
                                    }
                                    TransferError::Failed(_) => self.problem(&path, e.to_string()),
                                }
                            }
                        }
                        reconcile = true;
                    }
                }
            }
        }
        transfers.shutdown().await;
        debug!(space = %self.space.short(), "folder worker stopped");
    }

    fn watch(
        &self,
        tx: mpsc::Sender<PathBuf>,
        overflow: Arc<AtomicBool>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let internal = self.root.join(place::SHOAL_DIR);
        let mut w =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                // Opening and reading a file (our own hashing included) is not a
                // change.
                Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => {}
                Ok(ev) => {
                    for p in ev.paths {
                        if p.starts_with(&internal) {
                            continue;
                        }
                        if tx.try_send(p).is_err() {
                            overflow.store(true, Ordering::SeqCst);
                        }
                    }
                }
                Err(_) => overflow.store(true, Ordering::SeqCst),
            })?;
        w.watch(&self.root, notify::RecursiveMode::Recursive)?;
        // Nothing under `.shoal` is synced, and placing a file there makes
        // seven of its eight events (create, writes, close, two attribute
        // changes, the move out): without these watches the kernel queues
        // none of them. If they cannot be dropped, the filter above still
        // ignores their events.
        if let Err(e) = w.unwatch(&self.root.join(place::SHOAL_DIR)) {
            debug!(error = %e, "cannot drop the watch on .shoal");
        }
        Ok(w)
    }

    // ----- local side -----------------------------------------------------

    /// Scans the whole folder (`None`) or some paths, and publishes what
    /// changed.
    /// Returns paths that changed while being read.
    async fn scan(&self, paths: Option<Vec<String>>) -> Vec<String> {
        let full = paths.is_none();
        let started = Instant::now();
        if full {
            self.prog().scanning = true;
        }
        // The watcher's word on `.shoalignore` may still be queued behind
        // this scan: the rules are checked against the files themselves
        // (and read on the first scan). New ones in folders below are met
        // by the walk, below.
        let rules = if self.rules_changed() {
            self.reload_rules().await
        } else {
            self.rules()
        };
        let (root, blobs, space) = (self.root.clone(), self.shared.blobs.clone(), self.space);
        let mut result = tokio::task::spawn_blocking(move || {
            scan_blocking(&root, &rules, &blobs, &space, paths)
        })
        .await
        .unwrap_or_default();
        for (p, e) in &result.problems {
            self.problem(p, e.clone());
        }
        if full {
            self.prog().scanning = false;
        }
        let new_rules = std::mem::take(&mut result.new_rules);
        if !new_rules.is_empty() || self.rules_changed() {
            // `.shoalignore` changed during the walk, or the walk found one
            // the rules lack: nothing they now ignore is published. The
            // folders of new ones are read again soon with the new rules
            // (for what they re-include); a changed one's event starts a
            // full scan.
            // (The root's own has its watch from the start: its event
            // comes.)
            for r in new_rules {
                if let Some((dir, _)) = r.rsplit_once('/') {
                    result.again.push(dir.to_string());
                }
            }
            let rules = self.reload_rules().await;
            result
                .found
                .retain(|f| !rules.ignored(f.rel(), matches!(f, Found::Dir(..))));
        }
        {
            // A placement that finished while the scan read its file has
            // recorded that very stat: nothing changed locally.
            result.found.retain(|f| {
                let st = match f {
                    Found::File(_, h) => h.stat,
                    Found::Dir(_, st) | Found::Link(_, st, _) => *st,
                };
                !matches!(self.shared.blobs.local(&self.space, f.rel()), Ok(Some(l)) if l.stat == st)
            });
            let placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
            if !placing.is_empty() {
                let mut later = Vec::new();
                result.found.retain(|f| {
                    let busy = placing.contains(f.rel());
                    if busy {
                        later.push(f.rel().to_string());
                    }
                    !busy
                });
                result.gone.retain(|g| {
                    let busy = placing.contains(g);
                    if busy {
                        later.push(g.clone());
                    }
                    !busy
                });
                result.again.extend(later);
            }
        }
        let again = std::mem::take(&mut result.again);
        let changed = result.found.len() + result.gone.len();
        if let Err(e) = self.publish(result).await {
            self.problem("", format!("cannot record local changes: {e}"));
        }
        if changed > 0 {
            self.activity.fetch_add(1, Ordering::Relaxed);
            info!(space = %self.space.short(), changed, full, ms = started.elapsed().as_millis() as u64, "scan recorded local changes");
        }
        again
    }

    async fn publish(&self, result: ScanResult) -> Result<(), Error> {
        if result.found.is_empty() && result.gone.is_empty() {
            return Ok(());
        }
        let paths: Vec<String> = result
            .found
            .iter()
            .map(|f| f.rel().to_string())
            .chain(result.gone.iter().cloned())
            .collect();
        let current = self.index_get(paths).await?;
        let me = self.shared.me.clone();
        let mut puts: Vec<(String, Entry)> = Vec::new();
        let guard = self.fs.lock().await;
        let blobs = &self.shared.blobs;
        let mut cur = current.into_iter();
        for f in result.found {
            let values = entries(&cur.next().unwrap_or_default());
            let abs = self.root.join(f.rel());
            // Changed again since it was read: the next scan has it.
            let now = match fs::symlink_metadata(&abs) {
                Ok(m) => scan::stat_of(&m),
                Err(_) => continue,
            };
            let (rel, entry, stat, chunks, manifest) = match f {
                Found::File(rel, h) => {
                    if now != h.stat {
                        continue;
                    }
                    let (hash, chunked, manifest) = h.version();
                    let e = Entry {
                        kind: Kind::File,
                        hash,
                        chunked,
                        size: h.stat.size,
                        mode: h.stat.mode & 0o7777,
                        mtime_ns: h.stat.mtime_ns,
                        deleted: false,
                        device: me.clone(),
                        target: None,
                    };
                    (rel, e, h.stat, h.chunks, manifest)
                }
                Found::Dir(rel, st) => {
                    let e = Entry {
                        kind: Kind::Dir,
                        hash: [0; 32],
                        chunked: false,
                        size: 0,
                        mode: st.mode & 0o7777,
                        mtime_ns: st.mtime_ns,
                        deleted: false,
                        device: me.clone(),
                        target: None,
                    };
                    (rel, e, now, Vec::new(), None)
                }
                Found::Link(rel, st, target) => {
                    if now != st {
                        continue;
                    }
                    let e = Entry {
                        kind: Kind::Symlink,
                        hash: [0; 32],
                        chunked: false,
                        size: 0,
                        mode: 0o777,
                        mtime_ns: st.mtime_ns,
                        deleted: false,
                        device: me.clone(),
                        target: Some(target),
                    };
                    (rel, e, st, Vec::new(), None)
                }
            };
            if let Some(m) = &manifest {
                blobs.put_manifest(&self.space, m)?;
            }
            // The index moved past the version this file was edited from:
            // the two edits are concurrent. Both are kept.
            // (With no record here at all, a live remote version this
            // device has not fetched yet is concurrent with the new file.)
            let base = blobs.local(&self.space, &rel)?.map(|b| b.hash);
            let decided = plan::local(&values, base, &entry, &me);
            let conflict = match &decided {
                plan::Local::OursWin { copy, .. } | plan::Local::TheirsWin { copy } => {
                    Some(copy.clone())
                }
                plan::Local::Adopt | plan::Local::Publish => None,
            };
            if let Some((mtime, device)) = conflict {
                let device = device.short();
                let want = place::conflict_name(&rel, mtime, &device);
                let copy = place::free_name(&self.root, &want);
                self.shared
                    .counters
                    .conflicts
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.emit(Event::Conflict {
                    space: self.space.to_string(),
                    path: rel.clone(),
                    copy: copy.clone(),
                    device,
                });
                match &decided {
                    plan::Local::TheirsWin { .. } => {
                        // Our file becomes the copy; theirs is placed.
                        fs::rename(&abs, self.root.join(&copy))
                            .map_err(|e| Error::io("keep conflict copy", &abs, e))?;
                        let st = scan::stat_of(
                            &fs::symlink_metadata(self.root.join(&copy))
                                .map_err(|e| Error::io("stat conflict copy", &abs, e))?,
                        );
                        blobs.remove_local(&self.space, &rel, false)?;
                        blobs.mark_pending(&self.space, &rel)?;
                        blobs.set_local(
                            &self.space,
                            &copy,
                            st,
                            entry.hash,
                            entry.chunked,
                            &chunks,
                        )?;
                        puts.push((copy, entry));
                        continue;
                    }
                    // Ours wins; theirs is kept as a copy in the index, and
                    // fetched like any file.
                    plan::Local::OursWin { theirs, .. } => puts.push((copy, theirs.clone())),
                    plan::Local::Adopt | plan::Local::Publish => {}
                }
            }
            blobs.set_local(&self.space, &rel, stat, entry.hash, entry.chunked, &chunks)?;
            if decided == plan::Local::Adopt {
                continue;
            }
            puts.push((rel, entry));
        }
        for rel in result.gone {
            let values = entries(&cur.next().unwrap_or_default());
            let Some(local) = blobs.local(&self.space, &rel)? else {
                continue;
            };
            match fs::symlink_metadata(self.root.join(&rel)) {
                Err(e) if scan::is_gone(&e) => {}
                _ => continue,
            }
            blobs.remove_local(&self.space, &rel, false)?;
            let had = plan::Recorded {
                hash: local.hash,
                chunked: local.chunked,
            };
            match plan::vanished(&values, had, &me, now_ns()) {
                plan::Vanished::Delete(e) => puts.push((rel, e)),
                plan::Vanished::Refetch => blobs.mark_pending(&self.space, &rel)?,
                plan::Vanished::Forget => {}
            }
        }
        drop(guard);
        if puts.is_empty() {
            return Ok(());
        }
        for (rel, e) in &puts {
            debug!(me = %self.shared.me.short(), path = %rel, deleted = e.deleted, size = e.size, "local change");
            self.shared.emit(Event::FileChanged {
                space: self.space.to_string(),
                path: rel.clone(),
                origin: FileOrigin::Local,
                device: me.to_string(),
                size: e.size,
                deleted: e.deleted,
            });
        }
        for batch in puts.chunks(PUBLISH_BATCH) {
            let entries: Vec<(String, Vec<u8>)> =
                batch.iter().map(|(p, e)| (p.clone(), e.encode())).collect();
            let space = self.space;
            let r = self
                .shared
                .engine
                .index(|reply| IndexCommand::Put {
                    space,
                    entries,
                    reply,
                })
                .await;
            if let Err(Error::Forbidden(why)) = &r {
                self.problem("", format!("local changes are not shared: {why}"));
                return Ok(());
            }
            if let Err(Error::MembersUnknown) = &r {
                // Shared once `members` arrives: a full scan then finds
                // these files again (their records are forgotten below).
                self.unshared.store(true, Ordering::SeqCst);
            }
            if r.is_err() {
                // Not recorded in the index: forget what the scan recorded
                // here, so the next scan finds these files changed again.
                for (p, e) in batch {
                    if !e.deleted {
                        let _ = self.shared.blobs.remove_local(&self.space, p, true);
                    }
                }
            }
            r?;
        }
        Ok(())
    }

    pub(super) async fn index_get(&self, paths: Vec<String>) -> Result<Vec<Vec<Vec<u8>>>, Error> {
        let space = self.space;
        self.shared
            .engine
            .index(|reply| IndexCommand::Get {
                space,
                paths,
                reply,
            })
            .await
    }

    // ----- remote side ----------------------------------------------------

    /// Records paths of `shard` that changed since its cursor as pending.
    async fn pull(&self, shard: &DocId) -> Result<usize, Error> {
        let since = self.shared.blobs.cursor(&self.space, shard)?;
        let (space, sh) = (self.space, shard.clone());
        let changes = self
            .shared
            .engine
            .index(|reply| IndexCommand::Changes {
                space,
                shard: sh,
                since,
                reply,
            })
            .await?;
        if changes.heads.is_empty() {
            return Ok(0);
        }
        let paths: Vec<String> = changes
            .paths
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| files::normalize_path(p).is_ok_and(|n| n == *p))
            .collect();
        self.shared
            .blobs
            .add_pending(&self.space, shard, &changes.heads, &paths)?;
        Ok(paths.len())
    }

    /// Starts queued transfers while slots are free; when the queue is
    /// empty, decides the next batch of pending paths (those needing no
    /// transfer are done at once, the rest are queued).
    async fn reconcile(
        self: &Arc<Self>,
        transfers: &mut JoinSet<(String, Result<(), TransferError>)>,
        active: &mut HashSet<String>,
        queue: &mut VecDeque<Queued>,
        retry: &mut HashMap<String, (Instant, u32)>,
    ) {
        if queue.is_empty() {
            self.decide_batch(active, queue, retry).await;
        }
        while transfers.len() < self.shared.settings.transfers {
            let Some((rel, w, all, mark)) = queue.pop_front() else {
                break;
            };
            let me = Arc::clone(self);
            transfers.spawn(async move {
                let r = me.transfer(&rel, &w, &all, &mark).await;
                (rel, r)
            });
        }
    }

    async fn decide_batch(
        self: &Arc<Self>,
        active: &mut HashSet<String>,
        queue: &mut VecDeque<Queued>,
        retry: &mut HashMap<String, (Instant, u32)>,
    ) {
        let now = Instant::now();
        // Paths that wait (busy or failing) are skipped before the batch is
        // cut, so they cannot starve the others.
        let Ok(pending) = self
            .shared
            .blobs
            .pending(&self.space, RECONCILE_BATCH + active.len() + retry.len())
        else {
            return;
        };
        let (paths, marks): (Vec<String>, Vec<Vec<u8>>) = pending
            .into_iter()
            .filter(|(p, _)| !active.contains(p))
            .filter(|(p, _)| retry.get(p).is_none_or(|(at, _)| *at <= now))
            .take(RECONCILE_BATCH)
            .unzip();
        if paths.is_empty() {
            return;
        }
        let values = match self.index_get(paths.clone()).await {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "index read failed");
                return;
            }
        };
        let mut work: Vec<(String, Vec<Entry>, Vec<u8>)> = paths
            .into_iter()
            .zip(values.iter().map(|v| entries(v)))
            .zip(marks)
            .map(|((p, e), m)| (p, e, m))
            .collect();
        // Folders before their contents; deletions deepest first.
        work.sort_by(|a, b| {
            let da = files::winner(&a.1).is_some_and(|w| w.deleted);
            let db = files::winner(&b.1).is_some_and(|w| w.deleted);
            match (da, db) {
                (false, false) => a.0.cmp(&b.0),
                (true, true) => b.0.cmp(&a.0),
                (false, true) => std::cmp::Ordering::Less,
                (true, false) => std::cmp::Ordering::Greater,
            }
        });
        let held = self.guard_batch(&work);
        let _g = self.fs.lock().await;
        // The temp files, read once for the batch: none of its paths has a
        // transfer running, so none of theirs comes or goes meanwhile.
        let mut parts = self.temp_parts();
        for (rel, entries, mark) in work {
            if held.contains(&rel) {
                // Left as it is until accepted (or restored over).
                retry.insert(rel, (now + HELD_RECHECK, 0));
                continue;
            }
            match self.decide(&rel, &entries, &mut parts) {
                Ok(Action::Done) => {
                    retry.remove(&rel);
                    self.prog().unavailable.remove(&rel);
                    let _ = self.shared.blobs.done_pending(&self.space, &rel, &mark);
                }
                Ok(Action::Transfer(w, all)) => {
                    active.insert(rel.clone());
                    self.prog().queued.insert(rel.clone(), w.size);
                    queue.push_back((rel, w, all, mark));
                }
                Ok(Action::Later) => backoff(retry, &rel),
                Err(e) => {
                    backoff(retry, &rel);
                    self.problem(&rel, e.to_string());
                }
            }
        }
    }

    /// The mass-delete guard's look at a batch: the paths whose winner
    /// would delete or overwrite a file here, by writing device. Returns
    /// the paths to hold; says so when a device trips the guard.
    fn guard_batch(&self, work: &[(String, Vec<Entry>, Vec<u8>)]) -> HashSet<String> {
        let blobs = &self.shared.blobs;
        let mut destructive = Vec::new();
        for (rel, entries, _) in work {
            let Some(w) = files::winner(entries) else {
                continue;
            };
            if w.device == self.shared.me {
                continue;
            }
            let Ok(Some(here)) = blobs.local(&self.space, rel) else {
                continue;
            };
            let overwrite = !w.deleted && w.kind == Kind::File && here.hash != w.hash;
            if w.deleted || overwrite {
                destructive.push((rel.clone(), w.device.clone()));
            }
        }
        if destructive.is_empty() {
            return HashSet::new();
        }
        let files_here = blobs.local_count(&self.space);
        let (hold, tripped) = self.guard.lock().unwrap_or_else(|p| p.into_inner()).check(
            &destructive,
            files_here,
            &self.shared.settings.guard,
            Instant::now(),
        );
        for device in tripped {
            let n = destructive.iter().filter(|(_, d)| *d == device).count() as u64;
            warn!(space = %self.space.short(), device = %device.short(), paths = n,
                "mass-delete guard: holding this device's deletions and overwrites");
            self.problem(
                "",
                format!(
                    "device …{} would delete or overwrite {n} files at once: held until \
                     `shoal folder accept` (or a restore)",
                    device.short()
                ),
            );
            self.shared.emit(Event::ChangesHeld {
                space: self.space.to_string(),
                device: device.to_string(),
                paths: n,
            });
        }
        hold
    }

    /// Brings `rel` in line with the index where that needs no transfer:
    /// gathers what is known about the path, asks the planner
    /// ([`plan::remote`]) and carries the plan out.
    fn decide(
        &self,
        rel: &str,
        values: &[Entry],
        parts: &mut HashMap<String, Vec<String>>,
    ) -> io::Result<Action> {
        let blobs = &self.shared.blobs;
        let io = |e: Error| io::Error::other(e.to_string());
        let Some(w) = files::winner(values).cloned() else {
            return Ok(Action::Done);
        };
        // Never act through a link or a file standing where a folder of the
        // path should be: that could reach outside the folder.
        place::check_parents(&self.root, rel)?;
        // Transfers of versions no longer wanted free their space.
        let keep = (w.kind == Kind::File && !w.deleted).then_some(w.hash);
        self.drop_stale_parts(rel, keep.as_ref(), parts);
        let abs = self.root.join(rel);
        let local = blobs.local(&self.space, rel).map_err(io)?;
        let facts = self.facts(rel, values, local.as_ref(), w.kind == Kind::Dir);
        let plan = plan::remote(&facts, &self.shared.me);
        let record = |st| {
            blobs
                .set_local(&self.space, rel, st, [0; 32], false, &[])
                .map_err(io)
        };
        match plan {
            plan::Remote::Nothing => Ok(Action::Done),
            plan::Remote::Forget => {
                blobs.remove_local(&self.space, rel, false).map_err(io)?;
                Ok(Action::Done)
            }
            plan::Remote::Remove => {
                self.keep_old(rel)?;
                self.remote_changed(rel, &w);
                Ok(Action::Done)
            }
            plan::Remote::RemoveDir => {
                if fs::remove_dir(&abs).is_err() {
                    // Synced contents whose deletions are still on their way:
                    // try later. Only files new here: they keep the folder.
                    let synced_left = fs::read_dir(&abs)?.flatten().any(|e| {
                        let child = format!("{rel}/{}", e.file_name().to_string_lossy());
                        blobs.local(&self.space, &child).is_ok_and(|l| l.is_some())
                    });
                    return Ok(if synced_left {
                        Action::Later
                    } else {
                        Action::Done
                    });
                }
                blobs.remove_local(&self.space, rel, false).map_err(io)?;
                self.remote_changed(rel, &w);
                Ok(Action::Done)
            }
            plan::Remote::MakeDir(aside) => {
                if let Some(a) = aside {
                    self.set_aside(rel, a)?;
                }
                place::safe_parent(&self.root, rel)?;
                fs::create_dir(&abs)?;
                record(scan::stat_of(&fs::symlink_metadata(&abs)?))?;
                Ok(Action::Done)
            }
            plan::Remote::RecordDir | plan::Remote::RecordLink => {
                record(scan::stat_of(&fs::symlink_metadata(&abs)?))?;
                Ok(Action::Done)
            }
            plan::Remote::MakeLink { target, aside } => {
                if let Some(a) = aside {
                    self.set_aside(rel, a)?;
                }
                place::safe_parent(&self.root, rel)?;
                std::os::unix::fs::symlink(&target, &abs)?;
                record(scan::stat_of(&fs::symlink_metadata(&abs)?))?;
                self.remote_changed(rel, &w);
                Ok(Action::Done)
            }
            plan::Remote::Fetch(w) => Ok(Action::Transfer(w, values.to_vec())),
        }
    }

    /// What is known about `rel` now, for the planner: the index's
    /// versions, this device's record, the disk, the ignore verdict.
    fn facts<'a>(
        &self,
        rel: &str,
        values: &'a [Entry],
        local: Option<&LocalFile>,
        as_dir: bool,
    ) -> plan::Facts<'a> {
        let disk = fs::symlink_metadata(self.root.join(rel)).ok();
        let on_disk = match &disk {
            None => plan::OnDisk::Missing,
            Some(m) if m.is_dir() => plan::OnDisk::Dir,
            Some(m) if m.file_type().is_symlink() => plan::OnDisk::Link(
                fs::read_link(self.root.join(rel))
                    .ok()
                    .and_then(|t| t.to_str().map(String::from)),
            ),
            Some(_) => plan::OnDisk::File,
        };
        let stat = disk.as_ref().map(scan::stat_of);
        plan::Facts {
            values,
            recorded: local.map(|l| plan::Recorded {
                hash: l.hash,
                chunked: l.chunked,
            }),
            disk: on_disk,
            disk_mtime_ns: stat.map_or(0, |s| s.mtime_ns),
            known: matches!((stat, local), (Some(s), Some(l)) if l.stat == s),
            ignored: self
                .rules
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .ignored(rel, as_dir),
        }
    }

    /// The temp files in `.shoal/tmp/` (`HASH-PATHTAG.part`), by the tag of
    /// the path they are for.
    fn temp_parts(&self) -> HashMap<String, Vec<String>> {
        let mut by_tag: HashMap<String, Vec<String>> = HashMap::new();
        let Ok(dir) = fs::read_dir(self.root.join(TMP_DIR)) else {
            return by_tag;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(part) = name.strip_suffix(".part") else {
                continue;
            };
            if let Some((_, tag)) = part.rsplit_once('-') {
                by_tag
                    .entry(tag.to_string())
                    .or_default()
                    .push(part.to_string());
            }
        }
        by_tag
    }

    /// Removes temp files of `rel` (from `parts`, see [`Self::temp_parts`])
    /// other than the one for version `keep`.
    fn drop_stale_parts(
        &self,
        rel: &str,
        keep: Option<&[u8; 32]>,
        parts: &mut HashMap<String, Vec<String>>,
    ) {
        let tag = hex::encode(&blake3::hash(rel.as_bytes()).as_bytes()[..6]);
        let Some(mine) = parts.get_mut(&tag) else {
            return;
        };
        let keep = keep.map(|k| hex::encode(&k[..12]));
        mine.retain(|part| {
            if keep.as_ref().is_some_and(|k| part.starts_with(k.as_str())) {
                return true;
            }
            let _ = fs::remove_file(self.root.join(TMP_DIR).join(format!("{part}.part")));
            let _ = self.shared.blobs.remove_part(&self.space, part);
            false
        });
    }

    fn remote_changed(&self, rel: &str, w: &Entry) {
        self.shared.emit(Event::FileChanged {
            space: self.space.to_string(),
            path: rel.to_string(),
            origin: FileOrigin::Remote,
            device: w.device.to_string(),
            size: w.size,
            deleted: w.deleted,
        });
    }

    /// Whatever is at `rel` makes way for the winner, as the planner said
    /// ([`plan::set_aside_as`]): a conflict copy or an old version.
    pub(super) fn set_aside(&self, rel: &str, aside: plan::Aside) -> io::Result<()> {
        let abs = self.root.join(rel);
        match aside {
            plan::Aside::Conflict { mtime_ns, device } => {
                let device = device.short();
                let want = place::conflict_name(rel, mtime_ns, &device);
                let copy = place::free_name(&self.root, &want);
                fs::rename(&abs, self.root.join(&copy))?;
                let io = |e: Error| io::Error::other(e.to_string());
                let blobs = &self.shared.blobs;
                // A folder's contents moved with it: forgetting their
                // records makes the scan publish them under the copy, and
                // no deletion at their old paths.
                for child in blobs.locals_below(&self.space, rel).map_err(io)? {
                    blobs.remove_local(&self.space, &child, false).map_err(io)?;
                }
                blobs.remove_local(&self.space, rel, false).map_err(io)?;
                self.shared
                    .counters
                    .conflicts
                    .fetch_add(1, Ordering::Relaxed);
                info!(space = %self.space.short(), path = rel, %copy, "conflict: the other version is kept as a copy");
                self.shared.emit(Event::Conflict {
                    space: self.space.to_string(),
                    path: rel.to_string(),
                    copy,
                    device,
                });
                Ok(())
            }
            plan::Aside::OldVersion => self.keep_old(rel),
        }
    }

    /// Fetches version `w` of `rel` and places it.
    async fn transfer(
        &self,
        rel: &str,
        w: &Entry,
        all: &[Entry],
        mark: &[u8],
    ) -> Result<(), TransferError> {
        place::check_parents(&self.root, rel)
            .map_err(|e| TransferError::Failed(format!("{rel}: {e}")))?;
        let started = Instant::now();
        // A file here that is not yet recorded may already be this version
        // (two folders that started with the same files).
        let abs = self.root.join(rel);
        if let Ok(m) = fs::symlink_metadata(&abs) {
            let local = self.shared.blobs.local(&self.space, rel).ok().flatten();
            let known = local.as_ref().is_some_and(|l| l.stat == scan::stat_of(&m));
            if m.is_file() && !known && m.len() == w.size {
                let a = abs.clone();
                if let Ok(Ok(Some(h))) =
                    tokio::task::spawn_blocking(move || scan::hash_file(&a)).await
                {
                    if h.version().0 == w.hash {
                        let _g = self.fs.lock().await;
                        let now = fs::symlink_metadata(&abs).map(|m| scan::stat_of(&m)).ok();
                        if now == Some(h.stat) {
                            if let Some(m) = h.version().2 {
                                let _ = self.shared.blobs.put_manifest(&self.space, &m);
                            }
                            self.shared
                                .blobs
                                .set_local(&self.space, rel, h.stat, w.hash, w.chunked, &h.chunks)
                                .map_err(|e| TransferError::Failed(e.to_string()))?;
                            let _ = self.shared.blobs.done_pending(&self.space, rel, mark);
                            return Ok(());
                        }
                    }
                }
            }
        }
        let big = w.size >= 1 << 20;
        if big {
            self.shared.emit(Event::TransferStarted {
                space: self.space.to_string(),
                path: rel.to_string(),
                bytes: w.size,
            });
        }
        let fetched = self.fetch(rel, w).await?;
        {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&fetched.temp)
                .map_err(|e| TransferError::Failed(format!("open {rel}: {e}")))?;
            let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(w.mtime_ns.max(0) as u64);
            let _ = f.set_modified(mtime);
            use std::os::unix::fs::PermissionsExt;
            let _ = f.set_permissions(fs::Permissions::from_mode(w.mode & 0o777));
        }
        let guard = self.fs.lock().await;
        let blobs = &self.shared.blobs;
        // The index may have moved on while we fetched. Asked every time,
        // under the lock: a stale version placed here would be found by
        // the scanner as content that is not the winner, and published
        // as a local edit over the newer one.
        let current = self
            .index_get(vec![rel.to_string()])
            .await
            .map_err(|e| TransferError::Failed(e.to_string()))?;
        let now_values = entries(current.first().map(|v| v.as_slice()).unwrap_or_default());
        if files::winner(&now_values).is_some_and(|n| n.hash != w.hash || n.deleted) {
            return Err(TransferError::Failed(
                "superseded while fetched; again".into(),
            ));
        }
        let fail = |e: io::Error| TransferError::Failed(format!("place {rel}: {e}"));
        let local = blobs
            .local(&self.space, rel)
            .map_err(|e| TransferError::Failed(e.to_string()))?;
        if let Ok(m) = fs::symlink_metadata(&abs) {
            let st = scan::stat_of(&m);
            let known = local.as_ref().is_some_and(|l| l.stat == st);
            if m.is_dir() {
                return Err(TransferError::Failed(format!("{rel} is a folder here")));
            }
            let all: Vec<Entry> = if now_values.is_empty() {
                all.to_vec()
            } else {
                now_values
            };
            let recorded = local.as_ref().map(|l| plan::Recorded {
                hash: l.hash,
                chunked: l.chunked,
            });
            let aside = plan::set_aside_as(known, st.mtime_ns, recorded, &all, w, &self.shared.me);
            self.set_aside(rel, aside).map_err(fail)?;
        }
        let dest = place::safe_parent(&self.root, rel).map_err(fail)?;
        let placed = self.placing(rel);
        fs::rename(&fetched.temp, &dest).map_err(fail)?;
        let st = scan::stat_of(&fs::symlink_metadata(&dest).map_err(fail)?);
        // The rename is made durable outside the lock, so placements in
        // parallel share the folder syncs; the path is recorded after it.
        // (A scan in between finds the winner's content and only adopts it.)
        drop(guard);
        if w.size >= super::OWN_SYNC_BYTES {
            if let Some(parent) = dest.parent().map(Path::to_path_buf) {
                tokio::task::spawn_blocking(move || place::sync_dir(&parent))
                    .await
                    .map_err(|e| TransferError::Failed(e.to_string()))?
                    .map_err(fail)?;
            }
        } else {
            self.sync.durable(&self.root).await.map_err(fail)?;
        }
        blobs
            .set_local(&self.space, rel, st, w.hash, w.chunked, &fetched.chunks)
            .map_err(|e| TransferError::Failed(e.to_string()))?;
        drop(placed);
        let _ = blobs.remove_part(&self.space, &fetched.part);
        let _ = blobs.done_pending(&self.space, rel, mark);
        self.shared
            .counters
            .files_placed
            .fetch_add(1, Ordering::Relaxed);
        self.activity.fetch_add(1, Ordering::Relaxed);
        self.remote_changed(rel, w);
        if big {
            let ms = started.elapsed().as_millis() as u64;
            info!(space = %self.space.short(), path = rel, bytes = w.size, ms, "transfer finished");
            self.shared.emit(Event::TransferFinished {
                space: self.space.to_string(),
                path: rel.to_string(),
                bytes: w.size,
                millis: started.elapsed().as_millis() as u64,
            });
        }
        Ok(())
    }
}

/// Takes a path out of [`Worker::placing`] when dropped, whatever way the
/// placement ends.
pub(super) struct Placing<'a>(&'a Worker, &'a str);

impl Worker {
    /// Marks `rel` as being placed until the guard drops.
    pub(super) fn placing<'a>(&'a self, rel: &'a str) -> Placing<'a> {
        self.placing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rel.to_string());
        Placing(self, rel)
    }
}

impl Drop for Placing<'_> {
    fn drop(&mut self) {
        self.0
            .placing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.1);
    }
}

/// The scan itself, on a blocking thread.
fn scan_blocking(
    root: &Path,
    rules: &Rules,
    blobs: &crate::store::Blobs,
    space: &SpaceId,
    paths: Option<Vec<String>>,
) -> ScanResult {
    let mut out = ScanResult::default();
    // A full scan reads every record once; a partial one looks up what it
    // finds, plus the records under paths that vanished.
    let mut locals: HashMap<String, LocalFile> = match &paths {
        None => blobs
            .locals(space)
            .unwrap_or_default()
            .into_iter()
            .collect(),
        Some(ps) => {
            let mut m = HashMap::new();
            let gone: Vec<&String> = ps
                .iter()
                .filter(|p| fs::symlink_metadata(root.join(p)).is_err_and(|e| scan::is_gone(&e)))
                .collect();
            if !gone.is_empty() {
                for (p, l) in blobs.locals(space).unwrap_or_default() {
                    if gone
                        .iter()
                        .any(|d| p == **d || p.starts_with(&format!("{d}/")))
                    {
                        m.insert(p, l);
                    }
                }
            }
            m
        }
    };
    let mut found: Vec<scan::Found> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut problem = |p: String, e: String| out.problems.push((p, e));
    match &paths {
        None => found = scan::walk(root, root, rules, &mut out.new_rules, &mut problem),
        Some(ps) => {
            for p in ps {
                let abs = root.join(p);
                let Ok(meta) = fs::symlink_metadata(&abs) else {
                    continue;
                };
                if rules.ignored(p, meta.is_dir()) {
                    continue;
                }
                if meta.is_dir() {
                    found.extend(scan::walk(
                        root,
                        &abs,
                        rules,
                        &mut out.new_rules,
                        &mut problem,
                    ));
                }
                found.push(scan::Found {
                    rel: p.clone(),
                    abs,
                    meta,
                });
            }
        }
    }
    for f in found {
        if !seen.insert(f.rel.clone()) {
            continue;
        }
        let st = scan::stat_of(&f.meta);
        if paths.is_some() && !locals.contains_key(&f.rel) {
            if let Ok(Some(l)) = blobs.local(space, &f.rel) {
                locals.insert(f.rel.clone(), l);
            }
        }
        let known = locals.get(&f.rel);
        let ft = f.meta.file_type();
        if ft.is_file() {
            if known.is_some_and(|l| l.stat == st) {
                continue;
            }
            debug!(path = %f.rel, was = ?known.map(|l| l.stat), now = ?st, "changed on disk");
            if scan::is_private_key(&f.abs, &f.rel) && !rules.included(&f.rel) {
                out.problems.push((
                    f.rel.clone(),
                    "looks like a private key: not synced (add `!name` to .shoalignore to sync it)"
                        .into(),
                ));
                continue;
            }
            match scan::hash_file(&f.abs) {
                Ok(Some(h)) => out.found.push(Found::File(f.rel, h)),
                Ok(None) => out.again.push(f.rel),
                Err(e) => out.problems.push((f.rel, e.to_string())),
            }
        } else if ft.is_dir() {
            if known.is_none() {
                out.found.push(Found::Dir(f.rel, st));
            }
        } else if ft.is_symlink() {
            if known.is_some_and(|l| l.stat == st) {
                continue;
            }
            match fs::read_link(&f.abs) {
                Ok(t) => match t.to_str() {
                    Some(t) => out.found.push(Found::Link(f.rel, st, t.to_string())),
                    None => out
                        .problems
                        .push((f.rel, "link target is not UTF-8".into())),
                },
                Err(e) => out.problems.push((f.rel, e.to_string())),
            }
        }
    }
    for p in locals.keys() {
        if seen.contains(p) {
            continue;
        }
        match fs::symlink_metadata(root.join(p)) {
            Err(e) if scan::is_gone(&e) => out.gone.push(p.clone()),
            // Unreadable (a folder without permission): kept as it is; the
            // walk reported the folder.
            Err(_) => {}
            Ok(_) if rules.ignored(p, false) => {
                // Newly ignored: stays as it is everywhere, no longer tracked here.
                let _ = blobs.remove_local(space, p, false);
            }
            Ok(_) => {}
        }
    }
    out
}
