//! A members document from a peer or from disk: loaded as the engine loads
//! a saved snapshot (`sync::load_stored`; inputs over 64 KiB are skipped),
//! read as a roster and as JSON, and its changes applied to a fresh members
//! document under the owner rules.
#![no_main]

mod caught;

use automerge::AutoCommit;
use libfuzzer_sys::fuzz_target;
use shoal_protocol::doc;
use shoal_protocol::members::{self, Roster};
use shoal_protocol::DeviceId;

fuzz_target!(init: caught::allow_caught_panics(), |data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    let Ok(mut loaded) = shoal_protocol::sync::load_stored(data) else {
        return;
    };
    // The creator is the first actor's device when the document names one,
    // so its changes pass the owner check and get applied.
    let creator = loaded
        .get_changes(&[])
        .first()
        .and_then(|c| shoal_protocol::actor::device_of(c.actor_id()).ok())
        .unwrap_or_else(|| DeviceId::from_bytes(vec![1; 38]).expect("device id"));
    let roster = Roster::read(creator.clone(), &loaded);
    for d in roster.members.keys() {
        let _ = roster.role_of(d);
    }
    let _ = doc::to_json(&loaded);

    let changes = loaded.get_changes(&[]);
    let mut fresh = AutoCommit::new();
    let _ = roster.check_changes(
        &shoal_protocol::DocId::members(),
        &changes,
        &Default::default(),
    );
    if members::apply_members_changes(&mut fresh, &creator, changes).is_ok() {
        let _ = Roster::read(creator, &fresh);
        let _ = members::epoch_keys_for(&fresh, &DeviceId::from_bytes(vec![2; 38]).unwrap());
    }
});
