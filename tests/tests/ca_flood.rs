//! The CA listener cannot starve user signing (issue 14, section 3): while several threads flood
//! the embedded CA's `/cmp` and `/ocsp` with garbage and with well-formed requests, every signing
//! flow of a `--dev` daemon still signs, and the flow's p99 stays within twice the p99 measured
//! without the flood, earlier in the same run.
//!
//! A flow is what a user's signature takes: the service creates the request, the gateway posts
//! the device's approval, the service reads the signed result. The clients are made once and
//! keep their connections, so that what is timed is the daemon's work.
//!
//! What limits the flow under the flood is CPU, not the HSM: the flood makes no HSM work but for
//! its nonce requests (in the background lane, never ahead of a user signature). The daemon
//! serves the CA listener on a thread of its own at nice 10, so the flood takes the CPU that
//! signing leaves over. One CI run missed the bound with a p99 of 51 ms against 5.8 ms: the
//! outliers were all 45-51 ms, the client's delayed ACK waiting on a response held back by
//! Nagle's algorithm. The listeners now set `TCP_NODELAY`, and the p99 ratio measured 1.1-1.4.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::signature::Signer;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use sha2::Digest;
use smartsign_tests::flow::Pending;
use smartsign_tests::{DevDaemon, describe, run};

/// Flows before measuring (connections, caches, the status check's first answer).
const WARM_UP: usize = 5;
/// Flows measured in each phase: enough that the p99 is not one scheduling hiccup (with 400,
/// four flows lie above it).
const FLOWS: usize = 400;
/// Threads flooding the CA listener.
const FLOOD_THREADS: usize = 4;

/// The clients and the account of the signing flow.
struct Flow {
    service: Client,
    gateway: Client,
    api: String,
    pending: Pending,
}

impl Flow {
    /// One whole signature; its duration. Panics unless it signed.
    fn run(&self, n: usize) -> Duration {
        let started = Instant::now();
        let hash = sha2::Sha256::digest(format!("document {n}")).to_vec();
        let created: Value = self
            .service
            .post(format!("{}/v1/signing-requests", self.api))
            .json(
                &json!({"taid": self.pending.taid, "hash_algorithm": "sha256",
                          "hash": STANDARD.encode(&hash)}),
            )
            .send()
            .unwrap()
            .json()
            .unwrap();
        let id = created["request_id"].as_str().expect("a request id");
        let statement = format!(
            "smartsign-authorise-v1\n{id}\n{}\nsha256\n{}\napprove",
            created["identification_code"].as_str().unwrap(),
            hex::encode(&hash)
        );
        let signature: p256::ecdsa::Signature = self.pending.key.sign(statement.as_bytes());
        let url = format!("{}/v1/signing-requests/{id}", self.api);
        let approved = self
            .gateway
            .post(format!("{url}/authorisation"))
            .json(&json!({"decision": "approve",
                          "device_signature": STANDARD.encode(signature.to_der().as_bytes())}))
            .send()
            .unwrap();
        let approved_status = approved.status();
        assert_eq!(
            approved_status,
            200,
            "flow {n}: {}",
            approved.text().unwrap_or_default()
        );
        let read: Value = self.service.get(&url).send().unwrap().json().unwrap();
        assert_eq!(read["status"], "signed", "flow {n}: {read}");
        started.elapsed()
    }

    /// `count` flows in a row; their durations, sorted.
    fn measure(&self, first: usize, count: usize) -> Vec<Duration> {
        let mut times: Vec<Duration> = (first..first + count).map(|n| self.run(n)).collect();
        times.sort();
        times
    }
}

