//! Pure decisions of folder sync: given what is known about one path, what
//! the device does with it. No I/O, no clock, no randomness: the caller
//! gathers the inputs (index values, the local record of what was last
//! scanned or placed, what is on disk now) and carries the plan out.

use crate::files::{self, Entry};
use crate::ids::DeviceId;

/// What this device last saw (scanned) or wrote (placed) at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The content hash recorded (zero for folders and links).
    pub hash: [u8; 32],
    /// Whether `hash` names a manifest.
    pub chunked: bool,
}

/// What to do about a recorded path that is gone from the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vanished {
    /// Nothing to publish (the index already says it is deleted, or says
    /// nothing): forget the record.
    Forget,
    /// Publish this deletion of the version this device had.
    Delete(Entry),
    /// The index moved past the version this device had: that newer
    /// version was written without seeing this deletion, and an existing
    /// file beats a deletion. Forget the record and fetch the winner.
    Refetch,
}

/// Decides what a deletion seen on disk means. `values` are the index's
/// versions of the path, `had` what this device last recorded there,
/// `now_ns` the time the deletion is stamped with.
pub fn vanished(values: &[Entry], had: Recorded, me: &DeviceId, now_ns: i64) -> Vanished {
    match files::winner(values) {
        Some(w) if !w.deleted => {
            if w.hash != had.hash {
                return Vanished::Refetch;
            }
            let mut e = w.clone();
            e.deleted = true;
            e.hash = had.hash;
            e.chunked = had.chunked;
            e.device = me.clone();
            e.mtime_ns = now_ns;
            Vanished::Delete(e)
        }
        _ => Vanished::Forget,
    }
}

/// What is at a path on disk now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDisk {
    /// Nothing.
    Missing,
    /// A regular file.
    File,
    /// A folder.
    Dir,
    /// A symbolic link, with its target when it is UTF-8.
    Link(Option<String>),
}

/// What is known about one path when the index changed it.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The index's versions of the path (any order).
    pub values: &'a [Entry],
    /// What this device last recorded there.
    pub recorded: Option<Recorded>,
    /// What is on disk now.
    pub disk: OnDisk,
    /// The disk's modification time (ns), when something is there.
    pub disk_mtime_ns: i64,
    /// Whether the disk's stat is the one recorded (nothing changed here
    /// since this device last scanned or placed the path).
    pub known: bool,
    /// Whether the ignore rules keep the winner's kind of path local.
    pub ignored: bool,
}

/// How whatever is at a path makes way for the winner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aside {
    /// Kept as a conflict copy named after this version's time and device
    /// (an unrecorded local change, or a version that lost a conflict).
    Conflict {
        /// Modification time of the version set aside.
        mtime_ns: i64,
        /// The device that wrote it.
        device: DeviceId,
    },
    /// Kept as an old version under `.shoal/versions/`.
    OldVersion,
}

/// What to do with a path whose index entry changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// Nothing: the disk already agrees, or a local change wins and the
    /// scanner publishes it.
    Nothing,
    /// The path is deleted and gone here: forget the record.
    Forget,
    /// The path was deleted elsewhere: remove the file, kept as an old
    /// version.
    Remove,
    /// The folder was deleted elsewhere: remove it once empty (contents
    /// go first, by their own deletions; files new here keep it).
    RemoveDir,
    /// Make the folder (what is there first goes aside as said).
    MakeDir(Option<Aside>),
    /// Record the folder that is already there.
    RecordDir,
    /// Make the link (what is there first goes aside as said).
    MakeLink {
        /// Its target.
        target: String,
        /// How what is there makes way.
        aside: Option<Aside>,
    },
    /// Record the link that is already there.
    RecordLink,
    /// Fetch and place this version (what is there then goes aside as
    /// [`set_aside_as`] says, decided again at placement).
    Fetch(Entry),
}

/// How what is at a path makes way for winner `w`: an unrecorded local
/// change (`known` false) is a conflict copy under this device's name; a
/// recorded version that lost a conflict is a copy under its writer's
/// name; anything else an old version.
pub fn set_aside_as(
    known: bool,
    disk_mtime_ns: i64,
    recorded: Option<Recorded>,
    values: &[Entry],
    w: &Entry,
    me: &DeviceId,
) -> Aside {
    if !known {
        return Aside::Conflict {
            mtime_ns: disk_mtime_ns,
            device: me.clone(),
        };
    }
    let lost = recorded.and_then(|r| {
        // The same version can be in the index more than once only if two
        // devices wrote the same bytes; the winner among them names it.
        let same: Vec<Entry> = values
            .iter()
            .filter(|e| *e != w && !e.deleted && e.hash == r.hash && r.hash != w.hash)
            .cloned()
            .collect();
        files::winner(&same).cloned()
    });
    match lost {
        Some(e) => Aside::Conflict {
            mtime_ns: e.mtime_ns,
            device: e.device,
        },
        None => Aside::OldVersion,
    }
}

