//! The content-addressed index of folder data. The bytes themselves stay in
//! the synced files: this index says where each chunk is.
//!
//! Trees:
//! - `f.folders`: space -> the folder's root path (UTF-8)
//! - `f.files`: `space | path` -> [`LocalFile`]: what this node last saw or
//!   wrote at a path (stat, content hash, file id)
//! - `f.fids`: file id -> [`FileRec`]: where a file with indexed chunks is
//!   (a synced path, or an old version under `.shoal/versions/`)
//! - `f.chunks`: `chunk hash | file id` -> `offset | length`
//! - `f.manifests`: `space | manifest id` -> encoded manifest
//! - `f.parts`: `space | part name` -> bitmap of the chunks already written
//!   into a transfer's temp file
//! - `f.cursors`: `space | shard` -> the shard heads already reconciled
//! - `f.pending`: `space | path` -> () paths whose index entry changed and
//!   whose file is not yet reconciled with it
//! - `f.kept`, `f.kept_paths`: old versions kept under `.shoal/versions/`,
//!   and `f.snapshots`: named states of the index (see [`super::kept`])
//!
//! Who writes what (each tree has one owner; the exceptions are
//! content-addressed and idempotent):
//! - a space's folder worker (`folder/worker/`), and the transfers it runs,
//!   which take its `fs` lock around each placement: `f.files` and the
//!   chunk locations of its files (`set_local`, `remove_local`, after a
//!   scan or a placement, re-checking the stat under the lock),
//!   `f.pending` and `f.cursors` (`mark_pending` records the paths and the
//!   cursor in one batch; `done_pending`), `f.parts` (a transfer its own
//!   part), and `f.kept*` through `folder/versions.rs`;
//! - `Folders` (attach, detach): `f.folders`, and forgetting a space;
//! - the API's snapshot command: `f.snapshots`;
//! - anyone who hashed or fetched a manifest: `f.manifests` (keyed by the
//!   manifest's own hash, so the same bytes whoever writes);
//! - a reader that finds a chunk location no longer holding its bytes (the
//!   blob server, a transfer copying a local chunk): `drop_location`, which
//!   only removes that one stale location; the worker's next scan of the
//!   file adds its locations back.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shoal_protocol::files::Manifest;
use shoal_protocol::{DocId, SpaceId};

use crate::error::{Error, Result};

/// What this node last saw (scanned) or wrote (placed) at a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFile {
    /// File id of its chunk records (0 for folders and links).
    pub fid: u64,
    /// Stat at that moment.
    pub stat: Stat,
    /// Content hash as in the index entry.
    pub hash: [u8; 32],
    /// Whether `hash` names a manifest.
    pub chunked: bool,
}

/// The parts of a stat that change when a file's content may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Stat {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Permission bits and file type.
    pub mode: u32,
}

/// A file whose chunks are indexed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRec {
    /// Its space.
    pub space: SpaceId,
    /// Path relative to the folder root.
    pub rel: String,
    /// Content hash.
    pub hash: [u8; 32],
    /// Whether `hash` names a manifest.
    pub chunked: bool,
}

/// Where one copy of a chunk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file id.
    pub fid: u64,
    /// Offset in the file.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Handle to the blob index. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Blobs {
    db: sled::Db,
    folders: sled::Tree,
    files: sled::Tree,
    fids: sled::Tree,
    chunks: sled::Tree,
    manifests: sled::Tree,
    parts: sled::Tree,
    cursors: sled::Tree,
    pending: sled::Tree,
    pub(super) kept: sled::Tree,
    pub(super) kept_paths: sled::Tree,
    pub(super) snapshots: sled::Tree,
}

pub(super) fn key(space: &SpaceId, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + rest.len());
    k.extend_from_slice(&space.0);
    k.extend_from_slice(rest);
    k
}

pub(super) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

