//! HTTP plumbing: the request context handed to handlers, JSON in and out, and the two listeners
//! (the mutual-TLS API and the plain operations listener) with graceful shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::de::DeserializeOwned;
use std::future::Future;

use hyper::Method;
use hyper_util::server::graceful::Watcher;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::problem::ApiError;
use crate::tls::Caller;
use crate::unseal::Gate;

/// The largest request body accepted; API bodies are a few KiB.
const MAX_BODY: usize = 64 * 1024;
/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One API request, after TLS identified the caller.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) caller: Caller,
    pub(crate) params: Vec<String>,
    pub(crate) query: HashMap<String, String>,
    pub(crate) body: Bytes,
}

impl Ctx {
    /// The JSON body as `T`; unknown fields and bad values give `invalid_request`.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|error| ApiError::InvalidRequest(format!("request body: {error}")))
    }

    /// The `n`th path parameter.
    pub(crate) fn param(&self, n: usize) -> &str {
        self.params.get(n).map(String::as_str).unwrap_or_default()
    }

    /// A query parameter that must be there.
    pub(crate) fn query(&self, name: &str) -> Result<&str, ApiError> {
        self.query
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| ApiError::InvalidRequest(format!("query parameter {name} is required")))
    }

    /// A numeric query parameter.
    pub(crate) fn query_u64(&self, name: &str, default: Option<u64>) -> Result<u64, ApiError> {
        match (self.query.get(name), default) {
            (Some(text), _) => text.parse().map_err(|_| {
                ApiError::InvalidRequest(format!("query parameter {name} must be a number"))
            }),
            (None, Some(default)) => Ok(default),
            (None, None) => Err(ApiError::InvalidRequest(format!(
                "query parameter {name} is required"
            ))),
        }
    }
}

/// A successful answer.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(status: StatusCode, value: &impl serde::Serialize) -> Self {
        Self {
            status,
            content_type: "application/json",
            // Serialising our own response types cannot fail: they hold no maps with non-string
            // keys and no failing Serialize impls.
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub(crate) fn ok(value: &impl serde::Serialize) -> Self {
        Self::json(StatusCode::OK, value)
    }

    pub(crate) fn empty(status: StatusCode) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: Vec::new(),
        }
    }

    pub(crate) fn bytes(content_type: &'static str, body: Vec<u8>) -> Self {
        Self {
            status: StatusCode::OK,
            content_type,
            body,
        }
    }
}

fn response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

pub(crate) fn problem_response(error: &ApiError, request_id: &str) -> Response<Full<Bytes>> {
    let mut response = response(
        error.status(),
        "application/problem+json",
        error.body(request_id),
    );
    if let Some(seconds) = error.retry_after() {
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(key), percent_decode(value));
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        // Two hex digits make at most 0xff.
                        out.push((high * 16 + low) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The header that carries a request's id, both ways.
const REQUEST_ID: &str = "x-request-id";

/// The id of a request: the client's `x-request-id` when it is 1 to 64 letters, digits, `.`,
/// `_`, `-` or `:`, so that a caller can follow its own id through the logs; otherwise 16
/// random bytes in hex.
fn request_id(request: &Request<Incoming>) -> String {
    let given = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        });
    match given {
        Some(id) => id.to_owned(),
        None => {
            use rand_core::RngCore;
            let mut bytes = [0u8; 16];
            rand_core::OsRng.fill_bytes(&mut bytes);
            hex::encode(bytes)
        }
    }
}

/// One API request: its id in every log line of it (a span), in a problem body, and echoed in
/// the `x-request-id` header of the answer.
async fn handle_api(
    gate: Arc<Gate>,
    caller: Result<Caller, String>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    use tracing::Instrument;
    let id = request_id(&request);
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = answer(gate, caller, request, &id).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(response)
}

