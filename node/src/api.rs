//! The local HTTP API (axum), on loopback only, answering only loopback
//! `Host` names (against DNS rebinding), guarded by the bearer token in the
//! home folder (compared in constant time). The CLI is its client.
//! [`serve`] runs it until the given shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::{DeviceId, DocId, Role};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};

use crate::engine::{InviteInfo, MemberInfo, Revoked, SpaceInfo};
use crate::error::Error;
use crate::events::Event;
use crate::folder::history::{RestoreReport, RestoreRequest, SnapshotInfo, TrashInfo, VersionInfo};
use crate::folder::{ConflictInfo, FileInfo, FolderStatus};
use crate::home::MIN_API_TOKEN_LEN;
use crate::net::NetInfo;
use crate::net::PeerInfo;
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
            Error::Forbidden(_) | Error::MembersUnknown => StatusCode::FORBIDDEN,
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

/// A JSON request body whose rejections (not JSON, missing fields, wrong
/// types) are JSON errors like every other error here, not axum's plain
/// text.
struct Body<T>(T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    Json<T>: axum::extract::FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError(e.status(), e.body_text())),
        }
    }
}

/// The API's description: title, version, the bearer token scheme. Paths and
/// schemas are added from the handlers by [`routes`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "shoal local API",
        description = "The node's local HTTP API. It listens on loopback only; every \
            request but `GET /v1/openapi.json` needs `Authorization: Bearer <token>` \
            with the token from the home folder's `api-token`, and every request a \
            loopback `Host` (`127.0.0.1`, `localhost` or `[::1]`, any port): any other \
            is a 403 before the token is looked at. Errors are JSON \
            `{\"error\": \"...\"}` with a fitting status code."
    ),
    modifiers(&TokenAuth),
    security(("token" = []))
)]
struct ApiDoc;

struct TokenAuth;

impl utoipa::Modify for TokenAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Every route with its OpenAPI description, from the same handlers, so
/// the description cannot drift from what is served.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(id))
        .routes(routes!(events))
        .routes(routes!(peers))
        .routes(routes!(network))
        .routes(routes!(spaces, create_space))
        .routes(routes!(space))
        .routes(routes!(export_grant))
        .routes(routes!(import_grant))
        .routes(routes!(invites, create_invite))
        .routes(routes!(cancel_invite))
        .routes(routes!(join))
        .routes(routes!(set_role, revoke))
        .routes(routes!(members, add_member))
        .routes(routes!(docs))
        .routes(routes!(get_doc, put_doc, delete_doc))
        .routes(routes!(doc_url))
        .routes(routes!(dashboard_login))
        .routes(routes!(app_endpoint))
        .routes(routes!(status))
        .routes(routes!(metrics))
        .routes(routes!(attach_folder))
        .routes(routes!(accept_held))
        .routes(routes!(files))
        .routes(routes!(conflicts))
        .routes(routes!(history))
        .routes(routes!(trash))
        .routes(routes!(restore))
        .routes(routes!(snapshots, take_snapshot))
}

/// The OpenAPI description of the API (also served as
/// `GET /v1/openapi.json` and checked in as `docs/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut api = routes().into_openapi();
    api.info.version = env!("CARGO_PKG_VERSION").to_string();
    api
}

/// Builds the router (exposed for tests that drive it directly). Refuses a
/// token shorter than [`MIN_API_TOKEN_LEN`]: an empty one would match a
/// request with no `Authorization` header at all.
pub fn router(node: Node, token: String) -> crate::Result<Router> {
    let len = token.trim().chars().count();
    if len < MIN_API_TOKEN_LEN {
        return Err(Error::ApiToken(format!(
            "the API will not start with an empty or short token ({len} characters, \
             at least {MIN_API_TOKEN_LEN})"
        )));
    }
    let state = AppState {
        node,
        token: Arc::new(token),
    };
    let dashboard = crate::dashboard::routes(state.node.clone());
    let (api, _) = routes()
        .fallback(unknown_endpoint)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .split_for_parts();
    // The description is public (it is checked in), so tools that fetch it
    // without the token work. Built per request: it is fetched rarely, and
    // kept it would hold most of a megabyte for the node's whole life.
    // The Host check wraps everything, the public description and the
    // fallback included, and runs before auth.
    // Apps' WebSockets carry their own credential (browsers cannot set an
    // Authorization header on a WebSocket): the space's app key.
    Ok(api
        .route(
            "/v1/openapi.json",
            axum::routing::get(|| async { Json(openapi()) }),
        )
        .route("/v1/spaces/{space}/repo", axum::routing::get(app_socket))
        .with_state(state)
        .merge(dashboard)
        .layer(middleware::from_fn(loopback_host)))
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
    let supervisor = node.supervisor().clone();
    let app = router(node, token)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io("bind api", addr.to_string(), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("bind api", addr.to_string(), e))?;
    let task = supervisor.spawn("api", async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "api server failed");
        }
    });
    Ok((local, task))
}

