//! Changing the folder on disk: safe parents, atomic placement, old
//! versions under `.shoal/versions/`, conflict copies.
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

/// The temp file a transfer named `part` writes into: the one place that
/// names temp files.
pub fn part_file(root: &Path, part: &str) -> PathBuf {
    root.join(TMP_DIR).join(format!("{part}{PART_SUFFIX}"))
}

/// The part name of a file in [`TMP_DIR`], if it is a transfer's temp file.
pub fn part_of(file_name: &str) -> Option<&str> {
    file_name.strip_suffix(PART_SUFFIX)
}

const PART_SUFFIX: &str = ".part";
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

/// Bytes of a name kept free for [`free_name`]'s `-N`.
const FREE_NAME_ROOM: usize = 8;

/// `dir/name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext` for `rel` (the
/// name cut to fit in 255 bytes).
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
    let tail = format!(".sync-conflict-{}-{device_short}", stamp(t));
    // The copy's name must fit where the original's did, with room for
    // `free_name`'s `-N`: a long stem is cut (at a char boundary), and an
    // extension too long to keep is dropped.
    let room = shoal_protocol::files::MAX_NAME_LEN - FREE_NAME_ROOM;
    let ext = if tail.len() + ext.len() + 1 > room {
        ""
    } else {
        ext
    };
    let mut cut = stem.len().min(room.saturating_sub(tail.len() + ext.len()));
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    let n = format!("{}{tail}{ext}", &stem[..cut]);
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

/// Where kept version `id` is stored, relative to the folder root: a
/// name no user file can have and no path length can break.
pub fn version_store(id: u64) -> String {
    format!("{VERSIONS_DIR}/{id:016x}")
}

/// Moves what is at `rel` (a file, or a folder with its contents) to
/// [`version_store`]`(id)` and returns that relative path.
pub fn store_version(root: &Path, rel: &str, id: u64) -> io::Result<String> {
    let store = version_store(id);
    fs::create_dir_all(root.join(VERSIONS_DIR))?;
    fs::rename(root.join(rel), root.join(&store))?;
    Ok(store)
}

/// Removes a kept version's file, then the folders above it inside
/// `.shoal/versions/` that it leaves empty (a folder kept whole).
pub fn remove_version(root: &Path, store: &str) -> io::Result<()> {
    let p = root.join(store);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&p)?,
        Ok(_) => fs::remove_file(&p)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let top = root.join(VERSIONS_DIR);
    let mut dir = p.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d == top || !d.starts_with(&top) || fs::remove_dir(&d).is_err() {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Ok(())
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
    fn a_conflict_copy_of_a_long_name_fits_in_a_name() {
        // Failed before the cut: a 250-byte name's copy was 287 bytes, and
        // a conflict on it could not be set aside (ENAMETOOLONG).
        let dir = tempfile::tempdir().unwrap();
        for name in [
            format!("{}.txt", "n".repeat(246)),
            "é".repeat(125),
            format!("a.{}", "x".repeat(240)),
        ] {
            let c = conflict_name(&format!("d/{name}"), 1_700_000_000_000_000_000, "ABCDEFGH");
            let copy = c.strip_prefix("d/").unwrap();
            assert!(copy.len() <= 247, "{} bytes", copy.len());
            assert!(parse_conflict(&c).is_some(), "{c}");
            fs::write(dir.path().join(copy), "x").unwrap();
            let again = free_name(dir.path(), copy);
            fs::write(dir.path().join(&again), "y").unwrap();
        }
        assert_eq!(
            conflict_name("a/b.txt", 1_700_000_000_000_000_000, "DEV"),
            "a/b.sync-conflict-20231114-221320-DEV.txt"
        );
    }

    #[test]
    fn versions_are_stored_by_id_whatever_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // A name of 250 bytes, and one shaped like an old version's.
        let long = "n".repeat(250);
        for (i, name) in [long.as_str(), "X~20990101-000000"].iter().enumerate() {
            fs::write(root.join(name), format!("v{i}")).unwrap();
            let store = store_version(root, name, i as u64 + 1).unwrap();
            assert_eq!(store, version_store(i as u64 + 1));
            assert_eq!(
                fs::read(root.join(&store)).unwrap(),
                format!("v{i}").as_bytes()
            );
            assert!(!root.join(name).exists());
        }
        // A folder kept whole goes, with its contents, when its last file does.
        fs::create_dir_all(root.join("d/e")).unwrap();
        fs::write(root.join("d/e/f"), "x").unwrap();
        let store = store_version(root, "d", 9).unwrap();
        remove_version(root, &format!("{store}/e/f")).unwrap();
        assert!(!root.join(&store).exists());
        assert!(root.join(VERSIONS_DIR).is_dir());
        remove_version(root, "missing/already").unwrap();
    }
}
