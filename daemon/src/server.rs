//! Start-up and shutdown: open the HSM, the store, the audit log and the CA; bind the listeners;
//! serve until SIGTERM or Ctrl-C; then let in-flight requests finish, write a final checkpoint,
//! and close everything in order.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_log::{AuditLog, AuditLogConfig, AuditPublicKey, Origin};
use ca_bridge::{CaProfileConfig, EmbeddedCa};
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
    /// The CA listener, bound before the configuration was made (its URL is in certificates).
    pub(crate) ca_listener: tokio::net::TcpListener,
}

/// The system keys the daemon needs (the KEK only in wrapped mode).
const REQUIRED_KEYS: &[SystemKey] = &[
    SystemKey::Taid,
    SystemKey::Hkic,
    SystemKey::Data,
    SystemKey::Audit,
    SystemKey::CaRoot,
    SystemKey::CaIssuing,
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
pub(crate) async fn run(config: Config, dev: Option<DevOptions>) -> Result<(), String> {
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
    let ca = EmbeddedCa::open(
        hsm.clone(),
        &config.ca.dir,
        CaProfileConfig {
            adult_policy_oid: config.ca.adult_policy_oid.clone(),
            minor_policy_oid: config.ca.minor_policy_oid.clone(),
            ..CaProfileConfig::new(
                config.ca.organisation.clone(),
                config.ca.ocsp_url.clone(),
                config.ca.crl_url.clone(),
            )
        },
        clock.now().into(),
    )
    .await
    .map_err(|error| format!("cannot open the embedded CA: {error}"))?;
    let chain_der = ca.chain_der();
    let chain_pem = chain_der
        .iter()
        .map(|der| crate::app::pem("CERTIFICATE", der))
        .collect();

    let tls = crate::tls::server_config(
        &config.server.tls_certificate,
        &config.server.tls_private_key,
        &config.server.client_ca,
    )
    .map_err(|error| error.to_string())?;
    let app = Arc::new(App {
        hsm: hsm.clone(),
        store: Arc::new(store),
        ca: Arc::new(ca),
        audit: Arc::new(audit),
        clock,
        metrics: Metrics::new().map_err(|error| error.to_string())?,
        policy: Policy {
            request_ttl: Duration::from_secs(config.policy.request_ttl_seconds),
            certificate_validity: time::Duration::days(
                config.policy.certificate_validity_days.into(),
            ),
            key_algorithm: config
                .policy
                .key_algorithm
                .parse()
                .map_err(|error: hsm_adapter::HsmError| error.to_string())?,
            key_mode,
        },
        names: NamePolicy::new(&config.server.allowed_names),
        dev: dev.is_some(),
        chain_pem,
        chain_der,
        started,
        in_flight: Default::default(),
    });

    let api_listener = crate::http::bind(config.server.listen, "API").await?;
    let metrics_listener = crate::http::bind(config.server.metrics_listen, "metrics").await?;
    let api_address = local(&api_listener)?;
    let metrics_address = local(&metrics_listener)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::http::serve_api(
        api_listener,
        tls,
        app.clone(),
        shutdown_rx.clone(),
        Duration::from_secs(config.server.shutdown_grace_seconds),
    ));
    let operations_app = app.clone();
    tasks.spawn(crate::http::serve_plain(
        metrics_listener,
        shutdown_rx.clone(),
        move |method, path| {
            let app = operations_app.clone();
            async move { crate::operations::handle(&app, &method, &path).await }
        },
    ));
    let ca_address = match dev {
        Some(dev) => {
            let address = local(&dev.ca_listener)?;
            let chain = app.chain_pem.clone();
            tasks.spawn(crate::http::serve_plain(
                dev.ca_listener,
                shutdown_rx.clone(),
                move |_, path| {
                    let answer = crate::ca_http::answer(&chain, &path);
                    async move { answer }
                },
            ));
            crate::dev::announce(&dev.state_dir, api_address, metrics_address, address)?;
            Some(address)
        }
        None => None,
    };
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
