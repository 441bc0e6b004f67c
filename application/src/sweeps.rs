//! The lifecycle sweeps: the rules that fall due with time rather than with a request
//! (DOMAIN.md, "iAM Smart-Cert lifecycle" and "Account states that gate signing").
//!
//! - A minor's certificate is revoked (cessation_of_operation) from 00:00 Hong Kong time on the
//!   18th birthday; signing already stops at that instant. The account stays active;
//!   re-applying gives an adult certificate.
//! - An expired certificate's key is destroyed: after expiry there is no renewal, only a new
//!   certificate with a new key.
//! - An account whose rectification deadline (7 days after the acknowledgement) has passed is
//!   invalidated: certificate revoked (privilege_withdrawn), key destroyed.
//! - An account suspended or invalidated seven years ago and left so is deregistered: certificate
//!   revoked (cessation_of_operation) if still valid, key destroyed, personal data deleted.
//!
//! Every change is audited before it is made, through the same workflows the routes use. A
//! sweep that stops half-way (a crash, the HSM or the CA gone) is finished by the next one:
//! each rule looks at the stored state again, and every step is safe to repeat. Each account
//! change is conditional like any other: a sweep never writes over a change made meanwhile.

use cert_lifecycle::{
    AccountId, AccountStatus, CertSerial, CertStatus, Profile, RevocationReason, Store,
};
use serde_json::json;
use time::OffsetDateTime;

use crate::accounts::{
    deregister_if, destroy_key_of, finish_revocation, invalidate_if, load, revoke_current,
};
use crate::{AppError, Ports, fields};

/// What one run changed, by rule.
#[derive(Debug, Default)]
pub struct Changes {
    /// Revocations that had stopped half-way, finished: (account, certificate).
    pub revocations_finished: Vec<(AccountId, CertSerial)>,
    /// Minors' certificates revoked at 18.
    pub minors_revoked: Vec<(AccountId, CertSerial)>,
    /// Keys of expired certificates destroyed.
    pub expired_keys_destroyed: Vec<(AccountId, CertSerial)>,
    /// Accounts invalidated at their rectification deadline.
    pub invalidated: Vec<AccountId>,
    /// Accounts deregistered seven years after their suspension or invalidation.
    pub deregistered: Vec<AccountId>,
    /// Audit records of account changes that had waited in the store's outbox, appended.
    pub audits_delivered: usize,
}

impl Changes {
    /// How many changes, over every rule.
    pub fn count(&self) -> usize {
        self.revocations_finished.len()
            + self.minors_revoked.len()
            + self.expired_keys_destroyed.len()
            + self.invalidated.len()
            + self.deregistered.len()
    }
}

/// Runs every rule at `now`; audits a summary when anything changed. The caller makes sure one
/// run goes at a time.
pub async fn run<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
) -> Result<Changes, AppError> {
    let mut changes = Changes {
        audits_delivered: crate::accounts::deliver_audits(ports, None).await,
        ..Changes::default()
    };
    certificates(ports, actor, now, &mut changes).await?;
    rectification(ports, actor, now, &mut changes).await?;
    retention(ports, actor, now, &mut changes).await?;
    if changes.count() > 0 {
        ports
            .append(
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
async fn certificates<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    let live = ports.write(|store| store.certificates_with_keys()).await?;
    for certificate in live {
        let entry = (certificate.account_id.clone(), certificate.serial.clone());
        if certificate.status == CertStatus::Revoked {
            if finish_revocation(ports, certificate, actor).await? {
                changes.revocations_finished.push(entry);
            }
            continue;
        }
        if certificate.status == CertStatus::Valid && certificate.profile == Profile::Minor {
            let account = load(ports, &certificate.account_id)?;
            let current = account.current_certificate.as_ref() == Some(&certificate.serial);
            if current && !account.sealed_dob.is_empty() {
                let dob = crate::date_of_birth(ports, &account).await?;
                if now >= cert_lifecycle::minor_certificate_ends(dob) {
                    let reason = RevocationReason::CessationOfOperation;
                    revoke_current(ports, &account, reason, actor, now).await?;
                    changes.minors_revoked.push(entry);
                    continue;
                }
            }
        }
        if now >= certificate.not_after {
            destroy_key_of(ports, certificate, "expired", actor).await?;
            changes.expired_keys_destroyed.push(entry);
        }
    }
    Ok(())
}

/// Accounts whose 7-day rectification deadline has passed.
async fn rectification<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    let pending = ports
        .write(|store| store.accounts_in_status(AccountStatus::RectificationPending))
        .await?;
    // Checked again on the account as stored when it changed meanwhile (rectified).
    let due = |account: &cert_lifecycle::AccountRecord| {
        account.status == AccountStatus::RectificationPending
            && account.rectify_by.is_some_and(|deadline| now >= deadline)
    };
    for mut account in pending {
        if due(&account) && invalidate_if(ports, &mut account, actor, now, due).await? {
            changes.invalidated.push(account.id);
        }
    }
    Ok(())
}

/// Accounts suspended or invalidated seven years ago and left so.
async fn retention<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    for status in [AccountStatus::Suspended, AccountStatus::Invalidated] {
        let accounts = ports
            .write(move |store| store.accounts_in_status(status))
            .await?;
        // Checked again on the account as stored when it changed meanwhile (resumed).
        let due = |account: &cert_lifecycle::AccountRecord| {
            matches!(
                account.status,
                AccountStatus::Suspended | AccountStatus::Invalidated
            ) && now >= cert_lifecycle::retention_ends(account.status_changed_at)
        };
        for mut account in accounts {
            if due(&account) && deregister_if(ports, &mut account, actor, now, due).await? {
                changes.deregistered.push(account.id);
            }
        }
    }
    Ok(())
}
