//! Batch signing (API.md "Batch signing") over the in-memory ports: a batch is one request
//! under every rule of a single one, signed in one HSM job after one durable approval record
//! that lists its hashes.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use application::signing::{self, Authorised, NewRequest, SigningSettings};
use application::{AppError, Stranded};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cert_lifecycle::{
    AccountId, Decision, HashAlgorithm, RevocationReason, ServiceName, SigningRequest,
    SigningStatus, Store,
};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{Device, Memory, SERVICE};
use time::OffsetDateTime;

fn settings() -> SigningSettings {
    SigningSettings {
        request_ttl: time::Duration::minutes(5),
        max_pending: 5,
        max_batch: 20,
        chain_der: Vec::new(),
        chain_pem: Vec::new(),
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// `n` distinct SHA-256 hashes, of "document 0", "document 1", ...
fn documents(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| Sha256::digest(format!("document {i}")).to_vec())
        .collect()
}

fn new_batch(account: &str, hashes: Vec<Vec<u8>>) -> NewRequest {
    NewRequest {
        service: ServiceName::parse(SERVICE).unwrap(),
        taid: format!("taid-{account}"),
        hash_algorithm: HashAlgorithm::Sha256,
        hash: Vec::new(),
        hashes: Some(hashes),
        hkic: None,
        description: Some("three contracts".into()),
    }
}

async fn batch(ports: &Memory, account: &str, hashes: Vec<Vec<u8>>) -> SigningRequest {
    signing::create(
        ports,
        &settings(),
        "service:demo",
        new_batch(account, hashes),
        now(),
    )
    .await
    .unwrap()
}

/// Sends the device's signature over `statement` as its decision on `request`.
async fn send(
    ports: &Memory,
    request: &SigningRequest,
    device: &Device,
    decision: Decision,
    statement: &str,
    at: OffsetDateTime,
) -> Result<Authorised, AppError> {
    signing::authorise(
        ports,
        &settings(),
        "gateway:app",
        &request.id,
        decision,
        &device.sign(statement),
        at,
    )
    .await
}

async fn approve(
    ports: &Memory,
    request: &SigningRequest,
    device: &Device,
) -> Result<Authorised, AppError> {
    let statement = request.authorisation_statement(Decision::Approve);
    send(ports, request, device, Decision::Approve, &statement, now()).await
}

fn stored(ports: &Memory, request: &SigningRequest) -> SigningRequest {
    ports.store.get_request(&request.id).unwrap().unwrap()
}

fn records(ports: &Memory, event: &str) -> Vec<serde_json::Map<String, Value>> {
    ports
        .audit
        .records
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| name == event)
        .map(|(_, fields)| fields.clone())
        .collect()
}

fn hex_list(hashes: &[Vec<u8>]) -> Value {
    hashes.iter().map(hex::encode).collect()
}

#[tokio::test]
async fn a_batch_is_signed_in_one_job_and_each_result_is_for_its_own_hash() {
    let ports = Memory::new();
    let device = Device::new(1);
    support::account(&ports, "u-batch", &device, now());
    let hashes = documents(3);
    let request = batch(&ports, "u-batch", hashes.clone()).await;
    assert!(request.is_batch());
    let checks_at_creation = ports.ca.checks.load(Ordering::SeqCst);
    assert_eq!(
        approve(&ports, &request, &device).await.unwrap(),
        Authorised::Signed
    );
    // One HSM job for the three hashes (and their three CMS signatures), and one status check
    // for the batch before it.
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 1);
    assert_eq!(ports.keys.hashes_signed.load(Ordering::SeqCst), 3);
    assert_eq!(
        ports.ca.checks.load(Ordering::SeqCst),
        checks_at_creation + 1
    );

    let view = signing::view(
        &ports,
        &ServiceName::parse(SERVICE).unwrap(),
        &request.id,
        now(),
    )
    .await
    .unwrap();
    assert_eq!(view.status, SigningStatus::Signed);
    let results = view.result.unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (result, hash) in results.iter().zip(&hashes) {
        assert_eq!(result["signature_algorithm"], "ecdsa_p256_sha256");
        let key = certificate_key(result["certificate"].as_str().unwrap());
        let signature = STANDARD
            .decode(result["signature"].as_str().unwrap())
            .unwrap();
        let signature = p256::ecdsa::Signature::from_der(&signature).unwrap();
        // Its own hash, and no other of the batch.
        key.verify_prehash(hash, &signature).unwrap();
        for other in hashes.iter().filter(|other| *other != hash) {
            assert!(key.verify_prehash(other, &signature).is_err());
        }
        assert!(!result["cms"].as_str().unwrap().is_empty());
    }

    // The records list the hashes, in order; the approval's before the signature's.
    let events: Vec<String> = ports
        .audit
        .records
        .lock()
        .unwrap()
        .iter()
        .map(|(event, _)| event.clone())
        .collect();
    assert_eq!(
        events,
        ["signing.requested", "signing.approved", "signing.signed"]
    );
    for event in ["signing.requested", "signing.approved", "signing.signed"] {
        let record = &records(&ports, event)[0];
        assert_eq!(record["hashes"], hex_list(&hashes), "{event}");
        assert_eq!(record["batch_size"], 3, "{event}");
    }
    let signed = &records(&ports, "signing.signed")[0];
    assert_eq!(
        signed["hash"],
        hex::encode(request.batch_digest().unwrap()),
        "the batch's digest, as the statement names it"
    );
    assert_eq!(signed["signatures_sha256"].as_array().unwrap().len(), 3);
    assert!(signed.get("signature_sha256").is_none());
}