pub(super) fn dec<T: DeserializeOwned>(what: &str, v: &[u8]) -> Result<T> {
    postcard::from_bytes(v).map_err(|e| Error::Corrupt {
        key: what.to_string(),
        reason: e.to_string(),
    })
}

impl Blobs {
    pub(super) fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            folders: db.open_tree("f.folders")?,
            files: db.open_tree("f.files")?,
            fids: db.open_tree("f.fids")?,
            chunks: db.open_tree("f.chunks")?,
            manifests: db.open_tree("f.manifests")?,
            parts: db.open_tree("f.parts")?,
            cursors: db.open_tree("f.cursors")?,
            pending: db.open_tree("f.pending")?,
            kept: db.open_tree("f.kept")?,
            kept_paths: db.open_tree("f.kept_paths")?,
            snapshots: db.open_tree("f.snapshots")?,
            db: db.clone(),
        })
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    // ----- folders --------------------------------------------------------

    /// Records the folder of a space.
    pub fn set_folder(&self, space: &SpaceId, root: &str) -> Result<()> {
        self.folders.insert(space.0, root.as_bytes())?;
        Ok(())
    }

    /// Every space with a folder, and its root.
    pub fn folders(&self) -> Result<Vec<(SpaceId, String)>> {
        let mut out = Vec::new();
        for kv in self.folders.iter() {
            let (k, v) = kv?;
            let id: [u8; 32] = k.as_ref().try_into().map_err(|_| Error::Corrupt {
                key: "folder".into(),
                reason: "bad space id".into(),
            })?;
            out.push((SpaceId(id), String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    // ----- local files ----------------------------------------------------

    /// What this node last saw at `path`.
    pub fn local(&self, space: &SpaceId, path: &str) -> Result<Option<LocalFile>> {
        match self.files.get(key(space, path.as_bytes()))? {
            Some(v) => Ok(Some(dec("local file", &v)?)),
            None => Ok(None),
        }
    }

    /// Every path this node knows in a space, with what it saw there.
    pub fn locals(&self, space: &SpaceId) -> Result<Vec<(String, LocalFile)>> {
        let mut out = Vec::new();
        for kv in self.files.scan_prefix(space.0) {
            let (k, v) = kv?;
            let path = String::from_utf8_lossy(&k[32..]).into_owned();
            out.push((path, dec("local file", &v)?));
        }
        Ok(out)
    }

    /// How many paths (files, folders, links) this node knows in a space.
    pub fn local_count(&self, space: &SpaceId) -> usize {
        self.files.scan_prefix(space.0).count()
    }

    /// Records what is now at `path`: replaces its chunk records with
    /// `chunks` (hash, offset, length). A previous file id of the path is
    /// reused.
    pub fn set_local(
        &self,
        space: &SpaceId,
        path: &str,
        stat: Stat,
        hash: [u8; 32],
        chunked: bool,
        chunks: &[([u8; 32], u64, u32)],
    ) -> Result<LocalFile> {
        let old = self.local(space, path)?;
        let fid = match old.as_ref().map(|o| o.fid).filter(|f| *f != 0) {
            Some(f) => {
                self.drop_chunks_of(f)?;
                f
            }
            None if chunks.is_empty() => 0,
            None => self.db.generate_id()? + 1,
        };
        if fid != 0 {
            self.fids.insert(
                fid.to_be_bytes(),
                enc(&FileRec {
                    space: *space,
                    rel: path.to_string(),
                    hash,
                    chunked,
                }),
            )?;
            let writes = chunks.iter().map(|(h, off, len)| {
                let mut k = h.to_vec();
                k.extend_from_slice(&fid.to_be_bytes());
                let mut v = off.to_be_bytes().to_vec();
                v.extend_from_slice(&len.to_be_bytes());
                (k, Some(v))
            });
            write_many(&self.chunks, writes.collect())?;
        }
        let rec = LocalFile {
            fid,
            stat,
            hash,
            chunked,
        };
        self.files.insert(key(space, path.as_bytes()), enc(&rec))?;
        Ok(rec)
    }

    /// The paths recorded below folder `dir` (not `dir` itself).
    pub fn locals_below(&self, space: &SpaceId, dir: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for kv in self
            .files
            .scan_prefix(key(space, format!("{dir}/").as_bytes()))
        {
            let (k, _) = kv?;
            out.push(String::from_utf8_lossy(&k[32..]).into_owned());
        }
        Ok(out)
    }

    /// Forgets `path` (and, unless `keep_chunks`, its chunk records).
    pub fn remove_local(&self, space: &SpaceId, path: &str, keep_chunks: bool) -> Result<()> {
        if let Some(old) = self.local(space, path)? {
            if old.fid != 0 && !keep_chunks {
                self.drop_chunks_of(old.fid)?;
                self.fids.remove(old.fid.to_be_bytes())?;
            }
        }
        self.files.remove(key(space, path.as_bytes()))?;
        Ok(())
    }

    /// The file at `from` moved to `rel` (an old version): its chunks stay
    /// indexed under the new place; the path it left forgets it. Returns
    /// the record it had there.
    pub fn relocate(&self, space: &SpaceId, from: &str, rel: &str) -> Result<Option<LocalFile>> {
        let old = self.local(space, from)?;
        if let Some(old) = &old {
            if old.fid != 0 {
                if let Some(v) = self.fids.get(old.fid.to_be_bytes())? {
                    let mut r: FileRec = dec("file record", &v)?;
                    r.rel = rel.to_string();
                    self.fids.insert(old.fid.to_be_bytes(), enc(&r))?;
                }
            }
            self.files.remove(key(space, from.as_bytes()))?;
        }
        Ok(old)
    }

    /// Drops every chunk record of the file at `rel` (an old version that
    /// retention removed).
    pub fn forget_rel(&self, space: &SpaceId, rel: &str) -> Result<()> {
        let mut gone = Vec::new();
        for kv in self.fids.iter() {
            let (k, v) = kv?;
            let r: FileRec = dec("file record", &v)?;
            if r.space == *space && r.rel == rel {
                gone.push(k);
            }
        }
        for k in gone {
            let mut id = [0u8; 8];
            id.copy_from_slice(&k);
            self.drop_chunks_of(u64::from_be_bytes(id))?;
            self.fids.remove(k)?;
        }
        Ok(())
    }

    /// Drops the chunk records of file `fid` and the file record.
    pub fn forget_fid(&self, fid: u64) -> Result<()> {
        if fid != 0 {
            self.drop_chunks_of(fid)?;
            self.fids.remove(fid.to_be_bytes())?;
        }
        Ok(())
    }

    /// A fresh id, unique in this store.
    pub fn new_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    fn drop_chunks_of(&self, fid: u64) -> Result<()> {
        let Some(v) = self.fids.get(fid.to_be_bytes())? else {
            return Ok(());
        };
        let rec: FileRec = dec("file record", &v)?;
        let hashes: Vec<[u8; 32]> = if rec.chunked {
            match self.manifest(&rec.space, &rec.hash)? {
                Some(m) => m.chunks.iter().map(|(h, _)| *h).collect(),
                None => Vec::new(),
            }
        } else {
            vec![rec.hash]
        };
        let removes = hashes.iter().map(|h| {
            let mut k = h.to_vec();
            k.extend_from_slice(&fid.to_be_bytes());
            (k, None)
        });
        write_many(&self.chunks, removes.collect())
    }

    /// The file record of `fid`.
    pub fn file(&self, fid: u64) -> Result<Option<FileRec>> {
        match self.fids.get(fid.to_be_bytes())? {
            Some(v) => Ok(Some(dec("file record", &v)?)),
            None => Ok(None),
        }
    }

    /// Where copies of chunk `hash` are.
    pub fn locations(&self, hash: &[u8; 32]) -> Result<Vec<Location>> {
        let mut out = Vec::new();
        for kv in self.chunks.scan_prefix(hash) {
            let (k, v) = kv?;
            if k.len() != 40 || v.len() != 12 {
                continue;
            }
            let mut fid = [0u8; 8];
            fid.copy_from_slice(&k[32..]);
            let mut off = [0u8; 8];
            off.copy_from_slice(&v[..8]);
            let mut len = [0u8; 4];
            len.copy_from_slice(&v[8..]);
            out.push(Location {
                fid: u64::from_be_bytes(fid),
                offset: u64::from_be_bytes(off),
                len: u32::from_be_bytes(len),
            });
        }
        Ok(out)
    }

    /// Drops one location that no longer holds its chunk.
    pub fn drop_location(&self, hash: &[u8; 32], fid: u64) -> Result<()> {
        let mut k = hash.to_vec();
        k.extend_from_slice(&fid.to_be_bytes());
        self.chunks.remove(k)?;
        Ok(())
    }

    // ----- manifests ------------------------------------------------------

    /// Stores a manifest under its id.
    pub fn put_manifest(&self, space: &SpaceId, m: &Manifest) -> Result<[u8; 32]> {
        let bytes = m.encode();
        let id = *blake3::hash(&bytes).as_bytes();
        self.manifests.insert(key(space, &id), bytes)?;
        Ok(id)
    }

    /// The encoded manifest `id` of a space.
    pub fn manifest_bytes(&self, space: &SpaceId, id: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        Ok(self.manifests.get(key(space, id))?.map(|v| v.to_vec()))
    }

    /// Manifest `id` of a space, decoded.
    pub fn manifest(&self, space: &SpaceId, id: &[u8; 32]) -> Result<Option<Manifest>> {
        match self.manifest_bytes(space, id)? {
            Some(b) => Ok(Some(Manifest::decode(&b, id)?)),
            None => Ok(None),
        }
    }

    // ----- transfers ------------------------------------------------------

    /// Which chunks of a transfer are already in its temp file.
    pub fn part(&self, space: &SpaceId, name: &str) -> Result<Vec<u8>> {
        Ok(self
            .parts
            .get(key(space, name.as_bytes()))?
            .map(|v| v.to_vec())
            .unwrap_or_default())
    }

    /// Records a transfer's progress.
    pub fn set_part(&self, space: &SpaceId, name: &str, bits: &[u8]) -> Result<()> {
        self.parts.insert(key(space, name.as_bytes()), bits)?;
        Ok(())
    }

    /// Forgets a finished or abandoned transfer.
    pub fn remove_part(&self, space: &SpaceId, name: &str) -> Result<()> {
        self.parts.remove(key(space, name.as_bytes()))?;
        Ok(())
    }

    // ----- reconciliation -------------------------------------------------

    /// The heads of `shard` already reconciled.
    pub fn cursor(&self, space: &SpaceId, shard: &DocId) -> Result<Vec<[u8; 32]>> {
        match self.cursors.get(key(space, shard.as_str().as_bytes()))? {
            Some(v) => dec("cursor", &v),
            None => Ok(Vec::new()),
        }
    }

    /// Marks paths as needing reconciliation and moves the shard's cursor,
    /// in one batch.
    pub fn add_pending(
        &self,
        space: &SpaceId,
        shard: &DocId,
        heads: &[[u8; 32]],
        paths: &[String],
    ) -> Result<()> {
        // Each mark carries a fresh token, so finishing work decided on an
        // older mark cannot clear a newer one.
        let token = self.db.generate_id()?.to_be_bytes();
        let mut batch = sled::Batch::default();
        for p in paths {
            batch.insert(key(space, p.as_bytes()), &token[..]);
        }
        self.pending.apply_batch(batch)?;
        self.cursors
            .insert(key(space, shard.as_str().as_bytes()), enc(&heads.to_vec()))?;
        Ok(())
    }

    /// Marks one path as needing reconciliation.
    pub fn mark_pending(&self, space: &SpaceId, path: &str) -> Result<()> {
        let token = self.db.generate_id()?.to_be_bytes();
        self.pending
            .insert(key(space, path.as_bytes()), &token[..])?;
        Ok(())
    }

    /// Up to `limit` paths waiting for reconciliation, with their marks.
    pub fn pending(&self, space: &SpaceId, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for kv in self.pending.scan_prefix(space.0).take(limit) {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k[32..]).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// How many paths wait for reconciliation.
    pub fn pending_count(&self, space: &SpaceId) -> usize {
        self.pending.scan_prefix(space.0).count()
    }

    /// A path is reconciled, unless it was marked again since `mark` was
    /// read.
    pub fn done_pending(&self, space: &SpaceId, path: &str, mark: &[u8]) -> Result<()> {
        let _ = self.pending.compare_and_swap(
            key(space, path.as_bytes()),
            Some(mark),
            None::<&[u8]>,
        )?;
        Ok(())
    }
}

/// Applies `writes` (a value, or `None` to remove) to `tree`: one by one
/// when they are few, as one batch when many. A sled batch forces two
/// synchronous log writes, which for a one-chunk file cost more than the
/// file itself. Chunk records need no atomicity: a stale one fails
/// verification when read and is dropped, a missing one means a fetch.
fn write_many(tree: &sled::Tree, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
    const ONE_BY_ONE: usize = 32;
    if writes.len() <= ONE_BY_ONE {
        for (k, v) in writes {
            match v {
                Some(v) => {
                    tree.insert(k, v)?;
                }
                None => {
                    tree.remove(k)?;
                }
            }
        }
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for (k, v) in writes {
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_locations_follow_files_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let b = Blobs::open(&db).unwrap();
        let s = SpaceId([7; 32]);
        let st = Stat::default();
        let l = b
            .set_local(&s, "a.txt", st, [1; 32], false, &[([1; 32], 0, 5)])
            .unwrap();
        assert_ne!(l.fid, 0);
        assert_eq!(b.locations(&[1; 32]).unwrap().len(), 1);
        // a new version of the same path replaces its chunk records
        b.set_local(&s, "a.txt", st, [2; 32], false, &[([2; 32], 0, 6)])
            .unwrap();
        assert!(b.locations(&[1; 32]).unwrap().is_empty());
        // moved into versions: still findable, the path forgets it
        b.relocate(&s, "a.txt", ".shoal/versions/a.txt~1").unwrap();
        let loc = b.locations(&[2; 32]).unwrap();
        assert_eq!(
            b.file(loc[0].fid).unwrap().unwrap().rel,
            ".shoal/versions/a.txt~1"
        );
        assert!(b.local(&s, "a.txt").unwrap().is_none());
        b.forget_rel(&s, ".shoal/versions/a.txt~1").unwrap();
        assert!(b.locations(&[2; 32]).unwrap().is_empty());
    }

    #[test]
    fn pending_paths_and_cursor_move_together() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let b = Blobs::open(&db).unwrap();
        let s = SpaceId([7; 32]);
        let shard: DocId = "index-1".parse().unwrap();
        b.add_pending(&s, &shard, &[[9; 32]], &["x".into(), "y".into()])
            .unwrap();
        assert_eq!(b.cursor(&s, &shard).unwrap(), vec![[9; 32]]);
        let marks = b.pending(&s, 10).unwrap();
        assert_eq!(
            marks.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            vec!["x", "y"]
        );
        b.done_pending(&s, "x", &marks[0].1).unwrap();
        assert_eq!(b.pending_count(&s), 1);
        // marked again after it was read: finishing the old work keeps it
        b.mark_pending(&s, "y").unwrap();
        b.done_pending(&s, "y", &marks[1].1).unwrap();
        assert_eq!(b.pending_count(&s), 1);
    }
}
