//! The remote side: pulling changed index shards, and deciding with the
//! pure planner (`shoal_protocol::plan`) what each changed path needs.

use super::*;

impl Worker {
    pub(in crate::folder) async fn index_get(
        &self,
        paths: Vec<String>,
    ) -> Result<Vec<Vec<Vec<u8>>>, Error> {
        let space = self.space;
        self.shared
            .engine
            .index(|reply| IndexCommand::Get {
                space,
                paths,
                reply,
            })
            .await
    }

    // ----- remote side ----------------------------------------------------

    /// Records paths of `shard` that changed since its cursor as pending.
    pub(super) async fn pull(&self, shard: &DocId) -> Result<usize, Error> {
        let since = self.shared.blobs.cursor(&self.space, shard)?;
        let (space, sh) = (self.space, shard.clone());
        let changes = self
            .shared
            .engine
            .index(|reply| IndexCommand::Changes {
                space,
                shard: sh,
                since,
                reply,
            })
            .await?;
        if changes.heads.is_empty() {
            return Ok(0);
        }
        let paths: Vec<String> = changes
            .paths
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| files::normalize_path(p).is_ok_and(|n| n == *p))
            .collect();
        self.shared
            .blobs
            .add_pending(&self.space, shard, &changes.heads, &paths)?;
        Ok(paths.len())
    }

    /// Starts queued transfers while slots are free; when the queue is
    /// empty, decides the next batch of pending paths (those needing no
    /// transfer are done at once, the rest are queued).
    pub(super) async fn reconcile(
        self: &Arc<Self>,
        transfers: &mut JoinSet<(String, Result<(), TransferError>)>,
        active: &mut HashSet<String>,
        queue: &mut VecDeque<Queued>,
        retry: &mut HashMap<String, (Instant, u32)>,
    ) {
        if queue.is_empty() {
            self.decide_batch(active, queue, retry).await;
        }
        while transfers.len() < self.shared.settings.transfers {
            let Some((rel, w, all, mark)) = queue.pop_front() else {
                break;
            };
            let me = Arc::clone(self);
            transfers.spawn(async move {
                let r = me.transfer(&rel, &w, &all, &mark).await;
                (rel, r)
            });
        }
        // Conflict copies to make, in the same slots (and the same retry
        // and problem handling) as transfers.
        let now = Instant::now();
        let copies: Vec<(String, Entry)> = self
            .copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(c, _)| !active.contains(*c) && due(retry, c, now))
            .map(|(c, e)| (c.clone(), e.clone()))
            .collect();
        for (copy, theirs) in copies {
            if transfers.len() >= self.shared.settings.transfers {
                break;
            }
            active.insert(copy.clone());
            let me = Arc::clone(self);
            transfers.spawn(async move {
                let r = me.make_copy(&copy, &theirs).await;
                (copy, r)
            });
        }
    }

    /// Whether a conflict copy waits to be made (not running, not backing
    /// off).
    pub(super) fn copies_waiting(
        &self,
        active: &HashSet<String>,
        retry: &HashMap<String, (Instant, u32)>,
    ) -> bool {
        let now = Instant::now();
        self.copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .any(|c| !active.contains(c) && due(retry, c, now))
    }

    pub(super) async fn decide_batch(
        self: &Arc<Self>,
        active: &mut HashSet<String>,
        queue: &mut VecDeque<Queued>,
        retry: &mut HashMap<String, (Instant, u32)>,
    ) {
        let now = Instant::now();
        // Paths that wait (busy or failing) are skipped before the batch is
        // cut, so they cannot starve the others.
        let Ok(pending) = self
            .shared
            .blobs
            .pending(&self.space, RECONCILE_BATCH + active.len() + retry.len())
        else {
            return;
        };
        let (paths, marks): (Vec<String>, Vec<Vec<u8>>) = pending
            .into_iter()
            .filter(|(p, _)| !active.contains(p))
            .filter(|(p, _)| due(retry, p, now))
            .take(RECONCILE_BATCH)
            .unzip();
        if paths.is_empty() {
            return;
        }
        let values = match self.index_get(paths.clone()).await {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "index read failed");
                return;
            }
        };
        let mut work: Vec<(String, Vec<Entry>, Vec<u8>)> = paths
            .into_iter()
            .zip(values.iter().map(|v| entries(v)))
            .zip(marks)
            .map(|((p, e), m)| (p, e, m))
            .collect();
        // Folders before their contents; deletions deepest first.
        work.sort_by(|a, b| {
            let da = files::winner(&a.1).is_some_and(|w| w.deleted);
            let db = files::winner(&b.1).is_some_and(|w| w.deleted);
            match (da, db) {
                (false, false) => a.0.cmp(&b.0),
                (true, true) => b.0.cmp(&a.0),
                (false, true) => std::cmp::Ordering::Less,
                (true, false) => std::cmp::Ordering::Greater,
            }
        });
        let held = self.guard_batch(&work);
        let _g = self.fs.lock().await;
        // The temp files, read once for the batch: none of its paths has a
        // transfer running, so none of theirs comes or goes meanwhile.
        let mut parts = self.temp_parts();
        for (rel, entries, mark) in work {
            if held.contains(&rel) {
                // Left as it is until accepted (or restored over).
                retry.insert(rel, (now + HELD_RECHECK, 0));
                continue;
            }
            match self.decide(&rel, &entries, &mut parts) {
                Ok(Action::Done) => {
                    retry.remove(&rel);
                    self.prog().unavailable.remove(&rel);
                    let _ = self.shared.blobs.done_pending(&self.space, &rel, &mark);
                }
                Ok(Action::Transfer(w, all)) => {
                    active.insert(rel.clone());
                    self.prog().queued.insert(rel.clone(), w.size);
                    queue.push_back((rel, w, all, mark));
                }
                Ok(Action::Later) => backoff(retry, &rel),
                Err(e) => {
                    backoff(retry, &rel);
                    self.problem(&rel, e.to_string());
                }
            }
        }
    }

    /// The mass-delete guard's look at a batch: the paths whose winner
    /// would delete or overwrite a file here, by writing device. Returns
    /// the paths to hold; says so when a device trips the guard.
    pub(super) fn guard_batch(&self, work: &[(String, Vec<Entry>, Vec<u8>)]) -> HashSet<String> {
        let blobs = &self.shared.blobs;
        let mut destructive = Vec::new();
        for (rel, entries, _) in work {
            let Some(w) = files::winner(entries) else {
                continue;
            };
            if w.device == self.shared.me {
                continue;
            }
            let Ok(Some(here)) = blobs.local(&self.space, rel) else {
                continue;
            };
            let overwrite = !w.deleted && w.kind == Kind::File && here.hash != w.hash;
            if w.deleted || overwrite {
                destructive.push((rel.clone(), w.device.clone()));
            }
        }
        if destructive.is_empty() {
            return HashSet::new();
        }
        let files_here = blobs.local_count(&self.space);
        let (hold, tripped) = self.guard.lock().unwrap_or_else(|p| p.into_inner()).check(
            &destructive,
            files_here,
            &self.shared.settings.guard,
            Instant::now(),
        );
        for device in tripped {
            let n = destructive.iter().filter(|(_, d)| *d == device).count() as u64;
            warn!(space = %self.space.short(), device = %device.short(), paths = n,
                "mass-delete guard: holding this device's deletions and overwrites");
            self.problem(
                "",
                format!(
                    "device …{} would delete or overwrite {n} files at once: held until \
                     `shoal folder accept` (or a restore)",
                    device.short()
                ),
            );
            self.shared.emit(Event::ChangesHeld {
                space: self.space.to_owned(),
                device: device.to_owned(),
                paths: n,
            });
        }
        hold
    }

    /// Brings `rel` in line with the index where that needs no transfer:
    /// gathers what is known about the path, asks the planner
    /// ([`plan::remote`]) and carries the plan out.
    pub(super) fn decide(
        &self,
        rel: &str,
        values: &[Entry],
        parts: &mut HashMap<String, Vec<String>>,
    ) -> io::Result<Action> {
        let blobs = &self.shared.blobs;
        let io = |e: Error| io::Error::other(e.to_string());
        let Some(w) = files::winner(values).cloned() else {
            return Ok(Action::Done);
        };
        // Never act through a link or a file standing where a folder of the
        // path should be: that could reach outside the folder.
        place::check_parents(&self.root, rel)?;
        // Transfers of versions no longer wanted free their space.
        let keep = (w.kind == Kind::File && !w.deleted).then_some(w.hash);
        self.drop_stale_parts(rel, keep.as_ref(), parts);
        let abs = self.root.join(rel);
        let local = blobs.local(&self.space, rel).map_err(io)?;
        let facts = self.facts(rel, values, local.as_ref(), w.kind == Kind::Dir);
        let plan = plan::remote(&facts, &self.shared.me);
        let record = |st| {
            blobs
                .set_local(&self.space, rel, st, [0; 32], false, &[])
                .map_err(io)
        };
        match plan {
            plan::Remote::Nothing => Ok(Action::Done),
            plan::Remote::Forget => {
                blobs.remove_local(&self.space, rel, false).map_err(io)?;
                Ok(Action::Done)
            }
            plan::Remote::Remove => {
                self.keep_old(rel)?;
                self.remote_changed(rel, &w);
                Ok(Action::Done)
            }
            plan::Remote::RemoveDir => {
                if fs::remove_dir(&abs).is_err() {
                    // Synced contents whose deletions are still on their way:
                    // try later. Only files new here: they keep the folder.
                    let synced_left = fs::read_dir(&abs)?.flatten().any(|e| {
                        let child = format!("{rel}/{}", e.file_name().to_string_lossy());
                        blobs.local(&self.space, &child).is_ok_and(|l| l.is_some())
                    });
                    return Ok(if synced_left {
                        Action::Later
                    } else {
                        Action::Done
                    });
                }
                blobs.remove_local(&self.space, rel, false).map_err(io)?;
                self.remote_changed(rel, &w);
                Ok(Action::Done)
            }
            plan::Remote::MakeDir(aside) => {
                if let Some(a) = aside {
                    self.set_aside(rel, a)?;
                }
                place::safe_parent(&self.root, rel)?;
                fs::create_dir(&abs)?;
                record(scan::stat_of(&fs::symlink_metadata(&abs)?))?;
                Ok(Action::Done)
            }
            plan::Remote::RecordDir | plan::Remote::RecordLink => {
                record(scan::stat_of(&fs::symlink_metadata(&abs)?))?;
                Ok(Action::Done)
            }
            plan::Remote::MakeLink { target, aside } => {
                if let Some(a) = aside {
                    self.set_aside(rel, a)?;
                }
                place::safe_parent(&self.root, rel)?;
                std::os::unix::fs::symlink(&target, &abs)?;
                record(scan::stat_of(&fs::symlink_metadata(&abs)?))?;
                self.remote_changed(rel, &w);
                Ok(Action::Done)
            }
            plan::Remote::Fetch(w) => Ok(Action::Transfer(w, values.to_vec())),
        }
    }

    /// What is known about `rel` now, for the planner: the index's
    /// versions, this device's record, the disk, the ignore verdict.
    pub(super) fn facts<'a>(
        &self,
        rel: &str,
        values: &'a [Entry],
        local: Option<&LocalFile>,
        as_dir: bool,
    ) -> plan::Facts<'a> {
        let disk = fs::symlink_metadata(self.root.join(rel)).ok();
        let on_disk = match &disk {
            None => plan::OnDisk::Missing,
            Some(m) if m.is_dir() => plan::OnDisk::Dir,
            Some(m) if m.file_type().is_symlink() => plan::OnDisk::Link(
                fs::read_link(self.root.join(rel))
                    .ok()
                    .and_then(|t| t.to_str().map(String::from)),
            ),
            Some(_) => plan::OnDisk::File,
        };
        let stat = disk.as_ref().map(scan::stat_of);
        plan::Facts {
            values,
            recorded: local.map(|l| plan::Recorded {
                hash: l.hash,
                chunked: l.chunked,
            }),
            disk: on_disk,
            disk_mtime_ns: stat.map_or(0, |s| s.mtime_ns),
            known: matches!((stat, local), (Some(s), Some(l)) if l.stat == s),
            ignored: self
                .rules
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .ignored(rel, as_dir),
        }
    }

    /// The temp files in `.shoal/tmp/` (`HASH-PATHTAG.part`), by the tag of
    /// the path they are for.
    pub(super) fn temp_parts(&self) -> HashMap<String, Vec<String>> {
        let mut by_tag: HashMap<String, Vec<String>> = HashMap::new();
        let Ok(dir) = fs::read_dir(self.root.join(TMP_DIR)) else {
            return by_tag;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(part) = place::part_of(&name) else {
                continue;
            };
            if let Some((_, tag)) = part.rsplit_once('-') {
                by_tag
                    .entry(tag.to_string())
                    .or_default()
                    .push(part.to_string());
            }
        }
        by_tag
    }

    /// Removes temp files of `rel` (from `parts`, see [`Self::temp_parts`])
    /// other than the one for version `keep`.
    pub(super) fn drop_stale_parts(
        &self,
        rel: &str,
        keep: Option<&[u8; 32]>,
        parts: &mut HashMap<String, Vec<String>>,
    ) {
        let tag = hex::encode(&blake3::hash(rel.as_bytes()).as_bytes()[..6]);
        let Some(mine) = parts.get_mut(&tag) else {
            return;
        };
        let keep = keep.map(|k| hex::encode(&k[..12]));
        mine.retain(|part| {
            if keep.as_ref().is_some_and(|k| part.starts_with(k.as_str())) {
                return true;
            }
            let _ = fs::remove_file(place::part_file(&self.root, part));
            let _ = self.shared.blobs.remove_part(&self.space, part);
            false
        });
    }

    pub(super) fn remote_changed(&self, rel: &str, w: &Entry) {
        self.shared.emit(Event::FileChanged {
            space: self.space.to_owned(),
            path: rel.to_string(),
            origin: FileOrigin::Remote,
            device: w.device.to_owned(),
            size: w.size,
            deleted: w.deleted,
        });
    }
}
