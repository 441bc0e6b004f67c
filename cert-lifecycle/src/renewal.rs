//! Renewal and re-application as stored: the consent challenge a device signs, and the journal
//! rows that make a half-done key change or first issuance recoverable after a crash.

use std::fmt;

use time::OffsetDateTime;

use crate::wire::wire_enum;
use crate::{AccountId, CertSerial};

wire_enum! {
    /// What a consent is for (API.md, "Consent for renewal and re-application").
    pub enum ConsentPurpose ("consent purpose") {
        /// Renewal inside the window, before expiry: the old certificate is superseded.
        Renew => "renew",
        /// A new certificate after expiry or revocation.
        Reapply => "reapply",
        /// The user ends the account from the app (API.md, "Additions").
        Deregister => "deregister",
    }
}

impl ConsentPurpose {
    /// The statement the device signs: lines joined by `\n`, no trailing newline.
    pub fn statement(self, account: &AccountId, nonce: &str) -> String {
        format!(
            "smartsign-consent-v1\n{}\n{}\n{nonce}",
            self.as_str(),
            account.as_str()
        )
    }
}

/// A live consent challenge: one per account and purpose, used once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentChallenge {
    /// The account it was given to.
    pub account_id: AccountId,
    /// What the consent is for.
    pub purpose: ConsentPurpose,
    /// Random, from the HSM; base64url.
    pub nonce: String,
    /// After this instant the challenge answers `request_expired`.
    pub expires_at: OffsetDateTime,
}

/// A renewal or re-application in progress, written before the new key is made and updated at
/// every step, so that start-up can finish or undo what a crash interrupted.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyChangeJournal {
    /// The account (one key change at a time per account).
    pub account_id: AccountId,
    /// Renewal or re-application.
    pub purpose: ConsentPurpose,
    /// The certificate being replaced.
    pub old_serial: Option<CertSerial>,
    /// The new key's HSM reference, once generated.
    pub new_key_ref: Option<Vec<u8>>,
    /// The new certificate's serial, once the CA issued it.
    pub new_serial: Option<CertSerial>,
    /// The new certificate, sealed under the HSM data key, once issued (to revoke it if it is
    /// not kept).
    pub new_sealed_der: Option<Vec<u8>>,
    /// When the operation started.
    pub started_at: OffsetDateTime,
}

impl fmt::Debug for KeyChangeJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyChangeJournal")
            .field("account_id", &self.account_id)
            .field("purpose", &self.purpose)
            .field("old_serial", &self.old_serial)
            .field("new_key", &self.new_key_ref.is_some())
            .field("new_serial", &self.new_serial)
            .field("started_at", &self.started_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_statement_has_four_lines_and_no_trailing_newline() {
        let account = AccountId::parse("u-1").unwrap();
        assert_eq!(
            ConsentPurpose::Renew.statement(&account, "abc"),
            "smartsign-consent-v1\nrenew\nu-1\nabc"
        );
        assert_eq!(
            "reapply".parse::<ConsentPurpose>().unwrap(),
            ConsentPurpose::Reapply
        );
    }
}

wire_enum! {
    /// What a first certificate of an account is issued for.
    pub enum IssuancePurpose ("issuance purpose") {
        /// Registration of an "iAM Smart+" account.
        Register => "register",
        /// An "iAM Smart" account becoming "iAM Smart+".
        Upgrade => "upgrade",
    }
}

/// A first issuance in progress (registration or upgrade), written once the new key exists and
/// before the CA is asked, and updated when the CA issued; deleted once the store keeps the
/// certificate. A row that start-up finds names a certificate the store did not keep: it is
/// revoked at the CA and its key destroyed.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuanceJournal {
    /// The account (one issuance at a time per account id; the account may not be stored yet).
    pub account_id: AccountId,
    /// Registration or upgrade.
    pub purpose: IssuancePurpose,
    /// The new key's HSM reference.
    pub key_ref: Vec<u8>,
    /// The certificate's serial, once the CA issued it.
    pub serial: Option<CertSerial>,
    /// The certificate, sealed under the HSM data key, once issued (to revoke it if it is not
    /// kept).
    pub sealed_der: Option<Vec<u8>>,
    /// When the issuance started.
    pub started_at: OffsetDateTime,
}

impl fmt::Debug for IssuanceJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuanceJournal")
            .field("account_id", &self.account_id)
            .field("purpose", &self.purpose)
            .field("serial", &self.serial)
            .field("issued", &self.sealed_der.is_some())
            .field("started_at", &self.started_at)
            .finish_non_exhaustive()
    }
}
