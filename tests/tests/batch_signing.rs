//! Batch signing (issue 17 §1, API.md "Batch signing") end to end: a service asks for several
//! hashes in one request, the device approves them all with one `smartsign-authorise-batch-v1`
//! statement, the daemon signs them in one HSM job and answers one result per hash. Over HTTPS
//! with the dev client certificates, against `smartsignd --dev` on SoftHSM; openssl checks
//! every raw signature and every CMS, and `smartsign-ctl audit verify-receipt` the receipt.

// Test code: a panic, with the reason, is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::SigningKey;
use reqwest::blocking::Response;
use serde_json::{Value, json};
use sha2::Digest;
use smartsign_tests::flow::{problem, registration};
use smartsign_tests::{DevDaemon, binary, describe, device_key, run};

/// An account with its device key and TAID at demo-a.
struct Account {
    id: String,
    key: SigningKey,
    taid: String,
}

fn register(daemon: &DevDaemon, id: &str) -> Account {
    let key = device_key();
    let registered = daemon
        .client("registrar")
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&registration(id, "1990-01-01", &key))
        .send()
        .unwrap();
    assert_eq!(registered.status(), 201);
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
    Account {
        id: id.to_owned(),
        key,
        taid: taid["taid"].as_str().unwrap().to_owned(),
    }
}

/// `n` documents and their SHA-256 hashes.
fn documents(tag: &str, n: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let documents: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("{tag}: contract {i} of {n}").into_bytes())
        .collect();
    let hashes = documents
        .iter()
        .map(|document| sha2::Sha256::digest(document).to_vec())
        .collect();
    (documents, hashes)
}

fn create(daemon: &DevDaemon, body: &Value) -> Response {
    daemon
        .client("demo-a")
        .post(format!("{}/v1/signing-requests", daemon.api))
        .json(body)
        .send()
        .unwrap()
}

fn encoded(hashes: &[Vec<u8>]) -> Vec<String> {
    hashes.iter().map(|hash| STANDARD.encode(hash)).collect()
}

/// A batch request at demo-a over `hashes` (SHA-256); its create answer.
fn create_batch(daemon: &DevDaemon, signer: &Account, hashes: &[Vec<u8>]) -> Value {
    let created = create(
        daemon,
        &json!({"taid": signer.taid, "hash_algorithm": "sha256", "hashes": encoded(hashes),
                "description": "three contracts"}),
    );
    assert_eq!(created.status(), 201);
    created.json().unwrap()
}

/// The batch statement of API.md, computed here on its own: the request's id and code, the
/// algorithm, the number of hashes and the SHA-256 of `hashes` concatenated.
fn batch_statement(request: &Value, count: usize, hashes: &[Vec<u8>], decision: &str) -> String {
    format!(
        "smartsign-authorise-batch-v1\n{}\n{}\nsha256\n{count}\n{}\n{decision}",
        request["request_id"].as_str().unwrap(),
        request["identification_code"].as_str().unwrap(),
        hex::encode(sha2::Sha256::digest(hashes.concat())),
    )
}

/// The gateway sends the device's signature over `statement` as its `decision`.
fn send(
    daemon: &DevDaemon,
    request: &Value,
    key: &SigningKey,
    decision: &str,
    statement: &str,
) -> Response {
    smartsign_tests::flow::decide(daemon, request, key, decision, statement).unwrap()
}

fn approve(daemon: &DevDaemon, request: &Value, signer: &Account, hashes: &[Vec<u8>]) -> Response {
    let statement = batch_statement(request, hashes.len(), hashes, "approve");
    send(daemon, request, &signer.key, "approve", &statement)
}

