//! Placement: setting aside what is in a winner's way, and transfers that
//! fetch a version and place it.

use super::*;

impl Worker {
    /// Whatever is at `rel` makes way for the winner, as the planner said
    /// ([`plan::set_aside_as`]): a conflict copy or an old version.
    pub(in crate::folder) fn set_aside(&self, rel: &str, aside: plan::Aside) -> io::Result<()> {
        let abs = self.root.join(rel);
        match aside {
            plan::Aside::Conflict { mtime_ns, device } => {
                let device = device.short();
                let want = place::conflict_name(rel, mtime_ns, &device);
                let copy = place::free_name(&self.root, &want);
                fs::rename(&abs, self.root.join(&copy))?;
                let io = |e: Error| io::Error::other(e.to_string());
                let blobs = &self.shared.blobs;
                // A folder's contents moved with it: forgetting their
                // records makes the scan publish them under the copy, and
                // no deletion at their old paths.
                for child in blobs.locals_below(&self.space, rel).map_err(io)? {
                    blobs.remove_local(&self.space, &child, false).map_err(io)?;
                }
                blobs.remove_local(&self.space, rel, false).map_err(io)?;
                self.shared
                    .counters
                    .conflicts
                    .fetch_add(1, Ordering::Relaxed);
                info!(space = %self.space.short(), path = rel, %copy, "conflict: the other version is kept as a copy");
                self.shared.emit(Event::Conflict {
                    space: self.space.to_owned(),
                    path: rel.to_string(),
                    copy,
                    device,
                });
                Ok(())
            }
            plan::Aside::OldVersion => self.keep_old(rel),
        }
    }

