//! Multi-node document sync over the real swarm on 127.0.0.1.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use shoal_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sync_a_document() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    connect(b, a).await?;
    let todo = "todo".parse()?;
    a.put("notes", &todo, "/items/0", json!("buy milk")).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(b.get("notes", &todo).await?, json!({"items": ["buy milk"]}));
    b.put("notes", &todo, "/items/-", json!("eggs")).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(
        a.get("notes", &todo).await?,
        json!({"items": ["buy milk", "eggs"]})
    );
    let _ = Duration::from_secs(1);
    Ok(())
}
