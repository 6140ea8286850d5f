//! Invite codes and the pairing handshake's cryptography.
//!
//! A code is `shoal1…`: bech32m (no ambiguous characters, a BCH checksum
//! that catches every single-character typo) over a versioned payload: the
//! space id, the inviter's device id and addresses, an invite id, a 128-bit
//! secret, the expiry and the offered role. No space key.
//!
//! Redeeming it: the joiner proves it knows the secret with a MAC over the
//! transcript (never the secret itself); both sides agree an x25519 key from
//! ephemeral keys, bound to the secret, and the inviter seals the space
//! grant under it. A relay or eavesdropper without the code learns nothing
//! usable; one with the code but not the joiner's ephemeral secret cannot
//! open the grant.

use std::fmt;

use bech32::primitives::decode::CheckedHrpstring;
use bech32::{Bech32m, Hrp};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, Result};
use crate::ids::{DeviceId, SpaceId};
use crate::members::Role;

/// The fixed prefix of every code.
pub const CODE_HRP: &str = "shoal";
/// Most addresses a code carries.
pub const MAX_CODE_ADDRS: usize = 4;
/// Most bytes of one address in a code.
pub const MAX_ADDR_LEN: usize = 64;
const CODE_V1: u8 = 1;

/// An invite id: names the invite, not secret.
pub type InviteId = [u8; 8];

/// The 128-bit invite secret. Zeroed on drop, never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct InviteSecret(pub [u8; 16]);

impl fmt::Debug for InviteSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InviteSecret(<redacted>)")
    }
}

/// Everything an invite code carries.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCode {
    /// The space.
    pub space: SpaceId,
    /// The inviting device.
    pub inviter: DeviceId,
    /// Where the inviter listens (multiaddr bytes), best first.
    pub addrs: Vec<Vec<u8>>,
    /// Which invite.
    pub invite: InviteId,
    /// The secret.
    pub secret: InviteSecret,
    /// Unix seconds after which the code is void.
    pub expires_at: u64,
    /// The role it grants.
    pub role: Role,
}

impl fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InviteCode")
            .field("space", &self.space)
            .field("inviter", &self.inviter)
            .field("invite", &hex::encode(self.invite))
            .field("expires_at", &self.expires_at)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Why a code did not decode. Each says what the user should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Not a shoal code at all.
    #[error("this is not a shoal invite code (it should start with \"shoal1\")")]
    NotACode,
    /// The checksum does not match: a typo or a truncated copy.
    #[error(
        "this invite code has a typo or is incomplete (its checksum does not match); copy it again"
    )]
    Typo,
    /// A character that codes never contain.
    #[error("this invite code contains a character codes never have ({0}); copy it again")]
    BadCharacter(String),
    /// A newer format.
    #[error("this invite code is from a newer shoal (format {0}); update shoal")]
    Version(u8),
    /// Checksum fine, contents not.
    #[error("this invite code is damaged: {0}")]
    Damaged(String),
}

impl InviteCode {
    /// The code as text.
    pub fn encode(&self) -> String {
        let mut data = vec![CODE_V1];
        data.extend(postcard::to_stdvec(self).unwrap_or_default());
        let hrp = Hrp::parse_unchecked(CODE_HRP);
        // Our payload is far below bech32m's 1023-character limit.
        bech32::encode::<Bech32m>(hrp, &data).unwrap_or_default()
    }

    /// Parses a code, catching typos before anything touches the network.
    /// Surrounding white space and line breaks are ignored.
    pub fn decode(text: &str) -> Result<Self, CodeError> {
        let s: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let lower = s.to_ascii_lowercase();
        if !lower.starts_with("shoal1") {
            return Err(CodeError::NotACode);
        }
        const CHARSET: &str = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";
        if let Some(c) = lower[6..].chars().find(|c| !CHARSET.contains(*c)) {
            return Err(CodeError::BadCharacter(format!("{c:?}")));
        }
        let checked = CheckedHrpstring::new::<Bech32m>(&s).map_err(|_| CodeError::Typo)?;
        if checked.hrp().to_lowercase() != CODE_HRP {
            return Err(CodeError::NotACode);
        }
        let data: Vec<u8> = checked.byte_iter().collect();
        match data.first() {
            Some(&CODE_V1) => {}
            Some(v) => return Err(CodeError::Version(*v)),
            None => return Err(CodeError::Damaged("empty".into())),
        }
        let code: InviteCode =
            postcard::from_bytes(&data[1..]).map_err(|e| CodeError::Damaged(e.to_string()))?;
        if code.addrs.len() > MAX_CODE_ADDRS || code.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN) {
            return Err(CodeError::Damaged("too many addresses".into()));
        }
        Ok(code)
    }

    /// Whether the code has expired at `now` (unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }
}