/// The certificate's public key (P-256) from its PEM.
fn certificate_key(pem: &str) -> p256::ecdsa::VerifyingKey {
    use x509_cert::der::Decode;
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(body).unwrap();
    let certificate = x509_cert::Certificate::from_der(&der).unwrap();
    p256::ecdsa::VerifyingKey::from_sec1_bytes(
        certificate
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_statement_over_another_list_is_a_bad_authorisation_and_three_lock_the_batch() {
    let ports = Memory::new();
    let device = Device::new(2);
    support::account(&ports, "u-lists", &device, now());
    let hashes = documents(3);
    let request = batch(&ports, "u-lists", hashes.clone()).await;
    let statement_over = |list: Vec<Vec<u8>>| {
        let mut other = request.clone();
        other.hashes = Some(list);
        other.authorisation_statement(Decision::Approve)
    };
    // The single-hash statement, over the batch's first hash.
    let mut single = request.clone();
    single.hashes = None;
    single.hash = hashes[0].clone();
    let single = single.authorisation_statement(Decision::Approve);
    assert!(single.starts_with("smartsign-authorise-v1\n"));
    let reordered = statement_over(vec![
        hashes[1].clone(),
        hashes[0].clone(),
        hashes[2].clone(),
    ]);
    let mut changed = hashes.clone();
    changed[2][0] ^= 1;
    let changed = statement_over(changed);

    for (attempt, statement) in [single, reordered, changed].iter().enumerate() {
        let outcome = send(
            &ports,
            &request,
            &device,
            Decision::Approve,
            statement,
            now(),
        )
        .await;
        if attempt < 2 {
            assert!(
                matches!(outcome, Err(AppError::AuthorisationInvalid)),
                "{outcome:?}"
            );
            assert_eq!(stored(&ports, &request).bad_attempts, attempt as u8 + 1);
        } else {
            assert!(
                matches!(outcome, Err(AppError::TooManyAttempts)),
                "{outcome:?}"
            );
        }
    }
    assert_eq!(stored(&ports, &request).status, SigningStatus::Locked);
    // Locked: even the right statement is refused now, and nothing was ever signed.
    let right = approve(&ports, &request, &device).await;
    assert!(
        matches!(right, Err(AppError::RequestNotPending("locked"))),
        "{right:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);

    // The count is checked too (the right digest, another count), on a batch of its own.
    let request = batch(&ports, "u-lists", documents(2)).await;
    let statement = request
        .authorisation_statement(Decision::Approve)
        .replace("\nsha256\n2\n", "\nsha256\n3\n");
    let outcome = send(
        &ports,
        &request,
        &device,
        Decision::Approve,
        &statement,
        now(),
    )
    .await;
    assert!(
        matches!(outcome, Err(AppError::AuthorisationInvalid)),
        "{outcome:?}"
    );
    assert_eq!(stored(&ports, &request).bad_attempts, 1);
    assert_eq!(
        approve(&ports, &request, &device).await.unwrap(),
        Authorised::Signed
    );
}

#[tokio::test]
async fn a_batch_is_single_use_and_expires() {
    let ports = Memory::new();
    let device = Device::new(3);
    support::account(&ports, "u-once", &device, now());
    let request = batch(&ports, "u-once", documents(2)).await;
    approve(&ports, &request, &device).await.unwrap();
    let again = approve(&ports, &request, &device).await;
    assert!(
        matches!(again, Err(AppError::RequestNotPending("signed"))),
        "{again:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 1);

    let request = batch(&ports, "u-once", documents(2)).await;
    let statement = request.authorisation_statement(Decision::Approve);
    let late = send(
        &ports,
        &request,
        &device,
        Decision::Approve,
        &statement,
        request.expires_at,
    )
    .await;
    assert!(matches!(late, Err(AppError::RequestExpired)), "{late:?}");
    assert_eq!(stored(&ports, &request).status, SigningStatus::Expired);
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 1);

    // A rejection ends a batch as a whole.
    let request = batch(&ports, "u-once", documents(2)).await;
    let statement = request.authorisation_statement(Decision::Reject);
    assert_eq!(
        send(
            &ports,
            &request,
            &device,
            Decision::Reject,
            &statement,
            now()
        )
        .await
        .unwrap(),
        Authorised::Rejected
    );
    assert_eq!(stored(&ports, &request).status, SigningStatus::Rejected);
}

#[tokio::test]
async fn a_batch_takes_one_place_among_the_pending_requests() {
    let ports = Memory::new();
    let device = Device::new(4);
    support::account(&ports, "u-cap", &device, now());
    batch(&ports, "u-cap", documents(20)).await;
    for i in 0..4 {
        let mut single = new_batch("u-cap", Vec::new());
        single.hashes = None;
        single.hash = Sha256::digest(format!("single {i}")).to_vec();
        signing::create(&ports, &settings(), "service:demo", single, now())
            .await
            .unwrap();
    }
    let sixth = signing::create(
        &ports,
        &settings(),
        "service:demo",
        new_batch("u-cap", documents(1)),
        now(),
    )
    .await;
    assert!(matches!(sixth, Err(AppError::TooManyPending)), "{sixth:?}");
    let pending = signing::pending(&ports, &AccountId::parse("u-cap").unwrap(), now())
        .await
        .unwrap();
    assert_eq!(pending.len(), 5);
    assert_eq!(pending[0].hashes.as_ref().unwrap().len(), 20);
}

#[tokio::test]
async fn a_batch_of_the_wrong_shape_is_refused_and_nothing_is_kept() {
    let ports = Memory::new();
    let device = Device::new(5);
    support::account(&ports, "u-shape", &device, now());
    let settings = settings();
    let create = |new: NewRequest| signing::create(&ports, &settings, "service:demo", new, now());

    let too_many = create(new_batch("u-shape", documents(21))).await;
    assert!(
        matches!(&too_many, Err(AppError::InvalidRequest(detail)) if detail.contains("hashes")),
        "{too_many:?}"
    );
    let none = create(new_batch("u-shape", Vec::new())).await;
    assert!(matches!(none, Err(AppError::InvalidRequest(_))), "{none:?}");
    let mut mixed = documents(3);
    mixed[1] = vec![0x51; 64]; // a SHA-512 hash's length among SHA-256 ones
    let mixed = create(new_batch("u-shape", mixed)).await;
    assert!(
        matches!(&mixed, Err(AppError::InvalidHash(detail)) if detail.contains("hashes[1]")),
        "{mixed:?}"
    );
    let mut both = new_batch("u-shape", documents(2));
    both.hash = documents(1).remove(0);
    let both = create(both).await;
    assert!(matches!(both, Err(AppError::InvalidRequest(_))), "{both:?}");
    // All of one algorithm: sha384 hashes under sha256 are the wrong length.
    let mut wrong = new_batch("u-shape", vec![vec![7; 48]; 2]);
    wrong.hash_algorithm = HashAlgorithm::Sha256;
    assert!(matches!(create(wrong).await, Err(AppError::InvalidHash(_))));
    // The most there may be, of sha512.
    let mut longest = new_batch("u-shape", vec![vec![9; 64]; 20]);
    longest.hash_algorithm = HashAlgorithm::Sha512;
    create(longest).await.unwrap();

    let pending = signing::pending(&ports, &AccountId::parse("u-shape").unwrap(), now())
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "only the well-formed batch is kept");
    assert_eq!(records(&ports, "signing.create_denied").len(), 5);
}

#[tokio::test]
async fn no_batch_signature_is_made_or_released_without_its_durable_records() {
    let ports = Memory::new();
    let device = Device::new(6);
    support::account(&ports, "u-closed", &device, now());
    // The approval's record cannot be written: the HSM is never asked.
    let request = batch(&ports, "u-closed", documents(3)).await;
    *ports.audit.failing.lock().unwrap() = Some("signing.approved");
    let outcome = approve(&ports, &request, &device).await;
    assert!(
        matches!(outcome, Err(AppError::AuditUnavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    assert_eq!(stored(&ports, &request).status, SigningStatus::Failed);

    // The signatures' record cannot be written: they are dropped, the batch fails.
    let request = batch(&ports, "u-closed", documents(3)).await;
    *ports.audit.failing.lock().unwrap() = Some("signing.signed");
    let outcome = approve(&ports, &request, &device).await;
    assert!(
        matches!(outcome, Err(AppError::AuditUnavailable(_))),
        "{outcome:?}"
    );
    let kept = stored(&ports, &request);
    assert_eq!(kept.status, SigningStatus::Failed);
    assert!(kept.sealed_result.is_none());
    *ports.audit.failing.lock().unwrap() = None;
    let again = approve(&ports, &request, &device).await;
    assert!(matches!(again, Err(AppError::RequestNotPending("failed"))));
}

#[tokio::test]
async fn a_crash_between_the_signed_record_and_the_stored_results_fails_the_batch() {
    let ports = Arc::new(Memory::new());
    let device = Arc::new(Device::new(7));
    support::account(&ports, "u-crash", &device, now());
    let request = batch(&ports, "u-crash", documents(3)).await;
    *ports.audit.crash_at.lock().unwrap() = Some("signing-after-signed-record");
    let died = {
        let (ports, device, request) = (ports.clone(), device.clone(), request.clone());
        tokio::spawn(async move { approve(&ports, &request, &device).await })
            .await
            .is_err()
    };
    *ports.audit.crash_at.lock().unwrap() = None;
    assert!(died, "the task reached the step");
    assert_eq!(records(&ports, "signing.signed").len(), 1);
    assert_eq!(stored(&ports, &request).status, SigningStatus::Approved);
    assert_eq!(
        signing::recover(&*ports, now(), Stranded::All)
            .await
            .unwrap(),
        1
    );
    let failed = stored(&ports, &request);
    assert_eq!(failed.status, SigningStatus::Failed);
    assert!(failed.sealed_result.is_none(), "no result was ever stored");
    let view = signing::view(
        &*ports,
        &ServiceName::parse(SERVICE).unwrap(),
        &request.id,
        now(),
    )
    .await
    .unwrap();
    assert!(view.result.is_none());
    let again = approve(&ports, &request, &device).await;
    assert!(matches!(again, Err(AppError::RequestNotPending("failed"))));
}

#[tokio::test]
async fn a_revoked_certificate_refuses_the_batch() {
    let ports = Memory::new();
    let device = Device::new(8);
    let record = support::account(&ports, "u-revoked", &device, now());
    let request = batch(&ports, "u-revoked", documents(3)).await;
    application::accounts::revoke_certificate(
        &ports,
        "officer:sec",
        &record.id,
        RevocationReason::KeyCompromise,
        now(),
    )
    .await
    .unwrap();
    let outcome = approve(&ports, &request, &device).await;
    assert!(
        matches!(outcome, Err(AppError::CertificateRevoked)),
        "{outcome:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    assert_eq!(stored(&ports, &request).status, SigningStatus::Failed);
    let refused = signing::create(
        &ports,
        &settings(),
        "service:demo",
        new_batch("u-revoked", documents(2)),
        now(),
    )
    .await;
    assert!(
        matches!(refused, Err(AppError::CertificateRevoked)),
        "{refused:?}"
    );
}
