//! Space keys and everything derived from them.
//!
//! A space has one 32-byte symmetric key per epoch. Subkeys are derived with
//! BLAKE3's `derive_key` under fixed context strings, so the encryption key,
//! the hello proof key and the gossip topic never share bytes.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::{DeviceId, SpaceId};

/// A key generation: starts at 0, bumps when a member is removed.
pub type Epoch = u32;

const CTX_AEAD: &str = "shoal 2026-11 space aead key v1";
const CTX_HELLO: &str = "shoal 2026-11 space hello key v1";
const CTX_TOPIC: &str = "shoal 2026-11 space gossip topic v1";
const CTX_RENDEZVOUS: &str = "shoal 2026-11 space dht rendezvous v1";

/// The symmetric key of one space epoch. Zeroed on drop, never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct SpaceKey([u8; 32]);

impl SpaceKey {
    /// Wraps 32 bytes that the caller drew from a CSPRNG.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key, for sealing it to another device or persisting it.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// The AEAD key for gossip envelopes of this space and epoch.
    pub(crate) fn aead_key(&self, space: &SpaceId, epoch: Epoch) -> [u8; 32] {
        self.derive(CTX_AEAD, space, epoch)
    }

    /// The MAC key members use to prove membership in the hello.
    pub(crate) fn hello_key(&self, space: &SpaceId, epoch: Epoch) -> [u8; 32] {
        self.derive(CTX_HELLO, space, epoch)
    }

    /// The gossipsub topic of this space and epoch. Derived from the key, so
    /// a stranger who sees our subscriptions cannot tell which space it is.
    pub fn topic(&self, space: &SpaceId, epoch: Epoch) -> String {
        let t = self.derive(CTX_TOPIC, space, epoch);
        format!("/shoal/space/{}", hex::encode(&t[..16]))
    }

    /// The DHT key under which members of this space and epoch announce
    /// themselves as providers. Derived from the key, so only members can
    /// compute it and a DHT node learns nothing about which space it is.
    pub fn rendezvous(&self, space: &SpaceId, epoch: Epoch) -> [u8; 32] {
        self.derive(CTX_RENDEZVOUS, space, epoch)
    }

    fn derive(&self, ctx: &str, space: &SpaceId, epoch: Epoch) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(ctx);
        h.update(&self.0);
        h.update(&space.0);
        h.update(&epoch.to_be_bytes());
        *h.finalize().as_bytes()
    }
}

impl fmt::Debug for SpaceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpaceKey(<redacted>)")
    }
}

/// What a device needs to take part in a space: its id, name, creator and
/// the keys of every epoch it may read. Handed over by the invite flow
/// (sealed to the joiner); never logged.
#[derive(Clone, Serialize, Deserialize)]
pub struct SpaceGrant {
    /// The space.
    pub space: SpaceId,
    /// Its human name, as the creator chose it.
    pub name: String,
    /// The device that created the space: the first owner.
    pub creator: DeviceId,
    /// Keys by epoch, oldest first.
    pub keys: Vec<(Epoch, SpaceKey)>,
}

impl fmt::Debug for SpaceGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpaceGrant")
            .field("space", &self.space)
            .field("name", &self.name)
            .field("creator", &self.creator)
            .field(
                "epochs",
                &self.keys.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_key_is_secret_and_per_epoch() {
        let space = SpaceId::from_random([7; 32]);
        let k = SpaceKey::from_bytes([1; 32]);
        let r = k.rendezvous(&space, 0);
        assert_ne!(r, k.rendezvous(&space, 1));
        assert_ne!(r, SpaceKey::from_bytes([2; 32]).rendezvous(&space, 0));
        assert_ne!(&r[..], &space.0[..]);
        assert_ne!(r, k.aead_key(&space, 0));
        assert_ne!(&r[..16], &k.derive(CTX_TOPIC, &space, 0)[..16]);
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = SpaceKey::from_bytes([0xAB; 32]);
        let s = format!("{k:?}");
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("ab"),
            "{s}"
        );
    }

    #[test]
    fn subkeys_differ_by_purpose_space_and_epoch() {
        let k = SpaceKey::from_bytes([1; 32]);
        let s = SpaceId([2; 32]);
        assert_ne!(k.aead_key(&s, 0), k.hello_key(&s, 0));
        assert_ne!(k.aead_key(&s, 0), k.aead_key(&s, 1));
        assert_ne!(k.aead_key(&s, 0), k.aead_key(&SpaceId([3; 32]), 0));
        assert_ne!(k.topic(&s, 0), k.topic(&s, 1));
    }
}
