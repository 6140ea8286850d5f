//! Helpers around Automerge's sync protocol: decode a peer's sync message
//! and list the changes it carries, so roles can be checked before anything
//! is applied.
//!
//! Everything here runs on bytes from peers before Automerge decodes them:
//! the message's counts and bloom filters are checked
//! ([`validate_message`]), and what its compressed parts may inflate to is
//! bounded ([`Budget`]): Automerge inflates compressed change chunks and
//! deflated document columns with no limit, so a few kilobytes could ask
//! for gigabytes.

use automerge::sync::Message;
use automerge::{Automerge, Change};

use crate::error::{Error, Result};

/// Who vouches for each change of `changes`, or the first change nothing
/// vouches for.
///
/// `signed` maps the hashes that carry a verified signature to the device
/// that signed them. A device signs the last change of each batch it
/// publishes, not every change: a change's hash covers its dependencies,
/// and a device's earlier changes are always among its later changes'
/// ancestors. So a change under device D's actor is vouched for when it is
/// signed by D or when a change signed by D, under the same actor, reaches
/// it through dependencies inside `changes`; a change reached from a
/// change signed by someone else is not. An app's change (see
/// [`crate::actor`]) needs a signature of its own, and its signer vouches
/// for it.
pub fn vouchers(
    changes: &[Change],
    signed: &std::collections::HashMap<automerge::ChangeHash, crate::DeviceId>,
) -> std::result::Result<
    std::collections::HashMap<automerge::ChangeHash, crate::DeviceId>,
    automerge::ChangeHash,
> {
    use std::collections::{HashMap, HashSet};
    let by_hash: HashMap<automerge::ChangeHash, &Change> =
        changes.iter().map(|c| (c.hash(), c)).collect();
    let mut out: HashMap<automerge::ChangeHash, crate::DeviceId> = HashMap::new();
    for tip in changes.iter() {
        let Some(signer) = signed.get(&tip.hash()) else {
            continue;
        };
        let author = tip.actor_id();
        if crate::actor::is_app_actor(author) {
            out.insert(tip.hash(), signer.clone());
            continue;
        }
        let mut seen = HashSet::new();
        let mut stack = vec![tip.hash()];
        while let Some(h) = stack.pop() {
            if !seen.insert(h) {
                continue;
            }
            let Some(c) = by_hash.get(&h) else { continue };
            if c.actor_id() == author {
                out.insert(h, signer.clone());
            }
            stack.extend(c.deps().iter().copied());
        }
    }
    match changes.iter().find(|c| !out.contains_key(&c.hash())) {
        Some(c) => Err(c.hash()),
        None => Ok(out),
    }
}

/// Most changes one sync message may carry before it is refused.
pub const MAX_CHANGES_PER_MESSAGE: usize = 200_000;

/// Most heads one sync message may name.
pub const MAX_HEADS: usize = 10_000;
/// Most needed change hashes one sync message may name.
pub const MAX_NEED: usize = 100_000;
/// Most `have` summaries one sync message may carry (Automerge sends one).
pub const MAX_HAVES: usize = 16;
/// Most last-sync hashes one `have` summary may name.
pub const MAX_LAST_SYNC: usize = 10_000;
/// Most bits per entry a peer's bloom filter may use (Automerge uses 10).
pub const MAX_BLOOM_BITS_PER_ENTRY: u64 = 64;
/// Most probes a peer's bloom filter may ask for (Automerge uses 7).
pub const MAX_BLOOM_PROBES: u64 = 32;

/// Decodes an encoded sync message and checks its shape (see
/// [`validate_message`]) before anything else may look at it.
pub fn decode_message(bytes: &[u8]) -> Result<Message> {
    let msg = Message::decode(bytes).map_err(|e| Error::Malformed {
        what: "sync message",
        reason: e.to_string(),
    })?;
    validate_message(&msg)?;
    Ok(msg)
}

