//! `shoal relay`: a bootstrap and relay node for devices that are not on one
//! LAN. It runs Kademlia in server mode under shoal's protocol name, relay
//! v2 as a server, AutoNAT as a server, identify and ping; it joins no
//! space and stores no user data. Everything it carries is Noise ciphertext
//! between the two devices.
//!
//! Limits are sized for sync, not for signalling (libp2p's defaults are
//! circuits of 2 minutes and 128 KiB), and they protect the operator:
//! per-peer and total caps on reservations, circuits and connections, and
//! per-peer and per-IP rate limits.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, connection_limits, identify, noise, ping, relay, tcp, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm,
};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::error::{Error, Result};
use shoal_protocol::wire::KAD_PROTOCOL;

/// Identify's protocol version for relay nodes.
pub const RELAY_IDENTIFY: &str = "/shoal/relay/1";

/// What a relay's config file holds; flags override it. Every field has a
/// default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Addresses to announce as reachable (default: the concrete listen
    /// addresses).
    pub external: Vec<String>,
    /// Where to serve Prometheus `/metrics` (none by default).
    pub metrics: Option<String>,
    /// Reservations held at once, in total.
    pub max_reservations: usize,
    /// Reservations one peer may hold.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the client renews it, seconds.
    pub reservation_secs: u64,
    /// Reservation requests one peer may make per minute.
    pub reservations_per_minute_per_peer: u32,
    /// Reservation requests one IP address may make per minute.
    pub reservations_per_minute_per_ip: u32,
    /// Circuits open at once, in total.
    pub max_circuits: usize,
    /// Circuits open at once with one peer at either end.
    pub max_circuits_per_peer: usize,
    /// Longest a circuit stays open, seconds.
    pub max_circuit_secs: u64,
    /// Most bytes one circuit carries (both directions).
    pub max_circuit_bytes: u64,
    /// Circuits one peer may open per minute.
    pub circuits_per_minute_per_peer: u32,
    /// Circuits one IP address may open per minute.
    pub circuits_per_minute_per_ip: u32,
    /// Connections at once, in total.
    pub max_connections: u32,
    /// Connections at once from one peer.
    pub max_connections_per_peer: u32,
    /// AutoNAT: only answer probes of global addresses (off on private test
    /// networks).
    pub autonat_only_global: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
            ],
            external: Vec::new(),
            metrics: None,
            max_reservations: 1024,
            max_reservations_per_peer: 2,
            reservation_secs: 3600,
            reservations_per_minute_per_peer: 10,
            reservations_per_minute_per_ip: 120,
            max_circuits: 512,
            max_circuits_per_peer: 16,
            max_circuit_secs: 3600,
            max_circuit_bytes: 1 << 30,
            circuits_per_minute_per_peer: 60,
            circuits_per_minute_per_ip: 600,
            max_connections: 4096,
            max_connections_per_peer: 8,
            autonat_only_global: true,
        }
    }
}

impl RelayConfig {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    fn parse(list: &[String], what: &str) -> Result<Vec<Multiaddr>> {
        list.iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| Error::Network(format!("{what} address {s:?}: {e}")))
            })
            .collect()
    }

    fn relay_config(&self) -> Result<relay::Config> {
        let per_minute = |n: u32, what: &str| {
            NonZeroU32::new(n).ok_or_else(|| Error::Network(format!("{what} must be at least 1")))
        };
        if self.max_circuit_secs > u64::from(u32::MAX) {
            return Err(Error::Network("max_circuit_secs is too large".into()));
        }
        let minute = Duration::from_secs(60);
        let mut c = relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: Duration::from_secs(self.reservation_secs.max(60)),
            reservation_rate_limiters: Vec::new(),
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: Duration::from_secs(self.max_circuit_secs),
            max_circuit_bytes: self.max_circuit_bytes,
            circuit_src_rate_limiters: Vec::new(),
        };
        // A token bucket of n, refilled at n a minute.
        let rate = |n: NonZeroU32| (n, minute / n.get());
        let (n, i) = rate(per_minute(
            self.reservations_per_minute_per_peer,
            "reservations_per_minute_per_peer",
        )?);
        c = c.reservation_rate_per_peer(n, i);
        let (n, i) = rate(per_minute(
            self.reservations_per_minute_per_ip,
            "reservations_per_minute_per_ip",
        )?);
        c = c.reservation_rate_per_ip(n, i);
        let (n, i) = rate(per_minute(
            self.circuits_per_minute_per_peer,
            "circuits_per_minute_per_peer",
        )?);
        c = c.circuit_src_per_peer(n, i);
        let (n, i) = rate(per_minute(
            self.circuits_per_minute_per_ip,
            "circuits_per_minute_per_ip",
        )?);
        Ok(c.circuit_src_per_ip(n, i))
    }
}

