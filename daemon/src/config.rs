//! The daemon's TOML configuration: one file, unknown keys refused, secrets by file path.
//!
//! `smartsignd --check-config FILE` runs [`Config::load`] and [`Config::check`] and prints what is
//! wrong; `--dev` builds a [`Config`] for its state directory and writes it beside the state, so
//! that the development set-up doubles as an example.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) server: ServerConfig,
    pub(crate) hsm: HsmSection,
    pub(crate) store: StoreConfig,
    pub(crate) audit: AuditConfig,
    pub(crate) ca: CaConfig,
    #[serde(default)]
    pub(crate) status: StatusConfig,
    #[serde(default)]
    pub(crate) policy: PolicyConfig,
    #[serde(default)]
    pub(crate) logging: LoggingConfig,
}

/// Listeners and TLS files.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerConfig {
    /// The HTTPS API listener (mutual TLS).
    pub(crate) listen: SocketAddr,
    /// The plain-HTTP operations listener (`/healthz`, `/readyz`, `/metrics`); keep it on
    /// loopback or a management network.
    pub(crate) metrics_listen: SocketAddr,
    /// The server certificate chain, PEM, leaf first.
    pub(crate) tls_certificate: PathBuf,
    /// The server's private key, PKCS#8 PEM.
    pub(crate) tls_private_key: PathBuf,
    /// The CA that client certificates must chain to, PEM.
    pub(crate) client_ca: PathBuf,
    /// The client CA's CRL (PEM or DER): a client certificate it lists is refused in the TLS
    /// handshake. Reloaded on SIGHUP with the server certificate and key; one that does not
    /// verify against the client CA or whose nextUpdate has passed is refused (at start, the
    /// daemon does not start; on reload, the files in force stay), and once the CRL in force
    /// passes its nextUpdate every handshake fails until a fresh one is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_crl: Option<PathBuf>,
    /// When set, only these principal names (certificate CN) are accepted for each role; a role
    /// that is not listed accepts any name its certificates carry.
    #[serde(default)]
    pub(crate) allowed_names: BTreeMap<String, Vec<String>>,
    /// Seconds that in-flight requests get to finish at shutdown.
    #[serde(default = "default_shutdown_grace")]
    pub(crate) shutdown_grace_seconds: u64,
    /// Timeouts and connection caps of every listener.
    #[serde(default)]
    pub(crate) limits: ConnectionLimits,
    /// What one client certificate may ask of the API at once and per second.
    #[serde(default)]
    pub(crate) client_limits: ClientLimits,
}

fn default_shutdown_grace() -> u64 {
    10
}

/// `[server.limits]`: what a connection may hold, on each listener (API, operations, embedded
/// CA). A client that is slower than these is cut off; the defaults are generous for a client
/// on the same network and short for one that holds a connection open on purpose.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ConnectionLimits {
    /// Seconds a client has to finish the TLS handshake (API listener).
    pub(crate) handshake_timeout_seconds: u64,
    /// Seconds a client has to send a request's headers, once it has begun to.
    pub(crate) header_timeout_seconds: u64,
    /// Seconds a client has to send a request's whole body.
    pub(crate) body_timeout_seconds: u64,
    /// Seconds a connection may stay open with no request in flight.
    pub(crate) idle_timeout_seconds: u64,
    /// Open connections per listener; more wait in the kernel's backlog.
    pub(crate) max_connections: usize,
    /// Open connections per client address and listener; more are closed at once.
    pub(crate) max_connections_per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout_seconds: 10,
            header_timeout_seconds: 10,
            body_timeout_seconds: 30,
            idle_timeout_seconds: 60,
            max_connections: 1024,
            max_connections_per_address: 256,
        }
    }
}

