//! The embedded CA on a SoftHSM token, checked with openssl: the chain verifies, the extensions
//! of the profile are there, state survives a reopen, revocation is recorded.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ca_bridge::{
    CaError, CertificateState, DEFAULT_ADULT_POLICY_OID, DEFAULT_MINOR_POLICY_OID, IssueRequest,
    Profile,
};
use common::{
    CRL_URL, DAY, OCSP_URL, P256, assert_contains, ca_config, genkey, open_ca, request, spki_of,
    try_open_ca, verify_and_print, verify_with_ca, x509_text,
};

/// A subject public key made by openssl, as SPKI DER.
fn openssl_key(dir: &Path, algorithm: &[&str]) -> Vec<u8> {
    genkey(dir, "subject.key", algorithm);
    spki_of(dir, "subject.key")
}

/// [`common::request`] without a given name.
fn surname_only(spki: Vec<u8>, profile: Profile) -> IssueRequest {
    IssueRequest {
        given_name: None,
        ..request(spki, profile)
    }
}

/// The issuing CA in `dir` verifies against the root.
fn assert_issuing_verifies(dir: &Path) {
    verify_with_ca(dir, &dir.join("issuing.pem"));
}

#[tokio::test]
async fn issues_p256_and_rsa_certificates_that_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("root.pem")).unwrap(),
        ca.root_pem()
    );
    assert_eq!(
        ca.chain_der(),
        vec![ca.issuing_der().to_vec(), ca.root_der().to_vec()]
    );

    let spki = openssl_key(dir.path(), P256);
    let issued = ca.issue(request(spki, Profile::Adult)).await.unwrap();
    assert_eq!(issued.serial_hex.len(), 32);
    assert!(!issued.serial_hex.starts_with('0'));
    let text = verify_and_print(dir.path(), &issued.der);
    let serial_colons = issued
        .serial_hex
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    assert_contains(
        &text,
        &[
            &serial_colons,
            "Signature Algorithm: ecdsa-with-SHA256",
            "Issuer: CN=smartsign test Issuing CA,O=smartsign test,C=HK",
            "serialNumber=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "GN=Tai Man",
            "SN=CHAN",
            "CN=Tai Man CHAN",
            "O=smartsign test",
            "C=HK",
            "X509v3 Basic Constraints: critical",
            "CA:FALSE",
            "X509v3 Key Usage: critical",
            "Digital Signature, Non Repudiation",
            "X509v3 Certificate Policies:",
            &format!("Policy: {DEFAULT_ADULT_POLICY_OID}"),
            "Authority Information Access:",
            &format!("OCSP - URI:{OCSP_URL}"),
            "X509v3 CRL Distribution Points:",
            &format!("URI:{CRL_URL}"),
            "X509v3 Subject Key Identifier:",
            "X509v3 Authority Key Identifier:",
            "Public Key Algorithm: id-ecPublicKey",
        ],
    );
    assert!(!text.contains(DEFAULT_MINOR_POLICY_OID));

    let spki = openssl_key(
        dir.path(),
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let issued = ca.issue(surname_only(spki, Profile::Minor)).await.unwrap();
    let text = verify_and_print(dir.path(), &issued.der);
    assert_contains(
        &text,
        &[
            "Public Key Algorithm: rsaEncryption",
            "Public-Key: (2048 bit)",
            "CN=CHAN",
            &format!("Policy: {DEFAULT_MINOR_POLICY_OID}"),
        ],
    );
    assert!(!text.contains("GN="));
    assert!(!text.contains(DEFAULT_ADULT_POLICY_OID));
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Good { .. }
    ));
}

#[tokio::test]
async fn ca_certificates_have_the_ca_profile() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let print = |file: &str| x509_text(&dir.path().join(file));
    assert_contains(
        &print("root.pem"),
        &[
            "Signature Algorithm: ecdsa-with-SHA384",
            "Subject: CN=smartsign test Root CA,O=smartsign test,C=HK",
            "Issuer: CN=smartsign test Root CA,O=smartsign test,C=HK",
            "NIST CURVE: P-384",
            "CA:TRUE",
            "Certificate Sign, CRL Sign",
        ],
    );
    assert_contains(
        &print("issuing.pem"),
        &[
            "Signature Algorithm: ecdsa-with-SHA384",
            "Subject: CN=smartsign test Issuing CA,O=smartsign test,C=HK",
            "NIST CURVE: P-256",
            "CA:TRUE, pathlen:0",
            "Digital Signature, Certificate Sign, CRL Sign",
            "X509v3 Authority Key Identifier:",
        ],
    );
    // The issuing CA verifies against the root.
    assert_issuing_verifies(dir.path());
    assert_eq!(ca.chain_pem().len(), 2);
}