/// The `p`th percentile (nearest rank) of sorted `times`.
fn percentile(times: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * times.len() as f64).ceil() as usize;
    times[rank.clamp(1, times.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What one flood thread sends, in turn, and how it counts the answers.
#[derive(Default)]
struct FloodCounts {
    requests: AtomicU64,
    ocsp_successful: AtomicU64,
    ocsp_malformed: AtomicU64,
    ocsp_try_later: AtomicU64,
    other: AtomicU64,
}

/// The status byte of a DER OCSPResponse (`30 len 0a 01 status`), short-form lengths only.
fn ocsp_status(der: &[u8]) -> Option<u8> {
    match der {
        [0x30, len, 0x0a, 0x01, status, ..] if *len < 0x80 => Some(*status),
        [0x30, 0x81, _, 0x0a, 0x01, status, ..] => Some(*status),
        [0x30, 0x82, _, _, 0x0a, 0x01, status, ..] => Some(*status),
        _ => None,
    }
}

/// CPU time (user + system) used so far by process `pid`, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after its last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name, in ticks.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// `openssl ocsp` writes a request (DER) into `dir/file` for `args`, without sending it.
fn ocsp_request(dir: &Path, file: &str, args: &[&str]) -> Vec<u8> {
    let out = run(Command::new("openssl")
        .current_dir(dir)
        .args(["ocsp", "-reqout", file])
        .args(args));
    assert!(out.status.success(), "{}", describe(&out));
    std::fs::read(dir.join(file)).unwrap()
}

/// A well-formed CMP initialisation request, protected by password-based MAC with a secret
/// the CA does not know, as `openssl cmp` sends it (the CA refuses it before any HSM work).
fn cmp_request(dir: &Path, ca: &str) -> Vec<u8> {
    let key = run(Command::new("openssl").current_dir(dir).args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "cmp.key",
    ]));
    assert!(key.status.success(), "{}", describe(&key));
    // It fails (the CA refuses the sender); the request it sent is what the flood replays.
    let _ = run(Command::new("openssl").current_dir(dir).args([
        "cmp",
        "-cmd",
        "ir",
        "-server",
        ca.trim_start_matches("http://"),
        "-path",
        "cmp",
        "-ref",
        "flood",
        "-secret",
        "pass:not-the-secret",
        "-newkey",
        "cmp.key",
        "-subject",
        "/CN=flood",
        "-unprotected_errors",
        "-reqout",
        "ir.der",
        "-certout",
        "ir-cert.pem",
    ]));
    std::fs::read(dir.join("ir.der")).expect("openssl cmp wrote its request")
}

