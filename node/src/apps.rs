//! Local apps: automerge-repo clients of this node.
//!
//! A web app on this device points its stock automerge-repo client
//! (`@automerge/automerge-repo` with a WebSocket adapter) at
//! `ws://127.0.0.1:PORT/v1/spaces/SPACE/repo?key=KEY`. Each space has one
//! [`samod`] repo (automerge-repo's protocol in Rust) whose storage is the
//! space's documents in this node's engine:
//!
//! - a document a client asks for is loaded from the engine (saved bytes);
//! - what samod stores (changes from clients, and documents they create)
//!   enters the engine as an app's changes: with this device's role, under
//!   the app's own actor ids, vouched for by this device when published
//!   (see `shoal_protocol::actor`);
//! - changes that reach the engine any other way (other devices, the API)
//!   are applied to the samod documents clients have open, so they arrive
//!   live.
//!
//! A viewer's apps read, and what they write is ignored (samod's read-only
//! share policy); the decision follows role changes.
//!
//! Ephemeral messages (presence, cursors) an app sends about a document
//! are passed to the other apps here (samod does that) and gossiped to the
//! space's other devices, whose bridges hand them to their apps; nothing
//! stores them.
//!
//! Document URLs: a document an app created is named in shoal by its
//! automerge-repo id (base58check, which is a valid shoal document id). A
//! document made through shoal's API under another name gets an id derived
//! from its space and name ([`document_id`]), so `shoal doc url` prints the
//! same `automerge:` URL on every device.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;
use futures::Stream;
use futures::StreamExt;
use samod::storage::{Storage, StorageKey};
use samod::{AutomergeUrl, DocumentId, ShareConfig};
use shoal_protocol::{DocId, Role, SpaceId};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, warn};

use crate::engine::{self, Command};
use crate::error::{Error, Result};
use crate::events::{Event, Origin};

/// The automerge-repo document id of shoal document `doc` of `space`.
pub fn document_id(space: &SpaceId, doc: &DocId) -> Result<DocumentId> {
    if let Ok(id) = DocumentId::from_str(doc.as_str()) {
        return Ok(id);
    }
    let key = blake3::derive_key(
        "shoal automerge-repo document id v1",
        &[&space.0[..], doc.as_str().as_bytes()].concat(),
    );
    DocumentId::try_from(key[..16].to_vec())
        .map_err(|e| Error::BadRequest(format!("no automerge-repo id for {doc}: {e:?}")))
}

/// The `automerge:` URL of shoal document `doc` of `space`.
pub fn url(space: &SpaceId, doc: &DocId) -> Result<String> {
    Ok(AutomergeUrl::from(&document_id(space, doc)?).to_string())
}

/// The key an app presents for `space`: derived from the API token, so it
/// opens this space's automerge-repo endpoint and nothing else.
pub fn app_key(token: &str, space: &SpaceId) -> String {
    hex::encode(blake3::derive_key(
        "shoal app key v1",
        &[token.trim().as_bytes(), &space.0[..]].concat(),
    ))
}

/// What an app on a device with `role` may do.
fn share_for(role: Option<Role>) -> ShareConfig {
    match role {
        Some(r) if r.can_write() => ShareConfig::read_write(),
        Some(_) => ShareConfig::read_only(),
        None => ShareConfig::none(),
    }
}

/// The node's automerge-repo side: one samod repo per space, made when an
/// app first connects.
#[derive(Clone)]
pub(crate) struct Apps {
    engine: engine::Client,
    events: broadcast::Sender<Event>,
    repos: Arc<tokio::sync::Mutex<HashMap<SpaceId, SpaceRepo>>>,
}

impl std::fmt::Debug for Apps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apps").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct SpaceRepo {
    repo: samod::Repo,
    acceptor: samod::AcceptorHandle,
    /// Ends the space's bridge task.
    stop: Arc<tokio::sync::Notify>,
}

impl Apps {
    pub(crate) fn new(engine: engine::Client, events: broadcast::Sender<Event>) -> Self {
        Self {
            engine,
            events,
            repos: Arc::default(),
        }
    }

