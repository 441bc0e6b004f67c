//! iAM Smart-Certs as stored: profile, status, revocation reason.

use std::fmt;

use time::{Date, Duration, OffsetDateTime};

use crate::age::is_minor;
use crate::wire::wire_enum;
use crate::{AccountId, CertSerial, Profile, RuleError};

wire_enum! {
    /// A certificate's status as the API shows it.
    pub enum CertStatus ("certificate status") {
        /// Not revoked and not yet past `not_after`.
        Valid => "valid",
        /// Past `not_after`; derived from the time, never stored.
        Expired => "expired",
        /// Revoked; its private key must never be used again.
        Revoked => "revoked",
    }
}

wire_enum! {
    /// Why a certificate was revoked: the RFC 5280 (section 5.3.1) CRLReason values the appliance
    /// uses.
    pub enum RevocationReason ("revocation reason") {
        /// keyCompromise (1): the credentials may be lost or compromised.
        KeyCompromise => "key_compromise",
        /// affiliationChanged (3): e.g. a minor's certificate when the holder turns 18.
        AffiliationChanged => "affiliation_changed",
        /// superseded (4): replaced by a renewal.
        Superseded => "superseded",
        /// cessationOfOperation (5): the account was deregistered.
        CessationOfOperation => "cessation_of_operation",
        /// privilegeWithdrawn (9): the account was invalidated.
        PrivilegeWithdrawn => "privilege_withdrawn",
    }
}

impl RevocationReason {
    /// The CRLReason code (RFC 5280 section 5.3.1).
    pub fn crl_reason_code(self) -> u8 {
        match self {
            RevocationReason::KeyCompromise => 1,
            RevocationReason::AffiliationChanged => 3,
            RevocationReason::Superseded => 4,
            RevocationReason::CessationOfOperation => 5,
            RevocationReason::PrivilegeWithdrawn => 9,
        }
    }
}

/// The certificate profile for a holder born on `dob`, issued at `now` (Hong Kong date).
pub fn profile_for(dob: Date, now: OffsetDateTime) -> Profile {
    if is_minor(dob, now) {
        Profile::Minor
    } else {
        Profile::Adult
    }
}

/// A certificate as stored. `status` is `Valid` or `Revoked`; expiry is derived from `now`.
#[derive(Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// The serial number, also the key of the record.
    pub serial: CertSerial,
    /// The holder's account.
    pub account_id: AccountId,
    /// Adult or minor.
    pub profile: Profile,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity, inclusive (RFC 5280 section 4.1.2.5).
    pub not_after: OffsetDateTime,
    /// `Valid` or `Revoked`.
    pub status: CertStatus,
    /// Why it was revoked, once `Revoked`.
    pub revocation_reason: Option<RevocationReason>,
    /// When it was revoked, once `Revoked`.
    pub revoked_at: Option<OffsetDateTime>,
    /// The certificate DER, sealed by the daemon (it carries the holder's name).
    pub sealed_der: Vec<u8>,
    /// The HSM's reference to the private key (a wrapped blob or a key id); `None` once destroyed.
    pub key_ref: Option<Vec<u8>>,
    /// The key's algorithm as the daemon names it (e.g. "ecdsa_p256").
    pub key_algorithm: String,
}

impl CertificateRecord {
    /// The status at `now`: a valid certificate past `not_after` reads as expired.
    pub fn effective_status(&self, now: OffsetDateTime) -> CertStatus {
        match self.status {
            CertStatus::Valid if now > self.not_after => CertStatus::Expired,
            status => status,
        }
    }

    /// When the renewal window opens: `window` before `not_after`.
    pub fn renewal_opens(&self, window: Duration) -> OffsetDateTime {
        self.not_after - window
    }

    /// The renewal rule (DOMAIN.md, "iAM Smart-Cert lifecycle"): renewal is possible from the
    /// instant the window opens until just before `not_after`; at `not_after` the certificate has
    /// expired (as the API shows it) and the user must re-apply. Revocation is checked apart.
    pub fn check_renewal(&self, window: Duration, now: OffsetDateTime) -> Result<(), RuleError> {
        if now >= self.not_after {
            Err(RuleError::RenewalTooLate)
        } else if now < self.renewal_opens(window) {
            Err(RuleError::RenewalNotDue)
        } else {
            Ok(())
        }
    }

    /// Whether its key may sign at `now`: valid, within its validity period, key not destroyed.
    pub fn usable_at(&self, now: OffsetDateTime) -> bool {
        self.effective_status(now) == CertStatus::Valid
            && now >= self.not_before
            && self.key_ref.is_some()
    }
}

