//! The connection layer of every listener (the mutual-TLS API, the operations listener and the
//! embedded CA): accepting under caps, the TLS handshake and the client's identity, the
//! timeouts, and graceful shutdown. What a request means is decided by the listener's axum
//! [`Router`] ([`crate::api`], [`crate::operations`], [`crate::ca_http`]).
//!
//! A client that holds a connection open on purpose is cut off at each stage:
//!
//! | stage | limit |
//! |---|---|
//! | accepted | `max_connections` per listener (the rest wait in the backlog), `max_connections_per_address` (the rest are closed at once) |
//! | TLS handshake | `handshake_timeout_seconds` |
//! | request headers | `header_timeout_seconds`, counted from when the connection is ready for the request (on HTTP/1.1 also the longest wait between two requests) |
//! | request body | `body_timeout_seconds` for the whole body, and a size limit per route |
//! | idle | `idle_timeout_seconds` with no request in flight |

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use crate::config::ConnectionLimits;
use crate::metrics::Metrics;
use crate::tls::{Caller, ServerTls};

/// The largest request header block, on both HTTP versions.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS: u32 = 64;

/// One listener: its name (a metric label), its limits, and what it serves.
#[derive(Clone, Debug)]
pub(crate) struct Listener {
    pub(crate) name: &'static str,
    pub(crate) limits: Limits,
    pub(crate) metrics: Metrics,
    /// How long in-flight requests get to finish at shutdown.
    pub(crate) grace: Duration,
}

/// [`ConnectionLimits`] as durations.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) handshake: Duration,
    pub(crate) header: Duration,
    pub(crate) body: Duration,
    pub(crate) idle: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_per_address: usize,
}

impl From<&ConnectionLimits> for Limits {
    fn from(limits: &ConnectionLimits) -> Self {
        Self {
            handshake: Duration::from_secs(limits.handshake_timeout_seconds),
            header: Duration::from_secs(limits.header_timeout_seconds),
            body: Duration::from_secs(limits.body_timeout_seconds),
            idle: Duration::from_secs(limits.idle_timeout_seconds),
            max_connections: limits.max_connections,
            max_per_address: limits.max_connections_per_address,
        }
    }
}

/// Who is on the other end of a connection, in the extensions of each of its requests.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub(crate) address: SocketAddr,
    /// On the API listener: the caller its client certificate names, or why it names none.
    pub(crate) caller: Option<Result<Caller, Arc<str>>>,
    /// The body timeout of this listener, for the handlers that read a body.
    pub(crate) body_timeout: Duration,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the request body must be at most {0} bytes")]
    TooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    #[error("the request body could not be read")]
    Broken,
}

