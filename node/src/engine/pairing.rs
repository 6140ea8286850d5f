//! Invite pairing, roles and revocation: the engine's side of issue
//! "Invite-code pairing, roles, and revocation with key rotation".
//!
//! Inviter: issues codes (owners only), answers join requests (rate limited
//! per peer and in total), adds the joiner to `members` with its x25519 key
//! and seals the space grant to the agreed key, answering only once that is
//! flushed. Joiner: dials the addresses in the code (and asks mDNS and the
//! DHT), retries with backoff until its deadline, opens the grant, joins.
//! Revocation removes a device and rotates the space key to a new epoch,
//! sealed to every remaining member's x25519 key inside `members`.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use shoal_protocol::invite::{self, InviteCode, InviteSecret};
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::members;
use shoal_protocol::wire::{self, JoinRefusal, JoinRequest, JoinResponse};
use shoal_protocol::{DeviceId, DocId, Role, SpaceId, SpaceKey};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{device_of_peer, random, Engine, Reply, SpaceInfo};
use crate::error::{Error, Result};
use crate::net::{NetCommand, Proto};
use crate::store::InviteRecord;

/// Failed join attempts one peer may make per window.
const PEER_FAILURES: u32 = 5;
/// Failed join attempts all peers together may make per window and invite
/// (per invite, so strangers cannot lock everyone out of pairing).
const INVITE_FAILURES: u32 = 20;
/// The rate-limit window.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a join waits for `members` before answering anyway.
const MEMBERS_WAIT: Duration = Duration::from_secs(10);
/// Longest wait between two join attempts.
const MAX_JOIN_BACKOFF: Duration = Duration::from_secs(5);

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An invite as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InviteInfo {
    /// Invite id (hex).
    pub id: String,
    /// The code; only when just created.
    pub code: Option<String>,
    /// Space id.
    pub space: String,
    /// Role it grants.
    #[schema(value_type = String, example = "editor")]
    pub role: Role,
    /// Unix seconds.
    pub expires_at: u64,
    /// Devices it may still admit.
    pub uses_left: u32,
    /// active, used, expired or cancelled.
    #[schema(value_type = String)]
    pub state: &'static str,
}

fn info_of(id: &[u8; 8], r: &InviteRecord, code: Option<String>) -> InviteInfo {
    let uses_left = r.uses_total.saturating_sub(r.used_by.len() as u32);
    let state = if r.cancelled {
        "cancelled"
    } else if now_secs() >= r.expires_at {
        "expired"
    } else if uses_left == 0 {
        "used"
    } else {
        "active"
    };
    InviteInfo {
        id: hex::encode(id),
        code,
        space: r.space.to_string(),
        role: r.role,
        expires_at: r.expires_at,
        uses_left,
        state,
    }
}

/// The outcome of a revocation.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Revoked {
    /// The space key's new epoch.
    pub epoch: u32,
    /// Remaining members the new key could not be sealed to (added without
    /// an x25519 key): they must be invited again to keep up.
    pub not_rekeyed: Vec<String>,
}

/// A join in progress on the joiner's side.
pub(super) struct Join {
    code: InviteCode,
    inviter: PeerId,
    ephemeral: StaticSecret,
    reply: Option<Reply<SpaceInfo>>,
    deadline: Instant,
    /// No request before this (after a failure or a rate limit).
    next_try: Instant,
    /// No dial before this.
    next_dial: Instant,
    backoff: Duration,
    inflight: bool,
    last_error: String,
}

/// Failed join attempts, for rate limiting.
#[derive(Default)]
pub(super) struct Failures {
    per_peer: HashMap<PeerId, (Instant, u32)>,
    per_invite: HashMap<[u8; 8], (Instant, u32)>,
}

