//! The lifecycle sweeps: the rules that fall due with time rather than with a request
//! (DOMAIN.md, "iAM Smart-Cert lifecycle" and "Account states that gate signing"). They run at
//! start, then every `policy.sweep_interval_seconds`, and on `POST /v1/admin/sweep`. Each takes
//! `now` from the daemon's clock, so `--dev` can move it.
//!
//! - A minor's certificate is revoked (cessation_of_operation) from 00:00 Hong Kong time on the
//!   18th birthday; signing already stops at that instant (`signing::signable`). The account
//!   stays active; re-applying gives an adult certificate.
//! - An expired certificate's key is destroyed: after expiry there is no renewal, only a new
//!   certificate with a new key.
//! - An account whose rectification deadline (7 days after the acknowledgement) has passed is
//!   invalidated: certificate revoked (privilege_withdrawn), key destroyed.
//! - An account suspended or invalidated seven years ago and left so is deregistered: certificate
//!   revoked (cessation_of_operation) if still valid, key destroyed, personal data deleted.
//!
//! Every change is audited before it is made, through the same functions the routes use. A
//! sweep that stops half-way (a crash, the HSM or the CA gone) is finished by the next one:
//! each rule looks at the stored state again, and every step is safe to repeat.

use application::ports::AuditTrail;
use std::sync::Arc;
use std::time::Duration;

use cert_lifecycle::{
    AccountRecord, AccountStatus, CertProfile, CertStatus, RevocationReason, Store,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::accounts::{load, rfc3339};
use crate::app::App;
use crate::http::{Ctx, Reply};
use crate::problem::ApiError;
use application::accounts::{
    deregister_account, destroy_key_of, finish_revocation, invalidate_account, revoke_current,
};
use application::fields;

/// The audit actor of the scheduled sweeps.
const SCHEDULER: &str = "system:sweep";

/// What one run changed, by rule.
#[derive(Debug, Default)]
struct Changes {
    revocations_finished: Vec<Value>,
    minors_revoked: Vec<Value>,
    expired_keys_destroyed: Vec<Value>,
    invalidated: Vec<Value>,
    deregistered: Vec<Value>,
}

impl Changes {
    fn count(&self) -> usize {
        self.revocations_finished.len()
            + self.minors_revoked.len()
            + self.expired_keys_destroyed.len()
            + self.invalidated.len()
            + self.deregistered.len()
    }

    fn to_json(&self, now: OffsetDateTime) -> Value {
        json!({
            "now": rfc3339(now),
            "revocations_finished": self.revocations_finished,
            "minors_revoked": self.minors_revoked,
            "expired_keys_destroyed": self.expired_keys_destroyed,
            "invalidated": self.invalidated,
            "deregistered": self.deregistered,
        })
    }
}

/// `POST /v1/admin/sweep` (officer): runs the sweeps now and answers what changed.
pub(crate) async fn sweep_now(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let now = app.clock.now();
    let changes = run(&app, &ctx.caller.to_string(), now).await?;
    Ok(Reply::ok(&changes.to_json(now)))
}

/// Runs the sweeps at start and then every `interval` until shutdown. A failed run is logged
/// and retried at the next tick.
pub(crate) async fn scheduler(
    app: Arc<App>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = app.clock.now();
        match run(&app, SCHEDULER, now).await {
            Ok(changes) if changes.count() > 0 => {
                tracing::info!(changed = changes.count(), "lifecycle sweep");
            }
            Ok(_) => tracing::debug!("lifecycle sweep: nothing due"),
            Err(error) => tracing::error!(code = error.code(), "lifecycle sweep stopped"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn run(app: &App, actor: &str, now: OffsetDateTime) -> Result<Changes, ApiError> {
    let _running = app.sweeping.lock().await;
    let mut changes = Changes::default();
    certificates(app, actor, now, &mut changes).await?;
    rectification(app, actor, now, &mut changes).await?;
    retention(app, actor, now, &mut changes).await?;
    if changes.count() > 0 {
        app.append(
            "sweep.completed",
            actor,
            fields([
                (
                    "revocations_finished",
                    json!(changes.revocations_finished.len()),
                ),
                ("minors_revoked", json!(changes.minors_revoked.len())),
                (
                    "expired_keys_destroyed",
                    json!(changes.expired_keys_destroyed.len()),
                ),
                ("invalidated", json!(changes.invalidated.len())),
                ("deregistered", json!(changes.deregistered.len())),
            ]),
        )
        .await?;
    }
    Ok(changes)
}

/// Revocations that stopped before the CA had them or the key was gone, minors who turned 18,
/// and expired certificates that still have a key.
async fn certificates(
    app: &App,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), ApiError> {
    let live = app.store(|store| store.certificates_with_keys()).await?;
    for certificate in live {
        let entry = json!({
            "account_id": certificate.account_id.as_str(),
            "serial": certificate.serial.as_str(),
        });
        if certificate.status == CertStatus::Revoked {
            finish_revocation(app, certificate, actor).await?;
            changes.revocations_finished.push(entry);
            continue;
        }
        if certificate.status == CertStatus::Valid && certificate.profile == CertProfile::Minor {
            let account = load(app, &certificate.account_id).await?;
            let current = account.current_certificate.as_ref() == Some(&certificate.serial);
            if current && !account.sealed_dob.is_empty() {
                let dob = application::date_of_birth(app, &account).await?;
                if now >= cert_lifecycle::minor_certificate_ends(dob) {
                    let reason = RevocationReason::CessationOfOperation;
                    revoke_current(app, &account, reason, actor, now).await?;
                    changes.minors_revoked.push(entry);
                    continue;
                }
            }
        }
        if now >= certificate.not_after {
            destroy_key_of(app, certificate, "expired", actor).await?;
            changes.expired_keys_destroyed.push(entry);
        }
    }
    Ok(())
}

/// Accounts whose 7-day rectification deadline has passed.
async fn rectification(
    app: &App,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), ApiError> {
    let pending = app
        .store(|store| store.accounts_in_status(AccountStatus::RectificationPending))
        .await?;
    for mut account in pending {
        if account.rectify_by.is_some_and(|deadline| now >= deadline) {
            invalidate_account(app, &mut account, actor, now).await?;
            changes.invalidated.push(json!(account.id.as_str()));
        }
    }
    Ok(())
}

/// Accounts suspended or invalidated seven years ago and left so.
async fn retention(
    app: &App,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), ApiError> {
    for status in [AccountStatus::Suspended, AccountStatus::Invalidated] {
        let accounts: Vec<AccountRecord> = app
            .store(move |store| store.accounts_in_status(status))
            .await?;
        for mut account in accounts {
            if now >= cert_lifecycle::retention_ends(account.status_changed_at) {
                deregister_account(app, &mut account, actor, now).await?;
                changes.deregistered.push(json!(account.id.as_str()));
            }
        }
    }
    Ok(())
}
