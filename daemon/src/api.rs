//! The API listener's router: API.md's route table ([`crate::routes`]) on axum, and what every
//! request goes through, in order:
//!
//! 1. its id (the caller's `x-request-id` when valid, else a new one), in a span that every log
//!    line of the request carries, in every problem body, and echoed in the answer;
//! 2. the per-client-certificate limits ([`crate::limits`]), before anything is read;
//! 3. the caller and role check, then the body under the route's size limit and the listener's
//!    body timeout;
//! 4. the handler, in a task of its own (a client that hangs up must not cut a workflow short
//!    between two of its steps); while sealed, [`Gate::sealed_route`];
//! 5. one access-log line and the metrics, labelled by the route table only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Query, RawPathParams, Request, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use tracing::Instrument as _;

use crate::http::{BodyError, Peer, read_body};
use crate::limits::{Admitted, ClientLimiter};
use crate::problem::ApiError;
use crate::routes::{self, Route};
use crate::unseal::Gate;

/// What every API request shares.
#[derive(Clone, Debug)]
struct ApiState {
    gate: Arc<Gate>,
    limiter: Arc<ClientLimiter>,
}

/// The id of the request being answered, for problem bodies.
#[derive(Clone, Debug)]
struct RequestId(Arc<str>);

/// The header that carries a request's id, both ways.
const REQUEST_ID: &str = "x-request-id";

/// The router of the API listener.
pub(crate) fn router(gate: Arc<Gate>, limiter: ClientLimiter) -> Router {
    let state = ApiState {
        gate,
        limiter: Arc::new(limiter),
    };
    let mut by_template: Vec<(&'static str, MethodRouter<ApiState>)> = Vec::new();
    for route in routes::table() {
        let handler =
            move |State(state): State<ApiState>, request: Request| dispatch(route, state, request);
        let filter = MethodFilter::try_from(route.method.clone())
            .unwrap_or_else(|_| unreachable!("the route table uses standard methods only"));
        match by_template.iter_mut().find(|(t, _)| *t == route.template) {
            Some((_, methods)) => *methods = std::mem::take(methods).on(filter, handler),
            None => by_template.push((route.template, on(filter, handler))),
        }
    }
    let mut router = Router::new();
    for (template, methods) in by_template {
        router = router.route(template, methods);
    }
    router
        .fallback(|request: Request| async move { problem(&ApiError::NotFound("route"), &request) })
        .method_not_allowed_fallback(|request: Request| async move {
            problem(&ApiError::MethodNotAllowed, &request)
        })
        .layer(middleware::from_fn_with_state(state.clone(), context))
        .with_state(state)
}

/// Steps 1, 2 and 5 of the module's list, around whatever the router does with the request.
async fn context(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id: Arc<str> = Arc::from(request_id(request.headers()));
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .and_then(|matched| routes::find(&method, matched.as_str()));
    let peer = request.extensions().get::<Peer>().cloned();
    let caller = peer.as_ref().and_then(|peer| peer.caller.clone());
    let (principal, role) = match &caller {
        Some(Ok(caller)) => (caller.to_string(), caller.role.as_str()),
        _ => ("unknown".to_owned(), "-"),
    };
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = async {
        if let Some(Ok(caller)) = &caller {
            match state.limiter.admit(caller) {
                Ok(admitted) => {
                    request.extensions_mut().insert(admitted);
                }
                Err(error) => {
                    tracing::info!(caller = %caller, "client over its limits");
                    return problem(&error, &request);
                }
            }
        }
        next.run(request).await
    }
    .instrument(span.clone())
    .await;
    let status = response.status().as_u16();
    // Labels only from the route table: whatever a client made up counts under fixed ones.
    let (label, method_label) = match route {
        Some(route) => (route.template, route.method.as_str()),
        None => ("unmatched", "other"),
    };
    state
        .gate
        .metrics
        .observe_request(label, method_label, status, started.elapsed());
    span.in_scope(|| access_log(peer.as_ref(), (&principal, role), label, status, started));
    echo_id(&mut response, &id);
    response
}

/// The request id, access log and echo of the plain listeners (operations and embedded CA),
/// whose callers have no certificate: principal `-`, route by the router's own templates.
pub(crate) async fn plain_context(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(request.headers());
    let peer = request.extensions().get::<Peer>().cloned();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|matched| matched.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| access_log(peer.as_ref(), ("-", "-"), &route, status, started));
    echo_id(&mut response, &id);
    response
}

/// One access-log line per request, inside the request's span (so with its id): the client's
/// address, who called, the route's template (never the path with its ids), the status and the
/// time taken. Never a body, never personal data.
fn access_log(
    peer: Option<&Peer>,
    (principal, role): (&str, &str),
    route: &str,
    status: u16,
    started: Instant,
) {
    tracing::info!(
        target: "smartsign::access",
        client = %peer.map(|peer| peer.address.to_string()).unwrap_or_default(),
        principal,
        role,
        route,
        status,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "request"
    );
}

fn echo_id(response: &mut Response, id: &str) {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
}

