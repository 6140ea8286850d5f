//! How many bytes each peer may make this node hold at once.
//!
//! Every request frame a peer sends (hello, sync, invite) is read into
//! memory whole, then queued for the engine. Before this module, a frame
//! could be as large as its protocol allows (32 MiB for sync) whoever sent
//! it, and nothing bounded how many of them waited at once: a stranger
//! could fill 100 streams per connection with 32 MiB frames before any
//! membership was checked.
//!
//! Now a frame is read only after its bytes are reserved here, against
//! the peer's own budget and the node's total, and the reservation travels
//! with the frame ([`Frame`]) until the engine is done with it. A peer that
//! has not proved membership of any space (a stranger) may send frames of
//! at most [`STRANGER_FRAME_BYTES`] and hold [`STRANGER_BYTES`]; a member
//! holds at most [`MEMBER_BYTES`]; all peers together [`TOTAL_BYTES`]. A
//! frame over budget is refused unread and its stream reset: the sender
//! sees its request fail and may retry later, nothing is allocated.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use libp2p::PeerId;
use tokio::sync::mpsc;

use super::NetEvent;
use shoal_protocol::wire::MAX_SYNC_BYTES;

/// Largest frame a peer that has not proved membership may send: a hello,
/// an invite request, a refusable sync request.
pub const STRANGER_FRAME_BYTES: usize = 64 * 1024;
/// Bytes a stranger's frames may hold at once.
pub const STRANGER_BYTES: usize = 4 * STRANGER_FRAME_BYTES;
/// Bytes a member's frames may hold at once: three full sync messages.
pub const MEMBER_BYTES: usize = 3 * MAX_SYNC_BYTES;
/// Bytes all peers' frames may hold at once.
pub const TOTAL_BYTES: usize = 512 * 1024 * 1024;

/// The shared ledger of who holds how many bytes; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Budget(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    ledger: Mutex<Ledger>,
    /// Where refusals go, as [`NetEvent::Refused`] (the engine turns them
    /// into `rejected` events): libp2p does not report a request its
    /// codec refused to read. Weak, so the engine still sees the channel
    /// close when the network actor ends.
    refusals: OnceLock<mpsc::WeakSender<NetEvent>>,
    /// Refusals reported in the current second: at most
    /// [`REPORTS_PER_SECOND`], so a peer sending nothing but oversized
    /// headers cannot fill the engine's queue with reports.
    reports: Mutex<(Option<std::time::Instant>, u32)>,
}

/// Refusals reported to the engine per second, at most (all are counted).
pub const REPORTS_PER_SECOND: u32 = 16;

#[derive(Debug, Default)]
struct Ledger {
    /// Peers that proved membership of at least one space.
    members: HashSet<PeerId>,
    /// Bytes held per peer (entries with 0 are removed).
    held: HashMap<PeerId, usize>,
    /// Bytes held in all.
    total: usize,
    /// Frames refused unread since the start.
    refused: u64,
}

/// What the budget holds right now (tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Bytes held over all peers.
    pub total: usize,
    /// Peers holding any.
    pub peers: usize,
    /// Frames refused unread since the start (over a frame limit or a
    /// budget).
    pub refused: u64,
}

impl Budget {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding this lock cannot leave the ledger half
        // written (every update is one statement), so a poisoned lock is
        // still sound to use.
        self.0.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends refusals to `events` from now on.
    pub fn report_to(&self, events: &mpsc::Sender<NetEvent>) {
        let _ = self.0.refusals.set(events.downgrade());
    }

    /// Reports that a frame of `peer` was refused unread. Every refusal is
    /// counted ([`Held::refused`]); at most [`REPORTS_PER_SECOND`] are
    /// reported, and under a flood that fills the engine's queue reports
    /// are dropped.
    pub fn refused(&self, peer: PeerId, reason: String) {
        self.ledger().refused += 1;
        {
            let mut r = self.0.reports.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            if r.0
                .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
            {
                *r = (Some(now), 0);
            }
            if r.1 >= REPORTS_PER_SECOND {
                return;
            }
            r.1 += 1;
        }
        if let Some(tx) = self.0.refusals.get().and_then(|w| w.upgrade()) {
            let _ = tx.try_send(NetEvent::Refused { peer, reason });
        }
    }

    /// Records whether `peer` has proved membership of some space.
    pub fn set_member(&self, peer: PeerId, member: bool) {
        let mut l = self.ledger();
        if member {
            l.members.insert(peer);
        } else {
            l.members.remove(&peer);
        }
    }

