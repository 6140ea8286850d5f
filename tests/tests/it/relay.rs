//! A relay node and devices that cannot dial each other: they have no
//! listen addresses at all and were told nothing about each other, only the
//! relay's address. They must find each other under their space's DHT
//! rendezvous key, connect through a relay circuit, and sync. A client that
//! floods the relay hits its caps while others keep being served.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, ping, relay, tcp, yamux, Multiaddr, StreamProtocol, Swarm};
use shoal_node::config::RelayMode;
use shoal_node::relay::{self as shoal_relay, RelayConfig, RelayHandle};
use shoal_protocol::wire::KAD_PROTOCOL;
use shoal_tests::{share_space, wait_converged, wait_for, TestNode, TIMEOUT};

async fn start_relay(tweak: impl FnOnce(&mut RelayConfig)) -> Result<RelayHandle> {
    let mut config = RelayConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        ..Default::default()
    };
    tweak(&mut config);
    Ok(shoal_relay::spawn(Keypair::generate_ed25519(), &config).await?)
}

/// A device behind a NAT, as far as the test can make one: it listens
/// nowhere, so nobody can dial it except through its relay reservation.
async fn device(name: &str, relay: &RelayHandle) -> Result<TestNode> {
    let bootstrap = relay.addrs().to_vec();
    TestNode::spawn_with(name, move |c| {
        c.listen = Vec::new();
        c.bootstrap = bootstrap;
        c.reservations = RelayMode::Always;
    })
    .await
}

