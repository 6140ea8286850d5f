//! The sync engine: one task that owns every space, every Automerge document
//! and every per-peer sync state, and the store writes that persist them.
//!
//! It reacts to three inputs in one `select!` loop: commands from [`Node`]
//! handles (the library and HTTP API), events from the network actor, and
//! timers (retries, heads summaries, redials). Commands and gossip arriving
//! together are handled in one turn: one store flush acknowledges every
//! write of the turn (group commit), one gossip message per document carries
//! its local changes, and remote changes apply in one batch per document.
//! The task ends on a shutdown command, after a final flush.
//!
//! This file holds the state, the loop, commands and local edits;
//! `gossip` the real-time path, `sessions` the hello and the Automerge
//! sync sessions, `pairing` invites, roles and revocation.
//!
//! [`Node`]: crate::Node

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use automerge::sync;
use automerge::transaction::CommitOptions;
use automerge::{AutoCommit, Change, ChangeHash};
use libp2p::gossipsub::{IdentTopic, MessageAcceptance, TopicHash};
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;
use serde::Serialize;
use serde_json::Value as Json;
use shoal_protocol::actor::actor_for;
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::members::{self, Member, Roster};
use shoal_protocol::wire::{self, HelloRequest, HelloResponse};
use shoal_protocol::{doc as jdoc, DeviceId, DocId, Role, SpaceId, SpaceKey};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use x25519_dalek::StaticSecret;

use crate::error::{Error, Result};
pub use crate::events::{Event, FileOrigin, Origin};
use crate::net::{NetCommand, NetEvent, NetHandle, Proto};
use crate::store::Store;

/// Capacity of the command channel into the engine.
pub const COMMAND_CAPACITY: usize = 1024;

mod apps;
mod gossip;
mod index;
mod pairing;
mod sessions;
pub(crate) use index::IndexCommand;
pub use index::{HistoryValue, ShardChanges, ShardHeads, Values, When};
pub use pairing::{InviteInfo, Revoked};
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
/// Sessions about documents this device does not hold (named in a heads
/// summary), per peer at once.
const MAX_ASKING_UNKNOWN: usize = 256;
/// Gaps about documents this device does not hold, per peer whose heads
/// summary named them: further ids from that peer wait for its later
/// summaries; other peers' gaps, and gaps of held documents, are not
/// affected.
const MAX_UNKNOWN_GAPS_PER_PEER: usize = 4096;
/// Longest wait between retries of a failing session.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A sync request without an answer for this long is given up.
const SESSION_TIMEOUT: Duration = Duration::from_secs(90);

/// How many sync states the engine holds (tests watch these for growth).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncStates {
    /// Sessions this node runs (peer, space, document).
    pub sessions: usize,
    /// States of sessions peers run with this node.
    pub responders: usize,
    /// Documents waiting for missing changes.
    pub gaps: usize,
    /// Documents held, over all spaces.
    pub docs: usize,
}

/// A space as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SpaceInfo {
    /// Hex id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Current key epoch.
    pub epoch: u32,
    /// Our role, if `members` names us yet.
    #[schema(value_type = Option<String>, example = "owner")]
    pub role: Option<Role>,
    /// Documents in the space.
    pub docs: Vec<String>,
    /// Connected peers that proved membership.
    pub peers: Vec<String>,
}

