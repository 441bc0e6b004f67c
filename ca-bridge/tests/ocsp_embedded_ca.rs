//! The embedded CA's OCSP responder and CRL, checked by openssl as the relying party: `openssl
//! ocsp` through the loopback test server (good, revoked with the reason, unknown, several
//! CertIDs in one request, the nonce echoed, "Response verify OK"), and `openssl crl` / `openssl
//! verify -crl_check` on the CRL.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ca_bridge::ocsp::{OcspQuery, OcspStatus};
use ca_bridge::transport::HttpTransport;
use ca_bridge::{EmbeddedCa, IssuedCertificate};
use common::{
    HOUR, TestServer, another_hsm, assert_contains, ca_config, ca_endpoints, cert_der, issue,
    open_ca, openssl, openssl_in, run_any,
};
use der::Decode;
use tempfile::TempDir;
use x509_ocsp::{OcspResponse, OcspResponseStatus};

/// The CA's OCSP responder on POST /ocsp and GET /ocsp/..., its CRL on GET /crl.
async fn serve_ca(ca: Arc<EmbeddedCa>) -> TestServer {
    common::serve(move |method, path, body| {
        let ca = Arc::clone(&ca);
        async move { ca_endpoints(&ca, &method, &path, &body).await }
    })
    .await
}

/// A served embedded CA in a temporary directory that has issued `ee.pem` and `second`.
async fn served_ca(second: &str) -> (TempDir, Arc<EmbeddedCa>, IssuedCertificate, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let ee = issue(&ca, dir.path(), "ee.pem").await;
    issue(&ca, dir.path(), second).await;
    let server = serve_ca(Arc::clone(&ca)).await;
    (dir, ca, ee, server)
}