#[tokio::test]
async fn reopening_reuses_the_ca_and_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let first = open_ca(dir.path()).await;
    let spki = openssl_key(dir.path(), P256);
    let issued = first
        .issue(surname_only(spki, Profile::Adult))
        .await
        .unwrap();
    let revoked_at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    first
        .revoke(&issued.serial_hex.to_uppercase(), 4, revoked_at)
        .await
        .unwrap();
    drop(first);

    let again = open_ca(dir.path()).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("root.pem")).unwrap(),
        again.root_pem()
    );
    verify_and_print(dir.path(), &issued.der);
    assert_eq!(
        again
            .status(&format!("00{}", issued.serial_hex))
            .await
            .unwrap(),
        CertificateState::Revoked {
            revoked_at,
            reason_code: 4
        }
    );
    let list = again.revocations().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].serial_hex, issued.serial_hex);

    // A lost issuing certificate is made again from the root.
    std::fs::remove_file(dir.path().join("issuing.pem")).unwrap();
    let third = open_ca(dir.path()).await;
    assert_eq!(third.root_pem(), again.root_pem());
    assert_ne!(third.issuing_pem(), again.issuing_pem());
    assert_issuing_verifies(dir.path());
}

#[tokio::test]
async fn revocation_checks_serial_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let now = SystemTime::now();
    assert!(matches!(
        ca.revoke("4f00aa", 1, now).await,
        Err(CaError::UnknownSerial)
    ));
    assert!(matches!(
        ca.revoke("4f00aa", 7, now).await,
        Err(CaError::InvalidReason(7))
    ));
    assert!(matches!(
        ca.revoke("zz", 1, now).await,
        Err(CaError::InvalidRequest(_))
    ));
    assert_eq!(
        ca.status("4f00aa").await.unwrap(),
        CertificateState::Unknown
    );

    let spki = openssl_key(dir.path(), P256);
    let issued = ca.issue(surname_only(spki, Profile::Minor)).await.unwrap();
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Good { .. }
    ));
    ca.revoke(&issued.serial_hex, 9, now).await.unwrap();
    // Revoking again keeps the first reason.
    ca.revoke(&issued.serial_hex, 1, now + DAY).await.unwrap();
    match ca.status(&issued.serial_hex).await.unwrap() {
        CertificateState::Revoked { reason_code, .. } => assert_eq!(reason_code, 9),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let spki = openssl_key(dir.path(), P256);

    let mut outlives = surname_only(spki.clone(), Profile::Adult);
    outlives.not_after = SystemTime::now() + 100 * 365 * DAY;
    assert!(matches!(
        ca.issue(outlives).await,
        Err(CaError::OutsideCaValidity)
    ));

    let mut backwards = surname_only(spki.clone(), Profile::Adult);
    backwards.not_after = backwards.not_before;
    assert!(matches!(
        ca.issue(backwards).await,
        Err(CaError::InvalidRequest(_))
    ));

    let mut no_surname = surname_only(spki.clone(), Profile::Adult);
    no_surname.surname = " ".into();
    assert!(matches!(
        ca.issue(no_surname).await,
        Err(CaError::InvalidRequest(_))
    ));

    let mut bad_hash = surname_only(spki.clone(), Profile::Adult);
    bad_hash.hkic_hash_hex = "A1234563".into();
    assert!(matches!(
        ca.issue(bad_hash).await,
        Err(CaError::InvalidRequest(_))
    ));

    let mut not_a_key = surname_only(spki, Profile::Adult);
    not_a_key.public_key_spki_der = vec![0x30, 0x00];
    assert!(matches!(
        ca.issue(not_a_key).await,
        Err(CaError::InvalidRequest(_))
    ));
    assert!(ca.revocations().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_root_for_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ca_bridge::dev_pki::DevPki::ensure(dir.path()).unwrap();
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::copy(&pki.ca_cert, ca_dir.join("root.pem")).unwrap();
    assert!(matches!(
        try_open_ca(&ca_dir, ca_config()).await,
        Err(CaError::KeyMismatch {
            file: "root.pem",
            ..
        })
    ));
}
