//! `shoal config bootstrap ...` (edits config.toml; no node needed) and
//! `shoal doctor` (asks the running node how it reaches the world).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use shoal_node::Home;

use crate::client::Client;

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Bootstrap nodes (`shoal relay` addresses ending in /p2p/<id>).
    #[command(subcommand)]
    Bootstrap(BootstrapCmd),
}

#[derive(Subcommand)]
pub enum BootstrapCmd {
    /// Add a bootstrap node.
    Add {
        /// Its multiaddr, ending in /p2p/<peer id>.
        addr: String,
    },
    /// Remove a bootstrap node.
    Remove {
        /// The address as listed.
        addr: String,
    },
    /// List bootstrap nodes.
    List,
}

pub fn config(home: &Home, cmd: ConfigCmd, json_out: bool) -> Result<()> {
    home.ensure(&crate::host_name())?;
    let path = home.config_path();
    let mut file = home.config()?;
    let ConfigCmd::Bootstrap(cmd) = cmd;
    let changed = match cmd {
        BootstrapCmd::Add { addr } => {
            if file.bootstrap.contains(&addr) {
                false
            } else {
                file.bootstrap.push(addr.clone());
                // The same checks as at start: a clear error now, not later.
                file.build(&path)
                    .with_context(|| format!("{addr} is not a usable bootstrap address"))?;
                true
            }
        }
        BootstrapCmd::Remove { addr } => {
            let before = file.bootstrap.len();
            file.bootstrap.retain(|a| a != &addr);
            if file.bootstrap.len() == before {
                bail!("{addr} is not in the bootstrap list of {}", path.display());
            }
            true
        }
        BootstrapCmd::List => false,
    };
    if changed {
        file.save(&path)?;
    }
    let running = home.lock().is_err();
    crate::print(
        json_out,
        json!({"bootstrap": file.bootstrap, "changed": changed, "restart_needed": changed && running}),
        || {
            let mut s = if file.bootstrap.is_empty() {
                "no bootstrap nodes (LAN only): add one with `shoal config bootstrap add ADDRESS`"
                    .to_string()
            } else {
                file.bootstrap.join("\n")
            };
            if changed && running {
                s.push_str("\nthe running node reads this at start: restart it to use the change");
            }
            s
        },
    );
    Ok(())
}

fn rtt(p: &Value) -> String {
    p["rtt_ms"]
        .as_f64()
        .map(|r| format!("{r:.1} ms"))
        .unwrap_or_else(|| "-".into())
}

pub async fn doctor(c: &Client, json_out: bool) -> Result<()> {
    let net = c.get("/v1/network").await?;
    let spaces = c.get("/v1/spaces").await?;
    let mut report = Vec::new();
    for s in spaces.as_array().into_iter().flatten() {
        let id = s["id"].as_str().unwrap_or("");
        let members = c
            .get(&format!("/v1/spaces/{}/members", crate::enc(id)))
            .await?;
        let peers: Vec<Value> = members
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["this_device"].as_bool() != Some(true))
            .map(|m| {
                let dev = m["device"].as_str().unwrap_or("");
                let conn = net["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["peer"].as_str() == Some(dev));
                json!({
                    "device": dev,
                    "name": m["name"],
                    "connected": conn.is_some(),
                    "path": conn.map(|p| if p["relayed"].as_bool() == Some(true) { "relayed" } else { "direct" }),
                    "rtt_ms": conn.map(|p| p["rtt_ms"].clone()),
                    "addrs": conn.map(|p| p["addrs"].clone()),
                })
            })
            .collect();
        report.push(json!({"space": s["name"], "id": id, "peers": peers}));
    }
    let mut problems = Vec::new();
    let boots = net["bootstrap"].as_array().cloned().unwrap_or_default();
    if boots.is_empty() {
        problems.push(
            "no bootstrap nodes: only devices on this LAN (mDNS) or given with --peer are found"
                .to_string(),
        );
    } else if !boots.iter().any(|b| b["connected"].as_bool() == Some(true)) {
        problems.push("not connected to any bootstrap node".to_string());
    }
    let reach = net["reachability"].as_str().unwrap_or("unknown");
    let reserved = net["reservations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["accepted"].as_bool() == Some(true));
    if reach != "public" && !boots.is_empty() && !reserved {
        problems.push("not publicly reachable and no relay reservation yet".to_string());
    }
    let out = json!({"network": net, "spaces": report, "problems": problems});
    crate::print(json_out, out.clone(), || {
        let mut s = format!(
            "device {}\nreachability: {reach} (AutoNAT)",
            net["peer_id"].as_str().unwrap_or("")
        );
        for a in net["external_addrs"].as_array().into_iter().flatten() {
            s.push_str(&format!("\nreachable at: {}", a.as_str().unwrap_or("")));
        }
        for b in &boots {
            s.push_str(&format!(
                "\nbootstrap {}: {}{}",
                b["addr"].as_str().unwrap_or(""),
                if b["connected"].as_bool() == Some(true) {
                    "connected"
                } else {
                    "NOT connected"
                },
                if b["relay"].as_bool() == Some(true) {
                    ", relay"
                } else {
                    ""
                }
            ));
        }
        for r in net["reservations"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "\nrelay reservation on {}: {}",
                r["relay"].as_str().unwrap_or(""),
                if r["accepted"].as_bool() == Some(true) {
                    "held"
                } else {
                    "asking"
                }
            ));
        }
        for sp in &report {
            s.push_str(&format!("\nspace {}:", sp["space"].as_str().unwrap_or("")));
            let peers = sp["peers"].as_array().cloned().unwrap_or_default();
            if peers.is_empty() {
                s.push_str(" no other members");
            }
            for p in peers {
                let who = match p["name"].as_str() {
                    Some(n) if !n.is_empty() => {
                        format!("{n} ({})", p["device"].as_str().unwrap_or(""))
                    }
                    _ => p["device"].as_str().unwrap_or("").to_string(),
                };
                if p["connected"].as_bool() == Some(true) {
                    s.push_str(&format!(
                        "\n  {who}: connected, {}, {}",
                        p["path"].as_str().unwrap_or(""),
                        rtt(&p)
                    ));
                } else {
                    s.push_str(&format!("\n  {who}: not connected"));
                }
            }
        }
        if problems.is_empty() {
            s.push_str("\nno problems found");
        }
        for p in &problems {
            s.push_str(&format!("\nproblem: {p}"));
        }
        s
    });
    Ok(())
}
