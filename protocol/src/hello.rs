//! The members-only hello.
//!
//! Each side of a new connection challenges the other with 32 random bytes.
//! The answer is one MAC per (space, epoch) the responder belongs to, keyed
//! with that space's hello key and bound to the challenge and both device
//! ids. A member of the same space recomputes the MAC and finds a match; a
//! stranger sees random-looking bytes that name no space and cannot be
//! replayed to anyone else.

use std::collections::HashSet;

use crate::ids::{DeviceId, SpaceId};
use crate::keys::{Epoch, SpaceKey};

/// Most proofs one hello answer may carry.
pub const MAX_PROOFS: usize = 1024;

/// One membership proof.
pub type Proof = [u8; 32];

/// The proof that `prover` holds `key` of (`space`, `epoch`), answering
/// `challenge` from `verifier`.
pub fn proof(
    space: &SpaceId,
    epoch: Epoch,
    key: &SpaceKey,
    challenge: &[u8; 32],
    prover: &DeviceId,
    verifier: &DeviceId,
) -> Proof {
    let mut h = blake3::Hasher::new_keyed(&key.hello_key(space, epoch));
    h.update(b"shoal hello v1");
    h.update(challenge);
    for d in [prover, verifier] {
        h.update(&(d.as_bytes().len() as u32).to_be_bytes());
        h.update(d.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// The spaces (of `mine`) that `proofs` from `prover` show it belongs to.
pub fn verify<'a>(
    mine: impl IntoIterator<Item = (&'a SpaceId, Epoch, &'a SpaceKey)>,
    proofs: &[Proof],
    challenge: &[u8; 32],
    prover: &DeviceId,
    verifier: &DeviceId,
) -> Vec<(SpaceId, Epoch)> {
    let got: HashSet<&Proof> = proofs.iter().take(MAX_PROOFS).collect();
    mine.into_iter()
        .filter(|(s, e, k)| got.contains(&proof(s, *e, k, challenge, prover, verifier)))
        .map(|(s, e, _)| (*s, e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_recognise_each_other_and_strangers_do_not() {
        let a = DeviceId::from_bytes(vec![1; 38]).unwrap();
        let b = DeviceId::from_bytes(vec![2; 38]).unwrap();
        let s1 = SpaceId([1; 32]);
        let s2 = SpaceId([2; 32]);
        let k1 = SpaceKey::from_bytes([11; 32]);
        let k2 = SpaceKey::from_bytes([22; 32]);
        let ch = [7u8; 32];
        // b answers a's challenge for s1 only
        let proofs = vec![proof(&s1, 0, &k1, &ch, &b, &a)];
        let mine = [(&s1, 0, &k1), (&s2, 0, &k2)];
        assert_eq!(verify(mine, &proofs, &ch, &b, &a), vec![(s1, 0)]);
        // replayed to a different verifier or challenge: nothing
        let c = DeviceId::from_bytes(vec![3; 38]).unwrap();
        assert!(verify(mine, &proofs, &ch, &b, &c).is_empty());
        assert!(verify(mine, &proofs, &[8; 32], &b, &a).is_empty());
        // wrong epoch: nothing
        assert!(verify([(&s1, 1, &k1)], &proofs, &ch, &b, &a).is_empty());
    }
}
