//! Wire messages of shoal's own protocols, versioned enums encoded with
//! postcard, and bounded decoding for everything that comes off the network.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hello::Proof;
use crate::ids::{DocId, SpaceId};

/// Protocol id of the members-only hello.
pub const HELLO_PROTOCOL: &str = "/shoal/hello/1";
/// Protocol id of per-document Automerge sync.
pub const SYNC_PROTOCOL: &str = "/shoal/sync/1";
/// Protocol id of invite pairing.
pub const INVITE_PROTOCOL: &str = "/shoal/invite/1";
/// Kademlia protocol name: our own DHT, never the IPFS one.
pub const KAD_PROTOCOL: &str = "/shoal/kad/1";

/// Largest hello request or response.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;
/// Largest sync request or response (one Automerge sync message plus framing).
pub const MAX_SYNC_BYTES: usize = 32 * 1024 * 1024;
/// Largest invite request or response (a sealed grant holds few keys).
pub const MAX_INVITE_BYTES: usize = 64 * 1024;
/// Largest gossip message on the wire (gossipsub's `max_transmit_size`).
pub const MAX_GOSSIP_BYTES: usize = 256 * 1024;
/// Changes whose encoded body exceeds this are announced, not inlined; the
/// receivers pull them with the sync protocol.
pub const GOSSIP_INLINE_LIMIT: usize = 60 * 1024;
/// Most documents one heads summary names.
pub const MAX_HEADS_DOCS: usize = 512;

/// Hello challenge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum HelloRequest {
    /// Version 1.
    V1 {
        /// Fresh random challenge.
        challenge: [u8; 32],
        /// Asks the responder to challenge us back: we joined a space since
        /// it last checked us.
        recheck: bool,
    },
}

/// Hello answer: one proof per (space, epoch) the responder is in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum HelloResponse {
    /// Version 1.
    V1 {
        /// Membership proofs, in no particular order.
        proofs: Vec<Proof>,
    },
}

/// One step of the Automerge sync protocol for one document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum SyncRequest {
    /// Version 1.
    V1 {
        /// The space; sent only to a peer that proved membership.
        space: SpaceId,
        /// The document.
        doc: DocId,
        /// The sender starts over with a new sync state; the responder
        /// drops its own for this peer and document.
        fresh: bool,
        /// An encoded `automerge::sync::Message`, or none to poll.
        message: Option<Vec<u8>>,
        /// The authors' signatures of the changes the message carries.
        sigs: Vec<ChangeSig>,
    },
}

/// A change hash and its author's signature over
/// [`change_sig_message`]: lets a change relayed by anyone be checked
/// against the device its actor id names.
pub type ChangeSig = ([u8; 32], Vec<u8>);

/// Most bytes of one signature.
pub const MAX_SIG_LEN: usize = 128;

/// What an author signs for a change of document `doc` of `space`. The
/// document is bound too: a change with no dependencies signed for one
/// document must not be accepted when replayed into another.
pub fn change_sig_message(space: &SpaceId, doc: &crate::DocId, hash: &[u8; 32]) -> Vec<u8> {
    let mut m = b"shoal change signature v2".to_vec();
    m.extend_from_slice(&space.0);
    let d = doc.as_str().as_bytes();
    m.extend_from_slice(&(d.len() as u32).to_be_bytes());
    m.extend_from_slice(d);
    m.extend_from_slice(hash);
    m
}

/// Most bytes of a device id inside a vouch.
pub const MAX_VOUCH_DEVICE_LEN: usize = 48;

/// The signature entry of an app's change (see [`crate::actor`]): the id of
/// the device that vouches for it (one length byte, then the id), then that
/// device's signature over [`change_sig_message`]. A device's own changes
/// carry the bare signature: their actor id names the signer.
pub fn vouch(device: &crate::DeviceId, sig: &[u8]) -> Vec<u8> {
    let id = device.as_bytes();
    let mut v = Vec::with_capacity(1 + id.len() + sig.len());
    // device ids are libp2p peer ids, far below 256 bytes
    v.push(id.len().min(usize::from(u8::MAX)) as u8);
    v.extend_from_slice(id);
    v.extend_from_slice(sig);
    v
}

/// The vouching device and its signature, or `None` if `entry` is not a
/// well-formed vouch.
pub fn split_vouch(entry: &[u8]) -> Option<(crate::DeviceId, &[u8])> {
    let (&n, rest) = entry.split_first()?;
    let n = usize::from(n);
    if n == 0 || n > MAX_VOUCH_DEVICE_LEN || rest.len() <= n {
        return None;
    }
    let (id, sig) = rest.split_at(n);
    Some((crate::DeviceId::from_bytes(id.to_vec()).ok()?, sig))
}

/// The answer to a [`SyncRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum SyncResponse {
    /// The responder's next sync message, if it has one.
    V1 {
        /// An encoded `automerge::sync::Message`.
        message: Option<Vec<u8>>,
        /// The authors' signatures of the changes it carries.
        sigs: Vec<ChangeSig>,
    },
    /// The request was refused; the reason is for logs.
    Refused {
        /// Why.
        reason: RefuseReason,
    },
}

