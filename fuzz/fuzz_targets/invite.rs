//! Invite codes as a user pastes them, and the sealed grants of the
//! pairing handshake: `open_with` (the grant the inviter seals to the
//! joiner), `open_sealed` (epoch keys sealed to a member) and the grant's
//! decoding once opened. What opens under the fixed keys is decoded as the
//! node decodes it; the input is also sealed and opened back as a
//! plaintext, then decoded as a grant.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_protocol::invite::{self, InviteCode};
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::wire;
use x25519_dalek::StaticSecret;

const KEY: [u8; 32] = [3; 32];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(code) = InviteCode::decode(&text) {
        assert!(code.addrs.len() <= invite::MAX_CODE_ADDRS);
        assert_eq!(InviteCode::decode(&code.encode()).ok(), Some(code));
    }

    // Only what was sealed under the fixed keys opens (the seed corpus has
    // such); what opens is decoded as the joiner decodes it.
    if let Ok(plain) = invite::open_with(&KEY, data) {
        grant(&plain);
    }
    // An epoch key sealed to this device, as `members` carries it.
    if let Ok(plain) = invite::open_sealed(mine(), data) {
        let _ = wire::decode::<(u32, [u8; 32])>("epoch key", &plain, wire::MAX_INVITE_BYTES);
    }

    // The input as the plaintext of a grant.
    let sealed = invite::seal_with(&KEY, [5; 24], data);
    let plain = invite::open_with(&KEY, &sealed).expect("own seal does not open");
    assert_eq!(plain, data);
    grant(&plain);
});

/// The device's x25519 secret.
fn mine() -> &'static StaticSecret {
    static MINE: OnceLock<StaticSecret> = OnceLock::new();
    MINE.get_or_init(|| StaticSecret::from([4u8; 32]))
}

/// The joiner's decoding of an opened grant.
fn grant(plain: &[u8]) {
    if let Ok(g) = wire::decode::<SpaceGrant>("grant", plain, wire::MAX_INVITE_BYTES) {
        let _ = format!("{g:?}");
    }
}