impl fmt::Debug for CertificateRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateRecord")
            .field("serial", &self.serial)
            .field("account_id", &self.account_id)
            .field("profile", &self.profile)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("status", &self.status)
            .field("revocation_reason", &self.revocation_reason)
            .field("revoked_at", &self.revoked_at)
            .field("key_destroyed", &self.key_ref.is_none())
            .field("key_algorithm", &self.key_algorithm)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use time::macros::{date, datetime};

    use super::*;

    pub(crate) fn record(serial: &str, account: &str) -> CertificateRecord {
        CertificateRecord {
            serial: CertSerial::parse(serial).unwrap(),
            account_id: AccountId::parse(account).unwrap(),
            profile: Profile::Adult,
            not_before: datetime!(2026-01-01 00:00 UTC),
            not_after: datetime!(2028-12-31 23:59:59 UTC),
            status: CertStatus::Valid,
            revocation_reason: None,
            revoked_at: None,
            sealed_der: vec![1, 2, 3],
            key_ref: Some(vec![9; 40]),
            key_algorithm: "ecdsa_p256".to_owned(),
        }
    }

    #[test]
    fn certificate_past_not_after_reads_as_expired() {
        let c = record("3f9a", "u-1");
        assert_eq!(c.effective_status(c.not_after), CertStatus::Valid);
        assert!(c.usable_at(c.not_after));
        let later = c.not_after + Duration::SECOND;
        assert_eq!(c.effective_status(later), CertStatus::Expired);
        assert!(!c.usable_at(later));
    }

    #[test]
    fn renewal_window_opens_its_length_before_not_after_and_closes_at_it() {
        let c = record("3f9a", "u-1");
        let window = Duration::days(60);
        let opens = c.not_after - window;
        let second = Duration::SECOND;
        assert_eq!(c.renewal_opens(window), opens);
        assert_eq!(
            c.check_renewal(window, opens - second),
            Err(RuleError::RenewalNotDue)
        );
        assert_eq!(c.check_renewal(window, opens), Ok(()));
        assert_eq!(c.check_renewal(window, c.not_after - second), Ok(()));
        assert_eq!(
            c.check_renewal(window, c.not_after),
            Err(RuleError::RenewalTooLate)
        );
    }

    #[test]
    fn revoked_certificate_stays_revoked_and_is_not_usable() {
        let mut c = record("3f9a", "u-1");
        c.status = CertStatus::Revoked;
        let now = datetime!(2027-01-01 00:00 UTC);
        assert_eq!(c.effective_status(now), CertStatus::Revoked);
        assert_eq!(
            c.effective_status(c.not_after + Duration::DAY),
            CertStatus::Revoked
        );
        assert!(!c.usable_at(now));
    }

    #[test]
    fn certificate_with_destroyed_key_is_not_usable() {
        let mut c = record("3f9a", "u-1");
        c.key_ref = None;
        assert!(!c.usable_at(datetime!(2027-01-01 00:00 UTC)));
    }

    #[test]
    fn certificate_not_yet_valid_is_not_usable() {
        let c = record("3f9a", "u-1");
        assert!(!c.usable_at(c.not_before - Duration::SECOND));
    }

    #[test]
    fn minor_gets_minor_profile_until_18_hong_kong_time() {
        let dob = date!(2009 - 05 - 01);
        assert_eq!(
            profile_for(dob, datetime!(2027-04-30 15:59:59 UTC)),
            Profile::Minor
        );
        assert_eq!(
            profile_for(dob, datetime!(2027-04-30 16:00 UTC)),
            Profile::Adult
        );
    }

    #[test]
    fn revocation_reasons_carry_rfc_5280_codes_and_wire_names() {
        let codes: Vec<(&str, u8)> = RevocationReason::ALL
            .iter()
            .map(|r| (r.as_str(), r.crl_reason_code()))
            .collect();
        assert_eq!(
            codes,
            [
                ("key_compromise", 1),
                ("affiliation_changed", 3),
                ("superseded", 4),
                ("cessation_of_operation", 5),
                ("privilege_withdrawn", 9),
            ]
        );
        for r in RevocationReason::ALL {
            assert_eq!(r.as_str().parse::<RevocationReason>().unwrap(), *r);
        }
        assert_eq!(CertStatus::Expired.as_str(), "expired");
        assert_eq!(serde_json::to_string(&Profile::Minor).unwrap(), "\"minor\"");
    }
}
