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
//! - A valid certificate that entered its renewal window, or passed its `not_after`, is told to
//!   its user (`certificate.renewal_window_open`, `certificate.expired`), once each: the event is
//!   stored with a compare-and-set of the certificate's notice stage, in one transaction, so
//!   neither a crash nor two sweeps at once lose or repeat one. An index holds only the
//!   certificates still to be told they expired.
//!
//! Every change is audited before it is made, through the same workflows the routes use. A
//! sweep that stops half-way (a crash, the HSM or the CA gone) is finished by the next one:
//! each rule looks at the stored state again, and every step is safe to repeat. Each account
//! change is conditional like any other: a sweep never writes over a change made meanwhile.
//!
//! Each rule finds what is due through an index, a page at a time, in time proportional to what
//! is due, and decrypts nothing it does not act on. Minors turning 18 are found by the keyed
//! hash of the day ([`crate::adult_day_key`]): the sweep computes it for each Hong Kong day since
//! the last run (the store's `adult_day` mark) and looks the day up.

use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertStatus, CertificateNotice, EventKind,
    Profile, RevocationReason, Store,
};
use serde_json::json;
use time::{Date, Duration, OffsetDateTime};

use crate::accounts::{
    deregister_if, destroy_key_of, finish_revocation, invalidate_if, revoke_current,
};
use crate::{AppError, Ports, events, fields};

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
    /// Certificates whose renewal window opened, told to their users.
    pub renewal_windows_opened: Vec<(AccountId, CertSerial)>,
    /// Certificates that expired, told to their users.
    pub expiries_told: Vec<(AccountId, CertSerial)>,
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
            + self.renewal_windows_opened.len()
            + self.expiries_told.len()
    }
}

/// Runs every rule at `now`, with renewal opening `renewal_window` before a certificate's
/// `not_after`; audits a summary when anything changed. The caller makes sure one run goes at a
/// time.
pub async fn run<P: Ports>(
    ports: &P,
    renewal_window: Duration,
    actor: &str,
    now: OffsetDateTime,
) -> Result<Changes, AppError> {
    let mut changes = Changes {
        audits_delivered: crate::accounts::deliver_audits(ports, None).await,
        ..Changes::default()
    };
    certificates(ports, actor, now, &mut changes).await?;
    notices(ports, renewal_window, now, &mut changes).await?;
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
                    (
                        "renewal_windows_opened",
                        json!(changes.renewal_windows_opened.len()),
                    ),
                    ("expiries_told", json!(changes.expiries_told.len())),
                ]),
            )
            .await?;
    }
    Ok(changes)
}

/// Rows a sweep query reads at a time.
const PAGE: usize = 500;

/// The sweep mark of the minors' rule: the last Hong Kong day (Julian day number) whose 18th
/// birthdays have been acted on.
pub const ADULT_DAY_MARK: &str = "adult_day";

/// Revocations that stopped before the CA had them or the key was gone, minors who turned 18,
/// and expired certificates that still have a key.
async fn certificates<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    loop {
        let page = ports.read(|store| store.unfinished_revocations(PAGE))?;
        let mut acted = 0;
        for certificate in &page {
            let entry = (certificate.account_id.clone(), certificate.serial.clone());
            if finish_revocation(ports, certificate.clone(), actor).await? {
                changes.revocations_finished.push(entry);
                acted += 1;
            }
        }
        if page.len() < PAGE || acted == 0 {
            break;
        }
    }
    minors(ports, actor, now, changes).await?;
    let mut destroyed = std::collections::HashSet::new();
    loop {
        let page = ports.read(|store| store.expired_with_keys(now, PAGE))?;
        let mut acted = 0;
        for certificate in &page {
            // A key that came back meanwhile (a key change) is not destroyed twice in a run.
            if !destroyed.insert(certificate.serial.clone()) {
                continue;
            }
            let entry = (certificate.account_id.clone(), certificate.serial.clone());
            destroy_key_of(ports, certificate.clone(), "expired", actor).await?;
            changes.expired_keys_destroyed.push(entry);
            acted += 1;
        }
        if page.len() < PAGE || acted == 0 {
            break;
        }
    }
    Ok(())
}

/// Minors who turned 18: by the keyed hash of each day from the mark to today. Without a mark
/// (a store that kept no keys, or a clock moved back past it), every current minor's date of
/// birth is read once instead, and the keys it lacks are stored.
async fn minors<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    let today = cert_lifecycle::hk_date(now);
    let mark = ports.read(|store| store.sweep_mark(ADULT_DAY_MARK))?;
    let mark_day = mark.and_then(|day| i32::try_from(day).ok().map(Date::from_julian_day));
    let mut reached = match mark_day {
        Some(Ok(day)) if day <= today => day,
        _ => {
            every_minor(ports, actor, now, changes).await?;
            // Unless the mark moved meanwhile; the next run then starts from there.
            let day = i64::from(today.to_julian_day());
            ports
                .write(move |store| store.advance_sweep_mark(ADULT_DAY_MARK, mark, day))
                .await?;
            return Ok(());
        }
    };
    while let Some(day) = reached.next_day().filter(|day| *day <= today) {
        let key = crate::adult_day_key(ports, day).await?;
        for account in ports.read(|store| store.accounts_with_adult_day(&key))? {
            revoke_if_adult(ports, account, actor, now, changes).await?;
        }
        let (from, to) = (
            i64::from(reached.to_julian_day()),
            i64::from(day.to_julian_day()),
        );
        if !ports
            .write(move |store| store.advance_sweep_mark(ADULT_DAY_MARK, Some(from), to))
            .await?
        {
            return Ok(());
        }
        reached = day;
    }
    Ok(())
}