    /// Fetches version `w` of `rel` and places it.
    pub(super) async fn transfer(
        &self,
        rel: &str,
        w: &Entry,
        all: &[Entry],
        mark: &[u8],
    ) -> Result<(), TransferError> {
        place::check_parents(&self.root, rel)
            .map_err(|e| TransferError::Failed(format!("{rel}: {e}")))?;
        let started = Instant::now();
        // A file here that is not yet recorded may already be this version
        // (two folders that started with the same files).
        let abs = self.root.join(rel);
        if let Ok(m) = fs::symlink_metadata(&abs) {
            let local = self.shared.blobs.local(&self.space, rel).ok().flatten();
            let known = local.as_ref().is_some_and(|l| l.stat == scan::stat_of(&m));
            if m.is_file() && !known && m.len() == w.size {
                let a = abs.clone();
                if let Ok(Ok(Some(h))) =
                    tokio::task::spawn_blocking(move || scan::hash_file(&a)).await
                {
                    if h.version().0 == w.hash {
                        let _g = self.fs.lock().await;
                        let now = fs::symlink_metadata(&abs).map(|m| scan::stat_of(&m)).ok();
                        if now == Some(h.stat) {
                            if let Some(m) = h.version().2 {
                                let _ = self.shared.blobs.put_manifest(&self.space, &m);
                            }
                            self.shared
                                .blobs
                                .set_local(&self.space, rel, h.stat, w.hash, w.chunked, &h.chunks)
                                .map_err(|e| TransferError::Failed(e.to_string()))?;
                            let _ = self.shared.blobs.done_pending(&self.space, rel, mark);
                            return Ok(());
                        }
                    }
                }
            }
        }
        let big = w.size >= 1 << 20;
        if big {
            self.shared.emit(Event::TransferStarted {
                space: self.space.to_owned(),
                path: rel.to_string(),
                bytes: w.size,
            });
        }
        let fetched = self.fetch(rel, w).await?;
        stamp(&fetched.temp, w).map_err(|e| TransferError::Failed(format!("open {rel}: {e}")))?;
        let guard = self.fs.lock().await;
        let blobs = &self.shared.blobs;
        // The index may have moved on while we fetched. Asked every time,
        // under the lock: a stale version placed here would be found by
        // the scanner as content that is not the winner, and published
        // as a local edit over the newer one.
        let current = self
            .index_get(vec![rel.to_string()])
            .await
            .map_err(|e| TransferError::Failed(e.to_string()))?;
        let now_values = entries(current.first().map(|v| v.as_slice()).unwrap_or_default());
        if files::winner(&now_values).is_some_and(|n| n.hash != w.hash || n.deleted) {
            return Err(TransferError::Failed(
                "superseded while fetched; again".into(),
            ));
        }
        let fail = |e: io::Error| TransferError::Failed(format!("place {rel}: {e}"));
        let local = blobs
            .local(&self.space, rel)
            .map_err(|e| TransferError::Failed(e.to_string()))?;
        if let Ok(m) = fs::symlink_metadata(&abs) {
            let st = scan::stat_of(&m);
            let known = local.as_ref().is_some_and(|l| l.stat == st);
            if m.is_dir() {
                return Err(TransferError::Failed(format!("{rel} is a folder here")));
            }
            let all: Vec<Entry> = if now_values.is_empty() {
                all.to_vec()
            } else {
                now_values
            };
            let recorded = local.as_ref().map(|l| plan::Recorded {
                hash: l.hash,
                chunked: l.chunked,
            });
            let aside = plan::set_aside_as(known, st.mtime_ns, recorded, &all, w, &self.shared.me);
            self.set_aside(rel, aside).map_err(fail)?;
        }
        let dest = place::safe_parent(&self.root, rel).map_err(fail)?;
        let placed = self.placing(rel);
        fs::rename(&fetched.temp, &dest).map_err(fail)?;
        let st = scan::stat_of(&fs::symlink_metadata(&dest).map_err(fail)?);
        // The rename is made durable outside the lock, so placements in
        // parallel share the folder syncs; the path is recorded after it.
        // (A scan in between finds the winner's content and only adopts it.)
        drop(guard);
        if w.size >= crate::folder::OWN_SYNC_BYTES {
            if let Some(parent) = dest.parent().map(Path::to_path_buf) {
                tokio::task::spawn_blocking(move || place::sync_dir(&parent))
                    .await
                    .map_err(|e| TransferError::Failed(e.to_string()))?
                    .map_err(fail)?;
            }
        } else {
            self.sync.durable(&self.root).await.map_err(fail)?;
        }
        if !self.shared.settings.record_delay.is_zero() {
            tokio::time::sleep(self.shared.settings.record_delay).await;
        }
        // Recorded only if still where it was put: a decision taken while
        // the lock was free (a link over its folder) may have moved it
        // aside, and a record of it here would read as its deletion.
        let g = self.fs.lock().await;
        if still_there(&dest, st) {
            blobs
                .set_local(&self.space, rel, st, w.hash, w.chunked, &fetched.chunks)
                .map_err(|e| TransferError::Failed(e.to_string()))?;
        }
        drop(g);
        drop(placed);
        let _ = blobs.remove_part(&self.space, &fetched.part);
        let _ = blobs.done_pending(&self.space, rel, mark);
        self.shared
            .counters
            .files_placed
            .fetch_add(1, Ordering::Relaxed);
        self.activity.fetch_add(1, Ordering::Relaxed);
        self.remote_changed(rel, w);
        if big {
            let ms = started.elapsed().as_millis() as u64;
            info!(space = %self.space.short(), path = rel, bytes = w.size, ms, "transfer finished");
            self.shared.emit(Event::TransferFinished {
                space: self.space.to_owned(),
                path: rel.to_string(),
                bytes: w.size,
                millis: started.elapsed().as_millis() as u64,
            });
        }
        Ok(())
    }
}

