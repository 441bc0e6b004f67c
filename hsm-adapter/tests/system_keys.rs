//! The system keys: HMAC, AES-GCM, random bytes, and signatures with the audit and CA keys.
// Helpers outside #[test] functions: in tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Padding, hsm, openssl_verify};
use hsm_adapter::{Digest, ErrorKind, HashAlgorithm, HsmError, SystemKey};
use secrecy::ExposeSecret;
use sha2::Digest as _;

#[tokio::test]
async fn hmac_is_keyed_and_deterministic() {
    let data = b"service-a\0account-0001";
    let taid = hsm().hmac_sha256(SystemKey::Taid, data).await.unwrap();
    let again = hsm().hmac_sha256(SystemKey::Taid, data).await.unwrap();
    let hkic = hsm().hmac_sha256(SystemKey::Hkic, data).await.unwrap();
    let other = hsm()
        .hmac_sha256(SystemKey::Taid, b"service-b\0account-0001")
        .await
        .unwrap();
    assert_eq!(taid, again, "same key, same data, same MAC");
    assert_ne!(taid, hkic, "the TAID and HKIC keys are different keys");
    assert_ne!(taid, other);
    assert_ne!(taid, [0u8; 32]);
}

#[tokio::test]
async fn hmac_needs_a_mac_key() {
    let err = hsm().hmac_sha256(SystemKey::Data, b"x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = hsm().hmac_sha256(SystemKey::Kek, b"x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn aes_gcm_round_trips_with_fresh_nonces() {
    let plaintext = b"Chan Tai Man, born 1990-01-01";
    let aad = b"account-0001/name";
    let sealed = hsm().encrypt(plaintext, aad).await.unwrap();
    assert_eq!(sealed.len(), 12 + plaintext.len() + 16);
    assert!(!sealed.windows(plaintext.len()).any(|w| w == plaintext));
    let opened = hsm().decrypt(&sealed, aad).await.unwrap();
    assert_eq!(opened.expose_secret(), plaintext);
    let sealed_again = hsm().encrypt(plaintext, aad).await.unwrap();
    assert_ne!(
        sealed[..12],
        sealed_again[..12],
        "every encryption draws a new nonce"
    );
    let empty = hsm().encrypt(b"", b"").await.unwrap();
    assert!(
        hsm()
            .decrypt(&empty, b"")
            .await
            .unwrap()
            .expose_secret()
            .is_empty()
    );
}

#[tokio::test]
async fn aes_gcm_detects_tampering_of_ciphertext_tag_nonce_and_aad() {
    let plaintext = b"date of birth 2008-02-29";
    let aad = b"account-0002/dob";
    let sealed = hsm().encrypt(plaintext, aad).await.unwrap();
    let cases = [("nonce", 0), ("ciphertext", 12), ("tag", sealed.len() - 1)];
    for (what, index) in cases {
        let mut tampered = sealed.clone();
        tampered[index] ^= 0x01;
        let err = hsm().decrypt(&tampered, aad).await.unwrap_err();
        assert!(matches!(err, HsmError::NotAuthentic), "{what}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
    let err = hsm()
        .decrypt(&sealed, b"account-0003/dob")
        .await
        .unwrap_err();
    assert!(matches!(err, HsmError::NotAuthentic), "aad: {err:?}");
    let err = hsm()
        .decrypt(&sealed[..sealed.len() - 1], aad)
        .await
        .unwrap_err();
    assert!(matches!(err, HsmError::NotAuthentic), "truncated: {err:?}");
    let err = hsm().decrypt(&sealed[..20], aad).await.unwrap_err();
    assert!(matches!(err, HsmError::NotAuthentic), "too short: {err:?}");
    // The untouched one still opens: the failures above did not break the session.
    assert_eq!(
        hsm().decrypt(&sealed, aad).await.unwrap().expose_secret(),
        plaintext
    );
}

#[tokio::test]
async fn random_bytes_come_from_the_hsm() {
    let a = hsm().random(32).await.unwrap();
    let b = hsm().random(32).await.unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert!(hsm().random(0).await.unwrap().is_empty());
    let err = hsm().random(1 << 20).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn audit_and_ca_keys_sign_and_openssl_verifies() {
    let data = b"checkpoint: tree size 42";
    for (key, hash, md) in [
        (SystemKey::Audit, HashAlgorithm::Sha256, "sha256"),
        (SystemKey::CaIssuing, HashAlgorithm::Sha256, "sha256"),
        (SystemKey::CaRoot, HashAlgorithm::Sha384, "sha384"),
    ] {
        let digest = match hash {
            HashAlgorithm::Sha384 => sha2::Sha384::digest(data).to_vec(),
            _ => sha2::Sha256::digest(data).to_vec(),
        };
        let digest = Digest::new(hash, digest).unwrap();
        let signature = hsm().sign_with_system_key(key, &digest).await.unwrap();
        let spki = hsm().system_public_key(key).await.unwrap();
        openssl_verify(&spki.to_pem(), md, data, &signature, Padding::Default);
    }
}

#[tokio::test]
async fn ca_keys_are_on_the_expected_curves() {
    use p256::pkcs8::DecodePublicKey;
    let root = hsm().system_public_key(SystemKey::CaRoot).await.unwrap();
    let issuing = hsm().system_public_key(SystemKey::CaIssuing).await.unwrap();
    let audit = hsm().system_public_key(SystemKey::Audit).await.unwrap();
    assert!(p256::PublicKey::from_public_key_der(issuing.as_der()).is_ok());
    assert!(p256::PublicKey::from_public_key_der(audit.as_der()).is_ok());
    assert!(
        p256::PublicKey::from_public_key_der(root.as_der()).is_err(),
        "the root is P-384"
    );
    assert_ne!(issuing, audit);
}

#[tokio::test]
async fn secret_system_keys_do_not_sign_digests_or_have_public_keys() {
    let digest = Digest::new(HashAlgorithm::Sha256, vec![1; 32]).unwrap();
    for key in [SystemKey::Kek, SystemKey::Taid, SystemKey::Data] {
        let err = hsm().sign_with_system_key(key, &digest).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key}");
        let err = hsm().system_public_key(key).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key}");
    }
}
