//! Abuse limits in the flows (issue 14, section 2), through the API of a `--dev` daemon: an
//! account takes a bounded number of pending requests with distinct codes, the HKIC check is no
//! oracle, and times from the network are range-checked where they are parsed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use smartsign_tests::DevDaemon;
use smartsign_tests::flow::{Pending, hkic_for, problem, verify_audit};

#[test]
fn a_sixth_pending_request_is_refused_and_the_codes_are_distinct() {
    let daemon = DevDaemon::start(&[]);
    let first = Pending::new(&daemon, "u-flood");
    let mut codes = vec![
        first.request["identification_code"]
            .as_str()
            .unwrap()
            .to_owned(),
    ];
    for _ in 1..5 {
        let created: Value = first.create(&daemon).json().unwrap();
        codes.push(created["identification_code"].as_str().unwrap().to_owned());
    }
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), 5, "five pending requests, five codes");
    assert_eq!(
        problem(first.create(&daemon)),
        (429, "too_many_pending".into())
    );
    // One that ends (here: signed) frees a place.
    let approved = first.approve(&daemon);
    assert_eq!(approved.status(), 200);
    assert_eq!(first.create(&daemon).status(), 201);
}

#[test]
fn three_hkic_mismatches_lock_hkic_carrying_requests_even_with_the_right_number() {
    let daemon = DevDaemon::start(&[]);
    let pending = Pending::new(&daemon, "u-oracle");
    let create = |hkic: &str| {
        daemon
            .client("demo-a")
            .post(format!("{}/v1/signing-requests", daemon.api))
            .json(&json!({"taid": pending.taid, "hash_algorithm": "sha256",
                          "hash": STANDARD.encode(&pending.hash), "hkic_number": hkic}))
            .send()
            .unwrap()
    };
    // The holder's own number passes before the lock.
    let right = hkic_for("u-oracle");
    let wrong = hkic_for("somebody else");
    let passed = create(&right);
    assert_eq!(passed.status(), 201, "{}", passed.text().unwrap());
    for _ in 0..3 {
        assert_eq!(problem(create(&wrong)), (422, "hkic_mismatch".into()));
    }
    // Locked for 24 hours: the right number learns nothing either.
    for _ in 0..4 {
        assert_eq!(problem(create(&right)), (429, "too_many_attempts".into()));
        assert_eq!(problem(create(&wrong)), (429, "too_many_attempts".into()));
    }
    // Requests without an HKIC number go on.
    assert_eq!(pending.create(&daemon).status(), 201);
    // The lock is audited once, the refusals while locked not one by one.
    let export = tempfile::tempdir().unwrap();
    let records = verify_audit(&daemon, export.path());
    let count = |event: &str| {
        records
            .lines()
            .filter(|line| line.contains(&format!("\"{event}\"")))
            .count()
    };
    assert_eq!(count("signing.hkic_locked"), 1);
    assert_eq!(
        count("signing.create_denied"),
        3,
        "the three mismatches only"
    );
}

#[test]
fn a_far_future_acknowledgement_is_a_clear_refusal_and_changes_nothing() {
    let daemon = DevDaemon::start(&[]);
    Pending::new(&daemon, "u-time");
    let registrar = daemon.client("registrar");
    let url = format!("{}/v1/accounts/u-time", daemon.api);
    for at in [
        "9999-12-31T00:00:00Z",
        "2999-01-01T00:00:00Z",
        "1900-01-01T00:00:00Z",
    ] {
        let response = registrar
            .post(format!("{url}/matching"))
            .json(&json!({"result": "mismatch", "acknowledged_at": at}))
            .send()
            .unwrap();
        let (status, code) = problem(response);
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{at}");
    }
    let account: Value = registrar.get(&url).send().unwrap().json().unwrap();
    assert_eq!(account["status"], "active");
    assert_eq!(account["rectify_by"], Value::Null);
    // A past acknowledgement is taken.
    let taken = registrar
        .post(format!("{url}/matching"))
        .json(&json!({"result": "mismatch", "acknowledged_at": "2026-01-01T00:00:00Z"}))
        .send()
        .unwrap();
    assert_eq!(taken.status(), 200);
}

/// The series of the request metrics, by their label sets.
fn request_series(daemon: &DevDaemon) -> usize {
    let text = reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|line| line.contains("http_requests_total{"))
        .count()
}

#[test]
fn made_up_methods_and_paths_add_no_metric_series() {
    let daemon = DevDaemon::start(&[]);
    let client = daemon.client("registrar");
    // The fixed series of unmatched requests exist once any has been seen.
    client
        .get(format!("{}/no-such-route", daemon.api))
        .send()
        .unwrap();
    client
        .request(
            reqwest::Method::from_bytes(b"BREW").unwrap(),
            format!("{}/v1/accounts", daemon.api),
        )
        .send()
        .unwrap();
    let before = request_series(&daemon);
    for n in 0..40 {
        let method = reqwest::Method::from_bytes(format!("X{n}").as_bytes()).unwrap();
        let path = if n % 2 == 0 {
            format!("/made-up/{n}")
        } else {
            "/v1/accounts".to_owned()
        };
        let answer = client
            .request(method, format!("{}{path}", daemon.api))
            .send()
            .unwrap();
        assert!(answer.status().is_client_error(), "{}", answer.status());
    }
    assert_eq!(request_series(&daemon), before, "no new series");
}

#[test]
fn every_answer_carries_a_request_id_and_every_problem_names_it() {
    let daemon = DevDaemon::start(&[]);
    let client = daemon.client("registrar");
    // A valid id of the caller's is kept.
    let answer = client
        .get(format!("{}/v1/accounts/u-nobody", daemon.api))
        .header("x-request-id", "caller-trace.42")
        .send()
        .unwrap();
    assert_eq!(answer.headers()["x-request-id"], "caller-trace.42");
    let body: Value = answer.json().unwrap();
    assert_eq!(body["code"], "not_found");
    assert_eq!(body["request_id"], "caller-trace.42");
    // One that is not (too long, or with other characters) is replaced by a made one.
    for bad in ["x".repeat(65), "with space".to_owned(), "ünï".to_owned()] {
        let answer = client
            .get(format!("{}/v1/accounts/u-nobody", daemon.api))
            .header("x-request-id", bad.as_bytes())
            .send()
            .unwrap();
        let id = answer.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 32, "{id}");
        let body: Value = answer.json().unwrap();
        assert_eq!(body["request_id"], id.as_str());
    }
    // Successful answers carry one too, and unmatched routes.
    let ok = daemon
        .client("auditor")
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.headers().contains_key("x-request-id"));
    let unmatched = client
        .get(format!("{}/no-such-route", daemon.api))
        .send()
        .unwrap();
    assert!(unmatched.headers().contains_key("x-request-id"));
    // The daemon's log lines of a request carry its id.
    assert!(
        daemon.log().contains("caller-trace.42"),
        "the log names the request id"
    );
}
