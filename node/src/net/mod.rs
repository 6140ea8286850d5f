//! The network actor: one task owns the libp2p swarm and runs a `select!`
//! loop over swarm events and a bounded command channel. Everything else
//! talks to it through [`NetHandle`]; it reports what it sees as
//! [`NetEvent`]s on a bounded channel that it never blocks on (a full
//! channel drops gossip, which the sync protocol recovers, and refuses
//! inbound requests as busy). It stops on [`NetHandle::shutdown`] or when
//! every handle is gone.

pub mod behaviour;
pub mod budget;
pub mod codec;
mod reach;
mod readahead;
mod tls;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId, TopicHash};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, kad, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use self::behaviour::{Behaviour, BehaviourEvent};
use crate::config::NodeConfig;
use crate::error::{Error, Result};

/// Capacity of the command channel into the network actor.
pub const COMMAND_CAPACITY: usize = 1024;
/// Capacity of the event channel out of the network actor.
pub const EVENT_CAPACITY: usize = 8192;
/// Most control events held back while the engine is busy.
const BACKLOG_CAPACITY: usize = 65_536;
/// How long `start` waits for the listeners to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed pings in a row (15 s apart, 20 s each) after which a connection
/// is taken for dead and closed.
const PING_FAILURES_TO_CLOSE: u32 = 2;

/// Id of an inbound request awaiting our answer.
pub type InboundId = u64;

/// shoal's own request-response protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// `/shoal/hello/1`
    Hello,
    /// `/shoal/sync/1`
    Sync,
    /// `/shoal/invite/1`
    Invite,
}

/// What the network saw.
#[derive(Debug)]
pub enum NetEvent {
    /// First connection to a peer.
    Connected {
        /// The peer.
        peer: PeerId,
    },
    /// A peer's request was refused unread: over its frame limit or its
    /// byte budget.
    Refused {
        /// The peer.
        peer: PeerId,
        /// Why, for the `rejected` event.
        reason: String,
    },
    /// Last connection to a peer closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A peer told us where it listens.
    Identified {
        /// The peer.
        peer: PeerId,
        /// Its listen addresses.
        listen_addrs: Vec<Multiaddr>,
    },
    /// A gossip message that awaits our validation verdict.
    Gossip {
        /// Gossipsub's id of the message.
        id: MessageId,
        /// The neighbour that forwarded it.
        propagation: PeerId,
        /// The signed author.
        source: Option<PeerId>,
        /// Its topic.
        topic: TopicHash,
        /// The sealed payload, held to the forwarding neighbour's budget
        /// until dropped.
        data: budget::Frame,
    },
    /// A request on one of our protocols.
    Request {
        /// Which protocol.
        proto: Proto,
        /// The peer.
        peer: PeerId,
        /// Answer with [`NetCommand::Respond`].
        id: InboundId,
        /// Request bytes, held to the peer's budget until dropped.
        data: budget::Frame,
    },
    /// The answer to our request.
    Response {
        /// Which protocol.
        proto: Proto,
        /// The peer.
        peer: PeerId,
        /// Our tag from [`NetCommand::Send`].
        tag: u64,
        /// Response bytes, or why there are none.
        result: std::result::Result<budget::Frame, String>,
    },
}

/// A connected peer as the network sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PeerInfo {
    /// Its device id.
    pub peer: String,
    /// Remote addresses of its connections.
    pub addrs: Vec<String>,
    /// Last ping round trip in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Every connection to it goes through a relay.
    pub relayed: bool,
}

/// Our own network state.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NetInfo {
    /// Our device id.
    pub peer_id: String,
    /// Addresses we listen on, with `/p2p/<id>`.
    #[schema(value_type = Vec<String>)]
    pub listen_addrs: Vec<Multiaddr>,
    /// Connected peers.
    pub peers: Vec<PeerInfo>,
    /// What AutoNAT concluded: `public`, `private` or `unknown`.
    pub reachability: String,
    /// Addresses others confirmed they can reach us on (a relayed one
    /// while a reservation holds).
    #[schema(value_type = Vec<String>)]
    pub external_addrs: Vec<Multiaddr>,
    /// Configured bootstrap nodes and whether we are connected to each.
    pub bootstrap: Vec<reach::BootstrapInfo>,
    /// Relay reservations we asked for.
    pub reservations: Vec<reach::ReservationInfo>,
}