async fn answer(
    gate: Arc<Gate>,
    caller: Result<Caller, String>,
    request: Request<Incoming>,
    request_id: &str,
) -> Response<Full<Bytes>> {
    use tracing::Instrument;
    let started = Instant::now();
    let principal = caller
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|_| "unknown".to_owned());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = parse_query(request.uri().query());
    let Some((route, params)) = crate::routes::resolve(&method, &path) else {
        let error = if crate::routes::path_known(&path) {
            ApiError::MethodNotAllowed
        } else {
            ApiError::NotFound("route")
        };
        // One fixed label for whatever a client made up: no series from attacker input.
        gate.metrics.observe_request(
            "unmatched",
            "other",
            error.status().as_u16(),
            started.elapsed(),
        );
        access_log(&principal, "unmatched", error.status().as_u16(), started);
        return problem_response(&error, request_id);
    };
    let result = match caller {
        Err(reason) => {
            tracing::info!(%reason, route = route.template, "client certificate names no caller");
            Err(ApiError::ClientCertificateRequired)
        }
        Ok(caller) if !route.roles.contains(&caller.role) => {
            tracing::info!(caller = %caller, route = route.template, "role not allowed");
            Err(ApiError::Forbidden)
        }
        Ok(caller) => match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Err(_) => Err(ApiError::InvalidRequest(format!(
                "the request body must be at most {MAX_BODY} bytes"
            ))),
            Ok(body) => {
                let ctx = Ctx {
                    caller,
                    params,
                    query,
                    body: body.to_bytes(),
                };
                match gate.app() {
                    // A task of its own: a client that goes away mid-request drops this
                    // future, and must not cut a workflow short between two of its steps.
                    Some(app) => tokio::spawn((route.handler)(app.clone(), ctx).in_current_span())
                        .await
                        .unwrap_or_else(|error| {
                            tracing::error!(%error, route = route.template, "handler failed");
                            Err(ApiError::Internal)
                        }),
                    None => gate.sealed_route(route, ctx).await,
                }
            }
        },
    };
    let response = match result {
        Ok(reply) => response(reply.status, reply.content_type, reply.body),
        Err(error) => problem_response(&error, request_id),
    };
    gate.metrics.observe_request(
        route.template,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    access_log(
        &principal,
        route.template,
        response.status().as_u16(),
        started,
    );
    response
}

/// One access-log line per request, inside the request's span (so with its id): who called,
/// the route's template (never the path with its ids), the status and the time taken. Never a
/// body, never personal data.
fn access_log(principal: &str, route: &str, status: u16, started: Instant) {
    tracing::info!(
        target: "smartsign::access",
        principal,
        route,
        status,
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
}

/// Accepts connections on `listener` and serves each with `serve` until `shutdown` turns true.
/// Then it stops accepting, lets open connections finish their requests (hyper's graceful
/// shutdown, at most `grace`), and aborts what is left, so that no connection outlives the
/// listener and the daemon's state can be closed in order.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve(stream, peer, graceful.watcher()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the shutdown grace");
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Serves the mutual-TLS API on `listener` until `shutdown` turns true: the sealed routes until
/// `gate` opens, then the route table.
pub(crate) async fn serve_api(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    gate: Arc<Gate>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    accept_loop(listener, shutdown, grace, move |stream, peer, watcher| {
        let acceptor = acceptor.clone();
        let gate = gate.clone();
        async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let caller = match tls.get_ref().1.peer_certificates() {
                Some([leaf, ..]) => gate.names.caller(leaf).map_err(|error| error.to_string()),
                _ => Err("no client certificate".to_owned()),
            };
            let service =
                service_fn(move |request| handle_api(gate.clone(), caller.clone(), request));
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        }
    })
    .await;
}

/// Serves a plain-HTTP listener (operations, embedded CA) with `answer` until `shutdown`.
pub(crate) async fn serve_plain<F, Fut>(
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    answer: F,
) where
    F: Fn(Method, String, Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (StatusCode, &'static str, Vec<u8>)> + Send + 'static,
{
    accept_loop(
        listener,
        shutdown,
        Duration::from_secs(2),
        move |stream, _, watcher| {
            let answer = answer.clone();
            async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let method = request.method().clone();
                        let path = request.uri().path().to_owned();
                        let reply =
                            match Limited::new(request.into_body(), MAX_BODY).collect().await {
                                Ok(body) => answer(method, path, body.to_bytes().to_vec()).await,
                                Err(_) => (
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    "text/plain",
                                    format!("the request body must be at most {MAX_BODY} bytes\n")
                                        .into_bytes(),
                                ),
                            };
                        let (status, content_type, body) = reply;
                        Ok::<_, Infallible>(response(status, content_type, body))
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let _ = watcher.watch(connection.into_owned()).await;
            }
        },
    )
    .await;
}

/// Binds a listener, naming the address in the error.
pub(crate) async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(address)
        .await
        .map_err(|error| format!("cannot listen on {address} for the {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_store_answers_503_with_retry_after() {
        let response = problem_response(&ApiError::StoreUnavailable, "r-1");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[hyper::header::RETRY_AFTER], "1");
        let other = problem_response(&ApiError::Conflict, "r-2");
        assert!(other.headers().get(hyper::header::RETRY_AFTER).is_none());
    }
}