/// A member as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MemberInfo {
    /// Device id.
    pub device: String,
    /// Role: `owner`, `editor` or `viewer`.
    #[schema(value_type = String, example = "editor")]
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

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// Requests to the engine.
#[derive(Debug)]
pub(crate) enum Command {
    /// Tests only: how many sync states the engine holds.
    SyncStates(tokio::sync::oneshot::Sender<SyncStates>),
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
    /// Changes a local app wrote (automerge-repo storage bytes: a saved
    /// document or changes); answers how many were new.
    AppChanges {
        space: SpaceId,
        doc: DocId,
        bytes: Vec<u8>,
        reply: Reply<usize>,
    },
    /// An ephemeral message from a local app, for the apps of the space's
    /// other devices (gossiped, never stored).
    Ephemeral {
        space: SpaceId,
        doc: DocId,
        data: Vec<u8>,
    },
    /// A document's saved bytes (`since: None`), or its changes since the
    /// given heads; `None` if it is not held.
    DocBytes {
        space: SpaceId,
        doc: DocId,
        since: Option<Vec<ChangeHash>>,
        reply: Reply<Option<Vec<u8>>>,
    },
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
    Revoke(String, DeviceId, Reply<Revoked>),
    Index(IndexCommand),
    Shutdown(oneshot::Sender<()>),
}

/// A cloneable way to ask the engine, for the node's other tasks.
#[derive(Clone, Debug)]
pub(crate) struct Client(pub(crate) mpsc::Sender<Command>);

impl Client {
    /// Sends a command built around a reply channel and waits for the answer.
    pub(crate) async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.0.send(make(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Asks an index question.
    pub(crate) async fn index<T>(&self, make: impl FnOnce(Reply<T>) -> IndexCommand) -> Result<T> {
        self.ask(|r| Command::Index(make(r))).await
    }

    /// Admitted, connected peers of a space.
    pub(crate) async fn peers(&self, space: SpaceId) -> Result<Vec<PeerId>> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Command::Index(IndexCommand::Peers { space, reply: tx }))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Whether `peer` may exchange `space`'s blobs.
    pub(crate) async fn admitted(&self, peer: PeerId, space: SpaceId) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .0
            .send(Command::Index(IndexCommand::Admitted {
                peer,
                space,
                reply: tx,
            }))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }
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
    /// The peer whose heads summary named a document this device did not
    /// hold: such gaps count against that peer's share.
    opened_by: Option<PeerId>,
}

/// Changes just taken from a peer: their bytes, to store, and their
/// authors, for watchers.
#[derive(Debug, Default)]
pub(super) struct Applied {
    raw: Vec<Vec<u8>>,
    authors: Vec<String>,
    /// Commit times (Unix milliseconds), for the sync lag metric.
    times: Vec<i64>,
}

impl Applied {
    fn new(
        raw: Vec<Vec<u8>>,
        changes: &[Change],
        vouchers: &std::collections::HashMap<ChangeHash, DeviceId>,
    ) -> Self {
        let times = changes.iter().map(|c| c.timestamp()).collect();
        let mut authors: Vec<String> = changes
            .iter()
            .filter_map(|c| match vouchers.get(&c.hash()) {
                Some(d) => Some(d.clone()),
                None => shoal_protocol::actor::device_of(c.actor_id()).ok(),
            })
            .map(|d| d.to_string())
            .collect();
        authors.sort();
        authors.dedup();
        Self {
            raw,
            authors,
            times,
        }
    }
}

/// Most ephemeral messages a member's apps may send per second; more are
/// dropped (not passed on), so a flood cannot crowd out the node's events.
pub(crate) const MAX_EPHEMERAL_PER_SEC: u32 = 64;

/// Gossiped changes of one document in this turn, who vouched for each, and
/// the peers they came from.
type GossipBatch = (Vec<Change>, HashMap<ChangeHash, DeviceId>, HashSet<PeerId>);

/// Raw local changes of one document in this turn, and its heads after them.
type LocalChanges = (Vec<Vec<u8>>, Vec<ChangeHash>);

/// Work a loop turn leaves for after the flush.
type Ack = Box<dyn FnOnce(Option<String>) + Send>;

