//! The Cloud Signature Consortium (CSC) API v1 facade's workflows, over the native signing
//! flow: a credential is the account's TAID at the calling service; `credentials/authorize`
//! makes a (batch) signing request bound to the given hashes, which the user approves in the
//! app, out of band, and hands the service a signature activation datum (SAD); `signHash`
//! redeems that SAD once, for exactly those hashes, and returns the raw signatures.
//!
//! The SAD is 256 random bits, base64url; the store keeps only its SHA-256, bound to the
//! service, the credential, the request and the hashes. Every refusal here is one of
//! [`CscRefusal`], which the edge maps to the specification's errors.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cert_lifecycle::{CscSad, HashAlgorithm, ServiceName, SigningRequest, SigningStatus, Store};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::signing::{self, NewRequest, SigningSettings};
use crate::{AppError, Ports, fields};

/// How long after its request expires a SAD may still fetch the signatures of an approval
/// that came in time.
pub const SAD_GRACE: time::Duration = time::Duration::minutes(5);

/// What `credentials/authorize` answers.
#[derive(Debug)]
pub struct Authorized {
    /// The SAD: only the service holds it.
    pub sad: String,
    /// Its lifetime from now, in seconds.
    pub expires_in: i64,
    /// The signing request the user approves in the app, and the code the app shows.
    pub request: SigningRequest,
}

/// Why `signHash` refuses (all `invalid_request` in CSC v1, told apart by their description).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CscRefusal {
    /// Unknown, another service's or another credential's SAD.
    #[error("invalid SAD")]
    InvalidSad,
    /// The hashes are not exactly those the SAD was issued for.
    #[error("the hashes are not those the SAD authorises")]
    OtherHashes,
    /// Redeemed already.
    #[error("the SAD was used")]
    Used,
    /// Past its lifetime.
    #[error("the SAD expired")]
    Expired,
    /// The user rejected, let it expire, or it was locked or failed.
    #[error("the user did not approve the request ({0})")]
    NotApproved(&'static str),
}

impl CscRefusal {
    /// The refusal's name in the audit record (`reason` of `csc.sign_hash_denied`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSad => "invalid_sad",
            Self::OtherHashes => "other_hashes",
            Self::Used => "used",
            Self::Expired => "expired",
            Self::NotApproved(_) => "not_approved",
        }
    }
}

/// What `signHash` found.
#[derive(Debug)]
pub enum SignOutcome {
    /// The raw signatures (ECDSA: DER; RSA: PKCS#1 v1.5), in the order of the hashes.
    Signed(Vec<Vec<u8>>),
    /// The user has not decided yet; ask again.
    Waiting,
    /// Refused.
    Refused(CscRefusal),
}

/// The hash algorithm of CSC hashes, from their common length (v1's `authorize` names none).
pub fn algorithm_of(hashes: &[Vec<u8>]) -> Result<HashAlgorithm, AppError> {
    let first = hashes
        .first()
        .ok_or_else(|| AppError::InvalidRequest("hash: at least one".into()))?;
    let algorithm = match first.len() {
        32 => HashAlgorithm::Sha256,
        48 => HashAlgorithm::Sha384,
        64 => HashAlgorithm::Sha512,
        _ => {
            return Err(AppError::InvalidRequest(
                "hash: each a SHA-256, SHA-384 or SHA-512 value".into(),
            ));
        }
    };
    if hashes.iter().any(|hash| hash.len() != first.len()) {
        return Err(AppError::InvalidRequest(
            "hash: all of one algorithm".into(),
        ));
    }
    Ok(algorithm)
}

fn hashes_digest(hashes: &[Vec<u8>]) -> [u8; 32] {
    let mut digest = Sha256::new();
    for hash in hashes {
        digest.update(hash);
    }
    digest.finalize().into()
}

fn sad_digest(sad: &str) -> [u8; 32] {
    Sha256::digest(sad.as_bytes()).into()
}