/// `[server.client_limits]`: per client certificate (role and name), so that one service,
/// gateway or officer cannot starve the others. Past either limit the API answers 429
/// `rate_limited` with `Retry-After`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClientLimits {
    /// Sustained requests per second of one client certificate.
    pub(crate) requests_per_second: u32,
    /// Requests one client certificate may send at once above its sustained rate.
    pub(crate) burst: u32,
    /// Requests of one client certificate in flight at once.
    pub(crate) max_concurrent: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            requests_per_second: 1000,
            burst: 2000,
            max_concurrent: 128,
        }
    }
}

/// The PKCS#11 module and token.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HsmSection {
    /// Path of the PKCS#11 module.
    pub(crate) module: PathBuf,
    /// The token's label; exactly one of `token_label` and `token_serial`.
    pub(crate) token_label: Option<String>,
    /// The token's serial number.
    pub(crate) token_serial: Option<String>,
    /// File holding the user PIN (first line). Never the PIN itself. Exactly one of
    /// `pin_file` and `[hsm.quorum]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pin_file: Option<PathBuf>,
    /// The unseal quorum (`smartsign-ctl ceremony split`): the daemon starts sealed and opens the
    /// HSM when `threshold` officers have given their shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) quorum: Option<QuorumConfig>,
    /// `wrapped` (default) or `resident`, see the README.
    #[serde(default = "default_key_mode")]
    pub(crate) key_mode: String,
    /// HSM worker threads, each with one logged-in session. Default: one per core.
    pub(crate) workers: Option<usize>,
    /// CPUs to pin the workers to, worker `i` on `worker_cpus[i % len]`. Default: not pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) worker_cpus: Option<Vec<usize>>,
    /// The key ceremony's signed transcript (`smartsign-ctl ceremony init`): checked against
    /// the token's audit key at each start, and recorded in the audit log once (its SHA-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ceremony_transcript: Option<PathBuf>,
    /// Lock the daemon's memory out of swap (the PIN, the unseal shares, unwrapped keys): the
    /// daemon refuses to start when it cannot (no `CAP_IPC_LOCK` and a finite
    /// `RLIMIT_MEMLOCK`). Default `true`; `false` only on a machine without swap.
    #[serde(default = "default_true")]
    pub(crate) lock_memory: bool,
}

// Written by hand so that the path of the PIN file shows but nothing else could leak.
impl fmt::Debug for HsmSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmSection")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("token_serial", &self.token_serial)
            .field("pin_file", &self.pin_file)
            .field("quorum", &self.quorum)
            .field("key_mode", &self.key_mode)
            .field("workers", &self.workers)
            .field("worker_cpus", &self.worker_cpus)
            .field("ceremony_transcript", &self.ceremony_transcript)
            .field("lock_memory", &self.lock_memory)
            .finish()
    }
}

/// `[hsm.quorum]`: what `smartsign-ctl ceremony split` prints. Only digests of the shares, which
/// rebuild nothing.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuorumConfig {
    /// How many distinct shares rebuild the PIN.
    pub(crate) threshold: usize,
    /// SHA-256 (hex) of the text of each share of the ceremony.
    pub(crate) share_digests: Vec<String>,
}

impl QuorumConfig {
    /// The checked policy; [`Config::check`] has refused a configuration where this fails.
    pub(crate) fn policy(&self) -> Result<hsm_adapter::quorum::QuorumPolicy, String> {
        hsm_adapter::quorum::QuorumPolicy::new(self.threshold, &self.share_digests)
            .map_err(|error| format!("hsm.quorum: {error}"))
    }
}

fn default_key_mode() -> String {
    "wrapped".into()
}

