//! SIGKILL from outside, at random moments, under a signing and deregistration load: after each
//! restart every acknowledged signature is still there and signed once, and at the end every
//! acknowledged deregistration left no personal data, and the audit log verifies.
//!
//! `KILL_ROUNDS` (default 100) sets how many kills one run makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::Digest as _;
use smartsign_tests::DevDaemon;
use smartsign_tests::flow::{Pending, registration, verify_audit};

fn rounds() -> usize {
    std::env::var("KILL_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
}

/// What the load saw acknowledged before a kill.
#[derive(Default)]
struct Acknowledged {
    signed: Vec<String>,
    deregistered: Vec<String>,
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_change_and_signs_nothing_twice() {
    let mut daemon = DevDaemon::start(&[]);
    let key = smartsign_tests::device_key();
    let registered = daemon
        .client("registrar")
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&registration("u-load", "1990-01-01", &key))
        .send()
        .unwrap();
    assert_eq!(registered.status(), 201);
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let mut seed: u64 = 0x5eed_1234_abcd;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut sequence = 0u64;
    for round in 0..rounds() {
        if round > 0 {
            daemon.start_again();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pid = daemon.pid().unwrap().to_string();
        std::thread::scope(|scope| {
            // Signing load: create and approve, remembering what was acknowledged.
            let signer = scope.spawn(|| {
                let service = daemon.client("demo-a");
                let Ok(taid) = daemon
                    .client("registrar")
                    .get(format!(
                        "{}/v1/accounts/u-load/taid?service=demo-a",
                        daemon.api
                    ))
                    .send()
                    .and_then(|response| response.json::<Value>())
                else {
                    return;
                };
                let taid = taid["taid"].as_str().unwrap_or_default().to_owned();
                while !stop.load(Ordering::Relaxed) {
                    sequence += 1;
                    let hash = sha2::Sha256::digest(format!("{round}-{sequence}")).to_vec();
                    let Ok(request) = service
                        .post(format!("{}/v1/signing-requests", daemon.api))
                        .json(
                            &serde_json::json!({"taid": taid, "hash_algorithm": "sha256",
                            "hash": base64_of(&hash)}),
                        )
                        .send()
                        .and_then(|response| response.json::<Value>())
                    else {
                        return;
                    };
                    if !request["request_id"].is_string() {
                        continue;
                    }
                    let pending = Pending {
                        key: key.clone(),
                        taid: taid.clone(),
                        hash,
                        request,
                    };
                    match pending.try_approve(&daemon) {
                        Ok(response) if response.status() == 200 => acknowledged
                            .lock()
                            .unwrap()
                            .signed
                            .push(pending.request["request_id"].as_str().unwrap().to_owned()),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            // Deregistration load: a throwaway account registered and deregistered.
            let deregisterer = scope.spawn(|| {
                let registrar = daemon.client("registrar");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("u-gone-{round}-{n}");
                    let body = registration(&id, "1990-01-01", &smartsign_tests::device_key());
                    let Ok(created) = registrar
                        .post(format!("{}/v1/accounts", daemon.api))
                        .json(&body)
                        .send()
                    else {
                        return;
                    };
                    if created.status() != 201 {
                        continue;
                    }
                    match registrar
                        .delete(format!("{}/v1/accounts/{id}", daemon.api))
                        .send()
                    {
                        Ok(response) if response.status() == 204 => {
                            acknowledged.lock().unwrap().deregistered.push(id)
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(100 + next() % 700));
            // A real `kill -9` from outside, while the load runs.
            let killed = std::process::Command::new("kill")
                .args(["-9", &pid])
                .status()
                .unwrap();
            assert!(killed.success());
            stop.store(true, Ordering::Relaxed);
            signer.join().unwrap();
            deregisterer.join().unwrap();
        });
        // Reap it.
        daemon.kill();
    }
    daemon.start_again();

    // Every acknowledged signature is there, signed; every acknowledged deregistration holds.
    let acknowledged = acknowledged.lock().unwrap();
    assert!(!acknowledged.signed.is_empty(), "the load signed nothing");
    let service = daemon.client("demo-a");
    for id in &acknowledged.signed {
        let read: Value = service
            .get(format!("{}/v1/signing-requests/{id}", daemon.api))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(read["status"], "signed", "{id}: {read}");
        assert!(read["result"]["signature"].is_string(), "{id}");
    }
    let registrar = daemon.client("registrar");
    for id in &acknowledged.deregistered {
        let account: Value = registrar
            .get(format!("{}/v1/accounts/{id}", daemon.api))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(account["status"], "deregistered", "{id}");
    }
    let store = rusqlite::Connection::open(daemon.state_dir().join("smartsign.sqlite")).unwrap();
    let with_data: i64 = store
        .query_row(
            "SELECT count(*) FROM accounts WHERE status = 'deregistered' \
             AND (length(sealed_name) > 0 OR length(sealed_dob) > 0 \
                  OR hkic_hash != zeroblob(32))",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(
        with_data, 0,
        "deregistered accounts that kept personal data"
    );
    // No request signed twice: one `signing.signed` record per request in the whole log.
    let export = tempfile::tempdir().unwrap();
    let records = verify_audit(&daemon, export.path());
    let mut per_request = std::collections::HashMap::new();
    for line in records.lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        if record["event"] == "signing.signed" {
            *per_request
                .entry(record["fields"]["request_id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    let twice: Vec<_> = per_request.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "signed twice: {twice:?}");
    eprintln!(
        "kill campaign: {} kills, {} acknowledged signatures, {} acknowledged \
         deregistrations, 0 lost, 0 signed twice",
        rounds(),
        acknowledged.signed.len(),
        acknowledged.deregistered.len()
    );
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
