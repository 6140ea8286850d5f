//! `shoal`: run a node (`shoal up`) or talk to the running one through its
//! local HTTP API. Every command takes `--home` (or `SHOAL_HOME`) and
//! `--json`. `main` returns an exit code and prints the error chain.

mod client;
mod history;
mod netcmd;
mod relay;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use shoal_node::{Home, Node};

use crate::client::Client;

#[derive(Parser)]
#[command(name = "shoal", version, about = "Peer-to-peer sync node")]
struct Cli {
    /// Home folder (identity, config, store). Default: the platform's data dir.
    #[arg(long, global = true, env = "SHOAL_HOME")]
    home: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the home: identity key (0600), config.toml, API token.
    Init {
        /// This device's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the node in the foreground (initialises a fresh home first).
    Up(UpArgs),
    /// This device's id and listen addresses.
    Id,
    /// Connected peers.
    Peers,
    /// Spaces.
    #[command(subcommand)]
    Space(SpaceCmd),
    /// Documents.
    #[command(subcommand)]
    Doc(DocCmd),
    /// Members of a space.
    Members {
        /// Space name or id.
        space: String,
    },
    /// Issue an invite code for a space (owners), or `invite cancel`.
    Invite(InviteArgs),
    /// Pending and past invites of a space.
    Invites {
        /// Space name or id.
        space: String,
    },
    /// Join a space with an invite code.
    Join {
        /// The code (`shoal1...`).
        code: String,
        /// Sync the space into this folder (created if missing).
        #[arg(long)]
        folder: Option<PathBuf>,
        /// How long to keep trying to reach the inviter.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Change a member's role (owners only).
    Role {
        /// Space name or id.
        space: String,
        /// Device id.
        device: String,
        /// owner, editor or viewer.
        role: String,
    },
    /// Remove a device from a space and rotate the space key (owners only).
    Revoke {
        /// Space name or id.
        space: String,
        /// Device id.
        device: String,
    },
    /// Folders synced by spaces.
    #[command(subcommand)]
    Folder(FolderCmd),
    /// Per space: sync state, files and bytes left, rate, ETA, peers.
    Status,
    /// The synced tree of a space as the index sees it.
    Ls {
        /// Space name or id.
        space: String,
        /// Only paths under this one.
        path: Option<String>,
    },
    /// Conflict copies in a space: which file, which device, when.
    Conflicts {
        /// Space name or id.
        space: String,
    },
    /// Every version of a file: when, which device, size, hash, and where
    /// its content is (here, kept, on a peer, gone).
    History {
        /// Space name or id.
        space: String,
        /// The file's path in the folder.
        path: String,
    },
    /// Bring back a version, a deleted file, or a folder as it was.
    Restore(history::RestoreArgs),
    /// Deleted files: when, by which device; `shoal restore SPACE PATH`.
    Trash {
        /// Space name or id.
        space: String,
    },
    /// Name the folder's current state (restore it with --snapshot).
    Snapshot {
        /// Space name or id.
        space: String,
        /// The snapshot's name.
        name: String,
    },
    /// This device's snapshots of a space.
    Snapshots {
        /// Space name or id.
        space: String,
    },
    /// Print live events as they happen (Ctrl-C to stop).
    Watch {
        /// Only this space (name or id).
        space: Option<String>,
        /// Event groups or types, comma-separated: doc, file, transfer,
        /// progress, error, folder, peer, member, rejected (or e.g. doc_changed).
        #[arg(long = "type")]
        types: Option<String>,
        /// Only documents whose id matches this glob.
        #[arg(long)]
        doc: Option<String>,
        /// Only files whose path matches this glob (`docs/**`).
        #[arg(long)]
        path: Option<String>,
        /// Only changes written by this device.
        #[arg(long)]
        author: Option<String>,
    },
    /// Run a bootstrap + relay node for devices behind NATs (runs until
    /// stopped; SIGTERM or Ctrl-C shut it down cleanly).
    Relay(relay::RelayArgs),
    /// Edit this device's config.toml.
    #[command(subcommand)]
    Config(netcmd::ConfigCmd),
    /// Reachability (AutoNAT), bootstrap nodes, relay reservations, and for
    /// each peer of each space: connected, direct or relayed, latency.
    Doctor,
    /// Print a one-time login link for the dashboard the node serves (it
    /// works once, for 10 minutes).
    Dashboard {
        /// Open it in this user's browser (xdg-open).
        #[arg(long)]
        open: bool,
    },
    /// Add a device to a space, or change its role (owners only).
    Member {
        /// Space name or id.
        space: String,
        /// Device id.
        device: String,
        /// owner, editor or viewer.
        #[arg(long, default_value = "editor")]
        role: String,
        /// A name for the device.
        #[arg(long, default_value = "")]
        name: String,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct InviteArgs {
    #[command(subcommand)]
    action: Option<InviteAction>,
    /// Space name or id.
    space: Option<String>,
    /// Role of the device that joins: owner, editor or viewer.
    #[arg(long, default_value = "editor")]
    role: String,
    /// How long the code stays valid (e.g. 30m, 24h, 7d).
    #[arg(long, default_value = "24h")]
    expires: String,
    /// How many devices may join with it.
    #[arg(long, default_value_t = 1)]
    uses: u32,
}

#[derive(Subcommand)]
enum InviteAction {
    /// Cancel an invite.
    Cancel {
        /// Space name or id.
        space: String,
        /// Invite id (from `shoal invites`).
        id: String,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Dial this peer at start (repeatable).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Listen address (repeatable). Default: TCP and QUIC on all interfaces.
    #[arg(long)]
    listen: Vec<String>,
    /// Turn LAN discovery (mDNS) off.
    #[arg(long)]
    no_mdns: bool,
    /// Local API address (loopback only).
    #[arg(long)]
    api: Option<String>,
    /// Sync this folder (created if missing): in the space it is attached
    /// to, or else in a new space named after it.
    #[arg(long)]
    folder: Option<PathBuf>,
}

#[derive(Subcommand)]
enum FolderCmd {
    /// Give an existing space a folder on this device and start syncing it.
    Attach {
        /// Space name or id.
        space: String,
        /// The folder (created if missing).
        path: PathBuf,
    },
    /// Apply the deletions and overwrites the mass-delete guard holds
    /// (`shoal status` says when it holds any).
    Accept {
        /// Space name or id.
        space: String,
    },
}

#[derive(Subcommand)]
enum SpaceCmd {
    /// Create a space; this device becomes its owner.
    Create {
        /// Its name.
        name: String,
        /// Sync the space into this folder (created if missing).
        #[arg(long)]
        folder: Option<PathBuf>,
    },
    /// List spaces.
    List,
    /// Write the space's key material to a file (mode 0600) for manual
    /// pairing of another device (owners only; until invite codes exist).
    Grant {
        /// Space name or id.
        space: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Join a space from a file written by `shoal space grant`.
    Import {
        /// The grant file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum DocCmd {
    /// Put a JSON value at a JSON-pointer path ('' is the root).
    Put {
        /// Space name or id.
        space: String,
        /// Document id.
        doc: String,
        /// JSON pointer, e.g. /items/0.
        path: String,
        /// JSON value, e.g. '"buy milk"'.
        value: String,
    },
    /// Delete the value at a JSON-pointer path.
    Del {
        /// Space name or id.
        space: String,
        /// Document id.
        doc: String,
        /// JSON pointer.
        path: String,
    },
    /// Print a document as JSON.
    Get {
        /// Space name or id.
        space: String,
        /// Document id.
        doc: String,
    },
    /// List the documents of a space.
    List {
        /// Space name or id.
        space: String,
    },
    /// Print a document's `automerge:` URL (for an automerge-repo client's
    /// find), or with no document the space's `ws://` address for
    /// automerge-repo clients, its key included.
    Url {
        /// Space name or id.
        space: String,
        /// Document id.
        doc: Option<String>,
    },
}

fn default_home() -> Result<PathBuf> {
    directories::ProjectDirs::from("", "", "shoal")
        .map(|d| d.data_dir().to_path_buf())
        .context("cannot find a data folder for the home; pass --home or set SHOAL_HOME")
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "device".into())
}

fn main() -> ExitCode {
    shoal_node::memory::limit_arenas();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let home = Home::at(match &cli.home {
        Some(h) => h.clone(),
        None => default_home()?,
    });
    // Few blocking threads, and they end a second after their last job
    // (tokio's default is ten): a node at rest should stay small, and each
    // idle thread keeps its stack and its malloc cache.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .build()
        .context("start the async runtime")?;
    match cli.cmd {
        Cmd::Init { name } => {
            let name = name.unwrap_or_else(host_name);
            home.init(&name)?;
            let id = home.keypair()?.public().to_peer_id();
            print(
                cli.json,
                json!({"home": home.dir(), "device_id": id.to_string(), "name": name}),
                || {
                    format!(
                        "initialised {} for {name}\ndevice id: {id}",
                        home.dir().display()
                    )
                },
            );
            Ok(())
        }
        Cmd::Up(args) => rt.block_on(up(home, args, cli.json)),
        Cmd::Relay(args) => rt.block_on(relay::run(cli.home, args, cli.json)),
        Cmd::Config(cmd) => netcmd::config(&home, cmd, cli.json),
        cmd => rt.block_on(async {
            let client = Client::new(&home)?;
            command(&client, cmd, cli.json).await
        }),
    }
}

pub(crate) fn print(json_out: bool, v: Value, human: impl FnOnce() -> String) {
    if json_out {
        println!("{v}");
    } else {
        println!("{}", human());
    }
}

async fn up(home: Home, args: UpArgs, json_out: bool) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,shoal_node=info,shoal=info,libp2p_kad=error".into()),
        )
        .with_writer(std::io::stderr)
        // plain text for a service manager's journal, colours on a terminal
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if home.ensure(&host_name())? {
        eprintln!("initialised a new home at {}", home.dir().display());
    }
    let mut file = home.config()?;
    if !args.listen.is_empty() {
        file.listen = args.listen;
    }
    file.peers.extend(args.peers);
    if args.no_mdns {
        file.mdns = false;
    }
    if let Some(api) = args.api {
        file.api = api;
    }
    let config = file.build(&home.config_path())?;
    let node = Node::start(&home, config.clone())
        .await
        .with_context(|| format!("cannot start a node on {}", home.dir().display()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (api_addr, api_task) =
        shoal_node::api::serve(node.clone(), home.api_token()?, config.api, async {
            let _ = stop_rx.await;
        })
        .await?;
    shoal_node::home::write_private(&home.api_addr_path(), api_addr.to_string().as_bytes())?;
    let synced = match &args.folder {
        Some(f) => Some(ensure_folder(&node, f).await?),
        None => None,
    };
    let info = node.net_info().await?;
    let addrs: Vec<String> = info.listen_addrs.iter().map(|a| a.to_string()).collect();
    let login = format!("http://{api_addr}{}", node.dashboard_login());
    print(
        json_out,
        json!({"device_id": info.peer_id, "name": node.name(), "listen_addrs": addrs,
            "api": api_addr.to_string(), "dashboard": login}),
        || {
            let mut s = format!(
                "shoal node {} ({}) is up\napi: http://{api_addr}\n\
                 dashboard: {login}\n  (a one-time login link; `shoal dashboard` prints a new one)\n",
                node.name(),
                info.peer_id
            );
            for a in &addrs {
                s.push_str(&format!("listening: {a}\n"));
            }
            if let Some((space, path)) = &synced {
                s.push_str(&format!(
                    "syncing {path} (space {space}); add a device with `shoal invite {space}`\n"
                ));
            }
            s.push_str("stop with Ctrl-C");
            s
        },
    );
    let bars = (!json_out && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| tokio::spawn(progress_bars(node.clone())));
    inject_fault(&node);
    let failed = tokio::select! {
        () = wait_for_signal() => None,
        f = node.wait_failed() => Some(f),
    };
    if let Some(b) = bars {
        b.abort();
    }
    let _ = stop_tx.send(());
    match failed {
        None => {
            eprintln!("shutting down");
            let _ = api_task.await;
            node.shutdown().await;
            let _ = std::fs::remove_file(home.api_addr_path());
            Ok(())
        }
        Some(f) => {
            // A panicked task's state is gone: flush what the others hold
            // (bounded: they may be waiting on the dead one), then exit
            // non-zero so a service manager starts the node again from its
            // home.
            let _ = tokio::time::timeout(FAILED_SHUTDOWN, async {
                let _ = api_task.await;
                node.shutdown().await;
            })
            .await;
            let _ = std::fs::remove_file(home.api_addr_path());
            bail!("the node failed: {f}; exiting so that it can be restarted")
        }
    }
}

/// How long a failed node gets to flush and close before the process exits.
const FAILED_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(10);

/// Test-only fault injection: `SHOAL_FAULT=<task>-panic` (`engine-panic`,
/// `network-panic`, `blob-server-panic`, `folder-worker-panic`,
/// `api-panic`) makes that task of `shoal up`'s node panic once it is up.
/// Read here only, never by the node library.
fn inject_fault(node: &Node) {
    if let Some(actor) = std::env::var("SHOAL_FAULT")
        .ok()
        .as_deref()
        .and_then(|f| f.strip_suffix("-panic"))
    {
        tracing::warn!(actor, "SHOAL_FAULT: injecting a panic (tests only)");
        node.inject_fault(actor);
    }
}

/// Makes sure `folder` is synced: already attached, or attached to a new
/// space named after it. Returns (space name, folder).
async fn ensure_folder(node: &Node, folder: &Path) -> Result<(String, String)> {
    std::fs::create_dir_all(folder).with_context(|| format!("create {}", folder.display()))?;
    let abs = folder
        .canonicalize()
        .with_context(|| format!("resolve {}", folder.display()))?;
    let shown = abs.display().to_string();
    let spaces = node.spaces().await?;
    for f in node.folder_status().await {
        if f.path == shown {
            let name = spaces
                .iter()
                .find(|s| s.id == f.space)
                .map(|s| s.name.clone())
                .unwrap_or(f.space);
            return Ok((name, shown));
        }
    }
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "shoal".into());
    if !spaces.iter().any(|s| s.name == name) {
        node.create_space(&name).await?;
    }
    node.attach_folder(&name, &abs)
        .await
        .with_context(|| format!("sync {shown} in space {name}"))?;
    Ok((name, shown))
}

/// Progress bars on the terminal while folders scan or transfer: one per
/// folder, filled as its bytes left go down, gone when it is in sync.
async fn progress_bars(node: Node) {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars: std::collections::HashMap<String, ProgressBar> = Default::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tick.tick().await;
        for f in node.folder_status().await {
            let busy = f.state == shoal_node::folder::FolderState::Scanning || f.bytes_left > 0;
            match (busy, bars.get(&f.space)) {
                (true, Some(bar)) => {
                    let total = bar.length().unwrap_or(0).max(bar.position() + f.bytes_left);
                    bar.set_length(total);
                    bar.set_position(total - f.bytes_left);
                    bar.set_message(format!("{} file(s) left {}", f.files_left, f.state));
                }
                (true, None) => {
                    let bar = multi.add(ProgressBar::new(f.bytes_left));
                    bar.set_style(style.clone());
                    let name = std::path::Path::new(&f.path)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    bar.set_prefix(name);
                    bars.insert(f.space.clone(), bar);
                }
                (false, Some(_)) => {
                    if let Some(bar) = bars.remove(&f.space) {
                        bar.finish_and_clear();
                    }
                }
                (false, None) => {}
            }
        }
    }
}

pub(crate) async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn command(c: &Client, cmd: Cmd, json_out: bool) -> Result<()> {
    match cmd {
        Cmd::Id => {
            let v = c.get("/v1/id").await?;
            print(json_out, v.clone(), || {
                let mut s = format!(
                    "device id: {}\nname: {}",
                    v["device_id"].as_str().unwrap_or(""),
                    v["name"].as_str().unwrap_or("")
                );
                for a in v["listen_addrs"].as_array().into_iter().flatten() {
                    s.push_str(&format!("\nlistening: {}", a.as_str().unwrap_or("")));
                }
                s
            });
        }
        Cmd::Peers => {
            let v = c.get("/v1/peers").await?;
            print(json_out, v.clone(), || {
                let peers = v.as_array().cloned().unwrap_or_default();
                if peers.is_empty() {
                    return "no peers connected".into();
                }
                peers
                    .iter()
                    .map(|p| {
                        let rtt = p["rtt_ms"]
                            .as_f64()
                            .map(|r| format!("{r:.1} ms"))
                            .unwrap_or_else(|| "-".into());
                        let path = if p["relayed"].as_bool() == Some(true) {
                            "relayed"
                        } else {
                            "direct"
                        };
                        let spaces: Vec<&str> = p["spaces"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
                            .unwrap_or_default();
                        let addrs: Vec<&str> = p["addrs"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
                            .unwrap_or_default();
                        format!(
                            "{}  {path}  {rtt}  spaces: {}  {}",
                            p["peer"].as_str().unwrap_or(""),
                            if spaces.is_empty() {
                                "-".into()
                            } else {
                                spaces.join(", ")
                            },
                            addrs.join(" ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Space(SpaceCmd::Create { name, folder }) => {
            let folder = folder.map(absolute).transpose()?;
            let v = c
                .post("/v1/spaces", json!({"name": name, "folder": folder}))
                .await?;
            print(json_out, v.clone(), || {
                let mut s = format!(
                    "created space {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or("")
                );
                if let Some(f) = &folder {
                    s.push_str(&format!(
                        "
syncing {f}"
                    ));
                }
                s
            });
        }
        Cmd::Folder(FolderCmd::Accept { space }) => {
            let v = c
                .post(
                    &format!("/v1/spaces/{}/folder/accept", enc(&space)),
                    json!({}),
                )
                .await?;
            print(json_out, v.clone(), || {
                match v["released"].as_u64().unwrap_or(0) {
                    0 => format!("nothing was held in {space}"),
                    n => format!("applying {n} held deletions and overwrites in {space}"),
                }
            });
        }
        Cmd::Folder(FolderCmd::Attach { space, path }) => {
            let path = absolute(path)?;
            let v = c
                .put(
                    &format!("/v1/spaces/{}/folder", enc(&space)),
                    json!({"path": path}),
                )
                .await?;
            print(json_out, v, || format!("{space} now syncs {path}"));
        }
        Cmd::Doctor => netcmd::doctor(c, json_out).await?,
        Cmd::Dashboard { open } => {
            let v = c.post("/v1/dashboard/login", json!({})).await?;
            let url = v["url"].as_str().unwrap_or_default().to_string();
            print(json_out, v.clone(), || url.clone());
            if open {
                std::process::Command::new("xdg-open")
                    .arg(&url)
                    .status()
                    .context("cannot run xdg-open; open the link above yourself")?;
            }
        }
        Cmd::History { space, path } => history::history(c, json_out, &space, &path).await?,
        Cmd::Trash { space } => history::trash(c, json_out, &space).await?,
        Cmd::Restore(a) => history::restore(c, json_out, a).await?,
        Cmd::Snapshot { space, name } => history::snapshot(c, json_out, &space, &name).await?,
        Cmd::Snapshots { space } => history::snapshots(c, json_out, &space).await?,
        Cmd::Status => {
            let v = c.get("/v1/status").await?;
            print(json_out, v.clone(), || status_text(&v));
        }
        Cmd::Ls { space, path } => {
            let prefix = path.unwrap_or_default();
            let v = c
                .get(&format!(
                    "/v1/spaces/{}/files?prefix={}",
                    enc(&space),
                    enc(&prefix)
                ))
                .await?;
            print(json_out, v.clone(), || {
                let files = v.as_array().cloned().unwrap_or_default();
                if files.is_empty() {
                    return "no files".into();
                }
                files
                    .iter()
                    .map(|f| {
                        let kind = f["kind"].as_str().unwrap_or("");
                        let name = f["path"].as_str().unwrap_or("");
                        match kind {
                            "dir" => format!("{:>12}  {name}/", "-"),
                            "symlink" => format!(
                                "{:>12}  {name} -> {}",
                                "link",
                                f["target"].as_str().unwrap_or("")
                            ),
                            _ => format!(
                                "{:>12}  {name}",
                                human_bytes(f["size"].as_u64().unwrap_or(0))
                            ),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Conflicts { space } => {
            let v = c
                .get(&format!("/v1/spaces/{}/conflicts", enc(&space)))
                .await?;
            print(json_out, v.clone(), || {
                let list = v.as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    return format!("no conflicts in {space}");
                }
                list.iter()
                    .map(|c| {
                        format!(
                            "{}\n    copy of {} written by device …{} at {} UTC",
                            c["copy"].as_str().unwrap_or(""),
                            c["original"].as_str().unwrap_or(""),
                            c["device"].as_str().unwrap_or(""),
                            c["when"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Space(SpaceCmd::List) => {
            let v = c.get("/v1/spaces").await?;
            print(json_out, v.clone(), || {
                let spaces = v.as_array().cloned().unwrap_or_default();
                if spaces.is_empty() {
                    return "no spaces yet: create one with `shoal space create NAME`".into();
                }
                spaces
                    .iter()
                    .map(|s| {
                        format!(
                            "{}  {}  role={}  docs={}  peers={}",
                            s["name"].as_str().unwrap_or(""),
                            s["id"].as_str().unwrap_or(""),
                            s["role"].as_str().unwrap_or("unknown"),
                            s["docs"].as_array().map_or(0, |d| d.len()),
                            s["peers"].as_array().map_or(0, |d| d.len()),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Space(SpaceCmd::Grant { space, out }) => {
            let v = c.get(&format!("/v1/spaces/{}/grant", enc(&space))).await?;
            shoal_node::home::write_private(&out, v.to_string().as_bytes())?;
            print(json_out, json!({"file": out}), || {
                format!(
                    "wrote the key material of {space} to {} (keep it secret)",
                    out.display()
                )
            });
        }
        Cmd::Space(SpaceCmd::Import { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let grant: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a grant file", file.display()))?;
            let v = c.post("/v1/grants", grant).await?;
            print(json_out, v.clone(), || {
                format!(
                    "joined space {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or("")
                )
            });
        }
        Cmd::Doc(DocCmd::Put {
            space,
            doc,
            path,
            value,
        }) => {
            let value: Value = serde_json::from_str(&value).with_context(|| {
                format!("the value {value:?} is not JSON (quote strings: '\"text\"')")
            })?;
            let v = c
                .put(
                    &doc_url(&space, &doc),
                    json!({"path": path, "value": value}),
                )
                .await?;
            print(json_out, v, || format!("ok: {doc} {path}"));
        }
        Cmd::Doc(DocCmd::Del { space, doc, path }) => {
            let v = c
                .delete(&doc_url(&space, &doc), json!({"path": path}))
                .await?;
            print(json_out, v, || format!("deleted: {doc} {path}"));
        }
        Cmd::Doc(DocCmd::Get { space, doc }) => {
            let v = c.get(&doc_url(&space, &doc)).await?;
            print(json_out, v.clone(), || {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            });
        }
        Cmd::Doc(DocCmd::Url { space, doc }) => {
            let path = match &doc {
                Some(d) => format!("{}/url", doc_url(&space, d)),
                None => format!("/v1/spaces/{}/apps", enc(&space)),
            };
            let v = c.get(&path).await?;
            print(json_out, v.clone(), || {
                v["url"].as_str().unwrap_or_default().to_string()
            });
        }
        Cmd::Doc(DocCmd::List { space }) => {
            let v = c.get(&format!("/v1/spaces/{}/docs", enc(&space))).await?;
            print(json_out, v.clone(), || {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Members { space } => {
            let v = c
                .get(&format!("/v1/spaces/{}/members", enc(&space)))
                .await?;
            print(json_out, v.clone(), || {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| {
                        format!(
                            "{}  {}  {}  {}",
                            m["device"].as_str().unwrap_or(""),
                            m["role"].as_str().unwrap_or(""),
                            m["name"].as_str().unwrap_or(""),
                            if m["this_device"].as_bool() == Some(true) {
                                "this device".to_string()
                            } else {
                                seen(&m["connected"], &m["last_seen"])
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Member {
            space,
            device,
            role,
            name,
        } => {
            let v = c
                .post(
                    &format!("/v1/spaces/{}/members", enc(&space)),
                    json!({"device": device, "role": role, "name": name}),
                )
                .await?;
            print(json_out, v, || format!("{device} is now {role} in {space}"));
        }
        Cmd::Invite(InviteArgs {
            action: Some(InviteAction::Cancel { space, id }),
            ..
        }) => {
            let v = c
                .delete(
                    &format!("/v1/spaces/{}/invites/{}", enc(&space), enc(&id)),
                    json!({}),
                )
                .await?;
            print(json_out, v, || format!("invite {id} cancelled"));
        }
        Cmd::Invite(InviteArgs {
            action: None,
            space,
            role,
            expires,
            uses,
        }) => {
            let space = space.context("which space? `shoal invite SPACE`")?;
            let expires = humantime::parse_duration(&expires).with_context(|| {
                format!("--expires {expires:?} is not a duration like 30m, 24h or 7d")
            })?;
            let v = c
                .post(
                    &format!("/v1/spaces/{}/invites", enc(&space)),
                    json!({"role": role, "expires_secs": expires.as_secs(), "uses": uses}),
                )
                .await?;
            let code = v["code"].as_str().unwrap_or("").to_string();
            print(json_out, v.clone(), || {
                let qr = qrcode::QrCode::new(code.to_uppercase())
                    .map(|q| {
                        q.render::<qrcode::render::unicode::Dense1x2>()
                            .quiet_zone(true)
                            .build()
                    })
                    .unwrap_or_default();
                format!(
                    "{code}\n\n{qr}\ninvite {} for {space} as {role}: {} use(s), expires in {}\non the new device: shoal join <CODE>",
                    v["id"].as_str().unwrap_or(""),
                    uses,
                    humantime::format_duration(expires),
                )
            });
        }
        Cmd::Invites { space } => {
            let v = c
                .get(&format!("/v1/spaces/{}/invites", enc(&space)))
                .await?;
            print(json_out, v.clone(), || {
                let list = v.as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    return "no invites".into();
                }
                list.iter()
                    .map(|i| {
                        format!(
                            "{}  {}  {}  uses left {}  expires {}",
                            i["id"].as_str().unwrap_or(""),
                            i["state"].as_str().unwrap_or(""),
                            i["role"].as_str().unwrap_or(""),
                            i["uses_left"],
                            i["expires_at"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Join {
            code,
            timeout,
            folder,
        } => {
            let folder = folder.map(absolute).transpose()?;
            let t = humantime::parse_duration(&timeout).with_context(|| {
                format!("--timeout {timeout:?} is not a duration like 30s or 2m")
            })?;
            let v = c
                .post_with_timeout(
                    "/v1/join",
                    json!({"code": code, "timeout_secs": t.as_secs().max(1), "folder": folder}),
                    t,
                )
                .await?;
            let id = v["id"].as_str().unwrap_or("").to_string();
            // Wait (bounded) for `members` to arrive, so we can say our role.
            let mut space = v.clone();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while space["role"].is_null() && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                space = c.get(&format!("/v1/spaces/{id}")).await.unwrap_or(space);
            }
            print(json_out, space.clone(), || {
                format!(
                    "joined {} ({}) as {}; documents: {}",
                    space["name"].as_str().unwrap_or(""),
                    id,
                    space["role"].as_str().unwrap_or("(role not yet known)"),
                    space["docs"]
                        .as_array()
                        .map(|d| d
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "none yet".into())
                )
            });
        }
        Cmd::Role {
            space,
            device,
            role,
        } => {
            let v = c
                .put(
                    &format!("/v1/spaces/{}/members/{}", enc(&space), enc(&device)),
                    json!({"role": role}),
                )
                .await?;
            print(json_out, v, || format!("{device} is now {role} in {space}"));
        }
        Cmd::Revoke { space, device } => {
            let v = c
                .delete(
                    &format!("/v1/spaces/{}/members/{}", enc(&space), enc(&device)),
                    json!({}),
                )
                .await?;
            print(json_out, v.clone(), || {
                let mut out = format!(
                    "{device} removed from {space}; the space key is now at epoch {}",
                    v["epoch"]
                );
                for d in v["not_rekeyed"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\nwarning: {} has no x25519 key in members and did not get the new key; invite it again",
                        d.as_str().unwrap_or("")
                    ));
                }
                out
            });
        }
        Cmd::Watch {
            space,
            types,
            doc,
            path,
            author,
        } => {
            use eventsource_stream::Eventsource;
            use futures::StreamExt;
            let q: Vec<String> = [
                ("space", space),
                ("types", types),
                ("doc", doc),
                ("path", path),
                ("author", author),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={}", enc(&v))))
            .collect();
            let resp = c.stream(&format!("/v1/events?{}", q.join("&"))).await?;
            let mut events = resp.bytes_stream().eventsource();
            while let Some(ev) = events.next().await {
                let ev = ev.context("the event stream broke")?;
                if json_out {
                    println!("{}", ev.data);
                    continue;
                }
                let v: Value = serde_json::from_str(&ev.data).unwrap_or_default();
                let t = v["type"].as_str().unwrap_or("");
                let line = match t {
                    "doc_changed" => format!(
                        "{} {} changed ({}) by {}",
                        v["space"].as_str().unwrap_or("").get(..8).unwrap_or(""),
                        v["doc"].as_str().unwrap_or(""),
                        v["origin"].as_str().unwrap_or(""),
                        v["authors"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(", "))
                            .unwrap_or_default()
                    ),
                    "lagged" => format!("(too slow: {} events missed)", v["dropped"]),
                    "file_changed" => format!(
                        "{} {} {} ({}, {})",
                        v["space"].as_str().unwrap_or("").get(..8).unwrap_or(""),
                        v["path"].as_str().unwrap_or(""),
                        if v["deleted"].as_bool() == Some(true) {
                            "deleted"
                        } else {
                            "changed"
                        },
                        v["origin"].as_str().unwrap_or(""),
                        human_bytes(v["size"].as_u64().unwrap_or(0))
                    ),
                    "conflict" => format!(
                        "conflict on {}: the other version is kept as {}",
                        v["path"].as_str().unwrap_or(""),
                        v["copy"].as_str().unwrap_or("")
                    ),
                    "transfer_started" | "transfer_finished" | "folder_error" => format!(
                        "{t} {} {}",
                        v["path"].as_str().unwrap_or(""),
                        v["error"]
                            .as_str()
                            .map(String::from)
                            .unwrap_or_else(|| human_bytes(v["bytes"].as_u64().unwrap_or(0)))
                    ),
                    "node_failed" => format!(
                        "node failed: {} panicked: {}",
                        v["actor"].as_str().unwrap_or(""),
                        v["error"].as_str().unwrap_or("")
                    ),
                    "sync_progress" => format!(
                        "{} {} {}% ({} file(s), {} left at {}/s)",
                        v["space"].as_str().unwrap_or("").get(..8).unwrap_or(""),
                        v["state"].as_str().unwrap_or(""),
                        v["progress"].as_f64().unwrap_or(0.0),
                        v["files_left"],
                        human_bytes(v["bytes_left"].as_u64().unwrap_or(0)),
                        human_bytes(v["rate"].as_u64().unwrap_or(0))
                    ),
                    _ => format!("{t} {}", v["peer"].as_str().unwrap_or("")),
                };
                println!("{line}");
            }
        }
        Cmd::Init { .. } | Cmd::Up(_) | Cmd::Relay(_) | Cmd::Config(_) => {}
    }
    Ok(())
}

/// "connected", "last seen 5m ago" or "never seen" for the members list.
fn seen(connected: &Value, last: &Value) -> String {
    if connected.as_bool() == Some(true) {
        return "connected".into();
    }
    let Some(t) = last.as_u64() else {
        return "not seen by this device".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(t);
    let ago = std::time::Duration::from_secs(now.saturating_sub(t));
    format!("last seen {} ago", humantime::format_duration(ago))
}

/// An absolute, UTF-8 form of a folder given on the command line (the
/// node runs elsewhere and cannot resolve our relative paths).
fn absolute(p: PathBuf) -> Result<String> {
    let abs = std::path::absolute(&p).with_context(|| format!("resolve {}", p.display()))?;
    abs.to_str()
        .map(String::from)
        .with_context(|| format!("{} is not valid UTF-8", abs.display()))
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn status_text(v: &Value) -> String {
    let mut out = format!(
        "{} ({}) — {} peer(s) connected, reachability {}",
        v["name"].as_str().unwrap_or(""),
        v["device_id"].as_str().unwrap_or(""),
        v["peers"],
        v["reachability"].as_str().unwrap_or("unknown")
    );
    let spaces = v["spaces"].as_array().cloned().unwrap_or_default();
    if spaces.is_empty() {
        out.push_str("\nno spaces yet: create one with `shoal space create NAME --folder DIR`");
    }
    for s in spaces {
        let peers = s["peers"].as_array().map_or(0, |p| p.len());
        let relayed = s["peers_relayed"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "\n{}  {}  peers={peers} ({} direct, {relayed} relayed)",
            s["name"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            peers as u64 - relayed.min(peers as u64)
        ));
        let f = &s["folder"];
        if f.is_null() {
            continue;
        }
        out.push_str(&format!(
            "\n    folder {}",
            f["path"].as_str().unwrap_or("")
        ));
        let left = f["files_left"].as_u64().unwrap_or(0);
        if left > 0 {
            let rate = f["rate"].as_u64().unwrap_or(0);
            out.push_str(&format!(
                "\n    {}% done, {left} file(s), {} left at {}/s, ETA {}",
                f["progress"].as_f64().unwrap_or(0.0),
                human_bytes(f["bytes_left"].as_u64().unwrap_or(0)),
                human_bytes(rate),
                f["eta_secs"]
                    .as_u64()
                    .map(
                        |s| humantime::format_duration(std::time::Duration::from_secs(s))
                            .to_string()
                    )
                    .unwrap_or_else(|| "unknown".into())
            ));
        } else {
            out.push_str(&format!("\n    {} file(s), in sync", f["files"]));
        }
        if let Some(d) = f["detail"].as_str() {
            out.push_str(&format!("\n    {d}"));
        }
        for p in f["problems"].as_array().into_iter().flatten().rev().take(3) {
            out.push_str(&format!("\n    problem: {}", p.as_str().unwrap_or("")));
        }
    }
    out
}

pub(crate) fn enc(s: &str) -> String {
    // Space names may hold any character; ids and doc ids are URL-safe.
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn doc_url(space: &str, doc: &str) -> String {
    format!("/v1/spaces/{}/docs/{}", enc(space), enc(doc))
}
