//! Which node runs the sweeps and signs the audit checkpoints: on SQLite the one node there is;
//! on PostgreSQL the node that holds the role's advisory lock, taken over by another within a
//! tick when it dies (see `cert_lifecycle::Leadership`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cert_lifecycle::Leadership;

use crate::metrics::Metrics;

/// This node's part in the roles one node at a time plays.
#[derive(Debug)]
pub(crate) enum Leader {
    /// One node (SQLite): it always leads.
    Alone,
    /// Several nodes (PostgreSQL): the holder of the lock leads.
    Elected(Elected),
}

/// The claim, and what its last check found: read by request handlers without waiting for a
/// check that may be waiting for the database.
#[derive(Debug)]
pub(crate) struct Elected {
    claim: Arc<Mutex<Leadership>>,
    leads: AtomicBool,
}

impl Leader {
    /// A claim not yet tried.
    pub(crate) fn elected(claim: Leadership) -> Leader {
        Leader::Elected(Elected {
            claim: Arc::new(Mutex::new(claim)),
            leads: AtomicBool::new(false),
        })
    }

    /// Takes the role when it is free, or checks that this node still holds it; `false` when
    /// the database cannot say within the store's wait (a node that cannot reach it must not
    /// act as the leader). Only the sweeps' scheduler calls it, on a blocking thread.
    pub(crate) async fn check(&self, metrics: &Metrics) -> bool {
        let Leader::Elected(elected) = self else {
            metrics.leader.set(1);
            return true;
        };
        let claim = Arc::clone(&elected.claim);
        let now = tokio::task::spawn_blocking(move || {
            // A check still waiting (it cannot: `hold` gives up after the store's wait) is not
            // joined by another: this one counts as not leading.
            let Ok(mut claim) = claim.try_lock() else {
                return false;
            };
            claim.hold().unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot check the leader's lock in the database");
                false
            })
        })
        .await
        .unwrap_or(false);
        let before = elected.leads.swap(now, Ordering::Relaxed);
        match (before, now) {
            (false, true) => {
                tracing::info!("this node now leads: it runs the sweeps and signs the checkpoints")
            }
            (true, false) => tracing::warn!("this node no longer leads"),
            _ => {}
        }
        metrics.leader.set(i64::from(now));
        now
    }

    /// Whether several nodes share the store (and so the audit log's ledger).
    pub(crate) fn shared(&self) -> bool {
        matches!(self, Leader::Elected(_))
    }

    /// Whether the last [`Leader::check`] found this node leading. Never waits.
    pub(crate) fn leads(&self) -> bool {
        match self {
            Leader::Alone => true,
            Leader::Elected(elected) => elected.leads.load(Ordering::Relaxed),
        }
    }
}