/// The database: SQLite embedded (one node, the default), or PostgreSQL shared by several nodes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreConfig {
    /// `"sqlite"` (the default) or `"postgres"`.
    #[serde(default)]
    pub(crate) backend: StoreBackend,
    /// SQLite: the database file (WAL mode; its `-wal` and `-shm` files live beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<PathBuf>,
    /// PostgreSQL: the connection string, as a URL (`postgresql://user@host:5432/db`) or libpq
    /// keywords (`host=/run/postgresql user=smartsign dbname=smartsign`), without a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) url: Option<String>,
    /// PostgreSQL: the file whose first line is the password; leave it out for a server that
    /// asks none (peer authentication on a Unix socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) password_file: Option<PathBuf>,
    /// PostgreSQL: connections this node keeps open at most.
    #[serde(
        default = "default_pool_size",
        skip_serializing_if = "is_default_pool_size"
    )]
    pub(crate) pool_size: usize,
    /// This node's name among the nodes that share the database: in its log lines, its
    /// `/readyz` and its metrics. The host name when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node_id: Option<String>,
}

/// Where the store lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StoreBackend {
    /// One node: an SQLite file beside the daemon, the audit log a local file.
    #[default]
    Sqlite,
    /// Several nodes: one PostgreSQL database, which also holds the audit log's records.
    Postgres,
}

fn default_pool_size() -> usize {
    16
}

fn is_default_pool_size(size: &usize) -> bool {
    *size == default_pool_size()
}

impl StoreConfig {
    /// An SQLite store at `path`.
    pub(crate) fn sqlite(path: PathBuf) -> Self {
        Self {
            backend: StoreBackend::Sqlite,
            path: Some(path),
            url: None,
            password_file: None,
            pool_size: default_pool_size(),
            node_id: None,
        }
    }

    /// This node's name: `node_id`, else the host name, else `"node"`.
    pub(crate) fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "node".into())
        })
    }

    /// What is wrong with the section.
    fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.backend {
            StoreBackend::Sqlite => {
                if self.path.is_none() {
                    problems.push(
                        "store.path is missing: the SQLite file, for example \
                         /var/lib/smartsign/smartsign.sqlite"
                            .into(),
                    );
                }
                for (set, key) in [
                    (self.url.is_some(), "store.url"),
                    (self.password_file.is_some(), "store.password_file"),
                ] {
                    if set {
                        problems.push(format!(
                            "{key} is for backend = \"postgres\"; the SQLite store has none"
                        ));
                    }
                }
            }
            StoreBackend::Postgres => {
                if self.path.is_some() {
                    problems.push(
                        "store.path is for backend = \"sqlite\"; a PostgreSQL store takes \
                         store.url (and store.password_file)"
                            .into(),
                    );
                }
                match &self.url {
                    None => problems.push(
                        "store.url is missing: the PostgreSQL connection string, for example \
                         \"host=db.example user=smartsign dbname=smartsign\""
                            .into(),
                    ),
                    Some(url) => {
                        if let Err(error) = cert_lifecycle::PgStore::check_url(url) {
                            problems.push(format!("store.url: {error}"));
                        }
                    }
                }
                if let Some(path) = &self.password_file
                    && !path.is_file()
                {
                    problems.push(format!(
                        "store.password_file {} does not exist",
                        path.display()
                    ));
                }
                if self.pool_size == 0 {
                    problems.push("store.pool_size must be at least 1".into());
                }
            }
        }
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            problems.push(format!(
                "store.node_id {id:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
            ));
        }
        problems
    }
}

/// The audit log.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditConfig {
    /// The audit log's directory.
    pub(crate) dir: PathBuf,
    /// The origin line of checkpoints, e.g. the appliance's host name.
    pub(crate) origin: String,
    /// Seconds between signed checkpoints (one is also written at shutdown).
    #[serde(default = "default_checkpoint_interval")]
    pub(crate) checkpoint_interval_seconds: u64,
}

fn default_checkpoint_interval() -> u64 {
    60
}

