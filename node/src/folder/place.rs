//! Changing the folder on disk: safe parents, atomic placement, old
//! versions under `.shoal/versions/` with retention, conflict copies.
//! Everything here moves (renames) files; nothing copies user data.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

/// Shoal's own folder inside a synced folder.
pub const SHOAL_DIR: &str = ".shoal";
/// Where transfers are assembled.
pub const TMP_DIR: &str = ".shoal/tmp";
/// Where replaced and deleted files are kept.
pub const VERSIONS_DIR: &str = ".shoal/versions";

/// Creates the missing parents of `rel` under `root`, refusing to go
/// through a symbolic link or a file (a remote change must never write
/// outside the folder).
pub fn safe_parent(root: &Path, rel: &str) -> io::Result<PathBuf> {
    walk_parents(root, rel, true)?;
    Ok(root.join(rel))
}

/// Refuses `rel` when any of its parents under `root` is a link or a file:
/// acting on such a path could reach outside the folder. Missing parents
/// are fine (nothing is created here).
pub fn check_parents(root: &Path, rel: &str) -> io::Result<()> {
    walk_parents(root, rel, false)
}

fn walk_parents(root: &Path, rel: &str, create: bool) -> io::Result<()> {
    let mut at = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} is a link or a file, not a folder",
                    at.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => fs::create_dir(&at)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// fsyncs a folder, so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn stamp(t: SystemTime) -> String {
    let t: DateTime<Utc> = t.into();
    t.format("%Y%m%d-%H%M%S").to_string()
}

/// `dir/name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext` for `rel`.
pub fn conflict_name(rel: &str, mtime_ns: i64, device_short: &str) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime_ns.max(0) as u64);
    let (dir, name) = match rel.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, rel),
    };
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let n = format!("{stem}.sync-conflict-{}-{device_short}{ext}", stamp(t));
    match dir {
        Some(d) => format!("{d}/{n}"),
        None => n,
    }
}

/// A conflict copy's original path, writing device and time, if `rel` is one.
pub fn parse_conflict(rel: &str) -> Option<(String, String, String)> {
    let (dir, name) = match rel.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, rel),
    };
    let i = name.find(".sync-conflict-")?;
    let stem = &name[..i];
    let rest = &name[i + ".sync-conflict-".len()..];
    // YYYYMMDD-HHMMSS-DEVICE[.ext]. Names come from peers and disk: check
    // the stamp's shape before cutting, and cut only where `get` says a
    // char boundary is (a byte index inside a multi-byte char would panic).
    let when = rest.get(..15)?;
    let stamp_shape = when.bytes().enumerate().all(|(k, b)| match k {
        8 => b == b'-',
        _ => b.is_ascii_digit(),
    });
    if !stamp_shape {
        return None;
    }
    let rest = rest.get(15..)?.strip_prefix('-')?;
    if rest.is_empty() {
        return None;
    }
    let (device, ext) = match rest.find('.') {
        Some(j) => (&rest[..j], &rest[j..]),
        None => (rest, ""),
    };
    let original = format!("{stem}{ext}");
    let original = match dir {
        Some(d) => format!("{d}/{original}"),
        None => original,
    };
    Some((original, device.to_string(), when.to_string()))
}

/// A free name: `want`, or `want` with `-1`, `-2`... before the extension.
pub fn free_name(root: &Path, want: &str) -> String {
    if fs::symlink_metadata(root.join(want)).is_err() {
        return want.to_string();
    }
    let (base, ext) = match want.rsplit_once('.') {
        Some((b, e)) if !b.is_empty() && !b.ends_with('/') => (b.to_string(), format!(".{e}")),
        _ => (want.to_string(), String::new()),
    };
    (1..)
        .map(|n| format!("{base}-{n}{ext}"))
        .find(|c| fs::symlink_metadata(root.join(c)).is_err())
        .unwrap_or_else(|| want.to_string())
}

/// Moves the file at `rel` into `.shoal/versions/` as `rel~STAMP` and
/// returns its new relative path. Then applies retention to the versions
/// of `rel`, returning the relative paths it removed.
pub fn keep_version(
    root: &Path,
    rel: &str,
    keep: usize,
    max_age: Duration,
) -> io::Result<(String, Vec<String>)> {
    let want = format!("{VERSIONS_DIR}/{rel}~{}", stamp(SystemTime::now()));
    // Several versions in one second get -1, -2...: always above the
    // highest taken, so the newest still sorts last even after pruning.
    let (dir, base) = want.rsplit_once('/').unwrap_or(("", want.as_str()));
    let mut top: Option<u64> = None;
    if let Ok(entries) = fs::read_dir(root.join(dir)) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n == base {
                top = top.max(Some(0));
            } else if let Some(k) = n
                .strip_prefix(base)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.parse::<u64>().ok())
            {
                top = top.max(Some(k));
            }
        }
    }
    let dest_rel = match top {
        None => want.clone(),
        Some(k) => format!("{want}-{}", k + 1),
    };
    let dest = safe_parent(root, &dest_rel)?;
    fs::rename(root.join(rel), &dest)?;
    let removed = prune_versions(root, rel, keep, max_age)?;
    Ok((dest_rel, removed))
}

