//! Assembling one file version in a temp file inside the folder.
//!
//! Chunks already written (recorded in the store, or found intact in the
//! temp file after a crash) are kept; chunks this node has in any other
//! file are copied locally; the rest are fetched from every admitted peer
//! at once, round-robin, with a window of requests in flight. Each chunk is
//! verified before it is written, and the whole file before it is placed.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::PeerId;
use shoal_protocol::files::{BlobKind, Entry, Manifest, CHUNK_MAX};

use super::links::FetchError;
use super::place;
use super::worker::Worker;
use crate::Event;

/// Why a transfer stopped short.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// No admitted peer is connected.
    #[error("no peer that has it is connected")]
    NoPeers,
    /// The disk (or quota) is full: the transfer waits.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// Peers are connected but none could serve the version (it may be
    /// gone from every device: a conflict copy of content its writer
    /// replaced at once). Retried, and counted apart in the status.
    #[error("no connected member has this version: {0}")]
    Unavailable(String),
    /// Anything else; retried later.
    #[error("{0}")]
    Failed(String),
}

/// Encoded bytes of one chunk in a manifest (hash, length, framing).
const MANIFEST_BYTES_PER_CHUNK: u64 = 40;

/// Bytes written to a temp file between background flushes.
const FLUSH_EVERY: u64 = 64 << 20;

/// Files from this size on are read back and hashed while they arrive.
const VERIFY_AHEAD_BYTES: u64 = 16 << 20;

/// The whole-file check of a large transfer, run while its chunks arrive:
/// a thread reads back the temp file's written prefix as it grows and
/// hashes it, so that once the last chunk is in, only what came last is
/// left to read. It is the same check as reading the file back at the
/// end (every byte hashed is read from the file), earlier.
struct Verifier {
    tx: std::sync::mpsc::Sender<u64>,
    thread: std::thread::JoinHandle<std::io::Result<[u8; 32]>>,
}

impl Verifier {
    fn start(file: &File) -> std::io::Result<Self> {
        let f = file.try_clone()?;
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let thread = std::thread::Builder::new()
            .name("shoal-verify".into())
            .spawn(move || {
                let mut hasher = blake3::Hasher::new();
                let mut done = 0u64;
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(mut end) = rx.recv() {
                    // Only the longest prefix told matters.
                    while let Ok(e) = rx.try_recv() {
                        end = end.max(e);
                    }
                    while done < end {
                        let want =
                            usize::try_from(end - done).map_or(buf.len(), |w| w.min(buf.len()));
                        let n = f.read_at(&mut buf[..want], done)?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        hasher.update(&buf[..n]);
                        done += n as u64;
                    }
                }
                Ok(*hasher.finalize().as_bytes())
            })?;
        Ok(Self { tx, thread })
    }

    /// The first `end` bytes are written.
    fn advance(&self, end: u64) {
        let _ = self.tx.send(end);
    }

    /// Hashes the rest up to `size` and returns the file's BLAKE3.
    fn finish(self, size: u64) -> std::io::Result<[u8; 32]> {
        let _ = self.tx.send(size);
        drop(self.tx);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the verifier panicked")))
    }
}

/// The temp file a transfer assembles, and its whole-file check when that
/// runs ahead.
struct Assembly {
    file: File,
    verifier: Option<Verifier>,
}

/// The end of the written prefix: the offset of the first chunk not yet
/// in the file (from `from` on), or `size`.
fn written_prefix(
    bits: &[u8],
    chunks: &[([u8; 32], u64, u32)],
    from: &mut usize,
    size: u64,
) -> u64 {
    while *from < chunks.len() && bits[*from / 8] & (1 << (*from % 8)) != 0 {
        *from += 1;
    }
    chunks.get(*from).map_or(size, |c| c.1)
}

/// Space a transfer leaves free on the folder's file system: 1% of it,
/// at most this much.
const KEEP_FREE_MAX: u64 = 256 << 20;

