//! Prometheus metrics: libp2p's own (connections, identify, ping, Kademlia,
//! gossipsub, and bytes per transport) recorded by the network actor, plus
//! shoal's: counters read at each scrape, bytes in and out per application
//! protocol ([`Traffic`]), and how old remote document changes are when
//! they arrive ([`SyncLag`]). Served as `GET /metrics` on the local API.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficLabels {
    protocol: &'static str,
    direction: &'static str,
}

/// Bytes in and out per application protocol: request-response frames,
/// gossip payloads, blob streams. (Transport totals, with every protocol's
/// framing, are libp2p's `libp2p_bandwidth_bytes_total`.) Cheap to clone.
#[derive(Clone, Default)]
pub struct Traffic(Family<TrafficLabels, Counter>);

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic").finish_non_exhaustive()
    }
}

impl Traffic {
    /// Counts `n` bytes received on `protocol`.
    pub fn inbound(&self, protocol: &'static str, n: usize) {
        self.add(protocol, "in", n);
    }

    /// Counts `n` bytes sent on `protocol`.
    pub fn outbound(&self, protocol: &'static str, n: usize) {
        self.add(protocol, "out", n);
    }

    fn add(&self, protocol: &'static str, direction: &'static str, n: usize) {
        self.0
            .get_or_create(&TrafficLabels {
                protocol,
                direction,
            })
            .inc_by(n as u64);
    }

    /// Bytes counted so far on `protocol` in `direction` (`in` or `out`).
    pub fn get(&self, protocol: &'static str, direction: &'static str) -> u64 {
        self.0
            .get_or_create(&TrafficLabels {
                protocol,
                direction,
            })
            .get()
    }

    /// `io` with every byte read or written through it counted.
    pub fn meter<S>(&self, protocol: &'static str, io: S) -> Metered<S> {
        let c = |direction| {
            self.0
                .get_or_create(&TrafficLabels {
                    protocol,
                    direction,
                })
                .clone()
        };
        Metered {
            io,
            read: c("in"),
            written: c("out"),
        }
    }
}

/// A stream whose bytes are counted (see [`Traffic::meter`]).
pub struct Metered<S> {
    io: S,
    read: Counter,
    written: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.read.inc_by(*n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.inc_by(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_close(cx)
    }
}

/// Now, in Unix milliseconds (0 if the clock is before 1970).
pub(crate) fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabels {
    origin: &'static str,
}

fn lag_histogram() -> Histogram {
    // 5 ms to about 3 days, doubling
    Histogram::new(exponential_buckets(0.005, 2.0, 26))
}

/// Sync lag: for each remote document change applied here, seconds from
/// its commit on the writing device to now, by how it came (`gossip` live,
/// `sync` catching up). Folder indexes are documents too, so file changes
/// are in it. Clocks of different devices differ; a change stamped in the
/// future counts as 0.
#[derive(Clone)]
pub struct SyncLag(Family<LagLabels, Histogram, fn() -> Histogram>);

impl Default for SyncLag {
    fn default() -> Self {
        Self(Family::new_with_constructor(lag_histogram))
    }
}

impl std::fmt::Debug for SyncLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLag").finish_non_exhaustive()
    }
}

impl SyncLag {
    /// Observes one change committed at `committed_ms` (Unix milliseconds;
    /// 0, for changes from before stamps, is skipped) arriving by `origin`.
    pub fn observe(&self, origin: &'static str, committed_ms: i64) {
        if committed_ms <= 0 {
            return;
        }
        let lag = (unix_millis() - committed_ms).max(0) as f64 / 1000.0;
        self.0.get_or_create(&LagLabels { origin }).observe(lag);
    }
}

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
    /// Bytes per application protocol.
    pub traffic: Traffic,
    /// How old remote changes are when applied.
    pub sync_lag: SyncLag,
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
struct FolderCollector(Arc<FolderCounters>);

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
    /// Blob streams count their bytes into the folder counters' traffic,
    /// which is shared here.
    pub fn new(folders: Arc<FolderCounters>) -> Self {
        let mut registry = Registry::default();
        let node = Arc::new(NodeCounters {
            traffic: folders.traffic.clone(),
            ..Default::default()
        });
        let shoal = registry.sub_registry_with_prefix("shoal");
        shoal.register_collector(Box::new(NodeCollector(Arc::clone(&node))));
        shoal.register(
            "protocol_bytes",
            "bytes in and out per application protocol",
            node.traffic.0.clone(),
        );
        shoal.register(
            "sync_lag_seconds",
            "seconds from a remote document change's commit to its arrival here",
            node.sync_lag.0.clone(),
        );
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

/// The folders' counters, for status and metrics.
#[derive(Debug, Default)]
pub struct FolderCounters {
    /// Chunks served to peers.
    pub chunks_served: AtomicU64,
    /// Bytes served to peers.
    pub bytes_served: AtomicU64,
    /// Chunks fetched from peers.
    pub chunks_fetched: AtomicU64,
    /// Bytes fetched from peers.
    pub bytes_fetched: AtomicU64,
    /// Chunks copied from local files instead of fetched.
    pub chunks_local: AtomicU64,
    /// Chunks found already written in a resumed transfer.
    pub chunks_resumed: AtomicU64,
    /// Chunks a peer served that failed verification.
    pub chunks_corrupt: AtomicU64,
    /// Files placed from remote changes.
    pub files_placed: AtomicU64,
    /// Conflicts resolved.
    pub conflicts: AtomicU64,
    /// Bytes per protocol; blob streams count theirs here.
    pub traffic: Traffic,
}

impl FolderCounters {
    pub(crate) fn add_served(&self, n: usize) {
        self.chunks_served.fetch_add(1, Ordering::Relaxed);
        self.bytes_served.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A snapshot of every counter, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("chunks_served", g(&self.chunks_served)),
            ("bytes_served", g(&self.bytes_served)),
            ("chunks_fetched", g(&self.chunks_fetched)),
            ("bytes_fetched", g(&self.bytes_fetched)),
            ("chunks_local", g(&self.chunks_local)),
            ("chunks_resumed", g(&self.chunks_resumed)),
            ("chunks_corrupt", g(&self.chunks_corrupt)),
            ("files_placed", g(&self.files_placed)),
            ("conflicts", g(&self.conflicts)),
        ]
    }
}
