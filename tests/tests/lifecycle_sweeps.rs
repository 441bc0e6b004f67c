//! The lifecycle sweeps through the HTTP API on a `--dev` daemon, with its clock moved: the minor
//! at 18 (to the second, 29 February included), expiry, the 7-day rectification deadline and the
//! 7-year retention. Each rule is run by `POST /v1/admin/sweep` and checked from the outside:
//! the account, the signing refusal, and the embedded CA's OCSP answer as openssl reads it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use smartsign_tests::flow::{problem, registration, verify_audit};
use smartsign_tests::{DevDaemon, describe, device_key, run};

struct Lifecycle {
    daemon: DevDaemon,
}

impl Lifecycle {
    fn start() -> Lifecycle {
        Lifecycle {
            daemon: DevDaemon::start(&[]),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.daemon.api)
    }

    fn set_clock(&self, now: &str) {
        let response = self
            .daemon
            .client("officer")
            .post(self.url("/v1/admin/clock"))
            .json(&json!({"now": now}))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().unwrap());
    }

    fn sweep(&self) -> Value {
        let response = self
            .daemon
            .client("officer")
            .post(self.url("/v1/admin/sweep"))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().unwrap()
    }

    /// Registers an "iAM Smart+" account; a minor gets a guardian born in 1980.
    fn register(&self, id: &str, dob: &str) -> Value {
        let mut body = registration(id, dob, &device_key());
        if dob > "2008" {
            body["guardian"] = json!({"hkic_number": "A1234563", "date_of_birth": "1980-01-01"});
        }
        let response = self
            .daemon
            .client("registrar")
            .post(self.url("/v1/accounts"))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().unwrap());
        response.json().unwrap()
    }

    fn account(&self, id: &str) -> Value {
        self.daemon
            .client("registrar")
            .get(self.url(&format!("/v1/accounts/{id}")))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    fn post(&self, who: &str, path: &str, body: Value) -> reqwest::blocking::Response {
        self.daemon
            .client(who)
            .post(self.url(path))
            .json(&body)
            .send()
            .unwrap()
    }

    /// Asks for a signature at demo-a: 201, or the refusal.
    fn create_request(&self, id: &str) -> (u16, String) {
        let taid: Value = self
            .daemon
            .client("registrar")
            .get(self.url(&format!("/v1/accounts/{id}/taid?service=demo-a")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let response = self.post(
            "demo-a",
            "/v1/signing-requests",
            json!({"taid": taid["taid"], "hash_algorithm": "sha256",
                   "hash": STANDARD.encode([7u8; 32])}),
        );
        if response.status() == 201 {
            (201, String::new())
        } else {
            problem(response)
        }
    }

    /// The embedded CA's OCSP answer for the account's certificate, verified by openssl.
    fn ocsp(&self, account: &Value) -> String {
        let dir = tempfile::tempdir().unwrap();
        let ca = self.daemon.state_dir().join("ca");
        let certificate = reqwest::blocking::get(format!("{}/ca/issuing.pem", self.daemon.ca))
            .unwrap()
            .text()
            .unwrap();
        std::fs::write(dir.path().join("issuing.pem"), certificate).unwrap();
        let serial = account["certificate"]["serial"].as_str().unwrap();
        let output = run(Command::new("openssl")
            .args(["ocsp", "-issuer"])
            .arg(dir.path().join("issuing.pem"))
            .args(["-serial", &format!("0x{serial}"), "-url"])
            .arg(format!("{}/ocsp", self.daemon.ca))
            .arg("-CAfile")
            .arg(ca.join("root.pem"))
            .arg("-verify_other")
            .arg(ca.join("issuing.pem"))
            .args(["-nonce", "-resp_text"]));
        let text = describe(&output);
        assert!(output.status.success(), "{text}");
        assert!(text.contains("Response verify OK"), "{text}");
        text
    }
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            entry
                .get("account_id")
                .unwrap_or(entry)
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// A minor's certificate stops at 00:00 HKT on the 18th birthday: one second before, signing
/// works and the sweep leaves it; at that instant signing is refused (before any sweep), and
/// the sweep revokes it as cessation_of_operation, which the CA's OCSP then says. The account
/// stays active.
#[test]
fn minor_at_18_boundary_and_revocation() {
    let life = Lifecycle::start();
    // Born 15 June 2009: 18 on 15 June 2027, which starts at 2027-06-14T16:00:00Z.
    let account = life.register("u-minor-18", "2009-06-15");
    assert_eq!(account["certificate"]["profile"], "minor");
    life.set_clock("2027-06-14T15:59:59Z");
    assert_eq!(life.create_request("u-minor-18").0, 201);
    assert!(ids(&life.sweep()["minors_revoked"]).is_empty());

    life.set_clock("2027-06-14T16:00:00Z");
    assert_eq!(
        life.create_request("u-minor-18"),
        (409, "certificate_revoked".into())
    );
    let swept = life.sweep();
    assert_eq!(ids(&swept["minors_revoked"]), ["u-minor-18"], "{swept}");
    let after = life.account("u-minor-18");
    assert_eq!(after["status"], "active");
    assert_eq!(after["minor"], false);
    assert_eq!(after["certificate"]["status"], "revoked");
    assert_eq!(
        after["certificate"]["revocation_reason"],
        "cessation_of_operation"
    );
    let ocsp = life.ocsp(&after);
    assert!(ocsp.contains(": revoked"), "{ocsp}");
    assert!(ocsp.contains("Reason: cessationOfOperation"), "{ocsp}");
    // Nothing left to do: the next sweep changes nothing.
    assert!(ids(&life.sweep()["minors_revoked"]).is_empty());
}

/// A 29 February birthday: the 18th falls in a common year, so the certificate stops at 00:00
/// HKT on 1 March (2030-02-28T16:00:00Z), not on 28 February.
#[test]
fn minor_born_on_29_february_turns_18_on_1_march() {
    let life = Lifecycle::start();
    // Registered in 2029 (aged 17), so that the certificate outlives the birthday.
    life.set_clock("2029-06-01T00:00:00Z");
    life.register("u-leap", "2012-02-29");
    life.set_clock("2030-02-28T15:59:59Z");
    assert_eq!(life.create_request("u-leap").0, 201);
    assert!(ids(&life.sweep()["minors_revoked"]).is_empty());
    life.set_clock("2030-02-28T16:00:00Z");
    assert_eq!(
        life.create_request("u-leap"),
        (409, "certificate_revoked".into())
    );
    assert_eq!(ids(&life.sweep()["minors_revoked"]), ["u-leap"]);
}

/// After notAfter the certificate is expired, signing is refused, and the sweep destroys its key.
#[test]
fn expired_certificate_loses_its_key() {
    let life = Lifecycle::start();
    let account = life.register("u-expiry", "1990-01-01");
    let not_after = account["certificate"]["not_after"].as_str().unwrap();
    life.set_clock(not_after);
    assert_eq!(
        life.create_request("u-expiry"),
        (409, "certificate_expired".into())
    );
    let swept = life.sweep();
    assert_eq!(
        ids(&swept["expired_keys_destroyed"]),
        ["u-expiry"],
        "{swept}"
    );
    assert_eq!(life.account("u-expiry")["certificate"]["status"], "expired");
    assert!(ids(&life.sweep()["expired_keys_destroyed"]).is_empty());
}

/// A mismatch acknowledged at T gives until T + 7 days to rectify: the sweep leaves the account
/// one second before, and invalidates it (certificate revoked as privilege_withdrawn) at the
/// deadline.
#[test]
fn rectification_deadline_invalidates_after_seven_days() {
    let life = Lifecycle::start();
    life.register("u-rectify", "1990-01-01");
    life.set_clock("2027-01-10T08:00:00Z");
    let response = life.post(
        "registrar",
        "/v1/accounts/u-rectify/matching",
        json!({"result": "mismatch", "acknowledged_at": "2027-01-10T08:00:00Z"}),
    );
    assert_eq!(response.status(), 200, "{}", response.text().unwrap());
    let pending = life.account("u-rectify");
    assert_eq!(pending["status"], "rectification_pending");
    assert_eq!(pending["rectify_by"], "2027-01-17T08:00:00Z");

    life.set_clock("2027-01-17T07:59:59Z");
    assert!(ids(&life.sweep()["invalidated"]).is_empty());
    assert_eq!(life.account("u-rectify")["status"], "rectification_pending");
    life.set_clock("2027-01-17T08:00:00Z");
    assert_eq!(ids(&life.sweep()["invalidated"]), ["u-rectify"]);
    let after = life.account("u-rectify");
    assert_eq!(after["status"], "invalidated");
    assert_eq!(
        after["certificate"]["revocation_reason"],
        "privilege_withdrawn"
    );
    let ocsp = life.ocsp(&after);
    // openssl 3.0 has no name for privilegeWithdrawn (9): "Revocation Reason: (UNKNOWN) (0x9)".
    assert!(ocsp.contains("Cert Status: revoked"), "{ocsp}");
    assert!(
        ocsp.contains("Revocation Reason: (UNKNOWN) (0x9)"),
        "{ocsp}"
    );
}

/// Seven years after a suspension with no action, at 00:00 HKT on the seventh anniversary of
/// its Hong Kong date, the account is deregistered and its personal data deleted.
#[test]
fn seven_years_suspended_is_deregistered() {
    let life = Lifecycle::start();
    let account = life.register("u-retain", "1990-01-01");
    assert_eq!(account["adult_on"], "2008-01-01");
    // Suspended at 2027-03-01T10:00:00Z: 18:00 HKT on 1 March 2027.
    life.set_clock("2027-03-01T10:00:00Z");
    let response = life.post(
        "registrar",
        "/v1/accounts/u-retain/suspend",
        json!({"by": "user"}),
    );
    assert_eq!(response.status(), 200, "{}", response.text().unwrap());
    // 00:00 HKT on 1 March 2034 is 2034-02-28T16:00:00Z.
    life.set_clock("2034-02-28T15:59:59Z");
    assert!(ids(&life.sweep()["deregistered"]).is_empty());
    assert_eq!(life.account("u-retain")["status"], "suspended");
    life.set_clock("2034-02-28T16:00:00Z");
    assert_eq!(ids(&life.sweep()["deregistered"]), ["u-retain"]);
    let after = life.account("u-retain");
    assert_eq!(after["status"], "deregistered", "{after}");
    assert!(
        after["adult_on"].is_null(),
        "personal data deleted: {after}"
    );
}

/// Only an officer may run the sweeps.
#[test]
fn sweep_is_for_officers() {
    let life = Lifecycle::start();
    let response = life
        .daemon
        .client("registrar")
        .post(life.url("/v1/admin/sweep"))
        .send()
        .unwrap();
    assert_eq!(problem(response), (403, "forbidden".into()));
}

/// A sweep killed half-way through a revocation (the daemon aborts, as on SIGKILL) is finished
/// by the sweep of the next start: once after the local state was stored and before the CA was
/// told, once after the CA was told and before the key was destroyed. Each time the certificate
/// ends revoked at the CA, its revocation and its key's destruction are each audited exactly
/// once, and the audit log verifies.
#[test]
fn a_sweep_killed_mid_revocation_is_finished_at_the_next_start() {
    for (n, step) in ["revocation-after-local", "revocation-after-ca"]
        .into_iter()
        .enumerate()
    {
        let mut life = Lifecycle::start();
        let id = format!("u-crash-{n}");
        let account = life.register(&id, "2009-06-15");
        let serial = account["certificate"]["serial"]
            .as_str()
            .unwrap()
            .to_owned();
        life.daemon.set_env("SMARTSIGND_FAILPOINT", Some(step));
        life.daemon.restart();
        life.set_clock("2027-06-14T16:00:00Z");
        let killed = life
            .daemon
            .client("officer")
            .post(life.url("/v1/admin/sweep"))
            .send();
        assert!(killed.is_err(), "{step}: the daemon answered the sweep");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !life.daemon.exited() {
            assert!(
                std::time::Instant::now() < deadline,
                "{step}: still running"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        life.daemon.set_env("SMARTSIGND_FAILPOINT", None);
        life.daemon.restart();

        // The start-up sweep has finished it (the clock is back to today: no new revocation).
        let after = life.account(&id);
        assert_eq!(after["certificate"]["status"], "revoked", "{step}: {after}");
        let ocsp = life.ocsp(&after);
        assert!(
            ocsp.contains("Reason: cessationOfOperation"),
            "{step}: {ocsp}"
        );
        let dir = tempfile::tempdir().unwrap();
        let records = verify_audit(&life.daemon, dir.path());
        let count = |event: &str| {
            records
                .lines()
                .map(|line| serde_json::from_str::<Value>(line).unwrap())
                .filter(|record| {
                    record["event"] == event && record["fields"]["serial"] == serial.as_str()
                })
                .count()
        };
        assert_eq!(count("certificate.revoked"), 1, "{step}");
        assert_eq!(count("certificate.key_destroyed"), 1, "{step}");
        // Nothing is left for a later sweep.
        assert_eq!(life.sweep()["revocations_finished"], json!([]), "{step}");
    }
}