fn read(daemon: &DevDaemon, request: &Value) -> Value {
    daemon
        .client("demo-a")
        .get(format!(
            "{}/v1/signing-requests/{}",
            daemon.api,
            request["request_id"].as_str().unwrap()
        ))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn pending(daemon: &DevDaemon, signer: &Account) -> Vec<Value> {
    let list: Value = daemon
        .client("gateway")
        .get(format!(
            "{}/v1/accounts/{}/signing-requests?status=pending",
            daemon.api, signer.id
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    list["requests"].as_array().unwrap().clone()
}

/// openssl checks `result`'s raw signature over `document` (its hash is what was sent) with the
/// certificate's public key, and its detached CMS over `document` against the dev root.
fn openssl_verifies(daemon: &DevDaemon, dir: &Path, result: &Value, document: &[u8]) {
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    write("document", document);
    write(
        "signer.pem",
        result["certificate"].as_str().unwrap().as_bytes(),
    );
    let public = run(Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(dir.join("signer.pem")));
    assert!(public.status.success(), "{}", describe(&public));
    write("signer.pub", &public.stdout);
    write(
        "signature",
        &STANDARD
            .decode(result["signature"].as_str().unwrap())
            .unwrap(),
    );
    let raw = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.join("signer.pub"))
        .arg("-signature")
        .arg(dir.join("signature"))
        .arg(dir.join("document")));
    assert!(raw.status.success(), "raw signature: {}", describe(&raw));
    write(
        "sig.p7s",
        &STANDARD.decode(result["cms"].as_str().unwrap()).unwrap(),
    );
    let cms = run(Command::new("openssl")
        .args([
            "cms", "-verify", "-binary", "-inform", "DER", "-purpose", "any",
        ])
        .arg("-content")
        .arg(dir.join("document"))
        .arg("-in")
        .arg(dir.join("sig.p7s"))
        .arg("-CAfile")
        .arg(daemon.state_dir().join("ca/root.pem"))
        .arg("-out")
        .arg("/dev/null"));
    assert!(cms.status.success(), "CMS: {}", describe(&cms));
}

/// openssl refuses `result`'s raw signature and CMS over `document` (another hash's).
fn openssl_refuses(dir: &Path, result: &Value, document: &[u8]) {
    std::fs::write(dir.join("other"), document).unwrap();
    std::fs::write(
        dir.join("signature"),
        STANDARD
            .decode(result["signature"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let raw = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.join("signer.pub"))
        .arg("-signature")
        .arg(dir.join("signature"))
        .arg(dir.join("other")));
    assert!(!raw.status.success(), "a signature verified another hash");
}

#[test]
fn a_batch_of_three_signs_each_hash_in_order_and_openssl_verifies_every_result() {
    let daemon = DevDaemon::start(&[]);
    let signer = register(&daemon, "u-batch-1");
    let (documents, hashes) = documents("u-batch-1", 3);
    let request = create_batch(&daemon, &signer, &hashes);
    assert_eq!(request["status"], "pending");

    // The gateway lists one request, with its hashes in order and no single hash.
    let listed = pending(&daemon, &signer);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["request_id"], request["request_id"]);
    assert_eq!(
        listed[0]["identification_code"],
        request["identification_code"]
    );
    assert_eq!(listed[0]["hashes"], json!(encoded(&hashes)));
    assert!(listed[0].get("hash").is_none(), "{}", listed[0]);

    let approved = approve(&daemon, &request, &signer, &hashes);
    assert_eq!(approved.status(), 200);
    assert_eq!(approved.json::<Value>().unwrap()["status"], "signed");

    let answer = read(&daemon, &request);
    assert_eq!(answer["status"], "signed", "{answer}");
    assert!(answer.get("result").is_none(), "a batch answers results");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["signature_algorithm"], "ecdsa_p256_sha256");
        assert!(!result["chain"].as_array().unwrap().is_empty());
        openssl_verifies(&daemon, dir.path(), result, &documents[i]);
        // In order: each result is its own hash's and no other's.
        openssl_refuses(dir.path(), result, &documents[(i + 1) % 3]);
    }

    // Single use: a second approval of the signed batch is refused and signs nothing more.
    assert_eq!(
        problem(approve(&daemon, &request, &signer, &hashes)),
        (409, "request_not_pending".into())
    );

    // The audit records list the hashes; the signed record names the batch's digest as `hash`.
    let id = request["request_id"].as_str().unwrap();
    let records = daemon
        .client("auditor")
        .get(format!("{}/v1/audit/records?request_id={id}", daemon.api))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let records: Vec<Value> = records
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let hex_hashes: Vec<String> = hashes.iter().map(hex::encode).collect();
    for event in ["signing.requested", "signing.approved", "signing.signed"] {
        let found: Vec<&Value> = records.iter().filter(|r| r["event"] == event).collect();
        assert_eq!(found.len(), 1, "{event}");
        assert_eq!(found[0]["fields"]["hashes"], json!(hex_hashes), "{event}");
    }
    let signed = records
        .iter()
        .find(|r| r["event"] == "signing.signed")
        .unwrap();
    assert_eq!(
        signed["fields"]["hash"],
        hex::encode(sha2::Sha256::digest(hashes.concat()))
    );

    // The signing history shows the batch's hashes.
    let history: Value = daemon
        .client("gateway")
        .get(format!(
            "{}/v1/accounts/{}/signing-history",
            daemon.api, signer.id
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let finished = &history["requests"][0];
    assert_eq!(finished["request_id"], request["request_id"]);
    assert_eq!(finished["status"], "signed");
    assert_eq!(finished["hashes"], json!(encoded(&hashes)));

    // The receipt of the batch is that of its one signing.signed record, and verifies.
    let receipt = receipt(&daemon, id);
    let record: Value = serde_json::from_str(receipt["record"].as_str().unwrap()).unwrap();
    assert_eq!(record["event"], "signing.signed");
    assert_eq!(record["fields"]["hashes"], json!(hex_hashes));
    let key = dir.path().join("audit.pem");
    std::fs::write(
        &key,
        daemon
            .client("auditor")
            .get(format!("{}/v1/audit/public-key", daemon.api))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let file = dir.path().join("receipt.json");
    std::fs::write(&file, serde_json::to_vec(&receipt).unwrap()).unwrap();
    let verified = run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .args(["audit", "verify-receipt"])
        .arg(&file)
        .arg("--public-key")
        .arg(&key));
    assert!(verified.status.success(), "{}", describe(&verified));
    let said = String::from_utf8_lossy(&verified.stdout);
    assert!(said.contains(id), "{said}");
    for hash in &hex_hashes {
        assert!(said.contains(hash.as_str()), "{said}");
    }
    // A changed hash in the record breaks it.
    let mut tampered = receipt.clone();
    tampered["record"] = json!(
        receipt["record"]
            .as_str()
            .unwrap()
            .replace(&hex_hashes[1], &hex_hashes[0])
    );
    std::fs::write(&file, serde_json::to_vec(&tampered).unwrap()).unwrap();
    let refused = run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .args(["audit", "verify-receipt"])
        .arg(&file)
        .arg("--public-key")
        .arg(&key));
    assert!(!refused.status.success(), "{}", describe(&refused));
}

