//! A registered "iAM Smart+" account with one pending signing request, and the small helpers
//! the black-box tests share around it.

// Test support: a panic, with the reason, is how it reports a failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use reqwest::blocking::Response;
use serde_json::{Value, json};
use sha2::Digest;

use crate::{DevDaemon, binary, describe, device_key, device_pem, run};

/// The status and problem `code` of an error response.
pub fn problem(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap();
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

/// A fictional person's registration body for an "iAM Smart+" account: a person of their own
/// per account id (one account per person), with the HKIC number [`hkic_for`] gives.
pub fn registration(id: &str, dob: &str, key: &SigningKey) -> Value {
    json!({
        "account_id": id,
        "tier": "iam_smart_plus",
        "surname": "WONGSURNAME",
        "given_name": "Siu Ming Given",
        "date_of_birth": dob,
        "hkic_number": hkic_for(id),
        "device_public_key": device_pem(key),
    })
}

/// A valid HKIC number derived from `seed`: one letter, six digits and the check digit,
/// computed here independently of the daemon.
pub fn hkic_for(seed: &str) -> String {
    let digest = sha2::Sha256::digest(seed.as_bytes());
    let letter = char::from(b'A' + digest[0] % 26);
    let number = u32::from_be_bytes([0, digest[1], digest[2], digest[3]]) % 1_000_000;
    let digits = format!("{number:06}");
    let value = |c: char| c as u32 - 'A' as u32 + 10;
    // A single letter counts as a space (36) before it.
    let mut weighted = vec![36, value(letter)];
    weighted.extend(digits.chars().map(|d| d.to_digit(10).unwrap()));
    let sum: u32 = weighted.iter().zip((2..=9).rev()).map(|(v, w)| v * w).sum();
    let check = match 11 - sum % 11 {
        11 => '0',
        10 => 'A',
        n => char::from_digit(n, 10).unwrap(),
    };
    format!("{letter}{digits}{check}")
}

/// An account with one pending signing request at demo-a.
#[derive(Debug)]
pub struct Pending {
    /// The device's key.
    pub key: SigningKey,
    /// The account's TAID at `demo-a`.
    pub taid: String,
    /// The hash to sign.
    pub hash: Vec<u8>,
    /// The create answer of the first request.
    pub request: Value,
}

impl Pending {
    /// Registers `id` (born 1990), gets its TAID at demo-a and creates one request.
    pub fn new(daemon: &DevDaemon, id: &str) -> Pending {
        let registrar = daemon.client("registrar");
        let key = device_key();
        let registered = registrar
            .post(format!("{}/v1/accounts", daemon.api))
            .json(&registration(id, "1990-01-01", &key))
            .send()
            .unwrap();
        assert_eq!(registered.status(), 201);
        Pending::for_account(daemon, id, key, sha2::Sha256::digest(b"document").to_vec())
    }

    /// A request at demo-a to sign `hash` for the registered account `id`, whose device holds
    /// `key`.
    pub fn for_account(daemon: &DevDaemon, id: &str, key: SigningKey, hash: Vec<u8>) -> Pending {
        let taid: Value = daemon
            .client("registrar")
            .get(format!(
                "{}/v1/accounts/{id}/taid?service=demo-a",
                daemon.api
            ))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let mut pending = Pending {
            key,
            taid: taid["taid"].as_str().unwrap().to_owned(),
            hash,
            request: Value::Null,
        };
        pending.request = pending.create(daemon).json().unwrap();
        assert!(
            pending.request["request_id"].is_string(),
            "{}",
            pending.request
        );
        pending
    }

    /// Another request for the same TAID and hash.
    pub fn create(&self, daemon: &DevDaemon) -> Response {
        daemon
            .client("demo-a")
            .post(format!("{}/v1/signing-requests", daemon.api))
            .json(&json!({"taid": self.taid, "hash_algorithm": "sha256",
                          "hash": STANDARD.encode(&self.hash)}))
            .send()
            .unwrap()
    }

    /// The first request's URL.
    pub fn url(&self, daemon: &DevDaemon) -> String {
        format!(
            "{}/v1/signing-requests/{}",
            daemon.api,
            self.request["request_id"].as_str().unwrap()
        )
    }

    /// The gateway sends the device's valid approval of the first request.
    pub fn approve(&self, daemon: &DevDaemon) -> Response {
        self.try_approve(daemon).unwrap()
    }

    /// As [`Pending::approve`], for a daemon that may die while it answers.
    pub fn try_approve(&self, daemon: &DevDaemon) -> reqwest::Result<Response> {
        let statement = statement(&self.request, Shape::Single(&self.hash), "approve");
        decide(daemon, &self.request, &self.key, "approve", &statement)
    }

    /// The first request as its service reads it now.
    pub fn read(&self, daemon: &DevDaemon) -> Value {
        daemon
            .client("demo-a")
            .get(self.url(daemon))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }
}

/// Checks a signed request's raw signature over `document` with `openssl dgst` and the signer's
/// certificate from the result.
pub fn verify_signature(result: &Value, document: &[u8]) {
    assert_eq!(result["status"], "signed", "{result}");
    let dir = tempfile::tempdir().unwrap();
    let certificate = result["result"]["certificate"].as_str().unwrap();
    std::fs::write(dir.path().join("signer.pem"), certificate).unwrap();
    let public = run(Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(dir.path().join("signer.pem")));
    assert!(public.status.success(), "{}", describe(&public));
    std::fs::write(dir.path().join("signer.pub"), &public.stdout).unwrap();
    let signature = STANDARD
        .decode(result["result"]["signature"].as_str().unwrap())
        .unwrap();
    std::fs::write(dir.path().join("signature"), signature).unwrap();
    std::fs::write(dir.path().join("document"), document).unwrap();
    let verified = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.path().join("signer.pub"))
        .arg("-signature")
        .arg(dir.path().join("signature"))
        .arg(dir.path().join("document")));
    assert!(verified.status.success(), "{}", describe(&verified));
}

