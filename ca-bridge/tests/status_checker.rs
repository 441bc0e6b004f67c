//! The status checker against the embedded CA's OCSP responder and CRL behind the loopback test
//! server: good, revoked after revoke + forget, cache hits reported, one fetch for concurrent
//! checks, a fresh cached answer when the responder is gone, fail closed past max_age unless a
//! grace is configured, and the CRL when the OCSP endpoint answers garbage.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use ca_bridge::status::{CertStatus, StatusChecker, StatusObserver, StatusPolicy, StatusSource};
use ca_bridge::transport::{HttpTransport, OCSP_RESPONSE_CONTENT_TYPE};
use ca_bridge::{CaError, EmbeddedCa};
use common::{HOUR, ca_endpoints, issue, open_ca};

const MINUTE: Duration = Duration::from_secs(60);

/// What the test server does.
const SERVE: u8 = 0;
const OCSP_GARBAGE: u8 = 1;
const DOWN: u8 = 2;

#[derive(Default)]
struct Counts {
    hits: AtomicUsize,
    misses: AtomicUsize,
    ocsp: AtomicUsize,
    crl: AtomicUsize,
    crl_ages: AtomicUsize,
}

impl StatusObserver for Counts {
    fn cache_lookup(&self, hit: bool) {
        if hit { &self.hits } else { &self.misses }.fetch_add(1, Ordering::SeqCst);
    }
    fn ca_request(&self, kind: &'static str, _elapsed: Duration, _ok: bool) {
        match kind {
            "ocsp" => &self.ocsp,
            "crl" => &self.crl,
            other => panic!("unexpected kind {other}"),
        }
        .fetch_add(1, Ordering::SeqCst);
    }
    fn crl_age(&self, _age: Duration) {
        self.crl_ages.fetch_add(1, Ordering::SeqCst);
    }
}

/// The CA's endpoints ([`common::ca_endpoints`]), down or with OCSP garbage as `mode` says.
async fn serve_ca(ca: Arc<EmbeddedCa>, mode: Arc<AtomicU8>) -> common::TestServer {
    common::serve(move |method, path, body| {
        let (ca, mode) = (Arc::clone(&ca), Arc::clone(&mode));
        async move {
            match (mode.load(Ordering::SeqCst), method.as_str(), path.as_str()) {
                (DOWN, _, _) => (503, "text/plain".to_owned(), Vec::new()),
                (OCSP_GARBAGE, "POST", "/ocsp") => (
                    200,
                    OCSP_RESPONSE_CONTENT_TYPE.to_owned(),
                    b"garbage".to_vec(),
                ),
                _ => ca_endpoints(&ca, &method, &path, &body).await,
            }
        }
    })
    .await
}

fn checker(
    ca: &EmbeddedCa,
    server: &common::TestServer,
    max_age: Duration,
    grace: Option<Duration>,
) -> (StatusChecker, Arc<Counts>) {
    checker_first(ca, server, max_age, grace, StatusSource::Ocsp)
}

fn checker_first(
    ca: &EmbeddedCa,
    server: &common::TestServer,
    max_age: Duration,
    grace: Option<Duration>,
    first: StatusSource,
) -> (StatusChecker, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let policy = StatusPolicy {
        max_age,
        grace,
        timeout: Duration::from_secs(5),
        ocsp_url: Some(server.url("/ocsp")),
        crl_url: Some(server.url("/crl")),
        first,
    };
    let checker = StatusChecker::new(
        HttpTransport::new(Duration::from_secs(5)).unwrap(),
        ca.issuing_der().to_vec(),
        policy,
        Arc::clone(&counts) as Arc<dyn StatusObserver>,
    )
    .unwrap();
    (checker, counts)
}

