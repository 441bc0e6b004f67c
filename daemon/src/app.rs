//! The running daemon's state, shared by every request, and the few operations every handler
//! uses: audited appends, personal-data sealing under the HSM data key, and timed HSM calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_log::{Actor, AuditEvent, AuditLog, EventName};
use cert_lifecycle::{AccountId, SqliteStore};
use hsm_adapter::{Hsm, KeyAlgorithm, KeyMode};
use serde_json::{Map, Value};
use time::Date;
use zeroize::Zeroizing;

use crate::clock::DaemonClock;
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::tls::NamePolicy;

/// Policy values the handlers need, parsed from the configuration.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub(crate) request_ttl: Duration,
    pub(crate) certificate_validity: time::Duration,
    /// How long before `not_after` renewal opens.
    pub(crate) renewal_window: time::Duration,
    pub(crate) key_algorithm: KeyAlgorithm,
    pub(crate) key_mode: KeyMode,
}

/// Everything a request can reach.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) hsm: Arc<Hsm>,
    pub(crate) store: Arc<SqliteStore>,
    pub(crate) ca: crate::ca::CaLink,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) clock: Arc<DaemonClock>,
    pub(crate) metrics: Metrics,
    pub(crate) policy: Policy,
    pub(crate) names: NamePolicy,
    /// `--dev`: enables `POST /v1/admin/clock`.
    pub(crate) dev: bool,
    pub(crate) started: Instant,
    /// Signing requests being authorised now.
    /// Held while the lifecycle sweeps run: one run at a time.
    pub(crate) sweeping: tokio::sync::Mutex<()>,
}

/// The personal data of an account, only ever in memory.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct PersonalName {
    pub(crate) surname: String,
    pub(crate) given_name: Option<String>,
}

impl App {
    /// Test hook: with `--dev` and `SMARTSIGND_FAILPOINT=NAME` in the environment, the daemon
    /// aborts (as a SIGKILL would end it: nothing is flushed or undone) when it reaches the step
    /// `NAME`, so that the tests can check what the next start makes of it. The steps are the key
    /// changes' (`lifecycle.rs`) and a revocation's: `revocation-after-local` (stored, the CA not
    /// told) and `revocation-after-ca` (the CA told, the key not destroyed). It never acts
    /// without `--dev`.
    pub(crate) fn failpoint(&self, name: &str) {
        if self.dev && std::env::var("SMARTSIGND_FAILPOINT").is_ok_and(|wanted| wanted == name) {
            tracing::error!(failpoint = name, "test failpoint reached: aborting");
            std::process::abort();
        }
    }

    /// Appends one audit record and waits until it is durable. Any failure is
    /// `audit_unavailable`: the caller must not act (fail closed).
    pub(crate) async fn audit(
        &self,
        event: &str,
        actor: &str,
        fields: Map<String, Value>,
    ) -> Result<u64, ApiError> {
        let started = Instant::now();
        let event_name = EventName::new(event).map_err(|error| {
            tracing::error!(%error, event, "bad audit event name");
            ApiError::Internal
        })?;
        let actor = Actor::new(actor).map_err(|error| {
            tracing::error!(%error, "bad audit actor");
            ApiError::Internal
        })?;
        let receipt = self
            .audit
            .append(AuditEvent::new(event_name, actor).with_fields(fields))
            .await?;
        self.metrics.observe_audit(event, started.elapsed());
        Ok(receipt.index)
    }

    /// Seals `plaintext` under the HSM data key, bound to `purpose` and the account.
    pub(crate) async fn seal(
        &self,
        purpose: &str,
        account: &AccountId,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, ApiError> {
        self.seal_bound(purpose, account.as_str(), plaintext).await
    }

    /// Opens what [`App::seal`] sealed for the same purpose and account.
    pub(crate) async fn unseal(
        &self,
        purpose: &str,
        account: &AccountId,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        self.unseal_bound(purpose, account.as_str(), sealed).await
    }

    /// Seals `plaintext` under the HSM data key; the associated data binds it to `purpose` and
    /// `binding` (an account or request id), so a sealed value cannot be moved to another row.
    pub(crate) async fn seal_bound(
        &self,
        purpose: &str,
        binding: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, ApiError> {
        let aad = format!("smartsign-{purpose}-v1\n{binding}");
        let started = Instant::now();
        let sealed = self.hsm.encrypt(plaintext, aad.as_bytes()).await?;
        self.metrics.observe_hsm("encrypt", started.elapsed());
        Ok(sealed)
    }

    /// Opens what [`App::seal_bound`] sealed.
    pub(crate) async fn unseal_bound(
        &self,
        purpose: &str,
        binding: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        use secrecy::ExposeSecret;
        let aad = format!("smartsign-{purpose}-v1\n{binding}");
        let started = Instant::now();
        let plaintext = self.hsm.decrypt(sealed, aad.as_bytes()).await?;
        self.metrics.observe_hsm("decrypt", started.elapsed());
        Ok(Zeroizing::new(plaintext.expose_secret().to_vec()))
    }

    /// The account holder's date of birth.
    pub(crate) async fn date_of_birth(
        &self,
        account: &AccountId,
        sealed: &[u8],
    ) -> Result<Date, ApiError> {
        let text = self.unseal("dob", account, sealed).await?;
        let text = std::str::from_utf8(&text).map_err(|_| ApiError::Internal)?;
        Date::parse(text, &time::format_description::well_known::Iso8601::DATE).map_err(|error| {
            tracing::error!(%error, account = account.as_str(), "sealed date of birth unreadable");
            ApiError::Internal
        })
    }

    /// The keyed hash of an HKIC number (its own HSM key, not the TAID key).
    pub(crate) async fn hkic_hash(
        &self,
        hkic: &cert_lifecycle::HkicNumber,
    ) -> Result<[u8; 32], ApiError> {
        let started = Instant::now();
        let hash = self
            .hsm
            .hmac_sha256(hsm_adapter::SystemKey::Hkic, hkic.canonical())
            .await?;
        self.metrics.observe_hsm("hmac", started.elapsed());
        Ok(hash)
    }

    /// Random bytes from the HSM's generator.
    pub(crate) async fn random<const N: usize>(&self) -> Result<[u8; N], ApiError> {
        let bytes = self.hsm.random(N).await?;
        bytes.try_into().map_err(|_| ApiError::Internal)
    }

    /// A read of one row by its key, on the caller's thread. From SQLite's page cache (WAL:
    /// readers do not wait for the writer) it takes microseconds, less than handing it to the
    /// blocking pool and back, which costs two thread wake-ups. Writes (which wait for fsync)
    /// and scans go through [`App::store`].
    pub(crate) fn lookup<T>(
        &self,
        call: impl FnOnce(&SqliteStore) -> Result<T, cert_lifecycle::StoreError>,
    ) -> Result<T, ApiError> {
        call(&self.store).map_err(ApiError::from)
    }

    /// Runs a blocking store call off the async threads.
    pub(crate) async fn store<T, F>(&self, call: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&SqliteStore) -> Result<T, cert_lifecycle::StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&store))
            .await
            .map_err(|error| {
                tracing::error!(%error, "store task failed");
                ApiError::Internal
            })?
            .map_err(ApiError::from)
    }
}

/// Builds audit fields from `(key, value)` pairs.
pub(crate) fn fields<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// PEM text of one DER object, lines of 64 characters.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
