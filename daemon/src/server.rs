//! Start-up and shutdown: open the HSM, the store, the audit log and the CA; bind the listeners;
//! serve until SIGTERM or Ctrl-C; then let in-flight requests finish, write a final checkpoint,
//! and close everything in order.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_log::{AuditLog, AuditLogConfig, AuditPublicKey, Origin};
use cert_lifecycle::SqliteStore;
use hsm_adapter::{Hsm, HsmConfig, KeyMode, SystemKey, TokenSelector};
use secrecy::SecretString;
use tokio::sync::watch;

use crate::app::{App, Policy, fields};
use crate::audit_api::HsmCheckpointSigner;
use crate::clock::DaemonClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::tls::NamePolicy;

/// What `--dev` adds to a normal start.
pub(crate) struct DevOptions {
    /// The security officer's PIN, to create the system keys on first start.
    pub(crate) so_pin: SecretString,
    /// The state directory, for `endpoints.json` and the how-to.
    pub(crate) state_dir: PathBuf,
    /// The CA listener, bound before the configuration was made (its URL is in certificates);
    /// taken when the embedded CA starts serving.
    pub(crate) ca_listener: Option<tokio::net::TcpListener>,
}

/// The system keys every daemon needs; the KEK (wrapped mode), the CMP client key (signature
/// protection) and the CA keys (embedded CA) are added when configured.
const REQUIRED_KEYS: &[SystemKey] = &[
    SystemKey::Taid,
    SystemKey::Hkic,
    SystemKey::Data,
    SystemKey::Audit,
];

pub(crate) fn read_pin(path: &std::path::Path) -> Result<SecretString, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read the PIN file {}: {error}", path.display()))?,
    );
    let pin = text.lines().next().unwrap_or_default().trim();
    if pin.is_empty() {
        return Err(format!("the PIN file {} is empty", path.display()));
    }
    Ok(SecretString::from(pin.to_owned()))
}

