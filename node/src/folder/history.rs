//! History, trash, snapshots and restore, read from the index documents'
//! own history (every device has it) and carried out by the folder worker
//! ([`super::versions`]): a restore is a new version this device publishes.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shoal_protocol::files::{self, Entry, Kind};
use shoal_protocol::{DocId, SpaceId};

use super::fetch::TransferError;
use super::versions::Content;
use super::worker::Worker;
use super::Folders;
use crate::engine::{HistoryValue, IndexCommand, When};
use crate::error::{Error, Result};
use crate::store::kept::SnapshotRec;

/// Files restored at once.
const RESTORE_PARALLEL: usize = 8;
/// Restored versions published per change.
const PUBLISH_BATCH: usize = 1000;

/// One version of a path, as `history` lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionInfo {
    /// What `restore --version` takes (1 is the oldest).
    pub version: usize,
    /// When it was written (UTC, RFC 3339; the writer's clock).
    pub time: String,
    /// The same, in ms since the epoch.
    pub time_ms: i64,
    /// The device that wrote it.
    pub device: String,
    /// `file`, `dir` or `symlink`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Content hash (hex), for files.
    pub hash: Option<String>,
    /// A deletion (`hash` names the content it deleted).
    pub deleted: bool,
    /// One of the path's current values.
    pub current: bool,
    /// Where the content is.
    pub content: Content,
}

/// A deleted file, as `trash` lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TrashInfo {
    /// Its path.
    pub path: String,
    /// When it was deleted (UTC, RFC 3339).
    pub time: String,
    /// The device that deleted it.
    pub device: String,
    /// Size of the deleted content.
    pub size: u64,
    /// Its hash (hex).
    pub hash: String,
    /// Where that content is.
    pub content: Content,
}

/// A named state of a space's folder.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// When it was taken (UTC, RFC 3339).
    pub time: String,
}

/// What to restore. With `version`, one version of `path`; with `at` or
/// `snapshot`, everything under `path` (a file, a folder, or empty for the
/// whole folder) as it was then; with neither, the deleted file `path`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct RestoreRequest {
    /// A path, or a folder prefix (empty: the whole folder).
    #[serde(default)]
    pub path: String,
    /// A version number from `history`.
    pub version: Option<usize>,
    /// A time: RFC 3339, `YYYY-MM-DD[ HH:MM[:SS]]` (UTC), `@UNIX_SECONDS[.mmm]`,
    /// or `-30m` / `-2h` / `-1d` (ago).
    pub at: Option<String>,
    /// A snapshot's name.
    pub snapshot: Option<String>,
    /// Place it here instead (a path for one file; a folder prefix for a
    /// subtree).
    pub to: Option<String>,
    /// With `at` or `snapshot`: also delete (and keep as old versions)
    /// files created under `path` since then. Off: they are left alone.
    #[serde(default)]
    pub remove_later: bool,
}

/// A path a restore could not bring back.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NotRestored {
    /// The path.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct RestoreReport {
    /// Paths given their old content (published as this device's edit).
    pub restored: Vec<String>,
    /// Folders made again.
    pub folders: Vec<String>,
    /// Paths that already held that content.
    pub unchanged: usize,
    /// Files created since, deleted because `remove_later` asked.
    pub removed: Vec<String>,
    /// Files created since, left alone.
    pub left: Vec<String>,
    /// What could not be restored, with why (no device has the content,
    /// no member online...).
    pub failed: Vec<NotRestored>,
}

/// Parses a restore time into ms since the epoch (see
/// [`RestoreRequest::at`]).
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    let s = s.trim();
    let bad = || {
        Error::BadRequest(format!(
            "cannot read the time {s:?}: give RFC 3339 (2026-12-06T10:00:00Z), \
             `YYYY-MM-DD HH:MM[:SS]` (UTC), `@UNIX_SECONDS` or `-30m`/`-2h`/`-1d`"
        ))
    };
    if let Some(ago) = s.strip_prefix('-') {
        let (n, unit) = ago.split_at(ago.len().saturating_sub(1));
        let n: i64 = n.parse().map_err(|_| bad())?;
        let ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        return Ok(now_ms.saturating_sub(n.saturating_mul(ms)));
    }
    if let Some(at) = s.strip_prefix('@') {
        // `@SECS` or `@SECS.mmm` (the history's times are in ms).
        let (secs, frac) = at.split_once('.').unwrap_or((at, ""));
        let secs: i64 = secs.parse().map_err(|_| bad())?;
        if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let ms: i64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
        return Ok(secs.saturating_mul(1000).saturating_add(ms));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    for f in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .ok_or_else(bad)?
            .and_utc()
            .timestamp_millis());
    }
    Err(bad())
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
    }
}

