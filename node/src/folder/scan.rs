//! Reading the folder: ignore rules, walking, stat, and hashing a file into
//! content-defined chunks in one streaming pass.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use shoal_protocol::files::{self, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};

use crate::store::blobs::Stat;

/// The name of the ignore file at a folder's root (gitignore syntax).
pub const IGNORE_FILE: &str = ".shoalignore";

/// Skipped unless a `.shoalignore` line re-includes them (`!.env`): editor
/// and office temp files, and obvious secrets. `.shoalignore` itself is
/// never synced.
pub const DEFAULT_IGNORES: &[&str] = &[
    "/.shoalignore",
    // editors and office suites
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",
    ".~lock.*#",
    "~$*",
    "*.tmp",
    // secrets
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "id_*_sk",
    ".env",
    ".env.*",
    "!.env.example",
];

/// A folder's ignore rules: the defaults, then its root `.shoalignore`.
#[derive(Debug, Clone)]
pub struct Rules {
    gi: Gitignore,
}

impl Rules {
    /// Loads the rules of the folder at `root`. A broken `.shoalignore`
    /// line is skipped; the error says which.
    pub fn load(root: &Path) -> (Self, Option<String>) {
        let mut b = GitignoreBuilder::new(root);
        for line in DEFAULT_IGNORES {
            let _ = b.add_line(None, line);
        }
        let err = b.add(root.join(IGNORE_FILE)).map(|e| e.to_string());
        let gi = b.build().unwrap_or_else(|_| Gitignore::empty());
        // A missing file is not an error worth reporting.
        let err = err.filter(|_| root.join(IGNORE_FILE).exists());
        (Self { gi }, err)
    }

    /// Whether `rel` (a normalised path) is ignored.
    pub fn ignored(&self, rel: &str, is_dir: bool) -> bool {
        self.gi.matched_path_or_any_parents(rel, is_dir).is_ignore()
    }

    /// Whether a `.shoalignore` line explicitly includes `rel`.
    pub fn included(&self, rel: &str) -> bool {
        self.gi.matched(rel, false).is_whitelist()
    }
}

/// Whether a file looks like a PEM or key file holding a private key.
pub fn is_private_key(path: &Path, rel: &str) -> bool {
    let ext_hit = [".pem", ".key", ".p8"].iter().any(|e| rel.ends_with(e));
    if !ext_hit {
        return false;
    }
    let mut head = [0u8; 8192];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let s = String::from_utf8_lossy(&head[..n]);
    s.contains("PRIVATE KEY-----")
}

