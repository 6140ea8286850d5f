//! shoal's node runtime.
//!
//! A node is two tasks: the network actor ([`net`]) that owns the libp2p
//! swarm, and the sync engine ([`engine`]) that owns spaces, documents,
//! per-peer sync state and the [`store`]. [`Node`] is a cheap, cloneable
//! handle whose methods send commands with `oneshot` replies. The local
//! HTTP API ([`api`]) is a thin layer over the same handle.
//!
//! Shutdown: [`Node::shutdown`] stops the engine (after a final store
//! flush), which stops the network actor; dropping every handle does the same.
//!
//! Every task runs under a [`supervise`] supervisor: a panic in any of them
//! fails the node ([`Node::failed`], [`Node::wait_failed`],
//! [`Event::NodeFailed`]) instead of leaving it half alive.

pub mod api;
pub mod apps;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod error;
pub mod events;
pub mod folder;
pub mod home;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod relay;
pub mod store;
pub mod supervise;

use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};
use serde_json::Value as Json;
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::{DeviceId, DocId, Role};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use config::{ConfigFile, NodeConfig};
pub use engine::{InviteInfo, MemberInfo, SpaceInfo};
pub use error::{Error, Result};
pub use events::{Event, Origin};
pub use home::Home;
pub use net::{NetInfo, PeerInfo};
pub use supervise::Failure;

use engine::{Command, Engine};
use net::NetHandle;
use supervise::Supervisor;

/// Handle to a running node.
#[derive(Clone, Debug)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    net: NetHandle,
    device: DeviceId,
    name: String,
    lock: std::sync::Mutex<Option<home::HomeLock>>,
    folders: folder::Folders,
    apps: apps::Apps,
    logins: dashboard::Logins,
    metrics: Arc<metrics::Metrics>,
    supervisor: Supervisor,
}

impl Node {
    /// Starts a node on an initialised `home` with `config`: takes the home's
    /// lock, opens the store, starts listening, and spawns the actors.
    pub async fn start(home: &Home, config: NodeConfig) -> Result<Node> {
        let lock = home.lock()?;
        let key = home.keypair()?;
        let db = home.db_path();
        let store = tokio::task::spawn_blocking(move || store::Store::open(&db))
            .await
            .map_err(|e| Error::Network(format!("store open task: {e}")))??;
        let peer_id = key.public().to_peer_id();
        let folder_counters = std::sync::Arc::new(metrics::FolderCounters::default());
        let metrics = Arc::new(metrics::Metrics::new(Arc::clone(&folder_counters)));
        let (events, _) = broadcast::channel(engine::EVENT_CAPACITY);
        let supervisor = Supervisor::new(events.clone());
        let (net, net_events) = net::spawn(key.clone(), &config, &metrics, &supervisor).await?;
        let engine = Engine::load(
            key.clone(),
            &config,
            store,
            net.clone(),
            events.clone(),
            home.x25519_secret()?,
            Arc::clone(&metrics.node),
        )?;
        let blobs = engine.blobs()?;
        let members_generation = engine.members_generation();
        let (tx, rx) = mpsc::channel(engine::COMMAND_CAPACITY);
        let device = DeviceId::from_bytes(peer_id.to_bytes())?;
        let folders = folder::Folders::start(folder::Parts {
            blobs,
            engine: engine::Client(tx.clone()),
            events: events.clone(),
            settings: config.folders.clone(),
            control: net.streams(),
            me: device.clone(),
            counters: folder_counters,
            members_generation,
            supervisor: supervisor.clone(),
        })?;
        let apps = apps::Apps::new(engine::Client(tx.clone()), events.clone());
        supervisor.spawn("engine", engine.run(rx, net_events));
        Ok(Node {
            inner: Arc::new(Inner {
                commands: tx,
                events,
                net,
                device,
                name: config.name,
                lock: std::sync::Mutex::new(Some(lock)),
                folders,
                apps,
                logins: dashboard::Logins::default(),
                metrics,
                supervisor,
            }),
        })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        self.client().ask(make).await
    }

    /// This device's id.
    pub fn device_id(&self) -> &DeviceId {
        &self.inner.device
    }