/// What a service asks of `credentials/authorize`.
#[derive(Debug)]
pub struct Authorize {
    /// The calling service (its client certificate).
    pub service: ServiceName,
    /// The credential: the account's TAID at that service.
    pub taid: String,
    /// The hashes to sign, in order (`numSignatures` of them).
    pub hashes: Vec<Vec<u8>>,
    /// Shown to the user in the app.
    pub description: Option<String>,
}

/// `credentials/authorize`: a signing request for the hashes on the credential, and its SAD.
pub async fn authorize<P: Ports>(
    ports: &P,
    settings: &SigningSettings,
    actor: &str,
    asked: Authorize,
    now: OffsetDateTime,
) -> Result<Authorized, AppError> {
    let Authorize {
        service,
        taid,
        hashes,
        description,
    } = asked;
    let hash_algorithm = algorithm_of(&hashes)?;
    let digest = hashes_digest(&hashes);
    let (hash, batch) = match hashes.len() {
        1 => (hashes.into_iter().next().unwrap_or_default(), None),
        _ => (Vec::new(), Some(hashes)),
    };
    let new = NewRequest {
        service: service.clone(),
        taid: taid.clone(),
        hash_algorithm,
        hash,
        hashes: batch,
        hkic: None,
        description,
    };
    let request = signing::create(ports, settings, actor, new, now).await?;
    let mut raw = [0u8; 32];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| AppError::fault("no randomness for the SAD"))?;
    let sad = URL_SAFE_NO_PAD.encode(raw);
    let expires_at = request.expires_at + SAD_GRACE;
    let stored = CscSad {
        sad_hash: sad_digest(&sad),
        service,
        taid,
        request_id: request.id.clone(),
        hashes_sha256: digest,
        expires_at,
        used_at: None,
    };
    ports
        .append(
            "csc.authorized",
            actor,
            fields([
                ("request_id", json!(request.id.as_str())),
                ("hashes_sha256", json!(hex::encode(digest))),
            ]),
        )
        .await?;
    ports.write(move |store| store.insert_sad(&stored)).await?;
    Ok(Authorized {
        sad,
        expires_in: (expires_at - now).whole_seconds(),
        request,
    })
}

/// `signatures/signHash`: the signatures of the request the SAD activates, once it is signed;
/// the SAD is then redeemed (once, in the store). Every refusal is audited
/// (`csc.sign_hash_denied`), as the native flow audits a refused authorisation.
pub async fn sign_hash<P: Ports>(
    ports: &P,
    actor: &str,
    service: &ServiceName,
    taid: &str,
    sad: &str,
    hashes: &[Vec<u8>],
    now: OffsetDateTime,
) -> Result<SignOutcome, AppError> {
    let stored = ports.read(|store| store.get_sad(&sad_digest(sad)))?;
    let outcome = redeem(ports, actor, service, taid, stored.as_ref(), hashes, now).await?;
    if let SignOutcome::Refused(refusal) = &outcome {
        let mut record = fields([
            ("code", json!("invalid_request")),
            ("reason", json!(refusal.reason())),
        ]);
        if let Some(stored) = &stored {
            record.insert("request_id".into(), json!(stored.request_id.as_str()));
        }
        ports.append("csc.sign_hash_denied", actor, record).await?;
    }
    Ok(outcome)
}