/// `openssl ocsp` as a client for the certificates `certs` in `dir`; returns its output.
async fn openssl_ocsp(dir: &Path, url: String, args: Vec<String>) -> String {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (ok, text) = run_any(
            openssl()
                .current_dir(&dir)
                .args([
                    "ocsp",
                    "-issuer",
                    "issuing.pem",
                    "-url",
                    &url,
                    "-CAfile",
                    "root.pem",
                    "-verify_other",
                    "issuing.pem",
                    "-nonce",
                    "-resp_text",
                ])
                .args(&args),
        );
        assert!(ok, "openssl ocsp failed:\n{text}");
        text
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_ocsp_sees_good_then_revoked_with_the_reason() {
    let (dir, ca, ee, server) = served_ca("other.pem").await;
    let url = server.url("/ocsp");
    let certs = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| ["-cert".to_owned(), (*n).to_owned()])
            .collect()
    };

    let text = openssl_ocsp(dir.path(), url.clone(), certs(&["ee.pem"])).await;
    assert_contains(
        &text,
        &[
            "Response verify OK",
            "ee.pem: good",
            "OCSP Nonce",
            "Next Update:",
        ],
    );

    ca.revoke(&ee.serial_hex, 1, SystemTime::now())
        .await
        .unwrap();
    // Two CertIDs in one request, and a serial this CA never issued.
    let mut args = certs(&["ee.pem", "other.pem"]);
    args.extend(["-serial".to_owned(), "0x1234".to_owned()]);
    let text = openssl_ocsp(dir.path(), url.clone(), args).await;
    assert_contains(
        &text,
        &[
            "Response verify OK",
            "ee.pem: revoked",
            "Reason: keyCompromise",
            "other.pem: good",
            "0x1234: unknown",
            "OCSP Nonce",
        ],
    );

    // Our client by POST and by GET: revoked with the reason, other.pem good.
    let transport = HttpTransport::new(Duration::from_secs(5)).unwrap();
    let query = OcspQuery::new(ca.issuing_der(), &ee.der).unwrap();
    let by_post = query
        .send(&transport, &url, SystemTime::now())
        .await
        .unwrap();
    let by_get = query
        .send_get(&transport, &url, SystemTime::now())
        .await
        .unwrap();
    for answer in [by_post, by_get] {
        assert!(
            matches!(answer.status, OcspStatus::Revoked { reason_code: 1, .. }),
            "{answer:?}"
        );
    }
    let other_der = cert_der(dir.path(), "other.pem");
    let query = OcspQuery::new(ca.issuing_der(), &other_der).unwrap();
    let answer = query
        .send_get(&transport, &url, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(answer.status, OcspStatus::Good);

    // Bytes that are no OCSP request: malformedRequest.
    let garbage = ca
        .ocsp_response(b"not an OCSP request", SystemTime::now(), HOUR)
        .await;
    let response = OcspResponse::from_der(&garbage).unwrap();
    assert_eq!(
        response.response_status,
        OcspResponseStatus::MalformedRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_verifies_the_crl_and_refuses_the_revoked_certificate() {
    let (dir, ca, ee, server) = served_ca("good.pem").await;
    std::fs::write(
        dir.path().join("chain.pem"),
        format!("{}{}", ca.root_pem(), ca.issuing_pem()),
    )
    .unwrap();

    let before = ca.crl(SystemTime::now(), 24 * HOUR).await.unwrap();
    ca.revoke(&ee.serial_hex, 5, SystemTime::now())
        .await
        .unwrap();
    // Fetched over HTTP, as a relying party does; made again since the revocations changed.
    let crl = reqwest::get(server.url("/crl"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    assert_ne!(crl, before);
    // Unchanged revocations and little time passed: the cached CRL.
    assert_eq!(ca.crl(SystemTime::now(), 24 * HOUR).await.unwrap(), crl);
    let crl_der: PathBuf = dir.path().join("crl.der");
    std::fs::write(&crl_der, &crl).unwrap();

    let (ok, text) = run_any(openssl().current_dir(dir.path()).args([
        "crl",
        "-inform",
        "DER",
        "-in",
        "crl.der",
        "-text",
        "-noout",
        "-CAfile",
        "chain.pem",
    ]));
    assert!(ok, "{text}");
    assert_contains(
        &text,
        &[
            "verify OK",
            "Cessation Of Operation",
            "X509v3 CRL Number",
            "X509v3 Authority Key Identifier",
            "Next Update:",
            &ee.serial_hex.to_ascii_uppercase(),
        ],
    );

    openssl_in(
        dir.path(),
        &["crl", "-inform", "DER", "-in", "crl.der", "-out", "crl.pem"],
    );
    let verify = |cert: &str| {
        run_any(openssl().current_dir(dir.path()).args([
            "verify",
            "-crl_check",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-CRLfile",
            "crl.pem",
            cert,
        ]))
    };
    let (ok, text) = verify("ee.pem");
    assert!(!ok && text.contains("certificate revoked"), "{text}");
    let (ok, text) = verify("good.pem");
    assert!(ok && text.contains("good.pem: OK"), "{text}");

    // CRL numbers increase strictly, even within one second.
    let number = |der: &[u8]| {
        let list = x509_cert::crl::CertificateList::from_der(der).unwrap();
        let ext = list
            .tbs_cert_list
            .crl_extensions
            .unwrap()
            .into_iter()
            .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_CRL_NUMBER)
            .unwrap();
        der::asn1::Uint::from_der(ext.extn_value.as_bytes())
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    ca.revoke(
        &issue(&ca, dir.path(), "third.pem").await.serial_hex,
        0,
        SystemTime::now(),
    )
    .await
    .unwrap();
    let next = ca.crl(SystemTime::now(), 24 * HOUR).await.unwrap();
    let (a, b) = (number(&crl), number(&next));
    assert!(
        a.len() < b.len() || (a.len() == b.len() && a < b),
        "CRL number did not grow"
    );
}

/// `openssl ocsp` writes a request (DER) for `args` into `dir/file`, without sending it.
fn openssl_request(dir: &Path, file: &str, args: &[&str]) -> Vec<u8> {
    let mut all = vec!["ocsp", "-reqout", file];
    all.extend_from_slice(args);
    openssl_in(dir, &all);
    std::fs::read(dir.join(file)).unwrap()
}

/// `openssl ocsp` reads the response `der` for `ee.pem`, verifies it against the root and
/// prints it.
fn openssl_reads(dir: &Path, der: &[u8]) -> String {
    std::fs::write(dir.join("resp.der"), der).unwrap();
    let (ok, text) = run_any(openssl().current_dir(dir).args([
        "ocsp",
        "-respin",
        "resp.der",
        "-issuer",
        "issuing.pem",
        "-cert",
        "ee.pem",
        "-CAfile",
        "root.pem",
        "-verify_other",
        "issuing.pem",
        "-no_nonce",
        "-resp_text",
    ]));
    assert!(ok, "openssl ocsp -respin failed:\n{text}");
    text
}

fn status_of(der: &[u8]) -> OcspResponseStatus {
    OcspResponse::from_der(der).unwrap().response_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_nonce_is_answered_from_the_cache_until_revocation_or_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let ee = issue(&ca, dir.path(), "ee.pem").await;
    let request = openssl_request(
        dir.path(),
        "req.der",
        &["-issuer", "issuing.pem", "-cert", "ee.pem", "-no_nonce"],
    );
    let now = SystemTime::now();

    // A flood of the same query: one signature, the other answers from the cache, all equal.
    let before = ca.ocsp_stats();
    let first = ca.ocsp_response(&request, now, HOUR).await;
    for i in 1..100u64 {
        let again = ca
            .ocsp_response(&request, now + Duration::from_secs(i), HOUR)
            .await;
        assert_eq!(again, first, "answer {i} is not the cached one");
    }
    let after = ca.ocsp_stats();
    println!("100 identical queries: {before:?} -> {after:?}");
    assert_eq!(after.signed - before.signed, 1, "one HSM signature");
    assert_eq!(after.cache_hits - before.cache_hits, 99);
    let text = openssl_reads(dir.path(), &first);
    assert_contains(
        &text,
        &["Response verify OK", "ee.pem: good", "Next Update:"],
    );

    // Revoked: the cached "good" is gone at once.
    ca.revoke(&ee.serial_hex, 1, now).await.unwrap();
    let revoked = ca
        .ocsp_response(&request, now + Duration::from_secs(100), HOUR)
        .await;
    assert_ne!(revoked, first);
    let text = openssl_reads(dir.path(), &revoked);
    assert_contains(
        &text,
        &[
            "Response verify OK",
            "ee.pem: revoked",
            "Reason: keyCompromise",
        ],
    );
    assert_eq!(ca.ocsp_stats().signed - before.signed, 2);
    // ... and that answer is cached in turn.
    let again = ca
        .ocsp_response(&request, now + Duration::from_secs(101), HOUR)
        .await;
    assert_eq!(again, revoked);
    assert_eq!(ca.ocsp_stats().signed - before.signed, 2);

    // Half the validity later it is made again (so that it keeps half its life), and when the
    // clock moved back before its thisUpdate.
    let later = ca
        .ocsp_response(&request, now + HOUR / 2 + Duration::from_secs(100), HOUR)
        .await;
    assert_ne!(later, revoked);
    assert_eq!(ca.ocsp_stats().signed - before.signed, 3);
    let earlier = ca
        .ocsp_response(&request, now - Duration::from_secs(60), HOUR)
        .await;
    assert_ne!(earlier, later);
    assert_eq!(ca.ocsp_stats().signed - before.signed, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_cost_no_hsm_work() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let ee = issue(&ca, dir.path(), "ee.pem").await;
    let now = SystemTime::now();
    let before = ca.ocsp_stats();

    // More CertIDs than allowed.
    let mut args = vec!["-issuer", "issuing.pem", "-no_nonce"];
    let serials = ["0x1", "0x2", "0x3", "0x4", "0x5"];
    for serial in &serials[..=ca_bridge::MAX_OCSP_CERT_IDS] {
        args.extend(["-serial", serial]);
    }
    let too_many = openssl_request(dir.path(), "many.der", &args);
    let answer = ca.ocsp_response(&too_many, now, HOUR).await;
    assert_eq!(status_of(&answer), OcspResponseStatus::MalformedRequest);

    // Only another issuer's CertIDs: not ours to answer.
    let foreign = openssl_request(
        dir.path(),
        "foreign.der",
        &["-issuer", "root.pem", "-serial", "0x1234", "-no_nonce"],
    );
    let answer = ca.ocsp_response(&foreign, now, HOUR).await;
    assert_eq!(status_of(&answer), OcspResponseStatus::Unauthorized);

    // A nonce longer than RFC 8954 allows.
    let long_nonce = OcspQuery::with_nonce(ca.issuing_der(), &ee.der, vec![7; 33]).unwrap();
    let answer = ca.ocsp_response(long_nonce.der(), now, HOUR).await;
    assert_eq!(status_of(&answer), OcspResponseStatus::MalformedRequest);

    // Garbage.
    let answer = ca.ocsp_response(&[0x30, 0x03, 0x02, 0x01], now, HOUR).await;
    assert_eq!(status_of(&answer), OcspResponseStatus::MalformedRequest);

    let after = ca.ocsp_stats();
    assert_eq!(
        after.signed, before.signed,
        "no HSM signature for a refusal"
    );
    assert_eq!(after.refused - before.refused, 4);

    // The most CertIDs allowed are answered, in one response; with a nonce, each request is
    // signed afresh (and answered with its own nonce).
    let mut args = vec!["-issuer", "issuing.pem", "-cert", "ee.pem"];
    for serial in &serials[..ca_bridge::MAX_OCSP_CERT_IDS - 1] {
        args.extend(["-serial", serial]);
    }
    let most = openssl_request(dir.path(), "most.der", &args);
    for _ in 0..2 {
        let answer = ca.ocsp_response(&most, now, HOUR).await;
        assert_eq!(status_of(&answer), OcspResponseStatus::Successful);
    }
    assert_eq!(ca.ocsp_stats().signed - after.signed, 2);
    let query = OcspQuery::new(ca.issuing_der(), &ee.der).unwrap();
    let answer = ca.ocsp_response(query.der(), now, HOUR).await;
    assert_eq!(
        query.check_response(&answer, now).unwrap().status,
        OcspStatus::Good
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_background_lane_answers_try_later_at_once() {
    // A CA on an HSM whose background lane holds one request, asked for many fresh (nonce)
    // responses at once: some are signed, the others get tryLater, none fails otherwise.
    let hsm = another_hsm(|config| config.with_background_queue_capacity(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        EmbeddedCa::open(hsm, dir.path(), ca_config(), SystemTime::now())
            .await
            .unwrap(),
    );
    let ee = issue(&ca, dir.path(), "ee.pem").await;
    let before = ca.ocsp_stats();
    const REQUESTS: usize = 64;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let (ca, der) = (Arc::clone(&ca), ee.der.clone());
        tasks.spawn(async move {
            let query = OcspQuery::new(ca.issuing_der(), &der).unwrap();
            let answer = ca.ocsp_response(query.der(), SystemTime::now(), HOUR).await;
            status_of(&answer)
        });
    }
    let (mut signed, mut later) = (0, 0);
    while let Some(status) = tasks.join_next().await {
        match status.unwrap() {
            OcspResponseStatus::Successful => signed += 1,
            OcspResponseStatus::TryLater => later += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let stats = ca.ocsp_stats();
    println!("{REQUESTS} nonce requests at once: {signed} signed, {later} tryLater");
    assert_eq!(signed + later, REQUESTS);
    assert!(signed > 0 && later > 0, "{signed} signed, {later} tryLater");
    assert_eq!(stats.signed - before.signed, signed as u64);
    assert_eq!(stats.refused - before.refused, later as u64);
}