/// Whether `path` is `prefix` or under it (everything is under "").
fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn decoded(values: &[Vec<u8>]) -> Vec<Entry> {
    values
        .iter()
        .filter_map(|v| Entry::decode(v).ok())
        .collect()
}

impl Folders {
    async fn history_values(&self, w: &Worker, path: &str) -> Result<Vec<(HistoryValue, Entry)>> {
        let path = path.to_string();
        let list = w
            .shared
            .engine
            .index(|reply| IndexCommand::History {
                space: w.space,
                path,
                reply,
            })
            .await?;
        Ok(list
            .into_iter()
            .filter_map(|h| {
                let e = Entry::decode(&h.value).ok()?;
                Some((h, e))
            })
            .collect())
    }

    /// Every version of `path` in the index's history, oldest first.
    pub(crate) async fn history(&self, id: &SpaceId, path: &str) -> Result<Vec<VersionInfo>> {
        let w = self.worker(id)?;
        let path = files::normalize_path(path)?;
        let list = self.history_values(&w, &path).await?;
        // Where each content is, asked once per hash.
        let mut found: HashMap<([u8; 32], bool), Content> = HashMap::new();
        let mut out = Vec::new();
        for (i, (h, e)) in list.into_iter().enumerate() {
            let content = match found.get(&(e.hash, e.deleted)) {
                Some(c) => *c,
                None => {
                    let c = w.where_is(&path, &e).await;
                    found.insert((e.hash, e.deleted), c);
                    c
                }
            };
            out.push(VersionInfo {
                version: i + 1,
                time: rfc3339(h.time_ms),
                time_ms: h.time_ms,
                device: e.device.to_string(),
                kind: kind_name(e.kind).into(),
                size: e.size,
                hash: (e.kind == Kind::File).then(|| hex::encode(e.hash)),
                deleted: e.deleted,
                current: h.current,
                content,
            });
        }
        Ok(out)
    }

    /// Deleted files of a space, newest deletion first.
    pub(crate) async fn trash(&self, id: &SpaceId) -> Result<Vec<TrashInfo>> {
        let w = self.worker(id)?;
        let list = w
            .shared
            .engine
            .index(|reply| IndexCommand::List {
                space: *id,
                prefix: String::new(),
                reply,
            })
            .await?;
        let mut out = Vec::new();
        for (path, values) in list {
            let all = decoded(&values);
            let Some(e) = files::winner(&all) else {
                continue;
            };
            if !e.deleted || e.kind != Kind::File {
                continue;
            }
            out.push((e.mtime_ns, path, e.clone()));
        }
        out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut infos = Vec::new();
        for (t, path, e) in out {
            let mut live = e.clone();
            live.deleted = false;
            infos.push(TrashInfo {
                content: w.where_is(&path, &live).await,
                time: rfc3339(t / 1_000_000),
                device: e.device.to_string(),
                size: e.size,
                hash: hex::encode(e.hash),
                path,
            });
        }
        Ok(infos)
    }

