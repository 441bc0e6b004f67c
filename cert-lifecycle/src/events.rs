//! The lifecycle events a user must be told about (API.md, "Receipts, audit filters and
//! events"; DOMAIN.md, "Notices"): what the app gateway reads from `GET /v1/events` and delivers.
//!
//! An event is stored in the same transaction as the change it reports, by the store call that
//! makes the change: no crash loses one, and none reports a change that did not happen. Which
//! change yields which event is the application layer's rule; this module only names them.
//!
//! An event carries ids and facts, never personal data: its [`EventDetails`] has no field that
//! could hold a name, a date of birth or an HKIC number, and the store keeps each field in a
//! column of its own type. Events stay after deregistration (they name the account by its id).

use time::OffsetDateTime;

use crate::wire::wire_enum;
use crate::{AccountId, CertSerial, RevocationReason, SuspendedBy};

wire_enum! {
    /// What happened (API.md's `event`).
    pub enum EventKind ("event") {
        /// A first certificate (registration, upgrade) or a new one after expiry or revocation
        /// (re-application) is in use.
        CertificateIssued => "certificate.issued",
        /// A renewal finished: the new certificate is in use.
        CertificateRenewed => "certificate.renewed",
        /// A certificate was revoked (details: `reason`).
        CertificateRevoked => "certificate.revoked",
        /// A certificate entered its renewal window: the app may ask for consent to renew.
        CertificateRenewalWindowOpen => "certificate.renewal_window_open",
        /// A certificate passed its `not_after` unrenewed: only re-application is left.
        CertificateExpired => "certificate.expired",
        /// The account was suspended (details: `by`).
        AccountSuspended => "account.suspended",
        /// A suspension was lifted (details: `by`).
        AccountResumed => "account.resumed",
        /// The regular check did not match: rectification is due by `rectify_by`.
        AccountRectificationPending => "account.rectification_pending",
        /// The account was invalidated.
        AccountInvalidated => "account.invalidated",
        /// The account was deregistered.
        AccountDeregistered => "account.deregistered",
        /// A minor turned 18 and their minor's certificate was revoked.
        AccountTurned18 => "account.turned_18",
    }
}

/// The facts an event carries, each only where it applies. Ids and facts only: nothing here can
/// hold personal data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventDetails {
    /// The certificate the event is about.
    pub serial: Option<CertSerial>,
    /// Why a certificate was revoked.
    pub reason: Option<RevocationReason>,
    /// When the certificate ends (issued, renewed, renewal window open, expired).
    pub not_after: Option<OffsetDateTime>,
    /// Who suspended or resumed.
    pub by: Option<SuspendedBy>,
    /// The rectification deadline.
    pub rectify_by: Option<OffsetDateTime>,
}

/// One event, as the application hands it to the store with the change it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    /// When it happened (the change's `now`).
    pub at: OffsetDateTime,
    /// The account it concerns.
    pub account_id: AccountId,
    /// What happened.
    pub kind: EventKind,
    /// Its facts.
    pub details: EventDetails,
}

impl UserEvent {
    /// An event about `account_id` at `at`, with no details yet.
    pub fn new(kind: EventKind, account_id: AccountId, at: OffsetDateTime) -> UserEvent {
        UserEvent {
            at,
            account_id,
            kind,
            details: EventDetails::default(),
        }
    }

    /// With `details`.
    pub fn with(mut self, details: EventDetails) -> UserEvent {
        self.details = details;
        self
    }
}

/// A stored event: its place in the feed (the cursor), and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its position: positive, increasing in the order events were committed.
    pub position: i64,
    /// The event.
    pub event: UserEvent,
}

/// How far the sweep has told a certificate's time-based events (the store keeps it per
/// certificate): each is told once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CertificateNotice {
    /// `certificate.renewal_window_open` is told.
    RenewalWindowOpen,
    /// `certificate.expired` is told (the window's event is then moot).
    Expired,
}

impl CertificateNotice {
    /// The stage as the store keeps it: 0 for nothing told yet.
    pub fn stage(self) -> i64 {
        match self {
            CertificateNotice::RenewalWindowOpen => 1,
            CertificateNotice::Expired => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_api_md_s() {
        let names: Vec<_> = EventKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(
            names,
            [
                "certificate.issued",
                "certificate.renewed",
                "certificate.revoked",
                "certificate.renewal_window_open",
                "certificate.expired",
                "account.suspended",
                "account.resumed",
                "account.rectification_pending",
                "account.invalidated",
                "account.deregistered",
                "account.turned_18",
            ]
        );
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), *kind);
        }
    }

    #[test]
    fn notices_are_ordered_by_stage() {
        assert!(CertificateNotice::RenewalWindowOpen < CertificateNotice::Expired);
        assert!(CertificateNotice::RenewalWindowOpen.stage() < CertificateNotice::Expired.stage());
    }
}