/// Refuses a transfer that would leave the file system at `path` with
/// less than its margin free (a peer can name any size; a manifest that
/// repeats one chunk a million times names a terabyte). Checked before
/// anything is written, and said in the status: how much is needed.
fn room_for(path: &std::path::Path, need: u64) -> Result<(), TransferError> {
    let dir = path.parent().unwrap_or(path);
    let st = rustix::fs::statvfs(dir)
        .map_err(|e| TransferError::Failed(format!("free space of {}: {e}", dir.display())))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let keep = (total / 100).min(KEEP_FREE_MAX);
    if need.saturating_add(keep) > free {
        return Err(TransferError::DiskFull(format!(
            "this file needs {} MB and {} MB are free ({} MB are kept free)",
            need.div_ceil(1 << 20),
            free >> 20,
            keep >> 20
        )));
    }
    Ok(())
}

fn io_err(what: &str, e: std::io::Error) -> TransferError {
    if matches!(e.raw_os_error(), Some(28) | Some(122)) {
        TransferError::DiskFull(format!("{what}: {e}"))
    } else {
        TransferError::Failed(format!("{what}: {e}"))
    }
}

/// A file version assembled and verified in its temp file.
pub struct Fetched {
    /// The temp file (inside `.shoal/tmp/`).
    pub temp: PathBuf,
    /// Its transfer record's name.
    pub part: String,
    /// (chunk hash, offset, length) of the content.
    pub chunks: Vec<([u8; 32], u64, u32)>,
}

impl Worker {
    /// The chunks of version `e`: from its manifest (fetched if needed) or,
    /// for a one-chunk file, the file itself.
    async fn chunks_of(
        &self,
        e: &Entry,
    ) -> Result<(Vec<([u8; 32], u64, u32)>, [u8; 32]), TransferError> {
        if !e.chunked {
            if e.size > u64::from(CHUNK_MAX) {
                return Err(TransferError::Failed(
                    "unchunked entry larger than a chunk".into(),
                ));
            }
            let chunks = if e.size == 0 {
                Vec::new()
            } else {
                vec![(e.hash, 0, e.size as u32)]
            };
            return Ok((chunks, e.hash));
        }
        let sh = &self.shared;
        let m = match sh.blobs.manifest(&self.space, &e.hash) {
            Ok(Some(m)) => m,
            _ => {
                let peers = self.peers().await?;
                // A manifest is held whole while it is fetched and decoded:
                // it takes its share of the node's transfer budget (in
                // chunk-sized permits), as large as the entry's size allows.
                let most = (e.size / u64::from(shoal_protocol::files::CHUNK_MIN) + 1)
                    .saturating_mul(MANIFEST_BYTES_PER_CHUNK)
                    .min(shoal_protocol::files::MAX_MANIFEST_BYTES as u64);
                let permits =
                    most.div_ceil(u64::from(CHUNK_MAX))
                        .clamp(1, super::MAX_INFLIGHT_CHUNKS as u64) as u32;
                let _budget = Arc::clone(&sh.inflight)
                    .acquire_many_owned(permits)
                    .await
                    .map_err(|_| TransferError::Failed("node stopping".into()))?;
                let mut got = None;
                for p in peers {
                    match sh
                        .links
                        .get(p, self.space, BlobKind::Manifest, e.hash)
                        .await
                    {
                        Ok(bytes) => match Manifest::decode(&bytes, &e.hash) {
                            Ok(m) => {
                                got = Some(m);
                                break;
                            }
                            Err(err) => self.note_bad_peer(p, &format!("bad manifest: {err}")),
                        },
                        Err(_) => continue,
                    }
                }
                let m = got.ok_or_else(|| {
                    TransferError::Unavailable("no connected peer could serve its manifest".into())
                })?;
                sh.blobs
                    .put_manifest(&self.space, &m)
                    .map_err(|e| TransferError::Failed(e.to_string()))?;
                m
            }
        };
        if m.size != e.size {
            return Err(TransferError::Failed(
                "manifest size differs from the entry".into(),
            ));
        }
        let offsets = m.offsets();
        let chunks = m
            .chunks
            .iter()
            .zip(offsets)
            .map(|((h, l), o)| (*h, o, *l))
            .collect();
        Ok((chunks, m.file_hash))
    }

    async fn peers(&self) -> Result<Vec<PeerId>, TransferError> {
        let peers = self
            .shared
            .engine
            .peers(self.space)
            .await
            .map_err(|e| TransferError::Failed(e.to_string()))?;
        if peers.is_empty() {
            return Err(TransferError::NoPeers);
        }
        Ok(peers)
    }

