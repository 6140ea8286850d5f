//! Folder sync: a folder on each device that stays identical on all of them.
//!
//! One worker task per space with a folder ([`worker`]) watches the folder
//! (notify, debounced, plus a periodic rescan), hashes changed files into
//! content-defined chunks ([`scan`]), and writes one packed entry per path
//! into the space's sharded `index-*` documents through the engine. When
//! the index changes (locally or from peers), the worker reconciles each
//! changed path with the disk: it fetches missing chunks from every
//! admitted peer at once over pipelined streams ([`links`], [`fetch`]),
//! copies chunks it already has from local files, verifies every chunk and
//! the whole file, and places the result atomically ([`place`]), keeping
//! what it replaces under `.shoal/versions/` and what lost a conflict as a
//! `sync-conflict` copy.
//!
//! The bytes live only in the synced files; the blob index in the store
//! says where each chunk is ([`crate::store::blobs`]).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use shoal_protocol::files::BlobKind;
use shoal_protocol::{DeviceId, Role, SpaceId};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use crate::config::{FolderSettings, DEFAULT_VERSIONS_DAYS, DEFAULT_VERSIONS_MIB};
use crate::engine::{self, IndexCommand};
use crate::error::{Error, Result};
pub use crate::events::FolderState;
pub use crate::metrics::FolderCounters;
use crate::store::Blobs;
use crate::Event;

pub mod fetch;
pub mod guard;
pub mod history;
pub mod links;
pub mod place;
pub mod scan;
pub mod versions;
pub mod worker;

/// Files at least this large are made durable on their own (fsync of the
/// file and its folder); smaller ones share a group commit.
pub(crate) const OWN_SYNC_BYTES: u64 = 4 << 20;

/// Chunk requests in flight across all transfers of the node (at most
/// 512 KiB each): bounds transfer memory.
pub(crate) const MAX_INFLIGHT_CHUNKS: usize = 64;

/// What one folder is doing, for `shoal status`.
#[derive(Debug, Clone, Serialize, Default, utoipa::ToSchema)]
pub struct FolderStatus {
    /// Space id.
    pub space: String,
    /// The folder.
    pub path: String,
    /// What the folder is doing.
    pub state: FolderState,
    /// Why it is paused, or what it is doing.
    pub detail: Option<String>,
    /// Percent done: files in place of those in place or waiting (one
    /// decimal; 100 when nothing waits).
    pub progress: f64,
    /// Files waiting to be reconciled or transferred.
    pub files_left: u64,
    /// Files the index lists that no connected member could serve at the
    /// last try (not in `files_left`; retried, and named in `problems`).
    pub unavailable: u64,
    /// Bytes still to fetch or copy.
    pub bytes_left: u64,
    /// Bytes per second, averaged over the last 10 seconds.
    pub rate: u64,
    /// Seconds to go at that rate.
    pub eta_secs: Option<u64>,
    /// Admitted peers connected now.
    pub peers: usize,
    /// Files in the folder as the index sees it (last scan).
    pub files: u64,
    /// Problems (unreadable files, refused names), newest last.
    pub problems: Vec<String>,
    /// Remote deletions and overwrites held by the mass-delete guard (in
    /// `files_left`); `shoal folder accept` applies them.
    pub held: u64,
}

/// One path of a synced tree.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FileInfo {
    /// Normalised path.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// The device that wrote this version.
    pub device: String,
    /// Content hash (hex), for files.
    pub hash: Option<String>,
    /// A symbolic link's target.
    pub target: Option<String>,
    /// Versions written concurrently that are still unresolved (the winner
    /// is shown; every device picks the same one).
    pub versions: usize,
}

/// A conflict copy.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConflictInfo {
    /// The copy's path.
    pub copy: String,
    /// The path both versions were written to.
    pub original: String,
    /// Short id of the device whose version lost.
    pub device: String,
    /// When that version was written (UTC, `YYYYMMDD-HHMMSS`).
    pub when: String,
    /// Its size.
    pub size: u64,
}