async fn unknown_endpoint(req: Request) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {}", req.method(), req.uri().path()),
    )
}

/// Refuses a request whose `Host` (or, in HTTP/2, `:authority`) is not a
/// loopback name: a web page on `evil.example` that rebinds its name to
/// 127.0.0.1 reaches this port from the browser, but with its own name in
/// `Host`. 403 with a JSON error; a request with no host at all too.
async fn loopback_host(req: Request, next: Next) -> Response {
    let given = match req.headers().get(header::HOST) {
        Some(v) => v.to_str().ok().map(str::to_string),
        None => req.uri().authority().map(|a| a.to_string()),
    };
    if given.as_deref().is_some_and(is_loopback_host) {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "Host {:?} is not a loopback name; the API answers only 127.0.0.1, \
                 localhost and [::1]",
                given.unwrap_or_default()
            ),
        )
        .into_response()
    }
}

/// `127.0.0.1`, `localhost` or `[::1]`, each with an optional port.
fn is_loopback_host(host: &str) -> bool {
    let Ok(a) = host.parse::<axum::http::uri::Authority>() else {
        return false;
    };
    // an authority with user info (`a@b`) is not a Host value
    if a.as_str().contains('@') {
        return false;
    }
    let name = a.host();
    name == "127.0.0.1" || name == "[::1]" || name.eq_ignore_ascii_case("localhost")
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let by_token = bool::from(given.as_bytes().ct_eq(st.token.as_bytes()));
    // The dashboard's session cookie (see `crate::dashboard`), from the
    // dashboard's own page only.
    let by_session = !by_token
        && st.node.logins().from_headers(req.headers())
        && crate::dashboard::same_origin(req.headers());
    if !by_token && !by_session {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token".into(),
        )
        .into_response();
    }
    // A failed node says so instead of answering from half its tasks.
    match st.node.failed() {
        None => next.run(req).await,
        Some(f) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the node has failed ({f}); restart it"),
        )
        .into_response(),
    }
}

fn doc_id(s: &str) -> Result<DocId, ApiError> {
    s.parse().map_err(ApiError::from)
}

/// Filters of the event stream; all optional, all must match.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Comma-separated event groups (`doc`, `file`, `transfer`,
    /// `progress`, `peer`, `member`, `rejected`, `error`, `folder`) or exact types
    /// such as `doc_changed`.
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
    space: Option<shoal_protocol::SpaceId>,
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
                    .and_then(|i| i.id.parse().ok())
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
        let one = |d: &dyn std::fmt::Display| vec![d.to_string()];
        let (kind, group, space, name, authors): (
            &str,
            &str,
            Option<&shoal_protocol::SpaceId>,
            Option<&str>,
            Vec<String>,
        ) = match ev {
            Event::DocChanged {
                space,
                doc,
                authors,
                ..
            } => (
                "doc_changed",
                "doc",
                Some(space),
                Some(doc.as_str()),
                authors.clone(),
            ),
            Event::PeerConnected { .. } => ("peer_connected", "peer", None, None, vec![]),
            Event::PeerDisconnected { .. } => ("peer_disconnected", "peer", None, None, vec![]),
            Event::MemberVerified { space, .. } => {
                ("member_verified", "member", Some(space), None, vec![])
            }
            Event::Rejected { .. } => ("rejected", "rejected", None, None, vec![]),
            Event::FileChanged {
                space,
                path,
                device,
                ..
            } => ("file_changed", "file", Some(space), Some(path), one(device)),
            Event::Conflict {
                space,
                path,
                device,
                ..
            } => ("conflict", "file", Some(space), Some(path), one(device)),
            Event::Restored { space, path, .. } => {
                ("restored", "file", Some(space), Some(path), vec![])
            }
            Event::ChangesHeld { space, device, .. } => {
                ("changes_held", "folder", Some(space), None, one(device))
            }
            Event::TransferStarted { space, path, .. } => (
                "transfer_started",
                "transfer",
                Some(space),
                Some(path),
                vec![],
            ),
            Event::TransferFinished { space, path, .. } => (
                "transfer_finished",
                "transfer",
                Some(space),
                Some(path),
                vec![],
            ),
            Event::SyncProgress { space, .. } => {
                ("sync_progress", "progress", Some(space), None, vec![])
            }
            Event::FolderError { space, path, .. } => {
                ("folder_error", "error", Some(space), Some(path), vec![])
            }
            Event::NodeFailed { .. } => ("node_failed", "error", None, None, vec![]),
            Event::AppRefused { space, doc, .. } => (
                "app_refused",
                "rejected",
                Some(space),
                Some(doc.as_str()),
                vec![],
            ),
            Event::Ephemeral {
                space, doc, from, ..
            } => (
                "ephemeral",
                "ephemeral",
                Some(space),
                Some(doc.as_str()),
                one(from),
            ),
        };
        if let Some(t) = &self.types {
            if !t.iter().any(|t| t == kind || t == group) {
                return false;
            }
        }
        if let Some(s) = &self.space {
            if space != Some(s) {
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
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(EventQuery),
    responses(
        (status = 200, content_type = "text/event-stream", body = Event,
         description = "Server-sent events; each `data:` is one event as JSON. A consumer \
            that falls behind gets `{\"type\": \"lagged\", \"dropped\": N}`."),
        (status = 400, body = ErrorBody, description = "A bad glob"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    )
)]
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

/// The body of every error response.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    /// What went wrong, for humans.
    error: String,
}

