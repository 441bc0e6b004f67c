//! Which node runs the sweeps and signs the audit checkpoints: on SQLite the one node there is;
//! on PostgreSQL the node that holds the role's advisory lock, taken over by another within a
//! tick when it dies (see `cert_lifecycle::Leadership`).

use std::sync::{Arc, Mutex, PoisonError};

use cert_lifecycle::Leadership;

use crate::metrics::Metrics;

/// This node's part in the roles one node at a time plays.
#[derive(Debug)]
pub(crate) enum Leader {
    /// One node (SQLite): it always leads.
    Alone,
    /// Several nodes (PostgreSQL): the holder of the lock leads.
    Elected(Arc<Mutex<Leadership>>),
}

impl Leader {
    /// Takes the role when it is free, or checks that this node still holds it; `false` when
    /// the database cannot say (a node that cannot reach it must not act as the leader).
    pub(crate) async fn check(&self, metrics: &Metrics) -> bool {
        let Leader::Elected(claim) = self else {
            metrics.leader.set(1);
            return true;
        };
        let claim = Arc::clone(claim);
        let (before, now) = tokio::task::spawn_blocking(move || {
            let mut claim = claim.lock().unwrap_or_else(PoisonError::into_inner);
            let before = claim.held();
            let now = claim.hold().unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot check the leader's lock in the database");
                false
            });
            (before, now)
        })
        .await
        .unwrap_or((false, false));
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

    /// Whether the last [`Leader::check`] found this node leading.
    pub(crate) fn leads(&self) -> bool {
        match self {
            Leader::Alone => true,
            Leader::Elected(claim) => claim.lock().unwrap_or_else(PoisonError::into_inner).held(),
        }
    }
}
