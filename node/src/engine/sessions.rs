//! Who may sync, and the sync sessions themselves: the members-only hello
//! (challenge, proofs, admission against `members`), and per (peer, space,
//! document) Automerge sync sessions over `/shoal/sync/1`: started on
//! admission (`members` first), on gaps and announced heads, retried with
//! backoff, and answered as responder with every change checked first.

use std::collections::HashMap;
use std::time::Instant;

use automerge::sync::{self, SyncDoc};
use automerge::Change;
use libp2p::{Multiaddr, PeerId};
use shoal_protocol::members;
use shoal_protocol::wire::{
    self, HelloRequest, HelloResponse, RefuseReason, SyncRequest, SyncResponse,
};
use shoal_protocol::{hello, DocId, SpaceId, SpaceKey};
use tracing::{debug, info, warn};

use super::{
    device_of_peer, random, verify_sig, Applied, Engine, Event, Session, SessionKey,
    MAX_ASKING_UNKNOWN, MAX_BACKOFF, RETRY_TICK, SESSION_TIMEOUT,
};
use crate::error::{Error, Result};
use crate::net::{NetCommand, Proto};

impl Engine {
    /// Challenges `peer` to prove its spaces; `recheck` asks it to challenge
    /// us back (we joined a space since it last checked us).
    pub(super) fn send_hello(&mut self, peer: PeerId, recheck: bool, outbox: &mut Vec<NetCommand>) {
        let challenge: [u8; 32] = random();
        let tag = self.tag();
        self.hellos.insert(tag, (peer, challenge));
        outbox.push(NetCommand::Send {
            proto: Proto::Hello,
            peer,
            tag,
            data: wire::encode(&HelloRequest::V1 { challenge, recheck }),
        });
    }

    pub(super) fn proofs_for(&self, peer: &PeerId, challenge: &[u8; 32]) -> Vec<hello::Proof> {
        let Ok(verifier) = device_of_peer(peer) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for s in self.spaces.values() {
            for (e, k) in &s.grant.keys {
                out.push(hello::proof(
                    &s.grant.space,
                    *e,
                    k,
                    challenge,
                    &self.me,
                    &verifier,
                ));
            }
        }
        out.truncate(hello::MAX_PROOFS);
        out
    }

