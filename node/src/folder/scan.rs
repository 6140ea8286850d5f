//! Reading the folder: ignore rules, walking, stat, and hashing a file into
//! content-defined chunks in one streaming pass.

use std::collections::BTreeMap;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use shoal_protocol::files::{self, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};

use crate::store::blobs::Stat;

/// The name of the ignore files (gitignore syntax): one at the folder's
/// root, and any number in folders below it, each for the paths under its
/// own folder, as with `.gitignore`.
pub const IGNORE_FILE: &str = ".shoalignore";

/// Whether `rel` names an ignore file (at the root or in a folder below).
pub fn is_ignore_file(rel: &str) -> bool {
    rel.rsplit('/').next() == Some(IGNORE_FILE)
}

/// Skipped unless a `.shoalignore` line re-includes them (`!.env`): editor
/// and office temp files, and obvious secrets. `.shoalignore` files are
/// never synced: each device keeps its own.
pub const DEFAULT_IGNORES: &[&str] = &[
    ".shoalignore",
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

/// A folder's ignore rules: the defaults, then its root `.shoalignore`,
/// then the `.shoalignore` files in folders below it. As in git, the
/// deepest file that matches a path decides, and nothing re-includes a
/// path whose parent folder is ignored.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The defaults and the root file, in one matcher (so `!.env` at the
    /// root overrides a default).
    root: Gitignore,
    /// The `.shoalignore` of each folder below the root that has one, by
    /// the folder's path.
    nested: BTreeMap<String, Gitignore>,
    /// Each ignore file read (its path and stat), to notice a change.
    sources: Vec<(String, Stat)>,
    /// Whether the folder's files were read at all ([`Rules::defaults`]
    /// reads none).
    read: bool,
}

impl Rules {
    fn default_builder(root: &Path) -> GitignoreBuilder {
        let mut b = GitignoreBuilder::new(root);
        for line in DEFAULT_IGNORES {
            let _ = b.add_line(None, line);
        }
        b
    }

    /// The default rules alone, read from no file: what a folder has until
    /// its first scan loads its own.
    pub fn defaults(root: &Path) -> Self {
        Self {
            root: Self::default_builder(root)
                .build()
                .unwrap_or_else(|_| Gitignore::empty()),
            nested: BTreeMap::new(),
            sources: Vec::new(),
            read: false,
        }
    }

    /// Loads the rules of the folder at `root`: its own `.shoalignore` and
    /// those of the folders below that are not themselves ignored (a
    /// walk of the folder's directories). A broken line is skipped; each
    /// problem comes back with the ignore file's path.
    pub fn load(root: &Path) -> (Self, Vec<(String, String)>) {
        let mut problems = Vec::new();
        let mut sources = Vec::new();
        let mut b = Self::default_builder(root);
        let file = root.join(IGNORE_FILE);
        if let Ok(m) = file.symlink_metadata() {
            sources.push((IGNORE_FILE.to_string(), stat_of(&m)));
            if let Some(e) = b.add(&file) {
                problems.push((IGNORE_FILE.to_string(), e.to_string()));
            }
        }
        let root_gi = b.build().unwrap_or_else(|_| Gitignore::empty());
        let mut rules = Self {
            root: root_gi,
            nested: BTreeMap::new(),
            sources,
            read: true,
        };
        // Parents before children, so each folder is judged by the rules
        // of the folders above it: an ignored folder's file is not read.
        let mut dirs = vec![String::new()];
        while let Some(dir) = dirs.pop() {
            let Ok(read) = std::fs::read_dir(root.join(&dir)) else {
                continue;
            };
            let mut subdirs = Vec::new();
            for e in read.flatten() {
                // file_type() does not follow links: linked folders are
                // not walked, as by the scanner.
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Some(name) = e.file_name().to_str().map(String::from) else {
                    continue;
                };
                let rel = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                if rel == ".shoal" || rules.ignored(&rel, true) {
                    continue;
                }
                subdirs.push(rel);
            }
            subdirs.sort();
            for rel in subdirs {
                let abs = root.join(&rel);
                let file = abs.join(IGNORE_FILE);
                if let Ok(m) = file.symlink_metadata() {
                    let path = format!("{rel}/{IGNORE_FILE}");
                    let mut b = GitignoreBuilder::new(&abs);
                    if let Some(e) = b.add(&file) {
                        problems.push((path.clone(), e.to_string()));
                    }
                    match b.build() {
                        Ok(gi) => {
                            rules.nested.insert(rel.clone(), gi);
                        }
                        Err(e) => problems.push((path.clone(), e.to_string())),
                    }
                    rules.sources.push((path, stat_of(&m)));
                }
                dirs.push(rel);
            }
        }
        (rules, problems)
    }

