//! Node configuration: `config.toml` in the home, with serde defaults, a
//! validating build step, and a `for_tests()` preset.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default TCP and UDP (QUIC) port.
pub const DEFAULT_PORT: u16 = 4747;

/// What `config.toml` holds. Every field has a default, so an empty file is
/// a valid config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// This device's human name.
    pub name: String,
    /// Port for the default TCP and QUIC listeners.
    pub port: u16,
    /// Listen addresses; empty means TCP and QUIC on all interfaces at `port`.
    pub listen: Vec<String>,
    /// Peers to dial at start.
    pub peers: Vec<String>,
    /// Bootstrap nodes (multiaddrs ending in `/p2p/<id>`). Empty by default:
    /// shoal ships no public addresses.
    pub bootstrap: Vec<String>,
    /// LAN discovery.
    pub mdns: bool,
    /// Relay reservations on bootstrap nodes: `auto` (while AutoNAT does not
    /// say this device is publicly reachable), `always` or `never`.
    pub reservations: RelayMode,
    /// Seconds between DHT lookups of other members of each space.
    pub rendezvous_secs: u64,
    /// Try to turn a relayed connection into a direct one (DCUtR).
    pub hole_punch: bool,
    /// AutoNAT: only trust probes across global (public) addresses. Turn off
    /// on private test networks.
    pub autonat_only_global: bool,
    /// Local API address; must be loopback. Port 0 picks a free one.
    pub api: String,
    /// Seconds between heads summaries (anti-entropy).
    pub anti_entropy_secs: u64,
    /// Seconds between redials of known members that are offline.
    pub redial_secs: u64,
    /// Milliseconds of quiet after a file changes before it is scanned.
    pub debounce_ms: u64,
    /// Seconds between full rescans of each folder.
    pub rescan_secs: u64,
    /// Days an old version is kept (0: no limit by age). Younger ones are
    /// thinned: all for a day, then one per hour, per day, per week.
    pub versions_max_days: u64,
    /// Most MiB a folder's old versions may take (0: no cap).
    pub versions_max_mib: u64,
    /// Mass-delete guard: one device may delete or overwrite this share of
    /// a folder's files within `guard_window_secs`...
    pub guard_share: f64,
    /// ...and at least this many (0: no guard) before its changes are held.
    pub guard_min_files: usize,
    /// The guard's window.
    pub guard_window_secs: u64,
    /// Read and ignored: versions are no longer kept by count.
    #[serde(skip_serializing)]
    pub versions_keep: Option<usize>,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            name: String::new(),
            port: DEFAULT_PORT,
            listen: Vec::new(),
            peers: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            reservations: RelayMode::Auto,
            rendezvous_secs: 60,
            hole_punch: true,
            autonat_only_global: true,
            api: "127.0.0.1:0".into(),
            anti_entropy_secs: 10,
            redial_secs: 30,
            debounce_ms: 30,
            rescan_secs: 300,
            versions_max_days: DEFAULT_VERSIONS_DAYS,
            versions_max_mib: DEFAULT_VERSIONS_MIB,
            versions_keep: None,
            guard_share: 0.5,
            guard_min_files: 100,
            guard_window_secs: 600,
        }
    }
}

