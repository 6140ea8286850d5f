//! Supervision: a panic in any of a node's tasks fails the node, visibly,
//! instead of leaving it half alive (issue 18, hole 2). The panic is
//! injected through the hidden test hook `Node::inject_fault`.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_node::Event;
use shoal_tests::*;

/// Each task in turn panics on a fresh node with a synced folder: the node
/// reports the failure naming the task, an event says so, and the API
/// answers every request with a 503 naming the failure (before, the node
/// stayed up with the task gone: no failure, and a 503 "the node has
/// stopped" for a dead engine, until someone restarted it by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_fails_the_node_with_its_name_and_an_event() -> Result<()> {
    for actor in ["engine", "network", "blob-server", "folder-worker", "api"] {
        let t = TestNode::spawn("a").await?;
        let node = &t.node;
        node.create_space("notes").await?;
        let folder = t.dir.path().join("folder");
        node.attach_folder("notes", &folder).await?;
        let (base, _stop) = serve_api(node).await?;
        let mut events = node.events();
        ensure!(node.failed().is_none(), "failed before any fault");

        node.inject_fault(actor);
        let f = tokio::time::timeout(TIMEOUT, node.wait_failed())
            .await
            .with_context(|| format!("{actor}: the node never reported a failure"))?;
        assert!(
            f.actor == actor || f.actor.starts_with(&format!("{actor} ")),
            "{actor}: {f}"
        );
        assert!(f.message.contains("injected fault"), "{actor}: {f}");
        assert_eq!(node.failed().as_ref(), Some(&f));
        let ev = wait_event(&mut events, TIMEOUT, |e| {
            matches!(e, Event::NodeFailed { .. })
        })
        .await
        .with_context(|| format!("{actor}: no node_failed event"))?;
        let Event::NodeFailed { actor: a, error } = ev else {
            unreachable!()
        };
        assert_eq!(
            (a.as_str(), error.as_str()),
            (f.actor.as_str(), f.message.as_str())
        );

        if actor != "api" {
            let r = reqwest::Client::new()
                .get(format!("{base}/v1/status"))
                .bearer_auth(API_TOKEN)
                .send()
                .await?;
            let status = r.status();
            let body: Value = r.json().await?;
            let e = body["error"].as_str().unwrap_or_default();
            assert_eq!(status, 503, "{actor}: {body}");
            assert!(
                e.contains(&f.actor) && e.contains("restart"),
                "{actor}: {e}"
            );
        }
        t.stop().await;
    }
    Ok(())
}
