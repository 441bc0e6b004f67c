//! Our CMP client against our CMP server (the embedded CA) on a real SoftHSM token: issue with
//! the RA key's signature, re-key protected by the old user key, revoke; replays and foreign
//! secrets are rejected.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ca_bridge::cmp::{ClientProtection, CmpClient, CmpClientConfig, CmpServer};
use ca_bridge::transport::CMP_CONTENT_TYPE;
use ca_bridge::{
    CaError, CertificateState, DEFAULT_ADULT_POLICY_OID, DEFAULT_MINOR_POLICY_OID, EmbeddedCa,
    IssuedCertificate, Profile,
};
use common::{
    assert_good, cmp_client, cmp_config, hsm, open_ca, request, serve_cmp, server_config,
    verify_and_print,
};
use hsm_adapter::{KeyAlgorithm, KeyMode, SystemKey, UserKeyRef};

fn config(ca: &EmbeddedCa, url: String, protection: ClientProtection) -> CmpClientConfig {
    cmp_config(url, protection, vec![ca.root_der().to_vec()])
}

fn client(ca: &EmbeddedCa, url: String, protection: ClientProtection) -> CmpClient {
    cmp_client(config(ca, url, protection))
}

/// A fresh P-256 user key, wrapped (the default mode; resident keys are token objects, and
/// SoftHSM fails token-object writes now and then while other threads use the token).
async fn user_key() -> UserKeyRef {
    hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
        .await
        .unwrap()
}

/// A request for `key`'s public key.
fn request_for(key: &UserKeyRef, profile: Profile) -> ca_bridge::IssueRequest {
    request(key.public_key().as_der().to_vec(), profile)
}

/// `client` enrols `key` for `profile` and confirms the certificate.
async fn issue(
    client: &CmpClient,
    key: &UserKeyRef,
    profile: Profile,
) -> Result<IssuedCertificate, CaError> {
    let pending = client.issue(&request_for(key, profile), key).await?;
    client.confirm(pending, true).await
}

/// `client` re-keys the minor certificate `old` of `old_key` to `new_key`.
async fn rekey(
    client: &CmpClient,
    old: &[u8],
    old_key: &UserKeyRef,
    new_key: &UserKeyRef,
) -> Result<IssuedCertificate, CaError> {
    let pending = client
        .rekey(old, old_key, &request_for(new_key, Profile::Minor), new_key)
        .await?;
    client.confirm(pending, true).await
}

/// The certificate verifies against the CA in `dir` and names the policy and the holder.
fn assert_issued(dir: &Path, der: &[u8], policy: &str) {
    let text = verify_and_print(dir, der);
    assert!(text.contains(&format!("Policy: {policy}")), "{text}");
    assert!(text.contains("CN=Tai Man CHAN"), "{text}");
}

/// The CA refused with a message naming `fail_info`.
fn assert_refused<T: Debug>(result: &Result<T, CaError>, fail_info: &str) {
    assert!(
        matches!(result, Err(CaError::Refused(text)) if text.contains(fail_info)),
        "{result:?}"
    );
}