/// The id of a request: the client's `x-request-id` when it is 1 to 64 letters, digits, `.`,
/// `_`, `-` or `:`, so that a caller can follow its own id through the logs; otherwise 16
/// random bytes in hex.
fn request_id(headers: &HeaderMap) -> String {
    let given = headers
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

/// Steps 3 and 4: one route's request, answered.
async fn dispatch(route: &'static Route, state: ApiState, request: Request) -> Response {
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_else(|| Arc::from(""));
    match answer(route, &state.gate, request).await {
        Ok(reply) => reply.into_response(),
        Err(error) => problem_response(&error, &id),
    }
}

async fn answer(route: &'static Route, gate: &Gate, request: Request) -> Result<Reply, ApiError> {
    let (mut parts, body) = request.into_parts();
    let peer = parts
        .extensions
        .get::<Peer>()
        .cloned()
        .ok_or(ApiError::ClientCertificateRequired)?;
    let caller = match peer.caller {
        Some(Ok(caller)) => caller,
        Some(Err(reason)) => {
            tracing::info!(%reason, route = route.template, "client certificate names no caller");
            return Err(ApiError::ClientCertificateRequired);
        }
        None => return Err(ApiError::ClientCertificateRequired),
    };
    if !route.roles.contains(&caller.role) {
        tracing::info!(caller = %caller, route = route.template, "role not allowed");
        return Err(ApiError::Forbidden);
    }
    let params = {
        use axum::extract::FromRequestParts as _;
        RawPathParams::from_request_parts(&mut parts, &())
            .await
            .map_err(|error| ApiError::InvalidRequest(format!("request path: {error}")))?
            .iter()
            .map(|(_, value)| value.to_owned())
            .collect()
    };
    let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map_err(|error| ApiError::InvalidRequest(format!("query string: {error}")))?
        .0;
    let body = read_body(body, route.body_limit, peer.body_timeout)
        .await
        .map_err(|error| match error {
            BodyError::TooLarge(limit) => ApiError::PayloadTooLarge(limit),
            BodyError::TimedOut(_) => ApiError::RequestTimeout,
            BodyError::Broken => ApiError::InvalidRequest(error.to_string()),
        })?;
    let admitted = parts.extensions.remove::<Admitted>();
    let ctx = Ctx {
        caller,
        params,
        query,
        body,
    };
    match gate.app() {
        Some(app) => {
            let app = app.clone();
            tokio::spawn(
                async move {
                    let _admitted = admitted;
                    (route.handler)(app, ctx).await
                }
                .in_current_span(),
            )
            .await
            .unwrap_or_else(|error| {
                tracing::error!(%error, route = route.template, "handler failed");
                Err(ApiError::Internal)
            })
        }
        None => gate.sealed_route(route, ctx).await,
    }
}

/// A problem answer for a request that carries its [`RequestId`].
fn problem(error: &ApiError, request: &Request) -> Response {
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_else(|| Arc::from(""));
    problem_response(error, &id)
}

/// An `application/problem+json` answer, with `Retry-After` for the errors that have one.
pub(crate) fn problem_response(error: &ApiError, request_id: &str) -> Response {
    let mut response = (
        error.status(),
        [(CONTENT_TYPE, "application/problem+json")],
        error.body(request_id),
    )
        .into_response();
    if let Some(seconds) = error.retry_after() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// One API request, after TLS identified the caller and the route's checks passed.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) caller: crate::tls::Caller,
    pub(crate) params: Vec<String>,
    pub(crate) query: HashMap<String, String>,
    pub(crate) body: axum::body::Bytes,
}

impl Ctx {
    /// The JSON body as `T`; unknown fields and bad values give `invalid_request` naming the
    /// field (`guardian.date_of_birth: invalid type: integer, expected a string`).
    pub(crate) fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        self.json_or_detail().map_err(ApiError::InvalidRequest)
    }

    /// As [`Ctx::json`], with the refusal's detail for a workflow's own error.
    pub(crate) fn json_or_detail<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let mut deserializer = serde_json::Deserializer::from_slice(&self.body);
        let detail = |path: String, error: &serde_json::Error| match path.as_str() {
            "" | "." => format!("request body: {error}"),
            field => format!("{field}: {error}"),
        };
        let value = serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|error| detail(error.path().to_string(), error.inner()))?;
        deserializer
            .end()
            .map_err(|error| detail(String::new(), &error))?;
        Ok(value)
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
    pub(crate) status: axum::http::StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
    /// Extra response headers (e.g. `x-next-after` of the audit records).
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn json(status: axum::http::StatusCode, value: &impl serde::Serialize) -> Self {
        Self {
            status,
            content_type: "application/json",
            // Serialising our own response types cannot fail: they hold no maps with non-string
            // keys and no failing Serialize impls.
            body: serde_json::to_vec(value).unwrap_or_default(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn ok(value: &impl serde::Serialize) -> Self {
        Self::json(axum::http::StatusCode::OK, value)
    }

    pub(crate) fn empty(status: axum::http::StatusCode) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn bytes(content_type: &'static str, body: Vec<u8>) -> Self {
        Self {
            status: axum::http::StatusCode::OK,
            content_type,
            body,
            headers: Vec::new(),
        }
    }

    /// The same answer with the header `name: value` (a name from this crate, in lowercase).
    pub(crate) fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, [(CONTENT_TYPE, self.content_type)], self.body).into_response();
        for (name, value) in self.headers {
            // Our own header names and values (numbers): always valid.
            if let Ok(value) = HeaderValue::from_str(&value) {
                response
                    .headers_mut()
                    .insert(axum::http::HeaderName::from_static(name), value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_store_answers_503_with_retry_after() {
        let response = problem_response(&ApiError::StoreUnavailable, "r-1");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let other = problem_response(&ApiError::Conflict, "r-2");
        assert!(other.headers().get(RETRY_AFTER).is_none());
    }

    #[test]
    fn only_well_formed_request_ids_are_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("svc-1:abc.DEF_9"));
        assert_eq!(request_id(&headers), "svc-1:abc.DEF_9");
        for bad in ["", "with space", "semi;colon", &"x".repeat(65)] {
            headers.insert(REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let made = request_id(&headers);
            assert_eq!(made.len(), 32, "{bad:?} gave {made:?}");
            assert!(made.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
}