/// Reads a whole body of at most `limit` bytes within `timeout` (for the whole body, not per
/// chunk: a client that trickles a byte at a time is cut off too).
pub(crate) async fn read_body(
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(BodyError::TimedOut(timeout)),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            // axum reports a body over the limit as a `LengthLimitError` in the chain.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
            while let Some(cause) = source {
                if cause.is::<http_body_util::LengthLimitError>() {
                    return Err(BodyError::TooLarge(limit));
                }
                source = cause.source();
            }
            Err(BodyError::Broken)
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true; with `tls`, every connection is a
/// mutual-TLS one and its requests carry the caller. Then it stops accepting, lets open
/// connections finish their requests (at most the grace), and aborts what is left, so that no
/// connection outlives the listener and the daemon's state can be closed in order.
pub(crate) async fn serve(
    listener: TcpListener,
    settings: Listener,
    tls: Option<Arc<ServerTls>>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let allowed = Arc::new(Semaphore::new(settings.limits.max_connections));
    let addresses = Addresses::default();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = accept(&listener, &allowed) => match accepted {
                Ok((stream, address, permit)) => {
                    let Some(slot) = addresses.take(address.ip(), settings.limits.max_per_address)
                    else {
                        settings.metrics.connection_cut(settings.name, "per_address");
                        tracing::debug!(%address, "too many connections from this address");
                        continue;
                    };
                    connections.spawn(connection(
                        stream,
                        address,
                        settings.clone(),
                        tls.clone(),
                        router.clone(),
                        shutdown.clone(),
                        (permit, slot),
                    ));
                }
                Err(error) => {
                    tracing::warn!(listener = settings.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.grace, drained).await.is_err() {
        tracing::warn!(
            listener = settings.name,
            "in-flight requests did not finish within the shutdown grace"
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// The next connection, once the listener's cap allows one more.
async fn accept(
    listener: &TcpListener,
    allowed: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // The semaphore is never closed.
    let permit = allowed
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (stream, address) = listener.accept().await?;
    // Each response goes out as soon as it is written. With Nagle's algorithm on, a response
    // whose TLS records leave in two writes waits for the client's delayed ACK (40 ms on
    // Linux): measured as a p99 of 47 ms against 5 ms for the signing flow under load.
    stream.set_nodelay(true)?;
    Ok((stream, address, permit))
}

/// Open connections per client address.
#[derive(Clone, Debug, Default)]
struct Addresses(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection's place in [`Addresses`], given back on drop.
#[derive(Debug)]
struct AddressSlot {
    addresses: Addresses,
    ip: IpAddr,
}

impl Addresses {
    fn take(&self, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            addresses: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .addresses
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Counts a connection as open while it lives.
struct OpenConnection {
    metrics: Metrics,
    listener: &'static str,
}

impl OpenConnection {
    fn new(metrics: &Metrics, listener: &'static str) -> Self {
        metrics.connection(listener, 1);
        Self {
            metrics: metrics.clone(),
            listener,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connection(self.listener, -1);
    }
}

/// One connection: the handshake (with TLS), then HTTP until it ends.
async fn connection(
    stream: TcpStream,
    address: SocketAddr,
    settings: Listener,
    tls: Option<Arc<ServerTls>>,
    router: Router,
    shutdown: watch::Receiver<bool>,
    _held: (OwnedSemaphorePermit, AddressSlot),
) {
    let _open = OpenConnection::new(&settings.metrics, settings.name);
    let Some(tls) = tls else {
        let peer = Peer {
            address,
            caller: None,
            body_timeout: settings.limits.body,
        };
        return http(TokioIo::new(stream), peer, &settings, router, shutdown).await;
    };
    let stream = match tokio::time::timeout(
        settings.limits.handshake,
        tls.acceptor().accept(stream),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            settings
                .metrics
                .connection_cut(settings.name, "handshake_failed");
            tracing::info!(%address, %error, "TLS handshake refused");
            return;
        }
        Err(_) => {
            settings
                .metrics
                .connection_cut(settings.name, "handshake_timeout");
            tracing::info!(%address, "TLS handshake timed out");
            return;
        }
    };
    let caller = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => tls
            .names()
            .caller(leaf)
            .map_err(|error| Arc::from(error.to_string())),
        _ => Err(Arc::from("no client certificate")),
    };
    let peer = Peer {
        address,
        caller: Some(caller),
        body_timeout: settings.limits.body,
    };
    http(TokioIo::new(stream), peer, &settings, router, shutdown).await;
}

/// When a connection last finished a request, and how many it has in flight.
#[derive(Debug)]
struct Activity {
    state: Mutex<(usize, Instant)>,
}

/// A request in flight on a connection; the connection is busy until it drops.
struct Busy(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.lock().0 += 1;
        Busy(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long the connection has had nothing in flight (zero while it has).
    fn idle_for(&self) -> Duration {
        let (in_flight, since) = *self.lock();
        if in_flight > 0 {
            Duration::ZERO
        } else {
            since.elapsed()
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 -= 1;
        state.1 = Instant::now();
    }
}

/// HTTP/1.1 or HTTP/2 on one connection, each request handed to `router` with the [`Peer`] in
/// its extensions, until the client closes, the connection idles out, or the daemon shuts down.
async fn http<I>(
    io: TokioIo<I>,
    peer: Peer,
    settings: &Listener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        state: Mutex::new((0, Instant::now())),
    });
    let tracked = activity.clone();
    let service = service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(peer.clone());
        let busy = tracked.begin();
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(Body::new)).await;
            drop(busy);
            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.limits.header)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .keep_alive_interval(settings.limits.idle)
        .keep_alive_timeout(settings.limits.header);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let idle = settings.limits.idle;
    let mut closing = false;
    loop {
        let wait = idle
            .saturating_sub(activity.idle_for())
            .max(Duration::from_millis(10));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(listener = settings.name, %error, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(wait), if !closing => {
                if activity.idle_for() >= idle {
                    settings.metrics.connection_cut(settings.name, "idle");
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// A listener served on a thread of its own (see [`serve_apart`]).
#[derive(Debug)]
pub(crate) struct Apart {
    stop: Arc<watch::Sender<bool>>,
    done: tokio::task::JoinHandle<()>,
}

impl Apart {
    /// Stops it (as a shutdown does) and waits until its connections are closed.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }

    /// Waits until it stopped, at the daemon's shutdown.
    pub(crate) async fn finished(self) {
        let _ = self.done.await;
    }
}

/// The scheduling priority (nice value) of a listener served apart: below the API's, so that a
/// flood of it takes the CPU that signing leaves over, not the CPU signing needs.
const APART_NICE: i32 = 10;

/// Serves `router` on `listener` like [`serve`], on a thread of its own with a one-thread
/// runtime at a lower scheduling priority. The embedded CA's listener runs so: it takes anyone's
/// requests, and a flood of them must not slow the signing flow on the same cores.
pub(crate) fn serve_apart(
    listener: TcpListener,
    settings: Listener,
    router: Router,
    shutdown: &watch::Receiver<bool>,
) -> Result<Apart, String> {
    let name = settings.name;
    let listener = listener
        .into_std()
        .map_err(|error| format!("cannot hand the {name} listener over: {error}"))?;
    let (stop, stopped) = watch::channel(false);
    let stop = Arc::new(stop);
    // The daemon's shutdown stops it too.
    let mut global = shutdown.clone();
    let forward = stop.clone();
    tokio::spawn(async move {
        let _ = global.changed().await;
        let _ = forward.send(true);
    });
    let thread = std::thread::Builder::new()
        .name(format!("smartsign-{name}"))
        .spawn(move || {
            if let Err(error) =
                rustix::process::setpriority_process(Some(rustix::thread::gettid()), APART_NICE)
            {
                tracing::warn!(listener = name, %error, "cannot lower the listener's priority");
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(listener = name, %error, "cannot start its runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, settings, None, router, stopped).await,
                    Err(error) => tracing::error!(listener = name, %error, "cannot listen"),
                }
            });
        })
        .map_err(|error| format!("cannot start the {name} listener's thread: {error}"))?;
    let done = tokio::task::spawn_blocking(move || {
        let _ = thread.join();
    });
    Ok(Apart { stop, done })
}

/// Binds a listener, naming the address in the error.
pub(crate) async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(address)
        .await
        .map_err(|error| format!("cannot listen on {address} for the {what}: {error}"))
}