impl Failures {
    fn limited(&mut self, peer: &PeerId, invite: Option<&[u8; 8]>, now: Instant) -> bool {
        if self.per_peer.len() > 4096 {
            self.per_peer
                .retain(|_, (t, _)| now.duration_since(*t) < FAILURE_WINDOW);
        }
        if self.per_invite.len() > 4096 {
            self.per_invite
                .retain(|_, (t, _)| now.duration_since(*t) < FAILURE_WINDOW);
        }
        let peer_over = self
            .per_peer
            .get(peer)
            .is_some_and(|(t, n)| now.duration_since(*t) < FAILURE_WINDOW && *n >= PEER_FAILURES);
        let invite_over = invite
            .and_then(|i| self.per_invite.get(i))
            .is_some_and(|(t, n)| now.duration_since(*t) < FAILURE_WINDOW && *n >= INVITE_FAILURES);
        peer_over || invite_over
    }

    fn record(&mut self, peer: PeerId, invite: Option<[u8; 8]>, now: Instant) {
        let bump = |e: &mut (Instant, u32)| {
            if now.duration_since(e.0) >= FAILURE_WINDOW {
                *e = (now, 0);
            }
            e.1 += 1;
        };
        bump(self.per_peer.entry(peer).or_insert((now, 0)));
        if let Some(i) = invite {
            bump(self.per_invite.entry(i).or_insert((now, 0)));
        }
    }
}

impl Engine {
    fn require_owner(&self, id: &SpaceId) -> Result<()> {
        let s = self
            .spaces
            .get(id)
            .ok_or_else(|| Error::UnknownSpace(id.to_string()))?;
        match s.roster.role_of(&self.me) {
            Some(Role::Owner) => Ok(()),
            _ => Err(Error::Forbidden(
                "only an owner can invite, change roles or revoke".into(),
            )),
        }
    }

    pub(super) fn my_x25519_public(&self) -> [u8; 32] {
        PublicKey::from(&self.x25519).to_bytes()
    }

    pub(super) fn create_invite(
        &mut self,
        space: &str,
        role: Role,
        expires: Duration,
        uses: u32,
        addrs: Vec<Multiaddr>,
    ) -> Result<InviteInfo> {
        let id = self.resolve(space)?;
        self.require_owner(&id)?;
        if uses == 0 {
            return Err(Error::BadRequest("an invite needs at least one use".into()));
        }
        let invite: [u8; 8] = random();
        let secret: [u8; 16] = random();
        let now = now_secs();
        let rec = InviteRecord {
            space: id,
            role,
            secret,
            created_at: now,
            expires_at: now.saturating_add(expires.as_secs().max(1)),
            uses_total: uses,
            used_by: Vec::new(),
            cancelled: false,
        };
        // Direct non-loopback addresses first (the LAN), then relayed ones
        // (they work from anywhere the relay does), loopback last. Our own
        // `/p2p/<id>` is dropped: the joiner adds it back from the code, and
        // a relayed address fits the code's size limit only without it.
        use libp2p::multiaddr::Protocol;
        let me = self.my_peer;
        let mut addrs: Vec<Multiaddr> = addrs
            .into_iter()
            .map(|mut a| {
                if a.iter().last() == Some(Protocol::P2p(me)) {
                    a.pop();
                }
                a
            })
            .collect();
        addrs.sort_by_key(|a| {
            let loopback = a.iter().any(|p| {
                matches!(p, Protocol::Ip4(ip) if ip.is_loopback())
                    || matches!(p, Protocol::Ip6(ip) if ip.is_loopback())
            });
            let relayed = a.iter().any(|p| p == Protocol::P2pCircuit);
            (loopback, relayed)
        });
        let code = InviteCode {
            space: id,
            inviter: self.me.clone(),
            addrs: addrs
                .iter()
                .map(|a| a.to_vec())
                .filter(|b| b.len() <= invite::MAX_ADDR_LEN)
                .take(invite::MAX_CODE_ADDRS)
                .collect(),
            invite,
            secret: InviteSecret(secret),
            expires_at: rec.expires_at,
            role,
        };
        self.store.put_invite(&invite, &rec)?;
        info!(space = %id.short(), invite = %hex::encode(invite), %role, "invite created");
        Ok(info_of(&invite, &rec, Some(code.encode())))
    }

