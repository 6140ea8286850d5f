//! Old versions kept under a folder's `.shoal/versions/`: each is a file
//! named by a store-wide id (so no user file name can collide with one, and
//! a path of any length is kept), described by a record here.
//!
//! Trees (in [`Blobs`]):
//! - `f.kept`: `space | id` -> [`KeptRec`]
//! - `f.kept_paths`: `space | path | 0 | id` -> () (a path's versions)
//! - `f.snapshots`: `space | name` -> [`SnapshotRec`] (this device's names
//!   for states of the index)

use serde::{Deserialize, Serialize};
use shoal_protocol::SpaceId;

use super::blobs::{dec, enc, key, Blobs};
use crate::error::Result;

/// One kept old version of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRec {
    /// The path it was a version of.
    pub path: String,
    /// Where it is, relative to the folder root (under `.shoal/versions/`).
    pub store: String,
    /// Its content hash as in the index (zero if it was never recorded).
    pub hash: [u8; 32],
    /// Whether `hash` names a manifest.
    pub chunked: bool,
    /// Its size.
    pub size: u64,
    /// Its modification time (ns).
    pub mtime_ns: i64,
    /// When it was kept (ms since the epoch).
    pub kept_ms: i64,
    /// Its chunk records' file id (0: none).
    pub fid: u64,
}

/// A named state of a space's index: the heads of each shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRec {
    /// When it was taken (ms since the epoch).
    pub taken_ms: i64,
    /// (shard document id, its heads).
    pub heads: Vec<(String, Vec<[u8; 32]>)>,
}

fn path_key(space: &SpaceId, path: &str, id: u64) -> Vec<u8> {
    let mut rest = path.as_bytes().to_vec();
    rest.push(0);
    rest.extend_from_slice(&id.to_be_bytes());
    key(space, &rest)
}

fn id_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() >= 8 {
        b.copy_from_slice(&k[k.len() - 8..]);
    }
    u64::from_be_bytes(b)
}

impl Blobs {
    /// Records a kept version under `id` (from [`Blobs::new_id`]).
    pub fn put_kept(&self, space: &SpaceId, id: u64, rec: &KeptRec) -> Result<()> {
        self.kept.insert(key(space, &id.to_be_bytes()), enc(rec))?;
        self.kept_paths
            .insert(path_key(space, &rec.path, id), &[])?;
        Ok(())
    }

    /// The kept versions of `path`, oldest first.
    pub fn kept_of(&self, space: &SpaceId, path: &str) -> Result<Vec<(u64, KeptRec)>> {
        let mut prefix = key(space, path.as_bytes());
        prefix.push(0);
        let mut out: Vec<(u64, KeptRec)> = Vec::new();
        for kv in self.kept_paths.scan_prefix(&prefix) {
            let (k, _) = kv?;
            if k.len() != prefix.len() + 8 {
                continue;
            }
            let id = id_of(&k);
            if let Some(v) = self.kept.get(key(space, &id.to_be_bytes()))? {
                out.push((id, dec("kept version", &v)?));
            }
        }
        out.sort_by_key(|(id, r)| (r.kept_ms, *id));
        Ok(out)
    }

    /// Every kept version of a space.
    pub fn kept_all(&self, space: &SpaceId) -> Result<Vec<(u64, KeptRec)>> {
        let mut out = Vec::new();
        for kv in self.kept.scan_prefix(space.0) {
            let (k, v) = kv?;
            out.push((id_of(&k), dec("kept version", &v)?));
        }
        Ok(out)
    }

    /// Forgets kept version `id` and its chunk records; returns its record.
    pub fn drop_kept(&self, space: &SpaceId, id: u64) -> Result<Option<KeptRec>> {
        let Some(v) = self.kept.remove(key(space, &id.to_be_bytes()))? else {
            return Ok(None);
        };
        let rec: KeptRec = dec("kept version", &v)?;
        self.kept_paths.remove(path_key(space, &rec.path, id))?;
        self.forget_fid(rec.fid)?;
        Ok(Some(rec))
    }
}

impl Blobs {
    /// Names a state; refuses a name already taken.
    pub fn put_snapshot(&self, space: &SpaceId, name: &str, rec: &SnapshotRec) -> Result<bool> {
        let r = self.snapshots.compare_and_swap(
            key(space, name.as_bytes()),
            None as Option<&[u8]>,
            Some(enc(rec)),
        )?;
        Ok(r.is_ok())
    }

    /// A named state.
    pub fn snapshot(&self, space: &SpaceId, name: &str) -> Result<Option<SnapshotRec>> {
        match self.snapshots.get(key(space, name.as_bytes()))? {
            Some(v) => Ok(Some(dec("snapshot", &v)?)),
            None => Ok(None),
        }
    }

    /// Every named state of a space, by name.
    pub fn snapshots(&self, space: &SpaceId) -> Result<Vec<(String, SnapshotRec)>> {
        let mut out = Vec::new();
        for kv in self.snapshots.scan_prefix(space.0) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[space.0.len()..]).into_owned();
            out.push((name, dec("snapshot", &v)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_versions_are_listed_by_path_and_dropped_with_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let b = Blobs::open(&db).unwrap();
        let s = SpaceId([7; 32]);
        let rec = |path: &str, ms: i64| KeptRec {
            path: path.into(),
            store: format!(".shoal/versions/{ms}"),
            hash: [1; 32],
            chunked: false,
            size: 3,
            mtime_ns: 0,
            kept_ms: ms,
            fid: 0,
        };
        b.put_kept(&s, 2, &rec("a", 20)).unwrap();
        b.put_kept(&s, 1, &rec("a", 10)).unwrap();
        b.put_kept(&s, 3, &rec("a/b", 5)).unwrap();
        let a: Vec<u64> = b
            .kept_of(&s, "a")
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(a, vec![1, 2]);
        assert_eq!(b.kept_all(&s).unwrap().len(), 3);
        assert_eq!(b.drop_kept(&s, 1).unwrap(), Some(rec("a", 10)));
        assert_eq!(b.kept_of(&s, "a").unwrap().len(), 1);
        assert_eq!(b.drop_kept(&s, 1).unwrap(), None);
    }
}
