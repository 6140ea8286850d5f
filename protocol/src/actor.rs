//! Automerge actor ids bound to devices.
//!
//! Every change names its author through its actor id. shoal makes the actor
//! id the device id followed by 8 random bytes drawn once per node start, so
//! that a device which lost an unacknowledged change in a crash never reuses
//! a (actor, seq) pair, while peers can still tell which device wrote it.

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

/// The device that wrote changes under `actor`.
pub fn device_of(actor: &ActorId) -> Result<DeviceId> {
    let b = actor.to_bytes();
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
        let d = DeviceId::from_bytes(vec![1, 2, 3, 4]).unwrap();
        let a = actor_for(&d, [9; 8]);
        assert_eq!(device_of(&a).unwrap(), d);
        assert!(device_of(&ActorId::from(vec![1u8; 8])).is_err());
    }
}
