//! The daemon's API apart from the signing flow: TLS and roles, registration rules, operations
//! endpoints, the audit routes with an offline verification, the OpenAPI file, and what the state
//! directory must never hold in plaintext.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::signature::Signer;
use serde_json::{Value, json};
use sha2::Digest;
use smartsign_tests::flow::{Pending, problem, registration};
use smartsign_tests::{DevDaemon, binary, describe, device_key, run, workspace_root};

#[test]
fn connection_without_a_client_certificate_is_refused_at_tls() {
    let daemon = DevDaemon::start(&[]);
    let anonymous = daemon.client_builder().build().unwrap();
    let error = anonymous
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .expect_err("the TLS handshake must fail without a client certificate");
    assert!(error.is_connect() || error.is_request(), "{error:?}");

    // A certificate from the client CA whose OU names no role: 401.
    daemon.issue_client_certificate("nobody", "visitor");
    let visitor = daemon.client("nobody");
    assert_eq!(
        problem(
            visitor
                .get(format!("{}/v1/audit/checkpoint", daemon.api))
                .send()
                .unwrap()
        ),
        (401, "client_certificate_required".into())
    );
    // Each role reaches only its own routes.
    let auditor = daemon.client("auditor");
    assert_eq!(
        problem(
            auditor
                .get(format!("{}/v1/accounts/x", daemon.api))
                .send()
                .unwrap()
        ),
        (403, "forbidden".into())
    );
    let gateway = daemon.client("gateway");
    assert_eq!(
        problem(
            gateway
                .get(format!("{}/v1/audit/checkpoint", daemon.api))
                .send()
                .unwrap()
        ),
        (403, "forbidden".into())
    );
}

#[test]
fn registration_rules_and_their_error_codes() {
    let daemon = DevDaemon::start(&[]);
    let registrar = daemon.client("registrar");
    let url = format!("{}/v1/accounts", daemon.api);
    let key = device_key();
    let post = |body: &Value| registrar.post(&url).json(body).send().unwrap();

    // Ages are counted on the Hong Kong date; the daemon's clock is set to a known instant:
    // 2027-06-15 00:30 HKT is 2027-06-14 16:30 UTC. (Forward, not back: the embedded CA's
    // certificates, which the CMP server checks, start at the daemon's first start.)
    let officer = daemon.client("officer");
    let set = officer
        .post(format!("{}/v1/admin/clock", daemon.api))
        .json(&json!({"now": "2027-06-14T16:30:00Z"}))
        .send()
        .unwrap();
    assert_eq!(set.status(), 200);

    // Turning 11 today (Hong Kong date) is old enough; tomorrow is not.
    let mut minor = registration("u-11-today", "2016-06-15", &key);
    minor["guardian"] = json!({"hkic_number": "A1234563", "date_of_birth": "1980-02-29"});
    let accepted = post(&minor);
    assert_eq!(accepted.status(), 201);
    let account: Value = accepted.json().unwrap();
    assert_eq!(account["minor"], true);
    assert_eq!(account["adult_on"], "2034-06-15");
    assert_eq!(account["certificate"]["profile"], "minor");

    let mut too_young = registration("u-11-tomorrow", "2016-06-16", &key);
    too_young["guardian"] = minor["guardian"].clone();
    assert_eq!(problem(post(&too_young)), (422, "underage".into()));

    let no_guardian = registration("u-minor", "2011-01-01", &key);
    assert_eq!(
        problem(post(&no_guardian)),
        (422, "guardian_required".into())
    );

    let mut young_guardian = registration("u-minor", "2011-01-01", &key);
    young_guardian["guardian"] = json!({"hkic_number": "A1234563", "date_of_birth": "2010-01-01"});
    assert_eq!(
        problem(post(&young_guardian)),
        (422, "guardian_underage".into())
    );

    let mut bad_check_digit = registration("u-bad", "1990-01-01", &key);
    bad_check_digit["hkic_number"] = json!("A1234560");
    assert_eq!(
        problem(post(&bad_check_digit)),
        (422, "invalid_hkic".into())
    );

    let mut unknown_field = registration("u-x", "1990-01-01", &key);
    unknown_field["nickname"] = json!("x");
    assert_eq!(
        problem(post(&unknown_field)),
        (400, "invalid_request".into())
    );

    let bad_id = registration("u/x", "1990-01-01", &key);
    assert_eq!(problem(post(&bad_id)), (400, "invalid_request".into()));

    assert_eq!(problem(post(&minor)), (409, "account_exists".into()));
    assert_eq!(
        problem(registrar.get(format!("{url}/u-nobody")).send().unwrap()),
        (404, "not_found".into())
    );
    // Nothing was created by the refused registrations.
    for id in ["u-11-tomorrow", "u-minor", "u-bad", "u-x"] {
        assert_eq!(
            registrar
                .get(format!("{url}/{id}"))
                .send()
                .unwrap()
                .status(),
            404,
            "{id}"
        );
    }
}