fn keyed(ctx: &str, key_material: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(ctx);
    for m in key_material {
        h.update(&(m.len() as u32).to_be_bytes());
        h.update(m);
    }
    *h.finalize().as_bytes()
}

/// The joiner's proof that it holds the secret, bound to the whole
/// transcript so it cannot be replayed to another inviter or ephemeral key.
pub fn join_proof(
    secret: &InviteSecret,
    invite: &InviteId,
    joiner_ephemeral: &[u8; 32],
    joiner: &DeviceId,
    inviter: &DeviceId,
) -> [u8; 32] {
    let key = keyed("shoal 2026-11 invite proof key v1", &[&secret.0]);
    let mut h = blake3::Hasher::new_keyed(&key);
    for m in [
        &invite[..],
        &joiner_ephemeral[..],
        joiner.as_bytes(),
        inviter.as_bytes(),
    ] {
        h.update(&(m.len() as u32).to_be_bytes());
        h.update(m);
    }
    *h.finalize().as_bytes()
}

/// Constant-time comparison of two proofs.
pub fn proofs_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

/// The key both sides derive for the sealed grant: x25519 of the ephemeral
/// keys, bound to the secret and the transcript.
pub fn grant_key(
    my_ephemeral: &StaticSecret,
    their_ephemeral: &[u8; 32],
    secret: &InviteSecret,
    invite: &InviteId,
    joiner_ephemeral: &[u8; 32],
    inviter_ephemeral: &[u8; 32],
) -> [u8; 32] {
    let shared = my_ephemeral.diffie_hellman(&PublicKey::from(*their_ephemeral));
    keyed(
        "shoal 2026-11 invite grant key v1",
        &[
            shared.as_bytes(),
            &secret.0,
            invite,
            joiner_ephemeral,
            inviter_ephemeral,
        ],
    )
}

/// XChaCha20-Poly1305 with a caller-supplied random nonce, prefixed to the
/// ciphertext.
pub fn seal_with(key: &[u8; 32], nonce: [u8; 24], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut out = nonce.to_vec();
    // Encrypting an in-memory buffer cannot fail below 256 GiB.
    out.extend(
        cipher
            .encrypt(XNonce::from_slice(&nonce), plaintext)
            .unwrap_or_default(),
    );
    out
}

/// Opens what [`seal_with`] sealed.
pub fn open_with(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < 24 + 16 {
        return Err(Error::Seal("sealed data too short"));
    }
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(XNonce::from_slice(&sealed[..24]), &sealed[24..])
        .map_err(|_| Error::Seal("authentication failed"))
}

/// Seals `plaintext` to the holder of `recipient`'s x25519 secret (a sealed
/// box: ephemeral public key || nonce || ciphertext).
pub fn seal_to(
    recipient: &[u8; 32],
    ephemeral: [u8; 32],
    nonce: [u8; 24],
    plaintext: &[u8],
) -> Vec<u8> {
    let eph = StaticSecret::from(ephemeral);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*recipient));
    let key = keyed(
        "shoal 2026-11 sealed box v1",
        &[shared.as_bytes(), &eph_pub, recipient],
    );
    let mut out = eph_pub.to_vec();
    out.extend(seal_with(&key, nonce, plaintext));
    out
}