/// Commands to the network actor.
#[derive(Debug)]
pub enum NetCommand {
    /// Dial an address.
    Dial(Multiaddr, oneshot::Sender<Result<()>>),
    /// Our listen addresses and peers.
    Info(oneshot::Sender<NetInfo>),
    /// Join a gossip topic.
    Subscribe(String),
    /// Leave a gossip topic.
    Unsubscribe(String),
    /// Publish on a topic (best effort).
    Publish {
        /// Topic name.
        topic: String,
        /// Sealed payload.
        data: Vec<u8>,
    },
    /// Our verdict on a gossip message.
    Validate {
        /// Message id.
        id: MessageId,
        /// Who forwarded it.
        propagation: PeerId,
        /// Accept, reject (penalise) or ignore.
        acceptance: MessageAcceptance,
    },
    /// Send a request.
    Send {
        /// Which protocol.
        proto: Proto,
        /// To whom.
        peer: PeerId,
        /// Echoed in the response event.
        tag: u64,
        /// Request bytes.
        data: Vec<u8>,
    },
    /// Answer a request.
    Respond {
        /// Which protocol.
        proto: Proto,
        /// From [`NetEvent::Request`].
        id: InboundId,
        /// Response bytes.
        data: Vec<u8>,
    },
    /// Dial a peer by id alone (mDNS and the DHT supply addresses), and ask
    /// the DHT where it is.
    Find(PeerId),
    /// The DHT rendezvous keys of our spaces: announce ourselves under each
    /// and look up the other providers, dialling those not connected.
    Rendezvous(Vec<[u8; 32]>),
    /// Stop the actor.
    Shutdown(oneshot::Sender<()>),
}

/// Cheap, cloneable handle to the network actor.
#[derive(Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<NetCommand>,
    peer_id: PeerId,
    streams: libp2p_stream::Control,
    budget: budget::Budget,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl NetHandle {
    /// Our peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Opens and accepts raw streams (bulk data), without going through the
    /// actor.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// What each peer's request frames may hold; told who is a member.
    pub fn budget(&self) -> &budget::Budget {
        &self.budget
    }

    /// Sends a command; fails only when the actor has stopped.
    pub async fn send(&self, cmd: NetCommand) -> Result<()> {
        self.tx.send(cmd).await.map_err(|_| Error::Stopped)
    }

    /// Dials `addr`.
    pub async fn dial(&self, addr: Multiaddr) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(NetCommand::Dial(addr, tx)).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Listen addresses and connected peers.
    pub async fn info(&self) -> Result<NetInfo> {
        let (tx, rx) = oneshot::channel();
        self.send(NetCommand::Info(tx)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Stops the actor and waits for it.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(NetCommand::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Builds the swarm, starts listening, and spawns the actor. Returns once
/// every listener has an address.
pub(crate) async fn spawn(
    key: Keypair,
    config: &NodeConfig,
    metrics: &crate::metrics::Metrics,
    supervisor: &crate::supervise::Supervisor,
) -> Result<(NetHandle, mpsc::Receiver<NetEvent>)> {
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAPACITY);
    let budget = budget::Budget::default();
    budget.report_to(&ev_tx);
    let mut swarm = build_swarm(key, config, metrics, &budget)?;
    listen_all(&mut swarm, &config.listen).await?;
    for addr in &config.peers {
        if let Err(e) = swarm.dial(dial_opts(addr)) {
            warn!(%addr, error = %e, "dial failed");
        }
    }
    let reach = reach::Reach::new(config);
    reach.dial_bootstrap(&mut swarm);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
    let peer_id = *swarm.local_peer_id();
    let streams = swarm.behaviour().stream.new_control();
    let actor = Actor {
        swarm,
        events: ev_tx,
        inbound: HashMap::new(),
        outbound: HashMap::new(),
        next_inbound: 0,
        backlog: std::collections::VecDeque::new(),
        peers: HashMap::new(),
        ping_failures: HashMap::new(),
        bootstrapped: false,
        reach,
        metrics: metrics
            .with_registry(|r| libp2p::metrics::Metrics::new(r.sub_registry_with_prefix("libp2p"))),
        counters: std::sync::Arc::clone(&metrics.node),
        budget: budget.clone(),
    };
    supervisor.spawn("network", actor.run(cmd_rx));
    Ok((
        NetHandle {
            tx: cmd_tx,
            peer_id,
            streams,
            budget,
        },
        ev_rx,
    ))
}

/// The label of gossip payloads in [`crate::metrics::Traffic`]: messages
/// we publish and receive, counted once each (not per peer sent to).
const GOSSIP: &str = "gossipsub";

/// Starts listening on every address and waits until each listener
/// reports one, so callers can read real ports (tests bind port 0).
/// Returns the addresses reported. Shared by devices and relays.
pub(crate) async fn listen_all<B: libp2p::swarm::NetworkBehaviour>(
    swarm: &mut Swarm<B>,
    listen: &[Multiaddr],
) -> Result<Vec<Multiaddr>> {
    for addr in listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| Error::Network(format!("cannot listen on {addr}: {e}")))?;
    }
    let mut addrs = Vec::new();
    let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
    while addrs.len() < listen.len() {
        match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                info!(%address, "listening");
                addrs.push(address);
            }
            Ok(SwarmEvent::ListenerError { error, .. })
            | Ok(SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            }) => {
                return Err(Error::Network(format!("listener failed: {error}")));
            }
            Ok(_) => {}
            Err(_) => return Err(Error::Network("listeners did not come up in time".into())),
        }
    }
    Ok(addrs)
}