/// Every account with a valid minor's certificate in use: those 18 lose it, the others get the
/// `adult_day_key` they lack.
async fn every_minor<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    let mut after: Option<AccountId> = None;
    loop {
        let from = after.clone();
        let page = ports.read(|store| store.current_minors(from.as_ref(), PAGE))?;
        for account in &page {
            if revoke_if_adult(ports, account.clone(), actor, now, changes).await?
                || account.adult_day_key.is_some()
            {
                continue;
            }
            let dob = crate::date_of_birth(ports, account).await?;
            let key = crate::adult_day_key(ports, cert_lifecycle::adult_on(dob)).await?;
            let mut keyed = account.clone();
            keyed.adult_day_key = Some(key);
            // A change meanwhile fails the run before the mark is set: the next one, still
            // without a mark, looks again.
            ports
                .write(move |store| store.update_account(&keyed, &[]))
                .await?;
        }
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(last.id.clone()),
            _ => return Ok(()),
        }
    }
}

/// Revokes `account`'s minor's certificate if its holder is 18 at `now`; whether it did.
async fn revoke_if_adult<P: Ports>(
    ports: &P,
    account: AccountRecord,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<bool, AppError> {
    let Some(serial) = account.current_certificate.clone() else {
        return Ok(false);
    };
    if account.sealed_dob.is_empty() {
        return Ok(false);
    }
    let Some(certificate) = ports.read(|store| store.get_certificate(&serial))? else {
        return Ok(false);
    };
    if certificate.status != CertStatus::Valid || certificate.profile != Profile::Minor {
        return Ok(false);
    }
    let dob = crate::date_of_birth(ports, &account).await?;
    if now < cert_lifecycle::minor_certificate_ends(dob) {
        return Ok(false);
    }
    // The user hears both: the certificate revoked, and why (turned 18).
    revoke_current(
        ports,
        &account,
        RevocationReason::CessationOfOperation,
        actor,
        now,
        |certificate| vec![events::turned_18(certificate, now)],
    )
    .await?;
    changes
        .minors_revoked
        .push((account.id.clone(), certificate.serial));
    Ok(true)
}

/// Tells each valid certificate's user that it expired, then that its renewal window opened
/// (one past `not_after` is told only that it expired), once each.
async fn notices<P: Ports>(
    ports: &P,
    renewal_window: Duration,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    let rules = [
        (
            CertificateNotice::Expired,
            EventKind::CertificateExpired,
            now,
        ),
        (
            CertificateNotice::RenewalWindowOpen,
            EventKind::CertificateRenewalWindowOpen,
            now + renewal_window,
        ),
    ];
    for (notice, kind, until) in rules {
        loop {
            let page = ports
                .write(move |store| store.certificates_to_notify(notice, until, PAGE))
                .await?;
            let mut acted = 0;
            for certificate in &page {
                let serial = certificate.serial.clone();
                let tell = [events::certificate_time(kind, certificate, now)];
                // False when another run told it first.
                if ports
                    .write(move |store| store.record_notice(&serial, notice, &tell))
                    .await?
                {
                    let entry = (certificate.account_id.clone(), certificate.serial.clone());
                    match notice {
                        CertificateNotice::Expired => changes.expiries_told.push(entry),
                        _ => changes.renewal_windows_opened.push(entry),
                    }
                    acted += 1;
                }
            }
            if page.len() < PAGE || acted == 0 {
                break;
            }
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
    // Checked again on the account as stored when it changed meanwhile (rectified).
    let due = |account: &AccountRecord| {
        account.status == AccountStatus::RectificationPending
            && account.rectify_by.is_some_and(|deadline| now >= deadline)
    };
    loop {
        let page = ports.read(|store| store.rectifications_due(now, PAGE))?;
        let mut acted = 0;
        for mut account in page.iter().cloned() {
            if due(&account) && invalidate_if(ports, &mut account, actor, now, due).await? {
                changes.invalidated.push(account.id);
                acted += 1;
            }
        }
        if page.len() < PAGE || acted == 0 {
            return Ok(());
        }
    }
}

/// Accounts suspended or invalidated seven years ago and left so.
async fn retention<P: Ports>(
    ports: &P,
    actor: &str,
    now: OffsetDateTime,
    changes: &mut Changes,
) -> Result<(), AppError> {
    // Seven years are at least 2,555 days and the deadline falls at the start of a Hong Kong
    // day: an account changed after this instant is not due yet. Those between it and the
    // exact deadline are checked one by one.
    let before = now - Duration::days(7 * 365 - 2);
    // Checked again on the account as stored when it changed meanwhile (resumed).
    let due = |account: &AccountRecord| {
        matches!(
            account.status,
            AccountStatus::Suspended | AccountStatus::Invalidated
        ) && now >= cert_lifecycle::retention_ends(account.status_changed_at)
    };
    for status in [AccountStatus::Suspended, AccountStatus::Invalidated] {
        loop {
            let page = ports.read(|store| store.accounts_changed_before(status, before, PAGE))?;
            let mut acted = 0;
            for mut account in page.iter().cloned() {
                if due(&account) && deregister_if(ports, &mut account, actor, now, due).await? {
                    changes.deregistered.push(account.id);
                    acted += 1;
                }
            }
            if page.len() < PAGE || acted == 0 {
                break;
            }
        }
    }
    Ok(())
}
