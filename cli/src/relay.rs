//! `shoal relay`: runs a bootstrap + relay node in the foreground. It keeps
//! its identity in its own home (not a device's), reads an optional TOML
//! config whose values flags override, prints the addresses to hand out and
//! its Kademlia protocol name, serves Prometheus metrics where the operator
//! asks, and stops cleanly on SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use shoal_node::relay::{self, RelayConfig};
use shoal_node::Home;

#[derive(Args)]
pub struct RelayArgs {
    /// Config file (TOML; every key optional). Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address (repeatable). Default: TCP and QUIC on port 4001.
    #[arg(long)]
    listen: Vec<String>,
    /// An address others reach this relay on (repeatable). Default: the
    /// listen addresses.
    #[arg(long)]
    external: Vec<String>,
    /// Serve Prometheus `/metrics` on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    metrics: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Reservations held at once.
    #[arg(long)]
    max_reservations: Option<usize>,
    /// Reservations one peer may hold.
    #[arg(long)]
    max_reservations_per_peer: Option<usize>,
    /// Circuits open at once.
    #[arg(long)]
    max_circuits: Option<usize>,
    /// Circuits open at once with one peer at either end.
    #[arg(long)]
    max_circuits_per_peer: Option<usize>,
    /// Longest a circuit stays open, seconds.
    #[arg(long)]
    max_circuit_secs: Option<u64>,
    /// Most bytes one circuit carries.
    #[arg(long)]
    max_circuit_bytes: Option<u64>,
    /// Connections at once.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Connections at once from one peer.
    #[arg(long)]
    max_connections_per_peer: Option<u32>,
    /// Answer AutoNAT probes of private addresses too (private networks
    /// and labs).
    #[arg(long)]
    autonat_private: bool,
}

fn default_relay_home() -> Result<PathBuf> {
    directories::ProjectDirs::from("", "", "shoal-relay")
        .map(|d| d.data_dir().to_path_buf())
        .context("cannot find a data folder for the relay's home; pass --home")
}

fn settings(args: &RelayArgs) -> Result<RelayConfig> {
    let mut c = match &args.config {
        Some(p) => RelayConfig::load(p)?,
        None => RelayConfig::default(),
    };
    if !args.listen.is_empty() {
        c.listen = args.listen.clone();
    }
    if !args.external.is_empty() {
        c.external = args.external.clone();
    }
    if args.metrics.is_some() {
        c.metrics = args.metrics.clone();
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = args.$f { c.$f = v; } )* };
    }
    set!(
        max_reservations,
        max_reservations_per_peer,
        max_circuits,
        max_circuits_per_peer,
        max_circuit_secs,
        max_circuit_bytes,
        max_connections,
        max_connections_per_peer
    );
    if args.autonat_private {
        c.autonat_only_global = false;
    }
    Ok(c)
}

pub async fn run(home: Option<PathBuf>, args: RelayArgs, json_out: bool) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,shoal_node=info,shoal=info,libp2p_kad=error".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let config = settings(&args)?;
    let home = Home::at(match home {
        Some(h) => h,
        None => default_relay_home()?,
    });
    let key = home.identity_or_create()?;
    let _lock = home.lock()?;
    let handle = Arc::new(
        relay::spawn(key, &config)
            .await
            .context("cannot start the relay")?,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics = match &config.metrics {
        Some(a) => {
            let addr = a
                .parse()
                .with_context(|| format!("metrics address {a:?} is not IP:PORT"))?;
            let mut rx = stop_rx.clone();
            let (local, task) = relay::serve_metrics(Arc::clone(&handle), addr, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await?;
            Some((local, task))
        }
        None => None,
    };
    let addrs: Vec<String> = handle.addrs().iter().map(|a| a.to_string()).collect();
    let kad = shoal_protocol::wire::KAD_PROTOCOL;
    crate::print(
        json_out,
        json!({
            "peer_id": handle.peer_id().to_string(),
            "addrs": addrs,
            "kad_protocol": kad,
            "metrics": metrics.as_ref().map(|(a, _)| format!("http://{a}/metrics")),
            "home": home.dir(),
        }),
        || {
            let mut s = format!("shoal relay {} is up\n", handle.peer_id());
            for a in &addrs {
                s.push_str(&format!("address: {a}\n"));
            }
            s.push_str(&format!("kademlia protocol: {kad}\n"));
            if let Some((a, _)) = &metrics {
                s.push_str(&format!("metrics: http://{a}/metrics\n"));
            }
            s.push_str("users add it with `shoal config bootstrap add ADDRESS`; stop with Ctrl-C or SIGTERM");
            s
        },
    );
    crate::wait_for_signal().await;
    tracing::info!("stopping the relay");
    let _ = stop_tx.send(true);
    handle.shutdown().await;
    if let Some((_, task)) = metrics {
        let _ = task.await;
    }
    Ok(())
}
