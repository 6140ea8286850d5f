//! Prometheus metrics: libp2p's own (connections, identify, ping, Kademlia,
//! gossipsub) recorded by the network actor, plus shoal's counters, read at
//! each scrape. Served as `GET /metrics` on the local API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Counters the engine and the network actor keep.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Peers connected now.
    pub peers: AtomicU64,
    /// Document changes made on this device (batches, per document).
    pub doc_updates_local: AtomicU64,
    /// Document changes applied from peers (batches, per document).
    pub doc_updates_remote: AtomicU64,
    /// Network input refused (bad envelopes, forged authors, bad chunks...).
    pub rejected: AtomicU64,
}

/// The node's registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Engine and network counters.
    pub node: Arc<NodeCounters>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct NodeCollector(Arc<NodeCounters>);

impl prometheus_client::collector::Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let peers = ConstGauge::new(g(&self.0.peers) as i64);
        peers.encode(enc.encode_descriptor(
            "connected_peers",
            "peers connected now",
            None,
            peers.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "doc_updates_local",
                "document changes made here",
                &self.0.doc_updates_local,
            ),
            (
                "doc_updates_remote",
                "document changes applied from peers",
                &self.0.doc_updates_remote,
            ),
            ("rejected", "network input refused", &self.0.rejected),
        ] {
            let c = ConstCounter::new(g(v));
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FolderCollector(Arc<crate::folder::Counters>);

impl prometheus_client::collector::Collector for FolderCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, v) in self.0.snapshot() {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, "folder sync", None, c.metric_type())?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// A registry with shoal's collectors; libp2p's metrics are added by the
    /// network actor through [`Metrics::with_registry`].
    pub fn new(folders: Arc<crate::folder::Counters>) -> Self {
        let mut registry = Registry::default();
        let node = Arc::new(NodeCounters::default());
        let shoal = registry.sub_registry_with_prefix("shoal");
        shoal.register_collector(Box::new(NodeCollector(Arc::clone(&node))));
        shoal
            .sub_registry_with_prefix("folder")
            .register_collector(Box::new(FolderCollector(folders)));
        Self {
            registry: Mutex::new(registry),
            node,
        }
    }

    /// Runs `f` on the registry (to register more metrics).
    pub fn with_registry<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}
