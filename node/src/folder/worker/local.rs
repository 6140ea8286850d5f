//! The local side: scanning the folder (watcher events and rescans), and
//! publishing what changed as this device's versions, or setting a local
//! change aside when the index moved on meanwhile.

use super::*;

impl Worker {
    /// Scans the whole folder (`None`) or some paths, and publishes what
    /// changed.
    /// Returns paths that changed while being read.
    pub(super) async fn scan(&self, paths: Option<Vec<String>>) -> Vec<String> {
        let full = paths.is_none();
        let started = Instant::now();
        if full {
            self.prog().scanning = true;
        }
        // The watcher's word on `.shoalignore` may still be queued behind
        // this scan: the rules are checked against the files themselves
        // (and read on the first scan). New ones in folders below are met
        // by the walk, below.
        let rules = if self.rules_changed() {
            self.reload_rules().await
        } else {
            self.rules()
        };
        let (root, blobs, space) = (self.root.clone(), self.shared.blobs.clone(), self.space);
        let mut result = self
            .shared
            .blocking
            .spawn_blocking(move || scan_blocking(&root, &rules, &blobs, &space, paths))
            .await
            .unwrap_or_default();
        for (p, e) in &result.problems {
            self.problem(p, e.clone());
        }
        if full {
            self.prog().scanning = false;
        }
        let new_rules = std::mem::take(&mut result.new_rules);
        if !new_rules.is_empty() || self.rules_changed() {
            // `.shoalignore` changed during the walk, or the walk found one
            // the rules lack: nothing they now ignore is published. The
            // folders of new ones are read again soon with the new rules
            // (for what they re-include); a changed one's event starts a
            // full scan.
            // (The root's own has its watch from the start: its event
            // comes.)
            for r in new_rules {
                if let Some((dir, _)) = r.rsplit_once('/') {
                    result.again.push(dir.to_string());
                }
            }
            let rules = self.reload_rules().await;
            result
                .found
                .retain(|f| !rules.ignored(f.rel(), matches!(f, Found::Dir(..))));
        }
        {
            // A placement that finished while the scan read its file has
            // recorded that very stat: nothing changed locally.
            result.found.retain(|f| {
                let st = match f {
                    Found::File(_, h) => h.stat,
                    Found::Dir(_, st) | Found::Link(_, st, _) => *st,
                };
                !matches!(self.shared.blobs.local(&self.space, f.rel()), Ok(Some(l)) if l.stat == st)
            });
            let placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
            if !placing.is_empty() {
                let mut later = Vec::new();
                result.found.retain(|f| {
                    let busy = placing.contains(f.rel());
                    if busy {
                        later.push(f.rel().to_string());
                    }
                    !busy
                });
                result.gone.retain(|g| {
                    let busy = placing.contains(g);
                    if busy {
                        later.push(g.clone());
                    }
                    !busy
                });
                result.again.extend(later);
            }
        }
        let again = std::mem::take(&mut result.again);
        let changed = result.found.len() + result.gone.len();
        if let Err(e) = self.publish(result).await {
            self.problem("", format!("cannot record local changes: {e}"));
        }
        if changed > 0 {
            self.activity.fetch_add(1, Ordering::Relaxed);
            info!(space = %self.space.short(), changed, full, ms = started.elapsed().as_millis() as u64, "scan recorded local changes");
        }
        again
    }

