//! `tether controller --dashboard ADDR`: the fleet in a browser, and over
//! plain HTTP for scripts.
//!
//! - `GET /`: the page (`page`), which reads the two below.
//! - `GET /api/fleet`: a JSON snapshot, every node (as `tether fleet nodes
//!   --json` shows it) and every version, newest first.
//! - `GET /api/events`: Server-Sent Events, the events WatchFleet streams,
//!   each with an id, resumable (`feed`).
//! - `GET|POST|DELETE /api/session`: who is signed in; sign in with an
//!   operator token; sign out (`access`).
//! - `POST /api/rollback`: publish an earlier version again, as the
//!   signed-in operator.
//! - `POST /api/rollout`: abort, pause, resume or promote a rollout, as
//!   the signed-in operator.

mod access;
mod feed;
mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::fleet::{Fleet, Publication, PublishError};
use super::json::{node_json, rollout_json, version_json};
use super::rollout::Action;
use super::selector::Selector;
use crate::config::ControlTls;
use access::Access;
use feed::Feed;

/// How long a client has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest action request body.
const MAX_BODY: usize = 64 * 1024;
/// A wrong token waits this long for its answer, to slow guessing.
const SIGN_IN_FAILURE_DELAY: Duration = Duration::from_millis(500);

type Body = BoxBody<Bytes, Infallible>;

/// What `--dashboard*` asked for.
pub struct Settings {
    pub addr: SocketAddr,
    pub tokens: Option<PathBuf>,
}

/// The dashboard, checked and ready to bind: who may use it and, when the
/// controller has a certificate, its TLS.
pub struct Dashboard {
    access: Access,
    tls: Option<TlsAcceptor>,
}

impl Dashboard {
    /// Refuses an address off loopback without operator tokens, or
    /// without TLS unless `insecure`.
    pub fn new(
        settings: &Settings,
        tls: Option<&ControlTls>,
        insecure: bool,
    ) -> Result<Dashboard, String> {
        let addr = settings.addr;
        let off_loopback = !addr.ip().is_loopback();
        if off_loopback && settings.tokens.is_none() {
            return Err(format!(
                "--dashboard {addr} is not loopback: give --dashboard-tokens so that only \
                 operators can see the fleet, or bind it to 127.0.0.1 and reach it through a \
                 tunnel (kubectl port-forward, ssh -L)"
            ));
        }
        if off_loopback && tls.is_none() && !insecure {
            return Err(format!(
                "--dashboard {addr} is not loopback: give --cert and --key so that tokens \
                 travel over TLS, or --insecure to send them in the clear"
            ));
        }
        let text = match &settings.tokens {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--dashboard-tokens {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let tokens = settings.tokens.as_deref().zip(text.as_deref());
        let access = Access::new(tokens, off_loopback, tls.is_some())?;
        let tls = tls.map(acceptor).transpose()?;
        Ok(Dashboard { access, tls })
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener, fleet: Arc<Fleet>) {
        let state = Arc::new(State {
            feed: Feed::start(&fleet),
            fleet,
            access: self.access,
        });
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, most likely: back off, don't spin.
                    tracing::warn!(%error, "dashboard: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, state).await,
                    Some(tls) => {
                        let handshake = tls.accept(stream);
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(HEADER_READ_TIMEOUT, handshake).await
                        {
                            serve_connection(stream, state).await;
                        }
                    }
                }
            });
        }
    }
}

