//! The folder model: normalised paths, index entries, manifests, the index
//! shards, the rule that picks one winner among concurrent versions of a
//! path, and the blob-exchange wire messages.
//!
//! A space's file tree lives in [`INDEX_SHARDS`] Automerge documents
//! (`index-0` .. `index-f`), each a flat map from a normalised path to one
//! packed [`Entry`]. A file version is named by the hash of its content: for
//! a file of one chunk (or none), the BLAKE3 of its bytes; for a longer
//! file, the BLAKE3 of its encoded [`Manifest`], which lists the chunks and
//! carries the whole-file hash.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};
use crate::{DeviceId, DocId, SpaceId};

/// Smallest chunk content-defined chunking cuts (except a file's last).
pub const CHUNK_MIN: u32 = 32 * 1024;
/// Average chunk size.
pub const CHUNK_AVG: u32 = 128 * 1024;
/// Largest chunk.
pub const CHUNK_MAX: u32 = 512 * 1024;
/// Number of index documents a space's file tree is sharded over.
pub const INDEX_SHARDS: u8 = 16;
/// Longest normalised path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component, in bytes (the common filesystem limit).
pub const MAX_NAME_LEN: usize = 255;
/// Largest packed entry accepted from a document.
pub const MAX_ENTRY_BYTES: usize = 8 * 1024;
/// Largest encoded manifest (about 1.8 million chunks: a 200 GiB file).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;
/// Protocol id of blob exchange.
pub const BLOB_PROTOCOL: &str = "/shoal/blob/1";
/// Largest blob request frame.
pub const MAX_BLOB_REQUEST: usize = 256;

/// Normalises a relative path as the index stores it: Unicode NFC, `/`
/// separators, no empty, `.` or `..` components, no leading `/`, and nothing
/// under shoal's own `.shoal/` folder.
pub fn normalize_path(path: &str) -> Result<String> {
    let bad = |reason: &str| Error::BadPath {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let nfc: String = path.nfc().collect();
    if nfc.is_empty() {
        return Err(bad("empty"));
    }
    if nfc.len() > MAX_PATH_LEN {
        return Err(bad("longer than 4096 bytes"));
    }
    if nfc.starts_with('/') {
        return Err(bad("absolute"));
    }
    let mut parts = Vec::new();
    for part in nfc.split('/') {
        match part {
            "" | "." | ".." => return Err(bad("empty, `.` or `..` component")),
            p if p.len() > MAX_NAME_LEN => return Err(bad("a component over 255 bytes")),
            p if p.contains(['\0', '\\']) => return Err(bad("NUL or backslash")),
            p => parts.push(p),
        }
    }
    if parts[0] == ".shoal" {
        return Err(bad("inside shoal's own folder"));
    }
    Ok(parts.join("/"))
}

/// The index document that holds `path` (already normalised).
pub fn shard_of(path: &str) -> DocId {
    let h = blake3::hash(path.as_bytes());
    shard_doc(h.as_bytes()[0] % INDEX_SHARDS)
}

/// The id of index shard `n`.
pub fn shard_doc(n: u8) -> DocId {
    DocId::try_from(format!("index-{:x}", n % INDEX_SHARDS)).unwrap_or_else(|_| DocId::members())
}

/// All index shard ids.
pub fn shards() -> impl Iterator<Item = DocId> {
    (0..INDEX_SHARDS).map(shard_doc)
}

/// Whether `doc` is one of the index shards.
pub fn is_index(doc: &DocId) -> bool {
    doc.as_str()
        .strip_prefix("index-")
        .is_some_and(|n| n.len() == 1 && u8::from_str_radix(n, 16).is_ok())
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A folder (recorded so empty folders sync).
    Dir,
    /// A symbolic link: recorded with its target, never followed.
    Symlink,
}

/// One version of one path, as packed into an index document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What the path is.
    pub kind: Kind,
    /// Content hash (see the module docs); zero for folders and links.
    pub hash: [u8; 32],
    /// Whether `hash` names a manifest (the file has several chunks).
    pub chunked: bool,
    /// Size in bytes.
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// The path was deleted; `hash` names the last content.
    pub deleted: bool,
    /// The device that wrote this version.
    pub device: DeviceId,
    /// A symbolic link's target.
    pub target: Option<String>,
}

