//! Accounts: their tier and status, the stored record, and the registration rule.

use std::fmt;

use time::{Date, Duration, OffsetDateTime};

use crate::age::{ADULT_AGE, MIN_REGISTRATION_AGE, age_on, hk_date};
use crate::wire::wire_enum;
use crate::{AccountId, CertSerial, RuleError};

wire_enum! {
    /// The kind of account (DOMAIN.md, "The actors"): only "iAM Smart+" may sign.
    pub enum Tier ("tier") {
        /// "iAM Smart": no certificate, no digital signing.
        IamSmart => "iam_smart",
        /// "iAM Smart+": a key in the HSM and an iAM Smart-Cert.
        IamSmartPlus => "iam_smart_plus",
    }
}

wire_enum! {
    /// Where an account stands (DOMAIN.md, "Account states that gate signing").
    pub enum AccountStatus ("account status") {
        /// In use; the only status in which signing is possible.
        Active => "active",
        /// Suspended by the user or the government; resumable.
        Suspended => "suspended",
        /// A regular check found the HKIC information changed; `rectify_by` is the deadline.
        RectificationPending => "rectification_pending",
        /// Invalidated after the rectification deadline, or by the registrar.
        Invalidated => "invalidated",
        /// Deregistered by the user or after seven years of inaction; final.
        Deregistered => "deregistered",
    }
}

wire_enum! {
    /// Who suspended an account.
    pub enum SuspendedBy ("suspended by") {
        /// The user, who may resume.
        User => "user",
        /// The government, on a suspected breach of the terms.
        Government => "government",
    }
}

/// How long a user has to rectify after acknowledging a mismatch notice (DOMAIN.md).
pub const RECTIFICATION_PERIOD: Duration = Duration::days(7);

/// Applies the registration rule (DOMAIN.md, "The actors") on the Hong Kong date at `now`:
/// the applicant is at least 11; an applicant under 18 comes with a guardian aged 18 or over, and
/// an adult without one.
pub fn check_registration(
    dob: Date,
    guardian_dob: Option<Date>,
    now: OffsetDateTime,
) -> Result<(), RuleError> {
    let today = hk_date(now);
    let age = age_on(dob, today);
    if age < MIN_REGISTRATION_AGE {
        return Err(RuleError::Underage);
    }
    match guardian_dob {
        None if age < ADULT_AGE => Err(RuleError::GuardianRequired),
        None => Ok(()),
        Some(_) if age >= ADULT_AGE => Err(RuleError::GuardianNotAllowed),
        Some(guardian) if age_on(guardian, today) < ADULT_AGE => Err(RuleError::GuardianUnderage),
        Some(_) => Ok(()),
    }
}

/// An account as stored.
///
/// The personal data in it is sealed by the daemon (AES-GCM under an HSM key, the account id as
/// associated data) before it gets here, and the HKIC number is only a keyed hash; `Debug` shows
/// none of them anyway.
#[derive(Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// The registrar's account id.
    pub id: AccountId,
    /// "iAM Smart" or "iAM Smart+".
    pub tier: Tier,
    /// Where the account stands.
    pub status: AccountStatus,
    /// When `status` last changed (the seven-year retention counts from here).
    pub status_changed_at: OffsetDateTime,
    /// Who suspended it, while `Suspended`.
    pub suspended_by: Option<SuspendedBy>,
    /// The rectification deadline, while `RectificationPending`.
    pub rectify_by: Option<OffsetDateTime>,
    /// Surname and given name, sealed by the daemon; empty once personal data is deleted.
    pub sealed_name: Vec<u8>,
    /// Date of birth, sealed by the daemon; empty once personal data is deleted.
    pub sealed_dob: Vec<u8>,
    /// Keyed hash of the canonical HKIC number; all zeros once personal data is deleted.
    pub hkic_hash: [u8; 32],
    /// The bound device's P-256 public key, SubjectPublicKeyInfo DER.
    pub device_public_key: Vec<u8>,
    /// Counts device switches; a signing request remembers the generation it was made under.
    pub device_generation: u32,
    /// The certificate in use, if any ("iAM Smart+").
    pub current_certificate: Option<CertSerial>,
    /// When the account was registered.
    pub created_at: OffsetDateTime,
    /// A minor's guardian, as the keyed hash of their HKIC number (never the number), kept with
    /// the account once their date of birth was checked at registration; erased with it.
    pub guardian_hkic_hash: Option<[u8; 32]>,
    /// A minor's 18th birthday (the Hong Kong date their minor's certificate ends) as a keyed
    /// hash of that date, under an HSM key: the sweep finds who turns 18 on a day by computing
    /// that day's hash, and the store never holds the date. `None` for an adult, and erased
    /// with the personal data.
    pub adult_day_key: Option<[u8; 32]>,
    /// How many changes the stored account has had: an update names the version it was made
    /// from, and is refused when the account moved on meanwhile (0 for a new account).
    pub version: u64,
}