/// This device.
#[derive(Serialize, ToSchema)]
struct IdInfo {
    /// Device id (a libp2p peer id).
    device_id: String,
    /// Device name.
    name: String,
    /// Addresses it listens on, with `/p2p/<id>`.
    listen_addrs: Vec<String>,
}

#[utoipa::path(get, path = "/v1/id", tag = "network",
    responses((status = 200, body = IdInfo, description = "This device")))]
async fn id(State(st): State<AppState>) -> ApiResult<IdInfo> {
    let info = st.node.net_info().await?;
    Ok(Json(IdInfo {
        device_id: st.node.device_id().to_string(),
        name: st.node.name().to_string(),
        listen_addrs: info.listen_addrs.iter().map(|a| a.to_string()).collect(),
    }))
}

/// A connected device and the spaces it shares with us.
#[derive(Serialize, ToSchema)]
struct Peer {
    #[serde(flatten)]
    info: PeerInfo,
    /// Names of the spaces it proved membership of.
    spaces: Vec<String>,
}

#[utoipa::path(get, path = "/v1/peers", tag = "network",
    responses((status = 200, body = Vec<Peer>, description = "Connected devices")))]
async fn peers(State(st): State<AppState>) -> ApiResult<Vec<Peer>> {
    let spaces = st.node.spaces().await?;
    let peers = st.node.net_info().await?.peers;
    Ok(Json(
        peers
            .into_iter()
            .map(|info| Peer {
                spaces: spaces
                    .iter()
                    .filter(|s| s.peers.contains(&info.peer))
                    .map(|s| s.name.clone())
                    .collect(),
                info,
            })
            .collect(),
    ))
}

/// Reachability, bootstrap nodes, relay reservations and peers.
#[utoipa::path(get, path = "/v1/network", tag = "network",
    responses((status = 200, body = NetInfo, description = "The network as this node sees it")))]
async fn network(State(st): State<AppState>) -> ApiResult<NetInfo> {
    Ok(Json(st.node.net_info().await?))
}

#[utoipa::path(get, path = "/v1/spaces", tag = "spaces",
    responses((status = 200, body = Vec<SpaceInfo>, description = "Spaces this device is in")))]
async fn spaces(State(st): State<AppState>) -> ApiResult<Vec<SpaceInfo>> {
    Ok(Json(st.node.spaces().await?))
}

#[derive(Deserialize, ToSchema)]
struct CreateSpace {
    /// Its name.
    name: String,
    /// An absolute folder to sync the space into.
    #[serde(default)]
    folder: Option<String>,
}

#[utoipa::path(post, path = "/v1/spaces", tag = "spaces", request_body = CreateSpace,
    responses(
        (status = 201, body = SpaceInfo, description = "Created; this device owns it"),
        (status = 409, body = ErrorBody, description = "A space of that name exists"),
    ))]
