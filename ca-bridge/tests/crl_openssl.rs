//! The CRL client on `openssl ca -gencrl` output: a revoked serial is found with its reason, a
//! good one is not, a tampered CRL is refused as a protection failure, and an expired one or
//! one of another issuer is refused.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use ca_bridge::CaError;
use ca_bridge::crl::VerifiedCrl;
use common::{DAY, OpensslPki, openssl_in};

#[test]
fn openssl_crl_lists_the_revoked_serial_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pki = OpensslPki::new(dir.path());
    pki.issue("ee", "/CN=Subscriber One", "ee_ext");
    pki.issue("good", "/CN=Subscriber Two", "ee_ext");
    pki.revoke("ee", "cessationOfOperation");
    let crl_pem = std::fs::read(pki.gencrl(24)).unwrap();
    let ica = pki.der("ica.pem");
    let now = SystemTime::now();

    // PEM as openssl writes it, and DER.
    let crl = VerifiedCrl::parse(&crl_pem, &ica, now).unwrap();
    let entry = crl.lookup(&pki.serial("ee.pem")).expect("ee is revoked");
    assert_eq!(entry.reason_code, 5, "cessationOfOperation");
    assert!(entry.revoked_at <= now + Duration::from_secs(1));
    assert!(crl.lookup(&pki.serial("good.pem")).is_none());
    assert!(crl.next_update() > now && crl.this_update() <= now);
    let der = openssl_in(dir.path(), &["crl", "-outform", "DER", "-in", "crl.pem"]).stdout;
    let from_der = VerifiedCrl::parse(&der, &ica, now).unwrap();
    assert_eq!(from_der.lookup(&pki.serial("ee.pem")), Some(entry));

    // One flipped bit in the signed part.
    let mut tampered = der.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x01;
    match VerifiedCrl::parse(&tampered, &ica, now) {
        Err(CaError::Protection(_)) => {}
        // A flip that breaks the DER structure is refused as malformed instead.
        Err(CaError::Protocol(_)) => {}
        other => panic!("tampered CRL accepted: {other:?}"),
    }
    // A byte of the signature itself.
    let mut bad_signature = der.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    assert!(matches!(
        VerifiedCrl::parse(&bad_signature, &ica, now),
        Err(CaError::Protection(_))
    ));

    // Expired: checked a week and a day later.
    assert!(matches!(
        VerifiedCrl::parse(&der, &ica, now + 8 * DAY),
        Err(CaError::Protocol(_))
    ));

    // Checked against another issuer (the root).
    assert!(matches!(
        VerifiedCrl::parse(&der, &pki.der("root.pem"), now),
        Err(CaError::Protection(_))
    ));
}