/// The receipt of request `id`, once a checkpoint covers its record (the auditor's request for
/// the checkpoint makes one).
fn receipt(daemon: &DevDaemon, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let checkpoint = daemon
            .client("auditor")
            .get(format!("{}/v1/audit/checkpoint", daemon.api))
            .send()
            .unwrap();
        assert_eq!(checkpoint.status(), 200);
        let answer = daemon
            .client("demo-a")
            .get(format!("{}/v1/signing-requests/{id}/receipt", daemon.api))
            .send()
            .unwrap();
        if answer.status() == 200 {
            return answer.json().unwrap();
        }
        assert_eq!(answer.status(), 404);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no receipt in time"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn batch_authorisations_over_anything_but_the_batch_are_refused_and_lock_it() {
    let daemon = DevDaemon::start(&[]);
    let signer = register(&daemon, "u-batch-2");
    let (_, hashes) = documents("u-batch-2", 3);
    let request = create_batch(&daemon, &signer, &hashes);

    // The single-hash statement, over the first hash: not the batch's.
    let single = format!(
        "smartsign-authorise-v1\n{}\n{}\nsha256\n{}\napprove",
        request["request_id"].as_str().unwrap(),
        request["identification_code"].as_str().unwrap(),
        hex::encode(&hashes[0])
    );
    let reordered = [hashes[1].clone(), hashes[0].clone(), hashes[2].clone()];
    let mut changed = hashes.clone();
    changed[2][31] ^= 1;
    let refusals = [
        single,
        batch_statement(&request, 3, &reordered, "approve"),
        batch_statement(&request, 3, &changed, "approve"),
    ];
    for (i, statement) in refusals.iter().enumerate() {
        let expected = if i < 2 {
            (422, "authorisation_invalid".to_owned())
        } else {
            (429, "too_many_attempts".to_owned())
        };
        assert_eq!(
            problem(send(&daemon, &request, &signer.key, "approve", statement)),
            expected,
            "attempt {i}"
        );
    }
    // Locked: the right statement no longer signs.
    assert_eq!(
        problem(approve(&daemon, &request, &signer, &hashes)),
        (409, "request_not_pending".into())
    );
    assert_eq!(read(&daemon, &request)["status"], "locked");

    // A count that is not the batch's (the right digest), and a batch of the wrong length
    // under the count: each a bad authorisation that counts; the right one still signs.
    let request = create_batch(&daemon, &signer, &hashes);
    assert_eq!(
        problem(send(
            &daemon,
            &request,
            &signer.key,
            "approve",
            &batch_statement(&request, 2, &hashes, "approve")
        )),
        (422, "authorisation_invalid".into())
    );
    assert_eq!(
        problem(send(
            &daemon,
            &request,
            &signer.key,
            "approve",
            &batch_statement(&request, 2, &hashes[..2], "approve")
        )),
        (422, "authorisation_invalid".into())
    );
    let approved = approve(&daemon, &request, &signer, &hashes);
    assert_eq!(approved.status(), 200);
    assert_eq!(
        read(&daemon, &request)["results"].as_array().unwrap().len(),
        3
    );

    // A reject statement over the batch ends it, with no result.
    let request = create_batch(&daemon, &signer, &hashes);
    let rejected = send(
        &daemon,
        &request,
        &signer.key,
        "reject",
        &batch_statement(&request, 3, &hashes, "reject"),
    );
    assert_eq!(rejected.status(), 200);
    let answer = read(&daemon, &request);
    assert_eq!(answer["status"], "rejected");
    assert!(answer.get("results").is_none());

    // An expired batch cannot be approved (the daemon's clock past its expiry).
    let request = create_batch(&daemon, &signer, &hashes);
    let expires = time::OffsetDateTime::parse(
        request["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
        + time::Duration::seconds(1);
    let set = daemon
        .client("officer")
        .post(format!("{}/v1/admin/clock", daemon.api))
        .json(&json!({"now": expires
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()}))
        .send()
        .unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(
        problem(approve(&daemon, &request, &signer, &hashes)),
        (410, "request_expired".into())
    );
    assert_eq!(read(&daemon, &request)["status"], "expired");
}

#[test]
fn batches_of_the_wrong_shape_the_pending_cap_and_a_revoked_certificate() {
    let daemon = DevDaemon::start(&[]);
    let signer = register(&daemon, "u-batch-3");
    let (_, hashes) = documents("u-batch-3", 21);
    let body = |fields: Value| {
        let mut body = json!({"taid": signer.taid, "hash_algorithm": "sha256"});
        for (key, value) in fields.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    let refused = |fields: Value| problem(create(&daemon, &body(fields)));
    let bad_request = (400, "invalid_request".to_owned());
    let bad_hash = (400, "invalid_hash".to_owned());

    // max_batch (20) + 1.
    assert_eq!(refused(json!({"hashes": encoded(&hashes)})), bad_request);
    assert_eq!(refused(json!({"hashes": []})), bad_request);
    // Both, and neither.
    assert_eq!(
        refused(json!({"hash": encoded(&hashes[..1])[0], "hashes": encoded(&hashes[..2])})),
        bad_request
    );
    assert_eq!(refused(json!({})), bad_request);
    // Mixed lengths (a SHA-384 hash among SHA-256 ones), and all of the wrong length.
    let mixed = vec![
        hashes[0].clone(),
        sha2::Sha384::digest(b"x").to_vec(),
        hashes[1].clone(),
    ];
    assert_eq!(refused(json!({"hashes": encoded(&mixed)})), bad_hash);
    assert_eq!(
        refused(json!({"hashes": encoded(&hashes[..2]), "hash_algorithm": "sha512"})),
        bad_hash
    );
    assert_eq!(refused(json!({"hashes": ["not base64!"]})), bad_request);
    assert!(pending(&daemon, &signer).is_empty(), "nothing was kept");

    // A batch of the most there may be (20) takes one place of the five pending requests.
    let full = create_batch(&daemon, &signer, &hashes[..20]);
    for i in 0..4 {
        let single = create(
            &daemon,
            &body(json!({"hash": STANDARD.encode(sha2::Sha256::digest(format!("single {i}")))})),
        );
        assert_eq!(single.status(), 201);
    }
    assert_eq!(
        problem(create(
            &daemon,
            &body(json!({"hashes": encoded(&hashes[..2])}))
        )),
        (429, "too_many_pending".into())
    );
    let listed = pending(&daemon, &signer);
    assert_eq!(listed.len(), 5);
    let batch = listed
        .iter()
        .find(|r| r["request_id"] == full["request_id"])
        .unwrap();
    assert_eq!(batch["hashes"].as_array().unwrap().len(), 20);

    // The certificate revoked: the pending batch is refused at its approval (the status
    // check), and no new batch is taken.
    let revoked = daemon
        .client("registrar")
        .post(format!(
            "{}/v1/accounts/{}/certificate/revoke",
            daemon.api, signer.id
        ))
        .json(&json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    assert_eq!(revoked.status(), 200);
    assert_eq!(
        problem(approve(&daemon, &full, &signer, &hashes[..20])),
        (409, "certificate_revoked".into())
    );
    let answer = read(&daemon, &full);
    assert_eq!(answer["status"], "failed");
    assert!(answer.get("results").is_none());
    assert_eq!(
        problem(create(
            &daemon,
            &body(json!({"hashes": encoded(&hashes[..2])}))
        )),
        (409, "certificate_revoked".into())
    );
}

#[test]
fn max_batch_is_the_policys_and_check_config_holds_it_to_its_range() {
    let mut daemon = DevDaemon::start(&[]);
    let written = std::fs::read_to_string(daemon.state_dir().join("smartsignd.toml")).unwrap();
    assert!(
        written.lines().any(|line| line == "max_batch = 20"),
        "the default is written out"
    );
    daemon.relaunch_with_settings(&[("max_batch", "3")]);
    let signer = register(&daemon, "u-batch-4");
    let (_, hashes) = documents("u-batch-4", 4);
    let body = |hashes: &[Vec<u8>]| json!({"taid": signer.taid, "hash_algorithm": "sha256", "hashes": encoded(hashes)});
    assert_eq!(
        problem(create(&daemon, &body(&hashes))),
        (400, "invalid_request".into())
    );
    assert_eq!(create(&daemon, &body(&hashes[..3])).status(), 201);
    daemon.stop();

    let smartsignd = binary("smartsignd", "smartsignd");
    let text = std::fs::read_to_string(daemon.state_dir().join("smartsignd.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (value, good) in [("0", false), ("101", false), ("1", true), ("100", true)] {
        let path = dir.path().join(format!("max-batch-{value}.toml"));
        let changed: Vec<String> = text
            .lines()
            .map(|line| {
                if line.starts_with("max_batch = ") {
                    format!("max_batch = {value}")
                } else {
                    line.to_owned()
                }
            })
            .collect();
        assert!(
            changed
                .iter()
                .any(|line| *line == format!("max_batch = {value}"))
        );
        std::fs::write(&path, changed.join("\n") + "\n").unwrap();
        let checked = run(Command::new(&smartsignd).arg("--check-config").arg(&path));
        assert_eq!(
            checked.status.success(),
            good,
            "{value}: {}",
            describe(&checked)
        );
        if !good {
            assert!(
                String::from_utf8_lossy(&checked.stderr).contains("policy.max_batch"),
                "{value}: {}",
                describe(&checked)
            );
        }
    }
}
