//! Connection limits of a device (issue 18, hole 8): a stranger that opens
//! connection after connection is capped, and the node keeps serving.

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{dummy, SwarmEvent};
use libp2p::{noise, tcp, yamux};
use shoal_tests::TestNode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_at_most_eight_connections() -> Result<()> {
    let node = TestNode::spawn("capped").await?;
    let addr = node
        .node
        .listen_addrs()
        .await?
        .into_iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .context("no tcp address")?;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| dummy::Behaviour)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(std::time::Duration::from_secs(60)))
        .build();
    let peer = node.node.peer_id();
    let tries = 16;
    for _ in 0..tries {
        swarm.dial(
            DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::Always)
                .build(),
        )?;
    }
    // The node takes the first eight and closes every connection past
    // them (the dialer sees each one established, then closed).
    let cap = shoal_node::net::behaviour::MAX_CONNECTIONS_PER_PEER;
    let mut closed = 0u32;
    tokio::time::timeout(shoal_tests::TIMEOUT, async {
        while closed < tries - cap {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionClosed { .. }
                | SwarmEvent::OutgoingConnectionError { .. } => closed += 1,
                _ => {}
            }
        }
    })
    .await
    .with_context(|| format!("only {closed} of {tries} connections were refused"))?;
    let held = swarm.network_info().connection_counters().num_established();
    assert!(held <= cap, "{held} connections held open to one stranger");
    // The node still answers.
    node.node.spaces().await?;
    Ok(())
}