    /// Hands an app's WebSocket to the space's repo, which drives it.
    pub(crate) async fn serve(&self, space: SpaceId, socket: axum::extract::ws::WebSocket) {
        let acceptor = match self.repo(space).await {
            Ok(r) => r.acceptor,
            Err(e) => {
                warn!(space = %space.short(), error = %e, "cannot open the space for apps");
                return;
            }
        };
        match acceptor.accept_axum(socket, None) {
            Ok(_) => debug!(space = %space.short(), "app connected"),
            Err(_) => debug!("app repo stopped"),
        }
    }

    async fn repo(&self, space: SpaceId) -> Result<SpaceRepo> {
        let mut repos = self.repos.lock().await;
        if let Some(r) = repos.get(&space) {
            return Ok(r.clone());
        }
        let role = self.role(space).await?;
        let (access, decisions) = watch::channel(share_for(role));
        let (opened_tx, opened) = mpsc::unbounded_channel();
        let storage = EngineStorage {
            space,
            engine: self.engine.clone(),
            open: Arc::default(),
            opened: opened_tx,
            other: Arc::default(),
            read_only: false,
        };
        let open = Arc::clone(&storage.open);
        let repo = samod::Repo::build_tokio()
            .with_storage(storage)
            .with_share_policy(move |_doc, _peer| follow(decisions.clone()))
            .load()
            .await;
        let url = samod::Url::parse(&format!("shoal-app://{space}"))
            .map_err(|e| Error::BadRequest(format!("app endpoint url: {e}")))?;
        let acceptor = repo
            .make_acceptor(url)
            .map_err(|_| Error::Network("the app repo stopped".into()))?;
        let r = SpaceRepo {
            repo: repo.clone(),
            acceptor: acceptor.clone(),
            stop: Arc::default(),
        };
        let bridge = Bridge {
            space,
            engine: self.engine.clone(),
            repo,
            acceptor,
            open,
            access,
        };
        tokio::spawn(bridge.run(self.events.subscribe(), opened, Arc::clone(&r.stop)));
        repos.insert(space, r.clone());
        Ok(r)
    }

    async fn role(&self, space: SpaceId) -> Result<Option<Role>> {
        let s = space.to_string();
        let (_, role) = self
            .engine
            .index(|reply| engine::IndexCommand::Resolve { space: s, reply })
            .await?;
        Ok(role)
    }

    /// Stops every repo, letting what it is storing reach the engine.
    pub(crate) async fn shutdown(&self) {
        let repos: Vec<SpaceRepo> = self.repos.lock().await.drain().map(|(_, r)| r).collect();
        for r in repos {
            r.acceptor.close();
            r.repo.stop().await;
            r.stop.notify_one();
        }
    }
}

/// samod's share decisions, from the current one on.
fn follow(mut rx: watch::Receiver<ShareConfig>) -> impl Stream<Item = ShareConfig> + Send {
    let first = *rx.borrow_and_update();
    futures::stream::unfold((rx, Some(first)), |(mut rx, first)| async move {
        if let Some(f) = first {
            return Some((f, (rx, None)));
        }
        rx.changed().await.ok()?;
        let v = *rx.borrow_and_update();
        Some((v, (rx, None)))
    })
}

/// How long handing samod a document it gave up on may take.
const FEED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Documents of one space that samod has loaded: shoal id -> samod id.
type Open = Arc<Mutex<HashMap<DocId, DocumentId>>>;

/// Brings changes that reach the engine other than from this space's apps
/// into the samod documents apps have open, and the device's role into
/// the share decision.
struct Bridge {
    space: SpaceId,
    engine: engine::Client,
    repo: samod::Repo,
    acceptor: samod::AcceptorHandle,
    open: Open,
    access: watch::Sender<ShareConfig>,
}

