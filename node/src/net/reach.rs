//! Reaching members beyond the LAN: the configured bootstrap nodes, relay
//! reservations on them while we are not publicly reachable, and DHT
//! rendezvous under keys only members of a space can compute.
//!
//! All of it is state of the network actor; the methods here are the
//! actor's, kept apart from its message plumbing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::kad::{self, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{autonat, identify, relay, Multiaddr, PeerId, Swarm};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::behaviour::Behaviour;
use super::Actor;
use crate::config::{NodeConfig, RelayMode};

/// How long a relayed connection stays after a direct one came up, so that
/// requests and streams already on it finish.
const RELAYED_GRACE: Duration = Duration::from_secs(5);
/// Most relays we hold reservations on at once.
const MAX_RESERVATIONS: usize = 2;
/// Provider records are announced again every this many lookups (besides
/// whenever our reachable addresses change).
const REPROVIDE_EVERY: u64 = 30;
/// The reach tick: lookups back off from here.
const TICK: Duration = Duration::from_secs(1);
/// Bootstrap nodes we lost are dialled again every this many ticks.
const BOOTSTRAP_EVERY: u64 = 5;

/// A bootstrap node as `shoal doctor` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BootstrapInfo {
    /// Its configured address.
    pub addr: String,
    /// Connected now.
    pub connected: bool,
    /// It offers relay v2 (from identify).
    pub relay: bool,
}

/// A relay reservation as `shoal doctor` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReservationInfo {
    /// The relay's device id.
    pub relay: String,
    /// The relayed address others can dial us on.
    pub addr: String,
    /// The relay accepted it (false while asking).
    pub accepted: bool,
}

struct Reservation {
    listener: ListenerId,
    addr: Multiaddr,
    accepted: bool,
}

/// Bootstrap, reservation and rendezvous state.
pub(super) struct Reach {
    mode: RelayMode,
    interval: Duration,
    /// Configured bootstrap addresses by peer.
    bootstrap: Vec<(PeerId, Multiaddr)>,
    /// Bootstrap peers that said (identify) they are relays.
    relays: HashSet<PeerId>,
    reservations: HashMap<PeerId, Reservation>,
    /// Our spaces' rendezvous keys.
    keys: HashSet<RecordKey>,
    /// Ticks so far.
    ticks: u64,
    /// Lookups so far.
    lookups: u64,
    /// When the next rendezvous lookup runs, and the wait after it: one
    /// second after a key is added, doubling up to the configured interval
    /// (a member that announced itself a moment after our first lookup is
    /// found within seconds, and a lone device does not keep asking).
    next_lookup: tokio::time::Instant,
    lookup_delay: Duration,
    /// Relayed connections to close once their grace is over, oldest first.
    closing: Vec<(tokio::time::Instant, libp2p::swarm::ConnectionId)>,
}

/// AutoNAT's verdict in one word.
pub(super) fn reachability(swarm: &Swarm<Behaviour>) -> String {
    match swarm.behaviour().autonat.nat_status() {
        autonat::NatStatus::Public(_) => "public",
        autonat::NatStatus::Private => "private",
        autonat::NatStatus::Unknown => "unknown",
    }
    .into()
}

impl Reach {
    pub(super) fn new(config: &NodeConfig) -> Self {
        let bootstrap = config
            .bootstrap
            .iter()
            .filter_map(|a| match a.iter().last() {
                Some(Protocol::P2p(p)) => Some((p, a.clone())),
                _ => None,
            })
            .collect();
        Self {
            mode: config.reservations,
            interval: config.rendezvous,
            bootstrap,
            relays: HashSet::new(),
            reservations: HashMap::new(),
            keys: HashSet::new(),
            ticks: 0,
            lookups: 0,
            next_lookup: tokio::time::Instant::now(),
            lookup_delay: TICK,
            closing: Vec::new(),
        }
    }

    /// How often the actor's reach tick runs.
    pub(super) fn interval(&self) -> Duration {
        self.interval.min(TICK)
    }

    /// When the next relayed connection is due to close.
    pub(super) fn next_close(&self) -> Option<tokio::time::Instant> {
        self.closing.first().map(|(t, _)| *t)
    }

