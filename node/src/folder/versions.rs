//! Old versions: keeping what a remote change replaces or deletes, and
//! retention (by age and bytes, [`shoal_protocol::retain`]).

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use shoal_protocol::retain::{self, Policy};
use shoal_protocol::SpaceId;
use tracing::{info, warn};

use shoal_protocol::files::{self, Entry};
use shoal_protocol::plan;

use super::fetch::TransferError;
use super::place;
use super::scan;
use super::worker::Worker;
use crate::engine::IndexCommand;
use crate::error::Error;
use crate::store::kept::KeptRec;
use crate::store::Blobs;
use crate::Event;

/// `S_IFMT` and `S_IFREG`: whether a recorded stat is a regular file.
fn is_file(mode: u32) -> bool {
    mode & 0o170_000 == 0o100_000
}

impl Worker {
    /// Moves what is at `rel` into `.shoal/versions/` under a fresh id,
    /// keeping its chunks indexed there (so it is served and restorable),
    /// and records each file as a kept version: `rel` itself, or, for a
    /// folder, every recorded file in it.
    pub(super) fn keep_old(&self, rel: &str) -> io::Result<()> {
        let blobs = &self.shared.blobs;
        let io = |e: Error| io::Error::other(e.to_string());
        let id = blobs.new_id().map_err(io)?;
        let children = blobs.locals_below(&self.space, rel).map_err(io)?;
        let unrecorded = std::fs::symlink_metadata(self.root.join(rel))
            .ok()
            .filter(|m| m.is_file());
        let store = place::store_version(&self.root, rel, id)?;
        let now = crate::metrics::unix_millis();
        let mut moved = vec![(id, rel.to_string(), store.clone())];
        for child in children {
            let at = format!("{store}{}", &child[rel.len()..]);
            moved.push((blobs.new_id().map_err(io)?, child, at));
        }
        let mut bytes = 0u64;
        for (kid, path, at) in moved {
            let rec = match blobs.relocate(&self.space, &path, &at).map_err(io)? {
                Some(l) if is_file(l.stat.mode) => KeptRec {
                    path,
                    store: at,
                    hash: l.hash,
                    chunked: l.chunked,
                    size: l.stat.size,
                    mtime_ns: l.stat.mtime_ns,
                    kept_ms: now,
                    fid: l.fid,
                },
                // A file never scanned here: kept and listed all the same.
                None if kid == id && unrecorded.is_some() => {
                    let m = unrecorded.as_ref().map(|m| (m.len(), m.modified()));
                    KeptRec {
                        path,
                        store: at,
                        hash: [0; 32],
                        chunked: false,
                        size: m.as_ref().map_or(0, |m| m.0),
                        mtime_ns: m
                            .and_then(|m| m.1.ok())
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos() as i64),
                        kept_ms: now,
                        fid: 0,
                    }
                }
                _ => continue,
            };
            bytes += rec.size;
            blobs.put_kept(&self.space, kid, &rec).map_err(io)?;
        }
        let total = self.kept_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if self
            .shared
            .settings
            .retention
            .max_bytes
            .is_some_and(|b| total > b)
        {
            self.retain_due.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Applies retention now, off the async threads.
    pub(super) async fn retain(&self) {
        let (blobs, space, root, policy) = (
            self.shared.blobs.clone(),
            self.space,
            self.root.clone(),
            self.shared.settings.retention.clone(),
        );
        let now = crate::metrics::unix_millis();
        let r = self
            .shared
            .blocking
            .spawn_blocking(move || retain_blocking(&blobs, &space, &root, &policy, now))
            .await;
        match r {
            Ok(Ok((dropped, left))) => {
                self.kept_bytes.store(left, Ordering::SeqCst);
                if dropped > 0 {
                    info!(space = %self.space.short(), dropped, bytes_left = left, "old versions thinned");
                }
            }
            Ok(Err(e)) => warn!(space = %self.space.short(), error = %e, "retention failed"),
            Err(e) => warn!(space = %self.space.short(), error = %e, "retention failed"),
        }
    }
}

/// Drops the kept versions `policy` says go; returns how many went and the
/// bytes the rest hold.
fn retain_blocking(
    blobs: &Blobs,
    space: &SpaceId,
    root: &Path,
    policy: &Policy,
    now_ms: i64,
) -> Result<(usize, u64), Error> {
    let all = blobs.kept_all(space)?;
    let items: Vec<retain::Kept> = all
        .iter()
        .map(|(id, r)| retain::Kept {
            id: *id,
            path: r.path.clone(),
            at_ms: r.kept_ms,
            size: r.size,
        })
        .collect();
    let drop: HashSet<u64> = retain::to_drop(&items, now_ms, policy)
        .into_iter()
        .collect();
    let mut left = 0u64;
    for (id, r) in &all {
        if !drop.contains(id) {
            left += r.size;
            continue;
        }
        place::remove_version(root, &r.store)
            .map_err(|e| Error::io("remove old version", root.join(&r.store), e))?;
        blobs.drop_kept(space, *id)?;
    }
    Ok((drop.len(), left))
}

/// Where a version's content is, as far as this device can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// In the file at its path on this device.
    Here,
    /// Among this device's kept old versions of the path.
    Kept,
    /// Elsewhere on this device (another path or version holds the bytes).
    Local,
    /// Not here; a connected member said it has it.
    Peer,
    /// Not here, and no connected member has it.
    Gone,
    /// Not here, and no member is connected to ask.
    Unknown,
    /// A folder or link: nothing to fetch.
    None,
}