/// Decides what a change of the index means for the disk at one path.
pub fn remote(f: &Facts<'_>, me: &DeviceId) -> Remote {
    use crate::files::Kind;
    let Some(w) = files::winner(f.values) else {
        return Remote::Nothing;
    };
    if f.ignored {
        return Remote::Nothing;
    }
    let aside = || {
        (f.disk != OnDisk::Missing)
            .then(|| set_aside_as(f.known, f.disk_mtime_ns, f.recorded, f.values, w, me))
    };
    if w.deleted {
        // A folder's stat changes with its contents: a recorded folder
        // counts as known.
        let known = f.known || (f.disk == OnDisk::Dir && f.recorded.is_some());
        return match &f.disk {
            OnDisk::Missing => Remote::Forget,
            // Modified (or created) here: the modification wins.
            _ if !known => Remote::Nothing,
            OnDisk::Dir => Remote::RemoveDir,
            _ => Remote::Remove,
        };
    }
    match w.kind {
        Kind::Dir => match &f.disk {
            OnDisk::Dir if f.known => Remote::Nothing,
            OnDisk::Dir => Remote::RecordDir,
            _ => Remote::MakeDir(aside()),
        },
        Kind::Symlink => {
            let target = w.target.clone().unwrap_or_default();
            match &f.disk {
                OnDisk::Link(Some(t)) if *t == target && f.known => Remote::Nothing,
                OnDisk::Link(Some(t)) if *t == target => Remote::RecordLink,
                _ => Remote::MakeLink {
                    target,
                    aside: aside(),
                },
            }
        }
        Kind::File => {
            if f.recorded.is_some_and(|r| r.hash == w.hash) {
                // In sync; or edited here since the scan recorded the
                // winner itself: a plain local edit, which the scanner
                // publishes.
                Remote::Nothing
            } else {
                Remote::Fetch(w.clone())
            }
        }
    }
}

/// What to do with a version found on disk by the scanner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// The index already has this content: record it, publish nothing
    /// (often this device's own placement, or its own version coming back).
    Adopt,
    /// A plain local edit: record and publish it.
    Publish,
    /// The index moved past the version this file was edited from, and
    /// this edit wins: publish it, and the other version as a conflict
    /// copy named after its time and writer.
    OursWin {
        /// The other version, published under the copy's name.
        theirs: Entry,
        /// The copy's name parts: that version's time and writer.
        copy: (i64, DeviceId),
    },
    /// The same, and the other version wins: this file becomes a conflict
    /// copy under this device's name (published as such), and the winner
    /// is placed.
    TheirsWin {
        /// The copy's name parts: this version's time and this device.
        copy: (i64, DeviceId),
    },
}

