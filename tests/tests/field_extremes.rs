//! Every time and number from the network is range-checked where it is parsed (issue 14,
//! section 2): each route's fields sent at their extremes, wrong types among them, get 400 or
//! 422 naming the field (never a 5xx or a reset connection), and change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use smartsign_tests::flow::{Pending, registration};
use smartsign_tests::{DevDaemon, device_key};

/// One bad request: who sends it, where, with what, and the field the refusal must name.
struct Case {
    client: &'static str,
    method: &'static str,
    path: String,
    body: Option<Value>,
    field: &'static str,
}

/// `base` with `field` (`a.b` for a nested one) set to `value`.
fn with(base: &Value, field: &str, value: Value) -> Value {
    let mut body = base.clone();
    let mut target = &mut body;
    let mut parts = field.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            target[part] = value;
            break;
        }
        target = &mut target[part];
    }
    body
}

const LONG: usize = 10_000;

/// Text values at the edges: empty, too long, a control character, astral characters.
fn texts() -> Vec<Value> {
    vec![
        json!(""),
        json!("x".repeat(LONG)),
        json!("a\u{0}b"),
        json!("𝕏".repeat(2000)),
    ]
}

/// Values of the wrong JSON type.
fn wrong_types() -> Vec<Value> {
    vec![
        json!(18_446_744_073_709_551_615u64),
        json!(-1),
        json!(1e308),
        json!(true),
        json!([]),
        json!({}),
    ]
}

/// Times that are not in range (or not times at all).
fn times() -> Vec<Value> {
    vec![
        json!("9999-12-31T23:59:59Z"),
        json!("0000-01-01T00:00:00Z"),
        json!("1969-12-31T23:59:59Z"),
        json!("2026-13-01T00:00:00Z"),
        json!("+275760-09-13T00:00:00Z"),
        json!("2026-01-01T00:00:00+99:00"),
    ]
}

fn cases(pending: &Pending, api: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut push = |client, method, path: String, body: Option<Value>, field| {
        cases.push(Case {
            client,
            method,
            path: format!("{api}{path}"),
            body,
            field,
        })
    };
    // Registration.
    let key = device_key();
    let register = registration("u-extreme-new", "1990-01-01", &key);
    for field in [
        "account_id",
        "tier",
        "surname",
        "given_name",
        "hkic_number",
        "device_public_key",
        "date_of_birth",
    ] {
        for value in texts().into_iter().chain(wrong_types()) {
            // Every text here is out of range for every one of these fields (the names take
            // 1 to 100 characters).
            push(
                "registrar",
                "POST",
                "/v1/accounts".into(),
                Some(with(&register, field, value)),
                field,
            );
        }
    }
    for date in [
        "9999-12-31",
        "0001-01-01",
        "1899-12-31",
        "2024-02-30",
        "+10000-01-01",
        "2100-01-01",
    ] {
        push(
            "registrar",
            "POST",
            "/v1/accounts".into(),
            Some(with(&register, "date_of_birth", json!(date))),
            "date_of_birth",
        );
        let minor = with(
            &registration("u-extreme-minor", "2014-01-01", &key),
            "guardian",
            json!({"hkic_number": "A1234563", "date_of_birth": date}),
        );
        push(
            "registrar",
            "POST",
            "/v1/accounts".into(),
            Some(minor),
            "date_of_birth",
        );
    }
    // Signing requests.
    let create = json!({"taid": pending.taid, "hash_algorithm": "sha256",
                        "hash": STANDARD.encode(&pending.hash)});
    for field in [
        "taid",
        "hash_algorithm",
        "hash",
        "hkic_number",
        "description",
    ] {
        for value in texts().into_iter().chain(wrong_types()) {
            if field == "description" && value == json!("") {
                continue; // an empty description is allowed
            }
            push(
                "demo-a",
                "POST",
                "/v1/signing-requests".into(),
                Some(with(&create, field, value)),
                field,
            );
        }
    }
    // Account changes.
    let account = "/v1/accounts/u-extreme";
    for value in times().into_iter().chain(wrong_types()) {
        push(
            "registrar",
            "POST",
            format!("{account}/matching"),
            Some(json!({"result": "mismatch", "acknowledged_at": value})),
            "acknowledged_at",
        );
    }
    for value in texts().into_iter().chain(wrong_types()) {
        push(
            "registrar",
            "POST",
            format!("{account}/matching"),
            Some(json!({"result": value})),
            "result",
        );
        push(
            "registrar",
            "POST",
            format!("{account}/suspend"),
            Some(json!({"by": value})),
            "by",
        );
        push(
            "registrar",
            "POST",
            format!("{account}/resume"),
            Some(json!({"by": value})),
            "by",
        );
        push(
            "registrar",
            "PUT",
            format!("{account}/device"),
            Some(json!({"device_public_key": value})),
            "device_public_key",
        );
        push(
            "officer",
            "POST",
            format!("{account}/certificate/revoke"),
            Some(json!({"reason": value})),
            "reason",
        );
        push(
            "gateway",
            "POST",
            format!("{account}/certificate/renewal"),
            Some(json!({"nonce": value, "device_signature": "AAAA"})),
            "nonce",
        );
        push(
            "gateway",
            "POST",
            format!("{account}/deregistration"),
            Some(json!({"nonce": "AAAA", "device_signature": value})),
            "device_signature",
        );
        push(
            "gateway",
            "POST",
            format!(
                "/v1/signing-requests/{}/authorisation",
                pending.request["request_id"].as_str().unwrap()
            ),
            Some(json!({"decision": "approve", "device_signature": value})),
            "device_signature",
        );
    }
    for value in [json!(" x".repeat(LONG / 2)), json!(7)] {
        push(
            "registrar",
            "POST",
            format!("{account}/suspend"),
            Some(json!({"by": "user", "reason": value})),
            "reason",
        );
    }
    for value in times().into_iter().chain(wrong_types()) {
        push(
            "officer",
            "POST",
            "/v1/admin/clock".into(),
            Some(json!({"now": value})),
            "now",
        );
    }
    // Query parameters: numbers past u64, negative, zero where a page needs one, cursors out
    // of range.
    let huge = "18446744073709551616";
    let max = "18446744073709551615";
    for (query, field) in [
        (format!("from={huge}"), "from"),
        ("from=-1".to_owned(), "from"),
        (format!("limit={huge}"), "limit"),
        ("limit=0".to_owned(), "limit"),
        (format!("from={max}"), "from"),
    ] {
        push(
            "auditor",
            "GET",
            format!("/v1/audit/records?{query}"),
            None,
            field,
        );
    }
    for (query, field) in [
        (format!("index={max}&tree_size={max}"), "tree_size"),
        (format!("index={huge}&tree_size=1"), "index"),
        (format!("index=0&tree_size={huge}"), "tree_size"),
        ("index=5&tree_size=2".to_owned(), "index"),
    ] {
        push(
            "auditor",
            "GET",
            format!("/v1/audit/proofs/inclusion?{query}"),
            None,
            field,
        );
    }
    for (query, field) in [
        (format!("first={max}&second={max}"), "second"),
        (format!("first={huge}&second=1"), "first"),
        ("first=3&second=2".to_owned(), "first"),
    ] {
        push(
            "auditor",
            "GET",
            format!("/v1/audit/proofs/consistency?{query}"),
            None,
            field,
        );
    }
    for (query, field) in [
        (format!("limit={huge}"), "limit"),
        ("limit=0".to_owned(), "limit"),
        ("limit=-5".to_owned(), "limit"),
        ("before=9223372036854775807.r-1".to_owned(), "before"),
        ("before=-9223372036854775808.r-1".to_owned(), "before"),
        (format!("before={}", "9".repeat(400)), "before"),
    ] {
        push(
            "gateway",
            "GET",
            format!("{account}/signing-history?{query}"),
            None,
            field,
        );
    }
    for (query, field) in [
        ("service=".to_owned(), "service"),
        (format!("service={}", "x".repeat(2000)), "service"),
    ] {
        push(
            "registrar",
            "GET",
            format!("{account}/taid?{query}"),
            None,
            field,
        );
    }
    for purpose in ["x".repeat(1000), String::new()] {
        push(
            "gateway",
            "GET",
            format!("{account}/consent-challenge?purpose={purpose}"),
            None,
            "purpose",
        );
    }
    cases
}

