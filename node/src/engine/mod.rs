//! The sync engine: one task that owns every space, every Automerge document
//! and every per-peer sync state, and the store writes that persist them.
//!
//! It reacts to three inputs in one `select!` loop: commands from [`Node`]
//! handles (the library and HTTP API), events from the network actor, and
//! timers (retries, heads summaries, redials). Gossip arriving together is
//! applied in one batch per document. Replies that acknowledge a write wait
//! for a store flush, shared by every write of that loop turn (group
//! commit). The task ends on [`Command::Shutdown`], after a final flush.
//!
//! [`Node`]: crate::Node

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::{AutoCommit, Change, ChangeHash};
use libp2p::gossipsub::{IdentTopic, MessageAcceptance, TopicHash};
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;
use serde::Serialize;
use serde_json::Value as Json;
use shoal_protocol::actor::{actor_for, device_of};
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::members::{self, Member, Roster};
use shoal_protocol::wire::{
    self, GossipBody, HelloRequest, HelloResponse, RefuseReason, SyncRequest, SyncResponse,
};
use shoal_protocol::{doc as jdoc, envelope, hello, DeviceId, DocId, Role, SpaceId, SpaceKey};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use x25519_dalek::StaticSecret;

use crate::error::{Error, Result};
use crate::net::{NetCommand, NetEvent, NetHandle, Proto};
use crate::store::Store;

/// Capacity of the command channel into the engine.
pub const COMMAND_CAPACITY: usize = 1024;

mod pairing;
pub use pairing::InviteInfo;
/// Capacity of the event broadcast (slow subscribers lag, never block).
pub const EVENT_CAPACITY: usize = 4096;
/// Most network events applied in one batch.
const MAX_BATCH: usize = 1024;
/// Incremental saves of one document before it is compacted.
const COMPACT_AFTER: usize = 512;
/// How often sessions waiting for a retry are looked at.
const RETRY_TICK: Duration = Duration::from_millis(250);
/// Most announced heads remembered per document gap.
const MAX_WANTED: usize = 256;
/// Longest wait between retries of a failing session.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A sync request without an answer for this long is given up.
const SESSION_TIMEOUT: Duration = Duration::from_secs(90);

/// How a document change reached this node.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Written through this node's API.
    Local,
    /// Arrived as gossip.
    Gossip,
    /// Arrived through the sync protocol.
    Sync,
}

/// What the node tells its watchers.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A peer connected.
    PeerConnected {
        /// Its device id.
        peer: String,
    },
    /// A peer's last connection closed.
    PeerDisconnected {
        /// Its device id.
        peer: String,
    },
    /// A peer proved membership of a space we are in.
    MemberVerified {
        /// Its device id.
        peer: String,
        /// The space id.
        space: String,
    },
    /// A document changed.
    DocChanged {
        /// The space id.
        space: String,
        /// The document.
        doc: String,
        /// How the change arrived.
        origin: Origin,
        /// Heads after the change, hex.
        heads: Vec<String>,
    },
    /// Input from the network was refused.
    Rejected {
        /// The peer that sent or forwarded it.
        peer: String,
        /// Why, for humans.
        reason: String,
    },
}

/// A space as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceInfo {
    /// Hex id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Current key epoch.
    pub epoch: u32,
    /// Our role, if `members` names us yet.
    pub role: Option<Role>,
    /// Documents in the space.
    pub docs: Vec<String>,
    /// Connected peers that proved membership.
    pub peers: Vec<String>,
}

/// A member as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberInfo {
    /// Device id.
    pub device: String,
    /// Role.
    pub role: Role,
    /// Device name.
    pub name: String,
    /// Who added it.
    pub added_by: Option<String>,
    /// Connected now (and proved membership).
    pub connected: bool,
    /// This is the local device.
    pub this_device: bool,
    /// When this node last saw it connected (unix seconds); now if connected.
    pub last_seen: Option<u64>,
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// Requests to the engine.
#[derive(Debug)]
pub(crate) enum Command {
    CreateSpace(String, Reply<SpaceInfo>),
    Spaces(Reply<Vec<SpaceInfo>>),
    ImportGrant(Box<SpaceGrant>, Reply<SpaceInfo>),
    ExportGrant(String, Reply<SpaceGrant>),
    AddMember {
        space: String,
        device: DeviceId,
        role: Role,
        name: String,
        reply: Reply<()>,
    },
    Members(String, Reply<Vec<MemberInfo>>),
    Put {
        space: String,
        doc: DocId,
        path: String,
        value: Json,
        reply: Reply<Vec<String>>,
    },
    Delete {
        space: String,
        doc: DocId,
        path: String,
        reply: Reply<Vec<String>>,
    },
    Get(String, DocId, Reply<Json>),
    Heads(String, DocId, Reply<Vec<String>>),
    Docs(String, Reply<Vec<String>>),
    CreateInvite {
        space: String,
        role: Role,
        expires: Duration,
        uses: u32,
        addrs: Vec<Multiaddr>,
        reply: Reply<InviteInfo>,
    },
    Invites(String, Reply<Vec<InviteInfo>>),
    CancelInvite(String, String, Reply<InviteInfo>),
    Join(
        Box<shoal_protocol::invite::InviteCode>,
        Duration,
        Reply<SpaceInfo>,
    ),
    SetRole(String, DeviceId, Role, Reply<()>),
    Revoke(String, DeviceId, Reply<u32>),
    Shutdown(oneshot::Sender<()>),
}

struct DocState {
    doc: AutoCommit,
    next_seq: u64,
    log_len: usize,
}

struct SpaceState {
    grant: SpaceGrant,
    roster: Roster,
    docs: BTreeMap<DocId, DocState>,
    topic: String,
}

impl SpaceState {
    fn current(&self) -> (u32, &SpaceKey) {
        // A grant always carries at least one key (checked on import).
        let (e, k) = &self.grant.keys[self.grant.keys.len() - 1];
        (*e, k)
    }
}

#[derive(Default)]
struct PeerEntry {
    proven: HashSet<SpaceId>,
    listen: Vec<Multiaddr>,
}

type SessionKey = (PeerId, SpaceId, DocId);

