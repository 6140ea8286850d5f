//! Test harness: in-process shoal nodes on 127.0.0.1 with mDNS off, temp
//! homes, and helpers that wait on node events with timeouts.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shoal_node::{Event, Home, Node, NodeConfig};
use tempfile::TempDir;
use tokio::sync::broadcast;

/// Default wait for events in tests.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A node with its temporary home.
pub struct TestNode {
    /// The running node.
    pub node: Node,
    /// Its home (kept alive for restarts).
    pub home: Home,
    /// The temp dir owning the home.
    pub dir: std::sync::Arc<TempDir>,
    /// Its name.
    pub name: String,
}

impl TestNode {
    /// Starts a fresh node named `name`.
    pub async fn spawn(name: &str) -> Result<Self> {
        let dir = std::sync::Arc::new(tempfile::tempdir()?);
        let home = Home::at(dir.path().join(name));
        home.init(name)?;
        let node = Node::start(&home, NodeConfig::for_tests(name)).await?;
        Ok(Self {
            node,
            home,
            dir,
            name: name.into(),
        })
    }

    /// Stops the node and starts it again on the same home.
    pub async fn restart(&mut self) -> Result<()> {
        self.node.shutdown().await;
        self.node = Node::start(&self.home, NodeConfig::for_tests(&self.name)).await?;
        Ok(())
    }
}

/// Starts `n` nodes named n0, n1, ...
pub async fn spawn_nodes(n: usize) -> Result<Vec<TestNode>> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(TestNode::spawn(&format!("n{i}")).await?);
    }
    Ok(v)
}

/// Dials `b` from `a`.
pub async fn connect(a: &Node, b: &Node) -> Result<()> {
    let addr = b
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .context("peer has no listen address")?;
    a.dial(addr).await?;
    Ok(())
}

/// Waits until `pred` holds for an event of `rx`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<Event>,
    timeout: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Result<Event> {
    tokio::time::timeout(timeout, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return Ok(ev),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("event stream ended: {e}"),
            }
        }
    })
    .await
    .context("timed out waiting for an event")?
}

/// Re-evaluates `check` every time `node` emits an event (and once at the
/// start) until it returns true or `timeout` passes. Waits on events, not on
/// a fixed sleep.
pub async fn wait_for<F, Fut>(node: &Node, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut rx = node.events();
    let res = tokio::time::timeout(timeout, async {
        loop {
            if check().await {
                return;
            }
            // The next event (or a lag) is the signal to look again; a
            // periodic heads summary guarantees events keep coming while
            // peers are connected.
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        }
    })
    .await;
    res.context("condition not reached before timeout")
}

/// Makes `members` join `owner`'s space `space` as editors: the owner adds
/// them, and each imports the owner's grant (what the invite flow does).
pub async fn share_space(owner: &Node, space: &str, members: &[&Node]) -> Result<()> {
    for m in members {
        owner
            .add_member(space, m.device_id(), shoal_protocol::Role::Editor, m.name())
            .await?;
    }
    let grant = owner.export_grant(space).await?;
    for m in members {
        m.import_grant(grant.clone()).await?;
    }
    Ok(())
}

/// Waits until every node has the same non-empty heads for `doc`.
pub async fn wait_converged(nodes: &[&Node], space: &str, doc: &str) -> Result<Vec<String>> {
    let doc: shoal_protocol::DocId = doc.parse()?;
    let mut last = Vec::new();
    let ok = wait_for(nodes[0], TIMEOUT, || {
        let doc = doc.clone();
        let nodes = nodes.to_vec();
        let space = space.to_string();
        async move {
            let mut hs = Vec::new();
            for n in &nodes {
                match n.heads(&space, &doc).await {
                    Ok(mut h) => {
                        h.sort();
                        hs.push(h)
                    }
                    Err(_) => return false,
                }
            }
            hs.windows(2).all(|w| w[0] == w[1])
        }
    })
    .await;
    for n in nodes {
        last.push(format!(
            "{}: {:?}",
            n.name(),
            n.heads(space, &doc).await.ok()
        ));
    }
    ok.with_context(|| format!("not converged: {last:?}"))?;
    Ok(nodes[0].heads(space, &doc).await?)
}