/// Refuses a sync message that Automerge would choke on: counts of heads,
/// needs, `have` summaries and their hashes over their bounds, and bloom
/// filters whose shape would make `generate_sync_message` divide by zero
/// (entries but no bits) or reserve gigabytes (billions of probes).
pub fn validate_message(msg: &Message) -> Result<()> {
    let bound = |what: &'static str, size: usize, limit: usize| {
        if size > limit {
            Err(Error::TooLarge { what, size, limit })
        } else {
            Ok(())
        }
    };
    bound("sync message heads", msg.heads.len(), MAX_HEADS)?;
    bound("sync message needs", msg.need.len(), MAX_NEED)?;
    bound("sync message haves", msg.have.len(), MAX_HAVES)?;
    bound(
        "sync message change chunks",
        msg.changes.len(),
        MAX_CHANGES_PER_MESSAGE,
    )?;
    for have in &msg.have {
        bound(
            "sync message last-sync",
            have.last_sync.len(),
            MAX_LAST_SYNC,
        )?;
        check_bloom(&have.bloom.to_bytes())?;
    }
    Ok(())
}

/// Checks a bloom filter as it travels: uLEB128 entries, bits per entry,
/// probes, then exactly `ceil(entries * bits_per_entry / 8)` bytes of bits.
/// An empty filter (no entries) is always fine: Automerge never probes it.
fn check_bloom(bytes: &[u8]) -> Result<()> {
    let bad = |reason: String| Error::Malformed {
        what: "sync message bloom filter",
        reason,
    };
    if bytes.is_empty() {
        return Ok(());
    }
    let mut at = 0;
    let mut field = |name: &str| -> Result<u64> {
        let (v, used) = uleb128(&bytes[at..]).ok_or_else(|| bad(format!("bad {name}")))?;
        at += used;
        u64::try_from(v).map_err(|_| bad(format!("{name} out of range")))
    };
    let entries = field("entry count")?;
    let bits_per_entry = field("bits per entry")?;
    let probes = field("probe count")?;
    if entries == 0 {
        return Ok(());
    }
    if !(1..=MAX_BLOOM_BITS_PER_ENTRY).contains(&bits_per_entry) {
        return Err(bad(format!(
            "{bits_per_entry} bits per entry (allowed 1..={MAX_BLOOM_BITS_PER_ENTRY})"
        )));
    }
    if !(1..=MAX_BLOOM_PROBES).contains(&probes) {
        return Err(bad(format!(
            "{probes} probes (allowed 1..={MAX_BLOOM_PROBES})"
        )));
    }
    let want = entries
        .checked_mul(bits_per_entry)
        .map(|b| b.div_ceil(8))
        .ok_or_else(|| bad("entry count out of range".into()))?;
    let have = bytes.len() - at;
    if have == 0 || u64::try_from(have).ok() != Some(want) {
        return Err(bad(format!(
            "{have} bytes of bits for {entries} entries of {bits_per_entry} bits"
        )));
    }
    Ok(())
}

/// Most bytes the compressed parts of one sync message may inflate to.
pub const MAX_INFLATED_PER_MESSAGE: usize = 64 * 1024 * 1024;
/// Most bytes the compressed changes of one gossip message may inflate to
/// (gossip inlines only changes of up to 60 KiB).
pub const MAX_INFLATED_PER_GOSSIP: usize = 4 * 1024 * 1024;

/// What the compressed parts of one message may still inflate to.
#[derive(Debug, Clone)]
pub struct Budget {
    limit: usize,
    left: usize,
}

impl Budget {
    /// A budget of `limit` inflated bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, left: limit }
    }

    /// Inflates raw deflate `data` into nothing, refusing once it would
    /// exceed what is left.
    fn inflate(&mut self, data: &[u8]) -> Result<()> {
        use std::io::Read;
        let cap = u64::try_from(self.left)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let mut reader = flate2::read::DeflateDecoder::new(data).take(cap);
        let n = std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| malformed(format!("bad deflate data: {e}")))?;
        match usize::try_from(n).ok().filter(|n| *n <= self.left) {
            Some(n) => {
                self.left -= n;
                Ok(())
            }
            None => Err(Error::TooLarge {
                what: "inflated message",
                size: (self.limit - self.left)
                    .saturating_add(usize::try_from(n).unwrap_or(usize::MAX)),
                limit: self.limit,
            }),
        }
    }
}

