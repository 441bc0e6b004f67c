//! Renewal and re-application (API.md, "Consent for renewal and re-application"; DOMAIN.md,
//! "iAM Smart-Cert lifecycle"): the renewal window's edges, the renewals due, the device's
//! consent, what a renewal does to the old certificate (openssl asks the embedded CA's OCSP),
//! re-application after expiry and after a minor's revocation, and recovery after a crash in the
//! middle of a renewal.

// Test code: a panic, with the reason, is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use serde_json::{Value, json};
use sha2::Digest;
use smartsign_tests::flow::{Pending, problem, registration, verify_audit};
use smartsign_tests::{DevDaemon, describe, device_key, run};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// `policy.renewal_window_days` of the development configuration.
const WINDOW: Duration = Duration::days(60);

fn parse_time(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap()
}

fn format_time(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap()
}

/// Moves the daemon's clock (forward only: the embedded CA's certificates start at its first
/// start). The clock keeps whole seconds of offset, so it may read up to a second earlier than
/// `now` right after.
fn set_clock(daemon: &DevDaemon, now: OffsetDateTime) {
    let response = daemon
        .client("officer")
        .post(format!("{}/v1/admin/clock", daemon.api))
        .json(&json!({"now": format_time(now)}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Sets the clock so that it reads at least `now` (and less than a second more) when it returns.
fn set_clock_at_least(daemon: &DevDaemon, now: OffsetDateTime) {
    set_clock(daemon, now);
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

fn register(daemon: &DevDaemon, body: &Value) -> Value {
    let response = daemon
        .client("registrar")
        .post(format!("{}/v1/accounts", daemon.api))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json().unwrap()
}

fn account(daemon: &DevDaemon, id: &str) -> Value {
    let response = daemon
        .client("registrar")
        .get(format!("{}/v1/accounts/{id}", daemon.api))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().unwrap()
}

fn not_after(account: &Value) -> OffsetDateTime {
    parse_time(account["certificate"]["not_after"].as_str().unwrap())
}

fn challenge_response(daemon: &DevDaemon, id: &str, purpose: &str) -> reqwest::blocking::Response {
    daemon
        .client("gateway")
        .get(format!(
            "{}/v1/accounts/{id}/consent-challenge?purpose={purpose}",
            daemon.api
        ))
        .send()
        .unwrap()
}

fn challenge(daemon: &DevDaemon, id: &str, purpose: &str) -> String {
    let response = challenge_response(daemon, id, purpose);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["purpose"], purpose);
    body["nonce"].as_str().unwrap().to_owned()
}

/// The device's consent for `purpose`, signed by `key` over `nonce`.
fn consent(id: &str, purpose: &str, nonce: &str, key: &SigningKey) -> Value {
    let statement = format!("smartsign-consent-v1\n{purpose}\n{id}\n{nonce}");
    let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
    json!({"nonce": nonce, "device_signature": STANDARD.encode(signature.to_der().as_bytes())})
}

/// Sends a consent to `route` (`renewal` or `reapply`).
fn send(daemon: &DevDaemon, id: &str, route: &str, body: &Value) -> reqwest::blocking::Response {
    daemon
        .client("gateway")
        .post(format!(
            "{}/v1/accounts/{id}/certificate/{route}",
            daemon.api
        ))
        .json(body)
        .send()
        .unwrap()
}

/// A fresh challenge and the device's consent to it, sent to `route`.
fn consent_and_send(
    daemon: &DevDaemon,
    id: &str,
    route: &str,
    key: &SigningKey,
) -> reqwest::blocking::Response {
    let purpose = if route == "renewal" {
        "renew"
    } else {
        "reapply"
    };
    let nonce = challenge(daemon, id, purpose);
    send(daemon, id, route, &consent(id, purpose, &nonce, key))
}

/// Signs a hash as `id` through the whole flow (TAID, request, approval) and returns the result.
fn sign(daemon: &DevDaemon, id: &str, key: &SigningKey) -> Value {
    let pending = Pending::for_account(
        daemon,
        id,
        key.clone(),
        sha2::Sha256::digest(id.as_bytes()).to_vec(),
    );
    let approved = pending.approve(daemon);
    assert_eq!(approved.status(), 200, "{}", approved.text().unwrap());
    let read = pending.read(daemon);
    assert_eq!(read["status"], "signed", "{read}");
    read["result"].clone()
}

/// Checks a signing result's raw ECDSA signature over the SHA-256 of `signed` with
/// `openssl dgst -verify` and returns the signer certificate's serial (lower-case hex).
fn verify_signature(dir: &Path, result: &Value, signed: &[u8]) -> String {
    std::fs::write(
        dir.join("signer.pem"),
        result["certificate"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("data"), signed).unwrap();
    std::fs::write(
        dir.join("signature.der"),
        STANDARD
            .decode(result["signature"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let key = run(Command::new("openssl")
        .args([
            "x509",
            "-in",
            "signer.pem",
            "-pubkey",
            "-noout",
            "-out",
            "signer.pub",
        ])
        .current_dir(dir));
    assert!(key.status.success(), "{}", describe(&key));
    let verified = run(Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            "signer.pub",
            "-signature",
            "signature.der",
            "data",
        ])
        .current_dir(dir));
    assert!(verified.status.success(), "{}", describe(&verified));
    let serial = run(Command::new("openssl")
        .args(["x509", "-in", "signer.pem", "-serial", "-noout"])
        .current_dir(dir));
    String::from_utf8_lossy(&serial.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_lowercase()
}

/// The embedded CA's OCSP answer for `pem`, as openssl reads it.
fn ocsp(daemon: &DevDaemon, dir: &Path, pem: &str) -> String {
    std::fs::write(dir.join("ee.pem"), pem).unwrap();
    let ca = daemon.state_dir().join("ca");
    let output = run(Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(ca.join("issuing.pem"))
        .args(["-cert", "ee.pem", "-url", &format!("{}/ocsp", daemon.ca)])
        .arg("-CAfile")
        .arg(ca.join("root.pem"))
        .arg("-verify_other")
        .arg(ca.join("issuing.pem"))
        .args(["-nonce", "-resp_text"])
        .current_dir(dir));
    assert!(output.status.success(), "{}", describe(&output));
    describe(&output)
}

/// The embedded CA's OCSP answer for the certificate with this serial (lower-case hex).
fn ocsp_serial(daemon: &DevDaemon, serial: &str) -> String {
    let ca = daemon.state_dir().join("ca");
    let output = run(Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(ca.join("issuing.pem"))
        .args(["-serial", &format!("0x{serial}")])
        .args(["-url", &format!("{}/ocsp", daemon.ca)])
        .arg("-CAfile")
        .arg(ca.join("root.pem"))
        .arg("-verify_other")
        .arg(ca.join("issuing.pem"))
        .args(["-nonce", "-resp_text"]));
    assert!(output.status.success(), "{}", describe(&output));
    describe(&output)
}

fn serial_of(account: &Value) -> String {
    account["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn due(daemon: &DevDaemon) -> Vec<String> {
    let response = daemon
        .client("registrar")
        .get(format!("{}/v1/renewals/due", daemon.api))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    let mut ids: Vec<String> = body["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            assert!(entry["serial"].is_string() && entry["not_after"].is_string());
            entry["account_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    ids
}

/// The window's edges (one account per edge), the renewals due, the consent refusals, the
/// renewed certificate signing and the old one revoked as superseded, and re-application:
/// refused while the certificate is valid, accepted after it expired.
#[test]
fn renewal_is_possible_from_the_window_opening_until_just_before_not_after() {
    let daemon = DevDaemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<SigningKey> = (0..6).map(|_| device_key()).collect();
    // Registered in this order, so their notAfter do not decrease.
    let ids = [
        "u-early",
        "u-open",
        "u-last",
        "u-late",
        "u-revoked",
        "u-paused",
    ];
    let accounts: Vec<Value> = ids
        .iter()
        .zip(&keys)
        .map(|(id, key)| register(&daemon, &registration(id, "1990-01-01", key)))
        .collect();
    let plain = {
        let mut body = registration("u-plain", "1990-01-01", &device_key());
        body["tier"] = json!("iam_smart");
        register(&daemon, &body)
    };
    assert!(plain["certificate"].is_null());
    let [early, open, last, late, ..] = &accounts[..] else {
        unreachable!()
    };
    let registrar = daemon.client("registrar");
    let revoked = registrar
        .post(format!(
            "{}/v1/accounts/u-revoked/certificate/revoke",
            daemon.api
        ))
        .json(&json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let paused = registrar
        .post(format!("{}/v1/accounts/u-paused/suspend", daemon.api))
        .json(&json!({"by": "user"}))
        .send()
        .unwrap();
    assert_eq!(paused.status(), 200);

    // One second before the window opens: not due.
    set_clock(&daemon, not_after(early) - WINDOW - Duration::SECOND);
    assert_eq!(
        problem(consent_and_send(&daemon, "u-early", "renewal", &keys[0])),
        (409, "renewal_not_due".into())
    );
    assert_eq!(
        problem(challenge_response(&daemon, "u-plain", "renew")),
        (409, "not_iam_smart_plus".into())
    );

    // At the opening instant: renewed; the old certificate is revoked as superseded.
    set_clock_at_least(&daemon, not_after(open) - WINDOW);
    let nonce = challenge(&daemon, "u-open", "renew");
    let body = consent("u-open", "renew", &nonce, &keys[1]);
    let renewed = send(&daemon, "u-open", "renewal", &body);
    assert_eq!(renewed.status(), 200);
    let renewed: Value = renewed.json().unwrap();
    assert_ne!(serial_of(&renewed), serial_of(open));
    assert_eq!(renewed["certificate"]["status"], "valid");
    assert_eq!(renewed["status"], "active");
    assert!(not_after(&renewed) > not_after(open));
    // The nonce was used.
    assert_eq!(
        problem(send(&daemon, "u-open", "renewal", &body)),
        (422, "authorisation_invalid".into())
    );
    let old_pem = open["certificate"]["pem"].as_str().unwrap();
    let answer = ocsp(&daemon, dir.path(), old_pem);
    assert!(answer.contains(": revoked"), "{answer}");
    assert!(answer.contains("Reason: superseded"), "{answer}");
    let result = sign(&daemon, "u-open", &keys[1]);
    let signer = verify_signature(dir.path(), &result, b"u-open");
    assert_eq!(
        signer.trim_start_matches('0'),
        serial_of(&renewed),
        "signed by the new certificate"
    );

    // Inside every window: due are the active "iAM Smart+" accounts with a valid certificate
    // in it; not the renewed, revoked, suspended or plain ones, nor one registered now.
    let inside = not_after(early) - Duration::days(30);
    set_clock(&daemon, inside);
    register(&daemon, &registration("u-new", "1990-01-01", &device_key()));
    assert_eq!(due(&daemon), ["u-early", "u-last", "u-late"]);

    // Re-applying while the certificate is valid is refused.
    assert_eq!(
        problem(consent_and_send(&daemon, "u-early", "reapply", &keys[0])),
        (409, "renewal_not_due".into())
    );
    // Consent refusals: a nonce given for the other purpose, another key's signature, and a
    // challenge past its expiry.
    let nonce = challenge(&daemon, "u-early", "reapply");
    assert_eq!(
        problem(send(
            &daemon,
            "u-early",
            "renewal",
            &consent("u-early", "renew", &nonce, &keys[0])
        )),
        (422, "authorisation_invalid".into())
    );
    let nonce = challenge(&daemon, "u-early", "renew");
    assert_eq!(
        problem(send(
            &daemon,
            "u-early",
            "renewal",
            &consent("u-early", "renew", &nonce, &keys[5])
        )),
        (422, "authorisation_invalid".into())
    );
    let nonce = challenge(&daemon, "u-early", "renew");
    set_clock(&daemon, inside + Duration::seconds(300));
    assert_eq!(
        problem(send(
            &daemon,
            "u-early",
            "renewal",
            &consent("u-early", "renew", &nonce, &keys[0])
        )),
        (410, "request_expired".into())
    );
    // A revoked certificate is not renewed.
    assert_eq!(
        problem(consent_and_send(&daemon, "u-revoked", "renewal", &keys[4])),
        (409, "certificate_revoked".into())
    );
    // A suspended account gets no challenge; nor a renewal with a challenge from before.
    let nonce = challenge(&daemon, "u-early", "renew");
    let suspend = |id: &str| {
        let response = registrar
            .post(format!("{}/v1/accounts/{id}/suspend", daemon.api))
            .json(&json!({"by": "government"}))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    assert_eq!(
        problem(challenge_response(&daemon, "u-paused", "renew")),
        (409, "account_not_active".into())
    );
    suspend("u-early");
    assert_eq!(
        problem(send(
            &daemon,
            "u-early",
            "renewal",
            &consent("u-early", "renew", &nonce, &keys[0])
        )),
        (409, "account_not_active".into())
    );

    // One second before notAfter: still renewed.
    set_clock(&daemon, not_after(last) - Duration::SECOND);
    let renewed = consent_and_send(&daemon, "u-last", "renewal", &keys[2]);
    assert_eq!(renewed.status(), 200);
    let renewed: Value = renewed.json().unwrap();
    assert_ne!(serial_of(&renewed), serial_of(last));

    // After notAfter: too late; re-application gives a new certificate that signs.
    set_clock(&daemon, not_after(late) + Duration::SECOND);
    assert_eq!(
        problem(consent_and_send(&daemon, "u-late", "renewal", &keys[3])),
        (409, "renewal_too_late".into())
    );
    let reapplied = consent_and_send(&daemon, "u-late", "reapply", &keys[3]);
    assert_eq!(reapplied.status(), 200);
    let reapplied: Value = reapplied.json().unwrap();
    assert_ne!(serial_of(&reapplied), serial_of(late));
    assert_eq!(reapplied["certificate"]["status"], "valid");
    assert_eq!(reapplied["certificate"]["profile"], "adult");
    sign(&daemon, "u-late", &keys[3]);
    assert!(
        account(&daemon, "u-late")["certificate"]["serial"] == reapplied["certificate"]["serial"]
    );
}

/// A minor's certificate is revoked (as at 18); after turning 18 the user re-applies and gets
/// the adult profile.
#[test]
fn minor_whose_certificate_was_revoked_reapplies_at_18_as_an_adult() {
    let daemon = DevDaemon::start(&[]);
    let key = device_key();
    // 18 in about 100 days, on the Hong Kong date.
    let today = (OffsetDateTime::now_utc() + Duration::hours(8)).date();
    let base = today.replace_day(today.day().min(28)).unwrap();
    let dob = base.replace_year(base.year() - 18).unwrap() + Duration::days(100);
    let mut body = registration("u-minor", &dob.to_string(), &key);
    body["guardian"] = json!({"hkic_number": "A1234563", "date_of_birth": "1980-02-29"});
    let minor = register(&daemon, &body);
    assert_eq!(minor["minor"], true);
    assert_eq!(minor["certificate"]["profile"], "minor");
    let revoked = daemon
        .client("registrar")
        .post(format!(
            "{}/v1/accounts/u-minor/certificate/revoke",
            daemon.api
        ))
        .json(&json!({"reason": "cessation_of_operation"}))
        .send()
        .unwrap();
    assert_eq!(revoked.status(), 200);

    // The day after the 18th birthday (UTC noon is 20:00 in Hong Kong).
    // A 29 February birthday falls on 1 March in a common year.
    let birthday = dob.replace_year(dob.year() + 18).unwrap_or_else(|_| {
        time::Date::from_calendar_date(dob.year() + 18, time::Month::March, 1).unwrap()
    });
    set_clock(
        &daemon,
        (birthday + Duration::days(1)).midnight().assume_utc() + Duration::hours(12),
    );
    let reapplied = consent_and_send(&daemon, "u-minor", "reapply", &key);
    assert_eq!(reapplied.status(), 200);
    let reapplied: Value = reapplied.json().unwrap();
    assert_eq!(reapplied["minor"], false);
    assert_eq!(reapplied["certificate"]["profile"], "adult");
    assert_eq!(reapplied["certificate"]["status"], "valid");
    assert_ne!(serial_of(&reapplied), serial_of(&minor));
    sign(&daemon, "u-minor", &key);
}

/// The daemon dies (abort, as SIGKILL) at three steps of a renewal: after the new key, after
/// the CA issued, and after the new certificate became current; and after the CA issued a
/// re-application's certificate. After the restarts every renewed account has one current valid
/// certificate with its key and signs; a certificate issued but not kept is revoked at the CA;
/// the old one is superseded where the renewal got through; the re-application can be made
/// again; the audit log verifies.
#[test]
fn renewal_killed_at_any_step_is_finished_or_undone_at_the_next_start() {
    let mut daemon = DevDaemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let steps = [
        "renewal-after-key",
        "renewal-after-issue",
        "renewal-after-store",
        "reapply-after-issue",
    ];
    let keys: Vec<SigningKey> = steps.iter().map(|_| device_key()).collect();
    let ids = [
        "u-crash-key",
        "u-crash-issue",
        "u-crash-store",
        "u-crash-reapply",
    ];
    let registered: Vec<Value> = ids
        .iter()
        .zip(&keys)
        .map(|(id, key)| register(&daemon, &registration(id, "1990-01-01", key)))
        .collect();
    // The last one re-applies after a revocation.
    let revoked = daemon
        .client("registrar")
        .post(format!(
            "{}/v1/accounts/u-crash-reapply/certificate/revoke",
            daemon.api
        ))
        .json(&json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    assert_eq!(revoked.status(), 200);
    // Inside the renewal window of all three; the clock goes back to real time at each start,
    // so it is moved again (a little further) each time.
    let mut now = not_after(&registered[0]) - Duration::days(10);

    for (i, step) in steps.iter().enumerate() {
        daemon.set_env("SMARTSIGND_FAILPOINT", Some(step));
        daemon.restart();
        now += Duration::minutes(1);
        set_clock(&daemon, now);
        let (purpose, route) = if i < 3 {
            ("renew", "renewal")
        } else {
            ("reapply", "reapply")
        };
        let nonce = challenge(&daemon, ids[i], purpose);
        let answer = daemon
            .client("gateway")
            .post(format!(
                "{}/v1/accounts/{}/certificate/{route}",
                daemon.api, ids[i]
            ))
            .json(&consent(ids[i], purpose, &nonce, &keys[i]))
            .send();
        assert!(answer.is_err(), "the daemon answered at {step}: {answer:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !daemon.exited() {
            assert!(std::time::Instant::now() < deadline, "no abort at {step}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    daemon.set_env("SMARTSIGND_FAILPOINT", None);
    daemon.restart();
    now += Duration::minutes(1);
    set_clock(&daemon, now);

    let log = daemon.log();
    // The interrupted re-application left the revoked certificate current; a new one works.
    let reapply = account(&daemon, ids[3]);
    assert_eq!(serial_of(&reapply), serial_of(&registered[3]));
    assert_eq!(reapply["certificate"]["status"], "revoked");
    let reapplied = consent_and_send(&daemon, ids[3], "reapply", &keys[3]);
    assert_eq!(reapplied.status(), 200, "{log}");
    let reapplied: Value = reapplied.json().unwrap();
    assert_ne!(serial_of(&reapplied), serial_of(&registered[3]));
    sign(&daemon, ids[3], &keys[3]);

    for (i, id) in ids.iter().take(3).enumerate() {
        let before = &registered[i];
        let after = account(&daemon, id);
        assert_eq!(after["certificate"]["status"], "valid", "{id}: {after}");
        let old_state = ocsp(
            &daemon,
            dir.path(),
            before["certificate"]["pem"].as_str().unwrap(),
        );
        if i < 2 {
            // Undone: the old certificate stays current and good.
            assert_eq!(serial_of(&after), serial_of(before), "{id}");
            assert!(old_state.contains(": good"), "{id}: {old_state}");
        } else {
            // Finished: the new certificate is current, the old one superseded.
            assert_ne!(serial_of(&after), serial_of(before), "{id}");
            assert!(old_state.contains(": revoked"), "{id}: {old_state}");
            assert!(
                old_state.contains("Reason: superseded"),
                "{id}: {old_state}"
            );
        }
        let result = sign(&daemon, id, &keys[i]);
        let signer = verify_signature(dir.path(), &result, id.as_bytes());
        assert_eq!(signer.trim_start_matches('0'), serial_of(&after), "{id}");
        // Nothing of the crash is in the way: the undone ones renew now; the finished one has a
        // new certificate, not due yet.
        let renewed = consent_and_send(&daemon, id, "renewal", &keys[i]);
        if i < 2 {
            assert_eq!(renewed.status(), 200, "{id}: {log}");
        } else {
            assert_eq!(problem(renewed), (409, "renewal_not_due".into()));
        }
    }

    let records = verify_audit(&daemon, dir.path());
    // The certificates issued at "renewal-after-issue" and "reapply-after-issue" were revoked by
    // the recovery: the records say so, and the CA's OCSP knows it.
    let undone: Vec<Value> = records
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|record| record.to_string().contains("certificate.key_change_undone"))
        .collect();
    assert_eq!(undone.len(), 3, "{undone:?}");
    let issued: Vec<String> = undone
        .iter()
        .map(Value::to_string)
        .filter(|record| record.contains("\"revoked_at_ca\":true"))
        .collect();
    assert_eq!(issued.len(), 2, "{undone:?}");
    for record in issued {
        let serial = record
            .split("\"serial\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        let answer = ocsp_serial(&daemon, serial);
        assert!(answer.contains(": revoked"), "{answer}");
        assert!(answer.contains("Reason: cessationOfOperation"), "{answer}");
    }
    let finished = records
        .lines()
        .filter(|line| line.contains("certificate.key_change_finished"))
        .count();
    assert_eq!(finished, 1);
    assert!(!records.contains("WONGSURNAME"));
}