impl ConfigFile {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Writes the config file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|e| Error::io("write", path, e))
    }

    /// Validates and turns the file into a runtime config.
    pub fn build(&self, path: &Path) -> Result<NodeConfig> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let addrs = |list: &[String], what: &str| -> Result<Vec<Multiaddr>> {
            list.iter()
                .map(|s| {
                    s.parse::<Multiaddr>()
                        .map_err(|e| bad(format!("{what} entry {s:?}: {e}")))
                })
                .collect()
        };
        let listen = if self.listen.is_empty() {
            default_listen(self.port)
        } else {
            addrs(&self.listen, "listen")?
        };
        let bootstrap = addrs(&self.bootstrap, "bootstrap")?;
        for b in &bootstrap {
            if !matches!(b.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                return Err(bad(format!(
                    "bootstrap entry {b} must end in /p2p/<peer id>"
                )));
            }
        }
        let api: SocketAddr = self
            .api
            .parse()
            .map_err(|e| bad(format!("api {:?}: {e}", self.api)))?;
        if !api.ip().is_loopback() {
            return Err(bad(format!("api {api} must be a loopback address")));
        }
        Ok(NodeConfig {
            name: self.name.clone(),
            listen,
            peers: addrs(&self.peers, "peers")?,
            bootstrap,
            mdns: self.mdns,
            reservations: self.reservations,
            rendezvous: Duration::from_secs(self.rendezvous_secs.max(1)),
            hole_punch: self.hole_punch,
            autonat_only_global: self.autonat_only_global,
            autonat_boot: Duration::from_secs(5),
            dht: true,
            kad_server: true,
            api,
            anti_entropy: Duration::from_secs(self.anti_entropy_secs.max(1)),
            redial: Duration::from_secs(self.redial_secs.max(1)),
            idle_timeout: Duration::from_secs(3600),
            gossip_heartbeat: Duration::from_millis(1000),
            folders: FolderSettings {
                debounce: Duration::from_millis(self.debounce_ms),
                rescan: Duration::from_secs(self.rescan_secs.max(1)),
                guard: GuardSettings {
                    share: self.guard_share.clamp(0.0, 1.0),
                    min_files: self.guard_min_files,
                    window: Duration::from_secs(self.guard_window_secs.max(1)),
                },
                retention: shoal_protocol::retain::Policy::staggered(
                    (self.versions_max_days > 0).then_some(self.versions_max_days),
                    (self.versions_max_mib > 0)
                        .then(|| self.versions_max_mib.saturating_mul(1 << 20)),
                ),
                ..Default::default()
            },
            drop_gossip: false,
        })
    }
}

/// When a device holds relay reservations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// While AutoNAT has not confirmed that this device is publicly reachable.
    #[default]
    Auto,
    /// On every bootstrap node that is a relay.
    Always,
    /// Never.
    Never,
}

/// TCP and QUIC on all interfaces.
pub fn default_listen(port: u16) -> Vec<Multiaddr> {
    // These literals are well-formed multiaddrs.
    [
        format!("/ip4/0.0.0.0/tcp/{port}"),
        format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}

/// The runtime configuration of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This device's human name.
    pub name: String,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers dialled at start.
    pub peers: Vec<Multiaddr>,
    /// Bootstrap nodes.
    pub bootstrap: Vec<Multiaddr>,
    /// LAN discovery (multicast).
    pub mdns: bool,
    /// When to hold relay reservations.
    pub reservations: RelayMode,
    /// Interval of DHT rendezvous lookups.
    pub rendezvous: Duration,
    /// Hole punching (DCUtR) on relayed connections.
    pub hole_punch: bool,
    /// AutoNAT trusts only global addresses.
    pub autonat_only_global: bool,
    /// Delay before the first AutoNAT probe.
    pub autonat_boot: Duration,
    /// Run the Kademlia DHT at all.
    pub dht: bool,
    /// Serve the DHT.
    pub kad_server: bool,
    /// Local API address (loopback).
    pub api: SocketAddr,
    /// Interval of heads summaries.
    pub anti_entropy: Duration,
    /// Interval of redials to offline members.
    pub redial: Duration,
    /// Idle connections close after this.
    pub idle_timeout: Duration,
    /// Gossipsub heartbeat.
    pub gossip_heartbeat: Duration,
    /// Folder sync.
    pub folders: FolderSettings,
    /// Fault injection for tests: publish nothing on gossip (changes and
    /// heads summaries are lost, as over a link that drops them).
    #[doc(hidden)]
    pub drop_gossip: bool,
}