    /// Whether these rules are out of date: never read from the folder,
    /// an ignore file they were read from changed, or the root one
    /// appeared. (A new file in a folder below is met by the scanner's
    /// walk: see [`walk`].)
    pub fn changed(&self, root: &Path) -> bool {
        let now = |rel: &str| root.join(rel).symlink_metadata().ok().map(|m| stat_of(&m));
        let root_known = self.sources.iter().any(|(p, _)| p == IGNORE_FILE);
        !self.read
            || (!root_known && now(IGNORE_FILE).is_some())
            || self.sources.iter().any(|(p, st)| now(p) != Some(*st))
    }

    /// Whether these rules were read from the ignore file at `rel`.
    pub fn was_read_from(&self, rel: &str) -> bool {
        self.sources.iter().any(|(p, _)| p == rel)
    }

    /// The match of the deepest rules that have a say on `rel` itself
    /// (its parents not considered).
    fn matched(&self, rel: &str, is_dir: bool) -> ignore::Match<&ignore::gitignore::Glob> {
        rel.rmatch_indices('/')
            .filter_map(|(i, _)| {
                let gi = self.nested.get(&rel[..i])?;
                Some(gi.matched(&rel[i + 1..], is_dir))
            })
            .find(|m| !m.is_none())
            .unwrap_or_else(|| self.root.matched(rel, is_dir))
    }

    /// Whether `rel` (a normalised path) is ignored: by the rules that
    /// decide for it, or because a folder it is in is ignored.
    pub fn ignored(&self, rel: &str, is_dir: bool) -> bool {
        if self.nested.is_empty() {
            return self
                .root
                .matched_path_or_any_parents(rel, is_dir)
                .is_ignore();
        }
        rel.match_indices('/')
            .any(|(i, _)| self.matched(&rel[..i], true).is_ignore())
            || self.matched(rel, is_dir).is_ignore()
    }