pub(crate) struct Engine {
    me: DeviceId,
    my_peer: PeerId,
    /// The device key: signs every change this device makes.
    keypair: libp2p::identity::Keypair,
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
    gossip_batch: BTreeMap<(SpaceId, DocId), GossipBatch>,
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
    /// Open gaps about unknown documents, by the peer that named them.
    unknown_gaps: HashMap<PeerId, usize>,
    /// When each member device was last connected (unix seconds).
    last_seen: HashMap<PeerId, u64>,
    /// Local changes of this turn, published together per document.
    local_batch: BTreeMap<(SpaceId, DocId), LocalChanges>,
    anti_entropy: Duration,
    /// Tests only: publish nothing on gossip.
    drop_gossip: bool,
    /// Ephemeral messages taken per member in the current second (see
    /// [`MAX_EPHEMERAL_PER_SEC`]).
    ephemeral_rate: HashMap<DeviceId, (Instant, u32)>,
    redial: Duration,
    counters: std::sync::Arc<crate::metrics::NodeCounters>,
    /// The DHT rendezvous keys last handed to the network.
    rendezvous: Vec<[u8; 32]>,
    /// Bumped on every change to any space's members; the blob server
    /// drops its cached admissions when it moves.
    members_generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn device_of_peer(p: &PeerId) -> Result<DeviceId> {
    Ok(DeviceId::from_bytes(p.to_bytes())?)
}

/// Whether `sig` is `author`'s signature of change `hash` in `space`. The
/// author's public key is inside its device id (an identity-multihash
/// libp2p peer id).
fn verify_change_sig(
    space: &SpaceId,
    doc: &DocId,
    author: &DeviceId,
    hash: &[u8; 32],
    sig: &[u8],
) -> bool {
    let Ok(peer) = PeerId::from_bytes(author.as_bytes()) else {
        return false;
    };
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 || sig.len() > wire::MAX_SIG_LEN {
        return false;
    }
    match libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()) {
        Ok(pk) => pk.verify(&wire::change_sig_message(space, doc, hash), sig),
        Err(_) => false,
    }
}