impl Entry {
    /// Packs the entry (a version byte, then postcard).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![1u8];
        out.extend(crate::wire::encode(self));
        out
    }

    /// Unpacks an entry read from a document.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        match bytes.split_first() {
            Some((1, rest)) => crate::wire::decode("index entry", rest, MAX_ENTRY_BYTES),
            _ => Err(Error::Malformed {
                what: "index entry",
                reason: "unknown version".into(),
            }),
        }
    }

    /// Whether two entries describe the same content at a path.
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.deleted == other.deleted
            && (self.deleted
                || match self.kind {
                    Kind::File => self.hash == other.hash && self.size == other.size,
                    Kind::Dir => true,
                    Kind::Symlink => self.target == other.target,
                })
    }
}

/// Picks the version every device keeps when several were written
/// concurrently: an existing version beats a deletion (modify wins over
/// delete), then the later modification time, then the larger device id,
/// then the larger hash. Every device computes the same winner from the
/// same set, whatever order it arrived in.
pub fn winner(entries: &[Entry]) -> Option<&Entry> {
    entries.iter().max_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| a.target.cmp(&b.target))
            .then_with(|| (a.mode, a.chunked).cmp(&(b.mode, b.chunked)))
    })
}

/// What [`winner`] compares, most significant first. The kind and size
/// (and, after them, target, mode and chunking) only break ties between
/// entries that agree on the rest (the same device and time, the zero
/// hashes of a folder and a link): without them the pick depended on the
/// order the entries arrived in (found by the planner's property test).
fn rank(e: &Entry) -> (bool, i64, &[u8], [u8; 32], u8, u64) {
    let kind = match e.kind {
        Kind::File => 0u8,
        Kind::Dir => 1,
        Kind::Symlink => 2,
    };
    (
        !e.deleted,
        e.mtime_ns,
        e.device.as_bytes(),
        e.hash,
        kind,
        e.size,
    )
}

/// The ordered chunks of one file version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// BLAKE3 of the whole file.
    pub file_hash: [u8; 32],
    /// File size.
    pub size: u64,
    /// (chunk hash, chunk length), in file order.
    pub chunks: Vec<([u8; 32], u32)>,
}

impl Manifest {
    /// Encodes the manifest; its BLAKE3 is its name.
    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode(self)
    }

    /// The manifest's name.
    pub fn id(&self) -> [u8; 32] {
        *blake3::hash(&self.encode()).as_bytes()
    }

    /// Decodes a manifest received as `expected`, checking its name and
    /// that its chunk lengths add up to its size.
    pub fn decode(bytes: &[u8], expected: &[u8; 32]) -> Result<Self> {
        if blake3::hash(bytes).as_bytes() != expected {
            return Err(Error::Malformed {
                what: "manifest",
                reason: "hash mismatch".into(),
            });
        }
        let m: Manifest = crate::wire::decode("manifest", bytes, MAX_MANIFEST_BYTES)?;
        let total: u64 = m.chunks.iter().map(|(_, l)| u64::from(*l)).sum();
        // Chunking never cuts below the minimum except at the end, so a
        // manifest of tiny chunks (a way to make receivers do needless
        // work) is refused.
        let last = m.chunks.len().saturating_sub(1);
        let bad_len = m
            .chunks
            .iter()
            .enumerate()
            .any(|(i, (_, l))| *l == 0 || *l > CHUNK_MAX || (i < last && *l < CHUNK_MIN));
        if total != m.size || bad_len {
            return Err(Error::Malformed {
                what: "manifest",
                reason: "chunk lengths do not add up".into(),
            });
        }
        Ok(m)
    }

    /// Offsets of each chunk in the file.
    pub fn offsets(&self) -> Vec<u64> {
        let mut at = 0u64;
        self.chunks
            .iter()
            .map(|(_, l)| {
                let o = at;
                at += u64::from(*l);
                o
            })
            .collect()
    }
}

/// What a blob request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobKind {
    /// A manifest, by its name.
    Manifest,
    /// A chunk (or a whole one-chunk file), by its BLAKE3.
    Chunk,
}

/// One request on a blob stream; requests are pipelined and answered in
/// order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// Version 1.
    V1 {
        /// The space the blob belongs to (the peer must be a member).
        space: SpaceId,
        /// What is asked for.
        kind: BlobKind,
        /// Its hash.
        hash: [u8; 32],
    },
}

/// The answer to one [`BlobRequest`]; `Found` is followed by `len` raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// The bytes follow.
    Found {
        /// Their length.
        len: u32,
    },
    /// This node does not have it (or no longer has it intact).
    Missing,
    /// The asker is not an admitted member of the space.
    Refused,
}

