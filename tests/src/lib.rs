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
    /// The config it runs with.
    pub config: NodeConfig,
}

impl TestNode {
    /// Starts a fresh node named `name` with the test config.
    pub async fn spawn(name: &str) -> Result<Self> {
        Self::spawn_with(name, |_| {}).await
    }

    /// Starts a fresh node with the test config adjusted by `tweak`.
    pub async fn spawn_with(name: &str, tweak: impl FnOnce(&mut NodeConfig)) -> Result<Self> {
        init_tracing();
        let dir = std::sync::Arc::new(tempfile::tempdir()?);
        let home = Home::at(dir.path().join(name));
        home.init(name)?;
        let mut config = NodeConfig::for_tests(name);
        tweak(&mut config);
        let node = Node::start(&home, config.clone()).await?;
        Ok(Self {
            node,
            home,
            dir,
            name: name.into(),
            config,
        })
    }

    /// Stops the node (flushing its store).
    pub async fn stop(&self) {
        self.node.shutdown().await;
    }

    /// Starts the node again on the same home (after [`Self::stop`]).
    pub async fn start(&mut self) -> Result<()> {
        self.node = Node::start(&self.home, self.config.clone()).await?;
        Ok(())
    }

    /// Stops the node and starts it again on the same home.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.start().await
    }
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Starts `n` nodes named n0, n1, ...
pub async fn spawn_nodes(n: usize) -> Result<Vec<TestNode>> {
    spawn_nodes_with(n, |_, _| {}).await
}

/// [`spawn_nodes`], with node `i`'s config adjusted by `tweak(i, config)`.
pub async fn spawn_nodes_with(
    n: usize,
    tweak: impl Fn(usize, &mut NodeConfig),
) -> Result<Vec<TestNode>> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(TestNode::spawn_with(&format!("n{i}"), |c| tweak(i, c)).await?);
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

/// Two or more nodes sharing space `space`, each with its own folder (a
/// temp dir that lives as long as the returned guard).
pub async fn folder_nodes(
    n: usize,
    space: &str,
) -> Result<(Vec<TestNode>, Vec<std::path::PathBuf>, TempDir)> {
    folder_nodes_with(n, space, |_, _| {}).await
}

/// [`folder_nodes`], with node `i`'s config adjusted by `tweak(i, config)`.
pub async fn folder_nodes_with(
    n: usize,
    space: &str,
    tweak: impl Fn(usize, &mut NodeConfig),
) -> Result<(Vec<TestNode>, Vec<std::path::PathBuf>, TempDir)> {
    let nodes = spawn_nodes_with(n, tweak).await?;
    nodes[0].node.create_space(space).await?;
    let others: Vec<&Node> = nodes[1..].iter().map(|t| &t.node).collect();
    share_space(&nodes[0].node, space, &others).await?;
    for i in 1..n {
        connect(&nodes[i].node, &nodes[0].node).await?;
    }
    let dirs = tempfile::tempdir()?;
    let mut roots = Vec::new();
    for (i, t) in nodes.iter().enumerate() {
        let root = dirs.path().join(format!("folder{i}"));
        t.node.attach_folder(space, &root).await?;
        roots.push(root.canonicalize()?);
    }
    Ok((nodes, roots, dirs))
}

/// Waits until the file at `path` holds exactly `content` (re-checked on
/// every event of `node`).
pub async fn wait_file(node: &Node, path: &std::path::Path, content: &[u8]) -> Result<()> {
    wait_for(node, TIMEOUT, || async {
        std::fs::read(path).is_ok_and(|b| b == content)
    })
    .await
    .with_context(|| {
        format!(
            "{} never held the expected {} bytes (has {:?} bytes)",
            path.display(),
            content.len(),
            std::fs::metadata(path).map(|m| m.len()).ok()
        )
    })
}

/// Waits until `node`'s folder says it is in sync: nothing left to fetch
/// or place.
pub async fn wait_in_sync(node: &Node) -> Result<()> {
    wait_for(node, TIMEOUT, || async {
        node.folder_status().await.iter().any(|f| {
            f.state == shoal_node::folder::FolderState::InSync
                && f.files_left == 0
                && f.progress == 100.0
        })
    })
    .await
    .context("the folder never said it is in sync")
}

/// Waits until nothing is at `path`.
pub async fn wait_gone(node: &Node, path: &std::path::Path) -> Result<()> {
    wait_for(node, TIMEOUT, || async {
        std::fs::symlink_metadata(path).is_err()
    })
    .await
    .with_context(|| format!("{} is still there", path.display()))
}

/// The API token [`serve_api`] uses.
pub const API_TOKEN: &str = "t0ken-for-tests-0123456789abcdef";

/// Serves `node`'s API on 127.0.0.1 with [`API_TOKEN`]; returns its base
/// URL and a sender that stops it.
pub async fn serve_api(node: &Node) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, _task) = shoal_node::api::serve(
        node.clone(),
        API_TOKEN.into(),
        "127.0.0.1:0".parse()?,
        async {
            let _ = stopped.await;
        },
    )
    .await?;
    Ok((format!("http://{addr}"), stop))
}

/// Writes `n` changes to `doc` in `space` on `node` from `writers` tasks at
/// once (so the node batches them), returning when every one is acked.
pub async fn write_burst(
    node: &Node,
    space: &str,
    doc: &shoal_protocol::DocId,
    n: usize,
    writers: usize,
) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (node, doc, space) = (node.clone(), doc.clone(), space.to_string());
        tasks.spawn(async move {
            for i in (w..n).step_by(writers) {
                node.put(
                    &space,
                    &doc,
                    &format!("/t{}", i % 500),
                    serde_json::json!(i),
                )
                .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// The number after `flag` in `args` (`--runs 3`), or `default`.
pub fn flag_value(args: &[String], flag: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (NaN when empty); benchmarks report medians.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|x, y| x.total_cmp(y));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
