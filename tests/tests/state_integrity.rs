//! State integrity of the signing flow: one approval signs once, whatever races it and whatever
//! crashes. The approval is a durable, conditional transition of the request (pending ->
//! approved, with the account still active and bound to the same device), not a set in one
//! process's memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sha2::Digest as _;
use smartsign_tests::DevDaemon;
use smartsign_tests::device_key;
use smartsign_tests::flow::{Pending, problem, registration, verify_audit, verify_signature};

const ROUNDS: usize = 50;

fn register(daemon: &DevDaemon, id: &str) -> p256::ecdsa::SigningKey {
    let key = device_key();
    let response = daemon
        .client("registrar")
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&registration(id, "1990-01-01", &key))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    key
}

fn signing_records(records: &str, request_id: &str) -> usize {
    records
        .lines()
        .filter(|line| line.contains("\"event\":\"signing.signed\"") && line.contains(request_id))
        .count()
}

#[test]
fn two_authorisations_of_one_request_sign_once() {
    let daemon = DevDaemon::start(&[]);
    let key = register(&daemon, "u-race");
    let mut ids = Vec::new();
    let (mut signed, mut refused) = (0, 0);
    for round in 0..ROUNDS {
        let document = format!("document {round}");
        let pending = Pending::for_account(
            &daemon,
            "u-race",
            key.clone(),
            sha2::Sha256::digest(document.as_bytes()).to_vec(),
        );
        let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..2)
                .map(|_| scope.spawn(|| pending.approve(&daemon)))
                .collect();
            racers
                .into_iter()
                .map(|racer| {
                    let response = racer.join().unwrap();
                    match response.status().as_u16() {
                        200 => (200, String::new()),
                        _ => problem(response),
                    }
                })
                .collect()
        });
        let wins = answers.iter().filter(|(status, _)| *status == 200).count();
        assert_eq!(wins, 1, "round {round}: {answers:?}");
        for (status, code) in &answers {
            if *status != 200 {
                assert_eq!(*status, 409, "round {round}: {answers:?}");
                assert!(
                    code == "request_not_pending" || code == "conflict",
                    "round {round}: {answers:?}"
                );
            }
        }
        signed += wins;
        refused += answers.len() - wins;
        let read = pending.read(&daemon);
        verify_signature(&read, document.as_bytes());
        ids.push(pending.request["request_id"].as_str().unwrap().to_owned());
    }
    assert_eq!((signed, refused), (ROUNDS, ROUNDS));
    // The audit log holds exactly one signature per request.
    let export = tempfile::tempdir().unwrap();
    let records = verify_audit(&daemon, export.path());
    for id in &ids {
        assert_eq!(signing_records(&records, id), 1, "request {id}");
    }
}

