//! Start-up and shutdown: open the HSM (with the PIN file, or once a quorum of officers unsealed
//! the daemon), the store, the audit log and the CA; bind the listeners; serve until SIGTERM or
//! Ctrl-C; then let in-flight requests finish, write a final checkpoint, and close everything in
//! order.

use application::ports::AuditTrail;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_log::{AuditLog, AuditLogConfig, AuditPublicKey, Origin};
use cert_lifecycle::{PgStore, SqliteStore, Store};
use hsm_adapter::{Hsm, HsmConfig, HsmError, KeyMode, SystemKey, TokenSelector};
use secrecy::SecretString;
use tokio::sync::{mpsc, watch};

use crate::app::{App, Policy};
use crate::audit_api::HsmCheckpointSigner;
use crate::audit_ledger::PgLedger;
use crate::ca_http::EmbeddedHost;
use crate::clock::DaemonClock;
use crate::config::{Config, StoreBackend, StoreConfig};
use crate::leader::Leader;
use crate::limits::ClientLimiter;
use crate::metrics::Metrics;
use crate::tls::{NamePolicy, ServerTls};
use crate::unseal::Gate;
use application::fields;

/// What `--dev` adds to a normal start.
pub(crate) struct DevOptions {
    /// The security officer's PIN, to create the system keys on first start.
    pub(crate) so_pin: SecretString,
    /// The state directory, for `endpoints.json` and the how-to.
    pub(crate) state_dir: PathBuf,
    /// The CA listener, bound before the configuration was made (its URL is in certificates);
    /// taken when the embedded CA starts serving.
    pub(crate) ca_listener: Option<tokio::net::TcpListener>,
    /// Where the embedded CA listens once it serves, for `endpoints.json`.
    pub(crate) ca_address: Option<SocketAddr>,
    /// Stop as soon as everything is made and serving (`--dev --init-only`).
    pub(crate) exit_when_ready: bool,
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

/// What start-up has before the HSM is open: the parts the sealed listeners need too.
struct Base {
    token: TokenSelector,
    started: Instant,
    clock: Arc<DaemonClock>,
    metrics: Metrics,
    names: NamePolicy,
}

/// Runs the daemon until a shutdown signal.
///
/// With `hsm.pin_file` it opens everything, then serves. With `[hsm.quorum]` it serves sealed
/// first ([`crate::unseal`]) and opens everything when the officers' shares rebuild the PIN.
pub(crate) async fn run(config: Config, mut dev: Option<DevOptions>) -> Result<(), String> {
    let token = match (&config.hsm.token_label, &config.hsm.token_serial) {
        (Some(label), _) => TokenSelector::Label(label.clone()),
        (None, Some(serial)) => TokenSelector::Serial(serial.clone()),
        (None, None) => return Err("set hsm.token_label or hsm.token_serial".into()),
    };
    let base = Base {
        token,
        started: Instant::now(),
        clock: Arc::new(DaemonClock::default()),
        metrics: Metrics::new().map_err(|error| error.to_string())?,
        names: NamePolicy::new(&config.server.allowed_names),
    };
    let loaded = crate::tls::server_config(&config.server, crate::clock::wall())
        .map_err(|error| error.to_string())?;
    base.metrics.client_crl_loaded(loaded.crl_next_update);
    let tls = Arc::new(ServerTls::new(loaded.config, base.names.clone()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reload_tls_on_sighup(
        config.server.clone(),
        tls.clone(),
        base.metrics.clone(),
        shutdown_rx.clone(),
    ));
    if let Some(interval) = crate::systemd::watchdog_interval() {
        tasks.spawn(crate::systemd::watchdog(interval, shutdown_rx.clone()));
    }
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    let app = match (&config.hsm.pin_file, &config.hsm.quorum) {
        (Some(pin_file), None) => {
            let hsm = open_hsm(&config, &base, read_pin(pin_file)?)
                .await
                .map_err(|error| format!("cannot open the HSM: {error}"))?;
            let app = start(&config, &base, hsm, &mut dev, &mut tasks, &shutdown_rx, &[]).await?;
            let gate = Arc::new(Gate::open(app.clone()));
            let (api, metrics) =
                listen(&config, &base, tls, &gate, &mut tasks, &shutdown_rx).await?;
            if let Some(dev) = &dev {
                let ca = dev.ca_address.ok_or("--dev needs the embedded CA")?;
                crate::dev::announce(&dev.state_dir, api, metrics, ca)?;
            }
            app
        }
        (None, Some(quorum)) => {
            let (attempts, mut attempt_rx) = mpsc::channel(1);
            let gate = Arc::new(Gate::sealed(
                quorum.policy()?,
                attempts,
                base.metrics.clone(),
                base.started,
            ));
            listen(&config, &base, tls, &gate, &mut tasks, &shutdown_rx).await?;
            crate::systemd::notify(
                "STATUS=sealed: waiting for a quorum of officers' unseal shares",
            );
            tracing::warn!(
                threshold = quorum.threshold,
                "sealed: the HSM opens when a quorum of officers gives its shares \
                 (POST /v1/admin/unseal)"
            );
            loop {
                let attempt = tokio::select! {
                    () = &mut shutdown => {
                        crate::systemd::notify("STOPPING=1");
                        tracing::info!("shutting down while sealed");
                        let _ = shutdown_tx.send(true);
                        while tasks.join_next().await.is_some() {}
                        tracing::info!("stopped");
                        return Ok(());
                    }
                    Some(attempt) = attempt_rx.recv() => attempt,
                };
                match unseal(
                    &config,
                    &base,
                    attempt.pin,
                    &attempt.officers,
                    &mut tasks,
                    &shutdown_rx,
                )
                .await
                {
                    Ok(app) => {
                        gate.unseal(app.clone());
                        let _ = attempt.outcome.send(Ok(()));
                        break app;
                    }
                    Err(failure) => {
                        let _ = attempt.outcome.send(Err(failure));
                    }
                }
            }
        }
        _ => return Err("set either hsm.pin_file or [hsm.quorum] (see --check-config)".into()),
    };
    tracing::info!("smartsignd is serving");
    crate::systemd::notify("READY=1\nSTATUS=serving");

    if dev.as_ref().is_some_and(|dev| dev.exit_when_ready) {
        tracing::info!("--init-only: the state directory is ready");
    } else {
        (&mut shutdown).await;
    }
    crate::systemd::notify("STOPPING=1\nSTATUS=finishing in-flight requests");
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = shutdown_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = app
        .append("daemon.stopped", "system", serde_json::Map::new())
        .await;
    match app
        .audit
        .checkpoint(&HsmCheckpointSigner(app.hsm.clone()))
        .await
    {
        Ok(checkpoint) => tracing::info!(
            tree_size = checkpoint.tree_size(),
            "final checkpoint written"
        ),
        Err(error) => tracing::error!(%error, "could not write the final checkpoint"),
    }
    close(app).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Opens the HSM with `pin`.
async fn open_hsm(config: &Config, base: &Base, pin: SecretString) -> Result<Arc<Hsm>, HsmError> {
    let mut hsm_config = HsmConfig::new(&config.hsm.module, base.token.clone(), pin);
    if let Some(workers) = config.hsm.workers.and_then(NonZeroUsize::new) {
        hsm_config = hsm_config.with_workers(workers);
    }
    if let Some(cpus) = &config.hsm.worker_cpus {
        hsm_config = hsm_config.with_worker_cpus(cpus.clone());
    }
    tracing::info!(module = %config.hsm.module.display(), "opening the HSM");
    Ok(Arc::new(Hsm::open(hsm_config).await?))
}

/// One unseal attempt with the PIN the shares rebuilt. The error is what the officer is told;
/// the whole cause goes to the log. A failure leaves nothing open.
async fn unseal(
    config: &Config,
    base: &Base,
    pin: SecretString,
    officers: &[String],
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Arc<App>, String> {
    let hsm = open_hsm(config, base, pin).await.map_err(|error| {
        tracing::error!(%error, "unsealing failed: the HSM did not open; staying sealed");
        match error {
            HsmError::PinRejected { .. } => {
                format!("the HSM refused the PIN rebuilt from the shares ({error})")
            }
            error => format!("the HSM could not be opened ({error})"),
        }
    })?;
    start(config, base, hsm, &mut None, tasks, shutdown, officers)
        .await
        .map_err(|error| {
            tracing::error!(%error, "start-up after unsealing failed; staying sealed");
            "the HSM opened but start-up failed (the daemon's log says why)".to_owned()
        })
}

/// Everything after the HSM opened: system keys, store, audit log (and `admin.unsealed` when
/// officers unsealed), the embedded CA's listener, crash recovery, the start-up audit record,
/// then the sweeps and checkpoints in the background. On failure it closes what it opened.
async fn start(
    config: &Config,
    base: &Base,
    hsm: Arc<Hsm>,
    dev: &mut Option<DevOptions>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
    officers: &[String],
) -> Result<Arc<App>, String> {
    let key_mode = if config.hsm.key_mode == "resident" {
        KeyMode::Resident
    } else {
        KeyMode::Wrapped
    };
    let (app, embedded) = match assemble(config, base, hsm.clone(), dev.as_ref(), key_mode).await {
        Ok(parts) => parts,
        Err(error) => {
            if let Some(hsm) = Arc::into_inner(hsm) {
                hsm.shutdown().await;
            }
            return Err(error);
        }
    };
    drop(hsm);
    let ca_listener = dev.as_mut().and_then(|dev| dev.ca_listener.take());
    let mut ca_task = None;
    let started = async {
        if let Some(path) = &config.hsm.ceremony_transcript {
            crate::ceremony::anchor(&app, path).await?;
        }
        if !officers.is_empty() {
            app.append(
                "admin.unsealed",
                "system",
                fields([("officers", officers.into())]),
            )
            .await
            .map_err(|_| "cannot write the unseal audit record".to_string())?;
        }
        if let (Some(host), Some(settings)) = (embedded, &config.ca.embedded) {
            let listener = match ca_listener {
                Some(listener) => listener,
                None => crate::http::bind(settings.listen, "embedded CA").await?,
            };
            let address = local(&listener)?;
            if let Some(dev) = dev.as_mut() {
                dev.ca_address = Some(address);
            }
            ca_task = Some(crate::http::serve_apart(
                listener,
                listener_settings(config, base, "ca", Duration::from_secs(2)),
                crate::ca_http::router(host, app.clock.clone()),
                shutdown,
            )?);
            tracing::info!(ca = %address, "embedded CA listening");
        }
        // A renewal or re-application that a crash interrupted is finished or undone before the
        // API serves; the CA (the embedded one too) is reachable by now.
        let scope = stranded(&app);
        application::renewal::recover(&*app, app.clock.now(), scope)
            .await
            .map_err(|error| format!("cannot read the key-change journal: {error}"))?;
        // A signature that a crash interrupted after the approval was never released: its
        // request fails, and can never sign again.
        // A first certificate that a crash kept from the store is revoked at the CA.
        application::registration::recover(&*app, scope)
            .await
            .map_err(|error| format!("cannot settle the interrupted issuances: {error}"))?;
        // Audit records of account changes that a crash (or an audit log that could not take
        // them) left in the store's outbox.
        let delivered = application::accounts::deliver_audits(&*app, None).await;
        if delivered > 0 {
            tracing::warn!(delivered, "audit records delivered from the outbox");
        }
        application::signing::recover(&*app, app.clock.now(), scope)
            .await
            .map_err(|error| format!("cannot fail the interrupted signing requests: {error}"))?;
        app.append(
            "daemon.started",
            "system",
            fields([
                ("version", env!("CARGO_PKG_VERSION").into()),
                ("dev", app.dev.into()),
            ]),
        )
        .await
        .map_err(|_| "cannot write the start-up audit record".to_string())
    }
    .await;
    if let Err(error) = started {
        if let Some(ca) = ca_task {
            ca.stop().await;
        }
        if let Err(closing) = close(app).await {
            tracing::error!(error = %closing, "closing after a failed start-up");
        }
        return Err(error);
    }
    if let Some(ca) = ca_task {
        tasks.spawn(ca.finished());
    }
    tasks.spawn(crate::sweeps::scheduler(
        app.clone(),
        Duration::from_secs(config.policy.sweep_interval_seconds),
        shutdown.clone(),
    ));
    tasks.spawn(checkpoints(
        app.clone(),
        Duration::from_secs(config.audit.checkpoint_interval_seconds),
        shutdown.clone(),
    ));
    Ok(app)
}

/// Checks the system keys and opens the store, the audit log, the embedded CA and the CA link.
async fn assemble(
    config: &Config,
    base: &Base,
    hsm: Arc<Hsm>,
    dev: Option<&DevOptions>,
    key_mode: KeyMode,
) -> Result<(Arc<App>, Option<Arc<EmbeddedHost>>), String> {
    if let Some(dev) = dev {
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
        hsm.check_system_key(key)
            .await
            .map_err(|error| match error {
                // These name their own fix: rotating the KEK, not creating keys.
                HsmError::KekTemplate { .. } | HsmError::KekRotationUnfinished => {
                    format!("system key {} is refused: {error}", key.label())
                }
                error => format!(
                    "system key {} is not usable ({error}); create the system keys with \
                     `smartsign-ctl keys init` while the daemon is stopped",
                    key.label()
                ),
            })?;
    }

    let trusted = hsm
        .foreign_trusted_objects()
        .await
        .map_err(|error| format!("cannot list the token's trusted objects: {error}"))?;
    if !trusted.is_empty() {
        return Err(format!(
            "the token holds trusted object(s) besides the KEK: {}. Only the security officer \
             can make one, and a trusted wrapping key can take the system keys out of the HSM; \
             find out who made it, and destroy it, before the daemon starts",
            trusted.join(", ")
        ));
    }
    let store = open_store(&config.store).await?;
    let audit_key = hsm
        .system_public_key(SystemKey::Audit)
        .await
        .map_err(|error| format!("cannot read the audit public key: {error}"))?;
    let mut audit_config =
        AuditLogConfig::new(Origin::new(&config.audit.origin).map_err(|e| e.to_string())?)
            .with_clock(base.clock.clone())
            .with_checkpoint_key(
                AuditPublicKey::from_spki_der(audit_key.as_der()).map_err(|e| e.to_string())?,
            )
            // `GET /v1/audit/records` filters and receipts find records through it.
            .with_record_index();
    // Several nodes: the records are durable in PostgreSQL first; the directory is this node's
    // copy of the one log.
    if let Backend::Postgres(store) = &store {
        audit_config = audit_config.with_ledger(Box::new(PgLedger::new(store.clone())));
    }
    let audit = AuditLog::open(&config.audit.dir, audit_config)
        .await
        .map_err(|error| {
            format!(
                "cannot open the audit log {}: {error}",
                config.audit.dir.display()
            )
        })?;
    let audit = Arc::new(audit);
    let opened = async {
        let embedded = match &config.ca.embedded {
            Some(embedded) => Some(Arc::new(
                EmbeddedHost::open(config, embedded, hsm.clone(), base.clock.now().into()).await?,
            )),
            None => None,
        };
        let ca = crate::ca::connect(config, hsm.clone(), base.metrics.status())?;
        let key_algorithm = config
            .policy
            .key_algorithm
            .parse()
            .map_err(|error: HsmError| error.to_string())?;
        Ok::<_, String>((embedded, ca, key_algorithm))
    }
    .await;
    let (embedded, ca, key_algorithm) = match opened {
        Ok(parts) => parts,
        Err(error) => {
            if let Some(audit) = Arc::into_inner(audit) {
                let _ = audit.close().await;
            }
            return Err(error);
        }
    };
    let signing = application::signing::SigningSettings {
        request_ttl: time::Duration::seconds(
            config
                .policy
                .request_ttl_seconds
                .try_into()
                .map_err(|_| "policy.request_ttl_seconds is too large".to_owned())?,
        ),
        max_pending: usize::try_from(config.policy.max_pending_requests).unwrap_or(usize::MAX),
        max_batch: usize::try_from(config.policy.max_batch).unwrap_or(usize::MAX),
        chain_der: ca.chain_der.clone(),
        chain_pem: ca.chain_pem.clone(),
    };
    let challenge_ttl = signing.request_ttl;
    let issuance = application::registration::IssuanceSettings {
        certificate_validity: time::Duration::days(config.policy.certificate_validity_days.into()),
    };
    let app = Arc::new(App {
        hsm,
        store: store.shared(),
        node_id: config.store.node_id(),
        leader: match &store {
            Backend::Sqlite(_) => Leader::Alone,
            Backend::Postgres(store) => Leader::elected(store.leadership("leader")),
        },
        ca,
        audit,
        clock: base.clock.clone(),
        metrics: base.metrics.clone(),
        policy: Policy {
            key_algorithm,
            key_mode,
        },
        signing,
        issuance: issuance.clone(),
        renewal: application::renewal::RenewalSettings {
            issuance,
            renewal_window: time::Duration::days(config.policy.renewal_window_days.into()),
            challenge_ttl,
        },
        dev: dev.is_some(),
        started: base.started,
        sweeping: Default::default(),
        checkpoint_interval: Duration::from_secs(config.audit.checkpoint_interval_seconds),
    });
    Ok((app, embedded))
}

/// How long after it began interrupted work is surely not running on another node: far past the
/// deadlines of the HSM, the CA and the store that every step waits for.
pub(crate) const STRANDED_AFTER: time::Duration = time::Duration::minutes(10);

/// What the recoveries may take now: on one node, everything its own crash left; with several
/// nodes, what began long enough ago that no node still runs it (the leader's sweeps take the
/// rest once it is that old).
pub(crate) fn stranded(app: &App) -> application::Stranded {
    if app.leader.shared() {
        application::Stranded::StartedBefore(app.clock.now() - STRANDED_AFTER)
    } else {
        application::Stranded::All
    }
}

/// The store the configuration names, opened (SQLite) or connected to (PostgreSQL), its schema
/// brought up to date.
async fn open_store(config: &StoreConfig) -> Result<Backend, String> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || match config.backend {
        StoreBackend::Sqlite => {
            let path = config.path.as_deref().ok_or("store.path is missing")?;
            SqliteStore::open(path)
                .map(|store| Backend::Sqlite(Arc::new(store)))
                .map_err(|error| format!("cannot open the store {}: {error}", path.display()))
        }
        StoreBackend::Postgres => {
            let url = config.url.as_deref().ok_or("store.url is missing")?;
            PgStore::connect(url, config.password_file.as_deref(), config.pool_size)
                .map(|store| Backend::Postgres(Arc::new(store)))
                .map_err(|error| format!("cannot connect to the PostgreSQL store: {error}"))
        }
    })
    .await
    .map_err(|error| error.to_string())?
}

/// The store, by backend.
#[derive(Clone, Debug)]
enum Backend {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PgStore>),
}

impl Backend {
    /// The store as the workflows use it.
    fn shared(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(store) => store.clone(),
            Backend::Postgres(store) => store.clone(),
        }
    }
}