/// The certification authority, reached over CMP (RFC 9483 over HTTP), and the embedded CA.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaConfig {
    /// The CA's CMP endpoint (RFC 6712 HTTP transfer), e.g. `http://ca.example:8080/cmp`.
    pub(crate) cmp_url: String,
    /// The issuing CA certificate (PEM) of the iAM Smart-Certs: it signs the certificates, the
    /// OCSP answers and the CRL, and it is the first certificate of every signature's chain.
    pub(crate) issuing_certificate: PathBuf,
    /// The root certificate (PEM) above the issuing CA.
    pub(crate) root_certificate: PathBuf,
    /// Signature protection of CMP messages: this daemon's RA certificate (PEM), certifying the
    /// HSM key `smartsign-cmp-client`. Set this, or `pbm_reference` and `pbm_secret_file`.
    pub(crate) ra_certificate: Option<PathBuf>,
    /// PBM protection of CMP messages (RFC 4210 section 5.1.3.1): the reference (senderKID)
    /// the CA knows the shared secret by.
    pub(crate) pbm_reference: Option<String>,
    /// PBM protection: the file holding the shared secret (first line). Never the secret itself.
    pub(crate) pbm_secret_file: Option<PathBuf>,
    /// Seconds a CMP, OCSP or CRL request to the CA may take.
    #[serde(default = "default_ca_timeout")]
    pub(crate) timeout_seconds: u64,
    /// Organisation (O) in the subscribers' certificate subjects.
    #[serde(default = "default_organisation")]
    pub(crate) organisation: String,
    /// Certificate policy OID of the adult profile (sent in the CMP certificate template).
    #[serde(default = "default_adult_policy")]
    pub(crate) adult_policy_oid: String,
    /// Certificate policy OID of the minor profile.
    #[serde(default = "default_minor_policy")]
    pub(crate) minor_policy_oid: String,
    /// The embedded CA, hosted by this daemon (development and staging; `--dev` sets it up).
    pub(crate) embedded: Option<EmbeddedCaConfig>,
}

/// The embedded CA: keys in the HSM, serving CMP, OCSP and the CRL over plain HTTP.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmbeddedCaConfig {
    /// Its directory (root and issuing certificates, its own state, no personal data).
    pub(crate) dir: PathBuf,
    /// Where it listens: `POST /cmp`, `GET|POST /ocsp`, `GET /crl`, `GET /ca/*.pem`.
    pub(crate) listen: SocketAddr,
    /// The OCSP URL written into the certificates it issues (AIA).
    pub(crate) ocsp_url: String,
    /// The CRL URL written into the certificates it issues (CRL distribution point).
    pub(crate) crl_url: String,
    /// Seconds between an OCSP answer's thisUpdate and nextUpdate.
    #[serde(default = "default_ocsp_validity")]
    pub(crate) ocsp_validity_seconds: u64,
    /// Seconds between a CRL's thisUpdate and nextUpdate.
    #[serde(default = "default_crl_validity")]
    pub(crate) crl_validity_seconds: u64,
}

fn default_ca_timeout() -> u64 {
    10
}

fn default_ocsp_validity() -> u64 {
    600
}

fn default_crl_validity() -> u64 {
    3600
}

fn default_organisation() -> String {
    "smartsign".into()
}

fn default_adult_policy() -> String {
    ca_bridge::DEFAULT_ADULT_POLICY_OID.into()
}

fn default_minor_policy() -> String {
    ca_bridge::DEFAULT_MINOR_POLICY_OID.into()
}

/// The certificate status check before every signature (OCSP, then the CRL).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatusConfig {
    /// The oldest a "good" answer may be, in seconds since the CA produced it, to be used.
    #[serde(default = "default_status_max_age")]
    pub(crate) max_age_seconds: u64,
    /// When no fresh answer can be had: `refuse` (fail closed, `status_unavailable`) or `grace`
    /// (accept a good answer up to `grace_seconds` older than `max_age_seconds`).
    #[serde(default = "default_on_unavailable")]
    pub(crate) on_unavailable: String,
    /// With `on_unavailable = "grace"`: how much older than `max_age_seconds` a good answer may be.
    #[serde(default)]
    pub(crate) grace_seconds: u64,
    /// Ask this OCSP responder instead of the certificates' AIA URL.
    pub(crate) ocsp_url: Option<String>,
    /// Fetch this CRL instead of the certificates' distribution point.
    pub(crate) crl_url: Option<String>,
    /// Where a check without a cached OCSP answer looks first: `ocsp` (ask the responder about
    /// each certificate; the CRL if it cannot answer) or `crl` (the issuer's CRL, held in memory
    /// while fresh; the responder if no fresh CRL can be had). With millions of certificates
    /// nearly every check misses the OCSP cache, and `crl` costs one fetch per `max_age`.
    #[serde(default = "default_status_first")]
    pub(crate) first: String,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            max_age_seconds: default_status_max_age(),
            on_unavailable: default_on_unavailable(),
            grace_seconds: 0,
            ocsp_url: None,
            crl_url: None,
            first: default_status_first(),
        }
    }
}