async fn redeem<P: Ports>(
    ports: &P,
    actor: &str,
    service: &ServiceName,
    taid: &str,
    stored: Option<&CscSad>,
    hashes: &[Vec<u8>],
    now: OffsetDateTime,
) -> Result<SignOutcome, AppError> {
    let Some(stored) = stored else {
        return Ok(SignOutcome::Refused(CscRefusal::InvalidSad));
    };
    if &stored.service != service || stored.taid != taid {
        return Ok(SignOutcome::Refused(CscRefusal::InvalidSad));
    }
    if stored.hashes_sha256 != hashes_digest(hashes) {
        return Ok(SignOutcome::Refused(CscRefusal::OtherHashes));
    }
    if stored.used_at.is_some() {
        return Ok(SignOutcome::Refused(CscRefusal::Used));
    }
    if stored.expires_at <= now {
        return Ok(SignOutcome::Refused(CscRefusal::Expired));
    }
    let view = signing::view(ports, service, &stored.request_id, now).await?;
    match view.status {
        SigningStatus::Pending | SigningStatus::Approved => return Ok(SignOutcome::Waiting),
        SigningStatus::Signed => {}
        other => {
            return Ok(SignOutcome::Refused(CscRefusal::NotApproved(
                other.as_str(),
            )));
        }
    }
    let signatures = raw_signatures(view.result.as_ref(), hashes.len())?;
    let key = stored.sad_hash;
    if !ports
        .write(move |store| store.redeem_sad(&key, now))
        .await?
    {
        return Ok(SignOutcome::Refused(CscRefusal::Used));
    }
    ports
        .append(
            "csc.sign_hash",
            actor,
            fields([
                ("request_id", json!(stored.request_id.as_str())),
                ("signatures", json!(signatures.len())),
            ]),
        )
        .await?;
    Ok(SignOutcome::Signed(signatures))
}

/// The raw signatures of a signed request's result (API.md): `signature` of the one result, or
/// of each of a batch's `results`, in order.
fn raw_signatures(result: Option<&Value>, count: usize) -> Result<Vec<Vec<u8>>, AppError> {
    let missing = || AppError::fault("a signed request without its result");
    let result = result.ok_or_else(missing)?;
    let results: Vec<&Value> = match result.as_array() {
        Some(list) => list.iter().collect(),
        None => vec![result],
    };
    if results.len() != count {
        return Err(missing());
    }
    results
        .into_iter()
        .map(|one| {
            one["signature"]
                .as_str()
                .and_then(|text| STANDARD.decode(text).ok())
                .ok_or_else(missing)
        })
        .collect()
}

/// A credential as `credentials/info` shows it.
#[derive(Debug)]
pub struct Credential {
    /// The account's current certificate.
    pub certificate: cert_lifecycle::CertificateRecord,
    /// Its DER.
    pub der: Vec<u8>,
    /// Its status now.
    pub status: cert_lifecycle::CertStatus,
}

/// The credential `taid` of `service`: the account's current certificate. Another service's
/// TAID, or an account without a certificate, is not found.
pub async fn credential<P: Ports>(
    ports: &P,
    service: &ServiceName,
    taid: &str,
    now: OffsetDateTime,
) -> Result<Credential, AppError> {
    let not_found = || AppError::NotFound("credential");
    let account_id = ports
        .read(|store| store.find_taid(service, taid))?
        .ok_or_else(not_found)?;
    let account = ports
        .read(|store| store.get_account(&account_id))?
        .ok_or_else(not_found)?;
    // A deregistered account's certificate data is erased: it is no credential any more.
    if account.status == cert_lifecycle::AccountStatus::Deregistered {
        return Err(not_found());
    }
    let serial = account.current_certificate.ok_or_else(not_found)?;
    let certificate = ports
        .read(|store| store.get_certificate(&serial))?
        .ok_or_else(not_found)?;
    let der = ports
        .unseal("certificate", account_id.as_str(), &certificate.sealed_der)
        .await?;
    let status = crate::certificate_status(&certificate, now);
    Ok(Credential {
        certificate,
        der: der.to_vec(),
        status,
    })
}

/// `credentials/list`: the TAIDs `service` holds, a page after `after`.
pub async fn credentials<P: Ports>(
    ports: &P,
    service: &ServiceName,
    after: Option<String>,
    limit: usize,
) -> Result<Vec<String>, AppError> {
    let service = service.clone();
    ports
        .write(move |store| store.taids_of(&service, after.as_deref(), limit))
        .await
}