/// The stat fields that tell whether a file may have changed.
pub fn stat_of(m: &Metadata) -> Stat {
    Stat {
        size: m.len(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        ino: m.ino(),
        mode: m.mode(),
    }
}

/// A file read and cut into chunks.
#[derive(Debug, Clone)]
pub struct Hashed {
    /// BLAKE3 of the whole file.
    pub file_hash: [u8; 32],
    /// (chunk hash, offset, length) in file order.
    pub chunks: Vec<([u8; 32], u64, u32)>,
    /// The stat the content belongs to.
    pub stat: Stat,
}

impl Hashed {
    /// The hash the index names this content by, and whether it is a
    /// manifest's, with the manifest when there is one.
    pub fn version(&self) -> ([u8; 32], bool, Option<files::Manifest>) {
        if self.chunks.len() <= 1 {
            return (self.file_hash, false, None);
        }
        let m = files::Manifest {
            file_hash: self.file_hash,
            size: self.stat.size,
            chunks: self.chunks.iter().map(|(h, _, l)| (*h, *l)).collect(),
        };
        (m.id(), true, Some(m))
    }
}

/// Files above this are cut in parallel segments.
const SEGMENT_MIN: u64 = 8 << 20;

/// Reads `f` from `pos` up to `end` with positional reads, so several
/// readers share one open file.
struct ReadAt<'a> {
    f: &'a File,
    pos: u64,
    end: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = self.end.saturating_sub(self.pos);
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.f.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// (chunk hash, offset, length).
type Chunk = ([u8; 32], u64, u32);

/// Cuts `f` (of `size` bytes) into content-defined chunks from `start`,
/// hashing each, until a chunk ends where `stop` says or at the end.
/// Chunk boundaries depend only on the bytes from the previous boundary,
/// so cutting from any boundary gives the same chunks as from the start.
fn cut_from(
    f: &File,
    start: u64,
    size: u64,
    stop: impl Fn(u64) -> bool,
) -> std::io::Result<Vec<Chunk>> {
    cut_from_with(f, start, size, stop, CUT_BUFFER)
}

/// Bytes read at a time while cutting.
const CUT_BUFFER: usize = 4 << 20;

/// [`cut_from`] with a buffer of `cap` bytes (at least two chunks' worth).
/// Cuts are made on the buffer in place, as FastCDC's streaming cutter
/// would make them (each with a full chunk's worth of bytes ahead, or
/// what is left of the file), without its copy per chunk.
fn cut_from_with(
    f: &File,
    start: u64,
    size: u64,
    stop: impl Fn(u64) -> bool,
    cap: usize,
) -> std::io::Result<Vec<Chunk>> {
    use fastcdc::v2020::{cut, select_masks, Normalization};
    let (min, avg, max) = (CHUNK_MIN as usize, CHUNK_AVG as usize, CHUNK_MAX as usize);
    let cap = cap.max(2 * max);
    let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
    let mut r = ReadAt {
        f,
        pos: start,
        end: size,
    };
    let mut buf = vec![0u8; cap];
    let (mut len, mut at, mut eof) = (0usize, 0usize, false);
    let mut offset = start; // file offset of buf[at]
    let mut out = Vec::new();
    loop {
        // Keep a full chunk's worth ahead of the cut, unless at the end.
        if !eof && len - at < max {
            buf.copy_within(at..len, 0);
            len -= at;
            at = 0;
            while len < cap {
                let n = r.read(&mut buf[len..])?;
                if n == 0 {
                    eof = true;
                    break;
                }
                len += n;
            }
        }
        if at == len {
            return Ok(out);
        }
        let (_, n) = cut(
            &buf[at..len],
            min,
            avg,
            max,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        if n == 0 {
            return Ok(out);
        }
        out.push((*blake3::hash(&buf[at..at + n]).as_bytes(), offset, n as u32));
        at += n;
        offset += n as u64;
        if stop(offset) {
            return Ok(out);
        }
    }
}

/// FastCDC's own streaming cutter, the reference [`cut_from`] must match.
#[cfg(test)]
fn cut_stream(f: &File, size: u64) -> Vec<Chunk> {
    let reader = std::io::BufReader::new(ReadAt {
        f,
        pos: 0,
        end: size,
    });
    fastcdc::v2020::StreamCDC::new(
        reader,
        CHUNK_MIN as usize,
        CHUNK_AVG as usize,
        CHUNK_MAX as usize,
    )
    .map(|c| {
        let c = c.expect("read");
        (*blake3::hash(&c.data).as_bytes(), c.offset, c.length as u32)
    })
    .collect()
}

/// The chunks of all of `f`: `n` segments are cut in parallel, then
/// joined where a segment's chunks meet the boundaries its predecessor
/// reaches (cutting on from there until they do). The result is exactly
/// what one pass from the start gives.
fn cut_all(f: &File, size: u64, n: u64) -> std::io::Result<Vec<Chunk>> {
    use rayon::prelude::*;
    let n = n.clamp(1, size.max(1));
    let starts: Vec<u64> = (0..n).map(|k| k * size / n).collect();
    let segments = starts
        .par_iter()
        .enumerate()
        .map(|(k, s)| {
            let next = starts.get(k + 1).copied().unwrap_or(u64::MAX);
            cut_from(f, *s, size, |end| end >= next)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut segments = segments.into_iter();
    let mut out = segments.next().unwrap_or_default();
    for seg in segments {
        loop {
            let b = out.last().map_or(0, |c| c.1 + u64::from(c.2));
            if b >= size {
                break;
            }
            if let Ok(i) = seg.binary_search_by_key(&b, |c| c.1) {
                out.extend_from_slice(&seg[i..]);
                break;
            }
            // Not met yet: cut on until a chunk ends where one of this
            // segment's starts, or beyond its last.
            let seg_end = seg.last().map_or(0, |c| c.1 + u64::from(c.2));
            let more = cut_from(f, b, size, |end| {
                end >= seg_end || seg.binary_search_by_key(&end, |c| c.1).is_ok()
            })?;
            if more.is_empty() {
                break;
            }
            out.extend(more);
            let b = out.last().map_or(0, |c| c.1 + u64::from(c.2));
            if b >= seg_end && seg.binary_search_by_key(&b, |c| c.1).is_err() {
                break;
            }
        }
    }
    Ok(out)
}

/// BLAKE3 of `size` bytes of `f`, read in order.
fn hash_whole(f: &File, size: u64) -> std::io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut r = ReadAt {
        f,
        pos: 0,
        end: size,
    };
    let mut buf = vec![0u8; (size as usize).clamp(1, 1 << 20)];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

/// BLAKE3 of the file at `path`, read on one thread and hashed on this
/// one (twice the speed of either alone), holding at most three 1 MiB
/// buffers.
pub fn hash_path(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::sync::mpsc;
    const BUF: usize = 1 << 20;
    let mut f = File::open(path)?;
    let size = f.metadata()?.len();
    if size <= BUF as u64 {
        // Small: one read, no thread.
        let mut data = Vec::with_capacity(size as usize);
        f.read_to_end(&mut data)?;
        return Ok(*blake3::hash(&data).as_bytes());
    }
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..3 {
        let _ = empty_tx.send(vec![0u8; BUF]);
    }
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> std::io::Result<()> {
            while let Ok(mut b) = empty_rx.recv() {
                b.resize(BUF, 0);
                let n = f.read(&mut b)?;
                if n == 0 {
                    return Ok(());
                }
                b.truncate(n);
                if full_tx.send(b).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        });
        let mut h = blake3::Hasher::new();
        for b in full_rx {
            h.update(&b);
            let _ = empty_tx.send(b);
        }
        drop(empty_tx);
        reader
            .join()
            .map_err(|_| std::io::Error::other("hash reader panicked"))??;
        Ok(*h.finalize().as_bytes())
    })
}

/// Hashes and chunks the file at `path`, never holding more than a few
/// chunks per thread. Large files are cut in parallel segments while the
/// whole-file hash runs beside them. `None` when the file changed while it
/// was read: the caller tries again later rather than record a torn
/// version.
pub fn hash_file(path: &Path) -> std::io::Result<Option<Hashed>> {
    let f = File::open(path)?;
    let before = stat_of(&f.metadata()?);
    let size = before.size;
    let (file_hash, chunks) = if size <= u64::from(CHUNK_MIN) {
        // One chunk at most: it is the whole file.
        let mut data = Vec::with_capacity(size as usize);
        (&f).take(size).read_to_end(&mut data)?;
        let h = *blake3::hash(&data).as_bytes();
        let chunks = if data.is_empty() {
            Vec::new()
        } else {
            vec![(h, 0, data.len() as u32)]
        };
        (h, chunks)
    } else {
        // Segments of at least SEGMENT_MIN, one per thread at most.
        let n = (size / SEGMENT_MIN).clamp(1, rayon::current_num_threads().max(1) as u64);
        let (whole, chunks) = rayon::join(|| hash_whole(&f, size), || cut_all(&f, size, n));
        (whole?, chunks?)
    };
    let after = stat_of(&std::fs::symlink_metadata(path)?);
    let total: u64 = chunks.iter().map(|(_, _, l)| u64::from(*l)).sum();
    if before != after || total != size {
        return Ok(None);
    }
    Ok(Some(Hashed {
        file_hash,
        chunks,
        stat: after,
    }))
}

/// What the walk found at one path.
#[derive(Debug)]
pub struct Found {
    /// Normalised relative path.
    pub rel: String,
    /// Absolute path.
    pub abs: PathBuf,
    /// Its metadata (not following links).
    pub meta: Metadata,
}

/// Walks `dir` (the root or a folder under it) without following links,
/// skipping `.shoal/` and ignored paths. Unreadable places and names that
/// cannot be synced are reported through `problem`.
pub fn walk(
    root: &Path,
    dir: &Path,
    rules: &Rules,
    mut problem: impl FnMut(String, String),
) -> Vec<Found> {
    let mut out = Vec::new();
    let (prune_root, prune_rules) = (root.to_path_buf(), rules.clone());
    let walker = ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .hidden(false)
        .follow_links(false)
        .filter_entry(move |e| {
            let is_dir = e.file_type().is_some_and(|t| t.is_dir());
            match e.path().strip_prefix(&prune_root) {
                Ok(r) if r.as_os_str().is_empty() => true,
                Ok(r) if r.starts_with(".shoal") => false,
                Ok(r) => !r.to_str().is_some_and(|r| prune_rules.ignored(r, is_dir)),
                Err(_) => false,
            }
        })
        .build();
    for item in walker {
        let entry = match item {
            Ok(e) => e,
            Err(e) => {
                problem(String::new(), e.to_string());
                continue;
            }
        };
        if entry.depth() == 0 && dir == root {
            continue;
        }
        let Some(rel) = rel_of(root, entry.path()) else {
            problem(
                entry.path().display().to_string(),
                "name is not valid UTF-8 or not syncable".into(),
            );
            continue;
        };
        let meta = match entry.path().symlink_metadata() {
            Ok(m) => m,
            Err(e) => {
                problem(rel, e.to_string());
                continue;
            }
        };
        out.push(Found {
            rel,
            abs: entry.path().to_path_buf(),
            meta,
        });
    }
    out
}

/// The normalised path of `abs` under `root`, if it is one shoal syncs.
pub fn rel_of(root: &Path, abs: &Path) -> Option<String> {
    let rel = abs.strip_prefix(root).ok()?;
    let s = rel.to_str()?;
    files::normalize_path(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_skip_temp_files_and_secrets_unless_included() {
        let dir = tempfile::tempdir().unwrap();
        let (r, err) = Rules::load(dir.path());
        assert!(err.is_none());
        for p in [
            "a/.x.swp",
            "notes.txt~",
            ".env",
            "home/.ssh/id_ed25519",
            ".shoalignore",
        ] {
            assert!(r.ignored(p, false), "{p} synced");
        }
        for p in ["a.txt", "deep/x/y.rs", ".env.example", "environment"] {
            assert!(!r.ignored(p, false), "{p} ignored");
        }
        std::fs::write(dir.path().join(IGNORE_FILE), "build/\n*.log\n!.env\n").unwrap();
        let (r, _) = Rules::load(dir.path());
        assert!(r.ignored("build/out.o", false));
        assert!(r.ignored("x/app.log", false));
        assert!(!r.ignored(".env", false));
        assert!(r.included(".env"));
    }

    #[test]
    fn private_keys_are_recognised_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("server.pem");
        std::fs::write(&k, "-----BEGIN PRIVATE KEY-----\nabc\n").unwrap();
        assert!(is_private_key(&k, "server.pem"));
        let c = dir.path().join("cert.pem");
        std::fs::write(&c, "-----BEGIN CERTIFICATE-----\nabc\n").unwrap();
        assert!(!is_private_key(&c, "cert.pem"));
    }

    #[test]
    fn hashing_cuts_stable_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..3_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&p, &data).unwrap();
        let a = hash_file(&p).unwrap().unwrap();
        assert_eq!(a.file_hash, *blake3::hash(&data).as_bytes());
        assert!(a.chunks.len() > 4, "{} chunks", a.chunks.len());
        // one byte inserted in the middle changes only chunks near it
        let mut edited = data.clone();
        edited.insert(1_500_000, 7);
        std::fs::write(&p, &edited).unwrap();
        let b = hash_file(&p).unwrap().unwrap();
        let old: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.0).collect();
        let new = b.chunks.iter().filter(|c| !old.contains(&c.0)).count();
        assert!(new <= 2, "{new} chunks changed");
        // cut in any number of segments, the chunks are those of one pass,
        // which are FastCDC's own, whatever the buffer size
        let f = File::open(&p).unwrap();
        let size = edited.len() as u64;
        let one = cut_from(&f, 0, size, |_| false).unwrap();
        assert_eq!(one, cut_stream(&f, size));
        for cap in [1 << 20, 1_300_001, 3 << 20] {
            assert_eq!(
                cut_from_with(&f, 0, size, |_| false, cap).unwrap(),
                one,
                "{cap}"
            );
        }
        for n in 2..=7 {
            assert_eq!(cut_all(&f, size, n).unwrap(), one, "{n} segments");
        }
        for len in [40_000usize, 600_000, 1_234_567] {
            let q = dir.path().join(format!("p{len}"));
            std::fs::write(&q, &data[len / 3..len / 3 + len]).unwrap();
            let f = File::open(&q).unwrap();
            let one = cut_from(&f, 0, len as u64, |_| false).unwrap();
            assert_eq!(one, cut_stream(&f, len as u64), "{len}");
            assert_eq!(
                cut_from_with(&f, 0, len as u64, |_| false, 1 << 20).unwrap(),
                one
            );
            for n in 2..=5 {
                assert_eq!(cut_all(&f, len as u64, n).unwrap(), one, "{len} {n}");
            }
            let h = hash_file(&q).unwrap().unwrap();
            assert_eq!(h.chunks, one);
            assert_eq!(hash_path(&q).unwrap(), h.file_hash);
            assert_eq!(
                h.file_hash,
                *blake3::hash(&data[len / 3..len / 3 + len]).as_bytes()
            );
        }
        let empty = dir.path().join("e");
        std::fs::write(&empty, b"").unwrap();
        let e = hash_file(&empty).unwrap().unwrap();
        assert!(e.chunks.is_empty());
        assert_eq!(e.version().0, *blake3::hash(b"").as_bytes());
    }
}
