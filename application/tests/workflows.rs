//! The workflows, driven directly over in-memory ports (`support`): fast, and each race run
//! many rounds. The black-box tests in `tests/` run the same rules through the daemon, SoftHSM
//! and the embedded CA.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;

use application::accounts::{self, Change};
use application::signing::{self, Authorised, NewRequest, SigningSettings};
use application::{AppError, Stranded};
use cert_lifecycle::{
    AccountId, AccountStatus, Decision, HashAlgorithm, RequestId, ServiceName, SigningRequest,
    SigningStatus, Store, SuspendedBy,
};
use sha2::{Digest, Sha256};
use support::{Device, Memory, SERVICE};
use time::OffsetDateTime;

const ROUNDS: usize = 50;

/// The renewal window the sweeps tell users about: a month before a year's certificate ends.
const SWEEP_WINDOW: time::Duration = time::Duration::days(30);

fn settings() -> SigningSettings {
    SigningSettings {
        request_ttl: time::Duration::minutes(5),
        max_batch: 20,
        max_pending: 5,
        chain_der: Vec::new(),
        chain_pem: Vec::new(),
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

async fn request(ports: &Memory, account: &str) -> SigningRequest {
    let new = NewRequest {
        service: ServiceName::parse(SERVICE).unwrap(),
        taid: format!("taid-{account}"),
        hash_algorithm: HashAlgorithm::Sha256,
        hash: Sha256::digest(account.as_bytes()).to_vec(),
        hashes: None,
        hkic: None,
        description: Some("a test document".into()),
    };
    signing::create(ports, &settings(), "service:demo", new, now())
        .await
        .unwrap()
}

async fn authorise(
    ports: &Memory,
    request: &SigningRequest,
    device: &Device,
    decision: Decision,
) -> Result<Authorised, AppError> {
    let signature = device.sign(&request.authorisation_statement(decision));
    signing::authorise(
        ports,
        &settings(),
        "gateway:app",
        &request.id,
        decision,
        &signature,
        now(),
    )
    .await
}

fn stored(ports: &Memory, id: &RequestId) -> SigningRequest {
    ports.store.get_request(id).unwrap().unwrap()
}

fn account_of(ports: &Memory, id: &str) -> cert_lifecycle::AccountRecord {
    ports
        .store
        .get_account(&AccountId::parse(id).unwrap())
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn an_approval_signs_once_and_the_signature_verifies() {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    let ports = Memory::new();
    let device = Device::new(1);
    support::account(&ports, "u-sign", &device, now());
    let request = request(&ports, "u-sign").await;
    assert_eq!(
        authorise(&ports, &request, &device, Decision::Approve)
            .await
            .unwrap(),
        Authorised::Signed
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
    let result = view.result.unwrap();
    assert_eq!(result["signature_algorithm"], "ecdsa_p256_sha256");

    // The raw signature is the certificate key's, over the request's hash.
    use base64::Engine;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(result["signature"].as_str().unwrap())
        .unwrap();
    let certificate = result["certificate"].as_str().unwrap();
    let der = pem_body(certificate);
    use x509_cert::der::Decode;
    let certificate = x509_cert::Certificate::from_der(&der).unwrap();
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
        certificate
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
    )
    .unwrap();
    let signature = p256::ecdsa::Signature::from_der(&signature).unwrap();
    key.verify_prehash(&request.hash, &signature).unwrap();

    // The audit trail: requested, approved, signed, in that order, once each.
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

    // The same approval again: not pending any more, and nothing signed.
    let again = authorise(&ports, &request, &device, Decision::Approve).await;
    assert!(matches!(again, Err(AppError::RequestNotPending("signed"))));
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 1);
}

fn pem_body(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_authorisations_of_one_request_sign_once() {
    let ports = std::sync::Arc::new(Memory::new());
    let device = std::sync::Arc::new(Device::new(2));
    support::account(&ports, "u-twice", &device, now());
    for round in 0..ROUNDS {
        let request = request(&ports, "u-twice").await;
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let (ports, device, request) = (ports.clone(), device.clone(), request.clone());
                tokio::spawn(async move {
                    authorise(&ports, &request, &device, Decision::Approve).await
                })
            })
            .collect();
        let mut signed = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(Authorised::Signed) => signed += 1,
                Err(AppError::RequestNotPending(_)) => {}
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(signed, 1, "round {round}: exactly one authorisation signs");
        assert_eq!(
            ports.audit.count("signing.signed", request.id.as_str()),
            1,
            "round {round}: one signature audited"
        );
        assert_eq!(stored(&ports, &request.id).status, SigningStatus::Signed);
    }
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), ROUNDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_while_the_ca_answers_slowly_stops_the_signature() {
    let ports = std::sync::Arc::new(Memory::new());
    let device = std::sync::Arc::new(Device::new(3));
    support::account(&ports, "u-slow", &device, now());
    let request = request(&ports, "u-slow").await;
    ports.ca.slow.store(true, Ordering::SeqCst);
    let authorising = {
        let (ports, device, request) = (ports.clone(), device.clone(), request.clone());
        tokio::spawn(async move { authorise(&ports, &request, &device, Decision::Approve).await })
    };
    // The authorisation is waiting for the CA's status answer: suspend now.
    ports.ca.waiting.notified().await;
    let id = AccountId::parse("u-slow").unwrap();
    accounts::change(
        &*ports,
        "registrar:reg",
        &id,
        Change::Suspend(SuspendedBy::Government),
        now(),
    )
    .await
    .unwrap();
    ports.ca.slow.store(false, Ordering::SeqCst);
    ports.ca.release.notify_one();
    let outcome = authorising.await.unwrap();
    assert!(
        matches!(outcome, Err(AppError::AccountNotActive("suspended"))),
        "{outcome:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    assert_eq!(stored(&ports, &request.id).status, SigningStatus::Failed);
    assert_eq!(ports.audit.count("signing.signed", request.id.as_str()), 0);
}

#[tokio::test]
async fn a_request_made_before_a_device_switch_is_not_the_new_devices_to_approve() {
    let ports = Memory::new();
    let (old, new) = (Device::new(4), Device::new(5));
    support::account(&ports, "u-switch", &old, now());
    let request = request(&ports, "u-switch").await;
    let id = AccountId::parse("u-switch").unwrap();
    accounts::change(
        &ports,
        "registrar:reg",
        &id,
        Change::SwitchDevice(new.spki()),
        now(),
    )
    .await
    .unwrap();
    for device in [&old, &new] {
        let outcome = authorise(&ports, &request, device, Decision::Approve).await;
        assert!(
            matches!(outcome, Err(AppError::AuthorisationInvalid)),
            "{outcome:?}"
        );
    }
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    assert_eq!(stored(&ports, &request.id).bad_attempts, 2);
}

#[tokio::test]
async fn no_signature_leaves_without_its_durable_audit_record() {
    let ports = Memory::new();
    let device = Device::new(6);
    support::account(&ports, "u-audit", &device, now());
    let request = request(&ports, "u-audit").await;
    *ports.audit.failing.lock().unwrap() = Some("signing.signed");
    let outcome = authorise(&ports, &request, &device, Decision::Approve).await;
    assert!(
        matches!(outcome, Err(AppError::AuditUnavailable(_))),
        "{outcome:?}"
    );
    let stored = stored(&ports, &request.id);
    assert_eq!(stored.status, SigningStatus::Failed);
    assert!(stored.sealed_result.is_none(), "no result is kept");
    // Not releasable later either.
    *ports.audit.failing.lock().unwrap() = None;
    let again = authorise(&ports, &request, &device, Decision::Approve).await;
    assert!(matches!(again, Err(AppError::RequestNotPending("failed"))));
}

#[tokio::test]
async fn recovery_fails_a_request_left_approved_and_it_never_signs_again() {
    let ports = Memory::new();
    let device = Device::new(7);
    support::account(&ports, "u-crash", &device, now());
    let request = request(&ports, "u-crash").await;
    // A crash between the approval and the signed state: the request is left approved.
    let mut approved = request.clone();
    approved.status = SigningStatus::Approved;
    ports
        .store
        .transition_request(&approved, (SigningStatus::Pending, 0), now())
        .unwrap();
    // With several nodes, a request whose signing may still run on another node is left
    // alone: it was approved before it expired, which is not long enough ago.
    let cutoff = now() - time::Duration::minutes(10);
    assert_eq!(
        signing::recover(&ports, now(), Stranded::StartedBefore(cutoff))
            .await
            .unwrap(),
        0
    );
    assert_eq!(stored(&ports, &request.id).status, SigningStatus::Approved);
    // Once it expired long enough ago, it is stranded on any node.
    let later = request.expires_at + time::Duration::minutes(11);
    let cutoff = later - time::Duration::minutes(10);
    assert_eq!(
        signing::recover(&ports, later, Stranded::StartedBefore(cutoff))
            .await
            .unwrap(),
        1
    );
    assert_eq!(stored(&ports, &request.id).status, SigningStatus::Failed);
    assert_eq!(ports.audit.count("signing.failed", request.id.as_str()), 1);
    let again = authorise(&ports, &request, &device, Decision::Approve).await;
    assert!(matches!(again, Err(AppError::RequestNotPending("failed"))));
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    // A second recovery finds nothing.
    assert_eq!(
        signing::recover(&ports, now(), Stranded::All)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn refusals_are_audited_and_change_nothing() {
    let ports = Memory::new();
    let device = Device::new(8);
    support::account(&ports, "u-refuse", &device, now());
    let mut new = NewRequest {
        service: ServiceName::parse(SERVICE).unwrap(),
        taid: "taid-u-refuse".into(),
        hash_algorithm: HashAlgorithm::Sha384,
        hash: vec![0; 32],
        hashes: None,
        hkic: None,
        description: None,
    };
    let outcome = signing::create(&ports, &settings(), "service:demo", new, now()).await;
    assert!(
        matches!(outcome, Err(AppError::InvalidHash(_))),
        "{outcome:?}"
    );
    new = NewRequest {
        service: ServiceName::parse("other-service").unwrap(),
        taid: "taid-u-refuse".into(),
        hash_algorithm: HashAlgorithm::Sha256,
        hash: vec![0; 32],
        hashes: None,
        hkic: None,
        description: None,
    };
    // A TAID is the account's name at one service only.
    let outcome = signing::create(&ports, &settings(), "service:other", new, now()).await;
    assert!(matches!(outcome, Err(AppError::NotFound(_))), "{outcome:?}");
    let records = ports.audit.records.lock().unwrap();
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|(event, _)| event == "signing.create_denied")
    );
    assert_eq!(records[0].1["code"], "invalid_hash");
    assert_eq!(records[1].1["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspension_and_a_device_switch_at_once_both_stay() {
    let ports = std::sync::Arc::new(Memory::new());
    let device = Device::new(9);
    support::account(&ports, "u-race", &device, now());
    let id = AccountId::parse("u-race").unwrap();
    for round in 0..ROUNDS {
        let before = account_of(&ports, "u-race");
        let new_device = Device::new(100 + (round % 100) as u8);
        let suspend = {
            let (ports, id) = (ports.clone(), id.clone());
            tokio::spawn(async move {
                accounts::change(
                    &*ports,
                    "registrar:reg",
                    &id,
                    Change::Suspend(SuspendedBy::User),
                    now(),
                )
                .await
            })
        };
        let switch = {
            let (ports, id, spki) = (ports.clone(), id.clone(), new_device.spki());
            tokio::spawn(async move {
                accounts::change(
                    &*ports,
                    "registrar:reg",
                    &id,
                    Change::SwitchDevice(spki),
                    now(),
                )
                .await
            })
        };
        suspend.await.unwrap().unwrap();
        switch.await.unwrap().unwrap();
        let after = account_of(&ports, "u-race");
        assert_eq!(after.status, AccountStatus::Suspended, "round {round}");
        assert_eq!(
            after.device_generation,
            before.device_generation + 1,
            "round {round}"
        );
        assert_eq!(after.device_public_key, new_device.spki(), "round {round}");
        accounts::change(
            &*ports,
            "registrar:reg",
            &id,
            Change::Resume(SuspendedBy::User),
            now(),
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn only_the_party_that_suspended_may_resume() {
    let ports = Memory::new();
    let device = Device::new(10);
    support::account(&ports, "u-resume", &device, now());
    let id = AccountId::parse("u-resume").unwrap();
    let change = |change| accounts::change(&ports, "registrar:reg", &id, change, now());
    change(Change::Suspend(SuspendedBy::Government))
        .await
        .unwrap();
    let outcome = change(Change::Resume(SuspendedBy::User)).await;
    assert!(
        matches!(outcome, Err(AppError::AccountNotActive("suspended"))),
        "{outcome:?}"
    );
    let version = account_of(&ports, "u-resume").version;
    assert_eq!(
        change(Change::Resume(SuspendedBy::Government))
            .await
            .unwrap()
            .status,
        AccountStatus::Active
    );
    assert_eq!(account_of(&ports, "u-resume").version, version + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_switch_racing_a_deregistration_does_not_bring_the_account_back() {
    let ports = std::sync::Arc::new(Memory::new());
    for round in 0..ROUNDS {
        let name = format!("u-dereg-{round}");
        let device = Device::new(11);
        let record = support::account(&ports, &name, &device, now());
        let serial = record.current_certificate.clone().unwrap();
        let id = record.id.clone();
        let deregister = {
            let (ports, id) = (ports.clone(), id.clone());
            tokio::spawn(
                async move { accounts::deregister(&*ports, "registrar:reg", &id, now()).await },
            )
        };
        let switch = {
            let (ports, id, spki) = (ports.clone(), id.clone(), Device::new(12).spki());
            tokio::spawn(async move {
                accounts::change(
                    &*ports,
                    "registrar:reg",
                    &id,
                    Change::SwitchDevice(spki),
                    now(),
                )
                .await
            })
        };
        deregister.await.unwrap().unwrap();
        match switch.await.unwrap() {
            Ok(_) | Err(AppError::AccountNotActive("deregistered")) => {}
            Err(other) => panic!("round {round}: {other:?}"),
        }
        let after = account_of(&ports, &name);
        assert_eq!(after.status, AccountStatus::Deregistered, "round {round}");
        assert!(after.sealed_name.is_empty() && after.sealed_dob.is_empty());
        assert_eq!(after.hkic_hash, [0; 32], "round {round}");
        let certificate = ports.store.get_certificate(&serial).unwrap().unwrap();
        assert!(certificate.sealed_der.is_empty(), "round {round}");
        assert!(
            certificate.key_ref.is_none(),
            "round {round}: key destroyed"
        );
        assert!(
            ports
                .ca
                .revoked
                .lock()
                .unwrap()
                .contains_key(serial.as_str()),
            "round {round}: revoked at the CA"
        );
    }
}

#[tokio::test]
async fn an_invalidated_account_cannot_sign_and_its_key_is_gone() {
    let ports = Memory::new();
    let device = Device::new(13);
    let record = support::account(&ports, "u-invalid", &device, now());
    let request = request(&ports, "u-invalid").await;
    let invalidated = accounts::invalidate(&ports, "registrar:reg", &record.id, now())
        .await
        .unwrap();
    assert_eq!(invalidated.status, AccountStatus::Invalidated);
    let serial = record.current_certificate.unwrap();
    assert_eq!(
        ports.ca.revoked.lock().unwrap().get(serial.as_str()),
        Some(&cert_lifecycle::RevocationReason::PrivilegeWithdrawn)
    );
    let outcome = authorise(&ports, &request, &device, Decision::Approve).await;
    assert!(
        matches!(outcome, Err(AppError::AccountNotActive("invalidated"))),
        "{outcome:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    // Invalidating twice is refused and changes nothing.
    let again = accounts::invalidate(&ports, "registrar:reg", &record.id, now()).await;
    assert!(matches!(
        again,
        Err(AppError::AccountNotActive("invalidated"))
    ));
}

#[tokio::test]
async fn an_account_change_keeps_its_audit_record_when_the_log_cannot_take_it() {
    let ports = Memory::new();
    let device = Device::new(14);
    let record = support::account(&ports, "u-outbox", &device, now());
    // The audit log is down: the suspension is stored with its audit record in the outbox.
    *ports.audit.failing.lock().unwrap() = Some("account.suspended");
    let suspended = accounts::change(
        &ports,
        "registrar:reg",
        &record.id,
        Change::Suspend(SuspendedBy::User),
        now(),
    )
    .await
    .unwrap();
    assert_eq!(suspended.status, AccountStatus::Suspended);
    assert_eq!(ports.audit.count("account.suspended", "u-outbox"), 0);
    assert_eq!(ports.store.pending_audits().unwrap().len(), 1);
    // Back up: the next sweep (or start) delivers it, once.
    *ports.audit.failing.lock().unwrap() = None;
    let changes = application::sweeps::run(&ports, SWEEP_WINDOW, "system:sweep", now())
        .await
        .unwrap();
    assert_eq!(changes.audits_delivered, 1);
    assert_eq!(ports.audit.count("account.suspended", "u-outbox"), 1);
    assert!(ports.store.pending_audits().unwrap().is_empty());
    let records = ports.audit.records.lock().unwrap();
    let (_, fields) = records
        .iter()
        .find(|(event, _)| event == "account.suspended")
        .unwrap();
    assert_eq!(fields["by"], "user");
    assert!(fields["outbox"].is_i64(), "{fields:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_the_ca_answers_slowly_stops_the_signature() {
    let ports = std::sync::Arc::new(Memory::new());
    let device = std::sync::Arc::new(Device::new(15));
    let record = support::account(&ports, "u-revoked", &device, now());
    let request = request(&ports, "u-revoked").await;
    // The CA's answer is "good", given before the revocation, and arrives late.
    ports.ca.slow.store(true, Ordering::SeqCst);
    let authorising = {
        let (ports, device, request) = (ports.clone(), device.clone(), request.clone());
        tokio::spawn(async move { authorise(&ports, &request, &device, Decision::Approve).await })
    };
    ports.ca.waiting.notified().await;
    ports.ca.slow.store(false, Ordering::SeqCst);
    accounts::revoke_certificate(
        &*ports,
        "officer:sec",
        &record.id,
        cert_lifecycle::RevocationReason::KeyCompromise,
        now(),
    )
    .await
    .unwrap();
    ports.ca.release.notify_one();
    let outcome = authorising.await.unwrap();
    assert!(
        matches!(outcome, Err(AppError::CertificateRevoked)),
        "{outcome:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    assert_eq!(stored(&ports, &request.id).status, SigningStatus::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_while_the_hsm_signs_releases_nothing_and_keeps_nothing() {
    let ports = std::sync::Arc::new(Memory::new());
    let device = std::sync::Arc::new(Device::new(16));
    let record = support::account(&ports, "u-gone", &device, now());
    let request = request(&ports, "u-gone").await;
    // The CA cannot take the revocation: the key stays until a sweep, and the HSM's signature
    // is made. The store must still refuse to keep or release it.
    ports.ca.revocations_down.store(true, Ordering::SeqCst);
    ports.keys.hold_next_sign.store(true, Ordering::SeqCst);
    let authorising = {
        let (ports, device, request) = (ports.clone(), device.clone(), request.clone());
        tokio::spawn(async move { authorise(&ports, &request, &device, Decision::Approve).await })
    };
    ports.keys.signing.notified().await;
    accounts::deregister(&*ports, "registrar:reg", &record.id, now())
        .await
        .unwrap();
    ports.keys.release_sign.notify_one();
    let outcome = authorising.await.unwrap();
    assert!(
        matches!(outcome, Err(AppError::RequestNotPending("failed"))),
        "{outcome:?}"
    );
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 1);
    let stored = stored(&ports, &request.id);
    assert_eq!(stored.status, SigningStatus::Failed);
    assert!(stored.sealed_result.is_none(), "no result kept");
    assert!(stored.hash.is_empty() && stored.description.is_none());
    let view = signing::view(
        &*ports,
        &ServiceName::parse(SERVICE).unwrap(),
        &request.id,
        now(),
    )
    .await
    .unwrap();
    assert!(view.result.is_none(), "nothing released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_made_while_the_account_is_deregistered_keeps_nothing() {
    let ports = std::sync::Arc::new(Memory::new());
    let device = Device::new(17);
    let record = support::account(&ports, "u-late", &device, now());
    ports.ca.slow.store(true, Ordering::SeqCst);
    let creating = {
        let ports = ports.clone();
        tokio::spawn(async move {
            let new = NewRequest {
                service: ServiceName::parse(SERVICE).unwrap(),
                taid: "taid-u-late".into(),
                hash_algorithm: HashAlgorithm::Sha256,
                hash: vec![9; 32],
                hashes: None,
                hkic: None,
                description: Some("PERSONAL-DESCRIPTION".into()),
            };
            signing::create(&*ports, &settings(), "service:demo", new, now()).await
        })
    };
    ports.ca.waiting.notified().await;
    ports.ca.slow.store(false, Ordering::SeqCst);
    accounts::deregister(&*ports, "registrar:reg", &record.id, now())
        .await
        .unwrap();
    ports.ca.release.notify_one();
    let outcome = creating.await.unwrap();
    assert!(
        matches!(outcome, Err(AppError::AccountNotActive("deregistered"))),
        "{outcome:?}"
    );
    let history = signing::history(&*ports, &record.id, None, 10, now())
        .await
        .unwrap();
    assert!(history.requests.is_empty(), "no request kept");
}

#[tokio::test]
async fn a_deregistration_while_the_ca_is_down_finishes_at_the_next_sweep() {
    let ports = Memory::new();
    let device = Device::new(18);
    let record = support::account(&ports, "u-ca-down", &device, now());
    let serial = record.current_certificate.clone().unwrap();
    ports.ca.revocations_down.store(true, Ordering::SeqCst);
    accounts::deregister(&ports, "registrar:reg", &record.id, now())
        .await
        .unwrap();
    // Deregistered and erased, but the certificate keeps its key and sealed DER until the
    // revocation reaches the CA: it is revoked locally, so it signs nothing meanwhile.
    let certificate = ports.store.get_certificate(&serial).unwrap().unwrap();
    assert_eq!(certificate.status, cert_lifecycle::CertStatus::Revoked);
    assert!(certificate.key_ref.is_some() && !certificate.sealed_der.is_empty());
    assert!(
        !ports
            .ca
            .revoked
            .lock()
            .unwrap()
            .contains_key(serial.as_str())
    );
    // The CA is back: the next sweep revokes it there, destroys the key, erases the DER.
    ports.ca.revocations_down.store(false, Ordering::SeqCst);
    let changes = application::sweeps::run(&ports, SWEEP_WINDOW, "system:sweep", now())
        .await
        .unwrap();
    assert_eq!(changes.revocations_finished.len(), 1);
    assert!(
        ports
            .ca
            .revoked
            .lock()
            .unwrap()
            .contains_key(serial.as_str())
    );
    let certificate = ports.store.get_certificate(&serial).unwrap().unwrap();
    assert!(certificate.key_ref.is_none() && certificate.sealed_der.is_empty());
    assert_eq!(ports.keys.destroyed.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_account_takes_five_pending_requests_with_distinct_codes_and_no_more() {
    let ports = Memory::new();
    let device = Device::new(19);
    support::account(&ports, "u-flood", &device, now());
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(request(&ports, "u-flood").await.identification_code);
    }
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), 5, "distinct codes");
    let new = NewRequest {
        service: ServiceName::parse(SERVICE).unwrap(),
        taid: "taid-u-flood".into(),
        hash_algorithm: HashAlgorithm::Sha256,
        hash: vec![1; 32],
        hashes: None,
        hkic: None,
        description: None,
    };
    let refused = signing::create(&ports, &settings(), "service:demo", new, now()).await;
    assert!(
        matches!(refused, Err(AppError::TooManyPending)),
        "{refused:?}"
    );
    // Not audited one by one.
    assert_eq!(ports.audit.count("signing.create_denied", "u-flood"), 0);
    // Once they have expired, the account takes requests again.
    let later = now() + time::Duration::minutes(6);
    let new = NewRequest {
        service: ServiceName::parse(SERVICE).unwrap(),
        taid: "taid-u-flood".into(),
        hash_algorithm: HashAlgorithm::Sha256,
        hash: vec![1; 32],
        hashes: None,
        hkic: None,
        description: None,
    };
    signing::create(&ports, &settings(), "service:demo", new, later)
        .await
        .unwrap();
}

#[tokio::test]
async fn three_hkic_mismatches_in_a_day_lock_hkic_carrying_requests() {
    let ports = Memory::new();
    let device = Device::new(20);
    support::account(&ports, "u-oracle", &device, now());
    let with_hkic = |hkic: &str| NewRequest {
        service: ServiceName::parse(SERVICE).unwrap(),
        taid: "taid-u-oracle".into(),
        hash_algorithm: HashAlgorithm::Sha256,
        hash: vec![2; 32],
        hashes: None,
        hkic: Some(cert_lifecycle::HkicNumber::parse(hkic).unwrap()),
        description: None,
    };
    // The holder's number is the one whose keyed hash the account holds (the in-memory keys
    // hash the canonical form); the test account's hash is of its id, so any number mismatches.
    let start = now();
    for n in 0..3 {
        let at = start + time::Duration::minutes(n);
        let outcome = signing::create(
            &ports,
            &settings(),
            "service:demo",
            with_hkic("A123456(3)"),
            at,
        )
        .await;
        assert!(
            matches!(outcome, Err(AppError::HkicMismatch)),
            "{outcome:?}"
        );
    }
    assert_eq!(ports.audit.count("signing.hkic_locked", "u-oracle"), 1);
    // Locked: even a try is refused without comparing, and without an audit record each.
    let denied_before = ports.audit.count("signing.create_denied", "u-oracle");
    for n in 0..5 {
        let at = start + time::Duration::hours(1) + time::Duration::minutes(n);
        let outcome = signing::create(
            &ports,
            &settings(),
            "service:demo",
            with_hkic("A123456(3)"),
            at,
        )
        .await;
        assert!(
            matches!(outcome, Err(AppError::TooManyAttempts)),
            "{outcome:?}"
        );
    }
    assert_eq!(
        ports.audit.count("signing.create_denied", "u-oracle"),
        denied_before
    );
    // Requests without an HKIC number go on.
    let plain = NewRequest {
        hkic: None,
        ..with_hkic("A123456(3)")
    };
    signing::create(
        &ports,
        &settings(),
        "service:demo",
        plain,
        start + time::Duration::hours(1),
    )
    .await
    .unwrap();
    // A day after the first mismatch, the lock ends.
    let after = start + time::Duration::hours(24) + time::Duration::minutes(1);
    let outcome = signing::create(
        &ports,
        &settings(),
        "service:demo",
        with_hkic("A123456(3)"),
        after,
    )
    .await;
    assert!(
        matches!(outcome, Err(AppError::HkicMismatch)),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn an_approved_signature_waits_for_a_busy_hsm_and_signs() {
    let ports = Memory::new();
    let device = Device::new(41);
    support::account(&ports, "u-busy", &device, now());
    let request = request(&ports, "u-busy").await;
    // The HSM's queue is full for a while at each step of the signature: reading the
    // certificate, signing, sealing the result.
    ports.keys.busy_unseals.store(2, Ordering::SeqCst);
    ports.keys.busy_signs.store(5, Ordering::SeqCst);
    ports.keys.busy_seals.store(3, Ordering::SeqCst);
    assert_eq!(
        authorise(&ports, &request, &device, Decision::Approve)
            .await
            .unwrap(),
        Authorised::Signed
    );
    assert_eq!(stored(&ports, &request.id).status, SigningStatus::Signed);
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 1);
    let pauses = ports.keys.busy_pauses.lock().unwrap().clone();
    assert_eq!(pauses.len(), 2 + 5 + 3, "one pause per busy answer");
    // Growing pauses, within the bound.
    assert!(pauses[3] > pauses[2]);
    assert!(pauses.iter().sum::<std::time::Duration>() <= signing::HSM_BUSY_WAIT);
    assert_eq!(ports.audit.count("signing.failed", request.id.as_str()), 0);
    assert_eq!(ports.audit.count("signing.signed", request.id.as_str()), 1);
}

#[tokio::test]
async fn an_hsm_busy_past_the_wait_fails_the_request_once() {
    let ports = Memory::new();
    let device = Device::new(42);
    support::account(&ports, "u-busy-long", &device, now());
    let request = request(&ports, "u-busy-long").await;
    ports.keys.busy_signs.store(usize::MAX, Ordering::SeqCst);
    let error = authorise(&ports, &request, &device, Decision::Approve)
        .await
        .unwrap_err();
    assert!(matches!(error, AppError::HsmBusy(_)), "{error:?}");
    assert_eq!(error.code(), "hsm_unavailable");
    assert_eq!(stored(&ports, &request.id).status, SigningStatus::Failed);
    assert_eq!(ports.keys.signatures.load(Ordering::SeqCst), 0);
    let waited: std::time::Duration = ports.keys.busy_pauses.lock().unwrap().iter().sum();
    assert!(waited <= signing::HSM_BUSY_WAIT);
    assert!(
        waited >= signing::HSM_BUSY_WAIT / 2,
        "gave up early: {waited:?}"
    );
    assert_eq!(ports.audit.count("signing.failed", request.id.as_str()), 1);
}
