//! Automerge sync messages as a peer sends them: decoded, then the changes
//! they carry split into chunks and parsed (`changes_in`), without touching
//! any document. The input is also fed to the chunk splitter directly, as a
//! change blob of a well-formed message.
#![no_main]

mod caught;

use automerge::sync::Message;
use libfuzzer_sys::fuzz_target;
use shoal_protocol::sync;

fuzz_target!(init: caught::allow_caught_panics(), |data: &[u8]| {
    if let Ok(msg) = sync::decode_message(data) {
        if let Ok(changes) = sync::changes_in(&msg) {
            let signer = shoal_protocol::DeviceId::from_bytes(vec![1; 38]).expect("device id");
            let signed = changes
                .iter()
                .take(1)
                .map(|c| (c.hash(), signer.clone()))
                .collect();
            let _ = sync::vouchers(&changes, &signed);
        }
    }
    // The input as a change's signature entry (an app change's vouch).
    let _ = shoal_protocol::wire::split_vouch(data);
    // The input as the change blob of a message: the splitter reached
    // through `changes_in` (it is private), with and without a chunk
    // magic in front.
    for blob in [
        data.to_vec(),
        [&[0x85, 0x6f, 0x4a, 0x83][..], data].concat(),
    ] {
        let msg = Message {
            heads: Vec::new(),
            need: Vec::new(),
            have: Vec::new(),
            changes: vec![blob].into(),
            flags: None,
            version: automerge::sync::MessageVersion::V2,
        };
        let _ = sync::changes_in(&msg);
    }
});
