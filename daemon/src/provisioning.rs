//! `smartsignd --config FILE --wait-for-config ADDR`: an appliance that has not been provisioned
//! yet. Until FILE exists the daemon serves only the operations pages on ADDR (plain HTTP): a
//! `/readyz` that is 503 and says the appliance waits for its configuration, `/healthz`, and a
//! `/metrics` with `smartsign_provisioned 0`. Nothing else listens, no HSM is opened, and no
//! state is made. Once the provisioning (`smartsign-ctl provision`) has written FILE, the
//! listener closes and the daemon starts as `--config FILE` does.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio::sync::watch;

use crate::config::ConnectionLimits;

/// How often the daemon looks for the configuration file.
const POLL: Duration = Duration::from_secs(1);

/// What the wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Waited {
    /// The configuration file exists: start.
    Provisioned,
    /// A stop signal came first.
    Stopped,
}

/// Serves the unprovisioned pages on `address` until `config` exists or a stop signal comes.
pub(crate) fn wait(config: &Path, address: SocketAddr) -> Result<Waited, String> {
    if config.exists() {
        return Ok(Waited::Provisioned);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))?;
    runtime.block_on(async {
        let listener = crate::http::bind(address, "operations").await?;
        let reason = format!(
            "not provisioned: no configuration at {}; insert the provisioning medium \
             (README: Appliance image, Provisioning)",
            config.display()
        );
        eprintln!("smartsignd: {reason}; serving /readyz on http://{address}");
        crate::systemd::notify(&format!("STATUS={reason}"));
        let (stop_tx, stop_rx) = watch::channel(false);
        let metrics = crate::metrics::Metrics::new().map_err(|error| error.to_string())?;
        let server = tokio::spawn(crate::http::serve(
            listener,
            crate::http::Listener {
                name: "operations",
                limits: (&ConnectionLimits::default()).into(),
                metrics,
                grace: Duration::from_secs(1),
            },
            None,
            router(reason),
            stop_rx,
        ));
        let waited = tokio::select! {
            () = crate::server::shutdown_signal() => Waited::Stopped,
            () = appears(config) => Waited::Provisioned,
        };
        let _ = stop_tx.send(true);
        let _ = server.await;
        if waited == Waited::Provisioned {
            eprintln!("smartsignd: {} appeared: starting", config.display());
        }
        Ok(waited)
    })
}

async fn appears(config: &Path) {
    while !config.exists() {
        tokio::time::sleep(POLL).await;
    }
}

/// The operations pages of an unprovisioned appliance.
fn router(reason: String) -> Router {
    let readyz = json!({
        "ready": false,
        "sealed": false,
        "provisioned": false,
        "reason": reason,
    })
    .to_string();
    Router::new()
        .route(
            "/healthz",
            get(|| async { ([(CONTENT_TYPE, "text/plain")], "ok\n") }),
        )
        .route(
            "/readyz",
            get(move || async move {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(CONTENT_TYPE, "application/json")],
                    readyz,
                )
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4")],
                    "# HELP smartsign_provisioned Whether the appliance has its configuration.\n\
                     # TYPE smartsign_provisioned gauge\nsmartsign_provisioned 0\n",
                )
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n").into_response() })
}