#[test]
fn a_crash_after_the_signature_is_recorded_never_signs_that_approval_again() {
    let mut daemon = DevDaemon::start(&[]);
    let key = register(&daemon, "u-crash");
    let pending = Pending::for_account(
        &daemon,
        "u-crash",
        key,
        sha2::Sha256::digest(b"crash").to_vec(),
    );
    // The daemon aborts (as SIGKILL would) after `signing.signed` is durable and before the
    // request's signed state is stored.
    daemon.set_env("SMARTSIGND_FAILPOINT", Some("signing-after-signed-record"));
    daemon.restart();
    assert!(
        pending.try_approve(&daemon).is_err(),
        "the daemon answered instead of aborting"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !daemon.exited() {
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    daemon.set_env("SMARTSIGND_FAILPOINT", None);
    daemon.restart();

    // Restart failed the interrupted request: no signature was released, none can be now.
    let read: Value = pending.read(&daemon);
    assert_eq!(read["status"], "failed", "{read}");
    assert!(read["result"].is_null(), "{read}");
    let again = pending.approve(&daemon);
    assert_eq!(problem(again), (409, "request_not_pending".into()));
    let export = tempfile::tempdir().unwrap();
    let records = verify_audit(&daemon, export.path());
    let id = pending.request["request_id"].as_str().unwrap();
    assert_eq!(signing_records(&records, id), 1);
    assert!(
        records
            .lines()
            .any(|r| r.contains("signing.failed") && r.contains(id) && r.contains("interrupted")),
        "the recovery is audited"
    );
}

#[test]
fn a_suspension_or_device_switch_before_the_approval_stops_the_signature() {
    let daemon = DevDaemon::start(&[]);
    let key = register(&daemon, "u-stop");
    let registrar = daemon.client("registrar");
    let url = |path: &str| format!("{}/v1/accounts/u-stop{path}", daemon.api);

    // Suspended after the request was made: refused, and the request does not sign later.
    let pending = Pending::for_account(&daemon, "u-stop", key.clone(), vec![1; 32]);
    let suspended = registrar
        .post(url("/suspend"))
        .json(&serde_json::json!({"by": "user", "reason": "lost phone"}))
        .send()
        .unwrap();
    assert_eq!(suspended.status(), 200);
    assert_eq!(
        problem(pending.approve(&daemon)),
        (409, "account_not_active".into())
    );
    assert_ne!(pending.read(&daemon)["status"], "signed");
    let resumed = registrar
        .post(url("/resume"))
        .json(&serde_json::json!({}))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 200);

    // A device switch after the request was made: the request was the old device's.
    let pending = Pending::for_account(&daemon, "u-stop", key, vec![2; 32]);
    let switched = registrar
        .put(url("/device"))
        .json(&serde_json::json!({"device_public_key": smartsign_tests::device_pem(&device_key())}))
        .send()
        .unwrap();
    assert_eq!(switched.status(), 200);
    assert_eq!(
        problem(pending.approve(&daemon)),
        (422, "authorisation_invalid".into())
    );
    assert_eq!(pending.read(&daemon)["status"], "pending");
}

#[test]
fn a_suspension_and_a_device_switch_at_once_both_stay() {
    let daemon = DevDaemon::start(&[]);
    register(&daemon, "u-both");
    let registrar = daemon.client("registrar");
    let url = |path: &str| format!("{}/v1/accounts/u-both{path}", daemon.api);
    let mut lost = 0;
    for round in 0..ROUNDS {
        let before: Value = registrar.get(url("")).send().unwrap().json().unwrap();
        let device = smartsign_tests::device_pem(&device_key());
        let (suspend, switch) = std::thread::scope(|scope| {
            let suspend = scope.spawn(|| {
                daemon
                    .client("registrar")
                    .post(url("/suspend"))
                    .json(&serde_json::json!({"by": "user"}))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            });
            let switch = scope.spawn(|| {
                daemon
                    .client("registrar")
                    .put(url("/device"))
                    .json(&serde_json::json!({"device_public_key": device}))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            });
            (suspend.join().unwrap(), switch.join().unwrap())
        });
        assert_eq!((suspend, switch), (200, 200), "round {round}");
        let after: Value = registrar.get(url("")).send().unwrap().json().unwrap();
        // Both changes are in the account: neither wrote over the other.
        if after["status"] != "suspended"
            || after["device_generation"].as_u64()
                != before["device_generation"].as_u64().map(|g| g + 1)
        {
            lost += 1;
        }
        let resumed = registrar
            .post(url("/resume"))
            .json(&serde_json::json!({"by": "user"}))
            .send()
            .unwrap();
        assert_eq!(resumed.status(), 200, "round {round}");
    }
    assert_eq!(lost, 0, "changes lost in {lost} of {ROUNDS} rounds");
}

#[test]
fn a_device_switch_racing_a_deregistration_does_not_bring_the_account_back() {
    let daemon = DevDaemon::start(&[]);
    for round in 0..10 {
        let id = format!("u-gone-{round}");
        register(&daemon, &id);
        let url = format!("{}/v1/accounts/{id}", daemon.api);
        let device = smartsign_tests::device_pem(&device_key());
        let (deregistered, switched) = std::thread::scope(|scope| {
            let deregister = scope.spawn(|| {
                daemon
                    .client("registrar")
                    .delete(&url)
                    .send()
                    .unwrap()
                    .status()
            });
            let switch = scope.spawn(|| {
                daemon
                    .client("registrar")
                    .put(format!("{url}/device"))
                    .json(&serde_json::json!({"device_public_key": device}))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            });
            (deregister.join().unwrap(), switch.join().unwrap())
        });
        assert_eq!(deregistered.as_u16(), 204, "round {round}");
        assert!(matches!(switched, 200 | 409), "round {round}: {switched}");
        let after: Value = daemon
            .client("registrar")
            .get(&url)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(after["status"], "deregistered", "round {round}: {after}");
    }
}

#[test]
fn only_the_party_that_suspended_may_resume() {
    let daemon = DevDaemon::start(&[]);
    register(&daemon, "u-gov");
    let registrar = daemon.client("registrar");
    let url = |path: &str| format!("{}/v1/accounts/u-gov{path}", daemon.api);
    let suspend = registrar
        .post(url("/suspend"))
        .json(&serde_json::json!({"by": "government"}))
        .send()
        .unwrap();
    assert_eq!(suspend.status(), 200);
    for body in [serde_json::json!({}), serde_json::json!({"by": "user"})] {
        let refused = registrar.post(url("/resume")).json(&body).send().unwrap();
        assert_eq!(
            problem(refused),
            (409, "account_not_active".into()),
            "{body}"
        );
    }
    let account: Value = registrar.get(url("")).send().unwrap().json().unwrap();
    assert_eq!(account["status"], "suspended");
    let resumed = registrar
        .post(url("/resume"))
        .json(&serde_json::json!({"by": "government"}))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 200);
    assert_eq!(resumed.json::<Value>().unwrap()["status"], "active");
}

