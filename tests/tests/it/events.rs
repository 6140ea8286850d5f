//! The live event stream (server-sent events) through the real router,
//! with two real nodes: filters honoured, auth enforced.

use std::time::Duration;

use anyhow::{Context, Result};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use shoal_protocol::DocId;
use shoal_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_change_reaches_a_filtered_event_stream() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    connect(b, a).await?;
    a.put("notes", &"todo".parse()?, "/x", json!(0)).await?;
    wait_converged(&[a, b], "notes", "todo").await?;

    let (root, stop) = serve_api(b).await?;
    let http = reqwest::Client::new();
    let base = format!("{root}/v1/events");
    // no token: 401; an unknown space: 404 naming it
    let r = http.get(&base).send().await?;
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{base}?space=nope"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    assert!(r.text().await?.contains("nope"));

    let url = format!(
        "{base}?space=notes&types=doc&doc=to*&author={}",
        a.device_id()
    );
    let resp = http.get(url).bearer_auth(API_TOKEN).send().await?;
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource();
    // a change to another document, then one b writes itself, then the one we want
    let other: DocId = "other".parse()?;
    a.put("notes", &other, "/y", json!(1)).await?;
    b.put("notes", &"todo".parse()?, "/by_b", json!(2)).await?;
    a.put("notes", &"todo".parse()?, "/x", json!(3)).await?;
    let first = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .context("no event within the timeout")?
        .context("stream ended")??;
    let v: Value = serde_json::from_str(&first.data)?;
    assert_eq!(v["type"], "doc_changed");
    assert_eq!(v["doc"], "todo");
    assert_eq!(v["authors"], json!([a.device_id().to_string()]));
    assert_ne!(
        v["origin"], "local",
        "b's own write passed the author filter: {v}"
    );
    let _ = stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_file_changes_reach_a_path_filtered_stream() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes(2, "f").await?;
    let (base, stop) = serve_api(&nodes[1].node).await?;
    let resp = reqwest::Client::new()
        .get(format!("{base}/v1/events?types=file&path=docs/**"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?;
    let mut events = resp.bytes_stream().eventsource();
    let resp = reqwest::Client::new()
        .get(format!("{base}/v1/events?types=progress&space=f"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?;
    let mut progress = resp.bytes_stream().eventsource();
    std::fs::create_dir_all(roots[0].join("other"))?;
    std::fs::write(roots[0].join("other/b.txt"), b"b")?;
    wait_file(&nodes[1].node, &roots[1].join("other/b.txt"), b"b").await?;
    std::fs::create_dir_all(roots[0].join("docs/deep"))?;
    std::fs::write(roots[0].join("docs/deep/a.txt"), b"a")?;
    let ev = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .context("no event within the timeout")?
        .context("stream ended")??;
    let v: Value = serde_json::from_str(&ev.data)?;
    assert_eq!(v["type"], "file_changed", "{v}");
    assert_eq!(v["path"], "docs/deep/a.txt", "{v}");
    assert_eq!(v["origin"], "remote", "{v}");
    assert_eq!(v["device"], nodes[0].node.device_id().to_string());
    // progress events while B syncs, ending with one saying it is in sync
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = progress.next().await {
            let v: Value = serde_json::from_str(&ev?.data)?;
            assert_eq!(v["type"], "sync_progress", "{v}");
            if v["state"] == "in sync" {
                assert_eq!(v["progress"], 100.0, "{v}");
                assert_eq!(v["files_left"], 0, "{v}");
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the progress stream ended")
    })
    .await
    .context("no in-sync progress event within the timeout")??;

    // Prometheus metrics, behind the token: libp2p's and shoal's, with the
    // chunks B just fetched counted
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/metrics")).send().await?.status(),
        401
    );
    let text = http
        .get(format!("{base}/metrics"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        text.contains("libp2p_swarm_connections_established"),
        "{text}"
    );
    assert!(text.contains("shoal_connected_peers 1"), "{text}");
    let metric = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no {series} in\n{text}"))
    };
    assert!(metric("shoal_folder_chunks_fetched_total")? >= 2.0);
    assert!(metric("shoal_doc_updates_remote_total")? >= 1.0);
    // bytes per protocol: the blob stream carried at least the chunk bytes
    // (plus framing), gossip and sync carried the index changes, and the
    // transport carried all of it
    let fetched = metric("shoal_folder_bytes_fetched_total")?;
    let blob_in = metric(r#"shoal_protocol_bytes_total{protocol="/shoal/blob/1",direction="in"}"#)?;
    assert!(
        blob_in > fetched,
        "blob stream {blob_in} <= payload {fetched}"
    );
    let gossip =
        metric(r#"shoal_protocol_bytes_total{protocol="gossipsub",direction="in"}"#).unwrap_or(0.0);
    let sync = metric(r#"shoal_protocol_bytes_total{protocol="/shoal/sync/1",direction="in"}"#)
        .unwrap_or(0.0);
    assert!(gossip + sync > 0.0, "{text}");
    let transport_in: f64 = text
        .lines()
        .filter(|l| l.starts_with("libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp"))
        .filter(|l| l.contains(r#"direction="Inbound""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(transport_in > blob_in + gossip + sync, "{text}");
    // sync lag: every remote index change was observed, and none took long
    let lagged = metric(r#"shoal_sync_lag_seconds_count{origin="gossip"}"#).unwrap_or(0.0)
        + metric(r#"shoal_sync_lag_seconds_count{origin="sync"}"#).unwrap_or(0.0);
    assert!(lagged >= 1.0, "{text}");
    let total = metric(r#"shoal_sync_lag_seconds_sum{origin="gossip"}"#).unwrap_or(0.0)
        + metric(r#"shoal_sync_lag_seconds_sum{origin="sync"}"#).unwrap_or(0.0);
    assert!(total / lagged < 20.0, "mean lag {} s", total / lagged);
    let _ = stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_does_not_read_is_told_how_much_it_missed() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let a = &n[0].node;
    a.create_space("busy").await?;
    let (base, stop) = serve_api(a).await?;
    let resp = reqwest::Client::new()
        .get(format!("{base}/v1/events?space=busy"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    // Far more events than the node buffers (4,096) plus what the sockets
    // hold, while the consumer reads nothing.
    let doc: DocId = "d".parse()?;
    for round in 0..40 {
        let puts = (0..500).map(|i| a.put("busy", &doc, "/k", json!(round * 500 + i)));
        for r in futures::future::join_all(puts).await {
            r?;
        }
    }
    let mut events = resp.bytes_stream().eventsource();
    let lagged = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = events.next().await {
            let v: Value = serde_json::from_str(&ev?.data)?;
            if v["type"] == "lagged" {
                return Ok::<_, anyhow::Error>(Some(v));
            }
        }
        Ok(None)
    })
    .await
    .context("no lagged event within the timeout")??
    .context("the stream ended without saying it lagged")?;
    assert!(lagged["dropped"].as_u64().unwrap_or(0) > 0, "{lagged}");
    let _ = stop.send(());
    Ok(())
}