async fn create_space(
    State(st): State<AppState>,
    Body(b): Body<CreateSpace>,
) -> Result<(StatusCode, Json<SpaceInfo>), ApiError> {
    let s = st.node.create_space(&b.name).await?;
    if let Some(f) = &b.folder {
        st.node
            .attach_folder(&s.id, std::path::Path::new(f))
            .await?;
    }
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(get, path = "/v1/spaces/{space}", tag = "spaces",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = SpaceInfo, description = "The space"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn space(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<SpaceInfo> {
    let all = st.node.spaces().await?;
    let s = all
        .into_iter()
        .find(|s| s.name == space || s.id == space)
        .ok_or(Error::UnknownSpace(space))?;
    Ok(Json(s))
}

/// The space key material, for manual pairing without an invite. Owners
/// only; loopback and token-guarded like everything here.
#[utoipa::path(get, path = "/v1/spaces/{space}/grant", tag = "members",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Object, description = "The grant (secret key material)"),
        (status = 403, body = ErrorBody, description = "Not an owner"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn export_grant(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Value> {
    Ok(Json(json!(st.node.export_grant(&space).await?)))
}

#[utoipa::path(post, path = "/v1/grants", tag = "members", request_body = Object,
    responses(
        (status = 200, body = SpaceInfo, description = "The space the grant opens"),
        (status = 400, body = ErrorBody, description = "Not a grant"),
    ))]
async fn import_grant(
    State(st): State<AppState>,
    Body(grant): Body<SpaceGrant>,
) -> ApiResult<SpaceInfo> {
    Ok(Json(st.node.import_grant(grant).await?))
}

#[derive(Deserialize, ToSchema)]
struct CreateInvite {
    /// `editor` (default), `viewer` or `owner`.
    #[serde(default = "default_role")]
    role: String,
    /// Seconds until it expires (default a day).
    #[serde(default = "default_expiry")]
    expires_secs: u64,
    /// Devices it may admit (default 1).
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

#[utoipa::path(post, path = "/v1/spaces/{space}/invites", tag = "members",
    params(("space" = String, Path, description = "Space name or id")),
    request_body = CreateInvite,
    responses(
        (status = 201, body = InviteInfo, description = "Created, with its code"),
        (status = 400, body = ErrorBody, description = "Bad role"),
        (status = 403, body = ErrorBody, description = "Not allowed to invite"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn create_invite(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Body(b): Body<CreateInvite>,
) -> Result<(StatusCode, Json<InviteInfo>), ApiError> {
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
    Ok((StatusCode::CREATED, Json(inv)))
}

#[utoipa::path(get, path = "/v1/spaces/{space}/invites", tag = "members",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Vec<InviteInfo>, description = "Invites of the space"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn invites(
    State(st): State<AppState>,
    Path(space): Path<String>,
) -> ApiResult<Vec<InviteInfo>> {
    Ok(Json(st.node.invites(&space).await?))
}

#[utoipa::path(delete, path = "/v1/spaces/{space}/invites/{id}", tag = "members",
    params(
        ("space" = String, Path, description = "Space name or id"),
        ("id" = String, Path, description = "Invite id"),
    ),
    responses(
        (status = 200, body = InviteInfo, description = "Cancelled"),
        (status = 404, body = ErrorBody, description = "Unknown space or invite"),
    ))]
async fn cancel_invite(
    State(st): State<AppState>,
    Path((space, id)): Path<(String, String)>,
) -> ApiResult<InviteInfo> {
    Ok(Json(st.node.cancel_invite(&space, &id).await?))
}

#[derive(Deserialize, ToSchema)]
struct JoinBody {
    /// The invite code.
    code: String,
    /// How long to keep trying to reach the inviter (default 60).
    #[serde(default = "default_join_timeout")]
    timeout_secs: u64,
    /// An absolute folder to sync the space into.
    #[serde(default)]
    folder: Option<String>,
}

fn default_join_timeout() -> u64 {
    60
}

#[utoipa::path(post, path = "/v1/join", tag = "members", request_body = JoinBody,
    responses(
        (status = 200, body = SpaceInfo, description = "Joined"),
        (status = 400, body = ErrorBody, description = "Malformed code"),
        (status = 403, body = ErrorBody, description = "Refused (expired, used, cancelled)"),
    ))]
async fn join(State(st): State<AppState>, Body(b): Body<JoinBody>) -> ApiResult<SpaceInfo> {
    let s = st
        .node
        .join(&b.code, std::time::Duration::from_secs(b.timeout_secs))
        .await?;
    if let Some(f) = &b.folder {
        st.node
            .attach_folder(&s.id, std::path::Path::new(f))
            .await?;
    }
    Ok(Json(s))
}

/// The node at a glance.
#[derive(Serialize, ToSchema)]
struct Status {
    /// This device.
    device_id: String,
    /// Its name.
    name: String,
    /// Connected peers.
    peers: usize,
    /// What AutoNAT concluded: `public`, `private` or `unknown`.
    reachability: String,
    /// Each space.
    spaces: Vec<SpaceStatus>,
    /// Folder counters since start, by name.
    counters: std::collections::BTreeMap<String, u64>,
}

/// One space in [`Status`].
#[derive(Serialize, ToSchema)]
struct SpaceStatus {
    /// Space id.
    id: String,
    /// Space name.
    name: String,
    /// Our role.
    #[schema(value_type = Option<String>)]
    role: Option<Role>,
    /// Connected members.
    peers: Vec<String>,
    /// How many of them only through a relay.
    peers_relayed: usize,
    /// Its folder, if it has one.
    folder: Option<FolderStatus>,
    /// The folder's state, or `documents only`.
    state: String,
}

/// Per space: role, peers, and its folder's sync state with real numbers
/// (files and bytes left from the index and the store, a rate averaged
/// over 10 s, an ETA); plus the folder counters.
#[utoipa::path(get, path = "/v1/status", tag = "status",
    responses((status = 200, body = Status, description = "The node at a glance")))]