    pub(super) async fn publish(&self, result: ScanResult) -> Result<(), Error> {
        if result.found.is_empty() && result.gone.is_empty() {
            return Ok(());
        }
        let paths: Vec<String> = result
            .found
            .iter()
            .map(|f| f.rel().to_string())
            .chain(result.gone.iter().cloned())
            .collect();
        let current = self.index_get(paths).await?;
        let me = self.shared.me.clone();
        let mut puts: Vec<(String, Entry)> = Vec::new();
        let guard = self.fs.lock().await;
        let blobs = &self.shared.blobs;
        let mut cur = current.into_iter();
        for f in result.found {
            let values = entries(&cur.next().unwrap_or_default());
            let abs = self.root.join(f.rel());
            // Changed again since it was read: the next scan has it.
            let now = match fs::symlink_metadata(&abs) {
                Ok(m) => scan::stat_of(&m),
                Err(_) => continue,
            };
            let (rel, entry, stat, chunks, manifest) = match f {
                Found::File(rel, h) => {
                    if now != h.stat {
                        continue;
                    }
                    let (hash, chunked, manifest) = h.version();
                    let e = Entry {
                        kind: Kind::File,
                        hash,
                        chunked,
                        size: h.stat.size,
                        mode: h.stat.mode & 0o7777,
                        mtime_ns: h.stat.mtime_ns,
                        deleted: false,
                        device: me.clone(),
                        target: None,
                    };
                    (rel, e, h.stat, h.chunks, manifest)
                }
                Found::Dir(rel, st) => {
                    let e = Entry {
                        kind: Kind::Dir,
                        hash: [0; 32],
                        chunked: false,
                        size: 0,
                        mode: st.mode & 0o7777,
                        mtime_ns: st.mtime_ns,
                        deleted: false,
                        device: me.clone(),
                        target: None,
                    };
                    (rel, e, now, Vec::new(), None)
                }
                Found::Link(rel, st, target) => {
                    if now != st {
                        continue;
                    }
                    let e = Entry {
                        kind: Kind::Symlink,
                        hash: [0; 32],
                        chunked: false,
                        size: 0,
                        mode: 0o777,
                        mtime_ns: st.mtime_ns,
                        deleted: false,
                        device: me.clone(),
                        target: Some(target),
                    };
                    (rel, e, st, Vec::new(), None)
                }
            };
            if let Some(m) = &manifest {
                blobs.put_manifest(&self.space, m)?;
            }
            // The index moved past the version this file was edited from:
            // the two edits are concurrent. Both are kept.
            // (With no record here at all, a live remote version this
            // device has not fetched yet is concurrent with the new file.)
            let base = blobs.local(&self.space, &rel)?.map(|b| b.hash);
            let decided = plan::local(&values, base, &entry, &me);
            let conflict = match &decided {
                plan::Local::OursWin { copy, .. } | plan::Local::TheirsWin { copy } => {
                    Some(copy.clone())
                }
                plan::Local::Adopt | plan::Local::Publish => None,
            };
            if let Some((mtime, device)) = conflict {
                let device = device.short();
                let want = place::conflict_name(&rel, mtime, &device);
                let copy = place::free_name(&self.root, &want);
                self.shared
                    .counters
                    .conflicts
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.emit(Event::Conflict {
                    space: self.space.to_owned(),
                    path: rel.clone(),
                    copy: copy.clone(),
                    device,
                });
                match &decided {
                    plan::Local::TheirsWin { .. } => {
                        // Our file becomes the copy; theirs is placed.
                        fs::rename(&abs, self.root.join(&copy))
                            .map_err(|e| Error::io("keep conflict copy", &abs, e))?;
                        let st = scan::stat_of(
                            &fs::symlink_metadata(self.root.join(&copy))
                                .map_err(|e| Error::io("stat conflict copy", &abs, e))?,
                        );
                        blobs.remove_local(&self.space, &rel, false)?;
                        blobs.mark_pending(&self.space, &rel)?;
                        blobs.set_local(
                            &self.space,
                            &copy,
                            st,
                            entry.hash,
                            entry.chunked,
                            &chunks,
                        )?;
                        puts.push((copy, entry));
                        continue;
                    }
                    // Ours wins; theirs is kept as a copy: fetched, placed,
                    // and only then published (`make_copy`), so a copy of a
                    // version nobody can serve never enters the index.
                    plan::Local::OursWin { theirs, .. } => {
                        self.copies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(copy, theirs.clone());
                    }
                    plan::Local::Adopt | plan::Local::Publish => {}
                }
            }
            blobs.set_local(&self.space, &rel, stat, entry.hash, entry.chunked, &chunks)?;
            if decided == plan::Local::Adopt {
                continue;
            }
            puts.push((rel, entry));
        }
        for rel in result.gone {
            let values = entries(&cur.next().unwrap_or_default());
            let Some(local) = blobs.local(&self.space, &rel)? else {
                continue;
            };
            match fs::symlink_metadata(self.root.join(&rel)) {
                Err(e) if scan::is_gone(&e) => {}
                _ => continue,
            }
            blobs.remove_local(&self.space, &rel, false)?;
            let had = plan::Recorded {
                hash: local.hash,
                chunked: local.chunked,
            };
            match plan::vanished(&values, had, &me, now_ns()) {
                plan::Vanished::Delete(e) => puts.push((rel, e)),
                plan::Vanished::Refetch => blobs.mark_pending(&self.space, &rel)?,
                plan::Vanished::Forget => {}
            }
        }
        drop(guard);
        if puts.is_empty() {
            return Ok(());
        }
        for (rel, e) in &puts {
            debug!(me = %self.shared.me.short(), path = %rel, deleted = e.deleted, size = e.size, "local change");
            self.shared.emit(Event::FileChanged {
                space: self.space.to_owned(),
                path: rel.clone(),
                origin: FileOrigin::Local,
                device: me.to_owned(),
                size: e.size,
                deleted: e.deleted,
            });
        }
        self.put_entries(&puts).await
    }