/// The device's consent to `purpose` (`renew`, `reapply`, `deregister`) for account `id`, to a
/// fresh challenge; `None` when the daemon did not answer with one.
pub fn consent(daemon: &DevDaemon, id: &str, purpose: &str, key: &SigningKey) -> Option<Value> {
    let challenge: Value = daemon
        .client("gateway")
        .get(format!(
            "{}/v1/accounts/{id}/consent-challenge?purpose={purpose}",
            daemon.api
        ))
        .send()
        .ok()?
        .json()
        .ok()?;
    let nonce = challenge["nonce"].as_str()?;
    let statement = format!("smartsign-consent-v1\n{purpose}\n{id}\n{nonce}");
    let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
    Some(json!({
        "nonce": nonce,
        "device_signature": STANDARD.encode(signature.to_der().as_bytes()),
    }))
}

/// Moves the daemon's clock `days` ahead of the real one (`--dev`).
pub fn move_clock(daemon: &DevDaemon, days: i64) {
    let now = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    let moved = daemon
        .client("officer")
        .post(format!("{}/v1/admin/clock", daemon.api))
        .json(&json!({
            "now": now.format(&time::format_description::well_known::Rfc3339).unwrap()
        }))
        .send()
        .unwrap();
    assert_eq!(moved.status(), 200);
}