/// What a relay node speaks.
#[derive(NetworkBehaviour)]
pub struct RelayBehaviour {
    /// Caps on connections, checked before anything else.
    pub limits: connection_limits::Behaviour,
    /// Addresses and protocols of peers.
    pub identify: identify::Behaviour,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// The DHT, always serving.
    pub kad: kad::Behaviour<MemoryStore>,
    /// Relay v2 server.
    pub relay: relay::Behaviour,
    /// Answers reachability probes.
    pub autonat: autonat::Behaviour,
}

/// Counters a relay keeps (also exported as metrics).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Reservations held now.
    pub reservations: AtomicU64,
    /// Reservation requests accepted (new and renewals).
    pub reservations_accepted: AtomicU64,
    /// Reservation requests denied (caps and rate limits).
    pub reservations_denied: AtomicU64,
    /// Circuits open now.
    pub circuits: AtomicU64,
    /// Circuit requests accepted.
    pub circuits_accepted: AtomicU64,
    /// Circuit requests denied.
    pub circuits_denied: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
}

impl RelayStats {
    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// `(name, help, value, is_gauge)` for every counter.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64, bool)> {
        vec![
            (
                "reservations",
                "reservations held now",
                Self::get(&self.reservations),
                true,
            ),
            (
                "reservations_accepted",
                "reservation requests accepted",
                Self::get(&self.reservations_accepted),
                false,
            ),
            (
                "reservations_denied",
                "reservation requests denied by caps or rate limits",
                Self::get(&self.reservations_denied),
                false,
            ),
            (
                "circuits",
                "circuits open now",
                Self::get(&self.circuits),
                true,
            ),
            (
                "circuits_accepted",
                "circuit requests accepted",
                Self::get(&self.circuits_accepted),
                false,
            ),
            (
                "circuits_denied",
                "circuit requests denied by caps or rate limits",
                Self::get(&self.circuits_denied),
                false,
            ),
            (
                "connections",
                "connections open now",
                Self::get(&self.connections),
                true,
            ),
        ]
    }
}

#[derive(Debug)]
struct StatsCollector(Arc<RelayStats>);

impl prometheus_client::collector::Collector for StatsCollector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::result::Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        for (name, help, v, gauge) in self.0.snapshot() {
            if gauge {
                let g = ConstGauge::new(v as i64);
                g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
            } else {
                let c = ConstCounter::new(v);
                c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// Serves `GET /metrics` (Prometheus text) of `relay` on `addr`, an
/// address the operator chose, until `shutdown` resolves.
pub async fn serve_metrics(
    relay: Arc<RelayHandle>,
    addr: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io("bind metrics", addr.to_string(), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("bind metrics", addr.to_string(), e))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let relay = Arc::clone(&relay);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    relay.metrics_text(),
                )
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok((local, task))
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    peer_id: PeerId,
    addrs: Vec<Multiaddr>,
    stats: Arc<RelayStats>,
    registry: Arc<Mutex<Registry>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
}

impl RelayHandle {
    /// The relay's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Addresses to hand out, each ending in `/p2p/<id>`.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// Its counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Prometheus text of libp2p's metrics and the relay's counters.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }

    /// Stops the relay: listeners close and connections drop.
    pub async fn shutdown(&self) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(done) = done {
            let _ = done.await;
        }
    }
}