#[test]
fn state_logs_and_audit_hold_no_personal_data_and_the_audit_export_verifies_offline() {
    let mut daemon = DevDaemon::start(&[]);
    let registrar = daemon.client("registrar");
    let gateway = daemon.client("gateway");
    let service = daemon.client("demo-a");
    let key = device_key();
    let hkic = "Z6837493";
    let mut body = registration("u-pd-1", "1977-03-04", &key);
    body["hkic_number"] = json!(hkic);
    let created = registrar
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().unwrap());
    let taid: Value = registrar
        .get(format!(
            "{}/v1/accounts/u-pd-1/taid?service=demo-a",
            daemon.api
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let hash = sha2::Sha256::digest(b"document").to_vec();
    let request: Value = service
        .post(format!("{}/v1/signing-requests", daemon.api))
        .json(&json!({"taid": taid["taid"], "hash_algorithm": "sha256",
                      "hash": STANDARD.encode(&hash), "hkic_number": hkic}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let statement = format!(
        "smartsign-authorise-v1\n{}\n{}\nsha256\n{}\napprove",
        request["request_id"].as_str().unwrap(),
        request["identification_code"].as_str().unwrap(),
        hex::encode(&hash)
    );
    let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
    let authorised = gateway
        .post(format!(
            "{}/v1/signing-requests/{}/authorisation",
            daemon.api,
            request["request_id"].as_str().unwrap()
        ))
        .json(&json!({"decision": "approve",
                      "device_signature": STANDARD.encode(signature.to_der().as_bytes())}))
        .send()
        .unwrap();
    assert_eq!(authorised.status(), 200);

    // Export the audit log as an auditor would, while the daemon runs.
    let auditor = daemon.client("auditor");
    let records = auditor
        .get(format!(
            "{}/v1/audit/records?from=0&limit=100000",
            daemon.api
        ))
        .send()
        .unwrap();
    assert_eq!(
        records.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let records = records.bytes().unwrap().to_vec();
    let checkpoint = auditor
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    let checkpoint_json: Value = serde_json::from_slice(&checkpoint).unwrap();
    assert_eq!(
        checkpoint_json["tree_size"].as_u64().unwrap(),
        records.iter().filter(|b| **b == b'\n').count() as u64
    );
    let public_key = auditor
        .get(format!("{}/v1/audit/public-key", daemon.api))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    let proof: Value = auditor
        .get(format!(
            "{}/v1/audit/proofs/inclusion?index=0&tree_size={}",
            daemon.api, checkpoint_json["tree_size"]
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(proof["hashes"].as_array().is_some_and(|h| !h.is_empty()));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("records.ndjson"), &records).unwrap();
    std::fs::write(dir.path().join("checkpoint.json"), &checkpoint).unwrap();
    std::fs::write(dir.path().join("audit.pem"), &public_key).unwrap();
    let verify = |records: &str| {
        run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
            .args(["audit", "verify", "--records"])
            .arg(dir.path().join(records))
            .arg("--checkpoint")
            .arg(dir.path().join("checkpoint.json"))
            .arg("--public-key")
            .arg(dir.path().join("audit.pem")))
    };
    let good = verify("records.ndjson");
    assert!(good.status.success(), "{}", describe(&good));
    let mut flipped = records.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(dir.path().join("flipped.ndjson"), &flipped).unwrap();
    assert!(!verify("flipped.ndjson").status.success());

    // The signing records are there, and none of them names the person.
    let text = String::from_utf8(records.clone()).unwrap();
    for event in [
        "account.registered",
        "signing.requested",
        "signing.approved",
        "signing.signed",
    ] {
        assert!(
            text.contains(&format!("\"event\":\"{event}\"")),
            "{event} missing"
        );
    }

    // The signature's record says alone what was signed, for which service, with which key.
    let signed: Value = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|record| record["event"] == "signing.signed")
        .unwrap();
    assert_eq!(signed["fields"]["service"], "demo-a", "{signed}");
    assert_eq!(signed["fields"]["hash_algorithm"], "sha256", "{signed}");
    assert_eq!(signed["fields"]["hash"], hex::encode(&hash), "{signed}");
    assert!(signed["fields"]["serial"].is_string(), "{signed}");

    // Stop the daemon so that everything is on disk, then grep every file it wrote, and its log.
    daemon.stop();
    let secrets = [
        "WONGSURNAME",
        "Siu Ming Given",
        "1977-03-04",
        hkic,
        "Z683749",
    ];
    let mut files = Vec::new();
    collect_files(&daemon.state_dir(), &mut files);
    assert!(files.iter().any(|f| f.ends_with("smartsign.sqlite")));
    for file in &files {
        // The development examples are the user's own input, not the daemon's state.
        if file.components().any(|c| c.as_os_str() == "examples") {
            continue;
        }
        let bytes = std::fs::read(file).unwrap();
        for secret in secrets {
            assert!(
                !contains(&bytes, secret.as_bytes()),
                "{} holds {secret:?} in plaintext",
                file.display()
            );
        }
    }
    let log = daemon.log() + &daemon.stdout();
    for secret in secrets {
        assert!(!log.contains(secret), "the log holds {secret:?}");
    }
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[test]
fn operations_endpoints_metrics_and_graceful_restart() {
    let mut daemon = DevDaemon::start(&[]);
    let plain = reqwest::blocking::Client::new();
    assert_eq!(
        plain
            .get(format!("{}/healthz", daemon.metrics))
            .send()
            .unwrap()
            .status(),
        200
    );
    let ready = plain
        .get(format!("{}/readyz", daemon.metrics))
        .send()
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().unwrap()["ready"], true);
    let registrar = daemon.client("registrar");
    let _ = registrar
        .get(format!("{}/v1/accounts/u-none", daemon.api))
        .send()
        .unwrap();
    // A registration seals personal data in the HSM: HSM latency shows in the metrics.
    let mut plain_account = registration("u-metrics", "1990-01-01", &device_key());
    plain_account["tier"] = json!("iam_smart");
    let registered = registrar
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&plain_account)
        .send()
        .unwrap();
    assert_eq!(registered.status(), 201);
    let metrics = plain
        .get(format!("{}/metrics", daemon.metrics))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for name in [
        "smartsign_http_requests_total{method=\"GET\",route=\"/v1/accounts/{id}\",status=\"404\"} 1",
        "smartsign_http_request_duration_seconds_bucket",
        "smartsign_hsm_operation_duration_seconds",
        "smartsign_signing_requests_pending",
        "smartsign_audit_append_duration_seconds",
        "smartsign_audit_checkpoint_age_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    // The how-to names working commands.
    let howto = daemon.stdout();
    assert!(howto.contains("curl"), "{howto}");
    assert!(howto.contains(&daemon.api), "{howto}");

    // A graceful stop writes a checkpoint covering the whole log; a restart reuses the state.
    let status = daemon.stop().unwrap();
    assert!(status.success(), "{status}\n{}", daemon.log());
    let checkpoint: Value = serde_json::from_slice(
        &std::fs::read(daemon.state_dir().join("audit/checkpoint.json")).unwrap(),
    )
    .unwrap();
    let lines = std::fs::read(daemon.state_dir().join("audit/audit.log"))
        .unwrap()
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64;
    assert_eq!(checkpoint["tree_size"].as_u64().unwrap(), lines);
    daemon.restart();
    let ready = plain
        .get(format!("{}/readyz", daemon.metrics))
        .send()
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[test]
fn every_route_of_the_openapi_file_is_served() {
    let spec: Value = serde_json::from_slice(
        &std::fs::read(workspace_root().join("daemon/openapi.json")).unwrap(),
    )
    .unwrap();
    let daemon = DevDaemon::start(&[]);
    let plain = reqwest::blocking::Client::new();
    let clients: std::collections::HashMap<&str, _> =
        ["registrar", "gateway", "officer", "auditor", "demo-a"]
            .into_iter()
            .map(|name| (name, daemon.client(name)))
            .collect();
    let mut unserved = Vec::new();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            if !["get", "post", "put", "delete"].contains(&method.as_str()) {
                continue;
            }
            let concrete = path.replace("{id}", "t-probe");
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = if operation["x-listener"] == "metrics" {
                plain
                    .request(method.clone(), format!("{}{concrete}", daemon.metrics))
                    .send()
                    .unwrap()
            } else {
                let role = operation["x-roles"][0].as_str().unwrap();
                let client = &clients[if role == "service" { "demo-a" } else { role }];
                client
                    .request(method.clone(), format!("{}{concrete}", daemon.api))
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .unwrap()
            };
            let status = response.status().as_u16();
            let body = response.json::<Value>().unwrap_or_default();
            // A served route answers with anything but "no such route" or "method not allowed".
            let route_missing =
                status == 405 || (status == 404 && body["detail"] == "no such route");
            if route_missing {
                unserved.push(format!("{method} {path}"));
            }
        }
    }
    assert!(
        unserved.is_empty(),
        "routes in openapi.json that are not served: {unserved:?}"
    );
}

#[test]
fn check_config_accepts_the_dev_configuration_and_explains_mistakes() {
    let mut daemon = DevDaemon::start(&[]);
    daemon.stop();
    let written = daemon.state_dir().join("smartsignd.toml");
    let smartsignd = binary("smartsignd", "smartsignd");
    let check =
        |path: &std::path::Path| run(Command::new(&smartsignd).arg("--check-config").arg(path));
    let good = check(&written);
    assert!(good.status.success(), "{}", describe(&good));

    let text = std::fs::read_to_string(&written).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        text.replace("[store]", "[store]\ncolour = \"red\""),
    )
    .unwrap();
    let refused = check(&unknown);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("colour"),
        "{}",
        describe(&refused)
    );

    // The PostgreSQL store: its keys, and what belongs to the other backend.
    let store_path = text
        .lines()
        .find(|line| line.starts_with("path = ") && line.contains("smartsign.sqlite"))
        .unwrap()
        .to_owned();
    let text = text.replace("backend = \"sqlite\"\n", "");
    for (name, store, problem) in [
        (
            "pg-good.toml",
            "backend = \"postgres\"\nurl = \"host=/run/postgresql user=smartsign\"",
            None,
        ),
        (
            "pg-no-url.toml",
            "backend = \"postgres\"",
            Some("store.url is missing"),
        ),
        (
            "pg-password.toml",
            "backend = \"postgres\"\nurl = \"postgresql://smartsign:secret@db/smartsign\"",
            Some("carries a password: give it in a file"),
        ),
        (
            "pg-path.toml",
            &format!("backend = \"postgres\"\nurl = \"host=db\"\n{store_path}"),
            Some("store.path is for backend = \"sqlite\""),
        ),
        (
            "sqlite-url.toml",
            &format!("{store_path}\nurl = \"host=db\""),
            Some("store.url is for backend = \"postgres\""),
        ),
        (
            "bad-node.toml",
            &format!("{store_path}\nnode_id = \"a b\""),
            Some("store.node_id \"a b\""),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace(&store_path, store)).unwrap();
        let checked = check(&path);
        match problem {
            None => assert!(checked.status.success(), "{name}: {}", describe(&checked)),
            Some(problem) => {
                assert!(!checked.status.success(), "{name}");
                assert!(
                    String::from_utf8_lossy(&checked.stderr).contains(problem),
                    "{name}: {}",
                    describe(&checked)
                );
            }
        }
    }

    // Resident keys live in one node's HSM: several nodes are refused them.
    let resident = dir.path().join("pg-resident.toml");
    std::fs::write(
        &resident,
        text.replace(&store_path, "backend = \"postgres\"\nurl = \"host=db\"")
            .replace("key_mode = \"wrapped\"", "key_mode = \"resident\""),
    )
    .unwrap();
    let refused = check(&resident);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("hsm.key_mode = \"resident\" with [store] backend = \"postgres\""),
        "{}",
        describe(&refused)
    );

    let bad_mode = dir.path().join("mode.toml");
    std::fs::write(
        &bad_mode,
        text.replace("key_mode = \"wrapped\"", "key_mode = \"plaintext\""),
    )
    .unwrap();
    let refused = check(&bad_mode);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("hsm.key_mode"), "{}", describe(&refused));
    assert!(
        stderr.contains("\"wrapped\" or \"resident\""),
        "{}",
        describe(&refused)
    );

    // Worker CPUs: one this process may use is accepted, one it may not is named.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let first: usize = allowed.split(['-', ',']).next().unwrap().parse().unwrap();
    let pinned = |cpus: &str, name: &str| {
        let path = dir.path().join(name);
        let line = format!("key_mode = \"wrapped\"\nworker_cpus = [{cpus}]");
        std::fs::write(&path, text.replace("key_mode = \"wrapped\"", &line)).unwrap();
        check(&path)
    };
    let good = pinned(&first.to_string(), "cpus.toml");
    assert!(good.status.success(), "{}", describe(&good));
    for (cpus, name, problem) in [
        (
            format!("{first}, 100000"),
            "no-cpu.toml",
            "hsm.worker_cpus: CPU 100000 is not one smartsignd may run on".to_owned(),
        ),
        (
            String::new(),
            "empty.toml",
            "hsm.worker_cpus is empty".to_owned(),
        ),
        (
            format!("{first}, {first}"),
            "twice.toml",
            format!("hsm.worker_cpus names CPU {first} twice"),
        ),
    ] {
        let refused = pinned(&cpus, name);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains(&problem),
            "{}",
            describe(&refused)
        );
    }
}