    /// Names the space's current state.
    pub(crate) async fn snapshot(&self, id: &SpaceId, name: &str) -> Result<SnapshotInfo> {
        let w = self.worker(id)?;
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(Error::BadRequest(
                "a snapshot's name is 1 to 200 bytes, without control characters".into(),
            ));
        }
        let heads = w
            .shared
            .engine
            .index(|reply| IndexCommand::Heads { space: *id, reply })
            .await?;
        let rec = SnapshotRec {
            taken_ms: crate::metrics::unix_millis(),
            heads: heads.into_iter().map(|(d, h)| (d.to_string(), h)).collect(),
        };
        if !w.shared.blobs.put_snapshot(id, name, &rec)? {
            return Err(Error::BadRequest(format!(
                "a snapshot named {name:?} exists already"
            )));
        }
        w.shared.blobs.flush().await?;
        Ok(SnapshotInfo {
            name: name.into(),
            time: rfc3339(rec.taken_ms),
        })
    }

    /// This device's snapshots of a space.
    pub(crate) fn snapshots(&self, id: &SpaceId) -> Result<Vec<SnapshotInfo>> {
        let w = self.worker(id)?;
        Ok(w.shared
            .blobs
            .snapshots(id)?
            .into_iter()
            .map(|(name, r)| SnapshotInfo {
                name,
                time: rfc3339(r.taken_ms),
            })
            .collect())
    }

    /// Restores what `req` names (see [`RestoreRequest`]).
    pub(crate) async fn restore(&self, id: &SpaceId, req: RestoreRequest) -> Result<RestoreReport> {
        let w = self.worker(id)?;
        let path = if req.path.trim_matches('/').is_empty() {
            String::new()
        } else {
            files::normalize_path(req.path.trim_end_matches('/'))?
        };
        let to = match req.to.as_deref() {
            Some(t) => Some(files::normalize_path(t.trim_end_matches('/'))?),
            None => None,
        };
        let when = match (&req.at, &req.snapshot) {
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(
                    "give --at or --snapshot, not both".into(),
                ))
            }
            (Some(t), None) => Some(When::Time(parse_time(t, crate::metrics::unix_millis())?)),
            (None, Some(name)) => {
                let rec = w.shared.blobs.snapshot(id, name)?.ok_or_else(|| {
                    Error::BadRequest(format!("no snapshot named {name:?} on this device"))
                })?;
                let heads = rec
                    .heads
                    .into_iter()
                    .filter_map(|(d, h)| Some((d.parse::<DocId>().ok()?, h)))
                    .collect();
                Some(When::Heads(heads))
            }
            (None, None) => None,
        };
        match (req.version, when) {
            (Some(_), Some(_)) => Err(Error::BadRequest(
                "give --version, or --at/--snapshot, not both".into(),
            )),
            (Some(n), None) => {
                if path.is_empty() {
                    return Err(Error::BadRequest("--version needs a path".into()));
                }
                let list = self.history_values(&w, &path).await?;
                let (_, e) = n.checked_sub(1).and_then(|i| list.get(i)).ok_or_else(|| {
                    Error::BadRequest(format!(
                        "{path} has no version {n} (it has {}; see `shoal history`)",
                        list.len()
                    ))
                })?;
                if e.deleted {
                    return Err(Error::BadRequest(format!(
                        "version {n} of {path} is its deletion; restore the version before it"
                    )));
                }
                let target = to.unwrap_or(path);
                restore_all(&w, vec![(target, e.clone())], Vec::new()).await
            }
            (None, None) => {
                if path.is_empty() {
                    return Err(Error::BadRequest(
                        "say what to restore: a deleted path, --version, --at or --snapshot".into(),
                    ));
                }
                let now = w.current_values(&path).await?;
                let e = files::winner(&now)
                    .filter(|e| e.deleted && e.kind == Kind::File)
                    .ok_or_else(|| {
                        Error::BadRequest(format!(
                            "{path} is not a deleted file; give --version N or --at TIME \
                             (`shoal history` lists its versions)"
                        ))
                    })?;
                let mut live = e.clone();
                live.deleted = false;
                restore_all(&w, vec![(to.unwrap_or(path), live)], Vec::new()).await
            }
            (None, Some(when)) => {
                let (space, prefix) = (*id, path.clone());
                let then = w
                    .shared
                    .engine
                    .index(|reply| IndexCommand::At {
                        space,
                        when,
                        prefix: prefix.clone(),
                        reply,
                    })
                    .await?;
                let now = w
                    .shared
                    .engine
                    .index(|reply| IndexCommand::List {
                        space,
                        prefix,
                        reply,
                    })
                    .await?;
                let map = |p: &str| match &to {
                    Some(t) => format!("{t}{}", &p[path.len()..]),
                    None => p.to_string(),
                };
                let mut files_then = Vec::new();
                let mut report = RestoreReport::default();
                let mut live_then = std::collections::HashSet::new();
                for (p, values) in then.iter().filter(|(p, _)| under(p, &path)) {
                    let all = decoded(values);
                    let Some(e) = files::winner(&all) else {
                        continue;
                    };
                    if e.deleted {
                        continue;
                    }
                    live_then.insert(p.clone());
                    match e.kind {
                        Kind::File => files_then.push((map(p), e.clone())),
                        Kind::Dir => {
                            let target = map(p);
                            let abs = w.root.join(&target);
                            if !abs.is_dir() {
                                match super::place::safe_parent(&w.root, &target)
                                    .and_then(|_| std::fs::create_dir_all(&abs))
                                {
                                    Ok(()) => report.folders.push(target),
                                    Err(e) => report.failed.push(NotRestored {
                                        path: target,
                                        reason: e.to_string(),
                                    }),
                                }
                            }
                        }
                        Kind::Symlink => report.failed.push(NotRestored {
                            path: map(p),
                            reason: "links are not restored yet".into(),
                        }),
                    }
                }
                let mut later = Vec::new();
                for (p, values) in now.iter().filter(|(p, _)| under(p, &path)) {
                    let all = decoded(values);
                    let live =
                        files::winner(&all).is_some_and(|e| !e.deleted && e.kind == Kind::File);
                    if live && !live_then.contains(p) {
                        later.push(p.clone());
                    }
                }
                let removals = if req.remove_later && to.is_none() {
                    later
                } else {
                    report.left = later;
                    Vec::new()
                };
                let mut r = restore_all(&w, files_then, removals).await?;
                r.folders = report.folders;
                r.left = report.left;
                r.failed.extend(report.failed);
                Ok(r)
            }
        }
    }
}