    /// Dials every bootstrap node we are not connected to. Port reuse stays
    /// on: the address a relay observes for us is then the one hole punching
    /// needs.
    pub(super) fn dial_bootstrap(&self, swarm: &mut Swarm<Behaviour>) {
        for (peer, addr) in &self.bootstrap {
            if swarm.is_connected(peer) {
                continue;
            }
            if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
                kad.add_address(peer, addr.clone());
            }
            swarm
                .behaviour_mut()
                .autonat
                .add_server(*peer, Some(addr.clone()));
            let opts = DialOpts::peer_id(*peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .addresses(vec![addr.clone()])
                .build();
            if let Err(e) = swarm.dial(opts) {
                debug!(%addr, error = %e, "bootstrap dial failed");
            }
        }
    }

    pub(super) fn bootstrap_info(&self, swarm: &Swarm<Behaviour>) -> Vec<BootstrapInfo> {
        self.bootstrap
            .iter()
            .map(|(p, a)| BootstrapInfo {
                addr: a.to_string(),
                connected: swarm.is_connected(p),
                relay: self.relays.contains(p),
            })
            .collect()
    }

    pub(super) fn reservation_info(&self) -> Vec<ReservationInfo> {
        self.reservations
            .iter()
            .map(|(p, r)| ReservationInfo {
                relay: p.to_string(),
                addr: r.addr.to_string(),
                accepted: r.accepted,
            })
            .collect()
    }

    fn wants_reservations(&self, swarm: &Swarm<Behaviour>) -> bool {
        match self.mode {
            RelayMode::Never => false,
            RelayMode::Always => true,
            RelayMode::Auto => !swarm.behaviour().autonat.nat_status().is_public(),
        }
    }
}