async fn status(State(st): State<AppState>) -> ApiResult<Status> {
    let spaces = st.node.spaces().await?;
    let folders = st.node.folder_status().await;
    let net = st.node.net_info().await?;
    let relayed = |p: &String| net.peers.iter().any(|i| &i.peer == p && i.relayed);
    let list = spaces
        .into_iter()
        .map(|s| {
            let folder = folders.iter().find(|f| f.space == s.id).cloned();
            SpaceStatus {
                peers_relayed: s.peers.iter().filter(|p| relayed(p)).count(),
                state: folder
                    .as_ref()
                    .map(|f| f.state.to_string())
                    .unwrap_or_else(|| "documents only".into()),
                folder,
                id: s.id,
                name: s.name,
                role: s.role,
                peers: s.peers,
            }
        })
        .collect();
    let counters = st
        .node
        .folder_counters()
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Ok(Json(Status {
        device_id: st.node.device_id().to_string(),
        name: st.node.name().to_string(),
        peers: net.peers.len(),
        reachability: net.reachability,
        spaces: list,
        counters,
    }))
}

/// Prometheus metrics (OpenMetrics text), behind the same token.
#[utoipa::path(get, path = "/metrics", tag = "status",
    responses((status = 200, body = String,
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8",
        description = "libp2p's metrics and shoal's")))]
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

#[derive(Deserialize, ToSchema)]
struct FolderBody {
    /// An absolute path.
    path: String,
}