fn default_status_first() -> String {
    "ocsp".into()
}

fn default_status_max_age() -> u64 {
    3600
}

fn default_on_unavailable() -> String {
    "refuse".into()
}

/// The rules' knobs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyConfig {
    /// How long a signing request waits for the user's authorisation.
    #[serde(default = "default_request_ttl")]
    pub(crate) request_ttl_seconds: u64,
    /// Validity of a newly issued iAM Smart-Cert.
    #[serde(default = "default_validity")]
    pub(crate) certificate_validity_days: u32,
    /// How long before notAfter renewal consent may be given.
    #[serde(default = "default_renewal_window")]
    pub(crate) renewal_window_days: u32,
    /// Algorithm of new user keys: `ec-p256`, `ec-p384`, `rsa-2048` or `rsa-3072`.
    #[serde(default = "default_key_algorithm")]
    pub(crate) key_algorithm: String,
    /// Seconds between runs of the lifecycle sweeps (also run at start and on request).
    #[serde(default = "default_sweep_interval")]
    pub(crate) sweep_interval_seconds: u64,
    /// How many signing requests an account may have pending at once (1 to 100); the next gets
    /// 429 `too_many_pending`.
    #[serde(default = "default_max_pending")]
    pub(crate) max_pending_requests: u32,
    /// How many hashes one batch signing request (`"hashes"`) may carry (1 to 100): one
    /// approval signs them all.
    #[serde(default = "default_max_batch")]
    pub(crate) max_batch: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            request_ttl_seconds: default_request_ttl(),
            certificate_validity_days: default_validity(),
            renewal_window_days: default_renewal_window(),
            key_algorithm: default_key_algorithm(),
            sweep_interval_seconds: default_sweep_interval(),
            max_pending_requests: default_max_pending(),
            max_batch: default_max_batch(),
        }
    }
}

fn default_request_ttl() -> u64 {
    120
}

fn default_max_pending() -> u32 {
    5
}

fn default_max_batch() -> u32 {
    20
}

fn default_validity() -> u32 {
    1095
}

fn default_renewal_window() -> u32 {
    60
}

fn default_sweep_interval() -> u64 {
    3600
}

fn default_key_algorithm() -> String {
    "ec-p256".into()
}

/// Logging.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoggingConfig {
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub(crate) format: String,
    /// A tracing filter, e.g. `info` or `smartsignd=debug,info`.
    #[serde(default = "default_log_level")]
    pub(crate) level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> String {
    "text".into()
}