/// Builds a shoal swarm (TCP+TLS or Noise+Yamux, QUIC, DNS, relayed circuits) for
/// `key`, its bytes per transport and per protocol counted into `metrics`,
/// its peers' request frames held to `budget`. Public so tests can drive a
/// raw swarm as a hostile peer.
pub fn build_swarm(
    key: Keypair,
    config: &NodeConfig,
    metrics: &crate::metrics::Metrics,
    budget: &budget::Budget,
) -> Result<Swarm<Behaviour>> {
    let idle = config.idle_timeout;
    let traffic = &metrics.node.traffic;
    let builder = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic()
        .with_other_transport(tcp_transport)
        .map_err(|e| Error::Network(format!("tcp transport: {e}")))?
        .with_dns()
        .map_err(|e| Error::Network(format!("dns: {e}")))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| Error::Network(format!("relay transport: {e}")))?;
    metrics.with_registry(|r| {
        Ok(builder
            .with_bandwidth_metrics(r) // registers as libp2p_bandwidth_bytes
            .with_behaviour(|key, relay| {
                Behaviour::new(key, relay, config, traffic, budget).map_err(Box::from)
            })
            .map_err(|e| Error::Network(format!("behaviour: {e}")))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build())
    })
}

/// TCP with TLS (AES-GCM preferred) or Noise, and Yamux; the socket read
/// in large gulps ([`readahead`]) under the security layer.
fn tcp_transport(key: &Keypair) -> std::result::Result<TcpTransport, BoxError> {
    use libp2p::core::muxing::StreamMuxerBox;
    use libp2p::core::upgrade::Version;
    use libp2p::Transport as _;
    Ok(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
            .map(|socket, _| readahead::ReadAhead::new(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(tls::Security::new(key)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    )
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TcpTransport = libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>;

/// Dial options for an address: a fresh source port always, since two
/// nodes that dial each other at once with port reuse end up in one TCP
/// simultaneous open, which the security handshake refuses.
///
/// A dial to a known peer goes ahead while another dial to it is under way
/// (that one may be to a stale address), but not when already connected.
fn dial_opts(addr: &Multiaddr) -> DialOpts {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => DialOpts::peer_id(peer)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Disconnected)
            .addresses(vec![addr.clone()])
            .allocate_new_port()
            .build(),
        _ => DialOpts::unknown_peer_id()
            .address(addr.clone())
            .allocate_new_port()
            .build(),
    }
}

/// Sleeps until `t`, or forever without one.
async fn sleep_until_some(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn rr(b: &mut Behaviour, proto: Proto) -> &mut codec::PeerAware {
    match proto {
        Proto::Hello => &mut b.hello,
        Proto::Sync => &mut b.sync,
        Proto::Invite => &mut b.invite,
    }
}

#[derive(Default)]
struct PeerState {
    /// Open connections and their remote addresses.
    conns: Vec<(libp2p::swarm::ConnectionId, Multiaddr, bool)>,
    rtt: Option<Duration>,
}

impl PeerState {
    fn relayed(&self) -> bool {
        !self.conns.is_empty() && self.conns.iter().all(|(_, _, relayed)| *relayed)
    }
}

struct Actor {
    swarm: Swarm<Behaviour>,
    events: mpsc::Sender<NetEvent>,
    inbound: HashMap<InboundId, (Proto, ResponseChannel<budget::Frame>)>,
    /// Keyed by protocol too: each request-response behaviour numbers its
    /// requests on its own, so ids of different protocols collide.
    outbound: HashMap<(Proto, OutboundRequestId), u64>,
    next_inbound: InboundId,
    /// Control events waiting for room in the event channel.
    backlog: std::collections::VecDeque<NetEvent>,
    peers: HashMap<PeerId, PeerState>,
    /// Failed pings in a row, per connection.
    ping_failures: HashMap<libp2p::swarm::ConnectionId, u32>,
    bootstrapped: bool,
    /// Bootstrap nodes, relay reservations, DHT rendezvous.
    reach: reach::Reach,
    /// libp2p's own metrics.
    metrics: libp2p::metrics::Metrics,
    counters: std::sync::Arc<crate::metrics::NodeCounters>,
    /// What each peer's frames may hold (requests and gossip alike).
    budget: budget::Budget,
}

impl Actor {
    async fn run(mut self, mut commands: mpsc::Receiver<NetCommand>) {
        let mut tick = tokio::time::interval(self.reach.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let events = self.events.clone();
            let waiting = !self.backlog.is_empty();
            tokio::select! {
                // Control events that found the channel full go out as soon
                // as the engine makes room, in order.
                permit = events.reserve(), if waiting => {
                    if let (Ok(permit), Some(ev)) = (permit, self.backlog.pop_front()) {
                        permit.send(ev);
                    }
                }
                cmd = commands.recv() => match cmd {
                    Some(NetCommand::Shutdown(done)) => {
                        let _ = done.send(());
                        break;
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                _ = tick.tick() => self.on_reach_tick(),
                _ = sleep_until_some(self.reach.next_close()) => self.close_due(),
            }
        }
        debug!("network actor stopped");
    }

    /// Hands a control event (connections, responses) to the engine without
    /// waiting; if the channel is full it waits in a bounded backlog instead
    /// of being lost.
    fn emit_control(&mut self, ev: NetEvent) {
        if self.backlog.is_empty() {
            match self.emit(ev) {
                Ok(()) => {}
                Err(ev) => self.backlog.push_back(*ev),
            }
        } else if self.backlog.len() < BACKLOG_CAPACITY {
            self.backlog.push_back(ev);
        } else {
            warn!("engine far behind: control event dropped");
        }
    }

    /// Hands an event to the engine without ever waiting; returns it back if
    /// the channel is full so the caller can refuse or drop it.
    fn emit(&self, ev: NetEvent) -> std::result::Result<(), Box<NetEvent>> {
        self.events.try_send(ev).map_err(|e| match e {
            mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => {
                Box::new(ev)
            }
        })
    }

    fn on_command(&mut self, cmd: NetCommand) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            NetCommand::Dial(addr, reply) => {
                let r = match self.swarm.dial(dial_opts(&addr)) {
                    // Already connected or dialing: what the caller wanted.
                    Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => Ok(()),
                    Err(e) => Err(Error::Network(format!("dial {addr}: {e}"))),
                };
                let _ = reply.send(r);
            }
            NetCommand::Info(reply) => {
                let me = *self.swarm.local_peer_id();
                let listen_addrs = self
                    .swarm
                    .listeners()
                    .map(|a| a.clone().with_p2p(me).unwrap_or_else(|a| a))
                    .collect();
                let peers = self
                    .peers
                    .iter()
                    .map(|(p, s)| PeerInfo {
                        peer: p.to_string(),
                        addrs: s.conns.iter().map(|(_, a, _)| a.to_string()).collect(),
                        rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                        relayed: s.relayed(),
                    })
                    .collect();
                let info = NetInfo {
                    peer_id: me.to_string(),
                    listen_addrs,
                    peers,
                    reachability: reach::reachability(&self.swarm),
                    external_addrs: self.swarm.external_addresses().cloned().collect(),
                    bootstrap: self.reach.bootstrap_info(&self.swarm),
                    reservations: self.reach.reservation_info(),
                };
                let _ = reply.send(info);
            }
            NetCommand::Subscribe(t) => {
                if let Err(e) = b.gossipsub.subscribe(&IdentTopic::new(t)) {
                    warn!(error = %e, "subscribe failed");
                }
            }
            NetCommand::Unsubscribe(t) => {
                b.gossipsub.unsubscribe(&IdentTopic::new(t));
            }
            NetCommand::Publish { topic, data } => {
                // Best effort: with no subscribed peer yet, the sync
                // protocol carries the change when one connects.
                let n = data.len();
                match b.gossipsub.publish(IdentTopic::new(topic), data) {
                    Ok(_) => self.counters.traffic.outbound(GOSSIP, n),
                    Err(e) => debug!(error = %e, "publish not sent"),
                }
            }
            NetCommand::Validate {
                id,
                propagation,
                acceptance,
            } => {
                b.gossipsub
                    .report_message_validation_result(&id, &propagation, acceptance);
            }
            NetCommand::Send {
                proto,
                peer,
                tag,
                data,
            } => {
                let id = rr(b, proto).send_request(&peer, data.into());
                self.outbound.insert((proto, id), tag);
            }
            NetCommand::Respond { proto, id, data } => {
                if let Some((p, ch)) = self.inbound.remove(&id) {
                    debug_assert_eq!(p, proto);
                    let _ = rr(b, p).send_response(ch, data.into());
                }
            }
            NetCommand::Find(peer) => {
                if let Some(kad) = b.kad.as_mut() {
                    kad.get_closest_peers(peer);
                }
                let opts = DialOpts::peer_id(peer).allocate_new_port().build();
                let _ = self.swarm.dial(opts);
            }
            NetCommand::Rendezvous(keys) => self.set_rendezvous(keys),
            NetCommand::Shutdown(_) => {}
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.metrics.record(&ev);
        match ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let st = self.peers.entry(peer_id).or_default();
                st.conns.push((
                    connection_id,
                    endpoint.get_remote_address().clone(),
                    endpoint.is_relayed(),
                ));
                self.prefer_direct(peer_id);
                if num_established.get() == 1 {
                    self.counters.peers.store(
                        self.peers.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    debug!(peer = %peer_id, "connected");
                    self.emit_control(NetEvent::Connected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.ping_failures.remove(&connection_id);
                if let Some(st) = self.peers.get_mut(&peer_id) {
                    st.conns.retain(|(c, _, _)| *c != connection_id);
                }
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                    self.counters.peers.store(
                        self.peers.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    debug!(peer = %peer_id, "disconnected");
                    self.emit_control(NetEvent::Disconnected { peer: peer_id });
                }
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour(ev),
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "reachable at");
                // Provider records carry our addresses: announce them again.
                self.reprovide();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self.on_listener_closed(listener_id, reason),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            _ => {}
        }
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        use libp2p::metrics::Recorder;
        match &ev {
            BehaviourEvent::Identify(e) => self.metrics.record(e),
            BehaviourEvent::Ping(e) => self.metrics.record(e),
            BehaviourEvent::Kad(e) => self.metrics.record(e),
            BehaviourEvent::Gossipsub(e) => self.metrics.record(e),
            BehaviourEvent::Dcutr(e) => self.metrics.record(e),
            _ => {}
        }
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let kad_proto = libp2p::StreamProtocol::new(shoal_protocol::wire::KAD_PROTOCOL);
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                    if info.protocols.contains(&kad_proto) {
                        for a in &info.listen_addrs {
                            kad.add_address(&peer_id, a.clone());
                        }
                        if !self.bootstrapped {
                            // The periodic bootstrap is every 5 minutes; start now.
                            self.bootstrapped = kad.bootstrap().is_ok();
                            if self.bootstrapped {
                                // The first DHT peer: announce and look now.
                                self.reprovide();
                                self.lookup();
                            }
                        }
                    }
                }
                self.on_identified(peer_id, &info);
                let _ = self.emit(NetEvent::Identified {
                    peer: peer_id,
                    listen_addrs: info.listen_addrs,
                });
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Ok(rtt),
            }) => {
                self.ping_failures.remove(&connection);
                if let Some(st) = self.peers.get_mut(&peer) {
                    st.rtt = Some(rtt);
                }
            }
            // A peer that does not speak ping is not a dead one.
            BehaviourEvent::Ping(ping::Event {
                result: Err(ping::Failure::Unsupported),
                ..
            }) => {}
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                // A link cut without a reset (a blackhole, a sleeping NAT)
                // leaves a TCP connection that looks open for many minutes,
                // and libp2p's ping does not close it: sync requests and
                // gossip vanish into it. Close it after a few failed pings;
                // the redial reconnects when the peer is reachable again.
                let n = self.ping_failures.entry(connection).or_insert(0);
                *n += 1;
                if *n >= PING_FAILURES_TO_CLOSE {
                    self.ping_failures.remove(&connection);
                    info!(%peer, error = %e, "closing a connection that stopped answering pings");
                    self.swarm.close_connection(connection);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if !self.swarm.is_connected(&peer) {
                        debug!(%peer, %addr, "mdns discovered");
                        // Both sides discover each other at once and dial.
                        let _ = self
                            .swarm
                            .dial(dial_opts(&addr.with_p2p(peer).unwrap_or_else(|a| a)));
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                debug!(%peer, "kad routing updated");
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        key,
                        providers,
                    })),
                ..
            }) => self.on_providers(&key, providers),
            BehaviourEvent::Autonat(libp2p::autonat::Event::StatusChanged { old, new }) => {
                info!(?old, ?new, "reachability changed");
                self.on_reachability();
            }
            BehaviourEvent::Relay(ev) => self.on_relay_client(ev),
            BehaviourEvent::Dcutr(libp2p::dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => info!(peer = %remote_peer_id, "hole punched: direct connection"),
                Err(e) => debug!(peer = %remote_peer_id, error = %e, "hole punch failed"),
            },
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.counters.traffic.inbound(GOSSIP, message.data.len());
                let held = self.budget.reserve(propagation_source, message.data.len());
                let sent = match held {
                    Ok(permit) => self
                        .emit(NetEvent::Gossip {
                            id: message_id,
                            propagation: propagation_source,
                            source: message.source,
                            topic: message.topic,
                            data: budget::Frame::reserved(message.data, permit),
                        })
                        .map_err(|ev| match *ev {
                            NetEvent::Gossip {
                                id, propagation, ..
                            } => Some((id, propagation)),
                            _ => None,
                        }),
                    Err(e) => {
                        debug!(peer = %propagation_source, error = %e, "gossip over budget");
                        Err(Some((message_id, propagation_source)))
                    }
                };
                if let Err(Some((id, propagation))) = sent {
                    // Dropped under load or over the neighbour's budget:
                    // gossip is best effort, the sync protocol and heads
                    // summaries recover it.
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &id,
                            &propagation,
                            MessageAcceptance::Ignore,
                        );
                }
            }
            BehaviourEvent::Hello(ev) => self.on_rr(ev, Proto::Hello),
            BehaviourEvent::Sync(ev) => self.on_rr(ev, Proto::Sync),
            BehaviourEvent::Invite(ev) => self.on_rr(ev, Proto::Invite),
            _ => {}
        }
    }

    fn on_rr(&mut self, ev: request_response::Event<budget::Frame, budget::Frame>, proto: Proto) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let id = self.next_inbound;
                    self.next_inbound += 1;
                    let ev = NetEvent::Request {
                        proto,
                        peer,
                        id,
                        data: request,
                    };
                    if self.emit(ev).is_ok() {
                        self.inbound.insert(id, (proto, channel));
                    } else if proto == Proto::Sync {
                        let busy = shoal_protocol::wire::encode(
                            &shoal_protocol::wire::SyncResponse::Refused {
                                reason: shoal_protocol::wire::RefuseReason::Busy,
                            },
                        );
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, busy.into());
                    }
                    // Otherwise the dropped channel tells the peer to retry.
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_outbound_done(peer, (proto, request_id), Ok(response)),
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => self.on_outbound_done(peer, (proto, request_id), Err(error.to_string())),
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_outbound_done(
        &mut self,
        peer: PeerId,
        id: (Proto, OutboundRequestId),
        result: std::result::Result<budget::Frame, String>,
    ) {
        let Some(tag) = self.outbound.remove(&id) else {
            return;
        };
        let ev = NetEvent::Response {
            proto: id.0,
            peer,
            tag,
            result,
        };
        self.emit_control(ev);
    }
}