impl Bridge {
    async fn run(
        self,
        mut events: broadcast::Receiver<Event>,
        mut opened: mpsc::UnboundedReceiver<DocumentId>,
        stop: Arc<tokio::sync::Notify>,
    ) {
        loop {
            let got = tokio::select! {
                _ = stop.notified() => return,
                ev = events.recv() => ev,
                Some(id) = opened.recv() => {
                    self.forward_ephemera(id);
                    continue;
                }
            };
            let ev = match got {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed some: bring every open document up to date.
                    let docs: Vec<DocId> = self.opened().into_keys().collect();
                    for doc in docs {
                        self.refresh(&doc).await;
                    }
                    self.refresh_role().await;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            match ev {
                Event::DocChanged {
                    space, doc, origin, ..
                } if space == self.space => {
                    if doc.is_members() {
                        self.refresh_role().await;
                    } else if origin != Origin::App {
                        self.refresh(&doc).await;
                    }
                }
                Event::Ephemeral {
                    space, doc, data, ..
                } if space == self.space => {
                    if let Some(id) = self.opened().get(&doc).cloned() {
                        if let Ok(Some(handle)) = self.repo.find(id).await {
                            handle.broadcast(data);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Hands samod a document it gave up looking for. samod looks for a
    /// document in storage once, then asks its peers; so a short-lived
    /// second repo, reading the same engine, connects to it as a peer that
    /// has the document, syncs it over, and goes.
    fn feed(&self, id: DocumentId) {
        let (space, engine, repo) = (self.space, self.engine.clone(), self.repo.clone());
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            let feeder = samod::Repo::build_tokio()
                .with_storage(EngineStorage {
                    space,
                    engine,
                    open: Arc::default(),
                    opened: mpsc::unbounded_channel().0,
                    other: Arc::default(),
                    read_only: true,
                })
                .load()
                .await;
            let dialer = samod::transport::channel::ChannelDialer::new(acceptor);
            let fed = async {
                let link = feeder
                    .dial(samod::BackoffConfig::default(), Arc::new(dialer))
                    .ok()?;
                link.established().await.ok()?;
                feeder.find(id.clone()).await.ok()??;
                // until the app repo holds it
                let (now, mut later) = repo.search(id.clone()).ok()?;
                let mut state = now;
                loop {
                    if let samod::SearchState::Found(_) = state {
                        return Some(());
                    }
                    state = later.next().await?;
                }
            };
            if tokio::time::timeout(FEED_TIMEOUT, fed).await.is_err() {
                warn!(space = %space.short(), "could not hand a document to its apps");
            }
            feeder.stop().await;
        });
    }

    /// Passes the ephemeral messages this node's apps send about document
    /// `id` to the engine, which gossips them to the space's other devices.
    fn forward_ephemera(&self, id: DocumentId) {
        let (repo, engine, space) = (self.repo.clone(), self.engine.clone(), self.space);
        let Some(doc) = self
            .opened()
            .into_iter()
            .find(|(_, d)| *d == id)
            .map(|(doc, _)| doc)
        else {
            return;
        };
        tokio::spawn(async move {
            let Ok(Some(handle)) = repo.find(id).await else {
                return;
            };
            let mut messages = handle.ephemera();
            while let Some(data) = messages.next().await {
                let msg = Command::Ephemeral {
                    space,
                    doc: doc.clone(),
                    data,
                };
                if engine.0.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }

    fn opened(&self) -> HashMap<DocId, DocumentId> {
        self.open.lock().map(|o| o.clone()).unwrap_or_default()
    }

    async fn refresh_role(&self) {
        let s = self.space.to_string();
        if let Ok((_, role)) = self
            .engine
            .index(|reply| engine::IndexCommand::Resolve { space: s, reply })
            .await
        {
            self.access.send_if_modified(|c| {
                let new = share_for(role);
                let changed = *c != new;
                *c = new;
                changed
            });
        }
    }

    /// Applies the engine's changes to `doc` that samod's copy lacks.
    async fn refresh(&self, doc: &DocId) {
        let open = self.opened();
        let id = match open.get(doc) {
            Some(id) => id.clone(),
            None => {
                // Asked for by its URL before it reached this device under
                // its name: from now on it is known by that name.
                let Some(id) = document_id(&self.space, doc)
                    .ok()
                    .filter(|id| open.values().any(|o| o == id))
                else {
                    return;
                };
                if let Ok(mut o) = self.open.lock() {
                    o.retain(|_, v| *v != id);
                    o.insert(doc.clone(), id.clone());
                }
                id
            }
        };
        let handle = match self.repo.find(id.clone()).await {
            Ok(Some(h)) => h,
            // An app asked for it before it reached this device, and samod
            // told it the document is unavailable; it now is.
            Ok(None) => return self.feed(id),
            Err(_) => return,
        };
        let heads: Vec<ChangeHash> = handle.with_document(|d| d.get_heads());
        let (space, doc2) = (self.space, doc.clone());
        let bytes = match self
            .engine
            .ask(|reply| Command::DocBytes {
                space,
                doc: doc2,
                since: Some(heads),
                reply,
            })
            .await
        {
            Ok(Some(b)) if !b.is_empty() => b,
            _ => return,
        };
        handle.with_document(|d| {
            if let Err(e) = d.load_incremental(&bytes) {
                warn!(%doc, error = %e, "cannot bring a document's changes to apps");
            }
        });
    }
}

/// samod's storage for one space: the engine's documents.
#[derive(Clone)]
struct EngineStorage {
    space: SpaceId,
    engine: engine::Client,
    open: Open,
    /// Tells the bridge about each document samod opens.
    opened: mpsc::UnboundedSender<DocumentId>,
    /// What samod keeps that is not a document (its storage id).
    other: Arc<Mutex<HashMap<StorageKey, Vec<u8>>>>,
    /// Writes nothing to the engine (the feeder, see `Bridge::feed`).
    read_only: bool,
}

impl EngineStorage {
    /// The shoal document a samod document id names: one the engine holds
    /// under that id or whose derived id it is, else a new one named by it.
    async fn shoal_doc(&self, id: &DocumentId) -> Option<DocId> {
        let direct: DocId = id.to_string().parse().ok()?;
        let s = self.space.to_string();
        let docs = self
            .engine
            .ask(|reply| Command::Docs(s, reply))
            .await
            .ok()?;
        if docs.iter().any(|d| d == direct.as_str()) {
            return Some(direct);
        }
        let named = docs
            .iter()
            .filter_map(|d| d.parse::<DocId>().ok())
            .find(|d| !d.is_members() && document_id(&self.space, d).is_ok_and(|x| x == *id));
        Some(named.unwrap_or(direct))
    }

    /// Records that samod has `doc` open (as `id`); tells the bridge the
    /// first time.
    fn note_open(&self, doc: &DocId, id: &DocumentId) {
        let first = self
            .open
            .lock()
            .is_ok_and(|mut o| o.insert(doc.clone(), id.clone()).is_none());
        if first {
            let _ = self.opened.send(id.clone());
        }
    }

    /// A document key's samod id and part (`snapshot`, `incremental`).
    fn doc_key(key: &StorageKey) -> Option<(DocumentId, String)> {
        let mut parts = key.into_iter();
        let id = DocumentId::from_str(parts.next()?).ok()?;
        let part = parts.next()?.to_string();
        Some((id, part))
    }
}

impl Storage for EngineStorage {
    async fn load(&self, key: StorageKey) -> Option<Vec<u8>> {
        self.other.lock().ok()?.get(&key).cloned()
    }

    async fn load_range(&self, prefix: StorageKey) -> HashMap<StorageKey, Vec<u8>> {
        let Some((id, part)) = Self::doc_key(&prefix) else {
            let Ok(other) = self.other.lock() else {
                return HashMap::new();
            };
            return other
                .iter()
                .filter(|(k, _)| prefix.is_prefix_of(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        };
        // The whole document is one snapshot; there are no increments.
        if part != "snapshot" {
            return HashMap::new();
        }
        let Some(doc) = self.shoal_doc(&id).await else {
            return HashMap::new();
        };
        self.note_open(&doc, &id);
        let space = self.space;
        let bytes = self
            .engine
            .ask(|reply| Command::DocBytes {
                space,
                doc,
                since: None,
                reply,
            })
            .await;
        match (bytes, prefix.with_component("shoal".into())) {
            (Ok(Some(b)), Ok(k)) => [(k, b)].into(),
            _ => HashMap::new(),
        }
    }

    async fn put(&self, key: StorageKey, data: Vec<u8>) {
        if self.read_only {
            return;
        }
        let Some((id, _)) = Self::doc_key(&key) else {
            if let Ok(mut other) = self.other.lock() {
                other.insert(key, data);
            }
            return;
        };
        let Some(doc) = self.shoal_doc(&id).await else {
            return;
        };
        self.note_open(&doc, &id);
        let space = self.space;
        let d = doc.clone();
        if let Err(e) = self
            .engine
            .ask(|reply| Command::AppChanges {
                space,
                doc: d,
                bytes: data,
                reply,
            })
            .await
        {
            warn!(space = %space.short(), %doc, error = %e, "an app's changes were refused");
        }
    }

    async fn delete(&self, key: StorageKey) {
        // Document data lives in the engine, which never forgets changes.
        if Self::doc_key(&key).is_none() {
            if let Ok(mut other) = self.other.lock() {
                other.remove(&key);
            }
        }
    }
}
