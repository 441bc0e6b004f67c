//! Our CMP client against our CMP server (the embedded CA) on a real SoftHSM token: issue with
//! the RA key's signature, re-key protected by the old user key, revoke; replays and foreign
//! secrets are rejected.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unreachable_pub)] // shared test modules: `pub` for the binaries that use them
mod cmp_fixture;
#[allow(unreachable_pub)]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ca_bridge::cmp::{ClientProtection, CmpClient, CmpClientConfig, CmpServer};
use ca_bridge::transport::{CMP_CONTENT_TYPE, HttpTransport};
use ca_bridge::{
    CaError, CertificateState, DEFAULT_ADULT_POLICY_OID, DEFAULT_MINOR_POLICY_OID, EmbeddedCa,
    Profile,
};
use cmp_fixture::{hsm, open_ca, request, serve_cmp, server_config, verify_and_print};
use hsm_adapter::{KeyAlgorithm, KeyMode, SystemKey};

fn client(ca: &EmbeddedCa, url: String, protection: ClientProtection) -> CmpClient {
    CmpClient::new(
        hsm(),
        HttpTransport::new(Duration::from_secs(20)).unwrap(),
        CmpClientConfig {
            url,
            organisation: cmp_fixture::ORGANISATION.into(),
            adult_policy_oid: DEFAULT_ADULT_POLICY_OID.into(),
            minor_policy_oid: DEFAULT_MINOR_POLICY_OID.into(),
            protection,
            trusted_der: vec![ca.root_der().to_vec()],
        },
    )
    .unwrap()
}