#[test]
fn one_account_per_person_even_when_two_registrations_race() {
    let daemon = DevDaemon::start(&[]);
    let person = smartsign_tests::flow::hkic_for("a person");
    let body = |id: &str| {
        let mut body = registration(id, "1990-01-01", &device_key());
        body["hkic_number"] = serde_json::json!(person);
        body
    };
    let post = |body: Value| {
        daemon
            .client("registrar")
            .post(format!("{}/v1/accounts", daemon.api))
            .json(&body)
            .send()
            .unwrap()
    };
    // Two registrations of the same person at once: one account.
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let racers: Vec<_> = ["u-twin-1", "u-twin-2"]
            .map(|id| {
                let body = body(id);
                scope.spawn(move || {
                    let response = post(body);
                    match response.status().as_u16() {
                        201 => (201, String::new()),
                        _ => problem(response),
                    }
                })
            })
            .into_iter()
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let created = answers.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(created, 1, "{answers:?}");
    assert!(
        answers.contains(&(409, "hkic_already_registered".into())),
        "{answers:?}"
    );
    let holder = if answers[0].0 == 201 {
        "u-twin-1"
    } else {
        "u-twin-2"
    };
    // Once that account is deregistered, the person may register again.
    assert_eq!(
        problem(post(body("u-twin-3"))),
        (409, "hkic_already_registered".into())
    );
    let deregistered = daemon
        .client("registrar")
        .delete(format!("{}/v1/accounts/{holder}", daemon.api))
        .send()
        .unwrap();
    assert_eq!(deregistered.status(), 204);
    assert_eq!(post(body("u-twin-3")).status(), 201);
}