impl Worker {
    /// Makes the conflict copy `copy` of version `theirs`, which lost to
    /// this device's edit: fetches it (from local chunks or members),
    /// places it under that name (or the next free one, if something took
    /// it meanwhile), records it, and only then publishes it as a file of
    /// its own. Until then the index does not name it, so no device looks
    /// for a copy whose content may exist nowhere.
    pub(super) async fn make_copy(&self, copy: &str, theirs: &Entry) -> Result<(), TransferError> {
        let fail = |e: io::Error| TransferError::Failed(format!("conflict copy {copy}: {e}"));
        place::check_parents(&self.root, copy).map_err(fail)?;
        let fetched = self.fetch(copy, theirs).await?;
        stamp(&fetched.temp, theirs).map_err(fail)?;
        let guard = self.fs.lock().await;
        // Placed under the planned name, or the next free one: never over
        // a file that appeared meanwhile (the rename refuses to replace).
        let mut placed_as = None;
        for _ in 0..8 {
            let name = place::free_name(&self.root, copy);
            let dest = place::safe_parent(&self.root, &name).map_err(fail)?;
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                &fetched.temp,
                rustix::fs::CWD,
                &dest,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {
                    placed_as = Some((name, dest));
                    break;
                }
                Err(rustix::io::Errno::EXIST) => continue,
                // A file system without RENAME_NOREPLACE: the name was free
                // a moment ago, under the lock.
                Err(rustix::io::Errno::INVAL) => {
                    fs::rename(&fetched.temp, &dest).map_err(fail)?;
                    placed_as = Some((name, dest));
                    break;
                }
                Err(e) => return Err(fail(e.into())),
            }
        }
        let Some((name, dest)) = placed_as else {
            return Err(fail(io::Error::other("no free name")));
        };
        let placed = self.placing(&name);
        // The copy is on disk: whatever happens next, this intent is done
        // (a retry would make a second copy). If the steps below do not
        // finish, the scanner finds the file and publishes it.
        self.copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(copy);
        let st = scan::stat_of(&fs::symlink_metadata(&dest).map_err(fail)?);
        drop(guard);
        self.sync.durable(&self.root).await.map_err(fail)?;
        // Published before it is recorded: a stop in between leaves a file
        // whose content the index names, which the next scan adopts.
        self.put_entries(&[(name.clone(), theirs.clone())])
            .await
            .map_err(|e| TransferError::Failed(format!("publish {name}: {e}")))?;
        let blobs = &self.shared.blobs;
        let g = self.fs.lock().await;
        if still_there(&dest, st) {
            blobs
                .set_local(
                    &self.space,
                    &name,
                    st,
                    theirs.hash,
                    theirs.chunked,
                    &fetched.chunks,
                )
                .map_err(|e| TransferError::Failed(e.to_string()))?;
        }
        drop(g);
        drop(placed);
        let _ = blobs.remove_part(&self.space, &fetched.part);
        self.activity.fetch_add(1, Ordering::Relaxed);
        self.shared.emit(Event::FileChanged {
            space: self.space,
            path: name,
            origin: FileOrigin::Local,
            device: theirs.device.clone(),
            size: theirs.size,
            deleted: false,
        });
        Ok(())
    }
}

/// Whether the file placed at `dest` with stat `st` is still there. Asked
/// under the folder lock, with its record written before the lock goes:
/// no decision can move it in between.
fn still_there(dest: &Path, st: Stat) -> bool {
    fs::symlink_metadata(dest).is_ok_and(|m| scan::stat_of(&m) == st)
}

/// Gives a fetched temp file its version's modification time and mode.
fn stamp(temp: &Path, w: &Entry) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(temp)?;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(w.mtime_ns.max(0) as u64);
    let _ = f.set_modified(mtime);
    use std::os::unix::fs::PermissionsExt;
    let _ = f.set_permissions(fs::Permissions::from_mode(w.mode & 0o777));
    Ok(())
}

/// Takes a path out of [`Worker::placing`] when dropped, whatever way the
/// placement ends.
pub(in crate::folder) struct Placing<'a>(&'a Worker, &'a str);

impl Worker {
    /// Marks `rel` as being placed until the guard drops.
    pub(in crate::folder) fn placing<'a>(&'a self, rel: &'a str) -> Placing<'a> {
        self.placing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rel.to_string());
        Placing(self, rel)
    }
}

impl Drop for Placing<'_> {
    fn drop(&mut self) {
        self.0
            .placing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.1);
    }
}
