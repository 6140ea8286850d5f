//! Blob exchange over raw libp2p streams (`/shoal/blob/1`).
//!
//! A fetching node keeps [`LINKS_PER_PEER`] streams per peer, used in turn,
//! and pipelines requests on each: a writer task sends request frames as
//! callers ask, a reader task reads the answers in order and hands each to
//! its caller. A serving node answers each stream's requests in order,
//! reading and re-verifying every chunk from the synced file it lives in.
//!
//! Frames: a request is `u16 length | postcard BlobRequest`; an answer is
//! `u16 length | postcard BlobResponse`, followed by the bytes when found.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use shoal_protocol::files::{
    max_blob_len, BlobKind, BlobRequest, BlobResponse, BLOB_PROTOCOL, MAX_BLOB_REQUEST,
};
use shoal_protocol::{wire, SpaceId};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::Shared;
use crate::metrics::{Metered, Traffic};

/// Requests queued on one peer's stream before callers wait.
const LINK_QUEUE: usize = 64;

/// Streams opened to each peer, used in turn: a peer's server reads and
/// verifies one chunk at a time per stream, so two keep it busy while
/// an answer is on its way (the 1 GiB transfer took 7% less time).
const LINKS_PER_PEER: usize = 2;

/// Longest wait for one chunk (queueing on the stream included).
const CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest wait for a manifest (up to 64 MiB).
const MANIFEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// A peer's admission to a space is asked again after this long, or
/// sooner when the members of any space change.
const ADMISSION_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// Answers prepared ahead of the one being written, per served stream.
const SERVE_AHEAD: usize = 4;

/// Why a blob could not be had from a peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The peer does not have it.
    #[error("peer does not have it")]
    Missing,
    /// The peer does not admit us to the space.
    #[error("peer refused: not admitted to the space")]
    Refused,
    /// The stream failed or the peer broke the protocol.
    #[error("stream: {0}")]
    Link(String),
}

struct Req {
    space: SpaceId,
    kind: BlobKind,
    hash: [u8; 32],
    reply: oneshot::Sender<Result<Vec<u8>, FetchError>>,
}

/// Open links by peer and slot, with the generation that opened each.
type LinkMap = HashMap<(PeerId, usize), (u64, mpsc::Sender<Req>)>;

type Waiter = (BlobKind, oneshot::Sender<Result<Vec<u8>, FetchError>>);

/// [`LINKS_PER_PEER`] pipelined streams per peer, each opened on first use.
pub struct Links {
    control: Mutex<libp2p_stream::Control>,
    map: Mutex<LinkMap>,
    next: std::sync::atomic::AtomicU64,
    /// Round-robin over a peer's links.
    turn: std::sync::atomic::AtomicUsize,
    traffic: Traffic,
}

impl Links {
    /// Links opened through `control`, their bytes counted into `traffic`.
    pub fn new(control: libp2p_stream::Control, traffic: Traffic) -> Self {
        Self {
            control: Mutex::new(control),
            map: Mutex::new(HashMap::new()),
            next: Default::default(),
            turn: Default::default(),
            traffic,
        }
    }

    /// Fetches one blob from `peer`.
    pub async fn get(
        self: &Arc<Self>,
        peer: PeerId,
        space: SpaceId,
        kind: BlobKind,
        hash: [u8; 32],
    ) -> Result<Vec<u8>, FetchError> {
        let limit = match kind {
            BlobKind::Chunk => CHUNK_TIMEOUT,
            BlobKind::Manifest => MANIFEST_TIMEOUT,
        };
        let slot = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % LINKS_PER_PEER;
        let key = (peer, slot);
        let ask = async {
            let tx = self.link(key).await?;
            let (reply, rx) = oneshot::channel();
            tx.send(Req {
                space,
                kind,
                hash,
                reply,
            })
            .await
            .map_err(|_| FetchError::Link("stream closed".into()))?;
            rx.await
                .map_err(|_| FetchError::Link("stream closed".into()))?
        };
        match tokio::time::timeout(limit, ask).await {
            Ok(r) => r,
            Err(_) => {
                // A peer that stops answering loses its stream: the next
                // request opens a new one, and this one's tasks end.
                self.lock_map().remove(&key);
                Err(FetchError::Link(format!(
                    "no answer within {} s",
                    limit.as_secs()
                )))
            }
        }
    }