/// The stored bytes of an account's personal data: sealed name and date of birth, HKIC hash,
/// sealed certificates, and its requests' hashes and descriptions.
fn personal_bytes(store: &std::path::Path, id: &str) -> Vec<Vec<u8>> {
    let conn = rusqlite::Connection::open(store).unwrap();
    let mut found: Vec<Vec<u8>> = conn
        .query_row(
            "SELECT sealed_name, sealed_dob, hkic_hash FROM accounts WHERE id = ?1",
            [id],
            |row| Ok(vec![row.get(0)?, row.get(1)?, row.get(2)?]),
        )
        .unwrap();
    for (query, column) in [
        (
            "SELECT sealed_der FROM certificates WHERE account_id = ?1",
            0,
        ),
        ("SELECT hash FROM signing_requests WHERE account_id = ?1", 0),
        (
            "SELECT sealed_result FROM signing_requests \
             WHERE account_id = ?1 AND sealed_result IS NOT NULL",
            0,
        ),
    ] {
        let mut statement = conn.prepare(query).unwrap();
        let rows = statement
            .query_map([id], |row| row.get::<_, Vec<u8>>(column))
            .unwrap();
        found.extend(rows.map(Result::unwrap));
    }
    found.retain(|bytes| bytes.len() >= 16);
    found
}

/// Whether any file of the state directory's store (database, WAL, shared memory) holds `bytes`.
fn store_files_hold(state: &std::path::Path, bytes: &[u8]) -> bool {
    [
        "smartsign.sqlite",
        "smartsign.sqlite-wal",
        "smartsign.sqlite-shm",
    ]
    .iter()
    .filter_map(|name| std::fs::read(state.join(name)).ok())
    .any(|file| file.windows(bytes.len()).any(|window| window == bytes))
}