impl Actor {
    /// A peer told us what it speaks: a bootstrap node that is a relay may
    /// get a reservation.
    pub(super) fn on_identified(&mut self, peer: PeerId, info: &identify::Info) {
        if !self.reach.bootstrap.iter().any(|(p, _)| *p == peer) {
            return;
        }
        if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            self.reach.relays.insert(peer);
        }
        self.update_reservations();
    }

    /// AutoNAT changed its mind: take or drop reservations, and serve the
    /// DHT only when others can reach us.
    pub(super) fn on_reachability(&mut self) {
        let status = self.swarm.behaviour().autonat.nat_status();
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            match status {
                autonat::NatStatus::Public(_) => kad.set_mode(Some(kad::Mode::Server)),
                autonat::NatStatus::Private => kad.set_mode(Some(kad::Mode::Client)),
                autonat::NatStatus::Unknown => {}
            }
        }
        self.update_reservations();
    }

    /// Holds a reservation on up to [`MAX_RESERVATIONS`] connected relays
    /// while we want them, and drops them all when we do not.
    fn update_reservations(&mut self) {
        if !self.reach.wants_reservations(&self.swarm) {
            for (relay, r) in self.reach.reservations.drain() {
                info!(%relay, "publicly reachable: dropping the relay reservation");
                self.swarm.remove_listener(r.listener);
            }
            return;
        }
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .reach
            .bootstrap
            .iter()
            .filter(|(p, _)| {
                self.reach.relays.contains(p)
                    && self.swarm.is_connected(p)
                    && !self.reach.reservations.contains_key(p)
            })
            .cloned()
            .collect();
        for (relay, addr) in candidates {
            if self.reach.reservations.len() >= MAX_RESERVATIONS {
                break;
            }
            let circuit = addr.with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    debug!(%relay, "asking for a relay reservation");
                    self.reach.reservations.insert(
                        relay,
                        Reservation {
                            listener,
                            addr: circuit,
                            accepted: false,
                        },
                    );
                }
                Err(e) => warn!(%relay, error = %e, "cannot listen through the relay"),
            }
        }
    }

    pub(super) fn on_relay_client(&mut self, ev: relay::client::Event) {
        match ev {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                if let Some(r) = self.reach.reservations.get_mut(&relay_peer_id) {
                    r.accepted = true;
                }
                if !renewal {
                    info!(relay = %relay_peer_id, "relay reservation accepted");
                }
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                debug!(relay = %relay_peer_id, "relayed connection out");
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                debug!(peer = %src_peer_id, "relayed connection in");
            }
        }
    }

    /// A reservation ended (the relay went away or refused): forget it, so
    /// the next tick asks again.
    pub(super) fn on_listener_closed(
        &mut self,
        listener: ListenerId,
        reason: Result<(), std::io::Error>,
    ) {
        let relay = self
            .reach
            .reservations
            .iter()
            .find(|(_, r)| r.listener == listener)
            .map(|(p, _)| *p);
        if let Some(relay) = relay {
            self.reach.reservations.remove(&relay);
            match reason {
                Ok(()) => debug!(%relay, "relay reservation closed"),
                Err(e) => warn!(%relay, error = %e, "relay reservation lost"),
            }
        }
    }

    /// Once a direct connection to a peer exists, its relayed ones go (after
    /// a grace for what is in flight on them): the direct path carries
    /// everything from then on.
    pub(super) fn prefer_direct(&mut self, peer: PeerId) {
        let Some(st) = self.peers.get(&peer) else {
            return;
        };
        if st.conns.iter().all(|(_, _, relayed)| *relayed) {
            return;
        }
        let due = tokio::time::Instant::now() + RELAYED_GRACE;
        for (c, _, relayed) in &st.conns {
            if *relayed && !self.reach.closing.iter().any(|(_, x)| x == c) {
                debug!(%peer, "direct connection up: the relayed one closes soon");
                self.reach.closing.push((due, *c));
            }
        }
    }

    /// Closes the relayed connections whose grace is over.
    pub(super) fn close_due(&mut self) {
        let now = tokio::time::Instant::now();
        while let Some((t, c)) = self.reach.closing.first().copied() {
            if t > now {
                break;
            }
            self.reach.closing.remove(0);
            self.swarm.close_connection(c);
        }
    }

    /// The engine's current rendezvous keys: announce and look up new ones
    /// at once, stop announcing old ones.
    pub(super) fn set_rendezvous(&mut self, keys: Vec<[u8; 32]>) {
        let keys: HashSet<RecordKey> = keys.iter().map(RecordKey::new).collect();
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        for old in self.reach.keys.difference(&keys) {
            kad.stop_providing(old);
        }
        for new in keys.difference(&self.reach.keys) {
            if let Err(e) = kad.start_providing(new.clone()) {
                warn!(error = %e, "cannot announce a rendezvous key");
            }
            kad.get_providers(new.clone());
            self.reach.lookup_delay = TICK;
            self.reach.next_lookup = tokio::time::Instant::now() + TICK;
        }
        self.reach.keys = keys;
    }

    /// Announces every rendezvous key again (our addresses changed, or it is
    /// time).
    pub(super) fn reprovide(&mut self) {
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        for k in &self.reach.keys {
            if let Err(e) = kad.start_providing(k.clone()) {
                warn!(error = %e, "cannot announce a rendezvous key");
            }
        }
    }

    /// Looks up the other members under every rendezvous key.
    pub(super) fn lookup(&mut self) {
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        for k in &self.reach.keys {
            kad.get_providers(k.clone());
        }
    }

    /// The periodic turn: redial bootstrap nodes, keep reservations, look up
    /// members, and now and then announce ourselves again.
    pub(super) fn on_reach_tick(&mut self) {
        self.reach.ticks += 1;
        if self.reach.ticks.is_multiple_of(BOOTSTRAP_EVERY) {
            // A first dial can fail on a stale NAT mapping: try again soon.
            self.reach.dial_bootstrap(&mut self.swarm);
        }
        self.update_reservations();
        let now = tokio::time::Instant::now();
        if self.reach.keys.is_empty() || now < self.reach.next_lookup {
            return;
        }
        self.reach.lookup_delay = (self.reach.lookup_delay * 2).min(self.reach.interval);
        self.reach.next_lookup = now + self.reach.lookup_delay;
        self.reach.lookups += 1;
        if self.reach.lookups.is_multiple_of(REPROVIDE_EVERY) {
            self.reprovide();
        }
        self.lookup();
    }

    /// Providers of one of our keys are members of that space (or claim to
    /// be: the hello decides). Dial those we are not connected to; the DHT
    /// query still holds the addresses they announced.
    pub(super) fn on_providers(&mut self, key: &RecordKey, providers: HashSet<PeerId>) {
        if !self.reach.keys.contains(key) {
            return;
        }
        let me = *self.swarm.local_peer_id();
        for peer in providers {
            if peer == me || self.swarm.is_connected(&peer) {
                continue;
            }
            debug!(%peer, "rendezvous: found a member, dialling");
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %e, "rendezvous dial failed");
            }
        }
    }
}
