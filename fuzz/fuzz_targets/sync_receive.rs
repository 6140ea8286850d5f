//! The node's path for a peer's sync message (`engine/sessions.rs`,
//! `receive`, then the answer): decoded, its changes listed, received into
//! a small document with a sync state, then the answer generated. The
//! document is the same few changes for every input (forked from one built
//! once), with a fresh sync state that has already sent its first message,
//! as a responder's has: a crash reproduces from its input alone.
#![no_main]

mod caught;

use std::sync::OnceLock;

use automerge::sync::{self as am_sync, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use libfuzzer_sys::fuzz_target;
use shoal_protocol::sync;

/// Commits with a fixed time: the document's hashes are the same on every
/// run.
fn commit(d: &mut AutoCommit) {
    d.commit_with(automerge::transaction::CommitOptions::default().with_time(1_765_000_000));
}

/// A document of a few changes by two actors, with a concurrent edit.
fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut a = AutoCommit::new().with_actor(automerge::ActorId::from(vec![1u8; 46]));
        for i in 0..3i64 {
            a.put(ROOT, "k", i).expect("put");
            commit(&mut a);
        }
        let mut b = a.fork().with_actor(automerge::ActorId::from(vec![2u8; 46]));
        b.put(ROOT, "b", "x").expect("put");
        commit(&mut b);
        a.put(ROOT, "a", "y").expect("put");
        commit(&mut a);
        a.merge(&mut b).expect("merge");
        a.save()
    })
}

fn receive(data: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
    let msg = sync::decode_message(data)?;
    let _changes = sync::changes_in(&msg)?;
    // decode_message has checked the message (sync::validate_message:
    // bloom filter shapes, counts) before Automerge sees it; without that
    // check automerge 0.12 divides by zero on a `have` bloom filter of one
    // entry and zero bits per entry (fuzz/crashers/sync_receive-*).
    let mut doc = AutoCommit::load(base())?;
    let mut state = am_sync::State::new();
    // The responder has spoken first, as it has in a live session.
    let _ = doc.sync().generate_sync_message(&mut state);
    doc.sync().receive_sync_message(&mut state, msg)?;
    shoal_protocol::doc::forget_patches(&mut doc);
    // The answer, as `on_sync_request` sends it back.
    if let Some(reply) = doc.sync().generate_sync_message(&mut state) {
        let _ = sync::changes_in(&reply);
        let _ = reply.encode();
    }
    Ok(())
}

fuzz_target!(init: caught::allow_caught_panics(), |data: &[u8]| {
    let _ = receive(data);
});
