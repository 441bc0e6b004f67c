//! The daemon and its CA over the real protocols: certificates come over CMP from the embedded
//! CA, whose OCSP answers and CRL openssl checks; and the status check before signing fails
//! closed when the responder is gone, unless a grace is configured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use smartsign_tests::flow::{Pending, problem};
use smartsign_tests::{DevDaemon, describe, run};

/// A loopback TCP proxy in front of the daemon's CA listener, which a test can stop to play a
/// responder that has gone away.
struct Proxy {
    port: u16,
    target: Arc<Mutex<Option<String>>>,
    /// The open connections, cut when the proxy stops (the daemon keeps connections alive).
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let target: Arc<Mutex<Option<String>>> = Arc::default();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (target, open, stop) = (Arc::clone(&target), Arc::clone(&open), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let to = target.lock().unwrap().clone();
                            open.lock().unwrap().push(client.try_clone().unwrap());
                            if let Some(to) = to {
                                std::thread::spawn(move || forward(client, &to));
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                // The listener is dropped here: new connections are refused.
            })
        };
        Proxy {
            port,
            target,
            open,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn forward_to(&self, ca_url: &str) {
        *self.target.lock().unwrap() = Some(ca_url.trim_start_matches("http://").to_owned());
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        for connection in self.open.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

fn forward(client: TcpStream, to: &str) {
    client.set_nonblocking(false).unwrap();
    let Ok(server) = TcpStream::connect(to) else {
        return;
    };
    let pipe = |mut from: TcpStream, mut into: TcpStream| {
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            while let Ok(n) = from.read(&mut buffer) {
                if n == 0 || into.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            let _ = into.shutdown(Shutdown::Write);
        })
    };
    let up = pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
    let down = pipe(server, client);
    let _ = up.join();
    let _ = down.join();
}

/// Sets the daemon's clock (dev only).
fn set_clock(daemon: &DevDaemon, now: &str) {
    let response = daemon
        .client("officer")
        .post(format!("{}/v1/admin/clock", daemon.api))
        .json(&json!({"now": now}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().unwrap());
}

/// Two hours after the request was created: past the default maximum age of a good status
/// (3600 s) and the embedded responder's nextUpdate (600 s).
fn two_hours_later(pending: &Pending) -> String {
    let created = pending.request["expires_at"].as_str().unwrap();
    let output = run(Command::new("date")
        .args(["-u", "-d"])
        .arg(format!("{created} + 7200 seconds"))
        .arg("+%Y-%m-%dT%H:%M:%SZ"));
    assert!(output.status.success(), "{}", describe(&output));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn metrics(daemon: &DevDaemon) -> String {
    reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap()
}

/// Fail closed on certificate status: once the responder (and the CRL behind the same
/// listener) is unreachable and the cached answer has aged out, a new signing request gets 503
/// `status_unavailable`, and `/readyz` names the CA.
#[test]
fn signing_stops_with_status_unavailable_when_the_ca_is_unreachable() {
    let mut proxy = Proxy::start();
    let daemon = DevDaemon::start(&["--status-via", &proxy.url()]);
    proxy.forward_to(&daemon.ca);
    let pending = Pending::new(&daemon, "u-status-1");
    let approved = pending.approve(&daemon);
    assert_eq!(approved.status(), 200, "{}", approved.text().unwrap());
    // The status was fetched once (at create) and then served from the cache (at approval).
    let text = metrics(&daemon);
    assert!(
        text.contains("smartsign_status_cache_total{result=\"hit\"}"),
        "{text}"
    );
    for kind in ["cmp", "ocsp"] {
        let series = format!("smartsign_ca_request_duration_seconds_count{{kind=\"{kind}\"}}");
        assert!(text.contains(&series), "{series} in {text}");
    }

    proxy.stop();
    // A fresh cached answer still serves.
    assert_eq!(pending.create(&daemon).status(), 201);
    set_clock(&daemon, &two_hours_later(&pending));
    assert_eq!(
        problem(pending.create(&daemon)),
        (503, "status_unavailable".into())
    );
    let ready = reqwest::blocking::get(format!("{}/readyz", daemon.metrics)).unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().unwrap();
    assert_ne!(body["components"]["ca"], "ok", "{body}");
    assert!(
        metrics(&daemon).contains("smartsign_ca_request_errors_total{kind=\"ocsp\"}"),
        "the failed requests are counted"
    );
}

/// With `[status] first = "crl"` (`--status-first crl`), a signature's status check reads the
/// CRL held in memory: no OCSP request, one CRL fetch, and another once the CRL is older than
/// `max_age_seconds`.
#[test]
fn with_the_crl_first_signing_asks_no_ocsp_and_refetches_a_stale_crl() {
    let daemon = DevDaemon::start(&["--status-first", "crl"]);
    let mut pending = Pending::new(&daemon, "u-crl-first");
    let approved = pending.approve(&daemon);
    assert_eq!(approved.status(), 200, "{}", approved.text().unwrap());
    assert_eq!(pending.read(&daemon)["status"], "signed");
    let count = |kind: &str| -> u64 {
        let series = format!("smartsign_ca_request_duration_seconds_count{{kind=\"{kind}\"}} ");
        metrics(&daemon)
            .lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("ocsp"), 0, "no OCSP request");
    assert_eq!(count("crl"), 1, "one CRL fetch");
    // Two hours on, the CRL in memory is stale: it is fetched again, and signing goes on.
    set_clock(&daemon, &two_hours_later(&pending));
    let created = pending.create(&daemon);
    assert_eq!(created.status(), 201, "{}", created.text().unwrap());
    pending.request = created.json().unwrap();
    let approved = pending.approve(&daemon);
    assert_eq!(approved.status(), 200, "{}", approved.text().unwrap());
    assert_eq!(count("ocsp"), 0);
    assert_eq!(count("crl"), 2, "the stale CRL fetched again");
}

/// With `--status-grace`, the same outage still signs: the last good answer is within the
/// configured grace.
#[test]
fn a_configured_grace_signs_through_a_short_ca_outage() {
    let mut proxy = Proxy::start();
    let daemon = DevDaemon::start(&["--status-via", &proxy.url(), "--status-grace", "86400"]);
    proxy.forward_to(&daemon.ca);
    let mut pending = Pending::new(&daemon, "u-grace-1");
    proxy.stop();
    set_clock(&daemon, &two_hours_later(&pending));
    let created = pending.create(&daemon);
    assert_eq!(created.status(), 201, "{}", created.text().unwrap());
    pending.request = created.json().unwrap();
    let approved = pending.approve(&daemon);
    assert_eq!(approved.status(), 200, "{}", approved.text().unwrap());
    assert_eq!(pending.read(&daemon)["status"], "signed");
    assert!(daemon.log().contains("within the configured grace"));
}

fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
    let output = run(Command::new("openssl").args(args).current_dir(dir));
    (output.status.success(), describe(&output))
}

fn ocsp_query(dir: &Path, daemon: &DevDaemon) -> String {
    let (ok, text) = openssl(
        &[
            "ocsp",
            "-issuer",
            "issuing.pem",
            "-cert",
            "ee.pem",
            "-url",
            &format!("{}/ocsp", daemon.ca),
            "-CAfile",
            "root.pem",
            "-verify_other",
            "issuing.pem",
            "-nonce",
            "-resp_text",
        ],
        dir,
    );
    assert!(ok, "{text}");
    assert!(text.contains("Response verify OK"), "{text}");
    text
}

/// A certificate issued over CMP and then revoked through the API shows as revoked, with its
/// reason, in the embedded CA's OCSP answers and CRL, as openssl sees them; signing stops.
#[test]
fn revoked_certificate_is_revoked_in_the_embedded_ca_ocsp_and_crl() {
    let daemon = DevDaemon::start(&[]);
    let pending = Pending::new(&daemon, "u-revoke-1");
    assert_eq!(pending.approve(&daemon).status(), 200);
    let result = pending.read(&daemon);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("ee.pem", result["result"]["certificate"].as_str().unwrap());
    let ca_dir = daemon.state_dir().join("ca");
    std::fs::copy(ca_dir.join("root.pem"), dir.path().join("root.pem")).unwrap();
    std::fs::copy(ca_dir.join("issuing.pem"), dir.path().join("issuing.pem")).unwrap();

    let good = ocsp_query(dir.path(), &daemon);
    assert!(good.contains("ee.pem: good"), "{good}");
    assert!(!good.contains("WARNING: no nonce"), "{good}");

    let revoked = daemon
        .client("registrar")
        .post(format!(
            "{}/v1/accounts/u-revoke-1/certificate/revoke",
            daemon.api
        ))
        .json(&json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    assert_eq!(revoked.status(), 200, "{}", revoked.text().unwrap());
    let after = ocsp_query(dir.path(), &daemon);
    assert!(after.contains("ee.pem: revoked"), "{after}");
    assert!(after.contains("Reason: keyCompromise"), "{after}");

    let crl = reqwest::blocking::get(format!("{}/crl", daemon.ca)).unwrap();
    assert_eq!(crl.status(), 200);
    std::fs::write(dir.path().join("crl.der"), crl.bytes().unwrap()).unwrap();
    let (ok, text) = openssl(
        &["crl", "-inform", "DER", "-in", "crl.der", "-out", "crl.pem"],
        dir.path(),
    );
    assert!(ok, "{text}");
    let (ok, text) = openssl(&["crl", "-in", "crl.pem", "-noout", "-text"], dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    assert!(text.contains("X509v3 CRL Number"), "{text}");
    let (ok, text) = openssl(
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-CRLfile",
            "crl.pem",
            "ee.pem",
        ],
        dir.path(),
    );
    assert!(!ok && text.contains("certificate revoked"), "{text}");

    assert_eq!(
        problem(pending.create(&daemon)),
        (409, "certificate_revoked".into())
    );
}