fn default_log_level() -> String {
    "info".into()
}

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid configuration: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads and parses `path`, then checks it.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        let problems = config.check();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Everything that is wrong beyond syntax, each a sentence that says what to change.
    pub(crate) fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut file = |what: &str, path: &Path| {
            if !path.is_file() {
                problems.push(format!("{what} {} does not exist", path.display()));
            }
        };
        file("server.tls_certificate", &self.server.tls_certificate);
        file("server.tls_private_key", &self.server.tls_private_key);
        file("server.client_ca", &self.server.client_ca);
        if let Some(crl) = &self.server.client_crl {
            file("server.client_crl", crl);
        }
        file("hsm.module", &self.hsm.module);
        match (&self.hsm.pin_file, &self.hsm.quorum) {
            (Some(pin_file), None) => file("hsm.pin_file", pin_file),
            (None, Some(quorum)) => {
                if let Err(error) = quorum.policy() {
                    problems.push(format!(
                        "{error}; use the [hsm.quorum] section that `smartsign-ctl ceremony \
                         split` printed"
                    ));
                }
            }
            (Some(_), Some(_)) => problems.push(
                "set either hsm.pin_file or [hsm.quorum], not both: with a quorum the PIN is \
                 rebuilt from the officers' shares and must not also be in a file"
                    .into(),
            ),
            (None, None) => problems.push(
                "set hsm.pin_file (the user PIN's file) or [hsm.quorum] (officers unseal the \
                 daemon with shares from `smartsign-ctl ceremony split`)"
                    .into(),
            ),
        }
        match (&self.hsm.token_label, &self.hsm.token_serial) {
            (Some(_), Some(_)) => {
                problems.push("set only one of hsm.token_label and hsm.token_serial".into())
            }
            (None, None) => problems.push("set hsm.token_label or hsm.token_serial".into()),
            _ => {}
        }
        if !matches!(self.hsm.key_mode.as_str(), "wrapped" | "resident") {
            problems.push(format!(
                "hsm.key_mode is {:?}; use \"wrapped\" or \"resident\"",
                self.hsm.key_mode
            ));
        }
        if self.hsm.key_mode == "resident" && self.store.backend == StoreBackend::Postgres {
            problems.push(
                "hsm.key_mode = \"resident\" with [store] backend = \"postgres\": a resident key \
                 lives in one node's HSM, and another node could neither use nor destroy it; \
                 several nodes use \"wrapped\" keys, which any node with the same KEK unwraps"
                    .into(),
            );
        }
        if self.hsm.workers == Some(0) {
            problems.push("hsm.workers must be at least 1".into());
        }
        if let Some(path) = &self.hsm.ceremony_transcript {
            match std::fs::read(path) {
                Err(error) => problems.push(format!(
                    "hsm.ceremony_transcript {}: {error}",
                    path.display()
                )),
                Ok(bytes) => {
                    if let Err(error) = audit_log::Transcript::parse(&bytes) {
                        problems.push(format!(
                            "hsm.ceremony_transcript {}: {error}; give the transcript.json that \
                             `smartsign-ctl ceremony init` wrote",
                            path.display()
                        ));
                    }
                }
            }
        }
        if let Some(cpus) = &self.hsm.worker_cpus {
            if cpus.is_empty() {
                problems
                    .push("hsm.worker_cpus is empty; leave it out to let the workers float".into());
            }
            if let Some(cpu) = cpus.iter().enumerate().find_map(|(i, cpu)| {
                cpus.get(..i)
                    .is_some_and(|before| before.contains(cpu))
                    .then_some(cpu)
            }) {
                problems.push(format!("hsm.worker_cpus names CPU {cpu} twice"));
            }
            match hsm_adapter::allowed_cpus() {
                Ok(allowed) => {
                    for cpu in cpus.iter().filter(|cpu| !allowed.contains(cpu)) {
                        problems.push(format!(
                            "hsm.worker_cpus: CPU {cpu} is not one smartsignd may run on \
                             (allowed: {})",
                            hsm_adapter::describe_cpus(&allowed)
                        ));
                    }
                }
                Err(err) => problems.push(format!(
                    "hsm.worker_cpus: the CPUs this process may use are unknown: {err}"
                )),
            }
        }
        if self
            .policy
            .key_algorithm
            .parse::<hsm_adapter::KeyAlgorithm>()
            .is_err()
        {
            problems.push(format!(
                "policy.key_algorithm is {:?}; use ec-p256, ec-p384, rsa-2048 or rsa-3072",
                self.policy.key_algorithm
            ));
        }
        if !(10..=3600).contains(&self.policy.request_ttl_seconds) {
            problems.push("policy.request_ttl_seconds must be between 10 and 3600".into());
        }
        if !(60..=86_400).contains(&self.policy.sweep_interval_seconds) {
            problems.push("policy.sweep_interval_seconds must be between 60 and 86400".into());
        }
        if !(1..=100).contains(&self.policy.max_pending_requests) {
            problems.push("policy.max_pending_requests must be between 1 and 100".into());
        }
        // A batch of 100 SHA-512 hashes in base64 still fits the API's 16 KiB body limit.
        if !(1..=100).contains(&self.policy.max_batch) {
            problems.push("policy.max_batch must be between 1 and 100".into());
        }
        if !(1..=3650).contains(&self.policy.certificate_validity_days) {
            problems.push("policy.certificate_validity_days must be between 1 and 3650".into());
        }
        if self.policy.renewal_window_days >= self.policy.certificate_validity_days {
            problems.push(
                "policy.renewal_window_days must be shorter than the certificate validity".into(),
            );
        }
        for (name, oid) in [
            ("ca.adult_policy_oid", &self.ca.adult_policy_oid),
            ("ca.minor_policy_oid", &self.ca.minor_policy_oid),
        ] {
            if oid.parse::<ca_bridge::PolicyOid>().is_err() {
                problems.push(format!("{name} {oid:?} is not an object identifier"));
            }
        }
        if self.ca.adult_policy_oid == self.ca.minor_policy_oid {
            problems.push("ca.adult_policy_oid and ca.minor_policy_oid must differ".into());
        }
        problems.extend(self.check_ca());
        problems.extend(self.check_limits());
        problems.extend(self.store.check());
        let server = &self.server;
        if [
            &server.tls_certificate,
            &server.tls_private_key,
            &server.client_ca,
        ]
        .into_iter()
        .chain(&server.client_crl)
        .all(|path| path.is_file())
            && let Err(error) = crate::tls::server_config(server, crate::clock::wall())
        {
            problems.push(error.to_string());
        }
        for role in self.server.allowed_names.keys() {
            if crate::tls::Role::parse(role).is_none() {
                problems.push(format!(
                    "server.allowed_names has the unknown role {role:?}; roles are registrar, \
                     service, gateway, officer and auditor"
                ));
            }
        }
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            problems.push("logging.format must be \"text\" or \"json\"".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            problems.push(format!(
                "logging.level {:?} is not a tracing filter",
                self.logging.level
            ));
        }
        if self.audit.origin.is_empty() || self.audit.origin.contains('\n') {
            problems.push("audit.origin must be one non-empty line".into());
        }
        if self.audit.checkpoint_interval_seconds == 0 {
            problems.push("audit.checkpoint_interval_seconds must be at least 1".into());
        }
        problems
    }

    /// The listeners' timeouts and caps, and the per-client limits.
    fn check_limits(&self) -> Vec<String> {
        let limits = &self.server.limits;
        let clients = &self.server.client_limits;
        let mut problems = Vec::new();
        for (name, value) in [
            (
                "handshake_timeout_seconds",
                limits.handshake_timeout_seconds,
            ),
            ("header_timeout_seconds", limits.header_timeout_seconds),
            ("body_timeout_seconds", limits.body_timeout_seconds),
            ("idle_timeout_seconds", limits.idle_timeout_seconds),
        ] {
            if !(1..=3600).contains(&value) {
                problems.push(format!("server.limits.{name} must be between 1 and 3600"));
            }
        }
        if !(1..=65_536).contains(&limits.max_connections) {
            problems.push("server.limits.max_connections must be between 1 and 65536".into());
        }
        if !(1..=limits.max_connections).contains(&limits.max_connections_per_address) {
            problems.push(
                "server.limits.max_connections_per_address must be between 1 and \
                 server.limits.max_connections"
                    .into(),
            );
        }
        for (name, value) in [
            ("requests_per_second", clients.requests_per_second),
            ("burst", clients.burst),
            ("max_concurrent", clients.max_concurrent),
        ] {
            if !(1..=100_000).contains(&value) {
                problems.push(format!(
                    "server.client_limits.{name} must be between 1 and 100000"
                ));
            }
        }
        problems
    }

    /// The CA, CMP protection and status-check settings.
    fn check_ca(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let url = |problems: &mut Vec<String>, name: &str, value: &str| {
            if !(value.starts_with("http://") || value.starts_with("https://")) {
                problems.push(format!(
                    "{name} {value:?} must be an http:// or https:// URL"
                ));
            }
        };
        url(&mut problems, "ca.cmp_url", &self.ca.cmp_url);
        let embedded = self.ca.embedded.as_ref();
        // The embedded CA writes its certificates on first start.
        if embedded.is_none() {
            for (name, path) in [
                ("ca.issuing_certificate", &self.ca.issuing_certificate),
                ("ca.root_certificate", &self.ca.root_certificate),
            ] {
                if !path.is_file() {
                    problems.push(format!("{name} {} does not exist", path.display()));
                }
            }
        }
        let pbm = (&self.ca.pbm_reference, &self.ca.pbm_secret_file);
        match (&self.ca.ra_certificate, pbm) {
            (Some(_), (None, None)) => {}
            (None, (Some(_), Some(file))) => {
                if !file.is_file() {
                    problems.push(format!(
                        "ca.pbm_secret_file {} does not exist",
                        file.display()
                    ));
                }
            }
            (None, (None, None)) => problems.push(
                "set ca.ra_certificate (signature protection) or ca.pbm_reference and \
                 ca.pbm_secret_file (PBM) to protect CMP messages"
                    .into(),
            ),
            (Some(_), _) => problems
                .push("set either ca.ra_certificate or the ca.pbm_* settings, not both".into()),
            (None, _) => {
                problems.push("ca.pbm_reference and ca.pbm_secret_file go together".into())
            }
        }
        if let Some(ra) = &self.ca.ra_certificate
            && embedded.is_none()
            && !ra.is_file()
        {
            problems.push(format!("ca.ra_certificate {} does not exist", ra.display()));
        }
        if !(1..=120).contains(&self.ca.timeout_seconds) {
            problems.push("ca.timeout_seconds must be between 1 and 120".into());
        }
        if let Some(embedded) = embedded {
            url(&mut problems, "ca.embedded.ocsp_url", &embedded.ocsp_url);
            url(&mut problems, "ca.embedded.crl_url", &embedded.crl_url);
            if !(60..=7 * 86_400).contains(&embedded.ocsp_validity_seconds) {
                problems.push("ca.embedded.ocsp_validity_seconds must be 60 to 604800".into());
            }
            if !(60..=30 * 86_400).contains(&embedded.crl_validity_seconds) {
                problems.push("ca.embedded.crl_validity_seconds must be 60 to 2592000".into());
            }
        }
        if !matches!(self.status.first.as_str(), "ocsp" | "crl") {
            problems.push(format!(
                "status.first is {:?}; use \"ocsp\" or \"crl\"",
                self.status.first
            ));
        }
        if self.status.max_age_seconds == 0 {
            problems.push("status.max_age_seconds must be at least 1".into());
        }
        match self.status.on_unavailable.as_str() {
            "refuse" => {}
            "grace" if self.status.grace_seconds > 0 => {}
            "grace" => problems.push(
                "status.on_unavailable = \"grace\" needs status.grace_seconds above 0".into(),
            ),
            other => problems.push(format!(
                "status.on_unavailable is {other:?}; use \"refuse\" (fail closed) or \"grace\""
            )),
        }
        for (name, value) in [
            ("status.ocsp_url", &self.status.ocsp_url),
            ("status.crl_url", &self.status.crl_url),
        ] {
            if let Some(value) = value {
                url(&mut problems, name, value);
            }
        }
        problems
    }
}

fn default_true() -> bool {
    true
}