/// Runs the daemon until a shutdown signal.
pub(crate) async fn run(config: Config, mut dev: Option<DevOptions>) -> Result<(), String> {
    let started = Instant::now();
    let clock = Arc::new(DaemonClock::default());
    let key_mode = if config.hsm.key_mode == "resident" {
        KeyMode::Resident
    } else {
        KeyMode::Wrapped
    };
    let token = match (&config.hsm.token_label, &config.hsm.token_serial) {
        (Some(label), _) => TokenSelector::Label(label.clone()),
        (None, Some(serial)) => TokenSelector::Serial(serial.clone()),
        (None, None) => return Err("set hsm.token_label or hsm.token_serial".into()),
    };
    let mut hsm_config = HsmConfig::new(&config.hsm.module, token, read_pin(&config.hsm.pin_file)?);
    if let Some(workers) = config.hsm.workers.and_then(NonZeroUsize::new) {
        hsm_config = hsm_config.with_workers(workers);
    }
    tracing::info!(module = %config.hsm.module.display(), "opening the HSM");
    let hsm = Arc::new(
        Hsm::open(hsm_config)
            .await
            .map_err(|error| format!("cannot open the HSM: {error}"))?,
    );
    if let Some(dev) = &dev {
        let report = hsm
            .provision_system_keys(&dev.so_pin)
            .await
            .map_err(|error| format!("cannot provision the system keys: {error}"))?;
        if !report.created.is_empty() {
            tracing::info!(created = ?report.created, "system keys created");
        }
    }
    let mut required = REQUIRED_KEYS.to_vec();
    if key_mode == KeyMode::Wrapped {
        required.push(SystemKey::Kek);
    }
    if config.ca.ra_certificate.is_some() {
        required.push(SystemKey::CmpClient);
    }
    if config.ca.embedded.is_some() {
        required.extend([SystemKey::CaRoot, SystemKey::CaIssuing]);
    }
    for key in required {
        hsm.check_system_key(key).await.map_err(|error| {
            format!(
                "system key {} is not usable ({error}); create the system keys with \
                 `smartsign-ctl keys init` while the daemon is stopped",
                key.label()
            )
        })?;
    }

    let store_path = config.store.path.clone();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&store_path))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| {
            format!(
                "cannot open the store {}: {error}",
                config.store.path.display()
            )
        })?;
    let audit_key = hsm
        .system_public_key(SystemKey::Audit)
        .await
        .map_err(|error| format!("cannot read the audit public key: {error}"))?;
    let audit = AuditLog::open(
        &config.audit.dir,
        AuditLogConfig::new(Origin::new(&config.audit.origin).map_err(|e| e.to_string())?)
            .with_clock(clock.clone())
            .with_checkpoint_key(
                AuditPublicKey::from_spki_der(audit_key.as_der()).map_err(|e| e.to_string())?,
            ),
    )
    .await
    .map_err(|error| {
        format!(
            "cannot open the audit log {}: {error}",
            config.audit.dir.display()
        )
    })?;
    let embedded = match &config.ca.embedded {
        Some(embedded) => Some(Arc::new(
            crate::ca_http::EmbeddedHost::open(&config, embedded, hsm.clone(), clock.now().into())
                .await?,
        )),
        None => None,
    };
    let metrics = Metrics::new().map_err(|error| error.to_string())?;
    let ca = crate::ca::connect(&config, hsm.clone(), metrics.status())?;

    let tls = crate::tls::server_config(
        &config.server.tls_certificate,
        &config.server.tls_private_key,
        &config.server.client_ca,
    )
    .map_err(|error| error.to_string())?;
    let app = Arc::new(App {
        hsm: hsm.clone(),
        store: Arc::new(store),
        ca,
        audit: Arc::new(audit),
        clock,
        metrics,
        policy: Policy {
            request_ttl: Duration::from_secs(config.policy.request_ttl_seconds),
            certificate_validity: time::Duration::days(
                config.policy.certificate_validity_days.into(),
            ),
            renewal_window: time::Duration::days(config.policy.renewal_window_days.into()),
            key_algorithm: config
                .policy
                .key_algorithm
                .parse()
                .map_err(|error: hsm_adapter::HsmError| error.to_string())?,
            key_mode,
        },
        names: NamePolicy::new(&config.server.allowed_names),
        dev: dev.is_some(),
        started,
        in_flight: Default::default(),
        sweeping: Default::default(),
    });

    let api_listener = crate::http::bind(config.server.listen, "API").await?;
    let metrics_listener = crate::http::bind(config.server.metrics_listen, "metrics").await?;
    let api_address = local(&api_listener)?;
    let metrics_address = local(&metrics_listener)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let operations_app = app.clone();
    tasks.spawn(crate::http::serve_plain(
        metrics_listener,
        shutdown_rx.clone(),
        move |method, path, _body| {
            let app = operations_app.clone();
            async move { crate::operations::handle(&app, &method, &path).await }
        },
    ));
    let ca_address = match (embedded, &config.ca.embedded) {
        (Some(host), Some(settings)) => {
            let bound = dev.as_mut().and_then(|dev| dev.ca_listener.take());
            let listener = match bound {
                Some(listener) => listener,
                None => crate::http::bind(settings.listen, "embedded CA").await?,
            };
            let address = local(&listener)?;
            let clock = app.clock.clone();
            tasks.spawn(crate::http::serve_plain(
                listener,
                shutdown_rx.clone(),
                move |method, path, body| {
                    let host = host.clone();
                    let now = clock.now().into();
                    async move { host.answer(&method, &path, &body, now).await }
                },
            ));
            Some(address)
        }
        _ => None,
    };
    // A renewal or re-application that a crash interrupted is finished or undone before the API
    // serves; the CA (the embedded one too) is reachable by now.
    crate::lifecycle::recover(&app).await?;
    tasks.spawn(crate::http::serve_api(
        api_listener,
        tls,
        app.clone(),
        shutdown_rx.clone(),
        Duration::from_secs(config.server.shutdown_grace_seconds),
    ));
    if let Some(dev) = &dev {
        let ca = ca_address.ok_or("--dev needs the embedded CA")?;
        crate::dev::announce(&dev.state_dir, api_address, metrics_address, ca)?;
    }
    tasks.spawn(crate::sweeps::scheduler(
        app.clone(),
        Duration::from_secs(config.policy.sweep_interval_seconds),
        shutdown_rx.clone(),
    ));
    tasks.spawn(checkpoints(
        app.clone(),
        Duration::from_secs(config.audit.checkpoint_interval_seconds),
        shutdown_rx,
    ));
    app.audit(
        "daemon.started",
        "system",
        fields([
            ("version", env!("CARGO_PKG_VERSION").into()),
            ("dev", app.dev.into()),
        ]),
    )
    .await
    .map_err(|_| "cannot write the start-up audit record".to_string())?;
    tracing::info!(
        api = %api_address,
        metrics = %metrics_address,
        ca = ?ca_address,
        "smartsignd is serving"
    );

    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = shutdown_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = app
        .audit("daemon.stopped", "system", serde_json::Map::new())
        .await;
    match app
        .audit
        .checkpoint(&HsmCheckpointSigner(hsm.clone()))
        .await
    {
        Ok(checkpoint) => tracing::info!(
            tree_size = checkpoint.tree_size(),
            "final checkpoint written"
        ),
        Err(error) => tracing::error!(%error, "could not write the final checkpoint"),
    }
    let app = Arc::into_inner(app).ok_or("requests still hold the daemon's state")?;
    if let Some(audit) = Arc::into_inner(app.audit) {
        audit.close().await.map_err(|error| error.to_string())?;
    }
    drop(app.ca);
    drop(app.store);
    if let Some(hsm) = Arc::into_inner(app.hsm) {
        hsm.shutdown().await;
    }
    drop(hsm);
    tracing::info!("stopped");
    Ok(())
}

fn local(listener: &tokio::net::TcpListener) -> Result<SocketAddr, String> {
    listener.local_addr().map_err(|error| error.to_string())
}

/// Writes a checkpoint every `interval` when the log grew.
async fn checkpoints(app: Arc<App>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let signer = HsmCheckpointSigner(app.hsm.clone());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let current = app.audit.tree_size();
        let signed = app.audit.latest_checkpoint().map(|c| c.tree_size());
        if signed != Some(current)
            && let Err(error) = app.audit.checkpoint(&signer).await
        {
            tracing::error!(%error, "periodic checkpoint failed");
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