/// The device whose signature `entry` is on `change`, if it verifies: the
/// change's own device for a device's change, the vouching device for an
/// app's (see `shoal_protocol::actor`).
fn verify_sig(space: &SpaceId, doc: &DocId, change: &Change, entry: &[u8]) -> Option<DeviceId> {
    let hash = change.hash().0;
    if shoal_protocol::actor::is_app_actor(change.actor_id()) {
        let (signer, sig) = wire::split_vouch(entry)?;
        verify_change_sig(space, doc, &signer, &hash, sig).then_some(signer)
    } else {
        let author = shoal_protocol::actor::device_of(change.actor_id()).ok()?;
        verify_change_sig(space, doc, &author, &hash, entry).then_some(author)
    }
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
        keypair: libp2p::identity::Keypair,
        config: &crate::config::NodeConfig,
        store: Store,
        net: NetHandle,
        events: broadcast::Sender<Event>,
        x25519: [u8; 32],
        counters: std::sync::Arc<crate::metrics::NodeCounters>,
    ) -> Result<Self> {
        let (anti_entropy, redial) = (config.anti_entropy, config.redial);
        let mut e = Self {
            me: device_of_peer(&keypair.public().to_peer_id())?,
            my_peer: keypair.public().to_peer_id(),
            keypair,
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
            unknown_gaps: HashMap::new(),
            awaiting_members: HashMap::new(),
            last_seen: HashMap::new(),
            gaps: HashMap::new(),
            anti_entropy,
            drop_gossip: config.drop_gossip,
            ephemeral_rate: HashMap::new(),
            redial,
            counters,
            members_generation: Default::default(),
            rendezvous: Vec::new(),
        };
        for grant in e.store.spaces()? {
            e.load_space(grant)?;
        }
        Ok(e)
    }

    /// Hands the network our spaces' rendezvous keys when they changed (a
    /// space created, joined or left, a key rotated). Keys of the current
    /// epoch only: a revoked device cannot compute them.
    fn update_rendezvous(&mut self, outbox: &mut Vec<NetCommand>) {
        let mut keys: Vec<[u8; 32]> = self
            .spaces
            .iter()
            .map(|(id, s)| {
                let (epoch, key) = s.current();
                key.rendezvous(id, epoch)
            })
            .collect();
        keys.sort_unstable();
        if keys != self.rendezvous {
            self.rendezvous = keys.clone();
            outbox.push(NetCommand::Rendezvous(keys));
        }
    }

    /// The blob index on the engine's store, for the folder workers.
    pub(crate) fn blobs(&self) -> Result<crate::store::Blobs> {
        self.store.blobs()
    }

    /// The counter bumped on every change to any space's members.
    pub(crate) fn members_generation(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        std::sync::Arc::clone(&self.members_generation)
    }

    fn load_space(&mut self, grant: SpaceGrant) -> Result<()> {
        let space = grant.space;
        let mut docs = BTreeMap::new();
        for id in self.store.doc_ids(&space)? {
            let stored = self.store.load_doc(&space, &id)?;
            let mut doc = match &stored.snapshot {
                Some(s) => shoal_protocol::sync::load_stored(s).map_err(|e| Error::Corrupt {
                    key: format!("snapshot of document {id} in space {}", space.short()),
                    reason: format!("{e} (left as it is on disk)"),
                })?,
                None => AutoCommit::new(),
            };
            for chunk in &stored.log {
                // Parsed on its own first (a panic of Automerge's parser is
                // caught there), then applied to the document.
                let loaded = shoal_protocol::sync::stored_changes(chunk).and_then(|changes| {
                    doc.apply_changes(changes)
                        .map_err(shoal_protocol::Error::from)
                });
                if let Err(e) = loaded {
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
            None => Roster::new(grant.creator.clone()),
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
        self.update_rendezvous(outbox);
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
            // after a successful flush; otherwise the request fails and the
            // joiner retries.
            let after = std::mem::take(&mut self.after_flush);
            if err.is_none() {
                for cmd in after {
                    if self.net.send(cmd).await.is_err() {
                        break;
                    }
                }
            }
        }
    }

    fn emit(&self, ev: Event) {
        let c = &self.counters;
        let n = match &ev {
            Event::DocChanged {
                origin: Origin::Local | Origin::App,
                ..
            } => Some(&c.doc_updates_local),
            Event::DocChanged { .. } => Some(&c.doc_updates_remote),
            Event::Rejected { .. } => Some(&c.rejected),
            _ => None,
        };
        if let Some(n) = n {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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
                .filter(|(d, st)| {
                    !d.is_members() && !shoal_protocol::files::is_index(d) && !st.doc.is_empty()
                })
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
            Command::AppChanges {
                space,
                doc,
                bytes,
                reply,
            } => {
                let r = self.app_changes(space, &doc, &bytes);
                if let Err(e) = &r {
                    self.emit(Event::AppRefused {
                        space,
                        doc: doc.clone(),
                        reason: e.to_string(),
                    });
                }
                self.ack_after_flush(reply, r);
            }
            Command::Ephemeral { space, doc, data } => {
                self.publish_ephemeral(space, doc, data, outbox);
            }
            Command::DocBytes {
                space,
                doc,
                since,
                reply,
            } => {
                let _ = reply.send(Ok(self.doc_bytes(&space, &doc, since.as_deref())));
            }
            Command::SyncStates(reply) => {
                let _ = reply.send(SyncStates {
                    sessions: self.sessions.len(),
                    responders: self.responders.len(),
                    gaps: self.gaps.len(),
                    docs: self.spaces.values().map(|s| s.docs.len()).sum(),
                });
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
            Command::Index(cmd) => self.on_index_command(cmd),
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

    /// Keeps changes' signatures, so this node can relay them by sync.
    fn store_sigs(&self, sigs: &[([u8; 32], Vec<u8>)]) {
        if let Err(e) = self
            .store
            .put_sigs(sigs.iter().map(|(h, s)| (h, s.as_slice())))
        {
            warn!(error = %e, "cannot store change signatures");
        }
    }

    /// Checks who vouches for the app changes of one message: one device
    /// per app actor, the device the actor is bound to if it is, and if it
    /// is not, the message must hold the actor's first change (seq 1),
    /// whose voucher then owns it. `Err((gap, why))`: `gap` when the
    /// actor's first change is simply not here yet (a device that missed
    /// it), which is no fault of the sender's.
    fn check_app_actors(
        &self,
        space: &SpaceId,
        changes: &[Change],
        vouchers: &HashMap<ChangeHash, DeviceId>,
    ) -> std::result::Result<(), (bool, String)> {
        let mut owners: HashMap<automerge::ActorId, (DeviceId, bool)> = HashMap::new();
        for c in changes
            .iter()
            .filter(|c| shoal_protocol::actor::is_app_actor(c.actor_id()))
        {
            let Some(by) = vouchers.get(&c.hash()) else {
                return Err((false, format!("app change {} has no vouch", c.hash())));
            };
            let e = owners
                .entry(c.actor_id().clone())
                .or_insert((by.clone(), false));
            if e.0 != *by {
                return Err((
                    false,
                    format!(
                        "app actor {} is vouched for by both {} and {} in one message",
                        c.actor_id(),
                        e.0.short(),
                        by.short()
                    ),
                ));
            }
            e.1 |= c.seq() == 1;
        }
        for (actor, (by, has_first)) in owners {
            match self.store.app_actor(space, &actor) {
                Ok(Some(bound)) if bound != by => {
                    return Err((
                        false,
                        format!(
                            "app actor {actor} belongs to {}, not to {}",
                            bound.short(),
                            by.short()
                        ),
                    ))
                }
                Ok(Some(_)) => {}
                Ok(None) if has_first => {}
                Ok(None) => {
                    return Err((
                        true,
                        format!("app actor {actor}: its first change is not here yet"),
                    ))
                }
                Err(e) => return Err((true, format!("cannot read app actors: {e}"))),
            }
        }
        Ok(())
    }

    /// Records which device each app actor of `changes` that is now in
    /// `doc` belongs to (the first binding stays).
    fn bind_app_actors(
        &mut self,
        space: &SpaceId,
        doc: &DocId,
        changes: &[Change],
        vouchers: &HashMap<ChangeHash, DeviceId>,
    ) {
        let Some(d) = self.spaces.get_mut(space).and_then(|s| s.docs.get_mut(doc)) else {
            return;
        };
        let held: Vec<(automerge::ActorId, DeviceId)> = changes
            .iter()
            .filter(|c| shoal_protocol::actor::is_app_actor(c.actor_id()))
            .filter(|c| d.doc.get_change_by_hash(&c.hash()).is_some())
            .filter_map(|c| Some((c.actor_id().clone(), vouchers.get(&c.hash())?.clone())))
            .collect();
        for (actor, by) in held {
            if let Err(e) = self.store.bind_app_actor(space, &actor, &by) {
                warn!(error = %e, "cannot record an app actor's device");
            }
        }
    }

    /// The signatures a batch of this device's changes travels with: the
    /// last change under this device's own actor is signed (it vouches for
    /// the earlier ones), and each app change gets this device's vouch.
    /// Kept, so sync can relay them.
    fn sign_batch(&self, space: &SpaceId, doc: &DocId, raw: &[Vec<u8>]) -> Vec<wire::ChangeSig> {
        let parsed: Vec<Change> = raw
            .iter()
            .filter_map(|c| Change::try_from(c.as_slice()).ok())
            .collect();
        let mut sigs = Vec::new();
        let mut tip = None;
        for c in &parsed {
            if shoal_protocol::actor::is_app_actor(c.actor_id()) {
                let sig = self.sign_change(space, doc, &c.hash());
                sigs.push((c.hash().0, wire::vouch(&self.me, &sig)));
            } else {
                tip = Some(c.hash());
            }
        }
        if let Some(t) = tip {
            sigs.push((t.0, self.sign_change(space, doc, &t)));
        }
        self.store_sigs(&sigs);
        sigs
    }

    fn sign_change(&self, space: &SpaceId, doc: &DocId, hash: &ChangeHash) -> Vec<u8> {
        // Signing with an in-memory ed25519 key cannot fail.
        self.keypair
            .sign(&wire::change_sig_message(space, doc, &hash.0))
            .unwrap_or_default()
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
            return Err(Error::MembersUnknown);
        }
        s.roster
            .check(doc, &self.me)
            .map_err(|e| Error::Forbidden(e.to_string()))?;
        let d = s.docs.entry(doc.clone()).or_insert(fresh);
        if let Err(e) = f(&mut d.doc) {
            d.doc.rollback();
            return Err(e.into());
        }
        // Stamped in milliseconds (Automerge's time is advisory; shoal
        // reads it for the sync lag metric).
        d.doc
            .commit_with(CommitOptions::default().with_time(crate::metrics::unix_millis()));
        let change = d
            .doc
            .get_last_local_change()
            .map(|c| (c.hash(), c.raw_bytes().to_vec()));
        let heads = d.doc.get_heads();
        // Persisted (one store write per document) and published (one
        // gossip message per document) at the end of the turn.
        if doc.is_members() {
            self.refresh_roster(id);
        }
        if let Some((_, c)) = change {
            // Signed (the batch's last change) when published.
            let slot = self.local_batch.entry((id, doc.clone())).or_default();
            slot.0.push(c);
            slot.1 = heads.clone();
        }
        self.emit(Event::DocChanged {
            space: id.to_owned(),
            doc: doc.to_owned(),
            origin: Origin::Local,
            heads: hex_heads(&heads),
            authors: vec![self.me.to_string()],
        });
        Ok(hex_heads(&heads))
    }

    fn refresh_roster(&mut self, id: SpaceId) {
        if let Some(s) = self.spaces.get_mut(&id) {
            if let Some(d) = s.docs.get(&DocId::members()) {
                s.roster = Roster::read(s.grant.creator.clone(), &d.doc);
            }
        }
        self.members_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
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
        // save() leaves out changes still waiting for their dependencies:
        // compact only when none wait, or they would be lost from disk.
        if d.log_len >= COMPACT_AFTER && d.doc.get_missing_deps(&[]).is_empty() {
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

    // ----- network --------------------------------------------------------

    fn on_net(&mut self, ev: NetEvent, outbox: &mut Vec<NetCommand>) {
        match ev {
            NetEvent::Connected { peer } => {
                self.peers.entry(peer).or_default();
                self.emit(Event::PeerConnected {
                    peer: peer.to_owned(),
                });
                self.send_hello(peer, false, outbox);
                self.drive_joins(outbox);
            }
            NetEvent::Refused { peer, reason } => {
                self.emit(Event::Rejected {
                    peer: peer.to_owned(),
                    reason,
                });
            }
            NetEvent::Disconnected { peer } => {
                self.net.budget().set_member(peer, false);
                // Remembered for members only, so strangers cannot grow it.
                if self
                    .peers
                    .remove(&peer)
                    .is_some_and(|e| !e.proven.is_empty())
                {
                    self.last_seen.insert(peer, pairing::now_secs());
                }
                self.unadmitted.retain(|(p, _)| *p != peer);
                self.sessions.retain(|(p, _, _), _| *p != peer);
                self.responders.retain(|(p, _, _), _| *p != peer);
                self.emit(Event::PeerDisconnected {
                    peer: peer.to_owned(),
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
                            peer: propagation.to_owned(),
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
                                peer: peer.to_owned(),
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

    fn is_proven(&self, peer: &PeerId, space: &SpaceId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.proven.contains(space))
    }

    // ----- sync sessions -------------------------------------------------
}
