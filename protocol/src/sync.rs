//! Helpers around Automerge's sync protocol: decode a peer's sync message
//! and list the changes it carries, so roles can be checked before anything
//! is applied.

use automerge::sync::Message;
use automerge::{Automerge, Change};

use crate::error::{Error, Result};

/// Most changes one sync message may carry before it is refused.
pub const MAX_CHANGES_PER_MESSAGE: usize = 200_000;

/// Decodes an encoded sync message.
pub fn decode_message(bytes: &[u8]) -> Result<Message> {
    Message::decode(bytes).map_err(|e| Error::Malformed {
        what: "sync message",
        reason: e.to_string(),
    })
}

/// The changes a sync message carries. Each chunk is either one change (the
/// V1 format) or a whole saved document (V2); both are parsed, and verified
/// by Automerge, without touching the receiver's document.
pub fn changes_in(msg: &Message) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for chunk in msg.changes.iter() {
        match Change::try_from(chunk) {
            Ok(c) => out.push(c),
            Err(_) => {
                let doc = Automerge::load(chunk).map_err(|e| Error::Malformed {
                    what: "sync message chunk",
                    reason: e.to_string(),
                })?;
                out.extend(doc.get_changes(&[]));
            }
        }
        if out.len() > MAX_CHANGES_PER_MESSAGE {
            return Err(Error::TooLarge {
                what: "sync message",
                size: out.len(),
                limit: MAX_CHANGES_PER_MESSAGE,
            });
        }
    }
    Ok(out)
}
