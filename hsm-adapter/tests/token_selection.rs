//! The token is chosen by label or by serial number, never by slot index.
// Helpers outside #[test] functions: in tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{hsm, pkcs11, token};
use hsm_adapter::{ErrorKind, Hsm, HsmConfig, SystemKey, TokenSelector};
use secrecy::SecretString;

#[tokio::test]
async fn a_token_chosen_by_serial_is_the_same_token_as_by_label() {
    let by_label = hsm();
    let (pkcs11, slot) = pkcs11();
    let serial = pkcs11
        .get_token_info(slot)
        .unwrap()
        .serial_number()
        .trim()
        .to_owned();
    assert!(!serial.is_empty(), "SoftHSM tokens have a serial number");

    let config = HsmConfig::new(
        &token().module,
        TokenSelector::Serial(serial),
        SecretString::from(token().pin()),
    );
    let by_serial = Hsm::open(config).await.unwrap();
    // The same keys: the same HMAC key gives the same MAC through both.
    let data = b"account u-000123 at service demo-a";
    assert_eq!(
        by_serial.hmac_sha256(SystemKey::Taid, data).await.unwrap(),
        by_label.hmac_sha256(SystemKey::Taid, data).await.unwrap()
    );
    by_serial.shutdown().await;
}

#[tokio::test]
async fn an_unknown_serial_is_not_found() {
    let _ = hsm();
    let config = HsmConfig::new(
        &token().module,
        TokenSelector::Serial("0000000000000000".to_owned()),
        SecretString::from(token().pin()),
    );
    let err = Hsm::open(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("serial number"), "{err}");
}
