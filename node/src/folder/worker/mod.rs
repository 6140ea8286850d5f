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
//!
//! Where things are: this file holds the worker's state and its loop
//! (`run`, the watcher); `local.rs` the local side (scan, publish);
//! `remote.rs` the remote side (pull shards, gather each path's facts and
//! ask the pure planner, `shoal_protocol::plan`, what to do); `placing.rs`
//! placement (set aside, transfer and place); `status.rs` progress,
//! problems and status. Kept old versions and restores are in
//! `folder/versions.rs`, the mass-delete guard in `folder/guard.rs`.

mod local;
mod placing;
mod remote;
mod status;

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
use crate::engine::IndexCommand;
use crate::error::Error;
use crate::events::FileOrigin;
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
/// Tries after which a conflict copy of a version no connected member can
/// serve is given up (about 4 minutes of backoff).
const GIVE_UP_COPY: u32 = 10;

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
    /// Conflict copies to make of versions this device did not hold when
    /// its own edit won (copy path -> that version). A copy is fetched,
    /// placed, and only then published: a copy whose content no device has
    /// never enters the index. Not kept across restarts (the version stays
    /// in the path's history and with its writer).
    pub(super) copies: Mutex<HashMap<String, Entry>>,
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

/// Whether `rel` may be tried now: it is not backing off after a failure.
fn due(retry: &HashMap<String, (Instant, u32)>, rel: &str, now: Instant) -> bool {
    retry.get(rel).is_none_or(|(at, _)| *at <= now)
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
            copies: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets the conflict copy to make at `copy`; whether there was one.
    fn drop_copy(&self, copy: &str) -> bool {
        self.copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(copy)
            .is_some()
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
                    Ok(Event::DocChanged { space, doc, .. }) if space == self.space => {
                        if files::is_index(&doc) {
                            dirty_shards.insert(doc);
                        } else if doc.is_members() && self.unshared.swap(false, Ordering::SeqCst) {
                            full_scan = true;
                        }
                    }
                    Ok(Event::MemberVerified { space, .. }) if space == self.space => {
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
                        || self.copies_waiting(&active, &retry)
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
                                    TransferError::Unavailable(_) if retry.get(&path).is_some_and(|(_, n)| *n >= GIVE_UP_COPY) && self.drop_copy(&path) => {
                                        // A conflict copy of a version no
                                        // member holds any more: not made.
                                        retry.remove(&path);
                                        self.problem(&path, format!("conflict copy not made: {e}"));
                                    }
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
}