/// Parses one change chunk from a peer (plain, or compressed within
/// `budget`); any other chunk type is refused.
pub fn parse_change(chunk: &[u8], budget: &mut Budget) -> Result<Change> {
    let mut parts = split_chunks(chunk)?;
    let (Some(one), None) = (parts.pop(), parts.pop()) else {
        return Err(malformed("not exactly one chunk".into()));
    };
    match one.kind {
        CHUNK_CHANGE => {}
        CHUNK_COMPRESSED => budget.inflate(one.body)?,
        other => return Err(malformed(format!("chunk type {other} is not a change"))),
    }
    guarded("a change", || {
        Change::try_from(chunk).map_err(|e| malformed(e.to_string()))
    })
}

/// Runs an Automerge parser on bytes from a peer or the disk. automerge
/// 0.12 (its column decoder, hexane) still panics on some crafted input
/// that passes shoal's own checks (the fuzzers keep finding them, see
/// `fuzz/crashers/`): such a panic is caught and becomes a refusal. Only
/// for parsers that build a new value, so nothing half-changed is kept.
fn guarded<T>(what: &str, parse: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err(malformed(format!(
            "Automerge could not parse {what} (it panicked)"
        )))
    })
}

/// Loads saved Automerge bytes (a snapshot, or changes, back to back) into
/// a new document: [`check_stored`] first, then Automerge, with a panic of
/// Automerge's parser refused like any malformed input.
pub fn load_stored(bytes: &[u8]) -> Result<automerge::AutoCommit> {
    check_stored(bytes)?;
    guarded("a saved document", || {
        let mut doc = automerge::AutoCommit::new();
        doc.load_incremental(bytes)
            .map_err(|e| malformed(e.to_string()))?;
        Ok(doc)
    })
}

/// Checks saved Automerge bytes (a document, or changes, back to back)
/// before Automerge parses them: every chunk must be a document or a
/// change. Automerge 0.12 panics on some other chunks (bundles), and what
/// is on disk may be corrupt.
pub fn check_stored(bytes: &[u8]) -> Result<()> {
    for chunk in split_chunks(bytes)? {
        match chunk.kind {
            CHUNK_DOCUMENT | CHUNK_CHANGE | CHUNK_COMPRESSED => {}
            other => return Err(malformed(format!("chunk type {other} is not accepted"))),
        }
    }
    Ok(())
}

/// The changes in saved Automerge bytes (an incremental save: change
/// chunks back to back, whose dependencies may be in earlier saves; or a
/// saved document), each parsed on its own with a panic of Automerge's
/// parser refused like malformed input.
pub fn stored_changes(bytes: &[u8]) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for chunk in split_chunks(bytes)? {
        match chunk.kind {
            CHUNK_DOCUMENT => out.extend(load_stored(chunk.whole)?.get_changes(&[])),
            CHUNK_CHANGE | CHUNK_COMPRESSED => out.push(guarded("a saved change", || {
                Change::try_from(chunk.whole).map_err(|e| malformed(e.to_string()))
            })?),
            other => return Err(malformed(format!("chunk type {other} is not accepted"))),
        }
    }
    Ok(out)
}

/// The changes a sync message carries. A V1 message has one change per
/// chunk; a V2 message puts several change chunks back to back in one, or a
/// whole saved document. All are parsed and verified by Automerge without
/// touching the receiver's document, after what their compressed parts
/// inflate to is bounded by [`MAX_INFLATED_PER_MESSAGE`] in all.
pub fn changes_in(msg: &Message) -> Result<Vec<Change>> {
    changes_within(msg, &mut Budget::new(MAX_INFLATED_PER_MESSAGE))
}

