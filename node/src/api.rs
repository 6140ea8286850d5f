//! The local HTTP API (axum), on loopback only, guarded by the bearer token
//! in the home folder (compared in constant time). The CLI is its client.
//! [`serve`] runs it until the given shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::{DeviceId, DocId, Role};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};

use crate::engine::Event;
use crate::error::Error;
use crate::Node;

#[derive(Clone)]
struct AppState {
    node: Node,
    token: Arc<String>,
}

/// An error as the API returns it: a status code and `{"error": ...}`.
pub struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::UnknownSpace(_) | Error::UnknownDoc { .. } => StatusCode::NOT_FOUND,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::BadRequest(_) | Error::Protocol(_) => StatusCode::BAD_REQUEST,
            Error::SpaceExists(_) => StatusCode::CONFLICT,
            Error::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<shoal_protocol::Error> for ApiError {
    fn from(e: shoal_protocol::Error) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Builds the router (exposed for tests that drive it directly).
pub fn router(node: Node, token: String) -> Router {
    let state = AppState {
        node,
        token: Arc::new(token),
    };
    Router::new()
        .route("/v1/id", get(id))
        .route("/v1/events", get(events))
        .route("/v1/peers", get(peers))
        .route("/v1/network", get(network))
        .route("/v1/spaces", get(spaces).post(create_space))
        .route("/v1/spaces/{space}", get(space))
        .route("/v1/spaces/{space}/grant", get(export_grant))
        .route("/v1/grants", axum::routing::post(import_grant))
        .route(
            "/v1/spaces/{space}/invites",
            get(invites).post(create_invite),
        )
        .route(
            "/v1/spaces/{space}/invites/{id}",
            axum::routing::delete(cancel_invite),
        )
        .route("/v1/join", axum::routing::post(join))
        .route(
            "/v1/spaces/{space}/members/{device}",
            axum::routing::put(set_role).delete(revoke),
        )
        .route("/v1/spaces/{space}/members", get(members).post(add_member))
        .route("/v1/spaces/{space}/docs", get(docs))
        .route(
            "/v1/spaces/{space}/docs/{doc}",
            get(get_doc).put(put_doc).delete(delete_doc),
        )
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route(
            "/v1/spaces/{space}/folder",
            axum::routing::put(attach_folder),
        )
        .route("/v1/spaces/{space}/files", get(files))
        .route("/v1/spaces/{space}/conflicts", get(conflicts))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Serves the API on `addr` (must be loopback) until `shutdown` completes.
pub async fn serve(
    node: Node,
    token: String,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> crate::Result<(SocketAddr, JoinHandle<()>)> {
    if !addr.ip().is_loopback() {
        return Err(Error::BadRequest(format!(
            "the API binds loopback only, not {addr}"
        )));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io("bind api", addr.to_string(), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("bind api", addr.to_string(), e))?;
    let app = router(node, token);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "api server failed");
        }
    });
    Ok((local, task))
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(st.token.as_bytes())) {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token".into(),
        )
        .into_response()
    }
}

fn doc_id(s: &str) -> Result<DocId, ApiError> {
    s.parse().map_err(ApiError::from)
}

/// Filters of the event stream; all optional, all must match.
#[derive(Deserialize, Default)]
pub struct EventQuery {
    /// Comma-separated event types: `doc`, `peer`, `member`, `rejected`, or
    /// exact type names such as `doc_changed`.
    pub types: Option<String>,
    /// A space, by name or id.
    pub space: Option<String>,
    /// A glob over document ids (`notes*`).
    pub doc: Option<String>,
    /// A glob over file paths in a folder (`docs/**`).
    pub path: Option<String>,
    /// A device id: only changes it wrote.
    pub author: Option<String>,
}

/// A compiled [`EventQuery`].
pub struct EventFilter {
    types: Option<Vec<String>>,
    space: Option<String>,
    doc: Option<globset::GlobMatcher>,
    path: Option<globset::GlobMatcher>,
    author: Option<String>,
}

