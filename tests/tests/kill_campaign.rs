//! SIGKILL from outside, at random moments, under a signing (every other request a batch of
//! hashes under one approval), renewal and deregistration load: after each restart every
//! acknowledged signature is still there (a batch's all of them) and signed once, and at the
//! end every acknowledged deregistration left no personal data, every acknowledged renewal or
//! re-application holds, every certificate the CA issued is either kept by the store or revoked,
//! and the audit log verifies.
//!
//! `KILL_ROUNDS` (default 100) sets how many kills one run makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use sha2::Digest as _;
use smartsign_tests::DevDaemon;
use smartsign_tests::flow::{Shape, consent, decide, registration, statement, verify_audit};

fn rounds() -> usize {
    std::env::var("KILL_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
}

/// What the load saw acknowledged before a kill.
#[derive(Default)]
struct Acknowledged {
    /// Signing requests, with their number of hashes.
    signed: Vec<(String, usize)>,
    deregistered: Vec<String>,
    /// Renewals and re-applications: the account and its new certificate's serial.
    renewed: Vec<(String, String)>,
}

/// The hashes of every other signing request of the load: a batch under one approval.
const BATCH: usize = 3;

/// Accounts registered before the clock moves into their renewal window: each is renewed once
/// (a key update), then revoked and re-applied for (an initial request) over and over.
const RENEWABLE: usize = 24;

/// Rejects every pending request of account `id` from its device; `Err` when the daemon went
/// away.
fn reject_pending(daemon: &DevDaemon, id: &str, key: &p256::ecdsa::SigningKey) -> Result<(), ()> {
    let pending: Value = daemon
        .client("gateway")
        .get(format!(
            "{}/v1/accounts/{id}/signing-requests?status=pending",
            daemon.api
        ))
        .send()
        .and_then(|response| response.json())
        .map_err(drop)?;
    let decode = |value: &Value| {
        value
            .as_str()
            .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
    };
    for request in pending["requests"].as_array().into_iter().flatten() {
        let hashes: Option<Vec<Vec<u8>>> = request["hashes"]
            .as_array()
            .map(|list| list.iter().filter_map(decode).collect());
        let hash = decode(&request["hash"]);
        let shape = match (&hashes, &hash) {
            (Some(hashes), _) => Shape::Batch(hashes),
            (None, Some(hash)) => Shape::Single(hash),
            (None, None) => continue,
        };
        let statement = statement(request, shape, "reject");
        decide(daemon, request, key, "reject", &statement).map_err(drop)?;
    }
    Ok(())
}

/// Moves the daemon's clock 1,050 days ahead of the real one: into the renewal window
/// (validity 1,095 days, window 60) of the certificates issued before, which stay valid.
fn move_clock(daemon: &DevDaemon) {
    smartsign_tests::flow::move_clock(daemon, 1_050);
}

/// One renewal (or, once renewed, a revocation and re-application) of account `id`; the new
/// serial when the daemon acknowledged it, `Err` when the daemon went away.
fn renew_once(
    daemon: &DevDaemon,
    id: &str,
    key: &p256::ecdsa::SigningKey,
    renewed_before: bool,
) -> Result<Option<String>, ()> {
    let gateway = daemon.client("gateway");
    let (purpose, route) = if renewed_before {
        let revoked = daemon
            .client("registrar")
            .post(format!(
                "{}/v1/accounts/{id}/certificate/revoke",
                daemon.api
            ))
            .json(&serde_json::json!({"reason": "superseded"}))
            .send()
            .map_err(drop)?;
        if !matches!(revoked.status().as_u16(), 200 | 409) {
            return Ok(None);
        }
        ("reapply", "reapply")
    } else {
        ("renew", "renewal")
    };
    let Some(body) = consent(daemon, id, purpose, key) else {
        return Err(());
    };
    let response = gateway
        .post(format!(
            "{}/v1/accounts/{id}/certificate/{route}",
            daemon.api
        ))
        .json(&body)
        .send()
        .map_err(drop)?;
    if response.status() != 200 {
        return Ok(None);
    }
    let account: Value = response.json().map_err(drop)?;
    Ok(account["certificate"]["serial"].as_str().map(str::to_owned))
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
    // The accounts the renewal load works on, then the clock moved into their renewal window
    // (validity 1,095 days, window 60): the signing account's certificate stays valid.
    let renewable: Vec<(String, p256::ecdsa::SigningKey)> = (0..RENEWABLE)
        .map(|n| {
            let id = format!("u-renew-{n}");
            let key = smartsign_tests::device_key();
            let created = daemon
                .client("registrar")
                .post(format!("{}/v1/accounts", daemon.api))
                .json(&registration(&id, "1990-01-01", &key))
                .send()
                .unwrap();
            assert_eq!(created.status(), 201);
            (id, key)
        })
        .collect();
    move_clock(&daemon);
    let renewed_once = Mutex::new(vec![false; RENEWABLE]);
    let mut next_renewal = 0usize;
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
            // The development clock lives in the process: set it again.
            move_clock(&daemon);
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
                // The user rejects what a kill left pending: an account takes five at most.
                if reject_pending(&daemon, "u-load", &key).is_err() {
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    sequence += 1;
                    // Every other request a batch of BATCH hashes under one approval.
                    let hashes: Vec<Vec<u8>> = (0..if sequence.is_multiple_of(2) { BATCH } else { 1 })
                        .map(|n| sha2::Sha256::digest(format!("{round}-{sequence}-{n}")).to_vec())
                        .collect();
                    let body = match hashes.as_slice() {
                        [hash] => serde_json::json!({"taid": taid, "hash_algorithm": "sha256",
                            "hash": base64_of(hash)}),
                        _ => serde_json::json!({"taid": taid, "hash_algorithm": "sha256",
                            "hashes": hashes.iter().map(|hash| base64_of(hash)).collect::<Vec<_>>()}),
                    };
                    let Ok(request) = service
                        .post(format!("{}/v1/signing-requests", daemon.api))
                        .json(&body)
                        .send()
                        .and_then(|response| response.json::<Value>())
                    else {
                        return;
                    };
                    let Some(request_id) = request["request_id"].as_str() else {
                        continue;
                    };
                    let shape = match hashes.as_slice() {
                        [hash] => Shape::Single(hash),
                        _ => Shape::Batch(&hashes),
                    };
                    let statement = statement(&request, shape, "approve");
                    match decide(&daemon, &request, &key, "approve", &statement) {
                        Ok(response) if response.status() == 200 => acknowledged
                            .lock()
                            .unwrap()
                            .signed
                            .push((request_id.to_owned(), hashes.len())),
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
            // Renewal load: each account renewed once, then revoked and re-applied for.
            let renewer = scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let n = next_renewal % RENEWABLE;
                    next_renewal += 1;
                    let (id, key) = &renewable[n];
                    let before = renewed_once.lock().unwrap()[n];
                    match renew_once(&daemon, id, key, before) {
                        Ok(Some(serial)) => {
                            renewed_once.lock().unwrap()[n] = true;
                            acknowledged
                                .lock()
                                .unwrap()
                                .renewed
                                .push((id.clone(), serial));
                        }
                        Ok(None) => {}
                        Err(()) => return,
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
            renewer.join().unwrap();
        });
        // Reap it.
        daemon.kill();
    }
    daemon.start_again();

    // Every acknowledged signature is there, signed; every acknowledged deregistration holds.
    let acknowledged = acknowledged.lock().unwrap();
    assert!(!acknowledged.signed.is_empty(), "the load signed nothing");
    let service = daemon.client("demo-a");
    for (id, count) in &acknowledged.signed {
        let read: Value = service
            .get(format!("{}/v1/signing-requests/{id}", daemon.api))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(read["status"], "signed", "{id}: {read}");
        let results: Vec<&Value> = match read["results"].as_array() {
            Some(batch) => batch.iter().collect(),
            None => vec![&read["result"]],
        };
        assert_eq!(results.len(), *count, "{id}: {read}");
        for result in results {
            assert!(result["signature"].is_string(), "{id}: {read}");
        }
    }
    let batches = acknowledged
        .signed
        .iter()
        .filter(|(_, count)| *count > 1)
        .count();
    assert!(batches > 0, "the load signed no batch");
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
    // Every acknowledged renewal or re-application holds: the account's certificate is the
    // acknowledged one or a later one (an unacknowledged change that finished before a kill).
    let mut last: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for (id, serial) in &acknowledged.renewed {
        last.insert(id, serial);
    }
    for (id, serial) in &last {
        let (current, acknowledged_from, current_from): (String, i64, i64) = store
            .query_row(
                "SELECT a.current_certificate, k.not_before, c.not_before FROM accounts a \
                 JOIN certificates c ON c.serial = a.current_certificate \
                 JOIN certificates k ON k.serial = ?2 WHERE a.id = ?1",
                [id, serial],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .unwrap();
        assert!(
            current == *serial || current_from >= acknowledged_from,
            "{id}: acknowledged {serial}, now {current}"
        );
    }
    // Every certificate the CA issued (for a subscriber) is kept by the store or revoked: a
    // kill between the CA's answer and the store leaves none valid that nothing names.
    let ca = rusqlite::Connection::open(daemon.state_dir().join("ca/ca.sqlite")).unwrap();
    let valid_at_ca: Vec<String> = ca
        .prepare(
            "SELECT serial FROM certificates WHERE revoked_at IS NULL \
             AND profile IN ('adult', 'minor')",
        )
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let orphans: Vec<&String> = valid_at_ca
        .iter()
        .filter(|serial| {
            store
                .query_row(
                    "SELECT count(*) FROM certificates WHERE serial = ?1",
                    [serial.as_str()],
                    |row| row.get::<_, i64>(0),
                )
                .unwrap()
                == 0
        })
        .collect();
    assert!(
        orphans.is_empty(),
        "{} certificates valid at the CA that the store does not keep: {orphans:?}",
        orphans.len()
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
        "kill campaign: {} kills, {} acknowledged signing requests ({batches} batches of \
         {BATCH}), {} acknowledged deregistrations, {} acknowledged renewals, {} certificates valid at the CA, 0 lost, \
         0 signed twice, 0 orphan certificates",
        rounds(),
        acknowledged.signed.len(),
        acknowledged.deregistered.len(),
        acknowledged.renewed.len(),
        valid_at_ca.len()
    );
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
