//! Helpers around Automerge's sync protocol: decode a peer's sync message
//! and list the changes it carries, so roles can be checked before anything
//! is applied.

use automerge::sync::Message;
use automerge::{Automerge, Change};

use crate::error::{Error, Result};

/// The changes of `changes` that no signature vouches for.
///
/// An author signs the last change of each batch it publishes, not every
/// change: a change's hash covers its dependencies, and an author's earlier
/// changes are always among its later changes' ancestors. So a change by
/// device D is vouched for when it is signed by D (`signed_by` says which
/// hashes carry a verified signature of their own author) or when a change
/// signed by D reaches it through dependencies inside `changes`. A change
/// by D reached from a change signed by someone else is not.
pub fn unvouched(
    changes: &[Change],
    signed: &std::collections::HashSet<automerge::ChangeHash>,
) -> Vec<automerge::ChangeHash> {
    use std::collections::{HashMap, HashSet};
    let by_hash: HashMap<automerge::ChangeHash, &Change> =
        changes.iter().map(|c| (c.hash(), c)).collect();
    let mut vouched: HashSet<automerge::ChangeHash> = HashSet::new();
    for tip in changes.iter().filter(|c| signed.contains(&c.hash())) {
        let author = tip.actor_id();
        let mut seen = HashSet::new();
        let mut stack = vec![tip.hash()];
        while let Some(h) = stack.pop() {
            if !seen.insert(h) {
                continue;
            }
            let Some(c) = by_hash.get(&h) else { continue };
            if c.actor_id() == author {
                vouched.insert(h);
            }
            stack.extend(c.deps().iter().copied());
        }
    }
    changes
        .iter()
        .map(|c| c.hash())
        .filter(|h| !vouched.contains(h))
        .collect()
}

/// Most changes one sync message may carry before it is refused.
pub const MAX_CHANGES_PER_MESSAGE: usize = 200_000;

/// Decodes an encoded sync message.
pub fn decode_message(bytes: &[u8]) -> Result<Message> {
    Message::decode(bytes).map_err(|e| Error::Malformed {
        what: "sync message",
        reason: e.to_string(),
    })
}

/// The changes a sync message carries. A V1 message has one change per
/// chunk; a V2 message puts several change chunks back to back in one, or a
/// whole saved document. All are parsed and verified by Automerge without
/// touching the receiver's document.
pub fn changes_in(msg: &Message) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for blob in msg.changes.iter() {
        for (kind, chunk) in split_chunks(blob)? {
            if kind == CHUNK_DOCUMENT {
                let doc = Automerge::load(chunk).map_err(|e| malformed(e.to_string()))?;
                out.extend(doc.get_changes(&[]));
            } else {
                out.push(Change::try_from(chunk).map_err(|e| malformed(e.to_string()))?);
            }
            if out.len() > MAX_CHANGES_PER_MESSAGE {
                return Err(Error::TooLarge {
                    what: "sync message",
                    size: out.len(),
                    limit: MAX_CHANGES_PER_MESSAGE,
                });
            }
        }
    }
    Ok(out)
}

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;

fn malformed(reason: String) -> Error {
    Error::Malformed {
        what: "sync message chunk",
        reason,
    }
}

/// Splits back-to-back Automerge chunks (magic, checksum, type, uLEB128
/// length, body) into (type, whole chunk) slices.
fn split_chunks(mut bytes: &[u8]) -> Result<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 9 || bytes[..4] != MAGIC {
            return Err(malformed("not an automerge chunk".into()));
        }
        let kind = bytes[8];
        let (len, used) =
            uleb128(&bytes[9..]).ok_or_else(|| malformed("bad chunk length".into()))?;
        let end = 9usize
            .checked_add(used)
            .and_then(|h| h.checked_add(len))
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| malformed("chunk runs past the message".into()))?;
        out.push((kind, &bytes[..end]));
        bytes = &bytes[end..];
    }
    Ok(out)
}

fn uleb128(b: &[u8]) -> Option<(usize, usize)> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return usize::try_from(v).ok().map(|v| (v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    #[test]
    fn splits_concatenated_changes_and_refuses_garbage() {
        let mut d = AutoCommit::new();
        d.put(ROOT, "a", 1).unwrap();
        d.commit();
        d.put(ROOT, "b", 2).unwrap();
        d.commit();
        let mut blob = Vec::new();
        for c in d.get_changes(&[]) {
            blob.extend_from_slice(c.raw_bytes());
        }
        let parts = split_chunks(&blob).unwrap();
        assert_eq!(parts.len(), 2);
        assert!(split_chunks(&blob[..blob.len() - 1]).is_err());
        assert!(split_chunks(b"garbage!garbage").is_err());
        let whole = d.save();
        let parts = split_chunks(&whole).unwrap();
        assert_eq!(parts[0].0, CHUNK_DOCUMENT);
    }

    #[test]
    fn a_signed_tip_vouches_for_its_authors_ancestors_only() {
        use crate::actor::actor_for;
        use crate::ids::DeviceId;
        let dev = |b: u8| DeviceId::from_bytes(vec![b; 38]).unwrap();
        let mut a = AutoCommit::new().with_actor(actor_for(&dev(1), [0; 8]));
        for i in 0..3 {
            a.put(ROOT, "k", i).unwrap();
            a.commit();
        }
        let mut b = a.fork().with_actor(actor_for(&dev(2), [0; 8]));
        b.put(ROOT, "b", 1).unwrap();
        b.commit();
        // a forger writes under a's actor id, off the signed chain
        let mut f = AutoCommit::new().with_actor(actor_for(&dev(1), [9; 8]));
        f.put(ROOT, "forged", 1).unwrap();
        f.commit();
        let a_changes = a.get_changes(&[]);
        let tip = a_changes.last().unwrap().hash();
        let b_change = b.get_last_local_change().unwrap();
        let forged = f.get_last_local_change().unwrap();
        let mut all = a_changes.clone();
        all.push(b_change.clone());
        all.push(forged.clone());
        let signed: std::collections::HashSet<_> = [tip].into_iter().collect();
        let left = unvouched(&all, &signed);
        assert_eq!(left.len(), 2, "only b's change and the forgery are left");
        assert!(left.contains(&b_change.hash()) && left.contains(&forged.hash()));
        // b's own signature on its change vouches for it, not for a's chain
        let signed: std::collections::HashSet<_> = [b_change.hash()].into_iter().collect();
        assert_eq!(unvouched(&all, &signed).len(), 4);
    }

    proptest::proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = split_chunks(&bytes);
            if let Ok(m) = decode_message(&bytes) {
                let _ = changes_in(&m);
            }
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = split_chunks(&framed);
        }
    }
}