/// Exports the audit log as an auditor would, verifies it offline with `smartsign-ctl audit
/// verify`, and returns the records (NDJSON).
pub fn verify_audit(daemon: &DevDaemon, dir: &Path) -> String {
    let auditor = daemon.client("auditor");
    let checkpoint = auditor
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    let size = serde_json::from_slice::<Value>(&checkpoint).unwrap()["tree_size"]
        .as_u64()
        .unwrap();
    // Page by page: one answer holds at most 10,000 records.
    let mut records = Vec::new();
    let mut from = 0;
    while from < size {
        let page = auditor
            .get(format!(
                "{}/v1/audit/records?from={from}&limit={}",
                daemon.api,
                (size - from).min(10_000)
            ))
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .to_vec();
        let lines = page.iter().filter(|b| **b == b'\n').count() as u64;
        assert!(lines > 0, "no records from {from}");
        records.extend_from_slice(&page);
        from += lines;
    }
    let public_key = auditor
        .get(format!("{}/v1/audit/public-key", daemon.api))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    std::fs::write(dir.join("records.ndjson"), &records).unwrap();
    std::fs::write(dir.join("checkpoint.json"), &checkpoint).unwrap();
    std::fs::write(dir.join("audit.pem"), &public_key).unwrap();
    let verified = run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .args(["audit", "verify", "--records"])
        .arg(dir.join("records.ndjson"))
        .arg("--checkpoint")
        .arg(dir.join("checkpoint.json"))
        .arg("--public-key")
        .arg(dir.join("audit.pem")));
    assert!(verified.status.success(), "{}", describe(&verified));
    String::from_utf8_lossy(&records).into_owned()
}

/// What a request signs: one hash, or a batch of SHA-256 hashes.
#[derive(Debug, Clone, Copy)]
pub enum Shape<'a> {
    /// `"hash"`.
    Single(&'a [u8]),
    /// `"hashes"`, in order.
    Batch(&'a [Vec<u8>]),
}

/// The statement of API.md the device signs for `decision` on `request` (anything with its
/// `request_id` and `identification_code`) over SHA-256 hashes, computed here on its own.
pub fn statement(request: &Value, shape: Shape<'_>, decision: &str) -> String {
    let (id, code) = (
        request["request_id"].as_str().unwrap(),
        request["identification_code"].as_str().unwrap(),
    );
    match shape {
        Shape::Single(hash) => format!(
            "smartsign-authorise-v1\n{id}\n{code}\nsha256\n{}\n{decision}",
            hex::encode(hash)
        ),
        Shape::Batch(hashes) => format!(
            "smartsign-authorise-batch-v1\n{id}\n{code}\nsha256\n{}\n{}\n{decision}",
            hashes.len(),
            hex::encode(sha2::Sha256::digest(hashes.concat()))
        ),
    }
}

/// The gateway passes on the device's signature (by `key`) over `statement` as its `decision`
/// on `request` (the create answer, or anything with its `request_id`).
pub fn decide(
    daemon: &DevDaemon,
    request: &Value,
    key: &SigningKey,
    decision: &str,
    statement: &str,
) -> reqwest::Result<Response> {
    let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
    daemon
        .client("gateway")
        .post(format!(
            "{}/v1/signing-requests/{}/authorisation",
            daemon.api,
            request["request_id"].as_str().unwrap()
        ))
        .json(&json!({"decision": decision,
                      "device_signature": STANDARD.encode(signature.to_der().as_bytes())}))
        .send()
}

/// An officer unseals the daemon at `api` (`https://HOST:PORT`) with `smartsign-ctl unseal`
/// and their files from a provisioning medium's `out/` (`smartsign-ctl provision`): their
/// client certificate and key and their share, trusting `out/tls/ca.pem`.
pub fn unseal_from_medium(api: &str, out: &Path, officer: &str) {
    let dir = out.join("officers").join(officer);
    let unsealed = run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .arg("unseal")
        .args(["--url", api])
        .arg("--cert")
        .arg(dir.join("client.pem"))
        .arg("--key")
        .arg(dir.join("client.key"))
        .arg("--ca")
        .arg(out.join("tls/ca.pem"))
        .arg("--share-file")
        .arg(dir.join("unseal-share.txt")));
    assert!(unsealed.status.success(), "{}", describe(&unsealed));
}