    async fn link(self: &Arc<Self>, key: (PeerId, usize)) -> Result<mpsc::Sender<Req>, FetchError> {
        let peer = key.0;
        if let Some((_, tx)) = self.lock_map().get(&key) {
            if !tx.is_closed() {
                return Ok(tx.clone());
            }
        }
        let mut control = self
            .control
            .lock()
            .map_err(|_| FetchError::Link("poisoned".into()))?
            .clone();
        let stream = control
            .open_stream(peer, StreamProtocol::new(BLOB_PROTOCOL))
            .await
            .map_err(|e| FetchError::Link(e.to_string()))?;
        let gen = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let mut map = self.lock_map();
        // Another caller may have opened one meanwhile: use theirs.
        if let Some((_, t)) = map.get(&key) {
            if !t.is_closed() {
                return Ok(t.clone());
            }
        }
        map.insert(key, (gen, tx.clone()));
        drop(map);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            run_link(me.traffic.meter(BLOB_PROTOCOL, stream), rx).await;
            let mut map = me.lock_map();
            if map.get(&key).is_some_and(|(g, _)| *g == gen) {
                map.remove(&key);
            }
        });
        Ok(tx)
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, LinkMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn run_link(stream: Metered<Stream>, mut rx: mpsc::Receiver<Req>) {
    let (mut r, mut w) = stream.split();
    let (wait_tx, mut wait_rx) = mpsc::unbounded_channel::<Waiter>();
    let reader = async move {
        while let Some((kind, reply)) = wait_rx.recv().await {
            let answer = read_answer(&mut r, kind).await;
            let broken = matches!(answer, Err(FetchError::Link(_)));
            let _ = reply.send(answer);
            if broken {
                // Fail everyone still waiting on this stream.
                while let Ok((_, reply)) = wait_rx.try_recv() {
                    let _ = reply.send(Err(FetchError::Link("stream broke".into())));
                }
                return;
            }
        }
    };
    let writer = async move {
        while let Some(req) = rx.recv().await {
            let frame = wire::encode(&BlobRequest::V1 {
                space: req.space,
                kind: req.kind,
                hash: req.hash,
            });
            let mut buf = (frame.len() as u16).to_be_bytes().to_vec();
            buf.extend(frame);
            if let Err(e) = w.write_all(&buf).await {
                let _ = req.reply.send(Err(FetchError::Link(e.to_string())));
                break;
            }
            if wait_tx.send((req.kind, req.reply)).is_err() {
                break;
            }
            if rx.is_empty() {
                if let Err(e) = w.flush().await {
                    debug!(error = %e, "blob stream flush failed");
                    break;
                }
            }
        }
        let _ = w.close().await;
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

async fn read_answer(
    r: &mut (impl futures::AsyncRead + Unpin),
    kind: BlobKind,
) -> Result<Vec<u8>, FetchError> {
    let link = |e: std::io::Error| FetchError::Link(e.to_string());
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.map_err(link)?;
    let mut head = vec![0u8; u16::from_be_bytes(len) as usize];
    r.read_exact(&mut head).await.map_err(link)?;
    let resp: BlobResponse = wire::decode("blob response", &head, MAX_BLOB_REQUEST)
        .map_err(|e| FetchError::Link(e.to_string()))?;
    match resp {
        BlobResponse::Found { len } => {
            if len as usize > max_blob_len(kind) {
                return Err(FetchError::Link(format!(
                    "answer of {len} bytes is too large"
                )));
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data).await.map_err(link)?;
            Ok(data)
        }
        BlobResponse::Missing => Err(FetchError::Missing),
        BlobResponse::Refused => Err(FetchError::Refused),
    }
}

/// Accepts blob streams and serves them until the node stops.
pub async fn serve(shared: Arc<Shared>, mut control: libp2p_stream::Control) {
    let mut incoming = match control.accept(StreamProtocol::new(BLOB_PROTOCOL)) {
        Ok(i) => i,
        Err(e) => {
            warn!(error = %e, "cannot serve blobs");
            return;
        }
    };
    // Stream tasks live in this set: stopping the server stops them all.
    let mut tasks = tokio::task::JoinSet::new();
    // Streams open per peer: a peer opens LINKS_PER_PEER (and more after
    // a timeout), so more than a few is a peer trying to tie us up.
    let open: Arc<std::sync::Mutex<HashMap<PeerId, usize>>> = Arc::default();
    loop {
        tokio::select! {
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                let Some(slot) = StreamSlot::take(&open, peer) else {
                    debug!(%peer, "refused a blob stream: too many open");
                    drop(stream);
                    continue;
                };
                let sh = Arc::clone(&shared);
                // Tracked until dropped: aborting the server drops these
                // tasks a little later, on the runtime's threads, and
                // shutdown waits for that (they hold the store).
                tasks.spawn(shared.blocking.track_future(async move {
                    let _slot = slot;
                    if let Err(e) = serve_stream(sh, peer, stream).await {
                        debug!(%peer, error = %e, "blob stream ended");
                    }
                }));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// One of a peer's [`MAX_STREAMS_PER_PEER`] stream slots, given back when
/// dropped (also when the stream's task panics).
struct StreamSlot {
    open: Arc<std::sync::Mutex<HashMap<PeerId, usize>>>,
    peer: PeerId,
}

impl StreamSlot {
    fn take(open: &Arc<std::sync::Mutex<HashMap<PeerId, usize>>>, peer: PeerId) -> Option<Self> {
        let mut m = open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(peer).or_default();
        if *n >= MAX_STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self {
            open: Arc::clone(open),
            peer,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// Blob streams served to one peer at once.
const MAX_STREAMS_PER_PEER: usize = 4;

/// What a served stream's reads are asked for, in request order.
enum Job {
    Read {
        space: SpaceId,
        kind: BlobKind,
        hash: [u8; 32],
    },
    Refused,
}

/// An answer head and, when found, the bytes.
type Answer = (BlobResponse, Option<Vec<u8>>);

/// A served stream's reading side, handed from one blocking job to the
/// next: the queue of jobs and the files kept open across them.
struct Reads {
    jobs: mpsc::Receiver<Job>,
    open: super::OpenFiles,
}

/// Requests read ahead of the one being served, per served stream.
const SERVE_QUEUE: usize = 16;

async fn serve_stream(shared: Arc<Shared>, peer: PeerId, stream: Stream) -> std::io::Result<()> {
    let (mut r, mut w) = shared.counters.traffic.meter(BLOB_PROTOCOL, stream).split();
    let (tx, mut rx) = mpsc::channel::<Answer>(SERVE_AHEAD);
    let (jobs_tx, jobs) = mpsc::channel::<Job>(SERVE_QUEUE);
    // One blocking job at a time drains the queue, so answers keep the
    // requests' order; a new one starts only when the last found it
    // empty, not once per chunk.
    let reads = Arc::new(Mutex::new(Reads {
        jobs,
        open: super::OpenFiles::default(),
    }));
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = async move {
        // Only admissions are remembered, briefly, and only until the
        // members of any space change: a device removed from the space is
        // refused on an open stream from its next request on.
        let mut allowed: HashMap<SpaceId, (std::time::Instant, u64)> = HashMap::new();
        loop {
            let mut len = [0u8; 2];
            if r.read_exact(&mut len).await.is_err() {
                return;
            }
            let n = u16::from_be_bytes(len) as usize;
            if n > MAX_BLOB_REQUEST {
                return;
            }
            let mut buf = vec![0u8; n];
            if r.read_exact(&mut buf).await.is_err() {
                return;
            }
            let Ok(BlobRequest::V1 { space, kind, hash }) =
                wire::decode::<BlobRequest>("blob request", &buf, MAX_BLOB_REQUEST)
            else {
                return;
            };
            // Read before asking: a change while the engine answers leaves
            // the admission cached under the old value, asked again next.
            let members = shared
                .members_generation
                .load(std::sync::atomic::Ordering::Acquire);
            let ok = match allowed.get(&space) {
                Some((at, gen)) if *gen == members && at.elapsed() < ADMISSION_TTL => true,
                _ => {
                    let ok = shared.engine.admitted(peer, space).await;
                    if ok {
                        allowed.insert(space, (std::time::Instant::now(), members));
                    } else {
                        allowed.remove(&space);
                    }
                    ok
                }
            };
            let job = if ok {
                Job::Read { space, kind, hash }
            } else {
                Job::Refused
            };
            if jobs_tx.send(job).await.is_err() {
                return;
            }
            if !draining.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let (s, reads, tx, d) = (
                    Arc::clone(&shared),
                    Arc::clone(&reads),
                    tx.clone(),
                    Arc::clone(&draining),
                );
                shared
                    .blocking
                    .spawn_blocking(move || drain(&s, &reads, &tx, &d));
            }
        }
    };
    let writer = async move {
        while let Some((head, data)) = rx.recv().await {
            let h = wire::encode(&head);
            let mut buf = (h.len() as u16).to_be_bytes().to_vec();
            buf.extend(h);
            w.write_all(&buf).await?;
            if let Some(d) = data {
                w.write_all(&d).await?;
            }
            if rx.is_empty() {
                w.flush().await?;
            }
        }
        w.close().await
    };
    let (_, res) = tokio::join!(reader, writer);
    res
}

/// Answers the queued jobs in order until the queue is empty (or the
/// stream is gone), reading and re-verifying each blob from its file.
fn drain(
    shared: &Shared,
    reads: &Mutex<Reads>,
    tx: &mpsc::Sender<Answer>,
    draining: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let mut reads = reads.lock().unwrap_or_else(|p| p.into_inner());
    let Reads { jobs, open } = &mut *reads;
    loop {
        while let Ok(job) = jobs.try_recv() {
            let answer = match job {
                Job::Refused => (BlobResponse::Refused, None),
                Job::Read { space, kind, hash } => {
                    // A read that panics answers "missing", as a failed
                    // task did before: the queue behind it keeps its order.
                    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if !shared.settings.serve_delay.is_zero() {
                            std::thread::sleep(shared.settings.serve_delay);
                        }
                        shared.read_blob(&space, kind, &hash, open)
                    }));
                    match read.ok().flatten() {
                        Some(mut data) => {
                            if shared.settings.serve_corrupt_chunks && kind == BlobKind::Chunk {
                                if let Some(b) = data.first_mut() {
                                    *b ^= 0xff;
                                }
                            }
                            shared.counters.add_served(data.len());
                            let len = data.len() as u32;
                            (BlobResponse::Found { len }, Some(data))
                        }
                        None => (BlobResponse::Missing, None),
                    }
                }
            };
            if tx.blocking_send(answer).is_err() {
                return;
            }
        }
        draining.store(false, Ordering::Release);
        // A job queued after the queue looked empty but before the flag
        // fell found the flag up and started no job: take it here.
        if jobs.is_empty() || draining.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}