/// The relay's swarm; its bytes per transport are counted into `registry`.
fn build(
    key: Keypair,
    config: &RelayConfig,
    registry: &mut Registry,
) -> Result<Swarm<RelayBehaviour>> {
    let relay_config = config.relay_config()?;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_pending_incoming(Some(config.max_connections / 4 + 1))
        .with_max_established_per_peer(Some(config.max_connections_per_peer));
    let only_global = config.autonat_only_global;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| Error::Network(format!("tcp transport: {e}")))?
        .with_quic()
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| {
            let me = key.public().to_peer_id();
            let mut kad = kad::Behaviour::with_config(
                me,
                MemoryStore::new(me),
                kad::Config::new(StreamProtocol::new(KAD_PROTOCOL)),
            );
            kad.set_mode(Some(kad::Mode::Server));
            RelayBehaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new(RELAY_IDENTIFY.into(), key.public())
                        .with_agent_version(format!("shoal-relay/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                relay: relay::Behaviour::new(me, relay_config),
                autonat: autonat::Behaviour::new(
                    me,
                    autonat::Config {
                        only_global_ips: only_global,
                        ..Default::default()
                    },
                ),
            }
        })
        .map_err(|e| Error::Network(format!("behaviour: {e}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

/// Starts a relay with identity `key`; returns once every listener has an
/// address.
pub async fn spawn(key: Keypair, config: &RelayConfig) -> Result<RelayHandle> {
    let listen = RelayConfig::parse(&config.listen, "listen")?;
    let external = RelayConfig::parse(&config.external, "external")?;
    if listen.is_empty() {
        return Err(Error::Network(
            "a relay needs at least one listen address".into(),
        ));
    }
    let mut registry = Registry::default();
    let mut swarm = build(key, config, &mut registry)?;
    let me = *swarm.local_peer_id();
    let addrs = crate::net::listen_all(&mut swarm, &listen).await?;
    // Relayed addresses handed to clients are built from ours.
    let announce = if external.is_empty() {
        addrs.clone()
    } else {
        external
    };
    for a in &announce {
        swarm.add_external_address(a.clone());
    }
    let addrs = announce
        .into_iter()
        .map(|a| a.with_p2p(me).unwrap_or_else(|a| a))
        .collect();
    let stats = Arc::new(RelayStats::default());
    let metrics = libp2p::metrics::Metrics::new(registry.sub_registry_with_prefix("libp2p"));
    registry
        .sub_registry_with_prefix("shoal_relay")
        .register_collector(Box::new(StatsCollector(Arc::clone(&stats))));
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let actor = RelayActor {
        swarm,
        metrics,
        stats: Arc::clone(&stats),
    };
    tokio::spawn(async move {
        actor.run(stop_rx).await;
        let _ = done_tx.send(());
    });
    Ok(RelayHandle {
        peer_id: me,
        addrs,
        stats,
        registry: Arc::new(Mutex::new(registry)),
        stop: Mutex::new(Some(stop_tx)),
        done: Mutex::new(Some(done_rx)),
    })
}

struct RelayActor {
    swarm: Swarm<RelayBehaviour>,
    metrics: libp2p::metrics::Metrics,
    stats: Arc<RelayStats>,
}

impl RelayActor {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            tokio::select! {
                _ = &mut stop => break,
                ev = self.swarm.select_next_some() => self.on_event(ev),
            }
        }
        info!("relay stopped");
    }

    fn on_event(&mut self, ev: SwarmEvent<RelayBehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.metrics.record(&ev);
        let add = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
        let sub = |a: &AtomicU64| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        };
        match ev {
            SwarmEvent::ConnectionEstablished { .. } => {
                add(&self.stats.connections);
            }
            SwarmEvent::ConnectionClosed { .. } => sub(&self.stats.connections),
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
            SwarmEvent::Behaviour(RelayBehaviourEvent::Identify(ev)) => {
                self.metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    // Peers that serve our DHT join the routing table.
                    if info.protocols.contains(&StreamProtocol::new(KAD_PROTOCOL)) {
                        for a in info.listen_addrs {
                            self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Kad(ev)) => self.metrics.record(&ev),
            SwarmEvent::Behaviour(RelayBehaviourEvent::Ping(ev)) => self.metrics.record(&ev),
            SwarmEvent::Behaviour(RelayBehaviourEvent::Relay(ev)) => {
                self.metrics.record(&ev);
                self.on_relay(ev);
            }
            _ => {}
        }
    }

    fn on_relay(&mut self, ev: relay::Event) {
        let s = &self.stats;
        let add = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
        let sub = |a: &AtomicU64| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        };
        match ev {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                add(&s.reservations_accepted);
                if !renewed {
                    add(&s.reservations);
                }
                debug!(peer = %src_peer_id, renewed, "reservation accepted");
            }
            relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                add(&s.reservations_denied);
                debug!(peer = %src_peer_id, "reservation denied");
            }
            relay::Event::ReservationClosed { .. } | relay::Event::ReservationTimedOut { .. } => {
                sub(&s.reservations);
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                add(&s.circuits_accepted);
                add(&s.circuits);
                debug!(src = %src_peer_id, dst = %dst_peer_id, "circuit open");
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                add(&s.circuits_denied);
                debug!(src = %src_peer_id, dst = %dst_peer_id, "circuit denied");
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                sub(&s.circuits);
                match error {
                    Some(e) => {
                        debug!(src = %src_peer_id, dst = %dst_peer_id, error = %e, "circuit closed")
                    }
                    None => debug!(src = %src_peer_id, dst = %dst_peer_id, "circuit closed"),
                }
            }
            _ => {}
        }
    }
}