#[test]
fn deregistration_erases_every_personal_datum_in_one_step() {
    let daemon = DevDaemon::start(&[]);
    let state = daemon.state_dir();
    let registrar = daemon.client("registrar");
    let url = |id: &str, path: &str| format!("{}/v1/accounts/{id}{path}", daemon.api);
    let mut watched: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for (id, before) in [
        ("u-erase-active", None),
        ("u-erase-suspended", Some("/suspend")),
        ("u-erase-invalidated", Some("/invalidate")),
    ] {
        let key = register(&daemon, id);
        let pending = Pending::for_account(&daemon, id, key, sha2::Sha256::digest(id).to_vec());
        let _ = daemon
            .client("demo-a")
            .post(format!("{}/v1/signing-requests", daemon.api))
            .json(
                &serde_json::json!({"taid": pending.taid, "hash_algorithm": "sha256",
                "hash": base64_of(&sha2::Sha256::digest(format!("{id} 2"))),
                "description": format!("DESCRIPTION OF {id}")}),
            )
            .send()
            .unwrap();
        assert_eq!(pending.approve(&daemon).status(), 200);
        if let Some(path) = before {
            let body = match path {
                "/suspend" => serde_json::json!({"by": "government"}),
                _ => serde_json::json!({"reason": "test"}),
            };
            let changed = registrar.post(url(id, path)).json(&body).send().unwrap();
            assert_eq!(changed.status(), 200, "{id}");
        }
        let mut bytes = personal_bytes(&state.join("smartsign.sqlite"), id);
        bytes.push(format!("DESCRIPTION OF {id}").into_bytes());
        // Name, date of birth, HKIC hash, certificate, two hashes, a result, a description.
        assert!(bytes.len() >= 8, "{id}: {}", bytes.len());
        watched.push((id.to_owned(), bytes));
    }
    for (id, _) in &watched {
        let gone = registrar.delete(url(id, "")).send().unwrap();
        assert_eq!(gone.status(), 204, "{id}");
        let account: Value = registrar.get(url(id, "")).send().unwrap().json().unwrap();
        assert_eq!(account["status"], "deregistered");
        assert!(account["certificate"]["pem"].is_null(), "{account}");
    }
    for (id, bytes) in &watched {
        for datum in bytes {
            assert!(
                !store_files_hold(&state, datum),
                "{id}: a personal datum ({} bytes) is still in the store files",
                datum.len()
            );
        }
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn the_user_sees_what_they_signed_and_rejected_newest_first() {
    let daemon = DevDaemon::start(&[]);
    let key = register(&daemon, "u-history");
    register(&daemon, "u-someone-else");
    let signed = Pending::for_account(&daemon, "u-history", key.clone(), vec![1; 32]);
    assert_eq!(signed.approve(&daemon).status(), 200);
    // Finish times are kept to the second (ties go by request id): the rejection comes later.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let rejected = Pending::for_account(&daemon, "u-history", key.clone(), vec![2; 32]);
    let statement = format!(
        "smartsign-authorise-v1\n{}\n{}\nsha256\n{}\nreject",
        rejected.request["request_id"].as_str().unwrap(),
        rejected.request["identification_code"].as_str().unwrap(),
        hex::encode([2u8; 32])
    );
    use p256::ecdsa::signature::Signer as _;
    let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
    let answer = daemon
        .client("gateway")
        .post(format!("{}/authorisation", rejected.url(&daemon)))
        .json(&serde_json::json!({"decision": "reject",
            "device_signature": base64_of(signature.to_der().as_bytes())}))
        .send()
        .unwrap();
    assert_eq!(answer.status(), 200);
    let _still_pending = Pending::for_account(&daemon, "u-history", key, vec![3; 32]);

    let gateway = daemon.client("gateway");
    let page = |query: &str| -> Value {
        let response = gateway
            .get(format!(
                "{}/v1/accounts/u-history/signing-history{query}",
                daemon.api
            ))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().unwrap()
    };
    let all = page("");
    let requests = all["requests"].as_array().unwrap();
    let statuses: Vec<&str> = requests
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["rejected", "signed"], "{all}");
    assert_eq!(requests[1]["hash"], base64_of(&[1; 32]));
    assert_eq!(requests[1]["service"], "demo-a");
    assert!(all["next"].is_null());
    // One at a time: the cursor leads to the next page, and the last has none.
    let first = page("?limit=1");
    assert_eq!(first["requests"][0]["status"], "rejected");
    let cursor = first["next"].as_str().unwrap();
    let second = page(&format!("?limit=1&before={cursor}"));
    assert_eq!(second["requests"][0]["status"], "signed");
    assert!(second["next"].is_null(), "{second}");
    // Only the gateway reads it, and a bad cursor is refused.
    let denied = daemon
        .client("demo-a")
        .get(format!(
            "{}/v1/accounts/u-history/signing-history",
            daemon.api
        ))
        .send()
        .unwrap();
    assert_eq!(denied.status(), 403);
    let bad = gateway
        .get(format!(
            "{}/v1/accounts/u-history/signing-history?before=nonsense",
            daemon.api
        ))
        .send()
        .unwrap();
    assert_eq!(problem(bad), (400, "invalid_request".into()));
}

#[test]
fn a_minors_guardian_is_kept_as_a_keyed_hash_and_erased_with_the_account() {
    let daemon = DevDaemon::start(&[]);
    let state = daemon.state_dir();
    let registrar = daemon.client("registrar");
    let mut minor = registration("u-minor-g", "2012-03-04", &device_key());
    let guardian = smartsign_tests::flow::hkic_for("the guardian");
    minor["guardian"] = serde_json::json!({"hkic_number": guardian, "date_of_birth": "1980-05-06"});
    let created = registrar
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&minor)
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.json::<Value>().unwrap()["guardian"], true);
    register(&daemon, "u-adult-g");
    let adult: Value = registrar
        .get(format!("{}/v1/accounts/u-adult-g", daemon.api))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(adult["guardian"], false);

    // Stored as a 32-byte keyed hash, not the number.
    let conn = rusqlite::Connection::open(state.join("smartsign.sqlite")).unwrap();
    let stored: Vec<u8> = conn
        .query_row(
            "SELECT guardian_hkic_hash FROM accounts WHERE id = 'u-minor-g'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    drop(conn);
    assert_eq!(stored.len(), 32);
    assert!(!store_files_hold(&state, guardian.as_bytes()));

    let gone = registrar
        .delete(format!("{}/v1/accounts/u-minor-g", daemon.api))
        .send()
        .unwrap();
    assert_eq!(gone.status(), 204);
    let after: Value = registrar
        .get(format!("{}/v1/accounts/u-minor-g", daemon.api))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(after["guardian"], false);
    assert!(!store_files_hold(&state, &stored));
}