impl Worker {
    /// Whether this device can assemble version `e` from its own chunks.
    fn held_locally(&self, e: &Entry) -> bool {
        let blobs = &self.shared.blobs;
        let has = |h: &[u8; 32]| blobs.locations(h).is_ok_and(|l| !l.is_empty());
        if e.size == 0 {
            return true;
        }
        if !e.chunked {
            return has(&e.hash);
        }
        match blobs.manifest(&self.space, &e.hash) {
            Ok(Some(m)) => m.chunks.iter().all(|(h, _)| has(h)),
            _ => false,
        }
    }

    /// Where the content of version `e` of `rel` is. Asks connected
    /// members (for its manifest, or its one chunk) only when this device
    /// does not have it.
    pub(super) async fn where_is(&self, rel: &str, e: &Entry) -> Content {
        use shoal_protocol::files::{BlobKind, Kind};
        if e.kind != Kind::File {
            return Content::None;
        }
        let blobs = &self.shared.blobs;
        let here = blobs
            .local(&self.space, rel)
            .ok()
            .flatten()
            .is_some_and(|l| l.hash == e.hash);
        let held = self.held_locally(e);
        if here && !e.deleted && held {
            return Content::Here;
        }
        if held {
            let kept = blobs
                .kept_of(&self.space, rel)
                .is_ok_and(|k| k.iter().any(|(_, r)| r.hash == e.hash));
            return if kept { Content::Kept } else { Content::Local };
        }
        let Ok(peers) = self.shared.engine.peers(self.space).await else {
            return Content::Unknown;
        };
        if peers.is_empty() {
            return Content::Unknown;
        }
        let kind = if e.chunked {
            BlobKind::Manifest
        } else {
            BlobKind::Chunk
        };
        // Gone only if every member asked answered that it does not have
        // it; a link that failed leaves the answer open.
        let mut answered = true;
        for p in peers {
            match self.shared.links.get(p, self.space, kind, e.hash).await {
                Ok(_) => return Content::Peer,
                Err(super::links::FetchError::Missing) => {}
                Err(_) => answered = false,
            }
        }
        if answered {
            Content::Gone
        } else {
            Content::Unknown
        }
    }