/// Restores each (target, version) and removes each of `removals`, then
/// publishes what changed in batches.
async fn restore_all(
    w: &Arc<Worker>,
    list: Vec<(String, Entry)>,
    removals: Vec<String>,
) -> Result<RestoreReport> {
    let mut report = RestoreReport::default();
    let mut publish: Vec<(String, Entry)> = Vec::new();
    let mut results = futures::stream::iter(list.into_iter().map(|(target, e)| {
        let w = Arc::clone(w);
        async move {
            let r = w.restore_place(&target, &e).await;
            (target, r)
        }
    }))
    .buffer_unordered(RESTORE_PARALLEL);
    while let Some((target, r)) = results.next().await {
        match r {
            Ok(Some(e)) => {
                report.restored.push(target.clone());
                publish.push((target, e));
            }
            Ok(None) => report.unchanged += 1,
            Err(e) => report.failed.push(NotRestored {
                path: target,
                reason: match e {
                    TransferError::NoPeers => {
                        "not on this device, and no member is online to fetch it from".into()
                    }
                    TransferError::Unavailable(_) => "no device has this content any more".into(),
                    other => other.to_string(),
                },
            }),
        }
        if publish.len() >= PUBLISH_BATCH {
            w.publish_restored(std::mem::take(&mut publish)).await?;
        }
    }
    drop(results);
    for p in removals {
        match w.restore_removal(&p).await {
            Ok(e) => {
                report.removed.push(p.clone());
                publish.push((p, e));
            }
            Err(e) => report.failed.push(NotRestored {
                path: p,
                reason: e.to_string(),
            }),
        }
        if publish.len() >= PUBLISH_BATCH {
            w.publish_restored(std::mem::take(&mut publish)).await?;
        }
    }
    w.publish_restored(publish).await?;
    report.restored.sort();
    report.removed.sort();
    report.failed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_in_every_documented_form() {
        let now = 1_765_000_000_000;
        assert_eq!(parse_time("@1700000000", now).unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("@1700000000.5", now).unwrap(), 1_700_000_000_500);
        assert_eq!(
            parse_time("@1700000000.042", now).unwrap(),
            1_700_000_000_042
        );
        assert!(parse_time("@1700000000.0421", now).is_err());
        assert_eq!(parse_time("-2h", now).unwrap(), now - 7_200_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14 22:13:20", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14 22:13", now).unwrap(),
            1_699_999_980_000
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("-2w", now).is_err());
    }

    #[test]
    fn a_prefix_covers_its_subtree_only() {
        assert!(under("a/b", "a"));
        assert!(under("a", "a"));
        assert!(!under("ab", "a"));
        assert!(under("x", ""));
    }
}
