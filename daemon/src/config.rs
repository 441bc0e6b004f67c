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
    /// When set, only these principal names (certificate CN) are accepted for each role; a role
    /// that is not listed accepts any name its certificates carry.
    #[serde(default)]
    pub(crate) allowed_names: BTreeMap<String, Vec<String>>,
    /// Seconds that in-flight requests get to finish at shutdown.
    #[serde(default = "default_shutdown_grace")]
    pub(crate) shutdown_grace_seconds: u64,
}

fn default_shutdown_grace() -> u64 {
    10
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
    /// File holding the user PIN (first line). Never the PIN itself.
    pub(crate) pin_file: PathBuf,
    /// `wrapped` (default) or `resident`, see the README.
    #[serde(default = "default_key_mode")]
    pub(crate) key_mode: String,
    /// HSM worker threads, each with one logged-in session. Default: one per core.
    pub(crate) workers: Option<usize>,
}

// Written by hand so that the path of the PIN file shows but nothing else could leak.
impl fmt::Debug for HsmSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmSection")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("token_serial", &self.token_serial)
            .field("pin_file", &self.pin_file)
            .field("key_mode", &self.key_mode)
            .field("workers", &self.workers)
            .finish()
    }
}

fn default_key_mode() -> String {
    "wrapped".into()
}

/// The database.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreConfig {
    /// The SQLite file (WAL mode; its `-wal` and `-shm` files live beside it).
    pub(crate) path: PathBuf,
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

/// The certification authority.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaConfig {
    /// The embedded CA's directory (root and issuing certificates, its own state).
    pub(crate) dir: PathBuf,
    /// Organisation name in the CA certificates and the subscribers' certificates.
    #[serde(default = "default_organisation")]
    pub(crate) organisation: String,
    /// The OCSP URL written into issued certificates (AIA).
    pub(crate) ocsp_url: String,
    /// The CRL URL written into issued certificates (CRL distribution point).
    pub(crate) crl_url: String,
    /// Certificate policy OID of the adult profile.
    #[serde(default = "default_adult_policy")]
    pub(crate) adult_policy_oid: String,
    /// Certificate policy OID of the minor profile.
    #[serde(default = "default_minor_policy")]
    pub(crate) minor_policy_oid: String,
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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            request_ttl_seconds: default_request_ttl(),
            certificate_validity_days: default_validity(),
            renewal_window_days: default_renewal_window(),
            key_algorithm: default_key_algorithm(),
        }
    }
}

fn default_request_ttl() -> u64 {
    120
}

fn default_validity() -> u32 {
    1095
}

fn default_renewal_window() -> u32 {
    60
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
        file("hsm.module", &self.hsm.module);
        file("hsm.pin_file", &self.hsm.pin_file);
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
        if self.hsm.workers == Some(0) {
            problems.push("hsm.workers must be at least 1".into());
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
}