impl AccountRecord {
    /// Whether the personal data (sealed name and date of birth, HKIC hash) has been deleted.
    pub fn personal_data_deleted(&self) -> bool {
        self.sealed_name.is_empty() && self.sealed_dob.is_empty() && self.hkic_hash == [0; 32]
    }
}

impl fmt::Debug for AccountRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountRecord")
            .field("id", &self.id)
            .field("tier", &self.tier)
            .field("status", &self.status)
            .field("status_changed_at", &self.status_changed_at)
            .field("suspended_by", &self.suspended_by)
            .field("rectify_by", &self.rectify_by)
            .field("device_generation", &self.device_generation)
            .field("current_certificate", &self.current_certificate)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use time::macros::{date, datetime};

    use super::*;

    // 10:00 in Hong Kong on 1 May 2026.
    const NOW: OffsetDateTime = datetime!(2026-05-01 02:00 UTC);

    #[test]
    fn applicant_turning_11_tomorrow_is_underage() {
        assert_eq!(
            check_registration(date!(2015 - 05 - 02), Some(date!(1980 - 01 - 01)), NOW),
            Err(RuleError::Underage)
        );
    }

    #[test]
    fn applicant_turning_11_today_may_register_with_a_guardian() {
        assert_eq!(
            check_registration(date!(2015 - 05 - 01), Some(date!(1980 - 01 - 01)), NOW),
            Ok(())
        );
    }

    #[test]
    fn applicant_turns_11_at_midnight_hong_kong_time_not_utc() {
        // 00:30 on 1 May in Hong Kong is still 30 April in UTC.
        let just_after_midnight = datetime!(2026-04-30 16:30 UTC);
        assert_eq!(
            check_registration(
                date!(2015 - 05 - 01),
                Some(date!(1980 - 01 - 01)),
                just_after_midnight
            ),
            Ok(())
        );
        let just_before_midnight = datetime!(2026-04-30 15:59:59 UTC);
        assert_eq!(
            check_registration(
                date!(2015 - 05 - 01),
                Some(date!(1980 - 01 - 01)),
                just_before_midnight
            ),
            Err(RuleError::Underage)
        );
    }

    #[test]
    fn minor_without_guardian_needs_one() {
        assert_eq!(
            check_registration(date!(2009 - 05 - 02), None, NOW),
            Err(RuleError::GuardianRequired)
        );
    }

    #[test]
    fn guardian_turning_18_tomorrow_is_underage() {
        assert_eq!(
            check_registration(date!(2012 - 01 - 01), Some(date!(2008 - 05 - 02)), NOW),
            Err(RuleError::GuardianUnderage)
        );
        assert_eq!(
            check_registration(date!(2012 - 01 - 01), Some(date!(2008 - 05 - 01)), NOW),
            Ok(())
        );
    }

    #[test]
    fn guardian_born_29_february_is_18_on_1_march_in_common_year() {
        let now = datetime!(2026-02-28 12:00 UTC); // 20:00 on 28 February in Hong Kong
        assert_eq!(
            check_registration(date!(2012 - 01 - 01), Some(date!(2008 - 02 - 29)), now),
            Err(RuleError::GuardianUnderage)
        );
        let now = datetime!(2026-02-28 16:00 UTC); // 00:00 on 1 March in Hong Kong
        assert_eq!(
            check_registration(date!(2012 - 01 - 01), Some(date!(2008 - 02 - 29)), now),
            Ok(())
        );
    }

    #[test]
    fn applicant_turning_18_today_is_adult_and_registers_without_guardian() {
        assert_eq!(check_registration(date!(2008 - 05 - 01), None, NOW), Ok(()));
        assert_eq!(
            check_registration(date!(2008 - 05 - 01), Some(date!(1980 - 01 - 01)), NOW),
            Err(RuleError::GuardianNotAllowed)
        );
    }

    #[test]
    fn applicant_turning_18_tomorrow_needs_a_guardian() {
        assert_eq!(
            check_registration(date!(2008 - 05 - 02), None, NOW),
            Err(RuleError::GuardianRequired)
        );
    }

    #[test]
    fn applicant_born_in_the_future_is_underage() {
        assert_eq!(
            check_registration(date!(2030 - 01 - 01), None, NOW),
            Err(RuleError::Underage)
        );
    }

    #[test]
    fn account_wire_names_match_api() {
        assert_eq!(Tier::IamSmartPlus.as_str(), "iam_smart_plus");
        assert_eq!("iam_smart".parse::<Tier>().unwrap(), Tier::IamSmart);
        assert_eq!(
            AccountStatus::RectificationPending.as_str(),
            "rectification_pending"
        );
        for s in AccountStatus::ALL {
            assert_eq!(s.as_str().parse::<AccountStatus>().unwrap(), *s);
            assert_eq!(
                serde_json::to_string(s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(
            serde_json::from_str::<SuspendedBy>("\"government\"").unwrap(),
            SuspendedBy::Government
        );
        assert!(serde_json::from_str::<Tier>("\"IamSmart\"").is_err());
        assert!("Active".parse::<AccountStatus>().is_err());
    }
}