    /// The largest frame `peer` may send on a protocol whose own limit is
    /// `limit`. An unknown peer counts as a stranger.
    pub fn frame_limit(&self, peer: Option<PeerId>, limit: usize) -> usize {
        match peer {
            Some(p) if self.ledger().members.contains(&p) => limit,
            _ => limit.min(STRANGER_FRAME_BYTES),
        }
    }

    /// Reserves `len` bytes for a frame of `peer`, or says which budget it
    /// would exceed.
    pub fn reserve(&self, peer: PeerId, len: usize) -> Result<Permit, String> {
        let mut l = self.ledger();
        let cap = if l.members.contains(&peer) {
            MEMBER_BYTES
        } else {
            STRANGER_BYTES
        };
        let mine = l.held.get(&peer).copied().unwrap_or(0);
        if mine + len > cap {
            return Err(format!(
                "peer holds {mine} bytes in frames; {len} more exceed its budget of {cap}"
            ));
        }
        if l.total + len > TOTAL_BYTES {
            return Err(format!(
                "frames hold {} bytes; {len} more exceed the node's budget of {TOTAL_BYTES}",
                l.total
            ));
        }
        *l.held.entry(peer).or_default() += len;
        l.total += len;
        Ok(Permit {
            budget: self.clone(),
            peer,
            len,
        })
    }

    /// What is held now.
    pub fn held(&self) -> Held {
        let l = self.ledger();
        Held {
            total: l.total,
            peers: l.held.len(),
            refused: l.refused,
        }
    }
}

/// Bytes reserved for one frame; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Budget,
    peer: PeerId,
    len: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut l = self.budget.ledger();
        l.total = l.total.saturating_sub(self.len);
        if let Some(h) = l.held.get_mut(&self.peer) {
            *h = h.saturating_sub(self.len);
            if *h == 0 {
                l.held.remove(&self.peer);
            }
        }
    }
}

/// A frame's bytes, with the reservation that let them in (none for
/// frames this node made itself).
#[derive(Debug)]
pub struct Frame {
    bytes: Vec<u8>,
    _permit: Option<Permit>,
}

impl Frame {
    /// Bytes read under `permit`.
    pub fn reserved(bytes: Vec<u8>, permit: Permit) -> Self {
        Self {
            bytes,
            _permit: Some(permit),
        }
    }
}

impl From<Vec<u8>> for Frame {
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            _permit: None,
        }
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_get_small_frames_and_budgets_are_given_back() {
        let b = Budget::default();
        let stranger = PeerId::random();
        let member = PeerId::random();
        b.set_member(member, true);
        assert_eq!(
            b.frame_limit(Some(stranger), MAX_SYNC_BYTES),
            STRANGER_FRAME_BYTES
        );
        assert_eq!(b.frame_limit(None, MAX_SYNC_BYTES), STRANGER_FRAME_BYTES);
        assert_eq!(b.frame_limit(Some(member), MAX_SYNC_BYTES), MAX_SYNC_BYTES);
        // a stranger's budget: four full frames, not a fifth
        let held: Vec<Permit> = (0..4)
            .map(|_| b.reserve(stranger, STRANGER_FRAME_BYTES))
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(b.reserve(stranger, 1).is_err());
        // a member is not held up by the stranger
        let m = b.reserve(member, MAX_SYNC_BYTES).unwrap();
        drop(held);
        assert!(b.reserve(stranger, STRANGER_FRAME_BYTES).is_ok());
        assert_eq!(
            b.held(),
            Held {
                total: MAX_SYNC_BYTES,
                peers: 1,
                refused: 0
            }
        );
        drop(m);
        assert_eq!(
            b.held(),
            Held {
                total: 0,
                peers: 0,
                refused: 0
            }
        );
    }

    #[test]
    fn the_node_total_bounds_many_members() {
        let b = Budget::default();
        let mut permits = Vec::new();
        let mut refused = 0;
        for _ in 0..(TOTAL_BYTES / MEMBER_BYTES + 2) {
            let p = PeerId::random();
            b.set_member(p, true);
            match b.reserve(p, MEMBER_BYTES) {
                Ok(permit) => permits.push(permit),
                Err(e) => {
                    assert!(e.contains("node's budget"), "{e}");
                    refused += 1;
                }
            }
        }
        assert!(refused >= 2);
        assert!(b.held().total <= TOTAL_BYTES);
    }
}