impl EventFilter {
    /// Compiles a query; names a space the node does not know as a 404.
    pub async fn new(node: &Node, q: EventQuery) -> Result<Self, ApiError> {
        let space = match q.space {
            None => None,
            Some(s) => Some(
                node.spaces()
                    .await?
                    .into_iter()
                    .find(|i| i.name == s || i.id == s)
                    .map(|i| i.id)
                    .ok_or(Error::UnknownSpace(s))?,
            ),
        };
        let glob = |what: &str, g: Option<String>| -> Result<_, ApiError> {
            g.map(|g| {
                globset::GlobBuilder::new(&g)
                    .literal_separator(what == "path")
                    .build()
                    .map(|m| m.compile_matcher())
                    .map_err(|e| {
                        ApiError(StatusCode::BAD_REQUEST, format!("{what} glob {g:?}: {e}"))
                    })
            })
            .transpose()
        };
        let doc = glob("doc", q.doc)?;
        let path = glob("path", q.path)?;
        let types = q.types.map(|t| {
            t.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        });
        Ok(Self {
            types,
            space,
            doc,
            path,
            author: q.author,
        })
    }

    /// Whether `ev` passes.
    pub fn matches(&self, ev: &Event) -> bool {
        let (kind, group, space, name, authors): (
            &str,
            &str,
            Option<&str>,
            Option<&str>,
            &[String],
        ) = match ev {
            Event::DocChanged {
                space,
                doc,
                authors,
                ..
            } => ("doc_changed", "doc", Some(space), Some(doc), authors),
            Event::PeerConnected { .. } => ("peer_connected", "peer", None, None, &[]),
            Event::PeerDisconnected { .. } => ("peer_disconnected", "peer", None, None, &[]),
            Event::MemberVerified { space, .. } => {
                ("member_verified", "member", Some(space), None, &[])
            }
            Event::Rejected { .. } => ("rejected", "rejected", None, None, &[]),
            Event::FileChanged {
                space,
                path,
                device,
                ..
            } => (
                "file_changed",
                "file",
                Some(space),
                Some(path),
                std::slice::from_ref(device),
            ),
            Event::Conflict {
                space,
                path,
                device,
                ..
            } => (
                "conflict",
                "file",
                Some(space),
                Some(path),
                std::slice::from_ref(device),
            ),
            Event::TransferStarted { space, path, .. } => {
                ("transfer_started", "transfer", Some(space), Some(path), &[])
            }
            Event::TransferFinished { space, path, .. } => (
                "transfer_finished",
                "transfer",
                Some(space),
                Some(path),
                &[],
            ),
            Event::FolderError { space, path, .. } => {
                ("folder_error", "error", Some(space), Some(path), &[])
            }
        };
        if let Some(t) = &self.types {
            if !t.iter().any(|t| t == kind || t == group) {
                return false;
            }
        }
        if let Some(s) = &self.space {
            if space != Some(s.as_str()) {
                return false;
            }
        }
        // Documents are named by `doc`, files by `path`.
        let is_file = matches!(group, "file" | "transfer" | "error");
        if let Some(g) = &self.doc {
            if is_file || !name.is_some_and(|d| g.is_match(d)) {
                return false;
            }
        }
        if let Some(g) = &self.path {
            if !is_file || !name.is_some_and(|p| g.is_match(p)) {
                return false;
            }
        }
        if let Some(a) = &self.author {
            if !authors.iter().any(|x| x == a) {
                return false;
            }
        }
        true
    }
}

/// Live events as server-sent events, one JSON object each. A consumer too
/// slow for the node's bounded event buffer gets a `lagged` event saying how
/// many it missed; the node never buffers more for it.
async fn events(
    State(st): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<EventQuery>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError>
{
    let filter = EventFilter::new(&st.node, q).await?;
    let rx = st.node.events();
    let stream = futures::stream::unfold((rx, filter), |(mut rx, f)| async move {
        loop {
            match rx.recv().await {
                Ok(ev) if f.matches(&ev) => {
                    let data = serde_json::to_string(&ev).unwrap_or_default();
                    return Some((Ok(SseEvent::default().data(data)), (rx, f)));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let data = json!({"type": "lagged", "dropped": n}).to_string();
                    return Some((Ok(SseEvent::default().data(data)), (rx, f)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn id(State(st): State<AppState>) -> ApiResult<Value> {
    let info = st.node.net_info().await?;
    Ok(Json(json!({
        "device_id": st.node.device_id().to_string(),
        "name": st.node.name(),
        "listen_addrs": info.listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    })))
}

async fn peers(State(st): State<AppState>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.net_info().await?.peers)))
}

/// Reachability, bootstrap nodes, relay reservations and peers.
async fn network(State(st): State<AppState>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.net_info().await?)))
}

async fn spaces(State(st): State<AppState>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.spaces().await?)))
}