async fn ra_protection(ca: &EmbeddedCa) -> ClientProtection {
    let spki = hsm().system_public_key(SystemKey::CmpClient).await.unwrap();
    let ra = ca
        .issue_ra_certificate(spki.as_der(), "smartsign CMP RA", SystemTime::now())
        .await
        .unwrap();
    ClientProtection::Signature {
        certificate_der: ra.der,
        extra_certs_der: vec![ca.issuing_der().to_vec()],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn issue_rekey_and_revoke_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(
        dir.path(),
        DEFAULT_ADULT_POLICY_OID,
        DEFAULT_MINOR_POLICY_OID,
    )
    .await;
    let server = Arc::new(CmpServer::new(Arc::clone(&ca), server_config(&[])));
    let http = serve_cmp(server).await;
    let client = client(&ca, http.url("/cmp"), ra_protection(&ca).await);

    let hsm = hsm();
    let key = hsm
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let issued = client
        .issue(
            &request(key.public_key().as_der().to_vec(), Profile::Minor),
            &key,
        )
        .await
        .unwrap();
    let text = verify_and_print(dir.path(), &issued.der);
    assert!(
        text.contains(&format!("Policy: {DEFAULT_MINOR_POLICY_OID}")),
        "{text}"
    );
    assert!(text.contains("CN=Tai Man CHAN"), "{text}");
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Good { .. }
    ));

    // Re-key: kur protected by the old key, POP by the new one; the old one stays good.
    let new_key = hsm
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let renewed = client
        .rekey(
            &issued.der,
            &key,
            &request(new_key.public_key().as_der().to_vec(), Profile::Minor),
            &new_key,
        )
        .await
        .unwrap();
    assert_ne!(renewed.serial_hex, issued.serial_hex);
    let text = verify_and_print(dir.path(), &renewed.der);
    assert!(
        text.contains(&format!("Policy: {DEFAULT_MINOR_POLICY_OID}")),
        "{text}"
    );
    assert!(text.contains("CN=Tai Man CHAN"), "{text}");
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Good { .. }
    ));

    // Revoke the old one as superseded (4).
    client.revoke(&issued.der, 4).await.unwrap();
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Revoked { reason_code: 4, .. }
    ));
    let again = client.revoke(&issued.der, 4).await;
    assert!(
        matches!(&again, Err(CaError::Refused(text)) if text.contains("certRevoked")),
        "{again:?}"
    );
    // A certificate this CA never issued (same keys, another state): badCertId.
    let other_dir = tempfile::tempdir().unwrap();
    let other = open_ca(
        other_dir.path(),
        DEFAULT_ADULT_POLICY_OID,
        DEFAULT_MINOR_POLICY_OID,
    )
    .await;
    let stranger = other
        .issue(request(
            new_key.public_key().as_der().to_vec(),
            Profile::Adult,
        ))
        .await
        .unwrap();
    let unknown = client.revoke(&stranger.der, 0).await;
    assert!(
        matches!(&unknown, Err(CaError::Refused(text)) if text.contains("badCertId")),
        "{unknown:?}"
    );
    // A revoked certificate cannot be re-keyed.
    let refused = client
        .rekey(
            &issued.der,
            &key,
            &request(new_key.public_key().as_der().to_vec(), Profile::Minor),
            &new_key,
        )
        .await;
    assert!(matches!(refused, Err(CaError::Refused(_))), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pbm_round_trip_and_wrong_secret() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(
        dir.path(),
        DEFAULT_ADULT_POLICY_OID,
        DEFAULT_MINOR_POLICY_OID,
    )
    .await;
    let server = Arc::new(CmpServer::new(
        Arc::clone(&ca),
        server_config(&[("ra-1", "correct horse")]),
    ));
    let http = serve_cmp(server).await;
    let pbm = |secret: &str| ClientProtection::Pbm {
        reference: b"ra-1".to_vec(),
        secret: secret.as_bytes().to_vec().into(),
    };
    let key = hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let good = client(&ca, http.url("/cmp"), pbm("correct horse"));
    let issued = good
        .issue(
            &request(key.public_key().as_der().to_vec(), Profile::Adult),
            &key,
        )
        .await
        .unwrap();
    let text = verify_and_print(dir.path(), &issued.der);
    assert!(
        text.contains(&format!("Policy: {DEFAULT_ADULT_POLICY_OID}")),
        "{text}"
    );
    good.revoke(&issued.der, 1).await.unwrap();
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Revoked { reason_code: 1, .. }
    ));

    // The server refuses with an error message it signs; nothing is issued.
    let wrong = client(&ca, http.url("/cmp"), pbm("wrong"));
    let refused = wrong
        .issue(
            &request(key.public_key().as_der().to_vec(), Profile::Adult),
            &key,
        )
        .await;
    assert!(
        matches!(&refused, Err(CaError::Refused(text)) if text.contains("badMessageCheck")),
        "{refused:?}"
    );
    assert_eq!(ca.revocations().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_responses_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(
        dir.path(),
        DEFAULT_ADULT_POLICY_OID,
        DEFAULT_MINOR_POLICY_OID,
    )
    .await;
    let server = Arc::new(CmpServer::new(Arc::clone(&ca), server_config(&[])));
    // A man in the middle that answers every request with the first response it saw.
    let first: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let http = support::serve(move |_method, _path, body| {
        let server = Arc::clone(&server);
        let first = Arc::clone(&first);
        async move {
            let answer = server.handle(&body, SystemTime::now()).await;
            let replay = first.lock().unwrap().get_or_insert(answer).clone();
            (200, CMP_CONTENT_TYPE.to_owned(), replay)
        }
    })
    .await;
    let client = client(&ca, http.url("/cmp"), ra_protection(&ca).await);
    let key = hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let request = request(key.public_key().as_der().to_vec(), Profile::Adult);
    // The ip is genuine; the certConf gets it again: its recipNonce is not the certConf's nonce.
    let nonce = client.issue(&request, &key).await;
    assert!(
        matches!(&nonce, Err(CaError::Protocol(text)) if text.contains("recipNonce")),
        "{nonce:?}"
    );
    // A new transaction gets the old transaction's ip.
    let transaction = client.issue(&request, &key).await;
    assert!(
        matches!(&transaction, Err(CaError::Protocol(text)) if text.contains("transactionID")),
        "{transaction:?}"
    );
}

/// Whether `der` holds the failInfo BIT STRING with exactly this bit set.
fn has_fail_bit(der: &[u8], bit: usize) -> bool {
    let mut bits = vec![0u8; bit / 8 + 1];
    bits[bit / 8] = 0x80 >> (bit % 8);
    let mut wanted = vec![0x03, bits.len() as u8 + 1, (7 - bit % 8) as u8];
    wanted.extend(bits);
    der.windows(wanted.len()).any(|w| w == wanted)
}