    fn note_bad_peer(&self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, space = %self.space.short(), why, "peer served bad data");
        self.shared.emit(Event::Rejected {
            peer: peer.to_owned(),
            reason: why.to_string(),
        });
    }

    /// Assembles version `e` of `rel` in a temp file, verified.
    pub(super) async fn fetch(&self, rel: &str, e: &Entry) -> Result<Fetched, TransferError> {
        let (chunks, file_hash) = self.chunks_of(e).await?;
        let part = format!(
            "{}-{}",
            hex::encode(&e.hash[..12]),
            hex::encode(&blake3::hash(rel.as_bytes()).as_bytes()[..6])
        );
        let temp = place::part_file(&self.root, &part);
        let size = e.size;
        let n = chunks.len();
        let t0 = std::time::Instant::now();

        // Resume and local copies, off the async threads.
        let (file, mut bits, need) = {
            let (sh, space, temp, part, chunks) = (
                Arc::clone(&self.shared),
                self.space,
                temp.clone(),
                part.clone(),
                chunks.clone(),
            );
            self.shared
                .blocking
                .spawn_blocking(move || -> Result<_, TransferError> {
                    if let Some(dir) = temp.parent() {
                        std::fs::create_dir_all(dir)
                            .map_err(|e| io_err("create temp folder", e))?;
                    }
                    let resumed = temp.exists();
                    // Only what is not yet allocated in the temp file is new.
                    let allocated = std::fs::metadata(&temp).map_or(0, |m| {
                        use std::os::unix::fs::MetadataExt;
                        m.blocks() * 512
                    });
                    room_for(&temp, size.saturating_sub(allocated))?;
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&temp)
                        .map_err(|e| io_err("open temp file", e))?;
                    let len = f.metadata().map_err(|e| io_err("stat temp file", e))?.len();
                    if len != size {
                        f.set_len(size).map_err(|e| io_err("size temp file", e))?;
                    }
                    // One-chunk files have nothing to resume: no record.
                    let track = n > 1;
                    let mut bits = if track {
                        sh.blobs.part(&space, &part).unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    bits.resize(n.div_ceil(8), 0);
                    let mut need = Vec::new();
                    let mut open = super::OpenFiles::default();
                    for (i, (h, off, l)) in chunks.iter().enumerate() {
                        if bits[i / 8] & (1 << (i % 8)) != 0 {
                            sh.counters.chunks_resumed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if resumed {
                            let mut buf = vec![0u8; *l as usize];
                            if f.read_exact_at(&mut buf, *off).is_ok()
                                && blake3::hash(&buf).as_bytes() == h
                            {
                                bits[i / 8] |= 1 << (i % 8);
                                sh.counters.chunks_resumed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                        // A fresh transfer copies local chunks in the kernel and
                        // relies on the whole-file check; a retry (after that
                        // check failed) reads and verifies each one.
                        if !resumed && sh.copy_chunk(h, *l, &f, *off, &mut open) {
                            bits[i / 8] |= 1 << (i % 8);
                            sh.counters.chunks_local.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if let Some(data) = sh.read_chunk_with(None, h, &mut open) {
                            f.write_all_at(&data, *off)
                                .map_err(|e| io_err("write temp file", e))?;
                            bits[i / 8] |= 1 << (i % 8);
                            sh.counters.chunks_local.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        need.push(i);
                    }
                    if track {
                        let _ = sh.blobs.set_part(&space, &part, &bits);
                    }
                    Ok((f, bits, need))
                })
                .await
                .map_err(|e| TransferError::Failed(e.to_string()))??
        };

        tracing::debug!(
            path = rel,
            chunks = n,
            need = need.len(),
            ms = t0.elapsed().as_millis() as u64,
            "transfer prepared"
        );
        let needed: u64 = need.iter().map(|i| u64::from(chunks[*i].2)).sum();
        let local_bytes = size.saturating_sub(needed);
        self.progress(rel, local_bytes);
        let ahead = if size >= VERIFY_AHEAD_BYTES {
            let v = Verifier::start(&file).map_err(|e| io_err("start the whole-file check", e))?;
            v.advance(written_prefix(&bits, &chunks, &mut 0, size));
            Some(v)
        } else {
            None
        };
        let asm = Assembly {
            file,
            verifier: ahead,
        };
        if !need.is_empty() {
            self.fetch_chunks(rel, &asm, &chunks, need, &mut bits, &part)
                .await?;
        }

        // Verified as a whole and, for a large file, made durable at the
        // same time (its own fsync; small files share one, below).
        let own_sync = size >= super::OWN_SYNC_BYTES;
        let chunk_list = chunks.clone();
        let (sh, space, t, p) = (
            Arc::clone(&self.shared),
            self.space,
            temp.clone(),
            part.clone(),
        );
        self.shared
            .blocking
            .spawn_blocking(move || -> Result<(), TransferError> {
                if chunk_list.len() > 1 {
                    let _ = sh.blobs.set_part(&space, &p, &bits);
                }
                // Streamed, so memory stays bounded whatever the size.
                let (whole, synced) = std::thread::scope(|s| {
                    let Assembly { file, verifier } = asm;
                    let sync = own_sync.then(|| s.spawn(move || file.sync_data()));
                    let whole = match verifier {
                        Some(v) => v.finish(size),
                        None => super::scan::hash_path(&t),
                    };
                    let synced = sync.map(|j| {
                        j.join()
                            .unwrap_or_else(|_| Err(std::io::Error::other("sync panicked")))
                    });
                    (whole, synced)
                });
                let whole = whole.map_err(|e| io_err("read temp file", e))?;
                if whole != file_hash {
                    // Find the chunks that are wrong (a stale local source) and
                    // forget only those; the retry reads and verifies them.
                    let f = File::open(&t).map_err(|e| io_err("read temp file", e))?;
                    let mut bits = bits;
                    for (i, (ch, off, l)) in chunk_list.iter().enumerate() {
                        let mut b = vec![0u8; *l as usize];
                        let good = f.read_exact_at(&mut b, *off).is_ok()
                            && blake3::hash(&b).as_bytes() == ch;
                        if !good {
                            bits[i / 8] &= !(1 << (i % 8));
                        }
                    }
                    let _ = sh.blobs.set_part(&space, &p, &bits);
                    return Err(TransferError::Failed(
                        "whole-file hash mismatch; retrying the chunks that differ".into(),
                    ));
                }
                if let Some(r) = synced {
                    r.map_err(|e| io_err("sync temp file", e))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| TransferError::Failed(e.to_string()))??;
        tracing::debug!(
            path = rel,
            ms = t0.elapsed().as_millis() as u64,
            "transfer fetched and verified"
        );
        if !own_sync {
            self.sync
                .durable(&self.root)
                .await
                .map_err(|e| io_err("sync temp file", e))?;
        }
        tracing::debug!(
            path = rel,
            ms = t0.elapsed().as_millis() as u64,
            "transfer durable"
        );
        Ok(Fetched { temp, part, chunks })
    }

    async fn fetch_chunks(
        &self,
        rel: &str,
        asm: &Assembly,
        chunks: &[([u8; 32], u64, u32)],
        need: Vec<usize>,
        bits: &mut [u8],
        part: &str,
    ) -> Result<(), TransferError> {
        let (sh, file) = (&self.shared, &asm.file);
        let file_size = chunks.last().map_or(0, |c| c.1 + u64::from(c.2));
        let mut frontier = 0usize;
        written_prefix(bits, chunks, &mut frontier, file_size);
        let peers = self.peers().await?;
        let mut bad: HashSet<PeerId> = HashSet::new();
        let mut queue: VecDeque<(usize, Vec<PeerId>)> =
            need.into_iter().map(|i| (i, Vec::new())).collect();
        let mut inflight = FuturesUnordered::new();
        let mut rr = 0usize;
        let mut since_save = Instant::now();
        // Large files start their way to the disk while the rest arrives,
        // so the final fsync has little left to write.
        let mut unsynced = 0u64;
        let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            while inflight.len() < sh.settings.window {
                let Some((i, tried)) = queue.pop_front() else {
                    break;
                };
                let candidates: Vec<PeerId> = peers
                    .iter()
                    .filter(|p| !tried.contains(p) && !bad.contains(p))
                    .copied()
                    .collect();
                if candidates.is_empty() {
                    return Err(TransferError::Unavailable(format!(
                        "no connected peer could serve chunk {} of {}",
                        i,
                        chunks.len()
                    )));
                }
                let peer = candidates[rr % candidates.len()];
                rr += 1;
                let links = Arc::clone(&sh.links);
                let (hash, space) = (chunks[i].0, self.space);
                let budget = Arc::clone(&sh.inflight);
                inflight.push(async move {
                    // The node-wide budget of chunks in flight bounds memory
                    // whatever the number of files transferred at once.
                    let permit = budget.acquire_owned().await;
                    let r = links.get(peer, space, BlobKind::Chunk, hash).await;
                    (i, tried, peer, r, permit)
                });
            }
            let Some((i, mut tried, peer, r, _permit)) = inflight.next().await else {
                break;
            };
            let (hash, off, len) = chunks[i];
            match r {
                Ok(data)
                    if data.len() == len as usize && *blake3::hash(&data).as_bytes() == hash =>
                {
                    file.write_all_at(&data, off)
                        .map_err(|e| io_err("write temp file", e))?;
                    bits[i / 8] |= 1 << (i % 8);
                    if let Some(v) = &asm.verifier {
                        if i == frontier {
                            v.advance(written_prefix(bits, chunks, &mut frontier, file_size));
                        }
                    }
                    sh.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                    sh.counters
                        .bytes_fetched
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    self.progress(rel, u64::from(len));
                    unsynced += u64::from(len);
                    if unsynced >= FLUSH_EVERY && flushing.as_ref().is_none_or(|j| j.is_finished())
                    {
                        if let Ok(f) = file.try_clone() {
                            unsynced = 0;
                            flushing = Some(tokio::task::spawn_blocking(move || {
                                let _ = f.sync_data();
                            }));
                        }
                    }
                    if since_save.elapsed() > Duration::from_millis(200) {
                        let _ = sh.blobs.set_part(&self.space, part, bits);
                        since_save = Instant::now();
                    }
                }
                Ok(_) => {
                    sh.counters.chunks_corrupt.fetch_add(1, Ordering::Relaxed);
                    self.note_bad_peer(peer, "served a chunk that failed verification");
                    bad.insert(peer);
                    tried.push(peer);
                    queue.push_back((i, tried));
                }
                Err(FetchError::Missing) | Err(FetchError::Refused) | Err(FetchError::Link(_)) => {
                    tried.push(peer);
                    queue.push_back((i, tried));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_ahead_hashes_what_is_in_the_file_as_the_prefix_grows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("part");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        // the prefix told may grow in any steps, even go back
        let v = Verifier::start(&f).unwrap();
        for end in [0, 10, 1_500_000, 700, 2_999_999] {
            v.advance(end);
        }
        assert_eq!(
            v.finish(3_000_000).unwrap(),
            *blake3::hash(&data).as_bytes()
        );
        // what it reads is the file, not what was meant to be written
        let mut wrong = data.clone();
        wrong[2_000_000] ^= 1;
        std::fs::write(&p, &wrong).unwrap();
        let v = Verifier::start(&File::open(&p).unwrap()).unwrap();
        assert_ne!(
            v.finish(3_000_000).unwrap(),
            *blake3::hash(&data).as_bytes()
        );
        // a file shorter than promised is an error, not a hash
        let v = Verifier::start(&File::open(&p).unwrap()).unwrap();
        assert!(v.finish(3_000_001).is_err());
    }

    #[test]
    fn the_written_prefix_ends_at_the_first_missing_chunk() {
        let chunks: Vec<([u8; 32], u64, u32)> =
            (0..10u64).map(|i| ([0; 32], i * 100, 100)).collect();
        let mut bits = vec![0u8; 2];
        let mut from = 0;
        assert_eq!(written_prefix(&bits, &chunks, &mut from, 1000), 0);
        for i in [0usize, 1, 2, 5] {
            bits[i / 8] |= 1 << (i % 8);
        }
        assert_eq!(written_prefix(&bits, &chunks, &mut from, 1000), 300);
        assert_eq!(from, 3);
        for i in [3usize, 4, 6, 7, 8, 9] {
            bits[i / 8] |= 1 << (i % 8);
        }
        assert_eq!(written_prefix(&bits, &chunks, &mut from, 1000), 1000);
    }
}
