//! The dashboard: a page the node serves on its local API for people in a
//! browser (spaces, folders and their progress, peers, members, invites,
//! conflicts, deleted files and restore).
//!
//! - **Login**: a browser cannot be handed the API token safely, so
//!   `shoal dashboard` (and `shoal up`) asks the node for a one-time login
//!   link, `/ui/login?code=...`. Opening it trades the code (valid 10
//!   minutes, once) for a session cookie (`HttpOnly`, `SameSite=Strict`,
//!   12 hours) and redirects to the page, so the code leaves the address
//!   bar. The API accepts that cookie like the token, but only from the
//!   dashboard's own page ([`same_origin`]): a browser sends the cookie to
//!   every port of 127.0.0.1, and a page served on another port must not
//!   be able to use it.
//! - **No request elsewhere**: the page, its script and style are embedded
//!   in the binary and served with a strict Content-Security-Policy (only
//!   this origin, no inline script); there is no build step.
//! - **Live**: the page listens to `/v1/events` (server-sent events) and
//!   updates progress, activity and the views those events touch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use rand::RngCore;
use serde::Deserialize;

use crate::Node;

/// How long a login link works.
pub const LOGIN_CODE_TTL: Duration = Duration::from_secs(600);
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most login codes and sessions held at once (the oldest go first).
const MAX_HELD: usize = 64;
/// The session cookie's name.
pub const COOKIE: &str = "shoal_session";

/// One-time login codes and the sessions they became. Both are kept as
/// BLAKE3 hashes, so looking one up reveals nothing through timing.
#[derive(Debug, Default)]
pub struct Logins {
    state: Mutex<LoginState>,
}

#[derive(Debug, Default)]
struct LoginState {
    codes: HashMap<[u8; 32], Instant>,
    sessions: HashMap<[u8; 32], Instant>,
}

fn secret() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn keep(map: &mut HashMap<[u8; 32], Instant>, now: Instant) {
    map.retain(|_, until| *until > now);
    while map.len() >= MAX_HELD {
        let Some(oldest) = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) else {
            break;
        };
        map.remove(&oldest);
    }
}

impl Logins {
    /// A new one-time login code.
    pub fn code(&self) -> String {
        let code = secret();
        let now = Instant::now();
        if let Ok(mut s) = self.state.lock() {
            keep(&mut s.codes, now);
            s.codes.insert(
                *blake3::hash(code.as_bytes()).as_bytes(),
                now + LOGIN_CODE_TTL,
            );
        }
        code
    }

    /// Trades a login code (once) for a new session id.
    fn redeem(&self, code: &str) -> Option<String> {
        let now = Instant::now();
        let mut s = self.state.lock().ok()?;
        let until = s.codes.remove(blake3::hash(code.as_bytes()).as_bytes())?;
        if until <= now {
            return None;
        }
        let session = secret();
        keep(&mut s.sessions, now);
        s.sessions.insert(
            *blake3::hash(session.as_bytes()).as_bytes(),
            now + SESSION_TTL,
        );
        Some(session)
    }

    /// Whether `session` is a live session.
    pub fn valid(&self, session: &str) -> bool {
        let now = Instant::now();
        self.state.lock().is_ok_and(|s| {
            s.sessions
                .get(blake3::hash(session.as_bytes()).as_bytes())
                .is_some_and(|until| *until > now)
        })
    }

    /// Whether the request's cookies carry a live session.
    pub fn from_headers(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(cookie::Cookie::split_parse)
            .filter_map(|c| c.ok())
            .any(|c| c.name() == COOKIE && self.valid(c.value()))
    }
}

/// Whether a request comes from a page of this very origin (scheme, host
/// and port): the browser says so in `Sec-Fetch-Site` (every current
/// browser sends it), and an `Origin`, when sent, must be `http://` and the
/// request's own `Host`. A page on another port of 127.0.0.1 is
/// `same-site`, not `same-origin`, and is refused.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let fetched_here =
        headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("same-origin");
    let origin_ok = match (text(header::ORIGIN), text(header::HOST)) {
        (None, _) => true,
        (Some(o), Some(host)) => o.strip_prefix("http://") == Some(host),
        (Some(_), None) => false,
    };
    fetched_here && origin_ok
}

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Only this origin; no inline script or style, no frames, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// The dashboard's routes (the API's Host check wraps them).
pub(crate) fn routes(node: Node) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/login", get(login))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
        .route("/ui/qr.svg", get(qr))
        .with_state(node)
}

fn page(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// What a browser without a session gets.
fn refused(why: &str) -> Response {
    page(
        StatusCode::UNAUTHORIZED,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><html lang=en><head><meta charset=utf-8>\
             <title>shoal: log in</title></head><body><h1>Not logged in</h1>\
             <p id=refused>{why} Run <code>shoal dashboard</code> on this device \
             and open the one-time login link it prints.</p></body></html>"
        ),
    )
}

async fn index(State(node): State<Node>, headers: HeaderMap) -> Response {
    if !node.logins().from_headers(&headers) {
        return refused("This page needs a login link.");
    }
    page(StatusCode::OK, "text/html; charset=utf-8", INDEX.into())
}

async fn app_js(State(node): State<Node>, headers: HeaderMap) -> Response {
    if !node.logins().from_headers(&headers) {
        return refused("Not logged in.");
    }
    page(
        StatusCode::OK,
        "text/javascript; charset=utf-8",
        APP_JS.into(),
    )
}

async fn app_css(State(node): State<Node>, headers: HeaderMap) -> Response {
    if !node.logins().from_headers(&headers) {
        return refused("Not logged in.");
    }
    page(StatusCode::OK, "text/css; charset=utf-8", APP_CSS.into())
}

#[derive(Deserialize)]
struct LoginQuery {
    code: Option<String>,
}

async fn login(State(node): State<Node>, Query(q): Query<LoginQuery>) -> Response {
    let Some(session) = q.code.and_then(|c| node.logins().redeem(&c)) else {
        return refused("This login link is used, expired or wrong.");
    };
    let cookie = cookie::Cookie::build((COOKIE, session))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(SESSION_TTL.as_secs() as i64))
        .build();
    let mut r = Redirect::to("/ui/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie.to_string()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[derive(Deserialize)]
struct QrQuery {
    text: String,
}

/// An invite code's QR code, as SVG.
async fn qr(State(node): State<Node>, headers: HeaderMap, Query(q): Query<QrQuery>) -> Response {
    if !node.logins().from_headers(&headers) {
        return refused("Not logged in.");
    }
    // Invite codes are bech32: upper case fits QR's compact alphanumeric mode.
    match qrcode::QrCode::new(q.text.to_uppercase()) {
        Ok(code) => {
            let svg = code
                .render::<qrcode::render::svg::Color>()
                .min_dimensions(240, 240)
                .build();
            page(StatusCode::OK, "image/svg+xml", svg)
        }
        Err(e) => page(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            format!("cannot draw that as a QR code: {e}"),
        ),
    }
}