/// Live (not deleted) paths of an index listing, each with its winner.
pub(crate) fn file_infos(list: Vec<(String, engine::Values)>) -> Vec<FileInfo> {
    use shoal_protocol::files::{winner, Entry, Kind};
    list.into_iter()
        .filter_map(|(path, values)| {
            let all: Vec<Entry> = values
                .iter()
                .filter_map(|v| Entry::decode(v).ok())
                .collect();
            let w = winner(&all)?;
            if w.deleted {
                return None;
            }
            Some(FileInfo {
                kind: match w.kind {
                    Kind::File => "file",
                    Kind::Dir => "dir",
                    Kind::Symlink => "symlink",
                },
                size: w.size,
                mtime: w.mtime_ns / 1_000_000_000,
                device: w.device.to_string(),
                hash: (w.kind == Kind::File).then(|| hex::encode(w.hash)),
                target: w.target.clone(),
                versions: all.len(),
                path,
            })
        })
        .collect()
}

/// The conflict copies among `files`.
pub(crate) fn conflicts_of(files: &[FileInfo]) -> Vec<ConflictInfo> {
    files
        .iter()
        .filter_map(|f| {
            let (original, device, when) = place::parse_conflict(&f.path)?;
            Some(ConflictInfo {
                copy: f.path.clone(),
                original,
                device,
                when,
                size: f.size,
            })
        })
        .collect()
}

/// Group commit for folder writes: every caller's writes are durable when
/// `durable` returns, and callers that arrive while a sync runs share the
/// next one. One `syncfs` covers many files (and the renames that placed
/// them), instead of an fsync per file and per folder.
#[derive(Default)]
pub(crate) struct SyncGate {
    requested: AtomicU64,
    done: AtomicU64,
    lock: tokio::sync::Mutex<()>,
}

impl SyncGate {
    /// Returns once everything written before the call is on disk.
    pub(crate) async fn durable(&self, root: &Path) -> std::io::Result<()> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        loop {
            if self.done.load(Ordering::SeqCst) >= ticket {
                return Ok(());
            }
            let _leader = self.lock.lock().await;
            if self.done.load(Ordering::SeqCst) >= ticket {
                return Ok(());
            }
            // Every ticket issued so far had its writes done before asking.
            let upto = self.requested.load(Ordering::SeqCst);
            let dir = root.to_path_buf();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let f = std::fs::File::open(&dir)?;
                rustix::fs::syncfs(&f).map_err(std::io::Error::from)
            })
            .await
            .map_err(std::io::Error::other)??;
            self.done.fetch_max(upto, Ordering::SeqCst);
        }
    }
}

/// State every folder worker and the blob server share.
pub struct Shared {
    pub(crate) blobs: Blobs,
    pub(crate) engine: engine::Client,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) settings: FolderSettings,
    pub(crate) counters: Arc<FolderCounters>,
    pub(crate) links: Arc<links::Links>,
    pub(crate) me: DeviceId,
    /// Chunk requests in flight, node-wide.
    pub(crate) inflight: Arc<tokio::sync::Semaphore>,
    roots: RwLock<HashMap<SpaceId, PathBuf>>,
    /// Moves on every change to any space's members (the engine bumps
    /// it): cached blob admissions older than its value are asked again.
    pub(crate) members_generation: Arc<std::sync::atomic::AtomicU64>,
    /// Jobs that hold the store and may outlive the task that started
    /// them: blocking jobs (scans, transfers' resumes and local copies,
    /// retention, the reads answering peers' blob streams), which a stopped
    /// task cannot cancel, and the blob server's stream tasks, which an
    /// abort drops only a little later. Shutdown waits for them, so a
    /// restart on the same home finds the store closed.
    pub(crate) blocking: tokio_util::task::TaskTracker,
}