    /// Whether a `.shoalignore` line explicitly includes `rel`.
    pub fn included(&self, rel: &str) -> bool {
        self.matched(rel, false).is_whitelist()
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

/// Files above this are cut and hashed in parallel segments.
const SEGMENT_MIN: u64 = 4 << 20;

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
    cut_from_with(f, start, size, stop, None, CUT_BUFFER)
}

/// A BLAKE3 hasher fed the bytes a cut reads from its start up to `end`,
/// so that the whole-file hash needs no second read.
struct Subtree<'a> {
    hasher: &'a mut blake3::Hasher,
    end: u64,
    /// Bytes fed so far.
    fed: u64,
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
    mut tree: Option<&mut Subtree<'_>>,
    cap: usize,
) -> std::io::Result<Vec<Chunk>> {
    use fastcdc::v2020::{cut, select_masks, Normalization};
    let (min, avg, max) = (CHUNK_MIN as usize, CHUNK_AVG as usize, CHUNK_MAX as usize);
    // No bigger than what is left of the file: a small file does not
    // zero a whole buffer.
    let cap = cap
        .max(2 * max)
        .min(usize::try_from(size.saturating_sub(start)).unwrap_or(usize::MAX));
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
                let from = r.pos;
                let n = r.read(&mut buf[len..])?;
                if n == 0 {
                    eof = true;
                    break;
                }
                if let Some(t) = tree.as_mut() {
                    let take = t.end.saturating_sub(from).min(n as u64) as usize;
                    t.hasher.update(&buf[len..len + take]);
                    t.fed += take as u64;
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

/// The chunks and the BLAKE3 of all of `f`, cut in segments of `seg`
/// bytes (a power of two, at least BLAKE3's chunk) in parallel. Each
/// segment's cutter also hashes the segment as a BLAKE3 subtree, and the
/// subtrees are merged along BLAKE3's own tree into the whole-file hash:
/// the file is read once. Segments' chunks are joined where a segment's
/// chunks meet the boundaries its predecessor reaches (cutting on from
/// there until they do). The result is exactly what one pass from the
/// start gives.
fn cut_all(f: &File, size: u64, seg: u64) -> std::io::Result<([u8; 32], Vec<Chunk>)> {
    use blake3::hazmat::HasherExt;
    use rayon::prelude::*;
    debug_assert!(seg.is_power_of_two() && seg >= blake3::CHUNK_LEN as u64);
    if size <= seg {
        let mut hasher = blake3::Hasher::new();
        let mut tree = Subtree {
            hasher: &mut hasher,
            end: size,
            fed: 0,
        };
        let chunks = cut_from_with(f, 0, size, |_| false, Some(&mut tree), CUT_BUFFER)?;
        return Ok((*hasher.finalize().as_bytes(), chunks));
    }
    let starts: Vec<u64> = (0..size.div_ceil(seg)).map(|k| k * seg).collect();
    let segments = starts
        .par_iter()
        .map(|&s| {
            let next = (s + seg).min(size);
            let mut hasher = blake3::Hasher::new();
            hasher.set_input_offset(s);
            let mut tree = Subtree {
                hasher: &mut hasher,
                end: next,
                fed: 0,
            };
            let chunks = cut_from_with(f, s, size, |end| end >= next, Some(&mut tree), CUT_BUFFER)?;
            // A file cut short under us: its subtree would be short (or
            // empty, which BLAKE3 refuses); no chunks tells the caller the
            // file changed while it was read.
            if tree.fed != next - s {
                return Ok(None);
            }
            Ok(Some((chunks, hasher.finalize_non_root())))
        })
        .collect::<std::io::Result<Option<Vec<_>>>>()?;
    let Some(segments) = segments else {
        return Ok(([0; 32], Vec::new()));
    };
    let (segments, cvs): (Vec<_>, Vec<_>) = segments.into_iter().unzip();
    let whole = tree_root(&cvs, seg, size);
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
    Ok((whole, out))
}

/// The BLAKE3 of `size` bytes from the chaining values of its segments of
/// `seg` bytes (a power of two; the last may be short), joined as BLAKE3's
/// tree joins them: each parent's left side is the largest power of two
/// of chunks shorter than the whole, which always ends on a segment
/// boundary.
fn tree_root(cvs: &[blake3::hazmat::ChainingValue], seg: u64, size: u64) -> [u8; 32] {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, Mode};
    fn node(cvs: &[blake3::hazmat::ChainingValue], seg: u64, lo: u64, hi: u64) -> [u8; 32] {
        if hi - lo <= seg {
            return cvs[(lo / seg) as usize];
        }
        let mid = lo + left_subtree_len(hi - lo);
        merge_subtrees_non_root(
            &node(cvs, seg, lo, mid),
            &node(cvs, seg, mid, hi),
            Mode::Hash,
        )
    }
    let mid = left_subtree_len(size);
    let root = merge_subtrees_root(
        &node(cvs, seg, 0, mid),
        &node(cvs, seg, mid, size),
        Mode::Hash,
    );
    *root.as_bytes()
}

/// Segment length for cutting and hashing `size` bytes on `threads`
/// threads: about four segments per thread, so that work-stealing evens
/// out, and never under 4 MiB; a power of two, as BLAKE3's tree needs.
fn segment_len(size: u64, threads: usize) -> u64 {
    let per = size.div_ceil(4 * threads.max(1) as u64);
    per.next_power_of_two().max(SEGMENT_MIN)
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
/// chunks per thread, and reading it once. Large files are cut in
/// parallel segments, each also hashing its part of the whole-file BLAKE3
/// tree. `None` when the file changed while it was read: the caller tries
/// again later rather than record a torn version.
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
        cut_all(&f, size, segment_len(size, rayon::current_num_threads()))?
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
/// cannot be synced are reported through `problem`; ignore files that
/// `rules` were not read from (a folder moved in with its own, or one
/// whose watcher event was lost) go into `new_rules`.
pub fn walk(
    root: &Path,
    dir: &Path,
    rules: &Rules,
    new_rules: &mut Vec<String>,
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
                // Seen (not synced): the caller learns of new ones.
                Ok(r) if !is_dir && r.file_name() == Some(IGNORE_FILE.as_ref()) => true,
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
                not_syncable(root, entry.path()),
            );
            continue;
        };
        if is_ignore_file(&rel) {
            if !rules.was_read_from(&rel) {
                new_rules.push(rel);
            }
            continue;
        }
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
/// A name stored in another Unicode form than NFC (as macOS may write it)
/// is not: the index would name it in NFC, and a version placed by that
/// name would be a second file beside it.
pub fn rel_of(root: &Path, abs: &Path) -> Option<String> {
    let rel = abs.strip_prefix(root).ok()?;
    let s = rel.to_str()?;
    files::normalize_path(s).ok().filter(|n| n == s)
}

/// Why `abs` under `root` is not synced (when [`rel_of`] gives `None`).
pub fn not_syncable(root: &Path, abs: &Path) -> String {
    let Some(s) = abs.strip_prefix(root).ok().and_then(|r| r.to_str()) else {
        return "name is not valid UTF-8: not synced".into();
    };
    match files::normalize_path(s) {
        Ok(_) => "name is not in Unicode NFC form: not synced (rename it to sync it)".into(),
        Err(e) => format!("{e}: not synced"),
    }
}

/// Whether a stat that failed with `e` says the path is gone. Anything
/// else (permission denied, an I/O error) says nothing about it, and a
/// file that cannot be seen is not a deletion to send to every device.
pub fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_skip_temp_files_and_secrets_unless_included() {
        let dir = tempfile::tempdir().unwrap();
        let (r, problems) = Rules::load(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
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
    fn ignore_files_in_folders_below_apply_under_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["web/static", "web/vendor/lib", "docs", "out/deep"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join(IGNORE_FILE), "*.log\nout/\n").unwrap();
        // Deeper files decide for their folder: re-include, add, anchor.
        std::fs::write(
            root.join("web").join(IGNORE_FILE),
            "!keep.log\n/vendor/\n*.map\n",
        )
        .unwrap();
        std::fs::write(root.join("web/static").join(IGNORE_FILE), "!app.map\n").unwrap();
        // Inside an ignored folder: never read, nothing comes back.
        std::fs::write(root.join("out").join(IGNORE_FILE), "!*\n").unwrap();
        let (r, problems) = Rules::load(root);
        assert!(problems.is_empty(), "{problems:?}");
        for p in [
            "x.log",
            "docs/x.log",
            "web/x.log",
            "web/vendor/lib/a.js",
            "web/a.map",
            "web/static/b.map",
            "out/deep/a.txt",
            "web/.shoalignore",
            "web/static/.shoalignore",
        ] {
            assert!(r.ignored(p, false), "{p} synced");
        }
        for p in [
            "web/keep.log",
            "web/static/keep.log",
            "web/static/app.map",
            "docs/vendor/a.js",
            "docs/a.map",
            "web/a.js",
        ] {
            assert!(!r.ignored(p, false), "{p} ignored");
        }
        assert!(r.ignored("web/vendor", true));
        assert!(r.included("web/keep.log"));
        assert!(!r.changed(root));
        // The defaults alone are out of date until a scan reads the files.
        assert!(Rules::defaults(root).changed(root));
        // A change to any of the files read is noticed; a bad line is
        // reported with the file it is in, and the rest still applies.
        std::fs::write(root.join("docs").join(IGNORE_FILE), "[z-a]\n*.bak\n").unwrap();
        let (r, problems) = Rules::load(root);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "docs/.shoalignore");
        assert!(r.ignored("docs/x.bak", false));
        assert!(!r.ignored("x.bak", false));
        std::fs::write(root.join("web/static").join(IGNORE_FILE), "").unwrap();
        assert!(r.changed(root));
    }

    #[test]
    fn names_not_in_nfc_are_refused_and_only_a_missing_path_is_gone() {
        let root = Path::new("/r");
        assert_eq!(
            rel_of(root, Path::new("/r/caf\u{e9}.txt")).as_deref(),
            Some("caf\u{e9}.txt")
        );
        let nfd = Path::new("/r/cafe\u{301}.txt");
        assert_eq!(rel_of(root, nfd), None);
        assert!(
            not_syncable(root, nfd).contains("NFC"),
            "{}",
            not_syncable(root, nfd)
        );
        use std::io::{Error, ErrorKind};
        assert!(is_gone(&Error::from(ErrorKind::NotFound)));
        assert!(is_gone(&Error::from(ErrorKind::NotADirectory)));
        assert!(!is_gone(&Error::from(ErrorKind::PermissionDenied)));
        assert!(!is_gone(&Error::other("I/O error")));
        // As the scanner meets them: under a file is gone too.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let e = std::fs::symlink_metadata(dir.path().join("f/child")).unwrap_err();
        assert!(is_gone(&e), "{e:?}");
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
    fn segment_subtrees_join_into_the_blake3_of_the_whole() {
        use blake3::hazmat::HasherExt;
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for seg in [1024u64, 2048, 4096, 16384] {
            for len in [
                1025usize, 2048, 2049, 3072, 4097, 8192, 12_345, 16_385, 65_536, 70_000,
            ] {
                if len as u64 <= seg {
                    continue;
                }
                let cvs: Vec<_> = data[..len]
                    .chunks(seg as usize)
                    .enumerate()
                    .map(|(k, part)| {
                        let mut h = blake3::Hasher::new();
                        h.set_input_offset(k as u64 * seg);
                        h.update(part);
                        h.finalize_non_root()
                    })
                    .collect();
                assert_eq!(
                    tree_root(&cvs, seg, len as u64),
                    *blake3::hash(&data[..len]).as_bytes(),
                    "{len} bytes in segments of {seg}"
                );
            }
        }
        assert_eq!(segment_len(1 << 30, 2), 128 << 20);
        assert_eq!(segment_len(10 << 20, 2), SEGMENT_MIN);
        assert_eq!(segment_len((1 << 30) + 1, 2), 256 << 20);
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
        // cut in segments of any size, the chunks are those of one pass,
        // which are FastCDC's own, whatever the buffer size, and the
        // segments' BLAKE3 subtrees join into the whole file's hash
        let f = File::open(&p).unwrap();
        let size = edited.len() as u64;
        let whole = *blake3::hash(&edited).as_bytes();
        let one = cut_from(&f, 0, size, |_| false).unwrap();
        assert_eq!(one, cut_stream(&f, size));
        for cap in [1 << 20, 1_300_001, 3 << 20] {
            assert_eq!(
                cut_from_with(&f, 0, size, |_| false, None, cap).unwrap(),
                one,
                "{cap}"
            );
        }
        for seg in [64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20] {
            assert_eq!(
                cut_all(&f, size, seg).unwrap(),
                (whole, one.clone()),
                "{seg}"
            );
        }
        for len in [40_000usize, 600_000, 1_234_567] {
            let q = dir.path().join(format!("p{len}"));
            let part = &data[len / 3..len / 3 + len];
            std::fs::write(&q, part).unwrap();
            let f = File::open(&q).unwrap();
            let one = cut_from(&f, 0, len as u64, |_| false).unwrap();
            assert_eq!(one, cut_stream(&f, len as u64), "{len}");
            assert_eq!(
                cut_from_with(&f, 0, len as u64, |_| false, None, 1 << 20).unwrap(),
                one
            );
            let whole = *blake3::hash(part).as_bytes();
            for seg in [32 << 10, 128 << 10, 1 << 20] {
                let got = cut_all(&f, len as u64, seg).unwrap();
                assert_eq!(got, (whole, one.clone()), "{len} {seg}");
            }
            let h = hash_file(&q).unwrap().unwrap();
            assert_eq!(h.chunks, one);
            assert_eq!(hash_path(&q).unwrap(), h.file_hash);
            assert_eq!(h.file_hash, whole);
        }
        let empty = dir.path().join("e");
        std::fs::write(&empty, b"").unwrap();
        let e = hash_file(&empty).unwrap().unwrap();
        assert!(e.chunks.is_empty());
        assert_eq!(e.version().0, *blake3::hash(b"").as_bytes());
    }
}