fn is_good(status: &CertStatus, source: StatusSource, grace: bool) -> bool {
    matches!(status, CertStatus::Good { source: s, within_grace, .. }
        if *s == source && *within_grace == grace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_checker_uses_ocsp_the_cache_and_the_crl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let mode = Arc::new(AtomicU8::new(SERVE));
    let server = serve_ca(Arc::clone(&ca), Arc::clone(&mode)).await;
    let ee = issue(&ca, dir.path(), "ee.pem").await;
    let now = SystemTime::now();

    // Good from OCSP, then from the cache.
    let (strict, counts) = checker(&ca, &server, 10 * MINUTE, None);
    let status = strict.check(&ee.der, now).await.unwrap();
    assert!(is_good(&status, StatusSource::Ocsp, false), "{status:?}");
    assert_eq!(counts.ocsp.load(Ordering::SeqCst), 1);
    let status = strict.check(&ee.der, now).await.unwrap();
    assert!(is_good(&status, StatusSource::Ocsp, false), "{status:?}");
    assert_eq!(
        counts.hits.load(Ordering::SeqCst),
        1,
        "second check is a cache hit"
    );
    assert_eq!(counts.ocsp.load(Ordering::SeqCst), 1, "no second fetch");

    // Revoked at the CA, forgotten locally: the next check asks again.
    ca.revoke(&ee.serial_hex, 1, now).await.unwrap();
    strict.forget(&ee.serial_hex);
    let status = strict.check(&ee.der, now).await.unwrap();
    assert!(
        matches!(status, CertStatus::Revoked { reason_code: 1, .. }),
        "{status:?}"
    );
    // A revoked answer is cached too.
    strict.check(&ee.der, now).await.unwrap();
    assert_eq!(counts.ocsp.load(Ordering::SeqCst), 2);

    // Concurrent checks of a cold serial share one fetch.
    let good = issue(&ca, dir.path(), "good.pem").await;
    let (lenient, lenient_counts) = checker(&ca, &server, 10 * MINUTE, Some(HOUR));
    let (a, b, c) = tokio::join!(
        strict.check(&good.der, now),
        strict.check(&good.der, now),
        lenient.check(&good.der, now),
    );
    for status in [a.unwrap(), b.unwrap(), c.unwrap()] {
        assert!(is_good(&status, StatusSource::Ocsp, false), "{status:?}");
    }
    assert_eq!(
        counts.ocsp.load(Ordering::SeqCst),
        3,
        "one fetch for two checks"
    );
    assert_eq!(lenient_counts.ocsp.load(Ordering::SeqCst), 1);

    // An answer past half its life (thisUpdate to nextUpdate) is returned at once and refreshed
    // in the background.
    let (relaxed, relaxed_counts) = checker(&ca, &server, 2 * HOUR, None);
    relaxed.check(&good.der, now).await.unwrap();
    let half_life_later = now + 31 * MINUTE;
    let status = relaxed.check(&good.der, half_life_later).await.unwrap();
    assert!(is_good(&status, StatusSource::Ocsp, false), "{status:?}");
    assert_eq!(relaxed_counts.hits.load(Ordering::SeqCst), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while relaxed_counts.ocsp.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background refresh"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // OCSP answers garbage, the CRL is reachable: good from the CRL, revoked from the CRL.
    mode.store(OCSP_GARBAGE, Ordering::SeqCst);
    let other = issue(&ca, dir.path(), "other.pem").await;
    let (crl_checker, crl_counts) = checker(&ca, &server, 10 * MINUTE, None);
    let status = crl_checker.check(&other.der, now).await.unwrap();
    assert!(is_good(&status, StatusSource::Crl, false), "{status:?}");
    assert_eq!(crl_counts.crl.load(Ordering::SeqCst), 1);
    assert!(crl_counts.crl_ages.load(Ordering::SeqCst) >= 1);
    ca.revoke(&other.serial_hex, 4, now).await.unwrap();
    let (crl_checker, _) = checker(&ca, &server, 10 * MINUTE, None);
    let status = crl_checker.check(&other.der, now).await.unwrap();
    assert!(
        matches!(status, CertStatus::Revoked { reason_code: 4, .. }),
        "{status:?}"
    );

    // A CRL counts as fresh no longer than max_age, like an OCSP answer: the CA's CRL, made
    // now, read 11 minutes later under a 10-minute max_age is refused (fail closed), and taken
    // only within the grace of a lenient policy.
    let another = issue(&ca, dir.path(), "another.pem").await;
    let later = now + 11 * MINUTE;
    let (crl_strict, _) = checker(&ca, &server, 10 * MINUTE, None);
    match crl_strict.check(&another.der, later).await {
        Err(CaError::StatusUnavailable(why)) => assert!(why.contains("maximum age"), "{why}"),
        other => panic!("expected StatusUnavailable, got {other:?}"),
    }
    let (crl_lenient, _) = checker(&ca, &server, 10 * MINUTE, Some(HOUR));
    let status = crl_lenient.check(&another.der, later).await.unwrap();
    assert!(is_good(&status, StatusSource::Crl, true), "{status:?}");

    // The CA is gone.
    mode.store(DOWN, Ordering::SeqCst);
    drop(server);
    // A fresh cached answer is still good.
    let status = strict.check(&good.der, now).await.unwrap();
    assert!(is_good(&status, StatusSource::Ocsp, false), "{status:?}");
    // Past max_age: unavailable under the default (fail closed) policy...
    let later = now + 11 * MINUTE;
    match strict.check(&good.der, later).await {
        Err(CaError::StatusUnavailable(why)) => assert!(why.contains(&good.serial_hex)),
        other => panic!("expected StatusUnavailable, got {other:?}"),
    }
    // ...and good within the grace of a lenient one.
    let status = lenient.check(&good.der, later).await.unwrap();
    assert!(is_good(&status, StatusSource::Ocsp, true), "{status:?}");
    // Beyond max_age + grace (and the answer's nextUpdate) nothing is accepted.
    assert!(matches!(
        lenient.check(&good.der, now + 2 * HOUR).await,
        Err(CaError::StatusUnavailable(_))
    ));
}

#[tokio::test]
async fn a_certificate_of_another_issuer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let counts = Arc::new(Counts::default());
    // The root as the expected issuer: the subscriber certificate is not its own.
    let checker = StatusChecker::new(
        HttpTransport::new(Duration::from_secs(1)).unwrap(),
        ca.root_der().to_vec(),
        StatusPolicy::default(),
        counts,
    )
    .unwrap();
    let ee = issue(&ca, dir.path(), "ee.pem").await;
    assert!(matches!(
        checker.check(&ee.der, SystemTime::now()).await,
        Err(CaError::Protection(_))
    ));
}

/// With the CRL first, checks of many certificates cost one CRL fetch and no OCSP request; a
/// certificate on the CRL is revoked; a CRL past `max_age` is fetched again and shows a later
/// revocation; with the CA down and no fresh CRL, the check fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_crl_first_many_certificates_cost_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open_ca(dir.path()).await;
    let mode = Arc::new(AtomicU8::new(SERVE));
    let server = serve_ca(Arc::clone(&ca), Arc::clone(&mode)).await;
    let mut issued = Vec::new();
    for i in 0..5 {
        issued.push(issue(&ca, dir.path(), &format!("ee{i}.pem")).await);
    }
    let now = SystemTime::now();
    ca.revoke(&issued[4].serial_hex, 1, now).await.unwrap();
    let (checker, counts) = checker_first(&ca, &server, 10 * MINUTE, None, StatusSource::Crl);
    for ee in &issued[..4] {
        let status = checker.check(&ee.der, now).await.unwrap();
        assert!(is_good(&status, StatusSource::Crl, false), "{status:?}");
    }
    let status = checker.check(&issued[4].der, now).await.unwrap();
    assert!(
        matches!(status, CertStatus::Revoked { reason_code: 1, .. }),
        "{status:?}"
    );
    assert_eq!(
        counts.crl.load(Ordering::SeqCst),
        1,
        "one CRL for five checks"
    );
    assert_eq!(counts.ocsp.load(Ordering::SeqCst), 0, "no OCSP request");

    // Revoked later: seen once the CRL in memory is older than max_age.
    ca.revoke(&issued[0].serial_hex, 4, now).await.unwrap();
    let later = now + 11 * MINUTE;
    let status = checker.check(&issued[0].der, later).await.unwrap();
    assert!(
        matches!(status, CertStatus::Revoked { reason_code: 4, .. }),
        "{status:?}"
    );
    assert_eq!(counts.crl.load(Ordering::SeqCst), 2);

    // The CA down and the CRL stale: neither source answers, and the check fails closed.
    mode.store(DOWN, Ordering::SeqCst);
    let much_later = now + 30 * MINUTE;
    let refused = checker.check(&issued[1].der, much_later).await;
    assert!(
        matches!(refused, Err(CaError::StatusUnavailable(_))),
        "{refused:?}"
    );
}