impl Shared {
    pub(crate) fn emit(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    fn root(&self, space: &SpaceId) -> Option<PathBuf> {
        self.roots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(space)
            .cloned()
    }

    /// Reads a blob to serve: a manifest from the store, or a chunk from a
    /// file that holds it, re-verified. A location that no longer holds its
    /// chunk is dropped. `open` keeps files open across a stream's requests.
    fn read_blob(
        &self,
        space: &SpaceId,
        kind: BlobKind,
        hash: &[u8; 32],
        open: &mut OpenFiles,
    ) -> Option<Vec<u8>> {
        match kind {
            BlobKind::Manifest => self.blobs.manifest_bytes(space, hash).ok().flatten(),
            BlobKind::Chunk => self.read_chunk_with(Some(space), hash, open),
        }
    }

    /// A verified copy of chunk `hash` from any local file (of `space` when
    /// given); `open` keeps files open across calls.
    pub(crate) fn read_chunk_with(
        &self,
        space: Option<&SpaceId>,
        hash: &[u8; 32],
        open: &mut OpenFiles,
    ) -> Option<Vec<u8>> {
        for loc in self.blobs.locations(hash).ok()? {
            let Ok(Some(rec)) = self.blobs.file(loc.fid) else {
                continue;
            };
            if space.is_some_and(|s| *s != rec.space) {
                continue;
            }
            let Some(root) = self.root(&rec.space) else {
                continue;
            };
            let path = root.join(&rec.rel);
            let mut buf = vec![0u8; loc.len as usize];
            let mut read = |open: &mut OpenFiles| {
                open.get(loc.fid, &path)
                    .and_then(|f| f.read_exact_at(&mut buf, loc.offset))
                    .is_ok()
                    && blake3::hash(&buf).as_bytes() == hash
            };
            // A file kept open from an earlier request may be an inode that
            // was since replaced at its path (a save by rename keeps the
            // path's file id): only what the path holds now decides.
            let cached = open.files.contains_key(&loc.fid);
            let mut ok = read(open);
            if !ok && cached {
                open.forget(loc.fid);
                ok = read(open);
            }
            if ok {
                return Some(buf);
            }
            open.forget(loc.fid);
            let _ = self.blobs.drop_location(hash, loc.fid);
        }
        None
    }
}

impl Shared {
    /// Copies chunk `hash` (`len` bytes) from a local file that indexes it
    /// into `out` at `at`, in the kernel and unverified: the caller verifies
    /// the whole file afterwards. False when no local file has it.
    pub(crate) fn copy_chunk(
        &self,
        hash: &[u8; 32],
        len: u32,
        out: &std::fs::File,
        at: u64,
        open: &mut OpenFiles,
    ) -> bool {
        let Ok(locs) = self.blobs.locations(hash) else {
            return false;
        };
        for loc in locs.into_iter().filter(|l| l.len == len) {
            let path = match open.paths.get(&loc.fid) {
                Some(p) => p.clone(),
                None => {
                    let p = match self.blobs.file(loc.fid) {
                        Ok(Some(rec)) => self.root(&rec.space).map(|r| r.join(&rec.rel)),
                        _ => None,
                    };
                    open.paths.insert(loc.fid, p.clone());
                    p
                }
            };
            let Some(path) = path else {
                continue;
            };
            let Ok(src) = open.get(loc.fid, &path) else {
                continue;
            };
            let (mut from, mut to, mut left) = (loc.offset, at, len as usize);
            let mut ok = true;
            while left > 0 {
                match rustix::fs::copy_file_range(src, Some(&mut from), out, Some(&mut to), left) {
                    Ok(0) | Err(_) => {
                        ok = false;
                        break;
                    }
                    Ok(n) => left -= n,
                }
            }
            if ok {
                return true;
            }
        }
        false
    }
}

/// Files kept open while one peer streams chunks of them.
#[derive(Default)]
pub(crate) struct OpenFiles {
    files: HashMap<u64, std::fs::File>,
    /// Where each file id is (looked up once per batch of reads).
    paths: HashMap<u64, Option<PathBuf>>,
}

impl OpenFiles {
    const MAX: usize = 16;

    fn get(&mut self, fid: u64, path: &Path) -> std::io::Result<&std::fs::File> {
        if !self.files.contains_key(&fid) {
            if self.files.len() >= Self::MAX {
                self.files.clear();
            }
            self.files.insert(fid, std::fs::File::open(path)?);
        }
        self.files
            .get(&fid)
            .ok_or_else(|| std::io::Error::other("file cache"))
    }