#[derive(Deserialize)]
struct CreateSpace {
    name: String,
    /// An absolute folder to sync the space into.
    #[serde(default)]
    folder: Option<String>,
}

async fn create_space(
    State(st): State<AppState>,
    Json(b): Json<CreateSpace>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let s = st.node.create_space(&b.name).await?;
    if let Some(f) = &b.folder {
        st.node
            .attach_folder(&s.id, std::path::Path::new(f))
            .await?;
    }
    Ok((StatusCode::CREATED, Json(json!(s))))
}

async fn space(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Value> {
    let all = st.node.spaces().await?;
    let s = all
        .into_iter()
        .find(|s| s.name == space || s.id == space)
        .ok_or(Error::UnknownSpace(space))?;
    Ok(Json(json!(s)))
}

/// The space key material, for manual pairing until invites exist. Owners
/// only; loopback and token-guarded like everything here.
async fn export_grant(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.export_grant(&space).await?)))
}

async fn import_grant(
    State(st): State<AppState>,
    Json(grant): Json<SpaceGrant>,
) -> ApiResult<Value> {
    Ok(Json(json!(st.node.import_grant(grant).await?)))
}

#[derive(Deserialize)]
struct CreateInvite {
    #[serde(default = "default_role")]
    role: String,
    #[serde(default = "default_expiry")]
    expires_secs: u64,
    #[serde(default = "default_uses")]
    uses: u32,
}

fn default_role() -> String {
    "editor".into()
}
fn default_expiry() -> u64 {
    24 * 3600
}
fn default_uses() -> u32 {
    1
}

async fn create_invite(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Json(b): Json<CreateInvite>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let role: Role = b.role.parse()?;
    let inv = st
        .node
        .create_invite(
            &space,
            role,
            std::time::Duration::from_secs(b.expires_secs),
            b.uses,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(json!(inv))))
}

async fn invites(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.invites(&space).await?)))
}

async fn cancel_invite(
    State(st): State<AppState>,
    Path((space, id)): Path<(String, String)>,
) -> ApiResult<Value> {
    Ok(Json(json!(st.node.cancel_invite(&space, &id).await?)))
}

#[derive(Deserialize)]
struct JoinBody {
    code: String,
    #[serde(default = "default_join_timeout")]
    timeout_secs: u64,
    /// An absolute folder to sync the space into.
    #[serde(default)]
    folder: Option<String>,
}

fn default_join_timeout() -> u64 {
    60
}

async fn join(State(st): State<AppState>, Json(b): Json<JoinBody>) -> ApiResult<Value> {
    let s = st
        .node
        .join(&b.code, std::time::Duration::from_secs(b.timeout_secs))
        .await?;
    if let Some(f) = &b.folder {
        st.node
            .attach_folder(&s.id, std::path::Path::new(f))
            .await?;
    }
    Ok(Json(json!(s)))
}

/// Per space: role, peers, and its folder's sync state with real numbers
/// (files and bytes left from the index and the store, a rate averaged
/// over 10 s, an ETA); plus the folder counters.
async fn status(State(st): State<AppState>) -> ApiResult<Value> {
    let spaces = st.node.spaces().await?;
    let folders = st.node.folder_status().await;
    let net = st.node.net_info().await?;
    let relayed = |p: &String| net.peers.iter().any(|i| &i.peer == p && i.relayed);
    let list: Vec<Value> = spaces
        .iter()
        .map(|s| {
            let folder = folders.iter().find(|f| f.space == s.id);
            json!({
                "id": s.id,
                "name": s.name,
                "role": s.role,
                "peers": s.peers,
                "peers_relayed": s.peers.iter().filter(|p| relayed(p)).count(),
                "folder": folder,
                "state": folder.map(|f| f.state.as_str()).unwrap_or("documents only"),
            })
        })
        .collect();
    let counters: serde_json::Map<String, Value> = st
        .node
        .folder_counters()
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    Ok(Json(json!({
        "device_id": st.node.device_id().to_string(),
        "name": st.node.name(),
        "peers": net.peers.len(),
        "reachability": net.reachability,
        "spaces": list,
        "counters": counters,
    })))
}