/// Why a sync request was refused. Deliberately coarse: a stranger learns
/// nothing from it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RefuseReason {
    /// Not a member (no hello proof) or not allowed.
    NotAllowed,
    /// The message did not decode or carried refused changes.
    BadMessage,
    /// The responder is busy; try later.
    Busy,
}

/// Redeeming an invite code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum JoinRequest {
    /// Version 1.
    V1 {
        /// The invite, from the code.
        invite: crate::invite::InviteId,
        /// The joiner's ephemeral x25519 public key.
        ephemeral: [u8; 32],
        /// The joiner's long-term x25519 public key, for `members`.
        x25519: [u8; 32],
        /// The joiner's device name.
        name: String,
        /// [`crate::invite::join_proof`] over this transcript.
        proof: [u8; 32],
    },
}

/// The inviter's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum JoinResponse {
    /// Welcome: the space grant, sealed under the agreed key.
    V1 {
        /// The inviter's ephemeral x25519 public key.
        ephemeral: [u8; 32],
        /// Nonce || XChaCha20-Poly1305 of the postcard-encoded grant.
        sealed: Vec<u8>,
    },
    /// Refused, and why.
    Refused {
        /// The reason, for the joiner's user.
        reason: JoinRefusal,
    },
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JoinRefusal {
    /// The inviter has no such invite (wrong space or device).
    Unknown,
    /// The code has expired.
    Expired,
    /// The code has been used up.
    Used,
    /// The inviter cancelled the code.
    Cancelled,
    /// The secret did not match.
    WrongSecret,
    /// Too many failed attempts; try later.
    RateLimited,
    /// The inviter can no longer add members (not an owner).
    NotOwner,
}

impl std::fmt::Display for JoinRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JoinRefusal::Unknown => {
                "the inviter does not know this invite (wrong device or space, or it was removed)"
            }
            JoinRefusal::Expired => "this invite code has expired; ask for a new one",
            JoinRefusal::Used => "this invite code has already been used; ask for a new one",
            JoinRefusal::Cancelled => "this invite code was cancelled by the inviter",
            JoinRefusal::WrongSecret => {
                "the inviter refused the code's secret (is the code complete and current?)"
            }
            JoinRefusal::RateLimited => "too many failed attempts; wait a minute and try again",
            JoinRefusal::NotOwner => "the inviter is no longer an owner of the space",
        })
    }
}

/// The plaintext inside a sealed gossip envelope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum GossipBody {
    /// New changes to one document, each an encoded Automerge change.
    Changes {
        /// The document.
        doc: DocId,
        /// Raw change chunks.
        changes: Vec<Vec<u8>>,
        /// The author's signature of the last change (it vouches for the
        /// others through their hashes).
        sigs: Vec<ChangeSig>,
    },
    /// The sender's heads per document: a receiver that lacks any of them
    /// pulls with the sync protocol. Used for changes too large to inline
    /// and as periodic anti-entropy.
    Heads {
        /// (document, heads)
        docs: Vec<(DocId, Vec<[u8; 32]>)>,
    },
    /// An app's ephemeral message about a document (presence, a cursor),
    /// passed to the apps of the space's other devices and never stored.
    Ephemeral {
        /// The document.
        doc: DocId,
        /// The app's message, as automerge-repo gave it (opaque here).
        data: Vec<u8>,
    },
}

/// Most bytes of one ephemeral message.
pub const MAX_EPHEMERAL_BYTES: usize = 16 * 1024;

/// Encodes a wire message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // postcard serialization of our own types into a Vec cannot fail.
    postcard::to_stdvec(msg).unwrap_or_default()
}

/// Decodes a wire message of at most `limit` bytes.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8], limit: usize) -> Result<T> {
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            what,
            size: bytes.len(),
            limit,
        });
    }
    postcard::from_bytes(bytes).map_err(|e| Error::Malformed {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let m = SyncRequest::V1 {
            space: SpaceId([1; 32]),
            doc: "todo".parse().unwrap(),
            fresh: true,
            message: Some(vec![1, 2, 3]),
            sigs: vec![([4; 32], vec![5; 64])],
        };
        let b = encode(&m);
        assert_eq!(
            decode::<SyncRequest>("sync", &b, MAX_SYNC_BYTES).unwrap(),
            m
        );
        assert!(matches!(
            decode::<SyncRequest>("sync", &b, 2),
            Err(Error::TooLarge { .. })
        ));
        // a truncated message is refused, not misread
        assert!(decode::<SyncRequest>("sync", &b[..b.len() - 2], MAX_SYNC_BYTES).is_err());
    }

    #[test]
    fn invalid_doc_id_on_the_wire_is_refused() {
        let body = GossipBody::Changes {
            doc: "ok".parse().unwrap(),
            changes: vec![],
            sigs: vec![],
        };
        let mut b = encode(&body);
        // the doc id string starts after the variant tag and its length byte
        b[2] = b'/';
        assert!(decode::<GossipBody>("gossip", &b, MAX_GOSSIP_BYTES).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<GossipBody>("gossip", &bytes, MAX_GOSSIP_BYTES);
            let _ = decode::<SyncRequest>("sync", &bytes, MAX_SYNC_BYTES);
            let _ = decode::<SyncResponse>("sync", &bytes, MAX_SYNC_BYTES);
            let _ = decode::<HelloResponse>("hello", &bytes, MAX_HELLO_BYTES);
        }
    }
}