/// Opens a sealed box addressed to `mine`.
pub fn open_sealed(mine: &StaticSecret, sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < 32 {
        return Err(Error::Seal("sealed box too short"));
    }
    let mut eph_pub = [0u8; 32];
    eph_pub.copy_from_slice(&sealed[..32]);
    let shared = mine.diffie_hellman(&PublicKey::from(eph_pub));
    let my_pub = PublicKey::from(mine).to_bytes();
    let key = keyed(
        "shoal 2026-11 sealed box v1",
        &[shared.as_bytes(), &eph_pub, &my_pub],
    );
    open_with(&key, &sealed[32..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(addrs: usize) -> InviteCode {
        InviteCode {
            space: SpaceId([3; 32]),
            inviter: DeviceId::from_bytes(
                vec![0, 36, 8, 1, 18, 32]
                    .into_iter()
                    .chain([7u8; 32])
                    .collect(),
            )
            .unwrap(),
            addrs: (0..addrs)
                .map(|i| vec![4, 127, 0, 0, 1, 6, 0x12, i as u8])
                .collect(),
            invite: [5; 8],
            secret: InviteSecret([9; 16]),
            expires_at: 1_800_000_000,
            role: Role::Editor,
        }
    }

    #[test]
    fn round_trip_and_obvious_mistakes() {
        let c = sample(2);
        let s = c.encode();
        assert!(s.starts_with("shoal1"), "{s}");
        assert_eq!(InviteCode::decode(&s).unwrap(), c);
        assert_eq!(
            InviteCode::decode(&format!("  {}\n", s.to_uppercase())).unwrap(),
            c
        );
        assert_eq!(InviteCode::decode("hello"), Err(CodeError::NotACode));
        let mut o = s.clone().into_bytes();
        o[10] = b'o';
        assert!(matches!(
            InviteCode::decode(std::str::from_utf8(&o).unwrap()),
            Err(CodeError::BadCharacter(_))
        ));
        assert_eq!(InviteCode::decode(&s[..s.len() - 5]), Err(CodeError::Typo));
        assert!(InviteCode::decode(&s[..20]).is_err());
        assert!(!format!("{c:?}").contains("9, 9"));
    }

    #[test]
    fn seals_open_only_for_their_recipient() {
        let me = StaticSecret::from([1u8; 32]);
        let other = StaticSecret::from([2u8; 32]);
        let boxed = seal_to(
            &PublicKey::from(&me).to_bytes(),
            [3; 32],
            [4; 24],
            b"epoch key",
        );
        assert_eq!(open_sealed(&me, &boxed).unwrap(), b"epoch key");
        assert!(open_sealed(&other, &boxed).is_err());
    }

    #[test]
    fn both_sides_derive_the_same_grant_key_only_with_the_secret() {
        let (j, i) = (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]));
        let (jp, ip) = (
            PublicKey::from(&j).to_bytes(),
            PublicKey::from(&i).to_bytes(),
        );
        let s = InviteSecret([7; 16]);
        let a = grant_key(&j, &ip, &s, &[1; 8], &jp, &ip);
        let b = grant_key(&i, &jp, &s, &[1; 8], &jp, &ip);
        assert_eq!(a, b);
        assert_ne!(
            a,
            grant_key(&i, &jp, &InviteSecret([8; 16]), &[1; 8], &jp, &ip)
        );
    }

    proptest! {
        #[test]
        fn every_single_character_typo_is_caught(pos in 0usize..10_000, pick in 0usize..32, addrs in 0usize..5) {
            const CHARSET: &[u8] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
            let s = sample(addrs).encode();
            // only the data part (after "shoal1") can be mistyped into another valid character
            let i = 6 + pos % (s.len() - 6);
            let mut b = s.clone().into_bytes();
            let mut c = CHARSET[pick];
            if c == b[i] { c = CHARSET[(pick + 1) % 32]; }
            b[i] = c;
            let typo = String::from_utf8(b).unwrap();
            prop_assert!(InviteCode::decode(&typo).is_err(), "typo at {} not caught", i);
        }

        #[test]
        fn random_text_never_panics(s in "\\PC{0,300}") {
            let _ = InviteCode::decode(&s);
            let _ = InviteCode::decode(&format!("shoal1{s}"));
        }
    }
}