/// Decides what a scanned file means. `values` are the index's versions
/// of the path, `base` the content hash this device last recorded there
/// (what the file was edited from), `found` the entry for what is on disk.
pub fn local(values: &[Entry], base: Option<[u8; 32]>, found: &Entry, me: &DeviceId) -> Local {
    use crate::files::Kind;
    let Some(w) = files::winner(values) else {
        return Local::Publish;
    };
    // With no record here at all, a live version this device has not
    // fetched yet is concurrent with the new file.
    let concurrent = w.kind == Kind::File
        && found.kind == Kind::File
        && !w.deleted
        && base.is_none_or(|b| w.hash != b)
        && !w.same_content(found);
    if concurrent {
        return if files::winner(&[w.clone(), found.clone()]) == Some(w) {
            Local::TheirsWin {
                copy: (found.mtime_ns, me.clone()),
            }
        } else {
            Local::OursWin {
                theirs: w.clone(),
                copy: (w.mtime_ns, w.device.clone()),
            }
        };
    }
    if w.same_content(found) {
        Local::Adopt
    } else {
        Local::Publish
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::Kind;
    use proptest::prelude::*;

    fn dev(b: u8) -> DeviceId {
        DeviceId::from_bytes(vec![b; 38]).unwrap()
    }

    fn entry(hash: u8, mtime: i64, device: u8, deleted: bool) -> Entry {
        Entry {
            kind: Kind::File,
            hash: [hash; 32],
            chunked: false,
            size: 1,
            mode: 0o644,
            mtime_ns: mtime,
            deleted,
            device: dev(device),
            target: None,
        }
    }

    #[test]
    fn a_deletion_of_the_version_we_had_is_published() {
        let v1 = entry(1, 10, 1, false);
        let had = Recorded {
            hash: [1; 32],
            chunked: false,
        };
        match vanished(&[v1], had, &dev(2), 99) {
            Vanished::Delete(e) => {
                assert!(e.deleted);
                assert_eq!(e.device, dev(2));
                assert_eq!(e.mtime_ns, 99);
                assert_eq!(e.hash, [1; 32]);
            }
            other => panic!("expected a deletion, got {other:?}"),
        }
    }

    #[test]
    fn a_deletion_of_an_older_version_loses_to_the_newer_edit() {
        // Issue 19, bug 2: B deleted version 1 offline; A wrote version 2.
        let v2 = entry(2, 20, 1, false);
        let had = Recorded {
            hash: [1; 32],
            chunked: false,
        };
        assert_eq!(vanished(&[v2], had, &dev(2), 99), Vanished::Refetch);
    }

    proptest! {
        /// A modification is never removed by a deletion that did not see
        /// it, whatever the index holds and in whatever order.
        #[test]
        fn a_deletion_never_publishes_over_a_version_it_did_not_have(
            vals in proptest::collection::vec((0u8..4, 0i64..5, 0u8..3, any::<bool>()), 0..6),
            had in 0u8..4,
            rev in any::<bool>(),
        ) {
            let mut values: Vec<Entry> =
                vals.iter().map(|&(h, m, d, del)| entry(h, m, d, del)).collect();
            let rec = Recorded { hash: [had; 32], chunked: false };
            let plan = vanished(&values, rec, &dev(9), 100);
            if rev {
                values.reverse();
                prop_assert_eq!(&vanished(&values, rec, &dev(9), 100), &plan);
            }
            if let Vanished::Delete(e) = &plan {
                let w = files::winner(&values).unwrap();
                prop_assert_eq!(w.hash, [had; 32]);
                prop_assert!(e.deleted);
            }
        }
    }

    fn facts_strategy() -> impl Strategy<Value = (Vec<Entry>, Option<u8>, u8, bool)> {
        (
            proptest::collection::vec((0u8..3, 0i64..4, 0u8..3, any::<bool>(), 0u8..3), 1..5)
                .prop_map(|v| {
                    v.into_iter()
                        .map(|(h, m, d, del, k)| {
                            let mut e = entry(h, m, d, del);
                            e.kind = [Kind::File, Kind::Dir, Kind::Symlink][k as usize];
                            if e.kind != Kind::File {
                                e.hash = [0; 32];
                            }
                            if e.kind == Kind::Symlink {
                                e.target = Some(format!("t{h}"));
                            }
                            e
                        })
                        .collect()
                }),
            proptest::option::of(0u8..3),
            0u8..5,
            any::<bool>(),
        )
    }

    fn disk_of(d: u8) -> OnDisk {
        match d {
            0 => OnDisk::Missing,
            1 => OnDisk::File,
            2 => OnDisk::Dir,
            3 => OnDisk::Link(Some("t1".into())),
            _ => OnDisk::Link(Some("t2".into())),
        }
    }

    /// Carries a plan out on the facts, as the worker does: the disk and
    /// the record end as the plan says.
    fn carry_out(f: &Facts<'_>, plan: &Remote) -> (Option<Recorded>, OnDisk) {
        let rec = |h| {
            Some(Recorded {
                hash: h,
                chunked: false,
            })
        };
        match plan {
            Remote::Nothing => (f.recorded, f.disk.clone()),
            Remote::Forget | Remote::Remove | Remote::RemoveDir => (None, OnDisk::Missing),
            Remote::MakeDir(_) | Remote::RecordDir => (rec([0; 32]), OnDisk::Dir),
            Remote::MakeLink { target, .. } => (rec([0; 32]), OnDisk::Link(Some(target.clone()))),
            Remote::RecordLink => (rec([0; 32]), f.disk.clone()),
            Remote::Fetch(w) => (rec(w.hash), OnDisk::File),
        }
    }

    proptest! {
        /// Planning is independent of the order in which index values
        /// arrive: every device given the same inputs decides the same,
        /// and names the same conflict copy.
        #[test]
        fn planning_ignores_the_order_of_values(
            (values, rec, disk, known) in facts_strategy(),
            seed in any::<u64>(),
        ) {
            let recorded = rec.map(|h| Recorded { hash: [h; 32], chunked: false });
            let f = Facts { values: &values, recorded, disk: disk_of(disk), disk_mtime_ns: 7, known, ignored: false };
            let plan = remote(&f, &dev(9));
            let mut shuffled = values.clone();
            let n = shuffled.len();
            shuffled.rotate_left((seed as usize) % n);
            if seed % 2 == 0 { shuffled.reverse(); }
            let g = Facts { values: &shuffled, ..f.clone() };
            prop_assert_eq!(remote(&g, &dev(9)), plan);
        }

        /// An unrecorded local change is never overwritten or removed
        /// without being set aside as a conflict copy first, and a
        /// modification here is never removed by a deletion.
        #[test]
        fn an_unrecorded_local_change_is_never_lost(
            (values, rec, disk, _) in facts_strategy(),
        ) {
            prop_assume!(disk != 0);
            let recorded = rec.map(|h| Recorded { hash: [h; 32], chunked: false });
            let f = Facts { values: &values, recorded, disk: disk_of(disk), disk_mtime_ns: 7, known: false, ignored: false };
            let me = dev(9);
            match remote(&f, &me) {
                Remote::Remove => prop_assert!(false, "removed an unrecorded change"),
                Remote::RemoveDir => prop_assert!(f.recorded.is_some() && f.disk == OnDisk::Dir),
                Remote::MakeDir(a) | Remote::MakeLink { aside: a, .. } => {
                    prop_assert_eq!(a, Some(Aside::Conflict { mtime_ns: 7, device: me.clone() }))
                }
                Remote::Fetch(w) => {
                    let a = set_aside_as(false, 7, recorded, &values, &w, &me);
                    prop_assert_eq!(a, Aside::Conflict { mtime_ns: 7, device: me.clone() });
                }
                _ => {}
            }
        }

        /// Carrying a plan out and planning again yields nothing.
        #[test]
        fn a_plan_carried_out_leaves_nothing_to_do(
            (values, rec, disk, known) in facts_strategy(),
        ) {
            let recorded = rec.map(|h| Recorded { hash: [h; 32], chunked: false });
            let f = Facts { values: &values, recorded, disk: disk_of(disk), disk_mtime_ns: 7, known, ignored: false };
            let plan = remote(&f, &dev(9));
            let (recorded, disk) = carry_out(&f, &plan);
            // The worker records what it placed: the disk is then known.
            let known = f.known || plan != Remote::Nothing;
            let g = Facts { values: &values, recorded, disk, disk_mtime_ns: 8, known, ignored: false };
            let again = remote(&g, &dev(9));
            prop_assert!(matches!(again, Remote::Nothing | Remote::Forget), "{:?} then {:?}", plan, again);
            if again == Remote::Forget {
                // Forgetting a record is itself idempotent.
                let h = Facts { recorded: None, ..g.clone() };
                prop_assert_eq!(remote(&h, &dev(9)), Remote::Forget);
            }
        }
    }

    proptest! {
        /// A local edit: every device given the same index values decides
        /// the same (and names the same copy) whatever their order; the
        /// losing side is always kept as a copy, never dropped.
        #[test]
        fn a_local_edit_is_decided_alike_everywhere_and_never_dropped(
            (values, rec, _, _) in facts_strategy(),
            ours in (0u8..3, 0i64..5),
            seed in any::<u64>(),
        ) {
            let found = entry(ours.0, ours.1, 9, false);
            let base = rec.map(|h| [h; 32]);
            let plan = local(&values, base, &found, &dev(9));
            let mut shuffled = values.clone();
            let n = shuffled.len();
            shuffled.rotate_left((seed as usize) % n);
            prop_assert_eq!(&local(&shuffled, base, &found, &dev(9)), &plan);
            match &plan {
                Local::TheirsWin { copy } => prop_assert_eq!(copy, &(found.mtime_ns, dev(9))),
                Local::OursWin { theirs, copy } => {
                    prop_assert_eq!(copy, &(theirs.mtime_ns, theirs.device.clone()));
                    prop_assert!(!theirs.deleted);
                }
                Local::Adopt => prop_assert!(files::winner(&values).unwrap().same_content(&found)),
                Local::Publish => {}
            }
        }
    }
}
