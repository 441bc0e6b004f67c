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
pub mod csc;
mod error;
pub mod events;
pub mod ports;
pub mod registration;
pub mod renewal;
pub mod signing;
pub mod sweeps;

use std::future::Future;

use ca_bridge::IssuedCertificate;
use cert_lifecycle::{
    AccountId, AccountRecord, CertSerial, CertStatus, CertificateRecord, Profile, RevocationReason,
};
use serde_json::{Map, Value};
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{Date, OffsetDateTime};

pub use error::{AppError, Cause};
pub use ports::Ports;

/// What a recovery may take for work that a crash interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stranded {
    /// Everything unfinished: one node, whose own crash left whatever it finds at start.
    All,
    /// Only what started before this time: several nodes share the store, and younger work
    /// may still be running on another node. The time is far enough back that no operation
    /// still runs (each waits for the HSM, the CA and the store for seconds, not minutes).
    StartedBefore(OffsetDateTime),
}

impl Stranded {
    /// Whether work that started at `started` is the recovery's to take.
    pub fn covers(self, started: OffsetDateTime) -> bool {
        match self {
            Stranded::All => true,
            Stranded::StartedBefore(cutoff) => started < cutoff,
        }
    }
}

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

/// The keyed hash of a Hong Kong date on which minors turn 18 (`AccountRecord::adult_day_key`):
/// an HMAC under the HSM's TAID key, domain-separated from TAIDs (their input starts with a
/// service name, never with a zero byte). Two minors born on the same day share it; the date
/// itself stays secret without the HSM.
pub async fn adult_day_key<P: Ports>(ports: &P, day: Date) -> Result<[u8; 32], AppError> {
    let mut input = b"\0smartsign-adult-day-v1\0".to_vec();
    input.extend_from_slice(day.to_string().as_bytes());
    ports.taid_hash(&input).await
}

/// Gives `record` its holder's [`adult_day_key`] if it is to hold a minor's certificate
/// (`profile`) and has none (an account registered before the store kept them). Every account
/// registered as a minor has one from the start.
pub async fn key_adult_day<P: Ports>(
    ports: &P,
    record: &mut AccountRecord,
    profile: Profile,
) -> Result<(), AppError> {
    if profile == Profile::Minor && record.adult_day_key.is_none() {
        let dob = date_of_birth(ports, record).await?;
        record.adult_day_key = Some(adult_day_key(ports, cert_lifecycle::adult_on(dob)).await?);
    }
    Ok(())
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

/// Seals a certificate the CA just issued for `account`, has `record` write its serial and
/// sealed DER into the workflow's journal, and only then confirms it to the CA (certConf),
/// after the crash-test step `step`. One that cannot be recorded is rejected in its certConf,
/// which revokes it: no crash leaves a valid certificate that nothing names. Gives the serial
/// and the sealed DER.
pub(crate) async fn record_then_confirm<P, R, F>(
    ports: &P,
    account: &AccountId,
    issued: IssuedCertificate,
    pending: P::Unconfirmed,
    step: &'static str,
    record: R,
) -> Result<(CertSerial, Vec<u8>), AppError>
where
    P: Ports,
    R: FnOnce(CertSerial, Vec<u8>) -> F,
    F: Future<Output = Result<(), AppError>>,
{
    let recorded = async {
        let serial = CertSerial::parse(&issued.serial_hex).map_err(AppError::fault)?;
        let sealed_der = ports
            .seal("certificate", account.as_str(), &issued.der)
            .await?;
        record(serial.clone(), sealed_der.clone()).await?;
        Ok((serial, sealed_der))
    }
    .await;
    match recorded {
        Ok(recorded) => {
            ports.step(step);
            ports.confirm(pending, true).await?;
            Ok(recorded)
        }
        Err(error) => {
            if let Err(error) = ports.confirm(pending, false).await {
                tracing::error!(%error, "could not reject an unrecorded certificate; \
                    the CA revokes it for want of confirmation");
            }
            Err(error)
        }
    }
}

/// Revokes at the CA (cessationOfOperation) a certificate that a journal names and the store
/// did not keep.
pub(crate) async fn revoke_unused<P: Ports>(
    ports: &P,
    account: &AccountId,
    serial: &CertSerial,
    sealed_der: &[u8],
) -> Result<(), AppError> {
    let der = ports
        .unseal("certificate", account.as_str(), sealed_der)
        .await?;
    ports
        .revoke(serial, &der, RevocationReason::CessationOfOperation)
        .await
}