async fn meet_and_sync(a: &TestNode, b: &TestNode, space: &str) -> Result<()> {
    a.node.create_space(space).await?;
    // Membership and keys only: no addresses change hands.
    share_space(&a.node, space, &[&b.node]).await?;
    let doc: shoal_protocol::DocId = "plan".parse()?;
    a.node
        .put(space, &doc, "/where", serde_json::json!("lisbon"))
        .await?;
    wait_converged(&[&a.node, &b.node], space, "plan").await?;
    let got = b.node.get(space, &doc).await?;
    if got["where"] != "lisbon" {
        bail!("B has {got}");
    }
    // They reached each other through the relay, not directly.
    let info = b.node.net_info().await?;
    let a_id = a.node.peer_id().to_string();
    let pa = info
        .peers
        .iter()
        .find(|p| p.peer == a_id)
        .context("B is not connected to A")?;
    if !pa.relayed {
        bail!("B reached A without the relay: {pa:?}");
    }
    if !info.reservations.iter().any(|r| r.accepted) {
        bail!("B holds no accepted reservation: {:?}", info.reservations);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_meet_through_the_relay_dht_and_sync_over_a_circuit() -> Result<()> {
    let relay = start_relay(|_| {}).await?;
    let a = device("a", &relay).await?;
    let b = device("b", &relay).await?;
    meet_and_sync(&a, &b, "trip").await?;
    let s = relay.stats();
    assert!(s.circuits_accepted.load(Ordering::Relaxed) >= 1);
    assert!(s.reservations.load(Ordering::Relaxed) >= 2);
    // The relay's metrics say the same.
    let text = relay.metrics_text();
    assert!(
        text.contains("shoal_relay_circuits_accepted_total"),
        "{text}"
    );
    // and bytes per transport: the circuit's bytes crossed the relay's TCP
    assert!(
        text.lines().any(
            |l| l.starts_with("libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(1000.0)
        ),
        "{text}"
    );

    // A restarted device finds its member again the same way.
    let mut b = b;
    b.restart().await?;
    let doc: shoal_protocol::DocId = "plan".parse()?;
    a.node
        .put("trip", &doc, "/when", serde_json::json!("june"))
        .await?;
    wait_for(&b.node, TIMEOUT, || async {
        b.node
            .get("trip", &doc)
            .await
            .map(|v| v["when"] == "june")
            .unwrap_or(false)
    })
    .await
    .context("the restarted device did not get the change through the relay")?;
    a.stop().await;
    b.stop().await;
    relay.shutdown().await;
    Ok(())
}

/// A stock libp2p client: identify, ping, relay v2 client, and Kademlia
/// under shoal's protocol name. Nothing of shoal's own.
#[derive(NetworkBehaviour)]
struct Stock {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay: relay::client::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
}

fn stock_client() -> Result<Swarm<Stock>> {
    let swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay| {
            let me = key.public().to_peer_id();
            Stock {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/stock/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
                relay,
                kad: kad::Behaviour::with_config(
                    me,
                    MemoryStore::new(me),
                    kad::Config::new(StreamProtocol::new(KAD_PROTOCOL)),
                ),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// Polls `swarm` until `done` says so, or fails after `timeout`.
async fn drive<B: NetworkBehaviour>(
    swarm: &mut Swarm<B>,
    timeout: Duration,
    mut done: impl FnMut(&SwarmEvent<B::ToSwarm>) -> bool,
) -> Result<()> {
    tokio::time::timeout(timeout, async {
        loop {
            let ev = swarm.select_next_some().await;
            if done(&ev) {
                return;
            }
        }
    })
    .await
    .context("timed out driving a stock client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_hits_the_relay_caps_and_others_are_still_served() -> Result<()> {
    let relay = start_relay(|c| {
        c.max_circuits_per_peer = 4;
        c.reservations_per_minute_per_peer = 3;
    })
    .await?;
    let relay_addr: Multiaddr = relay.addrs()[0].clone();

    // A stock client bootstraps from the relay's DHT under our name.
    let mut target = stock_client()?;
    let target_id = *target.local_peer_id();
    target
        .behaviour_mut()
        .kad
        .add_address(&relay.peer_id(), relay_addr.clone());
    target.behaviour_mut().kad.bootstrap()?;
    drive(&mut target, TIMEOUT, |ev| {
        matches!(
            ev,
            SwarmEvent::Behaviour(StockEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::Bootstrap(Ok(_)),
                ..
            }))
        )
    })
    .await
    .context("a stock client could not bootstrap from the relay")?;

    // It reserves a slot, then asks again and again: the rate limit denies.
    target.listen_on(relay_addr.clone().with(Protocol::P2pCircuit))?;
    drive(&mut target, TIMEOUT, |ev| {
        matches!(
            ev,
            SwarmEvent::Behaviour(StockEvent::Relay(
                relay::client::Event::ReservationReqAccepted { .. }
            ))
        )
    })
    .await?;
    for _ in 0..10 {
        target.listen_on(relay_addr.clone().with(Protocol::P2pCircuit))?;
    }
    let mut refused = 0;
    drive(&mut target, TIMEOUT, |ev| {
        if matches!(ev, SwarmEvent::ListenerClosed { reason: Err(_), .. }) {
            refused += 1;
        }

        refused >= 7
    })
    .await
    .context("repeated reservations were not refused")?;
    // The relay counts the requests it refused by rate (others it dropped
    // unread, over its per-connection stream cap); its event may trail the
    // client's.
    let s = relay.stats();
    tokio::time::timeout(TIMEOUT, async {
        while s.reservations_denied.load(Ordering::Relaxed) < 1 {
            let _ =
                tokio::time::timeout(Duration::from_millis(50), target.select_next_some()).await;
        }
    })
    .await
    .context("the relay did not count the refused reservations")?;
    let mut target_task = tokio::spawn(async move {
        loop {
            target.select_next_some().await;
        }
    });

    // A second stock client opens circuit after circuit to the first.
    let mut flooder = stock_client()?;
    let circuit = relay_addr
        .clone()
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(target_id));
    for _ in 0..20 {
        flooder.dial(
            DialOpts::peer_id(target_id)
                .condition(PeerCondition::Always)
                .addresses(vec![circuit.clone()])
                .build(),
        )?;
    }
    let (mut up, mut failed) = (0, 0);
    drive(&mut flooder, TIMEOUT, |ev| {
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if *peer_id == target_id => up += 1,
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(p), ..
            } if *p == target_id => failed += 1,
            _ => {}
        }
        up + failed >= 20
    })
    .await?;
    assert!(up <= 4, "{up} circuits to one peer got through a cap of 4");
    assert!(failed >= 16, "only {failed} circuits were refused");
    tokio::time::timeout(TIMEOUT, async {
        while s.circuits_denied.load(Ordering::Relaxed) < 1 {
            let _ =
                tokio::time::timeout(Duration::from_millis(50), flooder.select_next_some()).await;
        }
    })
    .await
    .with_context(|| {
        format!(
            "the relay did not count the refused circuits: {:?}",
            s.snapshot()
        )
    })?;

    // With the flood still open, two devices meet and sync through the relay.
    let a = device("a", &relay).await?;
    let b = device("b", &relay).await?;
    let mut flood_task = tokio::spawn(async move {
        loop {
            flooder.select_next_some().await;
        }
    });
    meet_and_sync(&a, &b, "ops").await?;
    flood_task.abort();
    target_task.abort();
    let _ = (&mut flood_task).await;
    let _ = (&mut target_task).await;
    a.stop().await;
    b.stop().await;
    relay.shutdown().await;
    Ok(())
}