    /// Writes this device's versions to the index, in batches. A batch the
    /// engine refuses is forgotten here too, so the next scan finds those
    /// files changed again.
    pub(super) async fn put_entries(&self, puts: &[(String, Entry)]) -> Result<(), Error> {
        for batch in puts.chunks(PUBLISH_BATCH) {
            let entries: Vec<(String, Vec<u8>)> =
                batch.iter().map(|(p, e)| (p.clone(), e.encode())).collect();
            let space = self.space;
            let r = self
                .shared
                .engine
                .index(|reply| IndexCommand::Put {
                    space,
                    entries,
                    reply,
                })
                .await;
            if let Err(Error::Forbidden(why)) = &r {
                self.problem("", format!("local changes are not shared: {why}"));
                return Ok(());
            }
            if let Err(Error::MembersUnknown) = &r {
                // Shared once `members` arrives: a full scan then finds
                // these files again (their records are forgotten below).
                self.unshared.store(true, Ordering::SeqCst);
            }
            if r.is_err() {
                // Not recorded in the index: forget what the scan recorded
                // here, so the next scan finds these files changed again.
                for (p, e) in batch {
                    if !e.deleted {
                        let _ = self.shared.blobs.remove_local(&self.space, p, true);
                    }
                }
            }
            r?;
        }
        Ok(())
    }
}

/// The scan itself, on a blocking thread.
fn scan_blocking(
    root: &Path,
    rules: &Rules,
    blobs: &crate::store::Blobs,
    space: &SpaceId,
    paths: Option<Vec<String>>,
) -> ScanResult {
    let mut out = ScanResult::default();
    // A full scan reads every record once; a partial one looks up what it
    // finds, plus the records under paths that vanished.
    let mut locals: HashMap<String, LocalFile> = match &paths {
        None => blobs
            .locals(space)
            .unwrap_or_default()
            .into_iter()
            .collect(),
        Some(ps) => {
            let mut m = HashMap::new();
            let gone: Vec<&String> = ps
                .iter()
                .filter(|p| fs::symlink_metadata(root.join(p)).is_err_and(|e| scan::is_gone(&e)))
                .collect();
            if !gone.is_empty() {
                for (p, l) in blobs.locals(space).unwrap_or_default() {
                    if gone
                        .iter()
                        .any(|d| p == **d || p.starts_with(&format!("{d}/")))
                    {
                        m.insert(p, l);
                    }
                }
            }
            m
        }
    };
    let mut found: Vec<scan::Found> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut problem = |p: String, e: String| out.problems.push((p, e));
    match &paths {
        None => found = scan::walk(root, root, rules, &mut out.new_rules, &mut problem),
        Some(ps) => {
            for p in ps {
                let abs = root.join(p);
                let Ok(meta) = fs::symlink_metadata(&abs) else {
                    continue;
                };
                if rules.ignored(p, meta.is_dir()) {
                    continue;
                }
                if meta.is_dir() {
                    found.extend(scan::walk(
                        root,
                        &abs,
                        rules,
                        &mut out.new_rules,
                        &mut problem,
                    ));
                }
                found.push(scan::Found {
                    rel: p.clone(),
                    abs,
                    meta,
                });
            }
        }
    }
    for f in found {
        if !seen.insert(f.rel.clone()) {
            continue;
        }
        let st = scan::stat_of(&f.meta);
        if paths.is_some() && !locals.contains_key(&f.rel) {
            if let Ok(Some(l)) = blobs.local(space, &f.rel) {
                locals.insert(f.rel.clone(), l);
            }
        }
        let known = locals.get(&f.rel);
        let ft = f.meta.file_type();
        if ft.is_file() {
            if known.is_some_and(|l| l.stat == st) {
                continue;
            }
            debug!(path = %f.rel, was = ?known.map(|l| l.stat), now = ?st, "changed on disk");
            if scan::is_private_key(&f.abs, &f.rel) && !rules.included(&f.rel) {
                out.problems.push((
                    f.rel.clone(),
                    "looks like a private key: not synced (add `!name` to .shoalignore to sync it)"
                        .into(),
                ));
                continue;
            }
            match scan::hash_file(&f.abs) {
                Ok(Some(h)) => out.found.push(Found::File(f.rel, h)),
                Ok(None) => out.again.push(f.rel),
                Err(e) => out.problems.push((f.rel, e.to_string())),
            }
        } else if ft.is_dir() {
            if known.is_none() {
                out.found.push(Found::Dir(f.rel, st));
            }
        } else if ft.is_symlink() {
            if known.is_some_and(|l| l.stat == st) {
                continue;
            }
            match fs::read_link(&f.abs) {
                Ok(t) => match t.to_str() {
                    Some(t) => out.found.push(Found::Link(f.rel, st, t.to_string())),
                    None => out
                        .problems
                        .push((f.rel, "link target is not UTF-8".into())),
                },
                Err(e) => out.problems.push((f.rel, e.to_string())),
            }
        }
    }
    for p in locals.keys() {
        if seen.contains(p) {
            continue;
        }
        match fs::symlink_metadata(root.join(p)) {
            Err(e) if scan::is_gone(&e) => out.gone.push(p.clone()),
            // Unreadable (a folder without permission): kept as it is; the
            // walk reported the folder.
            Err(_) => {}
            Ok(_) if rules.ignored(p, false) => {
                // Newly ignored: stays as it is everywhere, no longer tracked here.
                let _ = blobs.remove_local(space, p, false);
            }
            Ok(_) => {}
        }
    }
    out
}