struct Session {
    state: sync::State,
    inflight: Option<(u64, Instant)>,
    again: bool,
    retry_at: Option<Instant>,
    /// Failures in a row, for backoff.
    failures: u32,
    /// The state was reset: the next request tells the responder to
    /// forget what it believes it sent us.
    fresh: bool,
}

impl Session {
    fn new() -> Self {
        Self {
            state: sync::State::new(),
            inflight: None,
            again: false,
            retry_at: None,
            failures: 0,
            fresh: true,
        }
    }
}

/// A document that may be behind: changes waiting for missing
/// dependencies, or heads a peer announced that we lack.
struct Gap {
    since: Instant,
    /// Peers that can fill it.
    peers: HashSet<PeerId>,
    /// Announced heads we did not have.
    wanted: Vec<ChangeHash>,
}

/// Raw local changes of one document in this turn, and its heads after them.
type LocalChanges = (Vec<Vec<u8>>, Vec<ChangeHash>);

/// Work a loop turn leaves for after the flush.
type Ack = Box<dyn FnOnce(Option<String>) + Send>;

pub(crate) struct Engine {
    me: DeviceId,
    my_peer: PeerId,
    name: String,
    session_salt: [u8; 8],
    store: Store,
    net: NetHandle,
    events: broadcast::Sender<Event>,
    spaces: HashMap<SpaceId, SpaceState>,
    topics: HashMap<TopicHash, SpaceId>,
    peers: HashMap<PeerId, PeerEntry>,
    sessions: HashMap<SessionKey, Session>,
    responders: HashMap<SessionKey, sync::State>,
    inflight: HashMap<u64, SessionKey>,
    hellos: HashMap<u64, (PeerId, [u8; 32])>,
    next_tag: u64,
    acks: Vec<Ack>,
    gossip_batch: BTreeMap<(SpaceId, DocId), (Vec<Change>, HashSet<PeerId>)>,
    /// Documents with changes waiting for missing dependencies: since when,
    /// and which peers could fill the gap.
    gaps: HashMap<(SpaceId, DocId), Gap>,
    /// Network commands produced where no outbox is at hand.
    deferred: Vec<NetCommand>,
    /// Network commands to send once this turn's writes are flushed.
    after_flush: Vec<NetCommand>,
    /// This device's long-term x25519 secret.
    x25519: StaticSecret,
    /// Invite redemptions in progress, by tag of their attempt.
    joins: HashMap<u64, pairing::Join>,
    /// Join requests in flight: request tag -> join id.
    join_tags: HashMap<u64, u64>,
    /// Failed join attempts per peer and in total, for rate limiting.
    join_failures: pairing::Failures,
    /// Joins answered once the space's `members` arrives.
    awaiting_members: HashMap<SpaceId, (Reply<SpaceInfo>, Instant)>,
    /// Peers that proved a space's key but are not (yet) in its members.
    unadmitted: HashSet<(PeerId, SpaceId)>,
    /// When each device was last connected (unix seconds).
    last_seen: HashMap<PeerId, u64>,
    /// Local changes of this turn, published together per document.
    local_batch: BTreeMap<(SpaceId, DocId), LocalChanges>,
    anti_entropy: Duration,
    redial: Duration,
}

fn device_of_peer(p: &PeerId) -> Result<DeviceId> {
    Ok(DeviceId::from_bytes(p.to_bytes())?)
}