    pub(super) fn on_hello_response(
        &mut self,
        peer: PeerId,
        tag: u64,
        result: std::result::Result<crate::net::budget::Frame, String>,
        outbox: &mut Vec<NetCommand>,
    ) {
        let Some((_, challenge)) = self.hellos.remove(&tag) else {
            return;
        };
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                debug!(%peer, error = %e, "hello failed");
                return;
            }
        };
        let proofs = match wire::decode::<HelloResponse>("hello", &bytes, wire::MAX_HELLO_BYTES) {
            Ok(HelloResponse::V1 { proofs }) => proofs,
            Err(e) => {
                self.emit(Event::Rejected {
                    peer: peer.to_owned(),
                    reason: e.to_string(),
                });
                return;
            }
        };
        let Ok(prover) = device_of_peer(&peer) else {
            return;
        };
        let mine: Vec<(SpaceId, u32, SpaceKey)> = self
            .spaces
            .values()
            .flat_map(|s| {
                s.grant
                    .keys
                    .iter()
                    .map(|(e, k)| (s.grant.space, *e, k.clone()))
            })
            .collect();
        let proven = hello::verify(
            mine.iter().map(|(s, e, k)| (s, *e, k)),
            &proofs,
            &challenge,
            &prover,
            &self.me,
        );
        if !self.peers.contains_key(&peer) {
            return;
        }
        for (space, _) in proven {
            if self.is_proven(&peer, &space) {
                continue;
            }
            // Holding the key is not enough once `members` is known: a
            // revoked device still has old epoch keys.
            let roster = &self.spaces[&space].roster;
            if !roster.members.is_empty() && roster.role_of(&prover).is_none() {
                debug!(%peer, space = %space.short(), "key holder not in members (yet)");
                self.unadmitted.insert((peer, space));
                continue;
            }
            self.admit(peer, space, outbox);
        }
    }

    /// A peer proved membership of `space`: sync with it, members first.
    pub(super) fn admit(&mut self, peer: PeerId, space: SpaceId, outbox: &mut Vec<NetCommand>) {
        let Some(entry) = self.peers.get_mut(&peer) else {
            return;
        };
        if !entry.proven.insert(space) {
            return;
        }
        // Its frames may now be as large as the protocols allow.
        self.net.budget().set_member(peer, true);
        self.remember_peer(peer);
        info!(%peer, space = %space.short(), "member verified");
        self.emit(Event::MemberVerified {
            peer: peer.to_owned(),
            space: space.to_owned(),
        });
        // Members first: roles decide what the other documents accept.
        self.kick((peer, space, DocId::members()), true, outbox);
    }

    pub(super) fn remember_peer(&mut self, peer: PeerId) {
        let Some(e) = self.peers.get(&peer) else {
            return;
        };
        let addrs: Vec<String> = e
            .listen
            .iter()
            .filter(|a| {
                !a.iter().any(
                    |p| matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified()),
                )
            })
            .map(|a| a.to_string())
            .collect();
        if !addrs.is_empty() {
            if let Err(e) = self.store.put_peer(&peer.to_bytes(), &addrs) {
                warn!(%peer, error = %e, "cannot remember peer");
            }
        }
    }

    pub(super) async fn redial_known(&mut self) {
        let Ok(known) = self.store.peers() else {
            return;
        };
        for (id, addrs) in known {
            let Ok(peer) = PeerId::from_bytes(&id) else {
                continue;
            };
            if peer == self.my_peer || self.peers.contains_key(&peer) {
                continue;
            }
            for a in addrs {
                if let Ok(addr) = a.parse::<Multiaddr>() {
                    let addr = addr.with_p2p(peer).unwrap_or_else(|a| a);
                    let _ = self.net.dial(addr).await;
                }
            }
        }
    }

    /// Makes sure a sync session runs for `key`. `fresh` forgets what we
    /// believe the peer has, forcing a full heads exchange.
    pub(super) fn kick(&mut self, key: SessionKey, fresh: bool, outbox: &mut Vec<NetCommand>) {
        if !self.is_proven(&key.0, &key.1) {
            return;
        }
        let s = self
            .sessions
            .entry(key.clone())
            .or_insert_with(Session::new);
        if s.inflight.is_some() {
            s.again = true;
            return;
        }
        if fresh {
            s.state = sync::State::new();
            s.fresh = true;
        }
        self.send_next(key, false, outbox);
    }

    pub(super) fn send_next(&mut self, key: SessionKey, poll: bool, outbox: &mut Vec<NetCommand>) {
        let tag = self.next_tag + 1;
        let (peer, space, doc) = key.clone();
        let mut fresh = self.new_doc();
        let Some(sp) = self.spaces.get_mut(&space) else {
            return;
        };
        // A document we do not hold is asked about from an empty one that
        // is not kept: it exists here once a change of it arrives.
        let held = sp.docs.contains_key(&doc);
        let d = sp.docs.get_mut(&doc).unwrap_or(&mut fresh);
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let msg = d.doc.sync().generate_sync_message(&mut s.state);
        if msg.is_none() && !poll {
            if s.again {
                s.again = false;
            }
            if doc.is_members() {
                // Members settled with this peer: now the other documents.
                let docs: Vec<DocId> = sp
                    .docs
                    .keys()
                    .filter(|d| !d.is_members())
                    .cloned()
                    .collect();
                for d in docs {
                    let k = (peer, space, d);
                    if !self.sessions.contains_key(&k) {
                        self.kick(k, true, outbox);
                    }
                }
            } else if !held || d.doc.is_empty() {
                // A document named in a heads summary that the peer did not
                // have either: forget it rather than keep an empty entry.
                sp.docs.remove(&doc);
                self.sessions.remove(&key);
            }
            return;
        }
        self.next_tag = tag;
        s.inflight = Some((tag, Instant::now()));
        let fresh = std::mem::take(&mut s.fresh);
        self.inflight.insert(tag, key);
        let sigs = msg.as_ref().map(|m| self.sigs_for(m)).unwrap_or_default();
        outbox.push(NetCommand::Send {
            proto: Proto::Sync,
            peer,
            tag,
            data: wire::encode(&SyncRequest::V1 {
                space,
                doc,
                fresh,
                message: msg.map(|m| m.encode()),
                sigs,
            }),
        });
    }

    pub(super) fn retry_later(&mut self, key: &SessionKey) {
        let (_, space, doc) = key;
        self.drop_if_empty(space, doc);
        if !self.holds(space, doc) {
            // Asked about a document we do not hold (named in a heads
            // summary) and got nothing: no retries, or a member naming
            // made-up ids and never answering would keep sessions without
            // bound. The next summary naming it asks again.
            self.sessions.remove(key);
            return;
        }
        if let Some(s) = self.sessions.get_mut(key) {
            s.inflight = None;
            s.state = sync::State::new();
            s.fresh = true;
            // 250 ms, doubling to at most 30 s.
            let backoff = RETRY_TICK * 2u32.saturating_pow(s.failures.min(7));
            s.failures += 1;
            s.retry_at = Some(Instant::now() + backoff.min(MAX_BACKOFF));
        }
    }

    pub(super) fn on_retry_tick(&mut self, outbox: &mut Vec<NetCommand>) {
        self.drive_joins(outbox);
        self.answer_joins();
        let now = Instant::now();
        let mut due = Vec::new();
        let mut silent = Vec::new();
        for (k, s) in self.sessions.iter_mut() {
            if let Some((tag, at)) = s.inflight {
                if now.duration_since(at) > SESSION_TIMEOUT {
                    self.inflight.remove(&tag);
                    s.inflight = None;
                    s.retry_at = Some(now);
                    silent.push(k.clone());
                }
            }
            if s.inflight.is_none() && s.retry_at.is_some_and(|t| t <= now) {
                s.retry_at = None;
                due.push(k.clone());
            }
        }
        // Unanswered: a session about a document we do not hold ends.
        for k in silent {
            if !self.holds(&k.1, &k.2) {
                self.sessions.remove(&k);
                due.retain(|d| *d != k);
            }
        }
        for k in due {
            self.kick(k, true, outbox);
        }
        let old: Vec<(SpaceId, DocId)> = self
            .gaps
            .iter()
            .filter(|(_, g)| now.duration_since(g.since) >= RETRY_TICK)
            .map(|(k, _)| k.clone())
            .collect();
        // Sessions about documents we do not hold, per peer: capped, so a
        // member naming many made-up ids gets at most this many asked at
        // once; the other gaps wait for a later tick.
        let mut asking: HashMap<PeerId, usize> = HashMap::new();
        if !old.is_empty() {
            for (p, space, doc) in self.sessions.keys() {
                if !self.holds(space, doc) {
                    *asking.entry(*p).or_default() += 1;
                }
            }
        }
        for (space, doc) in old {
            if !self.holds(&space, &doc) {
                let room = self.gaps.get(&(space, doc.clone())).is_some_and(|g| {
                    g.peers
                        .iter()
                        .any(|p| asking.get(p).copied().unwrap_or(0) < MAX_ASKING_UNKNOWN)
                });
                if !room {
                    continue;
                }
            }
            let Some(gap) = self.gaps.remove(&(space, doc.clone())) else {
                continue;
            };
            if let Some(p) = gap.opened_by {
                if let Some(n) = self.unknown_gaps.get_mut(&p) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.unknown_gaps.remove(&p);
                    }
                }
            }
            let still = match self
                .spaces
                .get_mut(&space)
                .and_then(|s| s.docs.get_mut(&doc))
            {
                Some(d) => {
                    !d.doc.get_missing_deps(&[]).is_empty()
                        || gap
                            .wanted
                            .iter()
                            .any(|h| d.doc.get_change_by_hash(h).is_none())
                }
                None => true,
            };
            if still {
                let unknown = !self.holds(&space, &doc);
                // kick() skips peers that have not proved membership
                for p in gap.peers {
                    if unknown {
                        let n = asking.entry(p).or_default();
                        if *n >= MAX_ASKING_UNKNOWN {
                            continue;
                        }
                        *n += 1;
                    }
                    self.kick((p, space, doc.clone()), true, outbox);
                }
            }
        }
    }

    /// Checks and applies a peer's sync message to a document; true if the
    /// document changed.
    pub(super) fn receive(
        &mut self,
        key: &SessionKey,
        bytes: &[u8],
        sigs: &[wire::ChangeSig],
        responder: bool,
    ) -> Result<(bool, Applied)> {
        let (_, space, doc) = key;
        let msg = shoal_protocol::sync::decode_message(bytes)?;
        let changes = shoal_protocol::sync::changes_in(&msg)?;
        let fresh = self.new_doc();
        let sp = self
            .spaces
            .get_mut(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        let d = sp.docs.entry(doc.clone()).or_insert(fresh);
        let new: Vec<Change> = changes
            .into_iter()
            .filter(|c| d.doc.get_change_by_hash(&c.hash()).is_none())
            .collect();
        let raw: Vec<Vec<u8>> = new.iter().map(|c| c.raw_bytes().to_vec()).collect();
        let authored = new.clone();
        // Every new change must be vouched for by its author's signature
        // (on it, or on a later change of the author that depends on it):
        // whoever relays it, the actor id alone proves nothing.
        let by_hash: std::collections::HashMap<[u8; 32], &Change> =
            new.iter().map(|c| (c.hash().0, c)).collect();
        let mut verified = Vec::new();
        let mut signed = std::collections::HashMap::new();
        for (h, sig) in sigs {
            let Some(c) = by_hash.get(h) else { continue };
            let Some(signer) = verify_sig(space, doc, c, sig) else {
                let claimed = match shoal_protocol::actor::device_of(c.actor_id()) {
                    Ok(d) => format!(
                        "a change claiming {} as author is not signed by it",
                        d.short()
                    ),
                    Err(_) => format!("an app's change {} carries no valid vouch", c.hash()),
                };
                return Err(shoal_protocol::Error::Unauthorized(claimed).into());
            };
            signed.insert(c.hash(), signer);
            verified.push((*h, sig.clone()));
        }
        let vouchers = shoal_protocol::sync::vouchers(&new, &signed).map_err(|h| {
            let author = by_hash
                .get(&h.0)
                .and_then(|c| shoal_protocol::actor::device_of(c.actor_id()).ok())
                .map_or_else(|| "an app".to_string(), |d| d.short());
            shoal_protocol::Error::Unauthorized(format!("an unsigned change by {author}"))
        })?;
        self.check_app_actors(space, &new, &vouchers)
            .map_err(|(_, why)| shoal_protocol::Error::Unauthorized(why))?;
        let sp = self
            .spaces
            .get_mut(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        let Some(d) = sp.docs.get_mut(doc) else {
            return Ok((false, Applied::default()));
        };
        if doc.is_members() {
            let mut trial = d.doc.fork();
            let refused = members::apply_members_changes(&mut trial, &sp.grant.creator, new)?;
            if !refused.is_empty() {
                return Err(shoal_protocol::Error::Unauthorized(format!(
                    "{} members changes by non-owners",
                    refused.len()
                ))
                .into());
            }
        } else {
            sp.roster.check_changes(doc, &new, &vouchers)?;
        }
        let before = d.doc.get_heads();
        let state = if responder {
            self.responders.entry(key.clone()).or_default()
        } else {
            match self.sessions.get_mut(key) {
                Some(s) => &mut s.state,
                None => return Ok((false, Applied::default())),
            }
        };
        d.doc
            .sync()
            .receive_sync_message(state, msg)
            .map_err(shoal_protocol::Error::from)?;
        shoal_protocol::doc::forget_patches(&mut d.doc);
        let changed = d.doc.get_heads() != before;
        self.store_sigs(&verified);
        self.bind_app_actors(space, doc, &authored, &vouchers);
        Ok((changed, Applied::new(raw, &authored, &vouchers)))
    }

    /// The signatures of the changes an outgoing sync message carries.
    pub(super) fn sigs_for(&self, msg: &sync::Message) -> Vec<wire::ChangeSig> {
        let Ok(changes) = shoal_protocol::sync::changes_in(msg) else {
            return Vec::new();
        };
        changes
            .iter()
            .filter_map(|c| {
                let h = c.hash().0;
                self.store.sig(&h).ok().flatten().map(|s| (h, s))
            })
            .collect()
    }

    pub(super) fn on_sync_request(
        &mut self,
        peer: PeerId,
        data: &[u8],
        outbox: &mut Vec<NetCommand>,
    ) -> SyncResponse {
        let refuse = |reason| SyncResponse::Refused { reason };
        let (space, doc, message, sigs) =
            match wire::decode::<SyncRequest>("sync request", data, wire::MAX_SYNC_BYTES) {
                Ok(SyncRequest::V1 {
                    space,
                    doc,
                    fresh,
                    message,
                    sigs,
                }) => {
                    if fresh {
                        // The peer starts over (it may have refused what we
                        // sent before): forget what we think it has.
                        self.responders.remove(&(peer, space, doc.clone()));
                    }
                    (space, doc, message, sigs)
                }
                Err(e) => {
                    self.emit(Event::Rejected {
                        peer: peer.to_owned(),
                        reason: e.to_string(),
                    });
                    return refuse(RefuseReason::BadMessage);
                }
            };
        if !self.is_proven(&peer, &space) {
            return refuse(RefuseReason::NotAllowed);
        }
        let key = (peer, space, doc.clone());
        if let Some(m) = message {
            match self.receive(&key, &m, &sigs, true) {
                Ok((changed, raw)) => {
                    self.after_remote_change(space, &doc, Some(peer), changed, &raw, outbox)
                }
                Err(e) => {
                    self.responders.remove(&key);
                    self.drop_if_empty(&space, &doc);
                    self.emit(Event::Rejected {
                        peer: peer.to_owned(),
                        reason: e.to_string(),
                    });
                    return refuse(RefuseReason::BadMessage);
                }
            }
        }
        let fresh = self.new_doc();
        let Some(sp) = self.spaces.get_mut(&space) else {
            return refuse(RefuseReason::NotAllowed);
        };
        let d = sp.docs.entry(doc.clone()).or_insert(fresh);
        let state = self.responders.entry(key.clone()).or_default();
        let reply = d.doc.sync().generate_sync_message(state);
        self.drop_if_empty(&space, &doc);
        // A document we do not have (a member may name any id): no state is
        // kept for it, or asking about many ids would grow the engine.
        if !self.holds(&space, &doc) {
            self.responders.remove(&key);
        }
        let sigs = reply.as_ref().map(|m| self.sigs_for(m)).unwrap_or_default();
        SyncResponse::V1 {
            message: reply.map(|m| m.encode()),
            sigs,
        }
    }

    /// Whether this device holds a document of `space` named `doc`.
    pub(super) fn holds(&self, space: &SpaceId, doc: &DocId) -> bool {
        self.spaces
            .get(space)
            .is_some_and(|s| s.docs.contains_key(doc))
    }

    /// Forgets a document entry that holds no change (created by a peer's
    /// request for a document we do not have).
    pub(super) fn drop_if_empty(&mut self, space: &SpaceId, doc: &DocId) {
        if let Some(sp) = self.spaces.get_mut(space) {
            if sp.docs.get(doc).is_some_and(|d| d.doc.is_empty()) {
                sp.docs.remove(doc);
            }
        }
    }

    pub(super) fn on_sync_response(
        &mut self,
        peer: PeerId,
        tag: u64,
        result: std::result::Result<crate::net::budget::Frame, String>,
        outbox: &mut Vec<NetCommand>,
    ) {
        let Some(key) = self.inflight.remove(&tag) else {
            return;
        };
        let (_, space, doc) = key.clone();
        if let Some(s) = self.sessions.get_mut(&key) {
            s.inflight = None;
        }
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                debug!(%peer, error = %e, "sync request failed");
                if self.peers.contains_key(&peer) {
                    self.retry_later(&key);
                }
                return;
            }
        };
        let (message, sigs) =
            match wire::decode::<SyncResponse>("sync response", &bytes, wire::MAX_SYNC_BYTES) {
                Ok(SyncResponse::V1 { message, sigs }) => (message, sigs),
                Ok(SyncResponse::Refused { reason }) => {
                    debug!(%peer, ?reason, "sync refused");
                    self.retry_later(&key);
                    return;
                }
                Err(e) => {
                    self.emit(Event::Rejected {
                        peer: peer.to_owned(),
                        reason: e.to_string(),
                    });
                    self.retry_later(&key);
                    return;
                }
            };
        let had = message.is_some();
        if let Some(s) = self.sessions.get_mut(&key) {
            s.failures = 0;
        }
        if let Some(m) = message {
            match self.receive(&key, &m, &sigs, false) {
                Ok((changed, raw)) => {
                    self.drop_if_empty(&space, &doc);
                    self.after_remote_change(space, &doc, Some(peer), changed, &raw, outbox)
                }
                Err(e) => {
                    self.emit(Event::Rejected {
                        peer: peer.to_owned(),
                        reason: e.to_string(),
                    });
                    self.drop_if_empty(&space, &doc);
                    self.retry_later(&key);
                    return;
                }
            }
        }
        let again = self
            .sessions
            .get_mut(&key)
            .is_some_and(|s| std::mem::take(&mut s.again));
        self.send_next(key, had || again, outbox);
    }
}
