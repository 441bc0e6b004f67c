//! The operations listener: `/healthz` (alive), `/readyz` (200 only when unsealed and every
//! component the signing path needs is usable; the body names what is not) and `/metrics`.
//! While sealed, `/readyz` is 503 naming `sealed`, and `/metrics` gives what it has.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use serde_json::json;

use crate::app::App;
use crate::unseal::Gate;

/// The operations listener's router: GET only; anything else is 404 or 405 in plain text.
pub(crate) fn router(gate: Arc<Gate>) -> Router {
    let page = |path: &'static str| {
        get(move |State(gate): State<Arc<Gate>>| async move {
            let (status, content_type, body) = handle(&gate, path).await;
            (status, [(CONTENT_TYPE, content_type)], body).into_response()
        })
    };
    Router::new()
        .route("/healthz", page("/healthz"))
        .route("/readyz", page("/readyz"))
        .route("/metrics", page("/metrics"))
        .fallback(|| async { plain(StatusCode::NOT_FOUND, "not found\n") })
        .method_not_allowed_fallback(|| async {
            plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n")
        })
        .layer(axum::middleware::from_fn(crate::api::plain_context))
        .with_state(gate)
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, [(CONTENT_TYPE, "text/plain")], text).into_response()
}

/// Each component and what is wrong with it, if anything.
pub(crate) async fn readiness(app: &App) -> Vec<(&'static str, Option<String>)> {
    let hsm = app
        .hsm
        .check_system_key(hsm_adapter::SystemKey::Data)
        .await
        .err()
        .map(|error| error.to_string());
    // With several nodes, the log's health is its ledger's as of the last call to it: the
    // checkpoint loop brings the copy up to date every 5 s, which is also how the log learns
    // that an outage is over; a probe costs no round trip.
    let audit = app.audit.health().err().map(|error| error.to_string());
    let store = app
        .store(|store| store.health())
        .await
        .err()
        .map(|error| error.code().to_owned());
    let ca = app.metrics.status().problem();
    vec![("hsm", hsm), ("store", store), ("audit", audit), ("ca", ca)]
}

async fn handle(gate: &Gate, path: &str) -> (StatusCode, &'static str, Vec<u8>) {
    let Some(app) = gate.app() else {
        return sealed(gate, path);
    };
    match path {
        "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        "/readyz" => {
            let components = readiness(app).await;
            let ready = components.iter().all(|(_, problem)| problem.is_none());
            let body = json!({
                "ready": ready,
                "sealed": false,
                "node": app.node_id,
                "leader": app.leader.leads(),
                "components": components
                    .iter()
                    .map(|(name, problem)| {
                        (name.to_string(), json!(problem.as_deref().unwrap_or("ok")))
                    })
                    .collect::<serde_json::Map<_, _>>(),
            });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", body.to_string().into_bytes())
        }
        "/metrics" => {
            let now = app.clock.now();
            if let Ok(count) = app.store(move |store| store.count_pending(now)).await {
                app.metrics
                    .pending_requests
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            for (lane, label) in [
                (hsm_adapter::Lane::Signing, "signing"),
                (hsm_adapter::Lane::Background, "background"),
            ] {
                app.metrics
                    .hsm_queued
                    .with_label_values(&[label])
                    .set(i64::try_from(app.hsm.queued(lane)).unwrap_or(i64::MAX));
            }
            app.metrics.catch_up(
                app.hsm.key_cache(),
                app.store.commit_counts(),
                app.store.round_trips(),
            );
            let stats = app.audit.stats();
            app.metrics
                .audit_tree_size
                .set(i64::try_from(stats.tree_size).unwrap_or(i64::MAX));
            if let Some(checkpoint) = app.audit.latest_checkpoint()
                && let Ok(at) = time::OffsetDateTime::parse(
                    checkpoint.timestamp().as_str(),
                    &time::format_description::well_known::Rfc3339,
                )
            {
                app.metrics.checkpoint_age.set((now - at).whole_seconds());
            }
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                app.metrics.render(),
            )
        }
        _ => not_found(),
    }
}

/// The operations listener before the HSM is open.
fn sealed(gate: &Gate, path: &str) -> (StatusCode, &'static str, Vec<u8>) {
    match path {
        "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        "/readyz" => {
            let (received, threshold) = gate.progress().unwrap_or_default();
            let body = json!({
                "ready": false,
                "sealed": true,
                "components": {
                    "sealed": format!(
                        "sealed: {received} of {threshold} unseal shares received \
                         (POST /v1/admin/unseal)"
                    ),
                },
            });
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                body.to_string().into_bytes(),
            )
        }
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            gate.metrics.render(),
        ),
        _ => not_found(),
    }
}

fn not_found() -> (StatusCode, &'static str, Vec<u8>) {
    (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec())
}
