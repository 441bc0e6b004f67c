//! The workflows of the appliance, over small traits (its [`ports`]): the signing flow, the
//! changes of an account's state, registration and upgrade, renewal and re-application, the
//! lifecycle sweeps, and the start-up recovery of each. It knows no HTTP and no concrete HSM, CA, store or clock:
//! every workflow takes the ports and `now`, and returns a typed outcome or an [`AppError`]
//! that the edge maps to API.md's codes.
//!
//! Every state change is a conditional transition in the store (a version or the prior state in
//! the `WHERE`): a change that lost a race reads again and applies on top, or fails with the
//! error of the new state, or, when nothing else fits, with [`AppError::Conflict`]. Nothing
//! relies on one process's memory.

#![forbid(unsafe_code)]

pub mod accounts;
mod error;
pub mod ports;
pub mod registration;
pub mod renewal;
pub mod signing;
pub mod sweeps;

use cert_lifecycle::{AccountRecord, CertStatus, CertificateRecord};
use serde_json::{Map, Value};
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{Date, OffsetDateTime};

pub use error::{AppError, Cause};
pub use ports::Ports;

/// A certificate's status by the local record: revoked, expired (at `now`) or valid.
pub fn certificate_status(certificate: &CertificateRecord, now: OffsetDateTime) -> CertStatus {
    if certificate.status == CertStatus::Revoked {
        CertStatus::Revoked
    } else if now >= certificate.not_after {
        CertStatus::Expired
    } else {
        CertStatus::Valid
    }
}

/// A time as API.md writes it: RFC 3339, whole seconds.
pub fn rfc3339(time: OffsetDateTime) -> String {
    time.replace_nanosecond(0)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// PEM text of one DER object, lines of 64 characters.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Builds audit fields from `(key, value)` pairs.
pub fn fields<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// The account holder's date of birth, unsealed.
pub async fn date_of_birth<P: Ports>(ports: &P, account: &AccountRecord) -> Result<Date, AppError> {
    let text = ports
        .unseal("dob", account.id.as_str(), &account.sealed_dob)
        .await?;
    let text = std::str::from_utf8(&text).map_err(AppError::fault)?;
    Date::parse(text, &Iso8601::DATE).map_err(AppError::fault)
}

/// The holder's name: only ever in memory, sealed at rest, shown to nobody but the CA.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct PersonalName {
    /// Surname.
    pub surname: String,
    /// Given name, when the holder has one.
    pub given_name: Option<String>,
}

impl std::fmt::Debug for PersonalName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PersonalName(..)")
    }
}

/// The account holder's name, unsealed.
pub async fn personal_name<P: Ports>(
    ports: &P,
    account: &AccountRecord,
) -> Result<PersonalName, AppError> {
    let json = ports
        .unseal("name", account.id.as_str(), &account.sealed_name)
        .await?;
    serde_json::from_slice(&json).map_err(AppError::fault)
}
