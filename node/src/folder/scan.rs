//! Reading the folder: ignore rules, walking, stat, and hashing a file into
//! content-defined chunks in one streaming pass.

use std::fs::{File, Metadata};
use std::io::{BufReader, Read};
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

/// Hashes and chunks the file at `path` in one pass, never holding more
/// than one chunk. `None` when the file changed while it was read: the
/// caller tries again later rather than record a torn version.
pub fn hash_file(path: &Path) -> std::io::Result<Option<Hashed>> {
    use rayon::prelude::*;
    let f = File::open(path)?;
    let before = stat_of(&f.metadata()?);
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    // A small file gets a small buffer: most files are small.
    let cap = (before.size as usize).clamp(4096, 1 << 20);
    let reader = BufReader::with_capacity(cap, &f);
    let cdc = fastcdc::v2020::StreamCDC::new(
        reader,
        CHUNK_MIN as usize,
        CHUNK_AVG as usize,
        CHUNK_MAX as usize,
    );
    // Chunks are hashed in parallel a batch at a time, while the whole-file
    // hash runs over the same bytes in order.
    let mut batch: Vec<fastcdc::v2020::ChunkData> = Vec::new();
    let mut flush = |batch: &mut Vec<fastcdc::v2020::ChunkData>, whole: &mut blake3::Hasher| {
        let hashes: Vec<[u8; 32]> = batch
            .par_iter()
            .map(|c| *blake3::hash(&c.data).as_bytes())
            .collect();
        for (c, h) in batch.drain(..).zip(hashes) {
            whole.update(&c.data);
            chunks.push((h, c.offset, c.length as u32));
        }
    };
    for c in cdc {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        })?;
        batch.push(c);
        if batch.len() >= 32 {
            flush(&mut batch, &mut whole);
        }
    }
    flush(&mut batch, &mut whole);
    let after = stat_of(&std::fs::symlink_metadata(path)?);
    let total: u64 = chunks.iter().map(|(_, _, l)| u64::from(*l)).sum();
    if before != after || total != before.size {
        return Ok(None);
    }
    Ok(Some(Hashed {
        file_hash: *whole.finalize().as_bytes(),
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
        let empty = dir.path().join("e");
        std::fs::write(&empty, b"").unwrap();
        let e = hash_file(&empty).unwrap().unwrap();
        assert!(e.chunks.is_empty());
        assert_eq!(e.version().0, *blake3::hash(b"").as_bytes());
    }
}