#[test]
fn a_flood_of_the_ca_listener_does_not_slow_user_signing() {
    let daemon = DevDaemon::start(&[]);
    let pending = Pending::new(&daemon, "u-flood-ca");
    let flow = Flow {
        service: daemon.client("demo-a"),
        gateway: daemon.client("gateway"),
        api: daemon.api.clone(),
        pending,
    };

    // The user's certificate, for well-formed OCSP requests about it.
    flow.pending.approve(&daemon);
    let signed = flow.pending.read(&daemon);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ee.pem"),
        signed["result"]["certificate"].as_str().unwrap(),
    )
    .unwrap();
    let issuing = reqwest::blocking::get(format!("{}/ca/issuing.pem", daemon.ca))
        .unwrap()
        .bytes()
        .unwrap();
    std::fs::write(dir.path().join("issuing.pem"), &issuing).unwrap();
    let root = reqwest::blocking::get(format!("{}/ca/root.pem", daemon.ca))
        .unwrap()
        .bytes()
        .unwrap();
    std::fs::write(dir.path().join("root.pem"), &root).unwrap();
    let issuer = ["-issuer", "issuing.pem", "-cert", "ee.pem"];
    let cached = ocsp_request(
        dir.path(),
        "cached.der",
        &[&issuer[..], &["-no_nonce"]].concat(),
    );
    let with_nonce = ocsp_request(
        dir.path(),
        "nonce.der",
        &[&issuer[..], &["-nonce"]].concat(),
    );
    let too_many = ocsp_request(
        dir.path(),
        "many.der",
        &[
            "-issuer",
            "issuing.pem",
            "-no_nonce",
            "-serial",
            "0x1",
            "-serial",
            "0x2",
            "-serial",
            "0x3",
            "-serial",
            "0x4",
            "-serial",
            "0x5",
        ],
    );

    // The cache at work: the same request twice gives the same bytes (ECDSA signatures are
    // randomised, so a second signature would differ), which openssl verifies.
    let ocsp_url = format!("{}/ocsp", daemon.ca);
    let post_ocsp = |client: &Client, body: &[u8]| {
        client
            .post(&ocsp_url)
            .header("content-type", "application/ocsp-request")
            .body(body.to_vec())
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .to_vec()
    };
    let probe = Client::new();
    let first = post_ocsp(&probe, &cached);
    assert_eq!(post_ocsp(&probe, &cached), first, "not the cached response");
    std::fs::write(dir.path().join("resp.der"), &first).unwrap();
    let verified = run(Command::new("openssl").current_dir(dir.path()).args([
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
    ]));
    let text = describe(&verified);
    assert!(
        verified.status.success() && text.contains("Response verify OK") && text.contains("good"),
        "{text}"
    );

    let cached_probe = cached.clone();
    let cmp_request = cmp_request(dir.path(), &daemon.ca);

    // Unloaded, first, in the same run.
    flow.measure(0, WARM_UP);
    let unloaded = flow.measure(WARM_UP, FLOWS);

    // Loaded: the flood runs while the same number of flows is measured.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(FloodCounts::default());
    let bodies: Arc<Vec<(&'static str, Vec<u8>)>> = Arc::new(vec![
        ("/ocsp", cached.clone()),
        ("/ocsp", b"\x30\x82\x01\x00garbage".to_vec()),
        ("/cmp", b"not a PKIMessage".to_vec()),
        ("/ocsp", with_nonce),
        ("/cmp", vec![0x30, 0x80, 0x30, 0x80, 0x00, 0x00]),
        ("/cmp", cmp_request),
        ("/ocsp", too_many),
        ("/ocsp", cached),
    ]);
    let flooders: Vec<_> = (0..FLOOD_THREADS)
        .map(|t| {
            let (stop, counts, bodies) =
                (Arc::clone(&stop), Arc::clone(&counts), Arc::clone(&bodies));
            let ca = daemon.ca.clone();
            std::thread::spawn(move || {
                let client = Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let (path, body) = &bodies[i % bodies.len()];
                    i += 1;
                    let content_type = if *path == "/cmp" {
                        "application/pkixcmp"
                    } else {
                        "application/ocsp-request"
                    };
                    let answer = client
                        .post(format!("{ca}{path}"))
                        .header("content-type", content_type)
                        .body(body.clone())
                        .send()
                        .and_then(|r| r.bytes());
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    let counter = match (*path, answer.as_deref().ok().and_then(ocsp_status)) {
                        ("/ocsp", Some(0)) => &counts.ocsp_successful,
                        ("/ocsp", Some(1)) => &counts.ocsp_malformed,
                        ("/ocsp", Some(3)) => &counts.ocsp_try_later,
                        _ => &counts.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let the flood reach its pace first.
    std::thread::sleep(Duration::from_millis(500));
    let flood_started = Instant::now();
    let before = counts.requests.load(Ordering::Relaxed);
    let daemon_pid = daemon.pid().unwrap();
    let (daemon_cpu, own_cpu) = (cpu_time(daemon_pid), cpu_time(std::process::id()));
    let loaded = flow.measure(WARM_UP + FLOWS, FLOWS);
    let wall = flood_started.elapsed();
    let (daemon_cpu, own_cpu) = (
        cpu_time(daemon_pid) - daemon_cpu,
        cpu_time(std::process::id()) - own_cpu,
    );
    let flood_rate = (counts.requests.load(Ordering::Relaxed) - before) as f64 / wall.as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().unwrap();
    }

    let (u50, u90, u99) = (
        percentile(&unloaded, 50.0),
        percentile(&unloaded, 90.0),
        percentile(&unloaded, 99.0),
    );
    let (l50, l90, l99) = (
        percentile(&loaded, 50.0),
        percentile(&loaded, 90.0),
        percentile(&loaded, 99.0),
    );
    println!(
        "signing flow, {FLOWS} flows each: unloaded p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms; \
         under the flood p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms (p99 ratio {:.2})",
        ms(u50),
        ms(u90),
        ms(u99),
        ms(l50),
        ms(l90),
        ms(l99),
        l99.as_secs_f64() / u99.as_secs_f64()
    );
    println!(
        "CPU while measured under the flood ({:.2} s): the daemon {:.2} s, this test process \
         (flood clients and the flow's client) {:.2} s, of {} cores",
        wall.as_secs_f64(),
        daemon_cpu.as_secs_f64(),
        own_cpu.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!(
        "flood: {FLOOD_THREADS} threads, {} requests ({flood_rate:.0}/s while measured): OCSP \
         successful {}, malformedRequest {}, tryLater {}; other answers (CMP errors) {}",
        counts.requests.load(Ordering::Relaxed),
        counts.ocsp_successful.load(Ordering::Relaxed),
        counts.ocsp_malformed.load(Ordering::Relaxed),
        counts.ocsp_try_later.load(Ordering::Relaxed),
        counts.other.load(Ordering::Relaxed),
    );
    // The cached response is still the one given before the flood: the flood's thousands of
    // identical queries made no new signature.
    assert_eq!(
        post_ocsp(&probe, &cached_probe),
        first,
        "the flood made a new signature"
    );
    assert!(counts.ocsp_successful.load(Ordering::Relaxed) > 0);
    assert!(
        l99 <= 2 * u99,
        "the flow's p99 under the flood ({:.1} ms) is more than twice the unloaded p99 ({:.1} ms)",
        ms(l99),
        ms(u99)
    );
}