    /// This device's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.net.peer_id()
    }

    /// This device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Why the node failed, if one of its tasks panicked. A failed node
    /// is not restarted in place: end the process and start again.
    pub fn failed(&self) -> Option<Failure> {
        self.inner.supervisor.failed()
    }

    /// Waits until one of the node's tasks panics (forever if none does).
    pub async fn wait_failed(&self) -> Failure {
        self.inner.supervisor.wait_failed().await
    }

    /// Makes the node's task `actor` panic (`engine`, `network`,
    /// `blob-server`, `folder-worker`, `api`), to test supervision.
    #[doc(hidden)]
    pub fn inject_fault(&self, actor: &str) {
        self.inner.supervisor.inject_fault(actor);
    }

    pub(crate) fn supervisor(&self) -> &Supervisor {
        &self.inner.supervisor
    }

    /// Subscribes to the node's events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Listen addresses and connected peers.
    pub async fn net_info(&self) -> Result<NetInfo> {
        self.inner.net.info().await
    }

    /// Listen addresses, each ending in `/p2p/<id>`.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        Ok(self.net_info().await?.listen_addrs)
    }

    /// Dials a peer.
    pub async fn dial(&self, addr: Multiaddr) -> Result<()> {
        self.inner.net.dial(addr).await
    }

    /// Creates a space with this device as its owner.
    pub async fn create_space(&self, name: &str) -> Result<SpaceInfo> {
        let name = name.to_string();
        self.ask(|r| Command::CreateSpace(name, r)).await
    }

    /// The spaces this node is in.
    pub async fn spaces(&self) -> Result<Vec<SpaceInfo>> {
        self.ask(Command::Spaces).await
    }

    /// Adds a device to a space by id (or changes its role). Owners only.
    /// No key exchange happens: the device must get the grant some other
    /// way ([`Node::export_grant`]) and has no x25519 key in `members`, so
    /// it misses key rotations. Invites ([`Node::create_invite`],
    /// [`Node::join`]) are the normal path.
    pub async fn add_member(
        &self,
        space: &str,
        device: &DeviceId,
        role: Role,
        name: &str,
    ) -> Result<()> {
        let (space, device, name) = (space.to_string(), device.clone(), name.to_string());
        self.ask(|reply| Command::AddMember {
            space,
            device,
            role,
            name,
            reply,
        })
        .await
    }

    /// The members of a space.
    pub async fn members(&self, space: &str) -> Result<Vec<MemberInfo>> {
        let space = space.to_string();
        self.ask(|r| Command::Members(space, r)).await
    }

    /// The grant (id, name, creator, keys) a new member needs. Owners only;
    /// used for pairing by file (invites seal it to the joiner themselves).
    /// Secret: never log it.
    pub async fn export_grant(&self, space: &str) -> Result<SpaceGrant> {
        let space = space.to_string();
        self.ask(|r| Command::ExportGrant(space, r)).await
    }

    /// Joins a space from a grant; members are learnt from peers.
    pub async fn import_grant(&self, grant: SpaceGrant) -> Result<SpaceInfo> {
        self.ask(|r| Command::ImportGrant(Box::new(grant), r)).await
    }

    /// Puts a JSON value at a JSON-pointer path; returns the new heads once
    /// the change is durable.
    pub async fn put(
        &self,
        space: &str,
        doc: &DocId,
        path: &str,
        value: Json,
    ) -> Result<Vec<String>> {
        let (space, doc, path) = (space.to_string(), doc.clone(), path.to_string());
        self.ask(|reply| Command::Put {
            space,
            doc,
            path,
            value,
            reply,
        })
        .await
    }

    /// Deletes the value at a JSON-pointer path.
    pub async fn delete(&self, space: &str, doc: &DocId, path: &str) -> Result<Vec<String>> {
        let (space, doc, path) = (space.to_string(), doc.clone(), path.to_string());
        self.ask(|reply| Command::Delete {
            space,
            doc,
            path,
            reply,
        })
        .await
    }

    /// A document as JSON.
    pub async fn get(&self, space: &str, doc: &DocId) -> Result<Json> {
        let (space, doc) = (space.to_string(), doc.clone());
        self.ask(|r| Command::Get(space, doc, r)).await
    }

    /// A document's heads (hex).
    pub async fn heads(&self, space: &str, doc: &DocId) -> Result<Vec<String>> {
        let (space, doc) = (space.to_string(), doc.clone());
        self.ask(|r| Command::Heads(space, doc, r)).await
    }

    /// Bytes peers' request and gossip frames hold in this node now. Tests
    /// only.
    #[doc(hidden)]
    pub fn frames_held(&self) -> net::budget::Held {
        self.inner.net.budget().held()
    }

    /// How many sync states the engine holds. Tests only.
    #[doc(hidden)]
    pub async fn sync_states(&self) -> Result<engine::SyncStates> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::SyncStates(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The documents of a space (not `members`).
    pub async fn docs(&self, space: &str) -> Result<Vec<String>> {
        let space = space.to_string();
        self.ask(|r| Command::Docs(space, r)).await
    }

    /// Issues an invite code for `space` (owners only). The code carries
    /// this node's current listen addresses.
    pub async fn create_invite(
        &self,
        space: &str,
        role: Role,
        expires: std::time::Duration,
        uses: u32,
    ) -> Result<InviteInfo> {
        let addrs = self.listen_addrs().await?;
        let space = space.to_string();
        self.ask(|reply| Command::CreateInvite {
            space,
            role,
            expires,
            uses,
            addrs,
            reply,
        })
        .await
    }

    /// The invites of a space.
    pub async fn invites(&self, space: &str) -> Result<Vec<InviteInfo>> {
        let space = space.to_string();
        self.ask(|r| Command::Invites(space, r)).await
    }

    /// Cancels an invite by id.
    pub async fn cancel_invite(&self, space: &str, id: &str) -> Result<InviteInfo> {
        let (space, id) = (space.to_string(), id.to_string());
        self.ask(|r| Command::CancelInvite(space, id, r)).await
    }

    /// Redeems an invite code: checks it locally (typos, expiry) before any
    /// traffic, then reaches the inviter (addresses in the code, mDNS, the
    /// DHT), retrying with backoff until `timeout`.
    pub async fn join(&self, code: &str, timeout: std::time::Duration) -> Result<SpaceInfo> {
        let code = shoal_protocol::invite::InviteCode::decode(code)
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if code.expired(now) {
            return Err(Error::BadRequest(
                "this invite code has expired; ask for a new one".into(),
            ));
        }
        if code.inviter == self.inner.device {
            return Err(Error::BadRequest(
                "this code was issued by this device".into(),
            ));
        }
        self.ask(|r| Command::Join(Box::new(code), timeout, r))
            .await
    }

    /// Changes a member's role (owners only; the last owner stays owner).
    pub async fn set_role(&self, space: &str, device: &DeviceId, role: Role) -> Result<()> {
        let (space, device) = (space.to_string(), device.clone());
        self.ask(|r| Command::SetRole(space, device, role, r)).await
    }

    /// Removes a device from a space and rotates the space key to a new
    /// epoch sealed to the remaining members; returns the new epoch.
    pub async fn revoke(&self, space: &str, device: &DeviceId) -> Result<engine::Revoked> {
        let (space, device) = (space.to_string(), device.clone());
        self.ask(|r| Command::Revoke(space, device, r)).await
    }

    /// Stops the node after flushing the store.
    /// Gives a space a folder on this device (created if missing) and
    /// starts syncing it.
    pub async fn attach_folder(
        &self,
        space: &str,
        path: &std::path::Path,
    ) -> Result<folder::FolderStatus> {
        self.inner.folders.attach(space, path).await
    }

    /// Status of every folder on this device.
    pub async fn folder_status(&self) -> Vec<folder::FolderStatus> {
        self.inner.folders.status().await
    }

    /// Every metric in the Prometheus text format (libp2p's and shoal's).
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render()
    }

    /// Folder-sync counters (chunks served, fetched, copied locally...).
    pub fn folder_counters(&self) -> std::sync::Arc<metrics::FolderCounters> {
        self.inner.folders.counters()
    }

    /// The synced tree of a space as the index sees it, under `prefix`.
    pub async fn files(&self, space: &str, prefix: &str) -> Result<Vec<folder::FileInfo>> {
        let (id, _) = self.resolve(space).await?;
        let prefix = prefix.trim_start_matches('/').to_string();
        let list = self
            .client()
            .index(|reply| engine::IndexCommand::List {
                space: id,
                prefix,
                reply,
            })
            .await?;
        Ok(folder::file_infos(list))
    }

    /// Writes raw index entries as this device, bypassing the folder: what
    /// a modified client of a member can do. Tests use it to play a
    /// hostile member.
    #[doc(hidden)]
    pub async fn put_index_entries(
        &self,
        space: &str,
        entries: Vec<(String, shoal_protocol::files::Entry)>,
    ) -> Result<()> {
        let (id, _) = self.resolve(space).await?;
        let entries = entries.into_iter().map(|(p, e)| (p, e.encode())).collect();
        self.client()
            .index(|reply| engine::IndexCommand::Put {
                space: id,
                entries,
                reply,
            })
            .await
    }

    /// Stores a manifest in this device's blob index, to be served to
    /// members: with [`Self::put_index_entries`], what a modified client
    /// can do.
    #[doc(hidden)]
    pub async fn put_manifest(
        &self,
        space: &str,
        manifest: &shoal_protocol::files::Manifest,
    ) -> Result<()> {
        let (id, _) = self.resolve(space).await?;
        self.inner.folders.put_manifest(&id, manifest)
    }

    /// Asks `peer` for one chunk of `space` over this node's open blob
    /// streams, as a folder worker would. Tests only.
    #[doc(hidden)]
    pub async fn fetch_chunk(
        &self,
        peer: PeerId,
        space: &str,
        hash: [u8; 32],
    ) -> Result<std::result::Result<Vec<u8>, folder::links::FetchError>> {
        let (id, _) = self.resolve(space).await?;
        Ok(self.inner.folders.fetch_chunk(peer, id, hash).await)
    }

    /// Every version of `path` in a space's folder, oldest first, with
    /// where its content is.
    pub async fn history(
        &self,
        space: &str,
        path: &str,
    ) -> Result<Vec<folder::history::VersionInfo>> {
        let (id, _) = self.resolve(space).await?;
        self.inner.folders.history(&id, path).await
    }

    /// Deleted files of a space's folder, newest deletion first.
    pub async fn trash(&self, space: &str) -> Result<Vec<folder::history::TrashInfo>> {
        let (id, _) = self.resolve(space).await?;
        self.inner.folders.trash(&id).await
    }

    /// Restores a version, a deleted file, or a subtree as it was (see
    /// [`folder::history::RestoreRequest`]). A restore is this device's
    /// edit: viewers are refused.
    pub async fn restore(
        &self,
        space: &str,
        req: folder::history::RestoreRequest,
    ) -> Result<folder::history::RestoreReport> {
        let (id, role) = self.resolve(space).await?;
        if !role.is_some_and(Role::can_write) {
            return Err(Error::Forbidden(format!(
                "this device is {} in the space: a restore writes, and only owners and \
                 editors may",
                role.map_or("not yet a member".to_string(), |r| format!("{r:?}")
                    .to_lowercase())
            )));
        }
        self.inner.folders.restore(&id, req).await
    }

    /// Applies the remote deletions and overwrites the mass-delete guard
    /// holds in a space's folder; returns how many it released.
    pub async fn accept_held(&self, space: &str) -> Result<usize> {
        let (id, _) = self.resolve(space).await?;
        self.inner.folders.accept(&id)
    }

    /// Names the current state of a space's folder.
    pub async fn snapshot(&self, space: &str, name: &str) -> Result<folder::history::SnapshotInfo> {
        let (id, _) = self.resolve(space).await?;
        self.inner.folders.snapshot(&id, name).await
    }

    /// This device's snapshots of a space.
    pub async fn snapshots(&self, space: &str) -> Result<Vec<folder::history::SnapshotInfo>> {
        let (id, _) = self.resolve(space).await?;
        self.inner.folders.snapshots(&id)
    }

    /// Conflict copies in a space's folder: which file, which device, when.
    pub async fn conflicts(&self, space: &str) -> Result<Vec<folder::ConflictInfo>> {
        let files = self.files(space, "").await?;
        Ok(folder::conflicts_of(&files))
    }

    async fn resolve(&self, space: &str) -> Result<(shoal_protocol::SpaceId, Option<Role>)> {
        let space = space.to_string();
        self.client()
            .index(|reply| engine::IndexCommand::Resolve { space, reply })
            .await
    }

    fn client(&self) -> engine::Client {
        engine::Client(self.inner.commands.clone())
    }

    /// Serves a local app's automerge-repo WebSocket for `space` (see
    /// [`apps`]) until it closes.
    pub async fn serve_app(&self, space: &str, socket: axum::extract::ws::WebSocket) -> Result<()> {
        let (id, _) = self.resolve(space).await?;
        self.inner.apps.serve(id, socket).await;
        Ok(())
    }

    /// The dashboard's one-time login codes and sessions.
    pub fn logins(&self) -> &dashboard::Logins {
        &self.inner.logins
    }

    /// A one-time login link's path and query for the dashboard
    /// (`/ui/login?code=...`); prefix the API's `http://HOST:PORT`.
    pub fn dashboard_login(&self) -> String {
        format!("/ui/login?code={}", self.inner.logins.code())
    }

    /// A document's saved Automerge bytes (what an automerge-repo client
    /// loads).
    pub async fn doc_bytes(&self, space: &str, doc: &DocId) -> Result<Vec<u8>> {
        let (id, _) = self.resolve(space).await?;
        let d = doc.clone();
        self.ask(|reply| Command::DocBytes {
            space: id,
            doc: d,
            since: None,
            reply,
        })
        .await?
        .ok_or_else(|| Error::UnknownDoc {
            space: space.to_string(),
            doc: doc.to_string(),
        })
    }

    /// The id of a space given by name or id.
    pub async fn space_id(&self, space: &str) -> Result<shoal_protocol::SpaceId> {
        Ok(self.resolve(space).await?.0)
    }

    pub async fn shutdown(&self) {
        self.inner.apps.shutdown().await;
        self.inner.folders.shutdown().await;
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Shutdown(tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        // The engine has closed the store; release the home.
        if let Ok(mut l) = self.inner.lock.lock() {
            l.take();
        }
    }
}