fn hex_heads(h: &[ChangeHash]) -> Vec<String> {
    h.iter().map(|c| hex::encode(c.0)).collect()
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

impl Engine {
    pub(crate) fn load(
        my_peer: PeerId,
        config: &crate::config::NodeConfig,
        store: Store,
        net: NetHandle,
        events: broadcast::Sender<Event>,
        x25519: [u8; 32],
    ) -> Result<Self> {
        let (anti_entropy, redial) = (config.anti_entropy, config.redial);
        let mut e = Self {
            me: device_of_peer(&my_peer)?,
            my_peer,
            name: config.name.clone(),
            session_salt: random(),
            store,
            net,
            events,
            spaces: HashMap::new(),
            topics: HashMap::new(),
            peers: HashMap::new(),
            sessions: HashMap::new(),
            responders: HashMap::new(),
            inflight: HashMap::new(),
            hellos: HashMap::new(),
            next_tag: 0,
            acks: Vec::new(),
            gossip_batch: BTreeMap::new(),
            local_batch: BTreeMap::new(),
            deferred: Vec::new(),
            after_flush: Vec::new(),
            x25519: StaticSecret::from(x25519),
            joins: HashMap::new(),
            join_tags: HashMap::new(),
            join_failures: pairing::Failures::default(),
            unadmitted: HashSet::new(),
            awaiting_members: HashMap::new(),
            last_seen: HashMap::new(),
            gaps: HashMap::new(),
            anti_entropy,
            redial,
        };
        for grant in e.store.spaces()? {
            e.load_space(grant)?;
        }
        Ok(e)
    }

    fn load_space(&mut self, grant: SpaceGrant) -> Result<()> {
        let space = grant.space;
        let mut docs = BTreeMap::new();
        for id in self.store.doc_ids(&space)? {
            let stored = self.store.load_doc(&space, &id)?;
            let mut doc = match &stored.snapshot {
                Some(s) => AutoCommit::load(s).map_err(shoal_protocol::Error::from)?,
                None => AutoCommit::new(),
            };
            for chunk in &stored.log {
                if let Err(e) = doc.load_incremental(chunk) {
                    warn!(space = %space.short(), doc = %id, error = %e, "skipping unreadable saved change");
                }
            }
            doc.set_actor(actor_for(&self.me, self.session_salt));
            docs.insert(
                id,
                DocState {
                    doc,
                    next_seq: stored.next_seq,
                    log_len: stored.log.len(),
                },
            );
        }
        let roster = match docs.get(&DocId::members()) {
            Some(d) => Roster::read(grant.creator.clone(), &d.doc),
            None => Roster {
                creator: grant.creator.clone(),
                members: BTreeMap::new(),
            },
        };
        let (e, k) = grant
            .keys
            .last()
            .ok_or_else(|| Error::BadRequest("a space grant carries no key".into()))?;
        let topic = k.topic(&space, *e);
        self.topics
            .insert(IdentTopic::new(topic.clone()).hash(), space);
        info!(space = %space.short(), name = %grant.name, docs = docs.len(), "space loaded");
        self.spaces.insert(
            space,
            SpaceState {
                grant,
                roster,
                docs,
                topic,
            },
        );
        Ok(())
    }

    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut net_events: mpsc::Receiver<NetEvent>,
    ) {
        for s in self.spaces.values() {
            let _ = self.net.send(NetCommand::Subscribe(s.topic.clone())).await;
        }
        self.redial_known().await;
        let mut retry = tokio::time::interval(RETRY_TICK);
        let mut summary = tokio::time::interval(self.anti_entropy);
        let mut redial = tokio::time::interval(self.redial);
        let mut outbox: Vec<NetCommand> = Vec::new();
        let mut stopped_by = None;
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.finish_turn(&mut outbox).await;
                        if let Err(e) = self.store.flush().await {
                            warn!(error = %e, "final store flush failed");
                        }
                        stopped_by = Some(done);
                        break;
                    }
                    Some(cmd) => {
                        self.on_command(cmd, &mut outbox);
                        // Take what else is queued into this turn: one flush
                        // and one gossip message per document for all of it.
                        // Writers woken by the last turn's acks are often
                        // about to send: yield once before closing the turn.
                        let mut yielded = false;
                        for _ in 0..MAX_BATCH {
                            match commands.try_recv() {
                                Ok(Command::Shutdown(done)) => {
                                    stopped_by = Some(done);
                                    break;
                                }
                                Ok(cmd) => self.on_command(cmd, &mut outbox),
                                Err(_) if !yielded => {
                                    yielded = true;
                                    tokio::task::yield_now().await;
                                }
                                Err(_) => break,
                            }
                        }
                        if stopped_by.is_some() {
                            self.finish_turn(&mut outbox).await;
                            break;
                        }
                    }
                    None => break,
                },
                ev = net_events.recv() => {
                    let Some(ev) = ev else { break };
                    self.on_net(ev, &mut outbox);
                    // Drain what is already queued, so gossip applies in batches.
                    for _ in 0..MAX_BATCH {
                        match net_events.try_recv() {
                            Ok(ev) => self.on_net(ev, &mut outbox),
                            Err(_) => break,
                        }
                    }
                    self.apply_gossip_batch(&mut outbox);
                }
                _ = retry.tick() => self.on_retry_tick(&mut outbox),
                _ = summary.tick() => self.publish_summaries(&mut outbox),
                _ = redial.tick() => self.redial_known().await,
            }
            self.finish_turn(&mut outbox).await;
        }
        self.net.shutdown().await;
        // Close the store before saying we are done, so a restart on the
        // same home can open it.
        drop(self);
        debug!("engine stopped");
        if let Some(done) = stopped_by {
            let _ = done.send(());
        }
    }

    /// Sends what the turn produced, then flushes once and answers every
    /// write the turn acknowledged.
    async fn finish_turn(&mut self, outbox: &mut Vec<NetCommand>) {
        let mut err = None;
        for ((id, doc), (changes, heads)) in std::mem::take(&mut self.local_batch) {
            if let Err(e) = self.persist(id, &doc, &changes) {
                warn!(space = %id.short(), %doc, error = %e, "cannot persist local changes");
                err = Some(e.to_string());
            }
            self.publish(id, &doc, changes, &heads, outbox);
        }
        outbox.append(&mut self.deferred);
        for cmd in outbox.drain(..) {
            if self.net.send(cmd).await.is_err() {
                break;
            }
        }
        if !self.acks.is_empty() || !self.after_flush.is_empty() {
            if let Err(e) = self.store.flush().await {
                err = Some(e.to_string());
            }
            for ack in self.acks.drain(..) {
                ack(err.clone());
            }
            // Answers that promise durable state (a join's grant) go only
            // after the flush.
            for cmd in std::mem::take(&mut self.after_flush) {
                if self.net.send(cmd).await.is_err() {
                    break;
                }
            }
        }
    }

    fn emit(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    // ----- commands -------------------------------------------------------

    fn resolve(&self, space: &str) -> Result<SpaceId> {
        if let Ok(id) = space.parse::<SpaceId>() {
            if self.spaces.contains_key(&id) {
                return Ok(id);
            }
        }
        self.spaces
            .values()
            .find(|s| s.grant.name == space)
            .map(|s| s.grant.space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))
    }

    fn space_info(&self, id: &SpaceId) -> Option<SpaceInfo> {
        let s = self.spaces.get(id)?;
        Some(SpaceInfo {
            id: id.to_string(),
            name: s.grant.name.clone(),
            epoch: s.current().0,
            role: s
                .roster
                .role_of(&self.me)
                .filter(|_| !s.roster.members.is_empty()),
            docs: s
                .docs
                .iter()
                .filter(|(d, st)| !d.is_members() && !st.doc.is_empty())
                .map(|(d, _)| d.to_string())
                .collect(),
            peers: self
                .peers
                .iter()
                .filter(|(_, p)| p.proven.contains(id))
                .map(|(p, _)| p.to_string())
                .collect(),
        })
    }

    fn on_command(&mut self, cmd: Command, outbox: &mut Vec<NetCommand>) {
        match cmd {
            Command::CreateSpace(name, reply) => {
                let r = self.create_space(name, outbox);
                self.ack_after_flush(reply, r);
            }
            Command::Spaces(reply) => {
                let mut v: Vec<SpaceInfo> = self
                    .spaces
                    .keys()
                    .filter_map(|id| self.space_info(id))
                    .collect();
                v.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(Ok(v));
            }
            Command::ImportGrant(grant, reply) => {
                let r = self.import_grant(*grant, outbox);
                self.ack_after_flush(reply, r);
            }
            Command::ExportGrant(space, reply) => {
                let r = self.resolve(&space).and_then(|id| {
                    let s = &self.spaces[&id];
                    s.roster.check(&DocId::members(), &self.me).map_err(|_| {
                        Error::Forbidden("only an owner can hand out the space key".into())
                    })?;
                    Ok(s.grant.clone())
                });
                let _ = reply.send(r);
            }
            Command::AddMember {
                space,
                device,
                role,
                name,
                reply,
            } => {
                let r = self.add_member(&space, &device, role, &name);
                self.ack_after_flush(reply, r);
            }
            Command::Members(space, reply) => {
                let r = self.resolve(&space).map(|id| {
                    let s = &self.spaces[&id];
                    s.roster
                        .members
                        .iter()
                        .map(|(d, m): (&DeviceId, &Member)| MemberInfo {
                            device: d.to_string(),
                            role: m.role,
                            name: m.name.clone(),
                            added_by: m.added_by.as_ref().map(|a| a.to_string()),
                            connected: self.peers.iter().any(|(p, e)| {
                                e.proven.contains(&id) && p.to_bytes() == d.as_bytes()
                            }),
                            this_device: *d == self.me,
                            last_seen: if *d == self.me {
                                None
                            } else {
                                PeerId::from_bytes(d.as_bytes()).ok().and_then(|p| {
                                    if self.peers.contains_key(&p) {
                                        Some(pairing::now_secs())
                                    } else {
                                        self.last_seen.get(&p).copied()
                                    }
                                })
                            },
                        })
                        .collect()
                });
                let _ = reply.send(r);
            }
            Command::Put {
                space,
                doc,
                path,
                value,
                reply,
            } => {
                let r = self.local_edit(&space, &doc, |d| jdoc::put_json(d, &path, &value));
                self.ack_after_flush(reply, r);
            }
            Command::Delete {
                space,
                doc,
                path,
                reply,
            } => {
                let r = self.local_edit(&space, &doc, |d| jdoc::delete_at(d, &path));
                self.ack_after_flush(reply, r);
            }
            Command::Get(space, doc, reply) => {
                let r = self.with_doc(&space, &doc, |d| jdoc::to_json(d));
                let _ = reply.send(r);
            }
            Command::Heads(space, doc, reply) => {
                let r = self.with_doc(&space, &doc, |d| hex_heads(&d.get_heads()));
                let _ = reply.send(r);
            }
            Command::Docs(space, reply) => {
                let r = self
                    .resolve(&space)
                    .and_then(|id| self.space_info(&id).ok_or(Error::UnknownSpace(space)))
                    .map(|i| i.docs);
                let _ = reply.send(r);
            }
            Command::CreateInvite {
                space,
                role,
                expires,
                uses,
                addrs,
                reply,
            } => {
                let r = self.create_invite(&space, role, expires, uses, addrs);
                self.ack_after_flush(reply, r);
            }
            Command::Invites(space, reply) => {
                let _ = reply.send(self.list_invites(&space));
            }
            Command::CancelInvite(space, id, reply) => {
                let r = self.cancel_invite(&space, &id);
                self.ack_after_flush(reply, r);
            }
            Command::Join(code, timeout, reply) => self.start_join(*code, timeout, reply, outbox),
            Command::SetRole(space, device, role, reply) => {
                let r = self.set_role(&space, &device, role);
                self.ack_after_flush(reply, r);
            }
            Command::Revoke(space, device, reply) => {
                let r = self.revoke(&space, &device, outbox);
                self.ack_after_flush(reply, r);
            }
            Command::Shutdown(_) => {}
        }
    }

    fn ack_after_flush<T: Send + 'static>(&mut self, reply: Reply<T>, r: Result<T>) {
        match r {
            Ok(v) => self.acks.push(Box::new(move |err| {
                let _ = reply.send(match err {
                    None => Ok(v),
                    Some(e) => Err(Error::Network(format!("store flush failed: {e}"))),
                });
            })),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn with_doc<T>(
        &mut self,
        space: &str,
        doc: &DocId,
        f: impl FnOnce(&mut AutoCommit) -> T,
    ) -> Result<T> {
        let id = self.resolve(space)?;
        let s = self
            .spaces
            .get_mut(&id)
            .ok_or_else(|| Error::UnknownSpace(space.into()))?;
        match s.docs.get_mut(doc) {
            Some(d) if !d.doc.is_empty() => Ok(f(&mut d.doc)),
            _ => Err(Error::UnknownDoc {
                space: space.to_string(),
                doc: doc.to_string(),
            }),
        }
    }

    fn new_doc(&self) -> DocState {
        DocState {
            doc: AutoCommit::new().with_actor(actor_for(&self.me, self.session_salt)),
            next_seq: 0,
            log_len: 0,
        }
    }

    fn create_space(&mut self, name: String, outbox: &mut Vec<NetCommand>) -> Result<SpaceInfo> {
        if name.is_empty() || name.len() > 128 || name.parse::<SpaceId>().is_ok() {
            return Err(Error::BadRequest(
                "a space name is 1 to 128 characters and not a space id".into(),
            ));
        }
        if self.spaces.values().any(|s| s.grant.name == name) {
            return Err(Error::SpaceExists(name));
        }
        let grant = SpaceGrant {
            space: SpaceId::from_random(random()),
            name: name.clone(),
            creator: self.me.clone(),
            keys: vec![(0, SpaceKey::from_bytes(random()))],
        };
        let id = grant.space;
        self.store.put_space(&grant)?;
        self.load_space(grant)?;
        let me = self.me.clone();
        let my_name = self.name.clone();
        let x = self.my_x25519_public();
        self.edit_doc(id, &DocId::members(), |d| {
            members::init_members(d, &name, &me, &my_name, Some(&x))
        })?;
        outbox.push(NetCommand::Subscribe(self.spaces[&id].topic.clone()));
        info!(space = %id.short(), %name, "space created");
        self.space_info(&id).ok_or(Error::UnknownSpace(name))
    }

    fn import_grant(
        &mut self,
        grant: SpaceGrant,
        outbox: &mut Vec<NetCommand>,
    ) -> Result<SpaceInfo> {
        if grant.keys.is_empty() {
            return Err(Error::BadRequest("a space grant carries no key".into()));
        }
        if let Some(s) = self.spaces.get(&grant.space) {
            return self
                .space_info(&s.grant.space)
                .ok_or(Error::UnknownSpace(grant.name));
        }
        if self.spaces.values().any(|s| s.grant.name == grant.name) {
            return Err(Error::SpaceExists(grant.name));
        }
        let id = grant.space;
        self.store.put_space(&grant)?;
        self.load_space(grant)?;
        outbox.push(NetCommand::Subscribe(self.spaces[&id].topic.clone()));
        // Connected peers may be members: ask them.
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for p in peers {
            self.send_hello(p, true, outbox);
        }
        self.space_info(&id)
            .ok_or(Error::UnknownSpace(id.to_string()))
    }

    fn add_member(&mut self, space: &str, device: &DeviceId, role: Role, name: &str) -> Result<()> {
        let id = self.resolve(space)?;
        let me = self.me.clone();
        let x25519 = self.spaces[&id]
            .roster
            .members
            .get(device)
            .and_then(|m| m.x25519);
        self.edit_doc(id, &DocId::members(), |d| {
            members::set_member(d, device, role, name, Some(&me), x25519.as_ref())
        })?;
        Ok(())
    }

    fn local_edit(
        &mut self,
        space: &str,
        doc: &DocId,
        f: impl FnOnce(&mut AutoCommit) -> shoal_protocol::Result<()>,
    ) -> Result<Vec<String>> {
        if doc.is_members() {
            return Err(Error::Forbidden(
                "`members` changes only through membership commands".into(),
            ));
        }
        let id = self.resolve(space)?;
        self.edit_doc(id, doc, f)
    }

    /// Applies a local edit: role check, change, event; queues the change
    /// to be persisted and gossiped at the end of the turn.
    fn edit_doc(
        &mut self,
        id: SpaceId,
        doc: &DocId,
        f: impl FnOnce(&mut AutoCommit) -> shoal_protocol::Result<()>,
    ) -> Result<Vec<String>> {
        let fresh = self.new_doc();
        let s = self
            .spaces
            .get_mut(&id)
            .ok_or_else(|| Error::UnknownSpace(id.to_string()))?;
        if s.roster.members.is_empty() && !doc.is_members() && s.roster.creator != self.me {
            return Err(Error::Forbidden(
                "this device does not know the space's members yet; wait for a peer to sync".into(),
            ));
        }
        s.roster
            .check(doc, &self.me)
            .map_err(|e| Error::Forbidden(e.to_string()))?;
        let d = s.docs.entry(doc.clone()).or_insert(fresh);
        if let Err(e) = f(&mut d.doc) {
            d.doc.rollback();
            return Err(e.into());
        }
        d.doc.commit();
        let change = d
            .doc
            .get_last_local_change()
            .map(|c| c.raw_bytes().to_vec());
        let heads = d.doc.get_heads();
        // Persisted (one store write per document) and published (one
        // gossip message per document) at the end of the turn.
        if doc.is_members() {
            self.refresh_roster(id);
        }
        if let Some(c) = change {
            let slot = self.local_batch.entry((id, doc.clone())).or_default();
            slot.0.push(c);
            slot.1 = heads.clone();
        }
        self.emit(Event::DocChanged {
            space: id.to_string(),
            doc: doc.to_string(),
            origin: Origin::Local,
            heads: hex_heads(&heads),
        });
        Ok(hex_heads(&heads))
    }

    fn refresh_roster(&mut self, id: SpaceId) {
        if let Some(s) = self.spaces.get_mut(&id) {
            if let Some(d) = s.docs.get(&DocId::members()) {
                s.roster = Roster::read(s.grant.creator.clone(), &d.doc);
            }
        }
        let mut out = Vec::new();
        self.on_members_changed(id, &mut out);
        self.deferred.extend(out);
    }

    /// Appends raw change chunks of a document to its log (one store write),
    /// or compacts the document into a snapshot when its log is long. Raw
    /// bytes we already hold are stored as they are: asking Automerge to
    /// re-encode changes costs a scan of the document.
    fn persist(&mut self, id: SpaceId, doc: &DocId, raw: &[Vec<u8>]) -> Result<()> {
        let Some(d) = self.spaces.get_mut(&id).and_then(|s| s.docs.get_mut(doc)) else {
            return Ok(());
        };
        if raw.is_empty() {
            return Ok(());
        }
        let bytes = raw.concat();
        if d.log_len >= COMPACT_AFTER {
            let snap = d.doc.save();
            self.store.compact_doc(&id, doc, &snap)?;
            d.log_len = 0;
        } else {
            self.store.append_doc(&id, doc, d.next_seq, &bytes)?;
            d.next_seq += 1;
            d.log_len += 1;
        }
        Ok(())
    }

    fn publish(
        &mut self,
        id: SpaceId,
        doc: &DocId,
        changes: Vec<Vec<u8>>,
        heads: &[ChangeHash],
        outbox: &mut Vec<NetCommand>,
    ) {
        // Pack changes into messages under the inline limit, in order.
        let mut groups: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
        let mut size = 0;
        let mut too_big = false;
        for c in changes {
            if c.len() > wire::GOSSIP_INLINE_LIMIT {
                too_big = true;
                break;
            }
            if size + c.len() > wire::GOSSIP_INLINE_LIMIT {
                groups.push(Vec::new());
                size = 0;
            }
            size += c.len() + 8;
            if let Some(g) = groups.last_mut() {
                g.push(c);
            }
        }
        if too_big || groups.len() > 16 {
            // Too big to inline: announce the heads; receivers pull.
            let bytes = wire::encode(&GossipBody::Heads {
                docs: vec![(doc.clone(), heads.iter().map(|h| h.0).collect())],
            });
            self.publish_sealed(id, &bytes, outbox);
            return;
        }
        for changes in groups.into_iter().filter(|g| !g.is_empty()) {
            let bytes = wire::encode(&GossipBody::Changes {
                doc: doc.clone(),
                changes,
            });
            self.publish_sealed(id, &bytes, outbox);
        }
    }

    fn publish_sealed(&mut self, id: SpaceId, plaintext: &[u8], outbox: &mut Vec<NetCommand>) {
        let Some(s) = self.spaces.get(&id) else {
            return;
        };
        let (epoch, key) = s.current();
        let sealed = envelope::seal(&id, epoch, key, random(), plaintext);
        outbox.push(NetCommand::Publish {
            topic: s.topic.clone(),
            data: sealed,
        });
    }

    fn publish_summaries(&mut self, outbox: &mut Vec<NetCommand>) {
        let ids: Vec<SpaceId> = self
            .spaces
            .keys()
            .filter(|id| self.peers.values().any(|p| p.proven.contains(id)))
            .copied()
            .collect();
        for id in ids {
            let mut all: Vec<(DocId, Vec<[u8; 32]>)> = Vec::new();
            if let Some(s) = self.spaces.get_mut(&id) {
                for (d, st) in s.docs.iter_mut() {
                    let h = st.doc.get_heads();
                    if !h.is_empty() {
                        all.push((d.clone(), h.iter().map(|c| c.0).collect()));
                    }
                }
            }
            for chunk in all.chunks(wire::MAX_HEADS_DOCS) {
                let body = wire::encode(&GossipBody::Heads {
                    docs: chunk.to_vec(),
                });
                self.publish_sealed(id, &body, outbox);
            }
        }
    }

    // ----- network --------------------------------------------------------

    fn on_net(&mut self, ev: NetEvent, outbox: &mut Vec<NetCommand>) {
        match ev {
            NetEvent::Connected { peer } => {
                self.peers.entry(peer).or_default();
                self.last_seen.insert(peer, pairing::now_secs());
                self.emit(Event::PeerConnected {
                    peer: peer.to_string(),
                });
                self.send_hello(peer, false, outbox);
                self.drive_joins(outbox);
            }
            NetEvent::Disconnected { peer } => {
                self.peers.remove(&peer);
                self.last_seen.insert(peer, pairing::now_secs());
                self.unadmitted.retain(|(p, _)| *p != peer);
                self.sessions.retain(|(p, _, _), _| *p != peer);
                self.responders.retain(|(p, _, _), _| *p != peer);
                self.emit(Event::PeerDisconnected {
                    peer: peer.to_string(),
                });
            }
            NetEvent::Identified { peer, listen_addrs } => {
                let e = self.peers.entry(peer).or_default();
                e.listen = listen_addrs;
                if !e.proven.is_empty() {
                    self.remember_peer(peer);
                }
            }
            NetEvent::Gossip {
                id,
                propagation,
                source,
                topic,
                data,
            } => {
                tracing::trace!(target: "shoal_node::gossip_in", len = data.len(), "gossip in");
                let verdict = self.on_gossip(propagation, source, &topic, &data, outbox);
                let acceptance = match verdict {
                    Ok(()) => MessageAcceptance::Accept,
                    Err((acc, reason)) => {
                        debug!(peer = %propagation, %reason, "gossip refused");
                        self.emit(Event::Rejected {
                            peer: propagation.to_string(),
                            reason,
                        });
                        acc
                    }
                };
                outbox.push(NetCommand::Validate {
                    id,
                    propagation,
                    acceptance,
                });
            }
            NetEvent::Request {
                proto: Proto::Hello,
                peer,
                id,
                data,
            } => {
                let proofs =
                    match wire::decode::<HelloRequest>("hello", &data, wire::MAX_HELLO_BYTES) {
                        Ok(HelloRequest::V1 { challenge, recheck }) => {
                            if recheck && self.peers.contains_key(&peer) {
                                // The peer joined a space since we last
                                // checked it: challenge it again.
                                self.send_hello(peer, false, outbox);
                            }
                            self.proofs_for(&peer, &challenge)
                        }
                        Err(e) => {
                            self.emit(Event::Rejected {
                                peer: peer.to_string(),
                                reason: e.to_string(),
                            });
                            Vec::new()
                        }
                    };
                outbox.push(NetCommand::Respond {
                    proto: Proto::Hello,
                    id,
                    data: wire::encode(&HelloResponse::V1 { proofs }),
                });
            }
            NetEvent::Request {
                proto: Proto::Sync,
                peer,
                id,
                data,
            } => {
                let resp = self.on_sync_request(peer, &data, outbox);
                outbox.push(NetCommand::Respond {
                    proto: Proto::Sync,
                    id,
                    data: wire::encode(&resp),
                });
            }
            NetEvent::Request {
                proto: Proto::Invite,
                peer,
                id,
                data,
            } => {
                let resp = self.on_join_request(peer, &data);
                self.after_flush.push(NetCommand::Respond {
                    proto: Proto::Invite,
                    id,
                    data: wire::encode(&resp),
                });
            }
            NetEvent::Response {
                proto,
                peer,
                tag,
                result,
            } => match proto {
                Proto::Hello => self.on_hello_response(peer, tag, result, outbox),
                Proto::Sync => self.on_sync_response(peer, tag, result, outbox),
                Proto::Invite => self.on_join_response(peer, tag, result, outbox),
            },
        }
    }

    /// Challenges `peer` to prove its spaces; `recheck` asks it to challenge
    /// us back (we joined a space since it last checked us).
    fn send_hello(&mut self, peer: PeerId, recheck: bool, outbox: &mut Vec<NetCommand>) {
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

    fn proofs_for(&self, peer: &PeerId, challenge: &[u8; 32]) -> Vec<hello::Proof> {
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

    fn on_hello_response(
        &mut self,
        peer: PeerId,
        tag: u64,
        result: std::result::Result<Vec<u8>, String>,
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
                    peer: peer.to_string(),
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
    fn admit(&mut self, peer: PeerId, space: SpaceId, outbox: &mut Vec<NetCommand>) {
        let Some(entry) = self.peers.get_mut(&peer) else {
            return;
        };
        if !entry.proven.insert(space) {
            return;
        }
        self.remember_peer(peer);
        info!(%peer, space = %space.short(), "member verified");
        self.emit(Event::MemberVerified {
            peer: peer.to_string(),
            space: space.to_string(),
        });
        // Members first: roles decide what the other documents accept.
        self.kick((peer, space, DocId::members()), true, outbox);
    }

    fn remember_peer(&mut self, peer: PeerId) {
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

    async fn redial_known(&mut self) {
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

    /// Decides on one gossip message; applies nothing yet (see
    /// [`Self::apply_gossip_batch`]).
    fn on_gossip(
        &mut self,
        propagation: PeerId,
        source: Option<PeerId>,
        topic: &TopicHash,
        data: &[u8],
        outbox: &mut Vec<NetCommand>,
    ) -> std::result::Result<(), (MessageAcceptance, String)> {
        let reject = |r: String| (MessageAcceptance::Reject, r);
        let Some(space) = self.topics.get(topic).copied() else {
            return Err((
                MessageAcceptance::Ignore,
                "gossip on a topic we do not follow".into(),
            ));
        };
        let source = source.ok_or_else(|| reject("unsigned gossip".into()))?;
        let author = device_of_peer(&source).map_err(|e| reject(e.to_string()))?;
        let s = &self.spaces[&space];
        let epoch = envelope::peek_epoch(data).map_err(|e| reject(e.to_string()))?;
        let key = s
            .grant
            .keys
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, k)| k)
            .ok_or_else(|| reject(format!("unknown key epoch {epoch}")))?;
        let plain = envelope::open(&space, key, data).map_err(|e| reject(e.to_string()))?;
        let body: GossipBody = wire::decode("gossip body", &plain, wire::MAX_GOSSIP_BYTES)
            .map_err(|e| reject(e.to_string()))?;
        match body {
            GossipBody::Changes { doc, changes } => {
                let mut parsed = Vec::with_capacity(changes.len());
                for c in &changes {
                    let c = Change::try_from(c.as_slice())
                        .map_err(|e| reject(format!("malformed change: {e}")))?;
                    let by = device_of(c.actor_id()).map_err(|e| reject(e.to_string()))?;
                    if by != author {
                        return Err(reject(format!(
                            "change by {} published by {}",
                            by.short(),
                            author.short()
                        )));
                    }
                    parsed.push(c);
                }
                match s.roster.role_of(&author) {
                    // Not in our view of members: maybe we lag (a new
                    // member), maybe it was removed. Neither spread nor
                    // penalised; `members` is pulled in case we lag.
                    None if !doc.is_members() || !s.roster.members.is_empty() => {
                        self.kick((propagation, space, DocId::members()), true, outbox);
                        return Err((
                            MessageAcceptance::Ignore,
                            format!("{} is not a member (yet)", author.short()),
                        ));
                    }
                    // A fresh space's first members changes: checked in
                    // order when applied.
                    None => {}
                    Some(_) => s
                        .roster
                        .check(&doc, &author)
                        .map_err(|e| reject(e.to_string()))?,
                }
                let slot = self.gossip_batch.entry((space, doc)).or_default();
                slot.0.extend(parsed);
                slot.1.insert(propagation);
                slot.1.insert(source);
                Ok(())
            }
            GossipBody::Heads { docs } => {
                if docs.len() > wire::MAX_HEADS_DOCS {
                    return Err(reject("heads summary too long".into()));
                }
                if !s.roster.members.is_empty() && s.roster.role_of(&author).is_none() {
                    return Err((
                        MessageAcceptance::Ignore,
                        format!("heads from {}, not a member", author.short()),
                    ));
                }
                let mut behind = Vec::new();
                if let Some(s) = self.spaces.get_mut(&space) {
                    for (doc, heads) in docs {
                        let known = s.docs.get_mut(&doc).is_some_and(|d| {
                            heads
                                .iter()
                                .all(|h| d.doc.get_change_by_hash(&ChangeHash(*h)).is_some())
                        });
                        if !known {
                            behind.push((doc, heads));
                        }
                    }
                }
                let from = if self.is_proven(&source, &space) {
                    source
                } else {
                    propagation
                };
                // Gossip in flight may bring them; pull only if it does not.
                for (doc, heads) in behind {
                    let g = self.gaps.entry((space, doc)).or_insert_with(|| Gap {
                        since: Instant::now(),
                        peers: HashSet::new(),
                        wanted: Vec::new(),
                    });
                    g.peers.insert(from);
                    if g.wanted.len() < MAX_WANTED {
                        g.wanted.extend(heads.into_iter().map(ChangeHash));
                    }
                }
                Ok(())
            }
        }
    }

    fn is_proven(&self, peer: &PeerId, space: &SpaceId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.proven.contains(space))
    }

    fn apply_gossip_batch(&mut self, outbox: &mut Vec<NetCommand>) {
        let batch = std::mem::take(&mut self.gossip_batch);
        for ((space, doc), (changes, from)) in batch {
            let fresh = self.new_doc();
            let Some(s) = self.spaces.get_mut(&space) else {
                continue;
            };
            let d = s.docs.entry(doc.clone()).or_insert(fresh);
            let before = d.doc.get_heads();
            let mut raw: Vec<Vec<u8>> = changes
                .iter()
                .filter(|c| d.doc.get_change_by_hash(&c.hash()).is_none())
                .map(|c| c.raw_bytes().to_vec())
                .collect();
            let r = if doc.is_members() {
                members::apply_members_changes(&mut d.doc, &s.grant.creator, changes).map(|refused| {
                    if !refused.is_empty() {
                        warn!(space = %space.short(), n = refused.len(), "members changes refused");
                        let bad: HashSet<&[u8]> = refused.iter().map(|c| c.raw_bytes()).collect();
                        raw.retain(|r| !bad.contains(r.as_slice()));
                    }
                })
            } else {
                d.doc
                    .apply_changes(changes)
                    .map_err(shoal_protocol::Error::from)
            };
            if let Err(e) = r {
                warn!(space = %space.short(), %doc, error = %e, "gossiped changes failed to apply");
            }
            let missing = !d.doc.get_missing_deps(&[]).is_empty();
            let heads = d.doc.get_heads();
            if missing {
                // A gap: an earlier change has not reached us. Gossip over
                // several paths reorders, so give it a moment before pulling.
                let g = self
                    .gaps
                    .entry((space, doc.clone()))
                    .or_insert_with(|| Gap {
                        since: Instant::now(),
                        peers: HashSet::new(),
                        wanted: Vec::new(),
                    });
                g.peers.extend(from);
            }
            self.after_remote_change(space, &doc, None, heads != before, &raw, outbox);
        }
    }

    /// Persist, update roles, tell watchers; changes that came by sync (from
    /// `synced_from`) are passed on to the other members we are connected
    /// to, while gossip (`None`) spreads by itself.
    fn after_remote_change(
        &mut self,
        space: SpaceId,
        doc: &DocId,
        synced_from: Option<PeerId>,
        changed: bool,
        raw: &[Vec<u8>],
        outbox: &mut Vec<NetCommand>,
    ) {
        if let Err(e) = self.persist(space, doc, raw) {
            warn!(space = %space.short(), %doc, error = %e, "cannot persist remote change");
        }
        if !changed {
            return;
        }
        if doc.is_members() {
            self.refresh_roster(space);
        }
        let heads = self
            .spaces
            .get_mut(&space)
            .and_then(|s| s.docs.get_mut(doc))
            .map(|d| d.doc.get_heads())
            .unwrap_or_default();
        self.emit(Event::DocChanged {
            space: space.to_string(),
            doc: doc.to_string(),
            origin: if synced_from.is_some() {
                Origin::Sync
            } else {
                Origin::Gossip
            },
            heads: hex_heads(&heads),
        });
        if let Some(from) = synced_from {
            let others: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(p, e)| **p != from && e.proven.contains(&space))
                .map(|(p, _)| *p)
                .collect();
            for p in others {
                self.kick((p, space, doc.clone()), false, outbox);
            }
        }
    }

    // ----- sync sessions -------------------------------------------------

    /// Makes sure a sync session runs for `key`. `fresh` forgets what we
    /// believe the peer has, forcing a full heads exchange.
    fn kick(&mut self, key: SessionKey, fresh: bool, outbox: &mut Vec<NetCommand>) {
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

    fn send_next(&mut self, key: SessionKey, poll: bool, outbox: &mut Vec<NetCommand>) {
        let tag = self.next_tag + 1;
        let (peer, space, doc) = key.clone();
        let fresh = self.new_doc();
        let Some(sp) = self.spaces.get_mut(&space) else {
            return;
        };
        let d = sp.docs.entry(doc.clone()).or_insert(fresh);
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
            }
            return;
        }
        self.next_tag = tag;
        s.inflight = Some((tag, Instant::now()));
        let fresh = std::mem::take(&mut s.fresh);
        self.inflight.insert(tag, key);
        outbox.push(NetCommand::Send {
            proto: Proto::Sync,
            peer,
            tag,
            data: wire::encode(&SyncRequest::V1 {
                space,
                doc,
                fresh,
                message: msg.map(|m| m.encode()),
            }),
        });
    }

    fn retry_later(&mut self, key: &SessionKey) {
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

    fn on_retry_tick(&mut self, outbox: &mut Vec<NetCommand>) {
        self.drive_joins(outbox);
        self.answer_joins();
        let now = Instant::now();
        let mut due = Vec::new();
        for (k, s) in self.sessions.iter_mut() {
            if let Some((tag, at)) = s.inflight {
                if now.duration_since(at) > SESSION_TIMEOUT {
                    self.inflight.remove(&tag);
                    s.inflight = None;
                    s.retry_at = Some(now);
                }
            }
            if s.inflight.is_none() && s.retry_at.is_some_and(|t| t <= now) {
                s.retry_at = None;
                due.push(k.clone());
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
        for (space, doc) in old {
            let Some(gap) = self.gaps.remove(&(space, doc.clone())) else {
                continue;
            };
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
                // kick() skips peers that have not proved membership
                for p in gap.peers {
                    self.kick((p, space, doc.clone()), true, outbox);
                }
            }
        }
    }

    /// Checks and applies a peer's sync message to a document; true if the
    /// document changed.
    fn receive(
        &mut self,
        key: &SessionKey,
        bytes: &[u8],
        responder: bool,
    ) -> Result<(bool, Vec<Vec<u8>>)> {
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
            sp.roster.check_changes(doc, &new)?;
        }
        let before = d.doc.get_heads();
        let state = if responder {
            self.responders.entry(key.clone()).or_default()
        } else {
            match self.sessions.get_mut(key) {
                Some(s) => &mut s.state,
                None => return Ok((false, Vec::new())),
            }
        };
        d.doc
            .sync()
            .receive_sync_message(state, msg)
            .map_err(shoal_protocol::Error::from)?;
        Ok((d.doc.get_heads() != before, raw))
    }

    fn on_sync_request(
        &mut self,
        peer: PeerId,
        data: &[u8],
        outbox: &mut Vec<NetCommand>,
    ) -> SyncResponse {
        let refuse = |reason| SyncResponse::Refused { reason };
        let (space, doc, message) =
            match wire::decode::<SyncRequest>("sync request", data, wire::MAX_SYNC_BYTES) {
                Ok(SyncRequest::V1 {
                    space,
                    doc,
                    fresh,
                    message,
                }) => {
                    if fresh {
                        // The peer starts over (it may have refused what we
                        // sent before): forget what we think it has.
                        self.responders.remove(&(peer, space, doc.clone()));
                    }
                    (space, doc, message)
                }
                Err(e) => {
                    self.emit(Event::Rejected {
                        peer: peer.to_string(),
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
            match self.receive(&key, &m, true) {
                Ok((changed, raw)) => {
                    self.after_remote_change(space, &doc, Some(peer), changed, &raw, outbox)
                }
                Err(e) => {
                    self.responders.remove(&key);
                    self.drop_if_empty(&space, &doc);
                    self.emit(Event::Rejected {
                        peer: peer.to_string(),
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
        let state = self.responders.entry(key).or_default();
        let reply = d.doc.sync().generate_sync_message(state);
        self.drop_if_empty(&space, &doc);
        SyncResponse::V1 {
            message: reply.map(|m| m.encode()),
        }
    }

    /// Forgets a document entry that holds no change (created by a peer's
    /// request for a document we do not have).
    fn drop_if_empty(&mut self, space: &SpaceId, doc: &DocId) {
        if let Some(sp) = self.spaces.get_mut(space) {
            if sp.docs.get(doc).is_some_and(|d| d.doc.is_empty()) {
                sp.docs.remove(doc);
            }
        }
    }

    fn on_sync_response(
        &mut self,
        peer: PeerId,
        tag: u64,
        result: std::result::Result<Vec<u8>, String>,
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
        let message =
            match wire::decode::<SyncResponse>("sync response", &bytes, wire::MAX_SYNC_BYTES) {
                Ok(SyncResponse::V1 { message }) => message,
                Ok(SyncResponse::Refused { reason }) => {
                    debug!(%peer, ?reason, "sync refused");
                    self.retry_later(&key);
                    return;
                }
                Err(e) => {
                    self.emit(Event::Rejected {
                        peer: peer.to_string(),
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
            match self.receive(&key, &m, false) {
                Ok((changed, raw)) => {
                    self.after_remote_change(space, &doc, Some(peer), changed, &raw, outbox)
                }
                Err(e) => {
                    self.emit(Event::Rejected {
                        peer: peer.to_string(),
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