/// The client found a protocol error naming `wanted`.
fn assert_protocol_error<T: Debug>(result: &Result<T, CaError>, wanted: &str) {
    assert!(
        matches!(result, Err(CaError::Protocol(text)) if text.contains(wanted)),
        "{result:?}"
    );
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
    let ca = open_ca(dir.path()).await;
    let server = Arc::new(CmpServer::new(Arc::clone(&ca), server_config(&[])));
    let http = serve_cmp(server).await;
    let client = client(&ca, http.url("/cmp"), ra_protection(&ca).await);

    let key = user_key().await;
    let issued = issue(&client, &key, Profile::Minor).await.unwrap();
    assert_issued(dir.path(), &issued.der, DEFAULT_MINOR_POLICY_OID);
    assert_good(&ca, &issued.serial_hex).await;

    // Re-key: kur protected by the old key, POP by the new one; the old one stays good.
    let new_key = user_key().await;
    let renewed = rekey(&client, &issued.der, &key, &new_key).await.unwrap();
    assert_ne!(renewed.serial_hex, issued.serial_hex);
    assert_issued(dir.path(), &renewed.der, DEFAULT_MINOR_POLICY_OID);
    assert_good(&ca, &issued.serial_hex).await;

    // Revoke the old one as superseded (4).
    client.revoke(&issued.der, 4).await.unwrap();
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Revoked { reason_code: 4, .. }
    ));
    let again = client.revoke(&issued.der, 4).await;
    assert_refused(&again, "certRevoked");
    // A certificate this CA never issued (same keys, another state): badCertId.
    let other_dir = tempfile::tempdir().unwrap();
    let other = open_ca(other_dir.path()).await;
    let stranger = other
        .issue(request_for(&new_key, Profile::Adult))
        .await
        .unwrap();
    let unknown = client.revoke(&stranger.der, 0).await;
    assert_refused(&unknown, "badCertId");
    // A revoked certificate cannot be re-keyed.
    let refused = rekey(&client, &issued.der, &key, &new_key).await;
    assert!(matches!(refused, Err(CaError::Refused(_))), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pbm_round_trip_and_wrong_secret() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let server = Arc::new(CmpServer::new(
        Arc::clone(&ca),
        server_config(&[("ra-1", "correct horse")]),
    ));
    let http = serve_cmp(server).await;
    let pbm = |secret: &str| ClientProtection::Pbm {
        reference: b"ra-1".to_vec(),
        secret: secret.as_bytes().to_vec().into(),
    };
    let key = user_key().await;
    let good = client(&ca, http.url("/cmp"), pbm("correct horse"));
    let issued = issue(&good, &key, Profile::Adult).await.unwrap();
    assert_issued(dir.path(), &issued.der, DEFAULT_ADULT_POLICY_OID);
    good.revoke(&issued.der, 1).await.unwrap();
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Revoked { reason_code: 1, .. }
    ));

    // The server refuses with an error message it signs; nothing is issued.
    let wrong = client(&ca, http.url("/cmp"), pbm("wrong"));
    let refused = issue(&wrong, &key, Profile::Adult).await;
    assert_refused(&refused, "badMessageCheck");
    assert_eq!(ca.revocations().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_responses_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let server = Arc::new(CmpServer::new(Arc::clone(&ca), server_config(&[])));
    // A man in the middle that answers every request with the first response it saw.
    let first: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let http = common::serve(move |_method, _path, body| {
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
    let key = user_key().await;
    let request = request_for(&key, Profile::Adult);
    // The ip is genuine; the certConf gets it again: its recipNonce is not the certConf's nonce.
    let pending = client.issue(&request, &key).await.unwrap();
    let nonce = client.confirm(pending, true).await;
    assert_protocol_error(&nonce, "recipNonce");
    // A new transaction gets the old transaction's ip.
    let transaction = client.issue(&request, &key).await;
    assert_protocol_error(&transaction, "transactionID");
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
    let ca = open_ca(dir.path()).await;
    let server = Arc::new(CmpServer::new(Arc::clone(&ca), server_config(&[])));

    // Not a PKIMessage: badDataFormat (bit 5), in an unprotected error message: nothing is
    // signed for a sender that is not authenticated.
    for garbage in [&b""[..], b"garbage", b"\x30\x03\x02\x01\x02"] {
        let answer = server.handle(garbage, SystemTime::now()).await;
        let message = PkiMessage::from_der(&answer).unwrap();
        assert!(matches!(message.body, PkiBody::Error(_)));
        assert!(has_fail_bit(&answer, 5));
        assert!(message.protection.is_none() && message.header.protection_alg.is_none());
        assert!(message.extra_certs.is_none());
    }

    // A template whose policy is neither profile's: badCertTemplate.
    let http = serve_cmp(Arc::clone(&server)).await;
    let wrong_policy = cmp_client(CmpClientConfig {
        adult_policy_oid: "1.2.3.4".into(),
        ..config(&ca, http.url("/cmp"), ra_protection(&ca).await)
    });
    let key = user_key().await;
    let refused = issue(&wrong_policy, &key, Profile::Adult).await;
    assert_refused(&refused, "badCertTemplate");

    // A subscriber certificate may not enrol others: its signature protects nothing the RA key
    // signed, so the protection does not verify.
    let issued = ca.issue(request_for(&key, Profile::Adult)).await.unwrap();
    let subscriber = client(
        &ca,
        http.url("/cmp"),
        ClientProtection::Signature {
            certificate_der: issued.der.clone(),
            extra_certs_der: vec![],
        },
    );
    let refused = issue(&subscriber, &key, Profile::Adult).await;
    assert_refused(&refused, "badMessageCheck");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_rejects_malformed_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let http = common::serve(|_method, path, _body| async move {
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
    let key = user_key().await;
    let request = request_for(&key, Profile::Adult);
    for path in ["/garbage", "/html"] {
        let client = client(&ca, http.url(path), ra_protection(&ca).await);
        let refused = client.issue(&request, &key).await;
        assert!(matches!(refused, Err(CaError::Protocol(_))), "{refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_not_confirmed_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let server = Arc::new(CmpServer::new(Arc::clone(&ca), server_config(&[])));
    let http = serve_cmp(Arc::clone(&server)).await;
    let requester = client(&ca, http.url("/cmp"), ra_protection(&ca).await);
    let key = user_key().await;

    // Rejected in certConf: revoked at once (cessationOfOperation).
    let rejected = requester
        .issue(&request_for(&key, Profile::Adult), &key)
        .await
        .unwrap();
    let serial = rejected.certificate().serial_hex.clone();
    requester.confirm(rejected, false).await.unwrap();
    assert!(matches!(
        ca.status(&serial).await.unwrap(),
        CertificateState::Revoked { reason_code: 5, .. }
    ));

    // Confirmed: good, and it stays good when the server starts again.
    let confirmed = issue(&requester, &key, Profile::Adult).await.unwrap();
    // Issued and never confirmed (the requester died before its certConf): good while the
    // server waits for the certConf...
    let abandoned = requester
        .issue(&request_for(&key, Profile::Adult), &key)
        .await
        .unwrap();
    let serial = abandoned.certificate().serial_hex.clone();
    drop(abandoned);
    assert_eq!(
        server.settle_unconfirmed(SystemTime::now()).await.unwrap(),
        0
    );
    assert_good(&ca, &serial).await;
    // ...and revoked when a server starts without its transaction.
    let restarted = CmpServer::new(Arc::clone(&ca), server_config(&[]));
    assert_eq!(
        restarted
            .settle_unconfirmed(SystemTime::now())
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        ca.status(&serial).await.unwrap(),
        CertificateState::Revoked { reason_code: 5, .. }
    ));
    assert_good(&ca, &confirmed.serial_hex).await;

    // A certConf after the wait (10 minutes) is refused and the certificate revoked.
    let late = requester
        .issue(&request_for(&key, Profile::Adult), &key)
        .await
        .unwrap();
    let serial = late.certificate().serial_hex.clone();
    let later = SystemTime::now() + std::time::Duration::from_secs(601);
    let http_late = common::serve(move |_method, _path, body| {
        let server = Arc::clone(&server);
        async move {
            let answer = server.handle(&body, later).await;
            (200, CMP_CONTENT_TYPE.to_owned(), answer)
        }
    })
    .await;
    let late_client = client(&ca, http_late.url("/cmp"), ra_protection(&ca).await);
    let refused = late_client.confirm(late, true).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(matches!(
        ca.status(&serial).await.unwrap(),
        CertificateState::Revoked { reason_code: 5, .. }
    ));
}