impl NodeConfig {
    /// 127.0.0.1 on a free TCP port, mDNS off, short timers.
    pub fn for_tests(name: &str) -> Self {
        Self {
            name: name.to_string(),
            listen: vec!["/ip4/127.0.0.1/tcp/0"
                .parse()
                .unwrap_or_else(|_| Multiaddr::empty())],
            peers: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            reservations: RelayMode::Auto,
            rendezvous: Duration::from_secs(1),
            hole_punch: true,
            autonat_only_global: true,
            autonat_boot: Duration::from_secs(1),
            dht: true,
            kad_server: true,
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            anti_entropy: Duration::from_millis(500),
            redial: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(3600),
            gossip_heartbeat: Duration::from_millis(200),
            folders: FolderSettings {
                rescan: Duration::from_secs(2),
                ..Default::default()
            },
            drop_gossip: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_a_valid_config_with_no_bootstrap() {
        let f: ConfigFile = toml::from_str("").unwrap();
        let c = f.build(Path::new("x")).unwrap();
        assert!(c.bootstrap.is_empty());
        assert_eq!(c.listen.len(), 2);
        assert!(c.api.ip().is_loopback());
    }

    #[test]
    fn bad_values_are_named() {
        let f = ConfigFile {
            api: "0.0.0.0:80".into(),
            ..Default::default()
        };
        assert!(f
            .build(Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("loopback"));
        let f = ConfigFile {
            bootstrap: vec!["/ip4/127.0.0.1/tcp/1".into()],
            ..Default::default()
        };
        assert!(f
            .build(Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("/p2p/"));
        assert!(toml::from_str::<ConfigFile>("nope = 1").is_err());
    }
}

/// Days an old version is kept by default.
pub const DEFAULT_VERSIONS_DAYS: u64 = 365;
/// Default byte budget of a folder's old versions, in MiB.
pub const DEFAULT_VERSIONS_MIB: u64 = 10 * 1024;

/// Folder-sync settings.
#[derive(Debug, Clone)]
pub struct FolderSettings {
    /// Quiet time after a filesystem event before the path is scanned.
    pub debounce: Duration,
    /// Interval of full rescans (catches what the watcher missed).
    pub rescan: Duration,
    /// When one device's deletions and overwrites are held.
    pub guard: GuardSettings,
    /// How old versions under `.shoal/versions/` are kept: by age and a
    /// byte budget per folder, thinned over time (never by count).
    pub retention: shoal_protocol::retain::Policy,
    /// Files transferred at once.
    pub transfers: usize,
    /// Chunk requests in flight per file.
    pub window: usize,
    /// Fault injection for tests: flip a byte of every chunk served.
    #[doc(hidden)]
    pub serve_corrupt_chunks: bool,
    /// Fault injection for tests: each blob read served to a peer takes at
    /// least this long (as from a slow disk).
    #[doc(hidden)]
    pub serve_delay: Duration,
    /// Fault injection for tests: a transfer waits this long between
    /// renaming a file into place and recording it (as behind a slow
    /// folder sync).
    #[doc(hidden)]
    pub record_delay: Duration,
    /// Fault injection for tests: each folder worker waits for a permit
    /// before its first scan (as behind a slow first scan).
    #[doc(hidden)]
    pub hold_start: Option<std::sync::Arc<tokio::sync::Semaphore>>,
}

impl Default for FolderSettings {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(30),
            rescan: Duration::from_secs(300),
            guard: GuardSettings::default(),
            retention: shoal_protocol::retain::Policy::staggered(
                Some(DEFAULT_VERSIONS_DAYS),
                Some(DEFAULT_VERSIONS_MIB << 20),
            ),
            transfers: 128,
            window: 32,
            serve_corrupt_chunks: false,
            serve_delay: Duration::ZERO,
            record_delay: Duration::ZERO,
            hold_start: None,
        }
    }
}

/// When the guard trips.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardSettings {
    /// Share of the folder's files one device may delete or overwrite in
    /// `window` (0.5: half).
    pub share: f64,
    /// ...and at least this many (so small folders sync freely). 0 turns
    /// the guard off.
    pub min_files: usize,
    /// The window.
    pub window: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            share: 0.5,
            min_files: 100,
            window: Duration::from_secs(600),
        }
    }
}
