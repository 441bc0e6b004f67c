//! Opening a token: wrong PIN, unknown token, missing module, unprovisioned token.
//!
//! One test function on purpose: login state belongs to the process, so once any `Hsm` of this
//! process has logged in, the module would accept any PIN (`CKR_USER_ALREADY_LOGGED_IN`). This
//! file's process never provisions the system keys.
// Helpers outside #[test] functions: in tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::token;
use hsm_adapter::{
    ErrorKind, Hsm, HsmConfig, HsmError, KeyAlgorithm, KeyMode, Role, SystemKey, TokenSelector,
};
use secrecy::SecretString;

#[tokio::test]
async fn opening_fails_clearly_and_an_unprovisioned_token_says_what_is_missing() {
    let token = token();
    let wrong = format!("{}-wrong", token.pin());
    let config = HsmConfig::new(
        &token.module,
        TokenSelector::Label(token.label.clone()),
        SecretString::from(wrong.clone()),
    );
    let err = Hsm::open(config).await.unwrap_err();
    assert!(
        matches!(
            err,
            HsmError::PinRejected {
                role: Role::User,
                rv: cryptoki::error::RvError::PinIncorrect
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::NotPermitted);
    let message = err.to_string();
    assert!(
        message.starts_with("the token refused the PIN for the user (CKR_PIN_INCORRECT)"),
        "{message}"
    );
    assert!(!message.contains(&wrong));

    let config = HsmConfig::new(
        &token.module,
        TokenSelector::Label("no-such-token".into()),
        SecretString::from(token.pin()),
    );
    let err = Hsm::open(config).await.unwrap_err();
    assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::NotFound);

    let config = HsmConfig::new(
        "/nonexistent/libpkcs11.so",
        TokenSelector::Label(token.label.clone()),
        SecretString::from(token.pin()),
    );
    let err = Hsm::open(config).await.unwrap_err();
    assert!(matches!(err, HsmError::ModuleLoad { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Unavailable);

    // The right PIN opens the token; without the key ceremony, the system keys are missing.
    let hsm = Hsm::open(token.config()).await.unwrap();
    let err = hsm
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HsmError::SystemKeyMissing(SystemKey::Kek)),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    let err = hsm.hmac_sha256(SystemKey::Taid, b"x").await.unwrap_err();
    assert!(
        matches!(err, HsmError::SystemKeyMissing(SystemKey::Taid)),
        "{err:?}"
    );
    // Resident keys need no system key.
    hsm.generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();

    // A wrong SO PIN fails provisioning clearly, and the user is logged in again afterwards.
    let err = hsm
        .provision_system_keys(&SecretString::from("not-the-so-pin".to_owned()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HsmError::PinRejected {
                role: Role::SecurityOfficer,
                ..
            }
        ),
        "{err:?}"
    );
    hsm.generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();

    // The key ceremony then works, and creates every key once.
    let report = hsm.provision_system_keys(&token.so_pin()).await.unwrap();
    assert_eq!(
        report.created.len() + report.found.len(),
        SystemKey::ALL.len()
    );
    assert!(report.created.contains(&SystemKey::Kek));
    let report = hsm.provision_system_keys(&token.so_pin()).await.unwrap();
    assert!(report.created.is_empty());
    hsm.generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
        .await
        .unwrap();
    hsm.shutdown().await;
}