/// HTTPS with the controller's own certificate; browsers present no
/// client certificate, so operators sign in with a token.
fn acceptor(tls: &ControlTls) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| format!("--key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("dashboard TLS: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

struct State {
    fleet: Arc<Fleet>,
    feed: Arc<Feed>,
    access: Access,
}

async fn serve_connection<S>(stream: S, state: Arc<State>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(request, &state).await) }
    });
    // HTTP/1.1 only (enough for a page, JSON and SSE), so the request-head
    // deadline holds from the first byte: a client that sends nothing in
    // time is dropped.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn route(request: Request<Incoming>, state: &State) -> Response<Body> {
    let path = request.uri().path();
    let method = request.method().clone();
    if method == Method::GET {
        if let Some(asset) = page::asset(path) {
            return asset;
        }
    }
    match (method, path) {
        (Method::GET, "/api/session") => session(state, request.headers()),
        (Method::POST, "/api/session") => sign_in(state, request).await,
        (Method::DELETE, "/api/session") => {
            let cookie = state.access.sign_out(request.headers());
            let mut answer = json_response(StatusCode::OK, &json!({ "operator": null }));
            set_cookie(&mut answer, &cookie);
            answer
        }
        (Method::GET, "/api/fleet") | (Method::GET, "/api/events")
            if !state.access.may_read(request.headers()) =>
        {
            error(StatusCode::UNAUTHORIZED, "sign in as an operator first")
        }
        (Method::GET, "/api/fleet") => snapshot(&state.fleet, &state.feed),
        (Method::GET, "/api/events") => {
            let last = last_event_id(&request);
            state.feed.subscribe(last.as_deref())
        }
        (Method::POST, "/api/rollback") => rollback(state, request).await,
        (Method::POST, "/api/rollout") => control_rollout(state, request).await,
        (_, "/api/session" | "/api/fleet" | "/api/events" | "/api/rollback" | "/api/rollout") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// From the header a browser's EventSource sends when it reconnects, or
/// from the query when the page reconnects by itself.
fn last_event_id(request: &Request<Incoming>) -> Option<String> {
    if let Some(id) = request
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
    {
        return Some(id.to_owned());
    }
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "last_event_id").then(|| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn session(state: &State, headers: &HeaderMap) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({
            "operator": state.access.operator(headers),
            "sign_in": state.access.sign_in_possible(),
            "may_read": state.access.may_read(headers),
        }),
    )
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

async fn sign_in(state: &State, request: Request<Incoming>) -> Response<Body> {
    let body: SignIn = match action_body(request).await {
        Ok(body) => body,
        Err(answer) => return answer,
    };
    let Some((operator, cookie)) = state.access.sign_in(&body.token) else {
        tokio::time::sleep(SIGN_IN_FAILURE_DELAY).await;
        return error(StatusCode::UNAUTHORIZED, "unknown token");
    };
    tracing::info!(%operator, "dashboard: operator signed in");
    let mut answer = json_response(StatusCode::OK, &json!({ "operator": operator }));
    set_cookie(&mut answer, &cookie);
    answer
}

#[derive(Deserialize)]
struct Rollback {
    version: u64,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    idempotency_key: String,
}

async fn rollback(state: &State, request: Request<Incoming>) -> Response<Body> {
    let Some(operator) = state.access.operator(request.headers()) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "sign in as an operator to roll back",
        );
    };
    let body: Rollback = match action_body(request).await {
        Ok(body) => body,
        Err(answer) => return answer,
    };
    let Some(earlier) = state.fleet.version(body.version) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no version {}", body.version),
        );
    };
    let publication = Publication::rollback(&earlier, body.comment, operator, body.idempotency_key);
    match state.fleet.publish(publication).await {
        Ok(published) => json_response(
            StatusCode::OK,
            &json!({ "version": published.version, "targets": published.targets }),
        ),
        Err(e @ PublishError::KeyReused { .. }) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ PublishError::Store(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Deserialize)]
struct ControlRollout {
    version: u64,
    /// "abort", "pause", "resume" or "promote".
    action: String,
    #[serde(default)]
    reason: String,
}

async fn control_rollout(state: &State, request: Request<Incoming>) -> Response<Body> {
    let Some(operator) = state.access.operator(request.headers()) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "sign in as an operator to change a rollout",
        );
    };
    let body: ControlRollout = match action_body(request).await {
        Ok(body) => body,
        Err(answer) => return answer,
    };
    let action = match body.action.as_str() {
        "abort" => Action::Abort,
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "promote" => Action::Promote,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "action: abort, pause, resume or promote",
            )
        }
    };
    tracing::info!(%operator, version = body.version, action = %body.action, "dashboard: rollout action");
    match state
        .fleet
        .control_rollout(body.version, action, Some(&operator), &body.reason)
    {
        Ok(status) => json_response(StatusCode::OK, &rollout_json(&status)),
        Err(message) => error(StatusCode::CONFLICT, &message),
    }
}

/// The JSON body of an action. Only same-origin pages can send one: the
/// content type must be JSON (a cross-site form cannot send that without
/// a CORS preflight, which is never answered) and an `Origin`, when sent,
/// must be this host.
async fn action_body<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let headers = request.headers();
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the action as application/json",
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let own = origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host);
        if !own {
            return Err(error(
                StatusCode::FORBIDDEN,
                "actions come from the dashboard's own page",
            ));
        }
    }
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large"))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid body: {e}")))
}

/// The fleet now, with the id of the newest event it reflects for sure:
/// read first, so any later event may or may not be in the snapshot, and
/// a client applies those again (each event sets a state, so twice is
/// once).
fn snapshot(fleet: &Fleet, feed: &Feed) -> Response<Body> {
    let events_through = feed.newest_id();
    let nodes: Vec<_> = fleet
        .nodes(&Selector::default())
        .iter()
        .map(node_json)
        .collect();
    let versions: Vec<_> = fleet.versions().iter().map(version_json).collect();
    json_response(
        StatusCode::OK,
        &json!({ "nodes": nodes, "versions": versions, "events_through": events_through }),
    )
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("a valid response")
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}

fn set_cookie(response: &mut Response<Body>, cookie: &str) {
    if let Ok(value) = cookie.parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}