    /// Places version `v`'s content at `to` and publishes it as this
    /// device's new version of `to`. The content comes from this device's
    /// chunks (kept versions included) or from members, verified like any
    /// transfer. Whatever `to` holds is kept first: as an old version if
    /// it was recorded, as a conflict copy if it is an edit not yet seen.
    /// Returns the entry to publish ([`Worker::publish_restored`]), or
    /// `None` when `to` already holds that content.
    pub(super) async fn restore_place(
        &self,
        to: &str,
        v: &Entry,
    ) -> Result<Option<Entry>, TransferError> {
        use shoal_protocol::files::Kind;
        let failed = |e: String| TransferError::Failed(format!("{to}: {e}"));
        if v.kind != Kind::File {
            return Err(failed("only files are restored this way".into()));
        }
        place::check_parents(&self.root, to).map_err(|e| failed(e.to_string()))?;
        let values = self
            .current_values(to)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let now_winner = files::winner(&values).cloned();
        let blobs = &self.shared.blobs;
        let local = blobs
            .local(&self.space, to)
            .map_err(|e| failed(e.to_string()))?;
        if now_winner
            .as_ref()
            .is_some_and(|w| !w.deleted && w.kind == Kind::File && w.hash == v.hash)
            && local.as_ref().is_some_and(|l| l.hash == v.hash)
        {
            return Ok(None);
        }
        let fetched = self.fetch(to, v).await?;
        let mtime = std::time::SystemTime::now();
        {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&fetched.temp)
                .map_err(|e| failed(format!("open: {e}")))?;
            let _ = f.set_modified(mtime);
            use std::os::unix::fs::PermissionsExt;
            let _ = f.set_permissions(std::fs::Permissions::from_mode(v.mode & 0o777));
        }
        let guard = self.fs.lock().await;
        let abs = self.root.join(to);
        let local = blobs
            .local(&self.space, to)
            .map_err(|e| failed(e.to_string()))?;
        let mut mine = v.clone();
        mine.device = self.shared.me.clone();
        mine.deleted = false;
        if let Ok(m) = std::fs::symlink_metadata(&abs) {
            let st = scan::stat_of(&m);
            let known = local.as_ref().is_some_and(|l| l.stat == st);
            let recorded = local.as_ref().map(|l| plan::Recorded {
                hash: l.hash,
                chunked: l.chunked,
            });
            // The restore supersedes every current value: what is here is
            // an old version (or, unrecorded, a conflict copy), never a
            // loser of a conflict with it.
            let aside = plan::set_aside_as(
                known,
                st.mtime_ns,
                recorded,
                std::slice::from_ref(&mine),
                &mine,
                &self.shared.me,
            );
            self.set_aside(to, aside)
                .map_err(|e| failed(e.to_string()))?;
        }
        let dest = place::safe_parent(&self.root, to).map_err(|e| failed(e.to_string()))?;
        let placed = self.placing(to);
        std::fs::rename(&fetched.temp, &dest).map_err(|e| failed(format!("place: {e}")))?;
        let st =
            scan::stat_of(&std::fs::symlink_metadata(&dest).map_err(|e| failed(e.to_string()))?);
        drop(guard);
        self.sync
            .durable(&self.root)
            .await
            .map_err(|e| failed(format!("sync: {e}")))?;
        blobs
            .set_local(&self.space, to, st, v.hash, v.chunked, &fetched.chunks)
            .map_err(|e| failed(e.to_string()))?;
        drop(placed);
        let _ = blobs.remove_part(&self.space, &fetched.part);
        mine.mtime_ns = st.mtime_ns;
        mine.size = st.size;
        mine.mode = st.mode & 0o7777;
        Ok(Some(mine))
    }

    /// Publishes restored versions (and removals) in one change per shard.
    pub(super) async fn publish_restored(
        &self,
        entries: Vec<(String, Entry)>,
    ) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let packed = entries
            .iter()
            .map(|(p, e)| (p.clone(), e.encode()))
            .collect();
        self.shared
            .engine
            .index(|reply| IndexCommand::Put {
                space: self.space,
                entries: packed,
                reply,
            })
            .await?;
        for (path, e) in entries {
            info!(space = %self.space.short(), path, hash = %hex::encode(&e.hash[..8]), deleted = e.deleted, "restored");
            self.shared.emit(Event::Restored {
                space: self.space.to_owned(),
                path,
                hash: hex::encode(e.hash),
                size: e.size,
                deleted: e.deleted,
            });
        }
        Ok(())
    }

    /// Publishes the deletion of what `rel` holds (a point-in-time restore
    /// removing a file created after that time), keeping it first.
    /// Returns the deletion to publish.
    pub(super) async fn restore_removal(&self, rel: &str) -> Result<Entry, TransferError> {
        let failed = |e: String| TransferError::Failed(format!("{rel}: {e}"));
        let guard = self.fs.lock().await;
        let blobs = &self.shared.blobs;
        let Some(had) = blobs
            .local(&self.space, rel)
            .map_err(|e| failed(e.to_string()))?
        else {
            return Err(failed(
                "not recorded here yet; try again when the folder is in sync".into(),
            ));
        };
        let values = self
            .current_values(rel)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let recorded = plan::Recorded {
            hash: had.hash,
            chunked: had.chunked,
        };
        let plan::Vanished::Delete(e) =
            plan::vanished(&values, recorded, &self.shared.me, super::worker::now_ns())
        else {
            return Err(failed("the index moved on; try again".into()));
        };
        self.keep_old(rel).map_err(|e| failed(e.to_string()))?;
        drop(guard);
        Ok(e)
    }

    /// The index's current values of `rel`.
    pub(super) async fn current_values(&self, rel: &str) -> Result<Vec<Entry>, Error> {
        let v = self.index_get(vec![rel.to_string()]).await?;
        Ok(v.first()
            .map(|v| v.iter().filter_map(|b| Entry::decode(b).ok()).collect())
            .unwrap_or_default())
    }
}