/// The settings of the listener `name`.
fn listener_settings(
    config: &Config,
    base: &Base,
    name: &'static str,
    grace: Duration,
) -> crate::http::Listener {
    crate::http::Listener {
        name,
        limits: (&config.server.limits).into(),
        metrics: base.metrics.clone(),
        grace,
    }
}

/// Binds the API and operations listeners and serves `gate` on them.
async fn listen(
    config: &Config,
    base: &Base,
    tls: Arc<ServerTls>,
    gate: &Arc<Gate>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(SocketAddr, SocketAddr), String> {
    let api_listener = crate::http::bind(config.server.listen, "API").await?;
    let metrics_listener = crate::http::bind(config.server.metrics_listen, "metrics").await?;
    let api = local(&api_listener)?;
    let metrics = local(&metrics_listener)?;
    tasks.spawn(crate::http::serve(
        metrics_listener,
        listener_settings(config, base, "operations", Duration::from_secs(2)),
        None,
        crate::operations::router(gate.clone()),
        shutdown.clone(),
    ));
    let limiter = ClientLimiter::new(&config.server.client_limits, base.metrics.clone());
    tasks.spawn(crate::http::serve(
        api_listener,
        listener_settings(
            config,
            base,
            "api",
            Duration::from_secs(config.server.shutdown_grace_seconds),
        ),
        Some(tls),
        crate::api::router(gate.clone(), limiter),
        shutdown.clone(),
    ));
    tracing::info!(api = %api, metrics = %metrics, "listening");
    Ok((api, metrics))
}

/// Closes the daemon's state in order: the audit log, the CA link, the store, the HSM.
async fn close(app: Arc<App>) -> Result<(), String> {
    let app = Arc::into_inner(app).ok_or("requests still hold the daemon's state")?;
    if let Some(audit) = Arc::into_inner(app.audit) {
        audit.close().await.map_err(|error| error.to_string())?;
    }
    drop(app.ca);
    drop(app.store);
    if let Some(hsm) = Arc::into_inner(app.hsm) {
        hsm.shutdown().await;
    }
    Ok(())
}

fn local(listener: &tokio::net::TcpListener) -> Result<SocketAddr, String> {
    listener.local_addr().map_err(|error| error.to_string())
}

/// Writes a checkpoint every `interval` when the log grew and this node leads. With several
/// nodes, each also brings its copy of the log up to date at least every 5 s, so that its
/// next append has little to read while it holds the ledger's lock, and so that it finds the
/// ledger again after an outage even when idle.
async fn checkpoints(app: Arc<App>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let signer = HsmCheckpointSigner(app.hsm.clone());
    let tick = if app.leader.shared() {
        interval.min(Duration::from_secs(5))
    } else {
        interval
    };
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
        if app.leader.shared()
            && let Err(error) = app.audit.sync().await
        {
            tracing::warn!(%error, "cannot bring the audit log up to date from the ledger");
            continue;
        }
        if !app.leader.leads() || last.elapsed() < interval {
            continue;
        }
        last = tokio::time::Instant::now();
        let current = app.audit.tree_size();
        let signed = app.audit.latest_checkpoint().map(|c| c.tree_size());
        if signed != Some(current)
            && let Err(error) = app.audit.checkpoint(&signer).await
        {
            tracing::error!(%error, "periodic checkpoint failed");
        }
    }
}

/// On SIGHUP, reads the server certificate and key, the client CA and the client CRL again and
/// puts them in force for new handshakes. Files that do not load (a CRL that does not verify or
/// has expired among them) are refused, and those in force stay.
async fn reload_tls_on_sighup(
    server: crate::config::ServerConfig,
    tls: Arc<ServerTls>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP: the TLS files reload only at start");
            return;
        }
    };
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {}
            _ = shutdown.changed() => return,
        }
        match crate::tls::server_config(&server, crate::clock::wall()) {
            Ok(loaded) => {
                tls.replace(loaded.config);
                metrics.client_crl_loaded(loaded.crl_next_update);
                tracing::info!(
                    client_crl = server.client_crl.is_some(),
                    "SIGHUP: TLS certificate, key, client CA and client CRL reloaded"
                );
            }
            Err(error) => tracing::error!(
                %error,
                "SIGHUP: the TLS files were not reloaded; those in force stay"
            ),
        }
    }
}

pub(crate) async fn shutdown_signal() {
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