#[utoipa::path(put, path = "/v1/spaces/{space}/folder", tag = "folders",
    params(("space" = String, Path, description = "Space name or id")),
    request_body = FolderBody,
    responses(
        (status = 200, body = FolderStatus, description = "Attached; scanning starts"),
        (status = 400, body = ErrorBody, description = "Not an absolute path, or unusable"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn attach_folder(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Body(b): Body<FolderBody>,
) -> ApiResult<FolderStatus> {
    let p = std::path::Path::new(&b.path);
    if !p.is_absolute() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("folder path {:?} must be absolute", b.path),
        ));
    }
    Ok(Json(st.node.attach_folder(&space, p).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FilesQuery {
    /// Only paths under this one.
    #[serde(default)]
    prefix: String,
}

#[utoipa::path(get, path = "/v1/spaces/{space}/files", tag = "folders",
    params(("space" = String, Path, description = "Space name or id"), FilesQuery),
    responses(
        (status = 200, body = Vec<FileInfo>, description = "The synced tree as the index sees it"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn files(
    State(st): State<AppState>,
    Path(space): Path<String>,
    axum::extract::Query(q): axum::extract::Query<FilesQuery>,
) -> ApiResult<Vec<FileInfo>> {
    Ok(Json(st.node.files(&space, &q.prefix).await?))
}

#[utoipa::path(get, path = "/v1/spaces/{space}/conflicts", tag = "folders",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Vec<ConflictInfo>, description = "Conflict copies"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn conflicts(
    State(st): State<AppState>,
    Path(space): Path<String>,
) -> ApiResult<Vec<ConflictInfo>> {
    Ok(Json(st.node.conflicts(&space).await?))
}

/// What `folder/accept` released.
#[derive(Serialize, ToSchema)]
struct Released {
    /// Held deletions and overwrites now applied.
    released: usize,
}

#[utoipa::path(post, path = "/v1/spaces/{space}/folder/accept", tag = "folders",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Released, description = "The held changes are applied"),
        (status = 400, body = ErrorBody, description = "No folder on this device"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn accept_held(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Released> {
    let released = st.node.accept_held(&space).await?;
    Ok(Json(Released { released }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// The file's path in the folder (required).
    #[serde(default)]
    path: String,
}

#[utoipa::path(get, path = "/v1/spaces/{space}/history", tag = "history",
    params(("space" = String, Path, description = "Space name or id"), HistoryQuery),
    responses(
        (status = 200, body = Vec<VersionInfo>, description = "Every version of the path, oldest first"),
        (status = 400, body = ErrorBody, description = "Bad path, or no folder on this device"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn history(
    State(st): State<AppState>,
    Path(space): Path<String>,
    axum::extract::Query(q): axum::extract::Query<HistoryQuery>,
) -> ApiResult<Vec<VersionInfo>> {
    Ok(Json(st.node.history(&space, &q.path).await?))
}

#[utoipa::path(get, path = "/v1/spaces/{space}/trash", tag = "history",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Vec<TrashInfo>, description = "Deleted files, newest deletion first"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn trash(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Vec<TrashInfo>> {
    Ok(Json(st.node.trash(&space).await?))
}

#[utoipa::path(post, path = "/v1/spaces/{space}/restore", tag = "history",
    params(("space" = String, Path, description = "Space name or id")),
    request_body = RestoreRequest,
    responses(
        (status = 200, body = RestoreReport, description = "What was restored, left alone or could not be"),
        (status = 400, body = ErrorBody, description = "Bad request (unknown version, time or snapshot)"),
        (status = 403, body = ErrorBody, description = "This device may not write in the space (viewer)"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn restore(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Body(req): Body<RestoreRequest>,
) -> ApiResult<RestoreReport> {
    Ok(Json(st.node.restore(&space, req).await?))
}

#[utoipa::path(get, path = "/v1/spaces/{space}/snapshots", tag = "history",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Vec<SnapshotInfo>, description = "This device's named states of the folder"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn snapshots(
    State(st): State<AppState>,
    Path(space): Path<String>,
) -> ApiResult<Vec<SnapshotInfo>> {
    Ok(Json(st.node.snapshots(&space).await?))
}

#[derive(Deserialize, ToSchema)]
struct SnapshotBody {
    /// The snapshot's name (unique in the space on this device).
    name: String,
}

#[utoipa::path(post, path = "/v1/spaces/{space}/snapshots", tag = "history",
    params(("space" = String, Path, description = "Space name or id")),
    request_body = SnapshotBody,
    responses(
        (status = 200, body = SnapshotInfo, description = "The folder's current state, named"),
        (status = 400, body = ErrorBody, description = "Bad or taken name"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn take_snapshot(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Body(b): Body<SnapshotBody>,
) -> ApiResult<SnapshotInfo> {
    Ok(Json(st.node.snapshot(&space, &b.name).await?))
}

#[derive(Deserialize, ToSchema)]
struct RoleBody {
    /// `owner`, `editor` or `viewer`.
    role: String,
}

/// A member's role after a change.
#[derive(Serialize, ToSchema)]
struct MemberRole {
    /// Device id.
    device: String,
    /// Its role.
    #[schema(value_type = String)]
    role: Role,
}

#[utoipa::path(put, path = "/v1/spaces/{space}/members/{device}", tag = "members",
    params(
        ("space" = String, Path, description = "Space name or id"),
        ("device" = String, Path, description = "Device id"),
    ),
    request_body = RoleBody,
    responses(
        (status = 200, body = MemberRole, description = "Role set"),
        (status = 400, body = ErrorBody, description = "Bad device id or role"),
        (status = 403, body = ErrorBody, description = "Not an owner"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn set_role(
    State(st): State<AppState>,
    Path((space, device)): Path<(String, String)>,
    Body(b): Body<RoleBody>,
) -> ApiResult<MemberRole> {
    let device: DeviceId = device.parse()?;
    let role: Role = b.role.parse()?;
    st.node.set_role(&space, &device, role).await?;
    Ok(Json(MemberRole {
        device: device.to_string(),
        role,
    }))
}

/// The outcome of a revocation.
#[derive(Serialize, ToSchema)]
struct Revocation {
    /// Device id.
    device: String,
    /// Always true.
    revoked: bool,
    #[serde(flatten)]
    outcome: Revoked,
}

#[utoipa::path(delete, path = "/v1/spaces/{space}/members/{device}", tag = "members",
    params(
        ("space" = String, Path, description = "Space name or id"),
        ("device" = String, Path, description = "Device id"),
    ),
    responses(
        (status = 200, body = Revocation, description = "Revoked; the space key was rotated"),
        (status = 400, body = ErrorBody, description = "Bad device id"),
        (status = 403, body = ErrorBody, description = "Not an owner"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn revoke(
    State(st): State<AppState>,
    Path((space, device)): Path<(String, String)>,
) -> ApiResult<Revocation> {
    let device: DeviceId = device.parse()?;
    let outcome = st.node.revoke(&space, &device).await?;
    Ok(Json(Revocation {
        device: device.to_string(),
        revoked: true,
        outcome,
    }))
}

#[utoipa::path(get, path = "/v1/spaces/{space}/members", tag = "members",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Vec<MemberInfo>, description = "Members of the space"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn members(
    State(st): State<AppState>,
    Path(space): Path<String>,
) -> ApiResult<Vec<MemberInfo>> {
    Ok(Json(st.node.members(&space).await?))
}

#[derive(Deserialize, ToSchema)]
struct AddMember {
    /// Device id.
    device: String,
    /// `owner`, `editor` or `viewer`.
    role: String,
    /// A name for it.
    #[serde(default)]
    name: String,
}

#[utoipa::path(post, path = "/v1/spaces/{space}/members", tag = "members",
    params(("space" = String, Path, description = "Space name or id")),
    request_body = AddMember,
    responses(
        (status = 200, body = MemberRole, description = "Added"),
        (status = 400, body = ErrorBody, description = "Bad device id or role"),
        (status = 403, body = ErrorBody, description = "Not an owner"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn add_member(
    State(st): State<AppState>,
    Path(space): Path<String>,
    Body(b): Body<AddMember>,
) -> ApiResult<MemberRole> {
    let device: DeviceId = b.device.parse()?;
    let role: Role = b.role.parse()?;
    st.node.add_member(&space, &device, role, &b.name).await?;
    Ok(Json(MemberRole {
        device: device.to_string(),
        role,
    }))
}

#[utoipa::path(get, path = "/v1/spaces/{space}/docs", tag = "documents",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = Vec<String>, description = "Document ids"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn docs(State(st): State<AppState>, Path(space): Path<String>) -> ApiResult<Vec<String>> {
    Ok(Json(st.node.docs(&space).await?))
}

#[utoipa::path(get, path = "/v1/spaces/{space}/docs/{doc}", tag = "documents",
    params(
        ("space" = String, Path, description = "Space name or id"),
        ("doc" = String, Path, description = "Document id"),
    ),
    responses(
        (status = 200, body = Object, description = "The document as JSON"),
        (status = 400, body = ErrorBody, description = "Bad document id"),
        (status = 404, body = ErrorBody, description = "Unknown space or document"),
    ))]
async fn get_doc(
    State(st): State<AppState>,
    Path((space, doc)): Path<(String, String)>,
) -> ApiResult<Value> {
    Ok(Json(st.node.get(&space, &doc_id(&doc)?).await?))
}

/// A document's automerge-repo URL.
#[derive(Serialize, ToSchema)]
struct DocUrl {
    /// `automerge:...`, for an automerge-repo client's `find`.
    url: String,
}

#[utoipa::path(get, path = "/v1/spaces/{space}/docs/{doc}/url", tag = "apps",
    params(
        ("space" = String, Path, description = "Space name or id"),
        ("doc" = String, Path, description = "Document id"),
    ),
    responses(
        (status = 200, body = DocUrl, description = "The document's automerge-repo URL \
            (the same on every device)"),
        (status = 400, body = ErrorBody, description = "Bad document id"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn doc_url(
    State(st): State<AppState>,
    Path((space, doc)): Path<(String, String)>,
) -> ApiResult<DocUrl> {
    let id = st.node.space_id(&space).await?;
    Ok(Json(DocUrl {
        url: crate::apps::url(&id, &doc_id(&doc)?)?,
    }))
}

/// Where a space's apps connect.
#[derive(Serialize, ToSchema)]
struct AppEndpoint {
    /// `ws://.../v1/spaces/SPACE/repo?key=KEY`: hand it to an
    /// automerge-repo WebSocket client as it is.
    url: String,
}

#[utoipa::path(get, path = "/v1/spaces/{space}/apps", tag = "apps",
    params(("space" = String, Path, description = "Space name or id")),
    responses(
        (status = 200, body = AppEndpoint, description = "The space's automerge-repo \
            WebSocket address, its app key included; the key opens this space's \
            endpoint and nothing else"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn app_endpoint(
    State(st): State<AppState>,
    Path(space): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<AppEndpoint> {
    let id = st.node.space_id(&space).await?;
    // The Host the caller reached us by (checked to be loopback).
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    Ok(Json(AppEndpoint {
        url: format!(
            "ws://{host}/v1/spaces/{id}/repo?key={}",
            crate::apps::app_key(&st.token, &id)
        ),
    }))
}

/// A one-time login link for the dashboard.
#[derive(Serialize, ToSchema)]
struct LoginLink {
    /// `http://HOST/ui/login?code=...`: works once, for 10 minutes.
    url: String,
}

#[utoipa::path(post, path = "/v1/dashboard/login", tag = "dashboard",
    responses(
        (status = 200, body = LoginLink, description = "A one-time login link for \
            the dashboard (`shoal dashboard` prints it)"),
    ))]
async fn dashboard_login(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
) -> ApiResult<LoginLink> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    Ok(Json(LoginLink {
        url: format!("http://{host}{}", st.node.dashboard_login()),
    }))
}

#[derive(Deserialize)]
struct AppKey {
    key: Option<String>,
}

/// An app's automerge-repo WebSocket (see [`crate::apps`]): the space's
/// app key in the query, since a browser cannot send a header with it.
async fn app_socket(
    State(st): State<AppState>,
    Path(space): Path<String>,
    axum::extract::Query(q): axum::extract::Query<AppKey>,
    ws: axum::extract::WebSocketUpgrade,
) -> Response {
    // An unknown space is refused like a wrong key: without the key, the
    // endpoint tells nothing about which spaces exist.
    let id = st.node.space_id(&space).await.ok();
    let want = id.map(|id| crate::apps::app_key(&st.token, &id));
    let given = q.key.unwrap_or_default();
    let Some(id) =
        id.filter(|_| want.is_some_and(|w| bool::from(given.as_bytes().ct_eq(w.as_bytes()))))
    else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong app key (`shoal doc url SPACE` prints the address with it)".into(),
        )
        .into_response();
    };
    let node = st.node.clone();
    ws.on_upgrade(move |socket| async move {
        if let Err(e) = node.serve_app(&id.to_string(), socket).await {
            tracing::warn!(error = %e, "cannot serve an app");
        }
    })
}

#[derive(Deserialize, ToSchema)]
struct PutBody {
    /// Where in the document, `/`-separated (empty: the root).
    #[serde(default)]
    path: String,
    /// Any JSON value.
    value: Value,
}

/// A document's heads after a change.
#[derive(Serialize, ToSchema)]
struct Heads {
    /// Change hashes, hex.
    heads: Vec<String>,
}

#[utoipa::path(put, path = "/v1/spaces/{space}/docs/{doc}", tag = "documents",
    params(
        ("space" = String, Path, description = "Space name or id"),
        ("doc" = String, Path, description = "Document id (created on first write)"),
    ),
    request_body = PutBody,
    responses(
        (status = 200, body = Heads, description = "Written and gossiped"),
        (status = 400, body = ErrorBody, description = "Bad document id or path"),
        (status = 403, body = ErrorBody, description = "Viewers cannot write"),
        (status = 404, body = ErrorBody, description = "Unknown space"),
    ))]
async fn put_doc(
    State(st): State<AppState>,
    Path((space, doc)): Path<(String, String)>,
    Body(b): Body<PutBody>,
) -> ApiResult<Heads> {
    let heads = st
        .node
        .put(&space, &doc_id(&doc)?, &b.path, b.value)
        .await?;
    Ok(Json(Heads { heads }))
}

#[derive(Deserialize, ToSchema)]
struct DeleteBody {
    /// What to delete, `/`-separated.
    path: String,
}

#[utoipa::path(delete, path = "/v1/spaces/{space}/docs/{doc}", tag = "documents",
    params(
        ("space" = String, Path, description = "Space name or id"),
        ("doc" = String, Path, description = "Document id"),
    ),
    request_body = DeleteBody,
    responses(
        (status = 200, body = Heads, description = "Deleted and gossiped"),
        (status = 400, body = ErrorBody, description = "Bad document id or path"),
        (status = 403, body = ErrorBody, description = "Viewers cannot write"),
        (status = 404, body = ErrorBody, description = "Unknown space or document"),
    ))]
async fn delete_doc(
    State(st): State<AppState>,
    Path((space, doc)): Path<(String, String)>,
    Body(b): Body<DeleteBody>,
) -> ApiResult<Heads> {
    let heads = st.node.delete(&space, &doc_id(&doc)?, &b.path).await?;
    Ok(Json(Heads { heads }))
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_names_pass_the_host_check() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:4000",
            "localhost",
            "LOCALHOST:1",
            "[::1]",
            "[::1]:4000",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:4000",
            "127.0.0.1.evil.example",
            "localhost.evil.example:80",
            "127.0.0.1@evil.example",
            "evil.example@127.0.0.1",
            "0.0.0.0:4000",
            "127.0.0.2",
            "::1",
            "[::2]:80",
            "127.0.0.1:4000/x",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