fn prune_versions(
    root: &Path,
    rel: &str,
    keep: usize,
    max_age: Duration,
) -> io::Result<Vec<String>> {
    let vrel = format!("{VERSIONS_DIR}/{rel}");
    let (dir_rel, name) = match vrel.rsplit_once('/') {
        Some((d, n)) => (d.to_string(), n.to_string()),
        None => return Ok(Vec::new()),
    };
    let dir = root.join(&dir_rel);
    let prefix = format!("{name}~");
    let mut versions: Vec<String> = Vec::new();
    for e in fs::read_dir(&dir)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        let stamped = n.strip_prefix(&prefix).is_some_and(|rest| {
            let b = rest.as_bytes();
            b.len() >= 15
                && b[..8].iter().all(u8::is_ascii_digit)
                && b[8] == b'-'
                && b[9..15].iter().all(u8::is_ascii_digit)
        });
        if stamped {
            versions.push(n);
        }
    }
    // Newest first: names end in a sortable timestamp, then `-N` for the
    // N+1th version in that second (compared as a number: -10 after -9).
    let key = |n: &String| {
        let rest = n.get(prefix.len()..).unwrap_or_default();
        let (stamp, k) = rest.split_at(rest.len().min(15));
        let k = k.strip_prefix('-').and_then(|k| k.parse::<u64>().ok());
        (stamp.to_string(), k.map_or(0, |k| k + 1))
    };
    versions.sort_by_key(|n| std::cmp::Reverse(key(n)));
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for (i, n) in versions.iter().enumerate() {
        let age = n
            .rsplit_once('~')
            .and_then(|(_, s)| {
                chrono::NaiveDateTime::parse_from_str(s.get(..15)?, "%Y%m%d-%H%M%S").ok()
            })
            .map(|t| {
                let secs = t.and_utc().timestamp().max(0) as u64;
                now.duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        if i >= keep || age > max_age {
            let p = dir.join(n);
            if p.symlink_metadata()?.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
            removed.push(format!("{dir_rel}/{n}"));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_keep_the_extension_and_parse_back() {
        let n = conflict_name(
            "docs/report.final.pdf",
            1_700_000_000_000_000_000,
            "AbCdEf12",
        );
        assert_eq!(
            n,
            "docs/report.final.sync-conflict-20231114-221320-AbCdEf12.pdf"
        );
        let (orig, dev, when) = parse_conflict(&n).unwrap();
        assert_eq!(orig, "docs/report.final.pdf");
        assert_eq!(dev, "AbCdEf12");
        assert_eq!(when, "20231114-221320");
        assert_eq!(
            conflict_name(".bashrc", 0, "x"),
            ".bashrc.sync-conflict-19700101-000000-x"
        );
        assert!(parse_conflict("plain.txt").is_none());
    }

    #[test]
    fn conflict_names_with_multibyte_characters_do_not_panic() {
        // byte 15 after the marker falls inside 'é' (two bytes)
        for name in [
            "a.sync-conflict-20231114-22132é-x.txt",
            "a.sync-conflict-20231114-22132é",
            "a.sync-conflict-2023111-22132é-x.txt",
            "a.sync-conflict-ééééééééé",
            "a.sync-conflict-20231114-2213\u{1F600}-dev",
        ] {
            assert!(parse_conflict(name).is_none(), "{name}");
        }
        // a stamp that is not digits is not a conflict copy
        assert!(parse_conflict("a.sync-conflict-2023111x-221320-d.txt").is_none());
        // multi-byte characters elsewhere are kept as they are
        let (orig, dev, when) =
            parse_conflict("dé/résumé.sync-conflict-20231114-221320-dév.tx€").unwrap();
        assert_eq!(orig, "dé/résumé.tx€");
        assert_eq!(dev, "dév");
        assert_eq!(when, "20231114-221320");
    }

    #[test]
    fn parents_through_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(out.path(), dir.path().join("link")).unwrap();
        assert!(safe_parent(dir.path(), "link/x.txt").is_err());
        // the check used before touching any path: links and files refused,
        // missing parents fine, and nothing is created
        assert!(check_parents(dir.path(), "link/x.txt").is_err());
        assert!(check_parents(dir.path(), "link/deeper/x.txt").is_err());
        assert!(check_parents(dir.path(), "new/x.txt").is_ok());
        assert!(!dir.path().join("new").exists());
        let p = safe_parent(dir.path(), "a/b/c.txt").unwrap();
        assert!(dir.path().join("a/b").is_dir());
        assert_eq!(p, dir.path().join("a/b/c.txt"));
    }

    #[test]
    fn versions_are_moved_and_pruned_to_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..4 {
            fs::write(root.join("f.txt"), format!("v{i}")).unwrap();
            let (rel, _) = keep_version(root, "f.txt", 2, Duration::from_secs(3600)).unwrap();
            assert!(root.join(&rel).exists());
            assert!(!root.join("f.txt").exists());
        }
        let n = fs::read_dir(root.join(VERSIONS_DIR)).unwrap().count();
        assert_eq!(n, 2);
        // Twelve versions within one second (-1 .. -11): the newest stay.
        let mut kept = Vec::new();
        for i in 0..12 {
            fs::write(root.join("g.txt"), format!("v{i}")).unwrap();
            let (rel, _) = keep_version(root, "g.txt", 3, Duration::from_secs(3600)).unwrap();
            kept.push(rel);
        }
        let mut left: Vec<String> = fs::read_dir(root.join(VERSIONS_DIR))
            .unwrap()
            .flatten()
            .map(|e| format!("{VERSIONS_DIR}/{}", e.file_name().to_string_lossy()))
            .filter(|n| n.contains("g.txt"))
            .collect();
        left.sort();
        let mut newest = kept[9..].to_vec();
        newest.sort();
        assert_eq!(left, newest);
    }
}