/// `/readyz` is 503 and names `component` as the problem.
fn assert_not_ready_because_of(daemon: &DevDaemon, component: &str) {
    let ready = reqwest::blocking::Client::new()
        .get(format!("{}/readyz", daemon.metrics))
        .send()
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().unwrap();
    assert_ne!(body["components"][component], "ok", "{body}");
}

/// Fail closed: when the audit log cannot be written, an approved request is not signed, the
/// answer is 503 `audit_unavailable`, and `/readyz` says the audit log is the problem.
#[test]
fn full_audit_disk_fails_signing_closed_with_audit_unavailable() {
    let daemon = DevDaemon::start_with_audit_quota(64);
    let pending = Pending::new(&daemon, "u-full-1");

    // Fill the audit file system until the log refuses a record: every refused request is
    // audited (here a hash of the wrong length; an account takes only five pending requests).
    let bad_hash = serde_json::json!({"taid": pending.taid, "hash_algorithm": "sha256",
                                      "hash": "AAAA"});
    let mut refused = None;
    for _ in 0..5000 {
        let response = daemon
            .client("demo-a")
            .post(format!("{}/v1/signing-requests", daemon.api))
            .json(&bad_hash)
            .send()
            .unwrap();
        let answer = problem(response);
        if answer != (400, "invalid_hash".to_owned()) {
            refused = Some(answer);
            break;
        }
    }
    assert_eq!(refused, Some((503, "audit_unavailable".to_owned())));

    assert_eq!(
        problem(pending.approve(&daemon)),
        (503, "audit_unavailable".into())
    );
    let after = pending.read(&daemon);
    assert_ne!(after["status"], "signed", "{after}");
    assert!(
        after.get("result").is_none(),
        "no signature may leave: {after}"
    );
    assert_not_ready_because_of(&daemon, "audit");
}

