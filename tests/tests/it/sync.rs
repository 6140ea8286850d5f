//! Multi-node document sync over the real swarm and real sled stores.

use anyhow::Result;
use serde_json::json;
use shoal_protocol::DocId;
use shoal_tests::*;

fn todo() -> DocId {
    "todo".parse().unwrap_or_else(|_| DocId::members())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sync_a_document_both_ways() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    connect(b, a).await?;
    a.put("notes", &todo(), "/items/0", json!("buy milk"))
        .await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(
        b.get("notes", &todo()).await?,
        json!({"items": ["buy milk"]})
    );
    b.put("notes", &todo(), "/items/-", json!("eggs")).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(
        a.get("notes", &todo()).await?,
        json!({"items": ["buy milk", "eggs"]})
    );
    // the joiner learnt the space name and its role from `members`
    let spaces = b.spaces().await?;
    assert_eq!(spaces[0].name, "notes");
    assert_eq!(spaces[0].role, Some(shoal_protocol::Role::Editor));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_concurrent_edits_converge() -> Result<()> {
    let n = spawn_nodes(3).await?;
    let (a, b, c) = (&n[0].node, &n[1].node, &n[2].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b, c]).await?;
    connect(b, a).await?;
    connect(c, a).await?;
    connect(c, b).await?;
    a.put("notes", &todo(), "/seed", json!(true)).await?;
    wait_converged(&[a, b, c], "notes", "todo").await?;
    // 30 concurrent edits on each node: same keys (conflicts) and own keys
    let edit = |node: &shoal_node::Node, who: &'static str| {
        let node = node.clone();
        async move {
            for i in 0..30 {
                node.put("notes", &todo(), "/shared", json!(format!("{who}{i}")))
                    .await?;
                node.put("notes", &todo(), &format!("/{who}/{i}"), json!(i))
                    .await?;
            }
            anyhow::Ok(())
        }
    };
    let (ra, rb, rc) = tokio::join!(edit(a, "a"), edit(b, "b"), edit(c, "c"));
    ra?;
    rb?;
    rc?;
    wait_converged(&[a, b, c], "notes", "todo").await?;
    let ja = a.get("notes", &todo()).await?;
    assert_eq!(ja, b.get("notes", &todo()).await?);
    assert_eq!(ja, c.get("notes", &todo()).await?);
    for who in ["a", "b", "c"] {
        assert_eq!(ja[who].as_array().map(|m| m.len()), Some(30), "{who}: {ja}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_node_catches_up_and_its_offline_edits_flow_out() -> Result<()> {
    let mut n = spawn_nodes(3).await?;
    {
        let (a, b, c) = (&n[0].node, &n[1].node, &n[2].node);
        a.create_space("notes").await?;
        share_space(a, "notes", &[b, c]).await?;
        connect(b, a).await?;
        connect(c, a).await?;
        a.put("notes", &todo(), "/start", json!(0)).await?;
        wait_converged(&[a, b, c], "notes", "todo").await?;
    }
    // c goes away; 100 edits happen on a while it is gone
    n[2].stop().await;
    for i in 0..100 {
        n[0].node
            .put("notes", &todo(), &format!("/a/{i}"), json!(i))
            .await?;
    }
    wait_converged(&[&n[0].node, &n[1].node], "notes", "todo").await?;
    // a and b go too; c comes back alone and edits offline
    n[0].stop().await;
    n[1].stop().await;
    n[2].start().await?;
    for i in 0..10 {
        n[2].node
            .put("notes", &todo(), &format!("/c/{i}"), json!(i))
            .await?;
    }
    // everyone back; new ports, so dial explicitly
    n[0].start().await?;
    n[1].start().await?;
    let (a, b, c) = (&n[0].node, &n[1].node, &n[2].node);
    connect(c, a).await?;
    connect(b, c).await?;
    wait_converged(&[a, b, c], "notes", "todo").await?;
    let j = b.get("notes", &todo()).await?;
    assert_eq!(j["a"].as_array().map(|m| m.len()), Some(100));
    assert_eq!(j["c"].as_array().map(|m| m.len()), Some(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_topology_converges_without_a_direct_link() -> Result<()> {
    // no DHT, so a and c cannot learn of each other through b's table
    let mut n = Vec::new();
    for name in ["a", "b", "c"] {
        n.push(TestNode::spawn_with(name, |c| c.dht = false).await?);
    }
    let (a, b, c) = (&n[0].node, &n[1].node, &n[2].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b, c]).await?;
    connect(a, b).await?;
    connect(c, b).await?;
    a.put("notes", &todo(), "/from_a", json!(1)).await?;
    wait_converged(&[a, b, c], "notes", "todo").await?;
    c.put("notes", &todo(), "/from_c", json!(2)).await?;
    wait_converged(&[a, b, c], "notes", "todo").await?;
    assert_eq!(
        a.get("notes", &todo()).await?,
        json!({"from_a": 1, "from_c": 2})
    );
    let a_peers = a.net_info().await?.peers;
    assert!(
        a_peers.iter().all(|p| p.peer != c.peer_id().to_string()),
        "a and c met directly"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_non_member_learns_nothing() -> Result<()> {
    let n = spawn_nodes(3).await?;
    let (a, b, x) = (&n[0].node, &n[1].node, &n[2].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    // x has a space of the same name: names are local, nothing crosses
    x.create_space("notes").await?;
    x.put("notes", &todo(), "/mine", json!("x")).await?;
    let mut xev = x.events();
    connect(x, a).await?;
    connect(x, b).await?;
    connect(b, a).await?;
    for i in 0..10 {
        a.put("notes", &todo(), &format!("/secret{i}"), json!(i))
            .await?;
    }
    wait_converged(&[a, b], "notes", "todo").await?;
    // x is connected to both, yet proved nothing and received nothing
    assert_eq!(x.net_info().await?.peers.len(), 2);
    assert_eq!(x.get("notes", &todo()).await?, json!({"mine": "x"}));
    assert_eq!(x.spaces().await?.len(), 1);
    assert!(x.spaces().await?[0].peers.is_empty());
    while let Ok(ev) = xev.try_recv() {
        match ev {
            shoal_node::Event::MemberVerified { .. } => panic!("x verified as a member: {ev:?}"),
            shoal_node::Event::DocChanged { origin, .. } => {
                assert_eq!(origin, shoal_node::Origin::Local, "x received a change")
            }
            _ => {}
        }
    }
    assert!(a.spaces().await?[0]
        .peers
        .iter()
        .all(|p| *p != x.peer_id().to_string()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_acknowledged_change() -> Result<()> {
    let mut n = TestNode::spawn("solo").await?;
    n.node.create_space("notes").await?;
    for i in 0..600 {
        // more than the compaction threshold, so a snapshot is exercised
        n.node
            .put("notes", &todo(), &format!("/k{}", i % 50), json!(i))
            .await?;
    }
    let before = n.node.get("notes", &todo()).await?;
    let heads = n.node.heads("notes", &todo()).await?;
    n.restart().await?;
    assert_eq!(n.node.get("notes", &todo()).await?, before);
    assert_eq!(n.node.heads("notes", &todo()).await?, heads);
    // still writable after the restart, with a fresh actor
    n.node.put("notes", &todo(), "/after", json!(true)).await?;
    n.restart().await?;
    assert_eq!(n.node.get("notes", &todo()).await?["after"], json!(true));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_change_goes_by_announce_and_pull() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    connect(b, a).await?;
    a.put("notes", &todo(), "/small", json!(1)).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    // one change far above the gossip inline limit (60 KiB)
    let big = "x".repeat(300 * 1024);
    a.put("notes", &todo(), "/big", json!(big)).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(
        b.get("notes", &todo()).await?["big"].as_str().map(str::len),
        Some(big.len())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_writes_are_refused_locally() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, v) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    a.add_member("notes", v.device_id(), shoal_protocol::Role::Viewer, "v")
        .await?;
    v.import_grant(a.export_grant("notes").await?).await?;
    // before members has synced, v does not know its role and refuses
    assert!(v.put("notes", &todo(), "/x", json!(1)).await.is_err());
    connect(v, a).await?;
    a.put("notes", &todo(), "/x", json!(1)).await?;
    wait_converged(&[a, v], "notes", "todo").await?;
    let err = v.put("notes", &todo(), "/x", json!(2)).await.unwrap_err();
    assert!(err.to_string().contains("viewer"), "{err}");
    // and a viewer cannot export the key
    assert!(v.export_grant("notes").await.is_err());
    Ok(())
}

/// Chaos finding 3: a device whose gossip never reaches the others (its
/// link dropped what it published) had changes nobody else ever got: the
/// others' heads summaries showed they lacked them, but only a device that
/// is behind acted on a summary. Now the device that is ahead offers its
/// changes by sync when a member's summary shows it lacks them. Failed
/// before (B never had A's second change), passes now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_gossip_is_lost_still_gets_its_changes_out() -> Result<()> {
    let n = spawn_nodes_with(2, |i, c| c.drop_gossip = i == 0).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    connect(b, a).await?;
    a.put("notes", &todo(), "/items/0", json!("first")).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    // A later change: A's gossip of it is lost, and A sends no summaries.
    a.put("notes", &todo(), "/items/-", json!("second")).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(
        b.get("notes", &todo()).await?,
        json!({"items": ["first", "second"]})
    );
    Ok(())
}