/// Prometheus metrics (OpenMetrics text), behind the same token.
async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.node.metrics_text(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct FolderBody {
    path: String,
}

async fn attach_folder(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Json(b): Json<FolderBody>,
) -> ApiResult<Value> {
    let p = std::path::Path::new(&b.path);
    if !p.is_absolute() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("folder path {:?} must be absolute", b.path),
        ));
    }
    Ok(Json(json!(st.node.attach_folder(&space, p).await?)))
}

#[derive(Deserialize)]
struct FilesQuery {
    #[serde(default)]
    prefix: String,
}

async fn files(
    State(st): State<AppState>,
    Path(space): Path<String>,
    axum::extract::Query(q): axum::extract::Query<FilesQuery>,
) -> ApiResult<Value> {
    Ok(Json(json!(st.node.files(&space, &q.prefix).await?)))
}

async fn conflicts(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.conflicts(&space).await?)))
}

#[derive(Deserialize)]
struct RoleBody {
    role: String,
}

async fn set_role(
    State(st): State<AppState>,
    Path((space, device)): Path<(String, String)>,
    Json(b): Json<RoleBody>,
) -> ApiResult<Value> {
    let device: DeviceId = device.parse()?;
    let role: Role = b.role.parse()?;
    st.node.set_role(&space, &device, role).await?;
    Ok(Json(json!({"device": device.to_string(), "role": role})))
}

async fn revoke(
    State(st): State<AppState>,
    Path((space, device)): Path<(String, String)>,
) -> ApiResult<Value> {
    let device: DeviceId = device.parse()?;
    let r = st.node.revoke(&space, &device).await?;
    Ok(Json(json!({
        "device": device.to_string(),
        "revoked": true,
        "epoch": r.epoch,
        "not_rekeyed": r.not_rekeyed,
    })))
}

async fn members(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.members(&space).await?)))
}

#[derive(Deserialize)]
struct AddMember {
    device: String,
    role: String,
    #[serde(default)]
    name: String,
}

async fn add_member(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Json(b): Json<AddMember>,
) -> ApiResult<Value> {
    let device: DeviceId = b.device.parse()?;
    let role: Role = b.role.parse()?;
    st.node.add_member(&space, &device, role, &b.name).await?;
    Ok(Json(json!({"device": device.to_string(), "role": role})))
}

async fn docs(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.docs(&space).await?)))
}

async fn get_doc(
    State(st): State<AppState>,
    Path((space, doc)): Path<(String, String)>,
) -> ApiResult<Value> {
    Ok(Json(st.node.get(&space, &doc_id(&doc)?).await?))
}

#[derive(Deserialize)]
struct PutBody {
    #[serde(default)]
    path: String,
    value: Value,
}

async fn put_doc(
    State(st): State<AppState>,
    Path((space, doc)): Path<(String, String)>,
    Json(b): Json<PutBody>,
) -> ApiResult<Value> {
    let heads = st
        .node
        .put(&space, &doc_id(&doc)?, &b.path, b.value)
        .await?;
    Ok(Json(json!({"heads": heads})))
}

#[derive(Deserialize)]
struct DeleteBody {
    path: String,
}

async fn delete_doc(
    State(st): State<AppState>,
    Path((space, doc)): Path<(String, String)>,
    Json(b): Json<DeleteBody>,
) -> ApiResult<Value> {
    let heads = st.node.delete(&space, &doc_id(&doc)?, &b.path).await?;
    Ok(Json(json!({"heads": heads})))
}