    pub(super) fn list_invites(&self, space: &str) -> Result<Vec<InviteInfo>> {
        let id = self.resolve(space)?;
        Ok(self
            .store
            .invites()?
            .iter()
            .filter(|(_, r)| r.space == id)
            .map(|(i, r)| info_of(i, r, None))
            .collect())
    }

    pub(super) fn cancel_invite(&mut self, space: &str, invite: &str) -> Result<InviteInfo> {
        let id = self.resolve(space)?;
        self.require_owner(&id)?;
        let key: [u8; 8] = hex::decode(invite)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::BadRequest(format!("{invite:?} is not an invite id")))?;
        let mut rec = self
            .store
            .invite(&key)?
            .filter(|r| r.space == id)
            .ok_or_else(|| Error::BadRequest(format!("no invite {invite} in this space")))?;
        rec.cancelled = true;
        self.store.put_invite(&key, &rec)?;
        Ok(info_of(&key, &rec, None))
    }

    // ----- joiner ---------------------------------------------------------

    pub(super) fn start_join(
        &mut self,
        code: InviteCode,
        timeout: Duration,
        reply: Reply<SpaceInfo>,
        outbox: &mut Vec<NetCommand>,
    ) {
        if self.spaces.contains_key(&code.space) {
            let _ = reply.send(Err(Error::BadRequest(
                "this device is already in that space".into(),
            )));
            return;
        }
        let inviter = match PeerId::from_bytes(code.inviter.as_bytes()) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(Error::BadRequest(format!(
                    "the code names no device: {e}"
                ))));
                return;
            }
        };
        let now = Instant::now();
        let tag = self.tag();
        self.joins.insert(
            tag,
            Join {
                code,
                inviter,
                ephemeral: StaticSecret::from(random::<32>()),
                reply: Some(reply),
                deadline: now + timeout,
                next_try: now,
                next_dial: now,
                backoff: Duration::from_millis(250),
                inflight: false,
                last_error: "no answer yet".into(),
            },
        );
        self.drive_joins(outbox);
    }

    /// Sends join requests to reachable inviters, dials the others, and
    /// gives up on joins past their deadline. Called on every retry tick and
    /// when a peer connects.
    pub(super) fn drive_joins(&mut self, outbox: &mut Vec<NetCommand>) {
        let now = Instant::now();
        let ids: Vec<u64> = self.joins.keys().copied().collect();
        for jid in ids {
            let connected = self
                .joins
                .get(&jid)
                .is_some_and(|j| self.peers.contains_key(&j.inviter));
            let Some(j) = self.joins.get_mut(&jid) else {
                continue;
            };
            if now >= j.deadline {
                let j = self.joins.remove(&jid);
                if let Some(mut j) = j {
                    let msg = format!(
                        "could not join: the inviter {} did not answer in time ({}); is it running and reachable?",
                        j.code.inviter.short(),
                        j.last_error
                    );
                    if let Some(r) = j.reply.take() {
                        let _ = r.send(Err(Error::Network(msg)));
                    }
                }
                continue;
            }
            // A request in flight whose answer was lost ends at the deadline.
            if j.inflight || now < j.next_try || (!connected && now < j.next_dial) {
                continue;
            }
            if connected {
                let eph_pub = PublicKey::from(&j.ephemeral).to_bytes();
                let proof = invite::join_proof(
                    &j.code.secret,
                    &j.code.invite,
                    &eph_pub,
                    &self.me,
                    &j.code.inviter,
                );
                let req = JoinRequest::V1 {
                    invite: j.code.invite,
                    ephemeral: eph_pub,
                    x25519: PublicKey::from(&self.x25519).to_bytes(),
                    name: self.name.clone(),
                    proof,
                };
                j.inflight = true;
                let inviter = j.inviter;
                self.next_tag += 1;
                let tag = self.next_tag;
                self.join_tags.insert(tag, jid);
                outbox.push(NetCommand::Send {
                    proto: Proto::Invite,
                    peer: inviter,
                    tag,
                    data: wire::encode(&req),
                });
            } else {
                for a in &j.code.addrs {
                    if let Ok(addr) = Multiaddr::try_from(a.clone()) {
                        let addr = addr.with_p2p(j.inviter).unwrap_or_else(|a| a);
                        let (tx, _) = oneshot::channel();
                        outbox.push(NetCommand::Dial(addr, tx));
                    }
                }
                // Stale addresses: mDNS and the DHT may know better.
                outbox.push(NetCommand::Find(j.inviter));
                j.next_dial = now + j.backoff;
                j.backoff = (j.backoff * 2).min(MAX_JOIN_BACKOFF);
            }
        }
    }

    pub(super) fn on_join_response(
        &mut self,
        peer: PeerId,
        tag: u64,
        result: std::result::Result<crate::net::budget::Frame, String>,
        outbox: &mut Vec<NetCommand>,
    ) {
        let Some(jid) = self.join_tags.remove(&tag) else {
            return;
        };
        let Some(j) = self.joins.get_mut(&jid) else {
            return;
        };
        j.inflight = false;
        let resp = match result
            .map(|b| wire::decode::<JoinResponse>("join response", &b, wire::MAX_INVITE_BYTES))
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                j.last_error = e.to_string();
                j.next_try = Instant::now() + j.backoff;
                return;
            }
            Err(e) => {
                debug!(%peer, error = %e, "join request failed");
                j.last_error = e;
                j.next_try = Instant::now() + j.backoff;
                return;
            }
        };
        let finish = |engine: &mut Engine, r: Result<SpaceInfo>| {
            if let Some(mut j) = engine.joins.remove(&jid) {
                if let Some(reply) = j.reply.take() {
                    engine.ack_after_flush(reply, r);
                }
            }
        };
        match resp {
            JoinResponse::Refused {
                reason: JoinRefusal::RateLimited,
            } => {
                j.last_error = JoinRefusal::RateLimited.to_string();
                j.next_try = Instant::now() + MAX_JOIN_BACKOFF;
            }
            JoinResponse::Refused { reason } => {
                finish(self, Err(Error::Forbidden(reason.to_string())));
            }
            JoinResponse::V1 { ephemeral, sealed } => {
                let my_pub = PublicKey::from(&j.ephemeral).to_bytes();
                let key = invite::grant_key(
                    &j.ephemeral,
                    &ephemeral,
                    &j.code.secret,
                    &j.code.invite,
                    &my_pub,
                    &ephemeral,
                );
                let grant = invite::open_with(&key, &sealed)
                    .map_err(Error::from)
                    .and_then(|b| {
                        postcard::from_bytes::<SpaceGrant>(&b).map_err(|e| {
                            Error::BadRequest(format!(
                                "the inviter sent a grant that does not decode: {e}"
                            ))
                        })
                    });
                let space = j.code.space;
                let r = grant.and_then(|mut g| {
                    if g.space != space {
                        return Err(Error::BadRequest(
                            "the inviter sent a grant for another space".into(),
                        ));
                    }
                    // Names are local: keep ours unique.
                    if self.spaces.values().any(|s| s.grant.name == g.name) {
                        g.name = format!("{}-{}", g.name, g.space.short());
                    }
                    self.import_grant(g, outbox)
                });
                match r {
                    Ok(_) => {
                        info!(space = %space.short(), "joined; waiting for members");
                        // Answer once `members` has arrived (or at the
                        // deadline), so the caller can write right away.
                        if let Some(mut j) = self.joins.remove(&jid) {
                            if let Some(reply) = j.reply.take() {
                                self.awaiting_members
                                    .insert(space, (reply, Instant::now() + MEMBERS_WAIT));
                            }
                        }
                    }
                    Err(e) => finish(self, Err(e)),
                }
            }
        }
    }

    // ----- inviter --------------------------------------------------------

    pub(super) fn on_join_request(&mut self, peer: PeerId, data: &[u8]) -> JoinResponse {
        let refuse = |reason| JoinResponse::Refused { reason };
        let now = Instant::now();
        if self.join_failures.limited(&peer, None, now) {
            return refuse(JoinRefusal::RateLimited);
        }
        let Ok(JoinRequest::V1 {
            invite: invite_id,
            ephemeral,
            x25519,
            name,
            proof,
        }) = wire::decode::<JoinRequest>("join request", data, wire::MAX_INVITE_BYTES)
        else {
            self.join_failures.record(peer, None, now);
            return refuse(JoinRefusal::Unknown);
        };
        if self.join_failures.limited(&peer, Some(&invite_id), now) {
            return refuse(JoinRefusal::RateLimited);
        }
        let Ok(joiner) = device_of_peer(&peer) else {
            return refuse(JoinRefusal::Unknown);
        };
        let rec = match self.store.invite(&invite_id) {
            Ok(Some(r)) => r,
            _ => {
                self.join_failures.record(peer, None, now);
                return refuse(JoinRefusal::Unknown);
            }
        };
        let secret = InviteSecret(rec.secret);
        let expected = invite::join_proof(&secret, &invite_id, &ephemeral, &joiner, &self.me);
        if !invite::proofs_equal(&expected, &proof) {
            self.join_failures.record(peer, Some(invite_id), now);
            warn!(%peer, "join with a wrong secret");
            return refuse(JoinRefusal::WrongSecret);
        }
        // The same device redeeming again (its answer was lost) gets its
        // grant again, but only while it is still a member: a revoked
        // device must not fetch the new epoch keys with its old code.
        let again = rec
            .used_by
            .iter()
            .any(|d| d.as_slice() == joiner.as_bytes());
        if again
            && self
                .spaces
                .get(&rec.space)
                .is_none_or(|s| s.roster.role_of(&joiner).is_none())
        {
            return refuse(JoinRefusal::Used);
        }
        if !again {
            if rec.cancelled {
                return refuse(JoinRefusal::Cancelled);
            }
            if now_secs() >= rec.expires_at {
                return refuse(JoinRefusal::Expired);
            }
            if rec.used_by.len() as u32 >= rec.uses_total {
                return refuse(JoinRefusal::Used);
            }
        }
        if self.require_owner(&rec.space).is_err() {
            return refuse(JoinRefusal::NotOwner);
        }
        let name = name.chars().take(64).collect::<String>();
        if !again {
            let me = self.me.clone();
            let added = self.edit_doc(rec.space, &DocId::members(), |d| {
                members::set_member(d, &joiner, rec.role, &name, Some(&me), Some(&x25519))
            });
            if let Err(e) = added {
                warn!(%peer, error = %e, "cannot add the joiner");
                return refuse(JoinRefusal::NotOwner);
            }
            let mut rec = rec.clone();
            rec.used_by.push(joiner.as_bytes().to_vec());
            if let Err(e) = self.store.put_invite(&invite_id, &rec) {
                // Without the record the code could be used again: refuse.
                warn!(error = %e, "cannot record the invite's use");
                return refuse(JoinRefusal::Unknown);
            }
        }
        let Some(s) = self.spaces.get(&rec.space) else {
            return refuse(JoinRefusal::Unknown);
        };
        let mine = StaticSecret::from(random::<32>());
        let my_pub = PublicKey::from(&mine).to_bytes();
        let key = invite::grant_key(&mine, &ephemeral, &secret, &invite_id, &ephemeral, &my_pub);
        let grant = postcard::to_stdvec(&s.grant).unwrap_or_default();
        info!(%peer, space = %rec.space.short(), role = %rec.role, "device joined with an invite");
        JoinResponse::V1 {
            ephemeral: my_pub,
            sealed: invite::seal_with(&key, random(), &grant),
        }
    }

    // ----- roles and revocation --------------------------------------------

    /// What this owner has seen of `device`'s changes, per document: the
    /// frontier a former writer's changes are held to (see
    /// `shoal_protocol::members`).
    fn frontier_of(&mut self, id: &SpaceId, device: &DeviceId) -> members::Frontier {
        let mut f = members::Frontier::new();
        let apps = self.store.app_actors_of(id, device).unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the app actors a device vouched for");
            Default::default()
        });
        if let Some(s) = self.spaces.get_mut(id) {
            for (doc, d) in s.docs.iter_mut().filter(|(d, _)| !d.is_members()) {
                let actors = members::frontier_in(&mut d.doc, device, &apps);
                if !actors.is_empty() {
                    f.insert(doc.clone(), actors);
                }
            }
        }
        f
    }

    fn owners(&self, id: &SpaceId) -> usize {
        self.spaces.get(id).map(|s| s.roster.owners()).unwrap_or(0)
    }

    pub(super) fn set_role(&mut self, space: &str, device: &DeviceId, role: Role) -> Result<()> {
        let id = self.resolve(space)?;
        self.require_owner(&id)?;
        let m = self.spaces[&id]
            .roster
            .members
            .get(device)
            .cloned()
            .ok_or_else(|| Error::BadRequest(format!("{device} is not a member")))?;
        if m.role == Role::Owner && role != Role::Owner && self.owners(&id) <= 1 {
            return Err(Error::Forbidden(
                "the last owner cannot give up ownership".into(),
            ));
        }
        let demoted = m.role.can_write() && !role.can_write();
        let frontier = if demoted {
            self.frontier_of(&id, device)
        } else {
            members::Frontier::new()
        };
        self.edit_doc(id, &DocId::members(), |d| {
            members::set_member(
                d,
                device,
                role,
                &m.name,
                m.added_by.as_ref(),
                m.x25519.as_ref(),
            )?;
            if demoted {
                members::mark_former_writer(d, device, &frontier)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    pub(super) fn revoke(
        &mut self,
        space: &str,
        device: &DeviceId,
        outbox: &mut Vec<NetCommand>,
    ) -> Result<Revoked> {
        let id = self.resolve(space)?;
        self.require_owner(&id)?;
        let roster = self.spaces[&id].roster.clone();
        let m = roster
            .members
            .get(device)
            .ok_or_else(|| Error::BadRequest(format!("{device} is not a member")))?;
        if m.role == Role::Owner && self.owners(&id) <= 1 {
            return Err(Error::Forbidden("the last owner cannot be removed".into()));
        }
        let frontier = m.role.can_write().then(|| self.frontier_of(&id, device));
        // New epoch key, sealed to every remaining member that has an x25519 key.
        let s = &self.spaces[&id];
        let epoch = s
            .current()
            .0
            .checked_add(1)
            .ok_or_else(|| Error::Forbidden("the space has used up its key epochs".into()))?;
        let key = SpaceKey::from_bytes(random());
        let plain = postcard::to_stdvec(&(epoch, key.expose())).unwrap_or_default();
        let sealed: Vec<(DeviceId, Vec<u8>)> = roster
            .members
            .iter()
            .filter(|(d, _)| *d != device)
            .filter_map(|(d, m)| {
                m.x25519
                    .map(|x| (d.clone(), invite::seal_to(&x, random(), random(), &plain)))
            })
            .collect();
        let left_out: Vec<String> = roster
            .members
            .iter()
            .filter(|(d, m)| *d != device && m.x25519.is_none())
            .map(|(d, _)| d.to_string())
            .collect();
        if !left_out.is_empty() {
            warn!(
                ?left_out,
                "members without an x25519 key cannot receive the new epoch key"
            );
        }
        self.edit_doc(id, &DocId::members(), |d| {
            members::remove_member(d, device, frontier.as_ref())?;
            members::put_epoch_keys(d, epoch, &sealed)
        })?;
        self.add_epoch(id, epoch, key, outbox)?;
        // The news travels by sync: gossip now goes out under the new epoch,
        // which the others can read only once they have this change.
        let peers: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(p, e)| e.proven.contains(&id) && p.to_bytes() != device.as_bytes())
            .map(|(p, _)| *p)
            .collect();
        for p in peers {
            self.kick((p, id, DocId::members()), true, outbox);
        }
        info!(space = %id.short(), device = %device.short(), epoch, "device revoked, key rotated");
        Ok(Revoked {
            epoch,
            not_rekeyed: left_out,
        })
    }

    /// Adopts a new epoch key: persisted, and when it is the newest, current
    /// for publishing: its topic joined and the topic of the epoch it
    /// replaces left (a removed device still holds the old key; members
    /// that lag catch up by sync).
    pub(super) fn add_epoch(
        &mut self,
        id: SpaceId,
        epoch: u32,
        key: SpaceKey,
        outbox: &mut Vec<NetCommand>,
    ) -> Result<()> {
        let Some(s) = self.spaces.get_mut(&id) else {
            return Ok(());
        };
        if s.grant.keys.iter().any(|(e, _)| *e == epoch) {
            return Ok(());
        }
        s.grant.keys.push((epoch, key.clone()));
        s.grant.keys.sort_by_key(|(e, _)| *e);
        self.store.put_space(&s.grant)?;
        let (cur, k) = s.current();
        let topic = k.topic(&id, cur);
        if topic != s.topic {
            let old = std::mem::replace(&mut s.topic, topic.clone());
            self.topics
                .remove(&libp2p::gossipsub::IdentTopic::new(old.clone()).hash());
            outbox.push(NetCommand::Unsubscribe(old));
            self.topics
                .insert(libp2p::gossipsub::IdentTopic::new(topic.clone()).hash(), id);
            outbox.push(NetCommand::Subscribe(topic));
        }
        Ok(())
    }

    /// Answers joins whose `members` arrived, or whose wait ran out.
    pub(super) fn answer_joins(&mut self) {
        let now = Instant::now();
        let ready: Vec<SpaceId> = self
            .awaiting_members
            .iter()
            .filter(|(id, (_, deadline))| {
                now >= *deadline
                    || self
                        .spaces
                        .get(id)
                        .is_some_and(|s| s.roster.members.contains_key(&self.me))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some((reply, _)) = self.awaiting_members.remove(&id) {
                let r = self
                    .space_info(&id)
                    .ok_or(Error::UnknownSpace(id.to_string()));
                self.ack_after_flush(reply, r);
            }
        }
    }

    /// After `members` changed: open epoch keys sealed to us, admit peers
    /// that became members, and cut off peers that are members no more.
    pub(super) fn on_members_changed(&mut self, id: SpaceId, outbox: &mut Vec<NetCommand>) {
        self.answer_joins();
        let sealed = match self
            .spaces
            .get(&id)
            .and_then(|s| s.docs.get(&DocId::members()))
        {
            Some(d) => members::epoch_keys_for(&d.doc, &self.me),
            None => return,
        };
        for (epoch, boxed) in sealed {
            let known = self.spaces[&id].grant.keys.iter().any(|(e, _)| *e == epoch);
            if known {
                continue;
            }
            match invite::open_sealed(&self.x25519, &boxed)
                .ok()
                .and_then(|b| postcard::from_bytes::<(u32, [u8; 32])>(&b).ok())
            {
                Some((e, k)) if e == epoch => {
                    if let Err(err) = self.add_epoch(id, e, SpaceKey::from_bytes(k), outbox) {
                        warn!(error = %err, "cannot store a new epoch key");
                    } else {
                        info!(space = %id.short(), epoch, "new epoch key received");
                    }
                }
                _ => warn!(space = %id.short(), epoch, "an epoch key sealed to us does not open"),
            }
        }
        let roster = self.spaces[&id].roster.clone();
        if roster.members.is_empty() {
            return;
        }
        let member = |p: &PeerId| {
            device_of_peer(p)
                .ok()
                .is_some_and(|d| roster.role_of(&d).is_some())
        };
        let waiting: Vec<PeerId> = self
            .unadmitted
            .iter()
            .filter(|(p, s)| *s == id && member(p))
            .map(|(p, _)| *p)
            .collect();
        for p in waiting {
            self.unadmitted.remove(&(p, id));
            self.admit(p, id, outbox);
        }
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(p, e)| e.proven.contains(&id) && !member(p))
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            info!(peer = %p, space = %id.short(), "peer is no longer a member: cut off");
            if let Some(e) = self.peers.get_mut(&p) {
                e.proven.remove(&id);
                if e.proven.is_empty() {
                    self.net.budget().set_member(p, false);
                }
            }
            self.sessions.retain(|(q, s, _), _| !(*q == p && *s == id));
            self.responders
                .retain(|(q, s, _), _| !(*q == p && *s == id));
        }
    }
}