/// Most bytes a response to a request of `kind` may carry.
pub fn max_blob_len(kind: BlobKind) -> usize {
    match kind {
        BlobKind::Manifest => MAX_MANIFEST_BYTES,
        BlobKind::Chunk => CHUNK_MAX as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A device id only needs to be a well-formed peer-id byte string here.
    fn dev(n: u8) -> DeviceId {
        let mut b = vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
        b.extend([n; 32]);
        DeviceId::from_bytes(b).unwrap()
    }

    fn entry(mtime: i64, d: u8, deleted: bool) -> Entry {
        Entry {
            kind: Kind::File,
            hash: [d; 32],
            chunked: false,
            size: 1,
            mode: 0o644,
            mtime_ns: mtime,
            deleted,
            device: dev(d),
            target: None,
        }
    }

    #[test]
    fn paths_are_normalised_and_checked() {
        // "é" as e + combining acute becomes one code point
        assert_eq!(normalize_path("a/e\u{301}.txt").unwrap(), "a/\u{e9}.txt");
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a//b",
            "./a",
            ".shoal/x",
            "a\\b",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(normalize_path(&"x".repeat(256)).is_err());
        assert!(normalize_path("sub/.shoal/x").is_ok());
    }

    #[test]
    fn shards_cover_paths_and_are_recognised() {
        let d = shard_of("photos/cat.jpg");
        assert!(is_index(&d));
        assert_eq!(shards().count(), INDEX_SHARDS as usize);
        assert!(!is_index(&DocId::members()));
        assert!(!is_index(&"index-10".parse().unwrap()));
    }

    #[test]
    fn entries_round_trip_and_refuse_junk() {
        let e = entry(5, 1, false);
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        assert!(Entry::decode(&[2, 0, 0]).is_err());
        assert!(Entry::decode(&[]).is_err());
    }

    #[test]
    fn modify_beats_delete_then_later_mtime_then_device() {
        let del = entry(100, 9, true);
        let old = entry(1, 1, false);
        assert_eq!(winner(&[del.clone(), old.clone()]), Some(&old));
        let newer = entry(2, 1, false);
        assert_eq!(winner(&[newer.clone(), old.clone()]), Some(&newer));
        let tie = entry(2, 2, false);
        assert_eq!(winner(&[newer.clone(), tie.clone()]), Some(&tie));
        assert_eq!(winner(&[tie.clone(), newer]), Some(&tie));
        assert_eq!(winner(&[]), None);
    }

    #[test]
    fn manifests_are_checked_against_their_name() {
        let m = Manifest {
            file_hash: [1; 32],
            size: u64::from(CHUNK_MIN) + 20,
            chunks: vec![([2; 32], CHUNK_MIN), ([3; 32], 20)],
        };
        let id = m.id();
        assert_eq!(Manifest::decode(&m.encode(), &id).unwrap(), m);
        assert!(Manifest::decode(&m.encode(), &[0; 32]).is_err());
        let lying = Manifest {
            size: m.size + 1,
            ..m.clone()
        };
        assert!(Manifest::decode(&lying.encode(), &lying.id()).is_err());
        let tiny = Manifest {
            file_hash: [1; 32],
            size: 3,
            chunks: vec![([2; 32], 1), ([3; 32], 2)],
        };
        assert!(Manifest::decode(&tiny.encode(), &tiny.id()).is_err());
        assert_eq!(
            Manifest {
                file_hash: [0; 32],
                size: 3,
                chunks: vec![([0; 32], 1), ([0; 32], 2)]
            }
            .offsets(),
            vec![0, 1]
        );
    }

    proptest! {
        #[test]
        fn winner_is_order_independent(mut v in proptest::collection::vec((0i64..4, 0u8..4, any::<bool>()), 1..6)) {
            let a: Vec<Entry> = v.iter().map(|(m, d, x)| entry(*m, *d, *x)).collect();
            v.reverse();
            let b: Vec<Entry> = v.iter().map(|(m, d, x)| entry(*m, *d, *x)).collect();
            prop_assert_eq!(winner(&a), winner(&b));
        }

        #[test]
        fn normalised_paths_are_stable(s in "[a-zé/ .]{1,40}") {
            if let Ok(p) = normalize_path(&s) {
                prop_assert_eq!(normalize_path(&p).unwrap(), p);
            }
        }
    }
}