    fn forget(&mut self, fid: u64) {
        self.files.remove(&fid);
    }
}

struct Running {
    worker: Arc<worker::Worker>,
    task: JoinHandle<()>,
}

/// The node's folders: starts a worker per space with a folder.
pub struct Folders {
    /// Taken at shutdown, so the store closes even while handles live.
    shared: Mutex<Option<Arc<Shared>>>,
    running: Mutex<HashMap<SpaceId, Running>>,
    server: std::sync::Mutex<Option<JoinHandle<()>>>,
    supervisor: crate::supervise::Supervisor,
}

impl std::fmt::Debug for Folders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Folders").finish_non_exhaustive()
    }
}

/// What the folders take from the rest of the node.
pub(crate) struct Parts {
    pub(crate) blobs: Blobs,
    pub(crate) engine: engine::Client,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) settings: FolderSettings,
    pub(crate) control: libp2p_stream::Control,
    pub(crate) me: DeviceId,
    pub(crate) counters: Arc<FolderCounters>,
    /// The engine's counter of members changes.
    pub(crate) members_generation: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) supervisor: crate::supervise::Supervisor,
}

impl Folders {
    /// Starts the blob server and a worker for every folder already attached.
    pub(crate) fn start(parts: Parts) -> Result<Self> {
        let Parts {
            blobs,
            engine,
            events,
            settings,
            control,
            me,
            counters,
            members_generation,
            supervisor,
        } = parts;
        let shared = Arc::new(Shared {
            blobs,
            engine,
            events,
            settings,
            links: Arc::new(links::Links::new(control.clone(), counters.traffic.clone())),
            counters,
            me,
            inflight: Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT_CHUNKS)),
            roots: RwLock::default(),
            members_generation,
            blocking: tokio_util::task::TaskTracker::new(),
        });
        let server = supervisor.spawn("blob-server", links::serve(Arc::clone(&shared), control));
        let existing = shared.blobs.folders()?;
        let folders = Self {
            shared: Mutex::new(Some(Arc::clone(&shared))),
            running: Mutex::new(HashMap::new()),
            server: std::sync::Mutex::new(Some(server)),
            supervisor,
        };
        for (space, root) in existing {
            folders.spawn(&shared, space, PathBuf::from(root));
        }
        Ok(folders)
    }

    fn shared(&self) -> Result<Arc<Shared>> {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Stopped)
    }

    fn spawn(&self, shared: &Arc<Shared>, space: SpaceId, root: PathBuf) {
        shared
            .roots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(space, root.clone());
        let w = Arc::new(worker::Worker::new(Arc::clone(shared), space, root));
        let task = self.supervisor.spawn(
            format!("folder-worker {}", space.short()),
            Arc::clone(&w).run(),
        );
        self.lock().insert(space, Running { worker: w, task });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpaceId, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives a space a folder (created if missing) and starts syncing it.
    pub(crate) async fn attach(&self, space: &str, path: &Path) -> Result<FolderStatus> {
        let shared = self.shared()?;
        let space = space.to_string();
        let (id, role) = shared
            .engine
            .index(|reply| IndexCommand::Resolve { space, reply })
            .await?;
        if self.lock().contains_key(&id) {
            return Err(Error::BadRequest(
                "this space already has a folder on this device".into(),
            ));
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io("create folder", path, e))?;
        let root = path
            .canonicalize()
            .map_err(|e| Error::io("resolve folder", path, e))?;
        let root_s = root
            .to_str()
            .ok_or_else(|| Error::BadRequest("the folder's path is not UTF-8".into()))?;
        for (other, r) in shared.blobs.folders()? {
            let r = Path::new(&r);
            if r.starts_with(&root) || root.starts_with(r) {
                return Err(Error::BadRequest(format!(
                    "{} overlaps the folder of space {} ({})",
                    root.display(),
                    other.short(),
                    r.display()
                )));
            }
        }
        if role == Some(Role::Viewer) {
            info!(space = %id.short(), "viewer: the folder receives changes only");
        }
        shared.blobs.set_folder(&id, root_s)?;
        shared.blobs.flush().await?;
        info!(space = %id.short(), folder = %root.display(), "folder attached");
        self.spawn(&shared, id, root);
        Ok(self.status_of(&id).unwrap_or_default())
    }

    pub(crate) fn put_manifest(
        &self,
        space: &SpaceId,
        m: &shoal_protocol::files::Manifest,
    ) -> Result<()> {
        self.shared()?.blobs.put_manifest(space, m).map(|_| ())
    }

    fn status_of(&self, id: &SpaceId) -> Option<FolderStatus> {
        self.lock().get(id).map(|r| r.worker.status())
    }

    /// Status of every folder.
    pub(crate) async fn status(&self) -> Vec<FolderStatus> {
        let workers: Vec<Arc<worker::Worker>> = self
            .lock()
            .values()
            .map(|r| Arc::clone(&r.worker))
            .collect();
        let mut out = Vec::new();
        for w in workers {
            let peers = w
                .shared
                .engine
                .peers(w.space)
                .await
                .map(|p| p.len())
                .unwrap_or(0);
            let mut s = w.status();
            s.peers = peers;
            if s.state == FolderState::Syncing && peers == 0 {
                s.state = FolderState::WaitingForPeers;
            }
            out.push(s);
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Folder counters (zero once stopped).
    pub fn counters(&self) -> Arc<FolderCounters> {
        self.shared()
            .map(|s| Arc::clone(&s.counters))
            .unwrap_or_default()
    }

    /// Fetches one chunk of `space` from `peer` over this node's blob
    /// streams (the ones its workers use). Tests only.
    pub(crate) async fn fetch_chunk(
        &self,
        peer: libp2p::PeerId,
        space: SpaceId,
        hash: [u8; 32],
    ) -> std::result::Result<Vec<u8>, links::FetchError> {
        let shared = self
            .shared()
            .map_err(|e| links::FetchError::Link(e.to_string()))?;
        shared
            .links
            .get(peer, space, shoal_protocol::files::BlobKind::Chunk, hash)
            .await
    }

    /// The worker of a space's folder on this device.
    fn worker(&self, id: &SpaceId) -> Result<Arc<worker::Worker>> {
        self.lock()
            .get(id)
            .map(|r| Arc::clone(&r.worker))
            .ok_or_else(|| {
                Error::BadRequest(
                    "this space has no folder on this device (`shoal folder add` first)".into(),
                )
            })
    }

    /// Applies the changes the mass-delete guard holds in a space's
    /// folder; returns how many.
    pub(crate) fn accept(&self, id: &SpaceId) -> Result<usize> {
        Ok(self.worker(id)?.accept_held())
    }

    /// Stops every worker and the blob server.
    pub(crate) async fn shutdown(&self) {
        let running: Vec<Running> = self.lock().drain().map(|(_, r)| r).collect();
        for mut r in running {
            r.worker.stop();
            if tokio::time::timeout(Duration::from_secs(5), &mut r.task)
                .await
                .is_err()
            {
                // Aborted, so it starts no job after the wait below began.
                r.task.abort();
                let _ = (&mut r.task).await;
                warn!("folder worker did not stop in time");
            }
        }
        // The server holds the store too: wait until its task is gone, so
        // a restart on the same home can open it.
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(s) = shared {
            // Blocking jobs of stopped tasks end on their own (reads for
            // the stopped server after their current blob, their stream
            // being gone).
            s.blocking.close();
            if tokio::time::timeout(Duration::from_secs(10), s.blocking.wait())
                .await
                .is_err()
            {
                warn!("blocking folder jobs did not end in time");
            }
            let _ = s.blobs.flush().await;
        }
    }
}

impl Drop for Folders {
    fn drop(&mut self) {
        if let Some(s) = self
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            s.abort();
        }
        for (_, r) in self.lock().drain() {
            r.task.abort();
        }
    }
}
