//! The running daemon's state, shared by every request. The application layer reaches it
//! through its ports (`ports.rs`).

use std::sync::Arc;
use std::time::Instant;

use audit_log::AuditLog;
use cert_lifecycle::Store;
use hsm_adapter::{Hsm, KeyAlgorithm, KeyMode};

use crate::clock::DaemonClock;
use crate::metrics::Metrics;
use crate::problem::ApiError;

/// The user keys the HSM makes, from the configuration.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub(crate) key_algorithm: KeyAlgorithm,
    pub(crate) key_mode: KeyMode,
}

/// Everything a request can reach.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) hsm: Arc<Hsm>,
    pub(crate) store: Arc<dyn Store>,
    /// This node's name (`[store] node_id`).
    pub(crate) node_id: String,
    /// Whether this node runs the sweeps and signs the checkpoints.
    pub(crate) leader: crate::leader::Leader,
    pub(crate) ca: crate::ca::CaLink,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) clock: Arc<DaemonClock>,
    pub(crate) metrics: Metrics,
    pub(crate) policy: Policy,
    /// What the signing workflow needs from the configuration.
    pub(crate) signing: application::signing::SigningSettings,
    /// What first issuance needs from the configuration.
    pub(crate) issuance: application::registration::IssuanceSettings,
    /// What renewal and re-application need from the configuration.
    pub(crate) renewal: application::renewal::RenewalSettings,
    /// `--dev`: enables `POST /v1/admin/clock`.
    pub(crate) dev: bool,
    pub(crate) started: Instant,
    /// Held while the lifecycle sweeps run: one run at a time.
    pub(crate) sweeping: tokio::sync::Mutex<()>,
    /// How often the leader signs a checkpoint when the log grew (a receipt's `Retry-After`).
    pub(crate) checkpoint_interval: std::time::Duration,
}

impl App {
    /// Test hook: with `--dev` and `SMARTSIGND_FAILPOINT=NAME` in the environment, the daemon
    /// aborts (as a SIGKILL would end it: nothing is flushed or undone) when it reaches the step
    /// `NAME`, so that the tests can check what the next start makes of it. The steps are those the
    /// application layer names (`AuditTrail::step`): a key change's, a first issuance's, a
    /// signature's and a revocation's (the README lists them). It never acts without `--dev`.
    pub(crate) fn failpoint(&self, name: &str) {
        if self.dev && std::env::var("SMARTSIGND_FAILPOINT").is_ok_and(|wanted| wanted == name) {
            tracing::error!(failpoint = name, "test failpoint reached: aborting");
            std::process::abort();
        }
    }

    /// Runs a blocking store call off the async threads (the operations routes; the workflows
    /// use the `Records` port).
    pub(crate) async fn store<T, F>(&self, call: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&(dyn Store + 'static)) -> Result<T, cert_lifecycle::StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(store.as_ref()))
            .await
            .map_err(|error| {
                tracing::error!(%error, "store task failed");
                ApiError::Internal
            })?
            .map_err(ApiError::from)
    }
}
