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
}
