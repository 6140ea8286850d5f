//! Sealed gossip envelopes: the epoch peeked in the clear, and opening
//! under a fixed key. Then the input as a plaintext: sealed and opened back
//! it must be unchanged, and decoded as a gossip body as the node decodes
//! what it opened.
#![no_main]

mod caught;

use libfuzzer_sys::fuzz_target;
use shoal_protocol::{envelope, sync};
use shoal_protocol::wire::{self, GossipBody};
use shoal_protocol::{SpaceId, SpaceKey};

const SPACE: SpaceId = SpaceId([9; 32]);

fuzz_target!(init: caught::allow_caught_panics(), |data: &[u8]| {
    let key = SpaceKey::from_bytes([1; 32]);
    let epoch = envelope::peek_epoch(data);
    let opened = envelope::open(&SPACE, &key, data);
    if data.len() < envelope::HEADER_LEN + envelope::TAG_LEN {
        assert!(
            epoch.is_err() && opened.is_err(),
            "a short envelope is accepted"
        );
    }
    // Only envelopes sealed under the key open (the seed corpus has some);
    // what opens is decoded as the node decodes it.
    if let Ok(plain) = opened {
        body(&plain);
    }

    let epoch = data.first().copied().map_or(0, u32::from);
    let sealed = envelope::seal(&SPACE, epoch, &key, [7; 24], data);
    assert_eq!(envelope::peek_epoch(&sealed).ok(), Some(epoch));
    let plain = envelope::open(&SPACE, &key, &sealed).expect("own envelope does not open");
    assert_eq!(plain, data);
    body(&plain);
});

/// The node's decoding of an opened envelope: each change through
/// `sync::parse_change` within the gossip budget, as `engine/gossip.rs`
/// does (it refuses chunk types other than a change before Automerge
/// parses one).
fn body(plain: &[u8]) {
    if let Ok(GossipBody::Changes { changes, .. }) =
        wire::decode::<GossipBody>("gossip body", plain, wire::MAX_GOSSIP_BYTES)
    {
        let mut budget = sync::Budget::new(sync::MAX_INFLATED_PER_GOSSIP);
        for c in &changes {
            if let Ok(c) = sync::parse_change(c, &mut budget) {
                let _ = shoal_protocol::actor::device_of(c.actor_id());
            }
        }
    }
}