/// Fail closed on the HSM: with the token gone (its directory moved away, as when a device is
/// pulled), an approved request is not signed, the answer is 503 `hsm_unavailable`, and
/// `/readyz` names the HSM.
#[test]
fn removed_token_fails_signing_closed_with_hsm_unavailable() {
    let daemon = DevDaemon::start(&[]);
    let pending = Pending::new(&daemon, "u-hsm-1");

    let tokens = daemon.state_dir().join("hsm/tokens");
    let away = tempfile::tempdir_in(daemon.state_dir()).unwrap();
    for entry in std::fs::read_dir(&tokens).unwrap() {
        let entry = entry.unwrap();
        std::fs::rename(entry.path(), away.path().join(entry.file_name())).unwrap();
    }

    assert_eq!(
        problem(pending.approve(&daemon)),
        (503, "hsm_unavailable".into())
    );
    let after = pending.read(&daemon);
    assert_eq!(after["status"], "failed", "{after}");
    assert!(
        after.get("result").is_none(),
        "no signature may leave: {after}"
    );
    assert_not_ready_because_of(&daemon, "hsm");
}

#[test]
fn systemd_hears_ready_once_the_daemon_serves_and_watchdog_pings() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut daemon = DevDaemon::start(&[]);
    daemon.set_env("NOTIFY_SOCKET", Some(path.to_str().unwrap()));
    daemon.set_env("WATCHDOG_USEC", Some("1000000"));
    daemon.restart();
    let mut heard = Vec::new();
    let mut buf = [0u8; 512];
    while !(heard.iter().any(|m: &String| m.contains("READY=1"))
        && heard.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = socket.recv(&mut buf).expect("a notification within 60 s");
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // Ready only once it serves: the API answers by then.
    let ready = heard.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(heard[ready].contains("STATUS="), "{heard:?}");
    let answered = daemon
        .client("auditor")
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap();
    assert_eq!(answered.status(), 200);
    daemon.stop();
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 at shutdown: {heard:?}");
}

