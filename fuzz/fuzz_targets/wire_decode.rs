//! Every wire message shoal decodes from a peer, picked by the first byte;
//! the rest is the message as it came off the stream. A message that
//! decodes must encode and decode back to itself, and the sync messages and
//! gossiped changes it carries are decoded on as the node does.
#![no_main]

mod caught;

use libfuzzer_sys::fuzz_target;
use shoal_protocol::files::{BlobRequest, BlobResponse, MAX_BLOB_REQUEST};
use shoal_protocol::wire::{
    self, GossipBody, HelloRequest, HelloResponse, JoinRequest, JoinResponse, SyncRequest,
    SyncResponse,
};

/// Decodes `bytes` as a `T` within `limit` and checks the round trip.
fn check<T>(what: &'static str, bytes: &[u8], limit: usize) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let v: T = wire::decode(what, bytes, limit).ok()?;
    let again: T = wire::decode(what, &wire::encode(&v), usize::MAX)
        .unwrap_or_else(|e| panic!("{what} does not decode after encoding: {e}"));
    assert_eq!(v, again, "{what} changes in a round trip");
    Some(v)
}

/// What the node does with a sync message a request or response carries.
fn sync_message(m: &[u8]) {
    if let Ok(msg) = shoal_protocol::sync::decode_message(m) {
        let _ = shoal_protocol::sync::changes_in(&msg);
    }
}

fuzz_target!(init: caught::allow_caught_panics(), |data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 9 {
        0 => {
            check::<HelloRequest>("hello", bytes, wire::MAX_HELLO_BYTES);
        }
        1 => {
            check::<HelloResponse>("hello", bytes, wire::MAX_HELLO_BYTES);
        }
        2 => {
            if let Some(SyncRequest::V1 {
                message: Some(m), ..
            }) = check::<SyncRequest>("sync request", bytes, wire::MAX_SYNC_BYTES)
            {
                sync_message(&m);
            }
        }
        3 => {
            if let Some(SyncResponse::V1 {
                message: Some(m), ..
            }) = check::<SyncResponse>("sync response", bytes, wire::MAX_SYNC_BYTES)
            {
                sync_message(&m);
            }
        }
        4 => {
            check::<JoinRequest>("join request", bytes, wire::MAX_INVITE_BYTES);
        }
        5 => {
            check::<JoinResponse>("join response", bytes, wire::MAX_INVITE_BYTES);
        }
        6 => {
            if let Some(GossipBody::Changes { changes, .. }) =
                check::<GossipBody>("gossip body", bytes, wire::MAX_GOSSIP_BYTES)
            {
                // As the node's gossip path: each change parsed within the
                // message's inflate budget, other chunk types refused.
                let mut budget = shoal_protocol::sync::Budget::new(
                    shoal_protocol::sync::MAX_INFLATED_PER_GOSSIP,
                );
                for c in &changes {
                    if let Ok(c) = shoal_protocol::sync::parse_change(c, &mut budget) {
                        let _ = shoal_protocol::actor::device_of(c.actor_id());
                    }
                }
            }
        }
        7 => {
            check::<BlobRequest>("blob request", bytes, MAX_BLOB_REQUEST);
        }
        _ => {
            check::<BlobResponse>("blob response", bytes, MAX_BLOB_REQUEST);
        }
    }
});
