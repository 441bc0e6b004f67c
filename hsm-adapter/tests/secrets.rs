//! No PIN, key material or plaintext shows in any Debug output or error message.
// Helpers outside #[test] functions: in tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{hsm, token, user_key};
use hsm_adapter::{
    Digest, HashAlgorithm, HsmConfig, HsmError, KeyAlgorithm, KeyMode, SystemKey, TokenSelector,
};
use secrecy::SecretString;

fn assert_hides(text: &str, secret: &str) {
    assert!(!secret.is_empty());
    assert!(!text.contains(secret), "a secret shows in: {text}");
}

#[tokio::test]
async fn no_secret_appears_in_any_debug_output() {
    let token = token();
    let pin = token.pin();
    let so_pin = String::from("so-pin-that-must-not-show-1234");
    let config = token.config();
    let config_debug = format!("{config:?} {config:#?}");
    assert_hides(&config_debug, &pin);
    assert!(config_debug.contains("REDACTED"));

    let hsm_debug = format!("{:?}", hsm());
    assert_hides(&hsm_debug, &pin);

    // A wrapped key's blob is not printed (only its size), nor the key's public parts for
    // that matter; a resident key shows its id.
    let wrapped = user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped).await;
    let wrapped_bytes = wrapped.to_bytes();
    let blob_hex = hex::encode(&wrapped_bytes[27..]);
    let key_debug = format!("{wrapped:?}");
    assert_hides(&key_debug, &blob_hex[..32]);

    // The plaintext that decrypt returns is a secret: redacted.
    let plaintext = "HKIC A123456(7) must not show";
    let sealed = hsm().encrypt(plaintext.as_bytes(), b"aad").await.unwrap();
    let opened = hsm().decrypt(&sealed, b"aad").await.unwrap();
    assert_hides(&format!("{opened:?}"), plaintext);
    assert_hides(&format!("{opened:?}"), &hex::encode(plaintext));

    // Errors: a refused PIN, a refused SO PIN, and every other kind name no secret.
    let wrong_so = hsm()
        .provision_system_keys(&SecretString::from(so_pin.clone()))
        .await;
    // All keys exist, so the SO PIN is never tried here: provisioning succeeds.
    assert!(wrong_so.is_ok());
    let digest = Digest::new(HashAlgorithm::Sha256, vec![7; 32]).unwrap();
    assert_hides(&format!("{digest:?}"), &hex::encode([7u8; 32]));
    let errors = [
        HsmError::PinRejected {
            role: hsm_adapter::Role::User,
            rv: cryptoki::error::RvError::PinIncorrect,
        },
        hsm()
            .hmac_sha256(SystemKey::Data, pin.as_bytes())
            .await
            .unwrap_err(),
        hsm().decrypt(&sealed[..20], b"aad").await.unwrap_err(),
    ];
    for err in &errors {
        let text = format!("{err} {err:?}");
        assert_hides(&text, &pin);
        assert_hides(&text, plaintext);
    }

    let other = HsmConfig::new(
        "/nonexistent/module.so",
        TokenSelector::Label("x".into()),
        SecretString::from(so_pin.clone()),
    );
    assert_hides(&format!("{other:?}"), &so_pin);
    let err = hsm_adapter::Hsm::open(other).await.unwrap_err();
    assert_hides(&format!("{err} {err:?}"), &so_pin);
}
