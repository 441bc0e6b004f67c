//! The user events (API.md, `GET /v1/events`): which change yields which event, and the feed.
//!
//! Each workflow hands the events its change yields to the store call that makes the change, so
//! they are stored in the same transaction (none is lost by a crash, none reports a change that
//! was not made). The audit log is not their source: its records of an invalidation or a
//! revocation are written before the change, which may then not happen. The rules:
//!
//! | change | events |
//! |---|---|
//! | registration or upgrade with a certificate, re-application | `certificate.issued` |
//! | renewal (the new certificate current) | `certificate.renewed` |
//! | a certificate revoked (locally, first time) | `certificate.revoked` with its `reason` |
//! | a minor's certificate revoked at 18 | also `account.turned_18` |
//! | the sweep finds a certificate in its renewal window | `certificate.renewal_window_open` |
//! | the sweep finds a certificate past `not_after` | `certificate.expired` |
//! | suspension, its lifting | `account.suspended`, `account.resumed` (with `by`) |
//! | a matching mismatch | `account.rectification_pending` (with `rectify_by`) |
//! | invalidation, deregistration | `account.invalidated`, `account.deregistered` |
//!
//! Details are ids and facts (serial, reason, not_after, by, rectify_by), never personal data.

use cert_lifecycle::{
    AccountId, CertificateRecord, EventDetails, EventKind, RevocationReason, Store, StoredEvent,
    SuspendedBy, UserEvent,
};
use time::OffsetDateTime;

use crate::{AppError, Ports};

/// `certificate.issued` (registration, upgrade, re-application) or `certificate.renewed`.
pub fn certificate_in_use(
    kind: EventKind,
    certificate: &CertificateRecord,
    now: OffsetDateTime,
) -> UserEvent {
    UserEvent::new(kind, certificate.account_id.clone(), now).with(EventDetails {
        serial: Some(certificate.serial.clone()),
        not_after: Some(certificate.not_after),
        ..EventDetails::default()
    })
}

/// `certificate.revoked`, with its reason.
pub fn revoked(
    certificate: &CertificateRecord,
    reason: RevocationReason,
    now: OffsetDateTime,
) -> UserEvent {
    UserEvent::new(
        EventKind::CertificateRevoked,
        certificate.account_id.clone(),
        now,
    )
    .with(EventDetails {
        serial: Some(certificate.serial.clone()),
        reason: Some(reason),
        ..EventDetails::default()
    })
}

/// `account.turned_18`: the minor's certificate `certificate` is revoked for it. Its details
/// name the certificate, never the birthday.
pub fn turned_18(certificate: &CertificateRecord, now: OffsetDateTime) -> UserEvent {
    UserEvent::new(
        EventKind::AccountTurned18,
        certificate.account_id.clone(),
        now,
    )
    .with(EventDetails {
        serial: Some(certificate.serial.clone()),
        ..EventDetails::default()
    })
}

/// A time-based event of a certificate (`certificate.renewal_window_open`,
/// `certificate.expired`).
pub fn certificate_time(
    kind: EventKind,
    certificate: &CertificateRecord,
    now: OffsetDateTime,
) -> UserEvent {
    certificate_in_use(kind, certificate, now)
}

/// `account.suspended` or `account.resumed`, by whom.
pub fn suspension(
    kind: EventKind,
    account: &AccountId,
    by: SuspendedBy,
    now: OffsetDateTime,
) -> UserEvent {
    UserEvent::new(kind, account.clone(), now).with(EventDetails {
        by: Some(by),
        ..EventDetails::default()
    })
}

/// `account.rectification_pending`, with the deadline.
pub fn rectification_pending(
    account: &AccountId,
    rectify_by: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> UserEvent {
    UserEvent::new(EventKind::AccountRectificationPending, account.clone(), now).with(
        EventDetails {
            rectify_by,
            ..EventDetails::default()
        },
    )
}

/// An account's end (`account.invalidated`, `account.deregistered`): no details.
pub fn account_ended(kind: EventKind, account: &AccountId, now: OffsetDateTime) -> UserEvent {
    UserEvent::new(kind, account.clone(), now)
}

/// One page of the feed: the events after position `after` (0: from the first), up to
/// `limit`, in the order their changes were committed. A scan of up to `limit` rows: it runs
/// where blocking holds up no other work.
pub async fn page<P: Ports>(
    ports: &P,
    after: i64,
    limit: usize,
) -> Result<Vec<StoredEvent>, AppError> {
    if after < 0 {
        return Err(AppError::InvalidRequest("after: not a cursor".into()));
    }
    ports
        .write(move |store| store.events_after(after, limit))
        .await
}
