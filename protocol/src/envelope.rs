//! Sealed gossip envelopes: XChaCha20-Poly1305 under the space key of one
//! epoch, with the epoch and a format version in the clear and bound as
//! associated data. The 24-byte nonce is random and passed in by the caller.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::error::{Error, Result};
use crate::ids::SpaceId;
use crate::keys::{Epoch, SpaceKey};

/// Envelope format version byte.
pub const ENVELOPE_V1: u8 = 1;
/// Version + epoch + nonce.
pub const HEADER_LEN: usize = 1 + 4 + 24;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;

/// The epoch an envelope claims, read without decrypting (to pick the key).
pub fn peek_epoch(bytes: &[u8]) -> Result<Epoch> {
    if bytes.len() < HEADER_LEN + TAG_LEN {
        return Err(Error::Malformed {
            what: "envelope",
            reason: format!("{} bytes is shorter than a header and tag", bytes.len()),
        });
    }
    if bytes[0] != ENVELOPE_V1 {
        return Err(Error::Malformed {
            what: "envelope",
            reason: format!("unknown version {}", bytes[0]),
        });
    }
    let mut e = [0u8; 4];
    e.copy_from_slice(&bytes[1..5]);
    Ok(Epoch::from_be_bytes(e))
}

/// Seals `plaintext` for `space` under `key` of `epoch`.
pub fn seal(
    space: &SpaceId,
    epoch: Epoch,
    key: &SpaceKey,
    nonce: [u8; 24],
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&key.aead_key(space, epoch).into());
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.push(ENVELOPE_V1);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&nonce);
    let aad = aad(space, &out[..HEADER_LEN]);
    // Encryption of an in-memory buffer cannot fail for XChaCha20-Poly1305
    // below its 256 GiB message limit; a failure here is a library bug.
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .unwrap_or_default();
    out.extend_from_slice(&ct);
    out
}

/// Opens an envelope sealed by [`seal`]; `key` must be the key of the epoch
/// [`peek_epoch`] returned.
pub fn open(space: &SpaceId, key: &SpaceKey, bytes: &[u8]) -> Result<Vec<u8>> {
    let epoch = peek_epoch(bytes)?;
    let cipher = XChaCha20Poly1305::new(&key.aead_key(space, epoch).into());
    let aad = aad(space, &bytes[..HEADER_LEN]);
    cipher
        .decrypt(
            XNonce::from_slice(&bytes[5..HEADER_LEN]),
            Payload {
                msg: &bytes[HEADER_LEN..],
                aad: &aad,
            },
        )
        .map_err(|_| Error::Seal("authentication failed (wrong key or tampered)"))
}

fn aad(space: &SpaceId, header: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(32 + HEADER_LEN);
    a.extend_from_slice(&space.0);
    a.extend_from_slice(header);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> SpaceKey {
        SpaceKey::from_bytes([b; 32])
    }

    #[test]
    fn round_trip_and_wrong_key() {
        let s = SpaceId([9; 32]);
        let sealed = seal(&s, 3, &key(1), [5; 24], b"hello");
        assert_eq!(peek_epoch(&sealed).unwrap(), 3);
        assert_eq!(open(&s, &key(1), &sealed).unwrap(), b"hello");
        assert!(matches!(open(&s, &key(2), &sealed), Err(Error::Seal(_))));
        assert!(open(&SpaceId([8; 32]), &key(1), &sealed).is_err());
    }

    #[test]
    fn tampered_epoch_is_refused() {
        let s = SpaceId([9; 32]);
        let mut sealed = seal(&s, 3, &key(1), [5; 24], b"hello");
        sealed[4] = 4;
        assert!(open(&s, &key(1), &sealed).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_open_or_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let s = SpaceId([9; 32]);
            let _ = peek_epoch(&bytes);
            prop_assert!(open(&s, &key(1), &bytes).is_err());
        }
    }
}
