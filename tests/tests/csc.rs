//! The CSC v1 facade (`/csc/v1/...`): pyHanko's own CSC client signs PDFs against a `--dev`
//! daemon, the user approving in the app (here: the device key, through the gateway), and
//! pyHanko's validator accepts them against the development root; and each refusal of the
//! SAD: another service's, other hashes, a second use, an expired one, a rejected request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{Value, json};
use sha2::Digest;
use smartsign_tests::flow::{self, registration};
use smartsign_tests::{DevDaemon, describe, device_key, run, workspace_root};

/// A registered iAM Smart+ account: its device key, TAID at demo-a and certificate serial.
struct Account {
    key: p256::ecdsa::SigningKey,
    taid: String,
    serial: String,
}

fn register(daemon: &DevDaemon, id: &str) -> Account {
    let registrar = daemon.client("registrar");
    let key = device_key();
    let registered = registrar
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&registration(id, "1990-01-01", &key))
        .send()
        .unwrap();
    assert_eq!(registered.status(), 201);
    let taid: Value = registrar
        .get(format!(
            "{}/v1/accounts/{id}/taid?service=demo-a",
            daemon.api
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let account: Value = registrar
        .get(format!("{}/v1/accounts/{id}", daemon.api))
        .send()
        .unwrap()
        .json()
        .unwrap();
    Account {
        key,
        taid: taid["taid"].as_str().unwrap().to_owned(),
        serial: account["certificate"]["serial"]
            .as_str()
            .unwrap()
            .to_owned(),
    }
}

fn csc(daemon: &DevDaemon, client: &str, method: &str, body: &Value) -> (u16, Value) {
    let response = daemon
        .client(client)
        .post(format!("{}/csc/v1/{method}", daemon.api))
        .json(body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn pyhanko(daemon: &DevDaemon, account: &Account, documents: usize) -> String {
    let state = daemon.state_dir();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("device.key");
    std::fs::write(
        &key,
        account.key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    let config = dir.path().join("config.json");
    let client = |name: &str, ext: &str| state.join(format!("clients/{name}.{ext}"));
    std::fs::write(
        &config,
        json!({
            "api": daemon.api,
            "ca": state.join("tls/ca.pem"),
            "service_cert": client("demo-a", "pem"),
            "service_key": client("demo-a", "key"),
            "gateway_cert": client("gateway", "pem"),
            "gateway_key": client("gateway", "key"),
            "credential_id": account.taid,
            "device_key": key,
            "root": state.join("ca/root.pem"),
            "out_dir": dir.path(),
            "documents": documents,
            "expect_serial": account.serial,
        })
        .to_string(),
    )
    .unwrap();
    let signed = run(Command::new("python3")
        .arg(workspace_root().join("tests/csc/pyhanko_sign.py"))
        .arg(&config));
    assert!(signed.status.success(), "{}", describe(&signed));
    String::from_utf8(signed.stdout).unwrap()
}

#[test]
fn pyhanko_signs_pdfs_through_the_csc_facade_and_validates_them() {
    let daemon = DevDaemon::start(&[]);
    let account = register(&daemon, "u-csc-pdf");
    // One PDF, then three under one approval (pyHanko's batch: one authorize, one signHash).
    for documents in [1, 3] {
        let out = pyhanko(&daemon, &account, documents);
        let lines: Vec<Value> = out
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), documents, "{out}");
        for line in &lines {
            assert_eq!(line["intact"], true, "{line}");
            assert_eq!(line["valid"], true, "{line}");
            assert_eq!(line["trusted"], true, "{line}");
        }
    }
}

/// `credentials/authorize` for `hashes`; the answer.
fn authorize(daemon: &DevDaemon, account: &Account, hashes: &[Vec<u8>]) -> Value {
    let encoded: Vec<String> = hashes.iter().map(|h| STANDARD.encode(h)).collect();
    let (status, answer) = csc(
        daemon,
        "demo-a",
        "credentials/authorize",
        &json!({"credentialID": account.taid, "numSignatures": hashes.len(), "hash": encoded}),
    );
    assert_eq!(status, 200, "{answer}");
    answer
}

fn decide(daemon: &DevDaemon, account: &Account, answer: &Value, hash: &[u8], decision: &str) {
    let statement = flow::statement(answer, flow::Shape::Single(hash), decision);
    let sent = flow::decide(daemon, answer, &account.key, decision, &statement).unwrap();
    assert_eq!(sent.status(), 200);
}

fn sign_hash(
    daemon: &DevDaemon,
    client: &str,
    account: &Account,
    sad: &Value,
    hashes: &[Vec<u8>],
) -> (u16, Value) {
    let encoded: Vec<String> = hashes.iter().map(|h| STANDARD.encode(h)).collect();
    csc(
        daemon,
        client,
        "signatures/signHash",
        &json!({"credentialID": account.taid, "SAD": sad, "hash": encoded,
                "hashAlgo": "2.16.840.1.101.3.4.2.1", "signAlgo": "1.2.840.10045.4.3.2"}),
    )
}

fn refused(answer: (u16, Value), why: &str) {
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert_eq!(answer.1["error"], "invalid_request", "{}", answer.1);
    assert!(
        answer.1["error_description"]
            .as_str()
            .unwrap()
            .contains(why),
        "{why:?} in {}",
        answer.1
    );
}

#[test]
fn a_sad_activates_only_its_hashes_once_for_its_service_until_it_expires() {
    let daemon = DevDaemon::start(&[]);
    let account = register(&daemon, "u-csc-sad");
    let hash = sha2::Sha256::digest(b"contract").to_vec();
    let other = sha2::Sha256::digest(b"another contract").to_vec();

    // Only this service sees the credential.
    let (_, listed) = csc(&daemon, "demo-a", "credentials/list", &json!({}));
    assert_eq!(listed["credentialIDs"], json!([account.taid]));
    let (_, elsewhere) = csc(&daemon, "demo-b", "credentials/list", &json!({}));
    assert_eq!(elsewhere["credentialIDs"], json!([]));
    refused(
        csc(
            &daemon,
            "demo-b",
            "credentials/info",
            &json!({"credentialID": account.taid}),
        ),
        "credential",
    );
    let (status, info) = csc(
        &daemon,
        "demo-a",
        "credentials/info",
        &json!({"credentialID": account.taid, "certificates": "chain"}),
    );
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["SCAL"], "2");
    assert_eq!(info["authMode"], "implicit");
    assert!(info["cert"]["certificates"].as_array().unwrap().len() >= 2);
    // A PIN is no authorisation here, and the hashes must match numSignatures.
    refused(
        csc(
            &daemon,
            "demo-a",
            "credentials/authorize",
            &json!({"credentialID": account.taid, "numSignatures": 1,
                    "hash": [STANDARD.encode(&hash)], "PIN": "1234"}),
        ),
        "PIN",
    );
    refused(
        csc(
            &daemon,
            "demo-a",
            "credentials/authorize",
            &json!({"credentialID": account.taid, "numSignatures": 2,
                    "hash": [STANDARD.encode(&hash)]}),
        ),
        "numSignatures",
    );

    // Approved: the signature verifies, and the SAD is spent.
    let first_answer = authorize(&daemon, &account, std::slice::from_ref(&hash));
    decide(&daemon, &account, &first_answer, &hash, "approve");
    let sad = &first_answer["SAD"];
    refused(
        sign_hash(
            &daemon,
            "demo-b",
            &account,
            sad,
            std::slice::from_ref(&hash),
        ),
        "SAD",
    );
    refused(
        sign_hash(
            &daemon,
            "demo-a",
            &account,
            sad,
            std::slice::from_ref(&other),
        ),
        "not the hashes",
    );
    let (status, signed) = sign_hash(
        &daemon,
        "demo-a",
        &account,
        sad,
        std::slice::from_ref(&hash),
    );
    assert_eq!(status, 200, "{signed}");
    let der = STANDARD
        .decode(signed["signatures"][0].as_str().unwrap())
        .unwrap();
    let signature = p256::ecdsa::Signature::from_der(&der).unwrap();
    let (_, info) = csc(
        &daemon,
        "demo-a",
        "credentials/info",
        &json!({"credentialID": account.taid}),
    );
    let certificate = STANDARD
        .decode(info["cert"]["certificates"][0].as_str().unwrap())
        .unwrap();
    let spki = {
        use x509_cert::der::{Decode, Encode};
        x509_cert::Certificate::from_der(&certificate)
            .unwrap()
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap()
    };
    let verifying =
        <p256::ecdsa::VerifyingKey as p256::pkcs8::DecodePublicKey>::from_public_key_der(&spki)
            .unwrap();
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    verifying.verify_prehash(&hash, &signature).unwrap();
    refused(
        sign_hash(
            &daemon,
            "demo-a",
            &account,
            sad,
            std::slice::from_ref(&hash),
        ),
        "used",
    );

    // Rejected by the user: no signature.
    let rejected = authorize(&daemon, &account, std::slice::from_ref(&other));
    decide(&daemon, &account, &rejected, &other, "reject");
    refused(
        sign_hash(
            &daemon,
            "demo-a",
            &account,
            &rejected["SAD"],
            std::slice::from_ref(&other),
        ),
        "did not approve",
    );

    // Never approved, and past its lifetime: expired.
    let expired = authorize(&daemon, &account, std::slice::from_ref(&hash));
    flow::move_clock(&daemon, 1);
    refused(
        sign_hash(
            &daemon,
            "demo-a",
            &account,
            &expired["SAD"],
            std::slice::from_ref(&hash),
        ),
        "expired",
    );

    // A deregistered account is no credential (its certificate data is erased).
    let deleted = daemon
        .client("registrar")
        .delete(format!("{}/v1/accounts/u-csc-sad", daemon.api))
        .send()
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    let (_, listed) = csc(&daemon, "demo-a", "credentials/list", &json!({}));
    assert_eq!(listed["credentialIDs"], json!([]));
    refused(
        csc(
            &daemon,
            "demo-a",
            "credentials/info",
            &json!({"credentialID": account.taid}),
        ),
        "credential",
    );

    // Every refusal of signHash is in the audit log, naming the request its SAD was for.
    let records = daemon
        .client("auditor")
        .get(format!(
            "{}/v1/audit/records?event=csc.sign_hash_denied",
            daemon.api
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let denied: Vec<(String, String, String)> = records
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .map(|record| {
            let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
            (
                text(&record["actor"]),
                text(&record["fields"]["reason"]),
                text(&record["fields"]["request_id"]),
            )
        })
        .collect();
    let request = |answer: &Value| answer["request_id"].as_str().unwrap().to_owned();
    let first = request(&first_answer);
    assert_eq!(
        denied,
        [
            ("service:demo-b".into(), "invalid_sad".into(), first.clone()),
            (
                "service:demo-a".into(),
                "other_hashes".into(),
                first.clone()
            ),
            ("service:demo-a".into(), "used".into(), first),
            (
                "service:demo-a".into(),
                "not_approved".into(),
                request(&rejected)
            ),
            ("service:demo-a".into(), "expired".into(), request(&expired)),
        ]
    );
}