#[test]
fn the_user_deregisters_from_the_app_with_the_devices_consent() {
    let daemon = DevDaemon::start(&[]);
    let key = register(&daemon, "u-leaving");
    let gateway = daemon.client("gateway");
    let url = |path: &str| format!("{}/v1/accounts/u-leaving{path}", daemon.api);
    let challenge = |purpose: &str| -> Value {
        let response = gateway
            .get(url(&format!("/consent-challenge?purpose={purpose}")))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().unwrap()
    };
    let consent = |nonce: &str, signer: &p256::ecdsa::SigningKey| {
        use p256::ecdsa::signature::Signer as _;
        let statement = format!("smartsign-consent-v1\nderegister\nu-leaving\n{nonce}");
        let signature: p256::ecdsa::Signature = signer.sign(statement.as_bytes());
        gateway
            .post(url("/deregistration"))
            .json(&serde_json::json!({"nonce": nonce,
                "device_signature": base64_of(signature.to_der().as_bytes())}))
            .send()
            .unwrap()
    };
    // Another device's consent is refused, and changes nothing; the challenge is spent.
    let first = challenge("deregister");
    assert_eq!(
        problem(consent(first["nonce"].as_str().unwrap(), &device_key())),
        (422, "authorisation_invalid".into())
    );
    let account: Value = daemon
        .client("registrar")
        .get(url(""))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(account["status"], "active");
    // A renewal challenge does not deregister either.
    let renewal = challenge("renew");
    assert_eq!(
        problem(consent(renewal["nonce"].as_str().unwrap(), &key)),
        (422, "authorisation_invalid".into())
    );
    // The device's own consent to a deregister challenge ends the account.
    let second = challenge("deregister");
    assert_eq!(
        consent(second["nonce"].as_str().unwrap(), &key).status(),
        204
    );
    let account: Value = daemon
        .client("registrar")
        .get(url(""))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(account["status"], "deregistered");
    assert_eq!(account["certificate"]["status"], "revoked");
}

/// The certificate serials of an account that are valid at the CA (not revoked in its own
/// record), by the embedded CA's state file.
fn valid_at_ca(daemon: &DevDaemon, serials: &[String]) -> Vec<String> {
    let ca = rusqlite::Connection::open(daemon.state_dir().join("ca/ca.sqlite")).unwrap();
    serials
        .iter()
        .filter(|serial| {
            ca.query_row(
                "SELECT count(*) FROM certificates WHERE serial = ?1 AND revoked_at IS NULL",
                [serial.as_str()],
                |row| row.get::<_, i64>(0),
            )
            .unwrap()
                > 0
        })
        .cloned()
        .collect()
}

