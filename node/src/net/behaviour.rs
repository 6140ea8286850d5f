//! The one place the swarm's behaviour is assembled. Fields are in polling
//! order; mDNS is optional (`Toggle`) because it multicasts on every
//! interface and must stay off in tests outside a network namespace.

use std::time::Duration;

use libp2p::gossipsub::{self, MessageAuthenticity, MessageId, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{autonat, connection_limits, dcutr, identify, mdns, ping, relay, StreamProtocol};
use shoal_protocol::wire::{
    HELLO_PROTOCOL, INVITE_PROTOCOL, KAD_PROTOCOL, MAX_GOSSIP_BYTES, MAX_HELLO_BYTES,
    MAX_INVITE_BYTES, MAX_SYNC_BYTES, SYNC_PROTOCOL,
};

use super::budget::Budget;
use super::codec::{BytesCodec, PeerAware};
use crate::config::NodeConfig;
use crate::error::{Error, Result};

/// Connections a device holds at once (members, relays, DHT peers).
pub const MAX_CONNECTIONS: u32 = 256;
/// Connections to one peer (TCP, QUIC, relayed, hole-punched, redials).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 8;
/// Incoming connections still in their handshake.
pub const MAX_PENDING_INCOMING: u32 = 32;

/// Identify's protocol version string for shoal nodes.
pub const IDENTIFY_PROTOCOL: &str = "/shoal/1";

/// Everything a shoal node speaks.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Caps on connections, checked before any other part sees one: a
    /// stranger cannot open connections without bound.
    pub limits: connection_limits::Behaviour,
    /// Addresses and protocols of peers.
    pub identify: identify::Behaviour,
    /// Liveness and latency.
    pub ping: ping::Behaviour,
    /// LAN discovery (off in tests).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// DHT under shoal's own protocol name (optional).
    pub kad: Toggle<kad::Behaviour<MemoryStore>>,
    /// Real-time delivery of sealed document changes.
    pub gossipsub: gossipsub::Behaviour,
    /// Members-only hello.
    pub hello: PeerAware,
    /// Per-document Automerge sync.
    pub sync: PeerAware,
    /// Invite pairing.
    pub invite: PeerAware,
    /// Raw streams for bulk data (blob exchange).
    pub stream: libp2p_stream::Behaviour,
    /// Circuits through relays, and reservations on them.
    pub relay: relay::client::Behaviour,
    /// Hole punching: upgrades a relayed connection to a direct one.
    pub dcutr: Toggle<dcutr::Behaviour>,
    /// Are we reachable from outside? Also answers others' probes.
    pub autonat: autonat::Behaviour,
}

impl Behaviour {
    /// Builds the behaviour for `key` under `config`, with the relay client
    /// half that the swarm builder made; peers' request frames are held to
    /// `budget`.
    pub fn new(
        key: &Keypair,
        relay: relay::client::Behaviour,
        config: &NodeConfig,
        traffic: &crate::metrics::Traffic,
        budget: &Budget,
    ) -> Result<Self> {
        let peer_id = key.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(format!("shoal/{}", env!("CARGO_PKG_VERSION"))),
        );
        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| Error::Network(format!("mdns: {e}")))?,
            )
        } else {
            None
        };
        let kad = config.dht.then(|| {
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                MemoryStore::new(peer_id),
                kad::Config::new(StreamProtocol::new(KAD_PROTOCOL)),
            );
            if config.kad_server {
                kad.set_mode(Some(kad::Mode::Server));
            }
            kad
        });
        let gossip_cfg = gossipsub::ConfigBuilder::default()
            .validation_mode(ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(MAX_GOSSIP_BYTES)
            .heartbeat_interval(config.gossip_heartbeat)
            // Content-addressed ids (every envelope carries a random nonce),
            // bound to the author, so a copy re-signed by someone else does
            // not shadow the real message.
            .message_id_fn(|m| {
                let mut h = blake3::Hasher::new();
                if let Some(s) = &m.source {
                    h.update(&s.to_bytes());
                }
                h.update(&m.data);
                MessageId::from(&h.finalize().as_bytes()[..20])
            })
            .build()
            .map_err(|e| Error::Network(format!("gossipsub config: {e}")))?;
        let gossipsub =
            gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_cfg)
                .map_err(|e| Error::Network(format!("gossipsub: {e}")))?;
        let rr = |proto: &'static str, limit: usize, timeout: Duration| {
            PeerAware::new(
                BytesCodec::budgeted(proto, limit, traffic.clone(), budget.clone()),
                StreamProtocol::new(proto),
                request_response::Config::default().with_request_timeout(timeout),
            )
        };
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(MAX_CONNECTIONS))
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
        Ok(Self {
            limits: connection_limits::Behaviour::new(limits),
            identify,
            ping: ping::Behaviour::new(ping::Config::new()),
            mdns: Toggle::from(mdns),
            kad: Toggle::from(kad),
            gossipsub,
            hello: rr(HELLO_PROTOCOL, MAX_HELLO_BYTES, Duration::from_secs(10)),
            sync: rr(SYNC_PROTOCOL, MAX_SYNC_BYTES, Duration::from_secs(60)),
            invite: rr(INVITE_PROTOCOL, MAX_INVITE_BYTES, Duration::from_secs(20)),
            stream: libp2p_stream::Behaviour::new(),
            relay,
            dcutr: Toggle::from(config.hole_punch.then(|| dcutr::Behaviour::new(peer_id))),
            autonat: autonat::Behaviour::new(
                peer_id,
                autonat::Config {
                    boot_delay: config.autonat_boot,
                    retry_interval: Duration::from_secs(30),
                    only_global_ips: config.autonat_only_global,
                    ..Default::default()
                },
            ),
        })
    }
}
