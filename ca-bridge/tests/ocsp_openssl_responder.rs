//! Our OCSP client against an `openssl ocsp` responder over an `openssl ca` index: good, then
//! revoked with its reason after `openssl ca -revoke`; a response replayed for another nonce,
//! a response with a flipped signature byte and a responder certificate the issuer did not issue
//! are refused.
//!
//! `openssl ocsp -port` listens on every interface, so the test runs in a network namespace of
//! its own (`unshare -n`, loopback only): the test re-executes itself there and checks that the
//! child passed.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use ca_bridge::CaError;
use ca_bridge::ocsp::{OcspQuery, OcspStatus};
use ca_bridge::transport::{HttpTransport, OCSP_REQUEST_CONTENT_TYPE, OCSP_RESPONSE_CONTENT_TYPE};
use common::{OpensslPki, ServerProcess, in_network_namespace, openssl};
use der::{Decode, Encode};
use x509_ocsp::{BasicOcspResponse, OcspResponse};

#[test]
fn openssl_responder_answers_are_verified() {
    in_network_namespace("openssl_responder_answers_are_verified", in_namespace);
}

/// An `openssl ocsp` responder process over `pki`'s index, signing as `signer`.
fn start_responder(pki: &OpensslPki, signer: &str) -> ServerProcess {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = pki.path(&format!("responder-{port}.log"));
    let child = openssl()
        .current_dir(&pki.dir)
        .args([
            "ocsp",
            "-index",
            "index.txt",
            "-port",
            &port.to_string(),
            "-rsigner",
            &format!("{signer}.pem"),
            "-rkey",
            &format!("{signer}.key"),
            "-CA",
            "ica.pem",
            "-rmd",
            "sha256",
            "-nmin",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Not probed with a connection: the responder serves one connection at a time and
    // waits on one that sends no request.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("waiting for OCSP client connections")
    {
        assert!(Instant::now() < deadline, "openssl ocsp did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    ServerProcess {
        child,
        url: format!("http://127.0.0.1:{port}/"),
    }
}

fn in_namespace() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = OpensslPki::new(dir.path());
    pki.issue("ocsp", "/CN=Test OCSP Responder", "ocsp_ext");
    pki.issue("ee", "/CN=Subscriber", "ee_ext");
    // A responder certificate for OCSP signing, from a CA that is not the issuer.
    pki.self_signed("other", "/CN=Other CA", "ca_ext");
    pki.issue_by("rogue", "/CN=Rogue OCSP Responder", "other", "ocsp_ext");
    let ica = pki.der("ica.pem");
    let ee = pki.der("ee.pem");
    let transport = HttpTransport::new(Duration::from_secs(5)).unwrap();
    let post = |url: String, query: OcspQuery| {
        let transport = transport.clone();
        rt.block_on(async move {
            transport
                .post(
                    &url,
                    OCSP_REQUEST_CONTENT_TYPE,
                    query.der().to_vec(),
                    OCSP_RESPONSE_CONTENT_TYPE,
                )
                .await
                .unwrap()
        })
    };

    // Good, through the client's own POST.
    let responder = start_responder(&pki, "ocsp");
    let now = SystemTime::now();
    let query = OcspQuery::new(&ica, &ee).unwrap();
    let answer = rt
        .block_on(query.send(&transport, &responder.url, now))
        .unwrap();
    assert_eq!(answer.status, OcspStatus::Good);
    assert!(answer.next_update > now);

    // A response for one nonce does not answer a request with another.
    let first = OcspQuery::new(&ica, &ee).unwrap();
    let response = post(responder.url.clone(), first.clone());
    first.check_response(&response, now).unwrap();
    let second = OcspQuery::new(&ica, &ee).unwrap();
    assert!(matches!(
        second.check_response(&response, now),
        Err(CaError::Protocol(_))
    ));

    // A flipped byte in the signature.
    let mut parsed = OcspResponse::from_der(&response).unwrap();
    let bytes = parsed.response_bytes.as_mut().unwrap();
    let mut basic = BasicOcspResponse::from_der(bytes.response.as_bytes()).unwrap();
    let mut signature = basic.signature.raw_bytes().to_vec();
    let last = signature.len() - 1;
    signature[last] ^= 0x01;
    basic.signature = der::asn1::BitString::from_bytes(&signature).unwrap();
    bytes.response = der::asn1::OctetString::new(basic.to_der().unwrap()).unwrap();
    assert!(matches!(
        first.check_response(&parsed.to_der().unwrap(), now),
        Err(CaError::Protection(_))
    ));
    drop(responder);

    // Revoked; the responder reads index.txt again when restarted.
    pki.revoke("ee", "cessationOfOperation");
    let responder = start_responder(&pki, "ocsp");
    let query = OcspQuery::new(&ica, &ee).unwrap();
    let answer = rt
        .block_on(query.send(&transport, &responder.url, SystemTime::now()))
        .unwrap();
    assert!(
        matches!(answer.status, OcspStatus::Revoked { reason_code: 5, .. }),
        "{answer:?}"
    );
    drop(responder);

    // A responder whose certificate the issuer did not issue.
    let rogue = start_responder(&pki, "rogue");
    let query = OcspQuery::new(&ica, &ee).unwrap();
    let result = rt.block_on(query.send(&transport, &rogue.url, SystemTime::now()));
    assert!(matches!(result, Err(CaError::Protection(_))), "{result:?}");
}