/// Every certificate the store keeps for `id`.
fn stored_serials(daemon: &DevDaemon, id: &str) -> Vec<String> {
    let store = rusqlite::Connection::open(daemon.state_dir().join("smartsign.sqlite")).unwrap();
    store
        .prepare("SELECT serial FROM certificates WHERE account_id = ?1")
        .unwrap()
        .query_map([id], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Every certificate the CA issued that is not revoked (subscribers only).
fn all_valid_at_ca(daemon: &DevDaemon) -> Vec<String> {
    let ca = rusqlite::Connection::open(daemon.state_dir().join("ca/ca.sqlite")).unwrap();
    ca.prepare(
        "SELECT serial FROM certificates WHERE revoked_at IS NULL \
         AND profile IN ('adult', 'minor')",
    )
    .unwrap()
    .query_map([], |row| row.get(0))
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[test]
fn a_renewal_racing_a_device_switch_a_suspension_or_an_invalidation_loses_neither() {
    let daemon = DevDaemon::start(&[]);
    let races = ["device", "suspend", "invalidate"];
    let accounts: Vec<(String, p256::ecdsa::SigningKey)> = (0..ROUNDS * races.len())
        .map(|n| {
            let id = format!("u-race-{n}");
            let key = register(&daemon, &id);
            (id, key)
        })
        .collect();
    // Into the renewal window of every certificate above (validity 1,095 days, window 60).
    smartsign_tests::flow::move_clock(&daemon, 1_050);
    let registrar = daemon.client("registrar");
    let mut renewed = 0;
    for (n, (id, key)) in accounts.iter().enumerate() {
        let race = races[n % races.len()];
        let url = |path: &str| format!("{}/v1/accounts/{id}{path}", daemon.api);
        let before: Value = registrar.get(url("")).send().unwrap().json().unwrap();
        let old_serial = before["certificate"]["serial"].as_str().unwrap().to_owned();
        let consent = smartsign_tests::flow::consent(&daemon, id, "renew", key).unwrap();
        let device = smartsign_tests::device_pem(&device_key());
        let (renewal, other) = std::thread::scope(|scope| {
            let renewal = scope.spawn(|| {
                daemon
                    .client("gateway")
                    .post(url("/certificate/renewal"))
                    .json(&consent)
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            });
            let other = scope.spawn(|| {
                let registrar = daemon.client("registrar");
                let request = match race {
                    "device" => registrar
                        .put(url("/device"))
                        .json(&serde_json::json!({"device_public_key": device})),
                    "suspend" => registrar
                        .post(url("/suspend"))
                        .json(&serde_json::json!({"by": "government"})),
                    _ => registrar
                        .post(url("/invalidate"))
                        .json(&serde_json::json!({})),
                };
                request.send().unwrap().status().as_u16()
            });
            (renewal.join().unwrap(), other.join().unwrap())
        });
        assert_eq!(other, 200, "{id}: the {race} always succeeds");
        let after: Value = registrar.get(url("")).send().unwrap().json().unwrap();
        let current = after["certificate"]["serial"].as_str().unwrap().to_owned();
        // The other change is never lost.
        match race {
            "device" => assert_eq!(after["device_generation"], 2, "{id}"),
            "suspend" => assert_eq!(after["status"], "suspended", "{id}"),
            _ => assert_eq!(after["status"], "invalidated", "{id}"),
        }
        // The renewal either took (the account's certificate is the new one) or left nothing.
        if renewal == 200 {
            renewed += 1;
            assert_ne!(current, old_serial, "{id}: renewed");
        } else {
            assert_eq!(
                current, old_serial,
                "{id}: a refused renewal changes nothing"
            );
        }
        let serials = stored_serials(&daemon, id);
        let valid = valid_at_ca(&daemon, &serials);
        match race {
            // An invalidated account has no valid certificate at all.
            "invalidate" => assert!(valid.is_empty(), "{id}: valid {valid:?}"),
            // Otherwise exactly the current one.
            _ => assert_eq!(valid, vec![current.clone()], "{id}"),
        }
    }
    // No certificate valid at the CA that the store does not keep.
    let kept: Vec<String> = accounts
        .iter()
        .flat_map(|(id, _)| stored_serials(&daemon, id))
        .collect();
    let orphans: Vec<String> = all_valid_at_ca(&daemon)
        .into_iter()
        .filter(|serial| !kept.contains(serial))
        .collect();
    assert!(orphans.is_empty(), "orphan certificates: {orphans:?}");
    eprintln!(
        "renewal races: {} rounds ({} each of {races:?}), {renewed} renewed, 0 lost changes, \
         0 orphan certificates",
        accounts.len(),
        ROUNDS
    );
}