fn changes_within(msg: &Message, budget: &mut Budget) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for blob in msg.changes.iter() {
        for chunk in split_chunks(blob)? {
            match chunk.kind {
                CHUNK_DOCUMENT => {
                    check_document(chunk.body, budget)?;
                    let doc = guarded("a document chunk", || {
                        Automerge::load(chunk.whole).map_err(|e| malformed(e.to_string()))
                    })?;
                    out.extend(doc.get_changes(&[]));
                }
                CHUNK_CHANGE | CHUNK_COMPRESSED => out.push(parse_change(chunk.whole, budget)?),
                other => return Err(malformed(format!("chunk type {other} is not accepted"))),
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
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;
/// The bit of a column spec that says the column is deflated.
const COLUMN_DEFLATE: u64 = 0b1000;

/// Walks a document chunk's body (automerge `storage/document.rs`): actors
/// (a uLEB128 count, then length-prefixed ids), heads (a count, then 32
/// bytes each), change-column then op-column metadata (each a count, then
/// (spec, length) pairs), then the change columns' data and the op
/// columns' data in that order. Every deflated column (spec bit 3) is
/// inflated within `budget` before Automerge would inflate it unbounded.
fn check_document(body: &[u8], budget: &mut Budget) -> Result<()> {
    let mut r = Reader { b: body };
    let actors = r.uleb("actor count")?;
    for _ in 0..actors {
        let len = r.uleb("actor id length")?;
        r.take(len, "actor id")?;
    }
    let heads = r.uleb("head count")?;
    let heads_len = heads
        .checked_mul(32)
        .ok_or_else(|| malformed("head count out of range".into()))?;
    r.take(heads_len, "heads")?;
    let change_cols = r.columns()?;
    let op_cols = r.columns()?;
    for (spec, len) in change_cols.into_iter().chain(op_cols) {
        let data = r.take(len, "column data")?;
        if spec & COLUMN_DEFLATE != 0 {
            budget.inflate(data)?;
        }
    }
    Ok(())
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn uleb(&mut self, what: &str) -> Result<usize> {
        let (v, used) = uleb128(self.b).ok_or_else(|| malformed(format!("bad {what}")))?;
        self.b = &self.b[used..];
        Ok(v)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(malformed(format!("{what} runs past the chunk")));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    /// Column metadata: a count, then (spec, length) pairs. Each pair takes
    /// at least two bytes, so the count is bounded by the input.
    fn columns(&mut self) -> Result<Vec<(u64, usize)>> {
        let n = self.uleb("column count")?;
        if n > self.b.len() / 2 {
            return Err(malformed("column count runs past the chunk".into()));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let spec = self.uleb("column spec")?;
            let len = self.uleb("column length")?;
            out.push((spec as u64, len));
        }
        Ok(out)
    }
}

fn malformed(reason: String) -> Error {
    Error::Malformed {
        what: "sync message chunk",
        reason,
    }
}

/// One Automerge chunk of a blob.
struct Chunk<'a> {
    kind: u8,
    /// The whole chunk, header included.
    whole: &'a [u8],
    /// What follows the header.
    body: &'a [u8],
}

/// Splits back-to-back Automerge chunks (magic, checksum, type, uLEB128
/// length, body).
fn split_chunks(mut bytes: &[u8]) -> Result<Vec<Chunk<'_>>> {
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
        out.push(Chunk {
            kind,
            whole: &bytes[..end],
            body: &bytes[9 + used..end],
        });
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
    /// A document chunk that passes shoal's checks but panics Automerge
    /// 0.12's column decoder (hexane's `RawColumnIter::take` assert), found
    /// by the `roster` fuzz target in CI on 2026-12-06. As a saved snapshot
    /// it stopped the node's start with a panic; inside a sync message
    /// (`changes_in` loads document chunks) any member could send it.
    const HEXANE_ASSERT: &[u8] = include_bytes!("../../fuzz/crashers/roster-hexane-slab-assert");

    /// A change chunk that panics Automerge 0.12 while it verifies the
    /// change's ops (`types.rs:464`, an unwrap of an integer conversion),
    /// found by the long run of `sync_decode` on 2026-12-06 after 726,929
    /// executions: any member could send it in a sync message.
    const CHANGE_OVERFLOW: &[u8] =
        include_bytes!("../../fuzz/crashers/sync_decode-change-int-overflow");

    #[test]
    fn a_change_that_panics_automerge_is_refused() {
        // As the sync_decode target feeds it: a message, and as the change
        // blob of one (with and without a chunk magic in front).
        if let Ok(msg) = decode_message(CHANGE_OVERFLOW) {
            let _ = changes_in(&msg);
        }
        for blob in [
            CHANGE_OVERFLOW.to_vec(),
            [&[0x85, 0x6f, 0x4a, 0x83][..], CHANGE_OVERFLOW].concat(),
        ] {
            let msg = Message {
                heads: vec![],
                need: vec![],
                have: vec![],
                changes: automerge::sync::ChunkList::from(vec![blob]),
                flags: None,
                version: automerge::sync::MessageVersion::V2,
            };
            let _ = changes_in(&msg);
        }
    }

    #[test]
    fn a_document_chunk_that_panics_automerge_is_refused() {
        assert!(
            check_stored(HEXANE_ASSERT).is_ok(),
            "passes the chunk check"
        );
        let loaded = load_stored(HEXANE_ASSERT);
        assert!(
            matches!(&loaded, Err(Error::Malformed { reason, .. }) if reason.contains("panicked")),
            "{:?}",
            loaded.map(|_| ())
        );
        let msg = Message {
            heads: vec![],
            need: vec![],
            have: vec![],
            changes: automerge::sync::ChunkList::from(vec![HEXANE_ASSERT.to_vec()]),
            flags: None,
            version: automerge::sync::MessageVersion::V2,
        };
        assert!(changes_in(&msg).is_err());
    }

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
        assert_eq!(parts[0].kind, CHUNK_DOCUMENT);
    }

    #[test]
    fn a_signed_tip_vouches_for_its_authors_ancestors_only() {
        use crate::actor::actor_for;
        use crate::ids::DeviceId;
        use std::collections::HashMap;
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
        let unvouched = |signed: &HashMap<_, _>| {
            let mut left = all.clone();
            let mut out = Vec::new();
            while let Err(h) = vouchers(&left, signed) {
                out.push(h);
                left.retain(|c| c.hash() != h);
            }
            out
        };
        let left = unvouched(&[(tip, dev(1))].into_iter().collect());
        assert_eq!(left.len(), 2, "only b's change and the forgery are left");
        assert!(left.contains(&b_change.hash()) && left.contains(&forged.hash()));
        // b's own signature on its change vouches for it, not for a's chain
        let left = unvouched(&[(b_change.hash(), dev(2))].into_iter().collect());
        assert_eq!(left.len(), 4);
    }

    #[test]
    fn each_app_change_needs_its_own_vouch() {
        use crate::ids::DeviceId;
        use std::collections::HashMap;
        let d = DeviceId::from_bytes(vec![1; 38]).unwrap();
        let mut app = AutoCommit::new().with_actor(automerge::ActorId::from(vec![5u8; 16]));
        for i in 0..2 {
            app.put(ROOT, "k", i).unwrap();
            app.commit();
        }
        let changes = app.get_changes(&[]);
        let (first, second) = (changes[0].hash(), changes[1].hash());
        // a vouch on the later change does not cover the earlier one
        let only_tip: HashMap<_, _> = [(second, d.clone())].into_iter().collect();
        assert_eq!(vouchers(&changes, &only_tip), Err(first));
        let both: HashMap<_, _> = [(first, d.clone()), (second, d.clone())]
            .into_iter()
            .collect();
        let v = vouchers(&changes, &both).unwrap();
        assert_eq!(v[&first], d);
    }

    /// A V1 message whose one `have` carries `bloom` as its filter bytes.
    fn with_bloom(bloom: &[u8]) -> Vec<u8> {
        let bloom = automerge::sync::BloomFilter::try_from(bloom).unwrap();
        Message {
            heads: vec![],
            need: vec![],
            have: vec![automerge::sync::Have {
                last_sync: vec![],
                bloom,
            }],
            changes: automerge::sync::ChunkList::empty(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        }
        .encode()
    }

    #[test]
    fn bloom_filters_that_would_crash_automerge_are_refused() {
        // one entry, zero bits per entry: a division by zero in
        // `generate_sync_message`
        let zero_bits = with_bloom(&[1, 0, 1]);
        let e = decode_message(&zero_bits).unwrap_err();
        assert!(e.to_string().contains("bits per entry"), "{e}");
        // 2^32-1 probes: a 16 GiB reservation
        let mut many_probes = vec![1, 8];
        many_probes.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        many_probes.push(0);
        let e = decode_message(&with_bloom(&many_probes)).unwrap_err();
        assert!(e.to_string().contains("probes"), "{e}");
        // a sane filter, and an empty one, pass
        let h = automerge::ChangeHash([7; 32]);
        let good = automerge::sync::BloomFilter::from_hashes([h].iter());
        assert!(decode_message(&with_bloom(&good.to_bytes())).is_ok());
        assert!(decode_message(&with_bloom(&[])).is_ok());
        // zero entries: never probed, whatever the rest says
        assert!(decode_message(&with_bloom(&[0, 0, 0])).is_ok());
    }

    #[test]
    fn a_refused_bloom_is_the_one_that_panics_automerge() {
        // What the check protects: the same message, fed to automerge,
        // panics while answering.
        let mut d = AutoCommit::new();
        d.put(ROOT, "a", 1).unwrap();
        d.commit();
        let msg = Message::decode(&with_bloom(&[1, 0, 1])).unwrap();
        let mut doc = d.document().clone();
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            use automerge::sync::SyncDoc;
            let mut st = automerge::sync::State::new();
            let _ = doc.receive_sync_message(&mut st, msg);
            doc.generate_sync_message(&mut st)
        }));
        assert!(crashed.is_err());
    }

    #[test]
    fn counts_are_bounded() {
        let hashes = |n: usize| vec![automerge::ChangeHash([1; 32]); n];
        let msg = |heads, need| Message {
            heads,
            need,
            have: vec![],
            changes: automerge::sync::ChunkList::empty(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        };
        assert!(validate_message(&msg(hashes(MAX_HEADS), vec![])).is_ok());
        assert!(matches!(
            validate_message(&msg(hashes(MAX_HEADS + 1), vec![])),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            validate_message(&msg(vec![], hashes(MAX_NEED + 1))),
            Err(Error::TooLarge { .. })
        ));
        let mut m = msg(vec![], vec![]);
        m.have = vec![automerge::sync::Have::default(); MAX_HAVES + 1];
        assert!(validate_message(&m).is_err());
        m.have = vec![automerge::sync::Have {
            last_sync: hashes(MAX_LAST_SYNC + 1),
            bloom: Default::default(),
        }];
        assert!(validate_message(&m).is_err());
    }

    fn deflate(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// A compressed change chunk (type 2) whose body inflates to `n` zeros.
    fn compressed_bomb(n: usize) -> Vec<u8> {
        let body = deflate(&vec![0u8; n]);
        let mut chunk = MAGIC.to_vec();
        chunk.extend([0, 0, 0, 0, CHUNK_COMPRESSED]);
        let mut len = body.len();
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                chunk.push(b);
                break;
            }
            chunk.push(b | 0x80);
        }
        chunk.extend(body);
        chunk
    }

    fn message_with(changes: Vec<Vec<u8>>) -> Message {
        Message {
            heads: vec![],
            need: vec![],
            have: vec![],
            changes: automerge::sync::ChunkList::from(changes),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        }
    }

    #[test]
    fn a_compressed_change_may_inflate_only_within_the_budget() {
        let bomb = compressed_bomb(2 << 20);
        assert!(bomb.len() < 4096, "{} bytes", bomb.len());
        let e = changes_within(&message_with(vec![bomb.clone()]), &mut Budget::new(1 << 20))
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        let mut budget = Budget::new(1 << 20);
        assert!(matches!(
            parse_change(&bomb, &mut budget),
            Err(Error::TooLarge { .. })
        ));
        // an honest compressed change passes, and counts against the budget
        let mut d = AutoCommit::new();
        d.put(ROOT, "text", "x".repeat(20_000)).unwrap();
        d.commit();
        let mut c = d.get_last_local_change().unwrap();
        let packed = c.bytes().to_vec();
        assert_eq!(packed[8], CHUNK_COMPRESSED);
        let mut budget = Budget::new(1 << 20);
        assert_eq!(parse_change(&packed, &mut budget).unwrap().hash(), c.hash());
        assert!(budget.left < 1 << 20);
        // several honest ones share the message's budget
        let msg = message_with(vec![packed.clone(); 8]);
        assert!(changes_within(&msg, &mut Budget::new(1 << 20)).is_ok());
        assert!(changes_within(&msg, &mut Budget::new(100_000)).is_err());
        // a bundle, or an unknown type, is no change
        let mut other = packed.clone();
        other[8] = 3;
        assert!(changes_within(&message_with(vec![other]), &mut Budget::new(1 << 20)).is_err());
    }

    #[test]
    fn a_documents_deflated_columns_are_bounded() {
        let mut d = AutoCommit::new();
        for i in 0..2000 {
            d.put(ROOT, format!("key{i}"), "some repetitive value ".repeat(4))
                .unwrap();
        }
        d.commit();
        let saved = d.save();
        let parts = split_chunks(&saved).unwrap();
        assert_eq!(parts[0].kind, CHUNK_DOCUMENT);
        // the walk finds the deflated columns automerge wrote
        let mut budget = Budget::new(MAX_INFLATED_PER_MESSAGE);
        check_document(parts[0].body, &mut budget).unwrap();
        let inflated = MAX_INFLATED_PER_MESSAGE - budget.left;
        assert!(inflated > 0, "no deflated column found");
        let msg = message_with(vec![saved.clone()]);
        assert_eq!(
            changes_within(&msg, &mut Budget::new(MAX_INFLATED_PER_MESSAGE))
                .unwrap()
                .len(),
            1
        );
        let e = changes_within(&msg, &mut Budget::new(inflated - 1)).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        // a crafted document: no actors, no heads, one deflated change
        // column that inflates to 2 MiB
        let col = deflate(&vec![0u8; 2 << 20]);
        let mut body = vec![0, 0, 1, (1 << 4) | 0b1000];
        let mut len = col.len();
        while len >= 0x80 {
            body.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        body.push(len as u8);
        body.push(0);
        body.extend(&col);
        let e = check_document(&body, &mut Budget::new(1 << 20)).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        // truncated or lying headers are refused, never a panic
        for cut in 0..body.len().min(64) {
            let _ = check_document(&body[..cut], &mut Budget::new(1 << 20));
        }
        assert!(check_document(&[0xff, 0xff, 0xff, 0xff, 0x0f], &mut Budget::new(1)).is_err());
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
            // the document walk and the change parser on anything
            let _ = check_document(&bytes, &mut Budget::new(1 << 20));
            let _ = parse_change(&framed, &mut Budget::new(1 << 20));
            for kind in [CHUNK_DOCUMENT, CHUNK_COMPRESSED] {
                let mut chunk = MAGIC.to_vec();
                chunk.extend([0, 0, 0, 0, kind]);
                chunk.push(bytes.len().min(127) as u8);
                chunk.extend_from_slice(&bytes[..bytes.len().min(127)]);
                let _ = changes_within(&message_with(vec![chunk]), &mut Budget::new(1 << 20));
            }
        }
    }
}
