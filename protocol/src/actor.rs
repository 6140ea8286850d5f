//! Automerge actor ids bound to devices.
//!
//! Every change names its author through its actor id. shoal makes the actor
//! id the device id followed by 8 random bytes drawn once per node start, so
//! that a device which lost an unacknowledged change in a crash never reuses
//! a (actor, seq) pair, while peers can still tell which device wrote it.
//!
//! # App actors
//!
//! Apps on a device (automerge-repo clients of the local node) write under
//! actor ids of their own: 16 random bytes in automerge-repo. An actor id
//! of at most [`MAX_APP_ACTOR_LEN`] bytes is an *app actor*; a device's
//! actor is always longer (a libp2p peer id is at least 34 bytes, plus the
//! 8-byte suffix). A device id is never read out of an app actor: each app
//! change carries a *vouch*, the signature of the device that accepted it
//! from its local app (see `wire::vouch`), and that device is its author
//! for every rule (roles, former writers). An app actor is bound to the
//! first device that vouched for it: a change under it vouched by any other
//! device is refused, so no member can write under another device's app.

use automerge::ActorId;

use crate::error::{Error, Result};
use crate::ids::DeviceId;

/// Length of the per-start random suffix.
pub const SESSION_LEN: usize = 8;

/// The actor id for `device` in the node session `session`.
pub fn actor_for(device: &DeviceId, session: [u8; SESSION_LEN]) -> ActorId {
    let mut b = device.as_bytes().to_vec();
    b.extend_from_slice(&session);
    ActorId::from(b)
}

/// Longest actor id that is an app's rather than a device's.
pub const MAX_APP_ACTOR_LEN: usize = 32;

/// Whether `actor` is an app's actor (see the module docs), whose changes
/// need a device's vouch.
pub fn is_app_actor(actor: &ActorId) -> bool {
    actor.to_bytes().len() <= MAX_APP_ACTOR_LEN
}

/// The device that wrote changes under `actor`; an error for app actors,
/// whose device is the one that vouched for them.
pub fn device_of(actor: &ActorId) -> Result<DeviceId> {
    let b = actor.to_bytes();
    if is_app_actor(actor) {
        return Err(Error::InvalidId {
            kind: "device id",
            reason: format!("actor id of {} bytes is an app's, not a device's", b.len()),
        });
    }
    if b.len() <= SESSION_LEN {
        return Err(Error::InvalidId {
            kind: "device id",
            reason: format!("actor id of {} bytes names no device", b.len()),
        });
    }
    DeviceId::from_bytes(b[..b.len() - SESSION_LEN].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_round_trips_to_device() {
        let d = DeviceId::from_bytes(vec![7; 38]).unwrap();
        let a = actor_for(&d, [9; 8]);
        assert_eq!(device_of(&a).unwrap(), d);
        assert!(!is_app_actor(&a));
        assert!(device_of(&ActorId::from(vec![1u8; 8])).is_err());
        // automerge-repo's actors are apps'
        let app = ActorId::from(vec![1u8; 16]);
        assert!(is_app_actor(&app));
        assert!(device_of(&app).is_err());
    }
}