/// `/proc/PID/status`'s `VmLck` of a process, in kB.
fn locked_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmLck:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck in /proc/PID/status")
}

#[test]
fn the_daemon_keeps_its_memory_out_of_swap() {
    // The tests run with CAP_IPC_LOCK (root), as the unit's LimitMEMLOCK=infinity allows.
    let daemon = DevDaemon::start(&[]);
    let pid = daemon.pid().unwrap();
    // The pages touched since start, the PIN's among them, are locked.
    assert!(locked_kib(pid) > 1024, "VmLck {} kB", locked_kib(pid));
}

#[test]
fn a_daemon_that_cannot_lock_its_memory_refuses_to_start() {
    let mut daemon = DevDaemon::start(&[]);
    // The same configuration, started as production starts it, under a 64 KiB limit and
    // without CAP_IPC_LOCK (capsh drops it from the bounding set before exec).
    let config = daemon.state_dir().join("smartsignd.toml");
    daemon.stop();
    let output = Command::new("capsh")
        .args(["--drop=cap_ipc_lock", "--", "-c"])
        .arg(format!(
            "ulimit -l 64 && exec {} --config {}",
            binary("smartsignd", "smartsignd").display(),
            config.display()
        ))
        .output()
        .expect("capsh (libcap2-bin)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("RLIMIT_MEMLOCK") && stderr.contains("LimitMEMLOCK=infinity"),
        "{stderr}"
    );
}