#[tokio::test(flavor = "multi_thread")]
async fn server_answers_bad_requests_with_error_messages() {
    use cmpv2::body::PkiBody;
    use cmpv2::message::PkiMessage;
    use der::Decode as _;

    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(
        dir.path(),
        DEFAULT_ADULT_POLICY_OID,
        DEFAULT_MINOR_POLICY_OID,
    )
    .await;
    let server = Arc::new(CmpServer::new(Arc::clone(&ca), server_config(&[])));

    // Not a PKIMessage: badDataFormat (bit 5), signed by the issuing CA.
    for garbage in [&b""[..], b"garbage", b"\x30\x03\x02\x01\x02"] {
        let answer = server.handle(garbage, SystemTime::now()).await;
        let message = PkiMessage::from_der(&answer).unwrap();
        assert!(matches!(message.body, PkiBody::Error(_)));
        assert!(has_fail_bit(&answer, 5));
        assert_eq!(
            message.extra_certs.unwrap()[0],
            der::Decode::from_der(ca.issuing_der()).unwrap()
        );
    }

    // A template whose policy is neither profile's: badCertTemplate.
    let http = serve_cmp(Arc::clone(&server)).await;
    let mut client = CmpClient::new(
        hsm(),
        HttpTransport::new(Duration::from_secs(20)).unwrap(),
        CmpClientConfig {
            url: http.url("/cmp"),
            organisation: cmp_fixture::ORGANISATION.into(),
            adult_policy_oid: "1.2.3.4".into(),
            minor_policy_oid: DEFAULT_MINOR_POLICY_OID.into(),
            protection: ra_protection(&ca).await,
            trusted_der: vec![ca.root_der().to_vec()],
        },
    )
    .unwrap();
    let key = hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let refused = client
        .issue(
            &request(key.public_key().as_der().to_vec(), Profile::Adult),
            &key,
        )
        .await;
    assert!(
        matches!(&refused, Err(CaError::Refused(text)) if text.contains("badCertTemplate")),
        "{refused:?}"
    );

    // A subscriber certificate may not enrol others: its signature protects nothing the RA key
    // signed, so the protection does not verify.
    let issued = ca
        .issue(request(key.public_key().as_der().to_vec(), Profile::Adult))
        .await
        .unwrap();
    client = CmpClient::new(
        hsm(),
        HttpTransport::new(Duration::from_secs(20)).unwrap(),
        CmpClientConfig {
            url: http.url("/cmp"),
            organisation: cmp_fixture::ORGANISATION.into(),
            adult_policy_oid: DEFAULT_ADULT_POLICY_OID.into(),
            minor_policy_oid: DEFAULT_MINOR_POLICY_OID.into(),
            protection: ClientProtection::Signature {
                certificate_der: issued.der.clone(),
                extra_certs_der: vec![],
            },
            trusted_der: vec![ca.root_der().to_vec()],
        },
    )
    .unwrap();
    let refused = client
        .issue(
            &request(key.public_key().as_der().to_vec(), Profile::Adult),
            &key,
        )
        .await;
    assert!(
        matches!(&refused, Err(CaError::Refused(text)) if text.contains("badMessageCheck")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_rejects_malformed_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(
        dir.path(),
        DEFAULT_ADULT_POLICY_OID,
        DEFAULT_MINOR_POLICY_OID,
    )
    .await;
    let http = support::serve(|_method, path, _body| async move {
        if path == "/garbage" {
            (
                200,
                CMP_CONTENT_TYPE.to_owned(),
                b"\x30\x03\x02\x01\x02".to_vec(),
            )
        } else {
            (200, "text/html".to_owned(), b"<html/>".to_vec())
        }
    })
    .await;
    let key = hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let request = request(key.public_key().as_der().to_vec(), Profile::Adult);
    for path in ["/garbage", "/html"] {
        let client = client(&ca, http.url(path), ra_protection(&ca).await);
        let refused = client.issue(&request, &key).await;
        assert!(matches!(refused, Err(CaError::Protocol(_))), "{refused:?}");
    }
}