#[test]
fn each_routes_fields_at_their_extremes_are_refused_naming_the_field_and_change_nothing() {
    let daemon = DevDaemon::start(&[]);
    let pending = Pending::new(&daemon, "u-extreme");
    let registrar = daemon.client("registrar");
    let account_before: Value = registrar
        .get(format!("{}/v1/accounts/u-extreme", daemon.api))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let request_before = pending.read(&daemon);
    let cases = cases(&pending, &daemon.api);
    let mut failures = Vec::new();
    for case in &cases {
        let client = daemon.client(case.client);
        let builder = match case.method {
            "GET" => client.get(&case.path),
            "POST" => client.post(&case.path),
            "PUT" => client.put(&case.path),
            other => panic!("no case uses {other}"),
        };
        let builder = match &case.body {
            Some(body) => builder.json(body),
            None => builder,
        };
        let response = match builder.send() {
            Ok(response) => response,
            Err(error) => {
                failures.push(format!("{} {}: no answer: {error}", case.method, case.path));
                continue;
            }
        };
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        let problem: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let detail = problem["detail"].as_str().unwrap_or_default();
        let summary = || {
            let body = case.body.as_ref().map(Value::to_string).unwrap_or_default();
            let cut: String = body.chars().take(160).collect();
            format!(
                "{} {} {cut}: {status} {}",
                case.method,
                case.path.chars().take(120).collect::<String>(),
                text.chars().take(300).collect::<String>()
            )
        };
        if !matches!(status, 400 | 422) {
            failures.push(format!("expected 400 or 422: {}", summary()));
        } else if !detail.contains(case.field) {
            failures.push(format!(
                "the detail does not name {}: {}",
                case.field,
                summary()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Nothing changed: the account, its request (still pending, same code), and no account
    // was made.
    let account_after: Value = registrar
        .get(format!("{}/v1/accounts/u-extreme", daemon.api))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(account_before, account_after);
    let request_after = pending.read(&daemon);
    assert_eq!(request_before, request_after);
    assert_eq!(request_after["status"], "pending");
    for id in ["u-extreme-new", "u-extreme-minor"] {
        let absent = registrar
            .get(format!("{}/v1/accounts/{id}", daemon.api))
            .send()
            .unwrap();
        assert_eq!(absent.status(), 404, "{id} was registered");
    }
    // The request still signs: three malformed approvals did not lock it.
    assert_eq!(pending.approve(&daemon).status(), 200);
}
