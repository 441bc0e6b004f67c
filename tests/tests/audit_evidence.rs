//! The auditor's evidence (issue 16 §2): `GET /v1/audit/records` filters served by the record
//! index, signing receipts and their offline verification (`smartsign-ctl audit
//! verify-receipt`, the README's Python script, openssl for the checkpoint signature),
//! `smartsign-ctl audit verify --since-checkpoint`, and the `audit watch` monitor, on a `--dev`
//! daemon with real TLS and SoftHSM.

// Test code: a panic, with the reason, is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use smartsign_tests::flow::{Pending, hkic_for, problem, registration};
use smartsign_tests::{DevDaemon, binary, describe, device_key, run, workspace_root};

fn ctl() -> Command {
    Command::new(binary("smartsign-ops", "smartsign-ctl"))
}

fn lines(body: &[u8]) -> Vec<Value> {
    body.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).unwrap())
        .collect()
}

fn index_of(record: &Value) -> u64 {
    record["index"].as_u64().unwrap()
}

/// Every record, as the plain export gives it.
fn export(daemon: &DevDaemon) -> Vec<u8> {
    daemon
        .client("auditor")
        .get(format!(
            "{}/v1/audit/records?from=0&limit=10000",
            daemon.api
        ))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec()
}

/// `GET /v1/audit/records?QUERY`: the answer's records and its `x-next-after`.
fn query(daemon: &DevDaemon, query: &str) -> (Vec<Value>, Option<u64>) {
    let response = daemon
        .client("auditor")
        .get(format!("{}/v1/audit/records?{query}", daemon.api))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200, "{query}");
    let next = response
        .headers()
        .get("x-next-after")
        .map(|value| value.to_str().unwrap().parse().unwrap());
    (lines(&response.bytes().unwrap()), next)
}

fn set_clock(daemon: &DevDaemon, now: &str) {
    let set = daemon
        .client("officer")
        .post(format!("{}/v1/admin/clock", daemon.api))
        .json(&json!({ "now": now }))
        .send()
        .unwrap();
    assert_eq!(set.status(), 200);
}

/// Registers `id` and has one request at demo-a signed; returns it.
fn signed(daemon: &DevDaemon, id: &str) -> Pending {
    let pending = Pending::new(daemon, id);
    assert_eq!(pending.approve(daemon).status(), 200);
    pending
}

#[test]
fn audit_record_filters_find_exactly_what_they_name() {
    let daemon = DevDaemon::start(&[]);
    // Two hours apart, so that a time window separates them.
    set_clock(&daemon, "2027-03-01T08:00:00Z");
    signed(&daemon, "u-filter-a");
    set_clock(&daemon, "2027-03-01T10:00:00Z");
    signed(&daemon, "u-filter-b");
    let all = lines(&export(&daemon));
    assert!(all.len() > 10, "{all:?}");

    let expect = |keep: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        all.iter().filter(|record| keep(record)).cloned().collect()
    };
    let by_account = expect(&|r| r["fields"]["account_id"] == "u-filter-a");
    assert!(by_account.len() >= 4, "{by_account:?}");
    assert_eq!(query(&daemon, "account_id=u-filter-a").0, by_account);
    let by_event = expect(&|r| r["event"] == "signing.signed");
    assert_eq!(by_event.len(), 2);
    assert_eq!(query(&daemon, "event=signing.signed").0, by_event);
    let by_service = expect(&|r| {
        r["fields"]["service"] == "demo-a"
            || (r["fields"]["service"].is_null() && r["actor"] == "service:demo-a")
    });
    assert!(by_service.len() >= 4);
    assert_eq!(query(&daemon, "service=demo-a").0, by_service);
    assert!(query(&daemon, "service=demo-b").0.is_empty());
    let after_nine = expect(&|r| r["time"].as_str().unwrap() >= "2027-03-01T09:00:00Z");
    assert!(
        after_nine
            .iter()
            .any(|r| r["fields"]["account_id"] == "u-filter-b")
    );
    assert!(
        after_nine
            .iter()
            .all(|r| r["fields"]["account_id"] != "u-filter-a")
    );
    assert_eq!(
        query(&daemon, "from_time=2027-03-01T09:00:00Z").0,
        after_nine
    );
    // Another offset, the same instant.
    assert_eq!(
        query(&daemon, "from_time=2027-03-01T17:00:00%2B08:00").0,
        after_nine
    );
    // Records carry whole seconds: a fraction in from_time keeps the records of its second
    // (logged after the clock was set to 09:00:00, within that second).
    assert_eq!(
        query(&daemon, "from_time=2027-03-01T09:00:00.5Z").0,
        after_nine
    );
    // An `after` past the end, with a filter: an empty page, not a refusal.
    assert!(
        query(&daemon, "account_id=u-filter-b&after=18446744073709551614")
            .0
            .is_empty()
    );
    let window = expect(&|r| {
        let time = r["time"].as_str().unwrap();
        ("2027-03-01T07:00:00Z".."2027-03-01T09:00:00Z").contains(&time)
    });
    assert!(
        window
            .iter()
            .any(|r| r["fields"]["account_id"] == "u-filter-a")
    );
    assert_eq!(
        query(
            &daemon,
            "from_time=2027-03-01T07:00:00Z&to_time=2027-03-01T09:00:00Z"
        )
        .0,
        window
    );
    let both =
        expect(&|r| r["fields"]["account_id"] == "u-filter-b" && r["event"] == "signing.signed");
    assert_eq!(both.len(), 1);
    assert_eq!(
        query(&daemon, "account_id=u-filter-b&event=signing.signed").0,
        both
    );

    // The cursor: pages of 2 by `after` give every record once, in order.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let cursor = after.map_or(String::new(), |after| format!("&after={after}"));
        let (page, next) = query(&daemon, &format!("account_id=u-filter-a&limit=2{cursor}"));
        let full = page.len() == 2;
        paged.extend(page);
        after = next;
        if !full {
            break;
        }
    }
    assert_eq!(paged, by_account);
    let unique: BTreeSet<u64> = paged.iter().map(index_of).collect();
    assert_eq!(unique.len(), paged.len());
    // Without filters, `after` pages the whole log.
    let (page, next) = query(&daemon, "after=3&limit=2");
    assert_eq!(page.iter().map(index_of).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(next, Some(5));
    // Past the end: empty, and the cursor stays at the end.
    let (page, next) = query(&daemon, "account_id=u-filter-a&after=100000");
    assert!(page.is_empty());
    assert_eq!(next, Some(100_000), "the cursor never goes back");

    // Bad values: 400 naming the parameter.
    let auditor = daemon.client("auditor");
    for (bad, name) in [
        ("account_id=", "account_id"),
        ("event=Signing.Signed", "event"),
        ("service=demo%20a", "service"),
        ("from_time=yesterday", "from_time"),
        ("to_time=2027-13-01T00:00:00Z", "to_time"),
        ("after=-1", "after"),
        ("after=x", "after"),
    ] {
        let response = auditor
            .get(format!("{}/v1/audit/records?{bad}", daemon.api))
            .send()
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().unwrap();
        assert_eq!(body["code"], "invalid_request", "{bad}");
        assert!(
            body["detail"].as_str().unwrap().contains(name),
            "{bad}: {body}"
        );
    }
    // Only auditors read the log.
    let refused = daemon
        .client("demo-a")
        .get(format!(
            "{}/v1/audit/records?account_id=u-filter-a",
            daemon.api
        ))
        .send()
        .unwrap();
    assert_eq!(problem(refused), (403, "forbidden".into()));

    // Ids only: nothing of the people registered is in any record.
    let text = String::from_utf8(export(&daemon)).unwrap();
    for id in ["u-filter-a", "u-filter-b"] {
        let person = registration(id, "1990-01-01", &device_key());
        for field in ["surname", "given_name", "date_of_birth", "hkic_number"] {
            let value = person[field].as_str().unwrap();
            assert!(!text.contains(value), "{field} {value} in the audit log");
        }
        assert!(!text.contains(&hkic_for(id)));
    }
    assert!(text.contains("u-filter-a"));
}

/// The README's Python receipt verifier, exactly as printed there.
fn readme_script(dir: &Path) -> std::path::PathBuf {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let start = readme
        .find("<!-- verify-receipt.py -->")
        .expect("the README marks its receipt script");
    let rest = &readme[start..];
    let code = rest
        .split_once("```python\n")
        .expect("a python block after the marker")
        .1;
    let code = code.split_once("```").expect("the end of the block").0;
    let path = dir.join("verify-receipt.py");
    std::fs::write(&path, code).unwrap();
    path
}

fn python(script: &Path, receipt: &Path, key: &Path) -> Output {
    run(Command::new("python3").arg(script).arg(receipt).arg(key))
}

fn verify_receipt(receipt: &Path, key: &Path) -> Output {
    run(ctl()
        .args(["audit", "verify-receipt"])
        .arg(receipt)
        .arg("--public-key")
        .arg(key))
}

#[test]
fn a_signing_receipt_proves_the_signature_to_its_owner_only() {
    let mut daemon = DevDaemon::start(&[]);
    // No periodic checkpoint during the test: the receipt waits for the auditor's.
    daemon.relaunch_with_settings(&[("checkpoint_interval_seconds", "3600")]);
    let pending = signed(&daemon, "u-receipt");
    let id = pending.request["request_id"].as_str().unwrap().to_owned();
    let receipt_url = |id: &str| format!("{}/v1/signing-requests/{id}/receipt", daemon.api);

    // Signed, but no checkpoint covers the record yet: 404 with Retry-After.
    let early = daemon
        .client("demo-a")
        .get(receipt_url(&id))
        .send()
        .unwrap();
    assert_eq!(early.status(), 404);
    assert_eq!(early.headers()["retry-after"], "3600");
    assert_eq!(problem(early), (404, "not_found".into()));
    // An unknown request: 404 without Retry-After. Another service's: 403, as its GET is.
    let unknown = daemon
        .client("demo-a")
        .get(receipt_url("0123456789abcdef0123456789abcdef"))
        .send()
        .unwrap();
    assert!(unknown.headers().get("retry-after").is_none());
    assert_eq!(problem(unknown), (404, "not_found".into()));
    let other = daemon
        .client("demo-b")
        .get(receipt_url(&id))
        .send()
        .unwrap();
    assert_eq!(problem(other), (403, "forbidden".into()));
    // Only services ask for receipts.
    let refused = daemon
        .client("auditor")
        .get(receipt_url(&id))
        .send()
        .unwrap();
    assert_eq!(problem(refused), (403, "forbidden".into()));

    // The auditor's checkpoint covers it.
    let auditor = daemon.client("auditor");
    let checkpoint: Value = auditor
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let answer = daemon
        .client("demo-a")
        .get(receipt_url(&id))
        .send()
        .unwrap();
    assert_eq!(answer.status(), 200);
    let receipt_bytes = answer.bytes().unwrap().to_vec();
    let receipt: Value = serde_json::from_slice(&receipt_bytes).unwrap();
    assert_eq!(receipt["checkpoint"], checkpoint);
    let record: Value = serde_json::from_str(receipt["record"].as_str().unwrap()).unwrap();
    assert_eq!(record["event"], "signing.signed");
    assert_eq!(record["fields"]["request_id"], id.as_str());
    assert_eq!(record["fields"]["service"], "demo-a");
    assert_eq!(record["fields"]["hash"], hex::encode(&pending.hash));
    assert_eq!(record["index"], receipt["index"]);
    // The record is the logged line, byte for byte.
    let logged = export(&daemon);
    let line = format!("{}\n", receipt["record"].as_str().unwrap());
    assert!(
        logged
            .windows(line.len())
            .any(|window| window == line.as_bytes())
    );

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.pem");
    std::fs::write(
        &key,
        auditor
            .get(format!("{}/v1/audit/public-key", daemon.api))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    // openssl checks the checkpoint's signature on its own.
    let statement = format!(
        "smartsign-checkpoint-v1\n{}\n{}\n{}\n{}",
        checkpoint["origin"].as_str().unwrap(),
        checkpoint["tree_size"],
        checkpoint["root_hash"].as_str().unwrap(),
        checkpoint["timestamp"].as_str().unwrap()
    );
    std::fs::write(dir.path().join("statement"), statement).unwrap();
    let signature = STANDARD
        .decode(checkpoint["signature"].as_str().unwrap())
        .unwrap();
    std::fs::write(dir.path().join("signature.der"), &signature).unwrap();
    let openssl = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&key)
        .arg("-signature")
        .arg(dir.path().join("signature.der"))
        .arg(dir.path().join("statement")));
    assert!(openssl.status.success(), "{}", describe(&openssl));

    let script = readme_script(dir.path());
    let good = dir.path().join("receipt.json");
    std::fs::write(&good, &receipt_bytes).unwrap();
    let verified = verify_receipt(&good, &key);
    assert!(verified.status.success(), "{}", describe(&verified));
    let said = String::from_utf8_lossy(&verified.stdout);
    assert!(said.contains(&id) && said.contains("demo-a"), "{said}");
    let checked = python(&script, &good, &key);
    assert!(checked.status.success(), "{}", describe(&checked));

    // Tampered receipts: both verifiers refuse each.
    let mut tampered = Vec::new();
    let mut changed_record = receipt.clone();
    let hash = record["fields"]["hash"].as_str().unwrap();
    let other_hash = format!(
        "{}{}",
        if hash.starts_with('0') { "1" } else { "0" },
        &hash[1..]
    );
    changed_record["record"] = json!(
        receipt["record"]
            .as_str()
            .unwrap()
            .replace(hash, &other_hash)
    );
    tampered.push(("record", changed_record));
    let mut changed_proof = receipt.clone();
    let first = changed_proof["inclusion_proof"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = format!(
        "{}{}",
        if first.starts_with('0') { "1" } else { "0" },
        &first[1..]
    );
    changed_proof["inclusion_proof"][0] = json!(flipped);
    tampered.push(("proof", changed_proof));
    let mut changed_signature = receipt.clone();
    let mut bad_signature = signature.clone();
    *bad_signature.last_mut().unwrap() ^= 0x01;
    changed_signature["checkpoint"]["signature"] = json!(STANDARD.encode(&bad_signature));
    tampered.push(("signature", changed_signature));
    let mut changed_index = receipt.clone();
    changed_index["index"] = json!(receipt["index"].as_u64().unwrap() - 1);
    tampered.push(("index", changed_index));
    let mut changed_size = receipt.clone();
    changed_size["checkpoint"]["tree_size"] = json!(checkpoint["tree_size"].as_u64().unwrap() + 1);
    tampered.push(("tree size", changed_size));
    for (what, receipt) in tampered {
        let path = dir.path().join("tampered.json");
        std::fs::write(&path, serde_json::to_vec(&receipt).unwrap()).unwrap();
        let refused = verify_receipt(&path, &key);
        assert!(!refused.status.success(), "{what}: {}", describe(&refused));
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("does NOT verify"),
            "{what}: {}",
            describe(&refused)
        );
        let refused = python(&script, &path, &key);
        assert!(!refused.status.success(), "{what}: {}", describe(&refused));
    }
}

fn checkpoint_bytes(daemon: &DevDaemon) -> Vec<u8> {
    daemon
        .client("auditor")
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec()
}

fn tree_size(checkpoint: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(checkpoint).unwrap()["tree_size"]
        .as_u64()
        .unwrap()
}

#[test]
fn audit_verify_since_checkpoint_checks_exactly_the_records_added() {
    let daemon = DevDaemon::start(&[]);
    let auditor = daemon.client("auditor");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let old = checkpoint_bytes(&daemon);
    signed(&daemon, "u-since");
    let new = checkpoint_bytes(&daemon);
    let (m, n) = (tree_size(&old), tree_size(&new));
    assert!(n > m + 3);
    let get = |url: String| auditor.get(url).send().unwrap().bytes().unwrap().to_vec();
    let proof = get(format!(
        "{}/v1/audit/proofs/consistency?first={m}&second={n}",
        daemon.api
    ));
    let since = get(format!(
        "{}/v1/audit/records?from={m}&limit={}",
        daemon.api,
        n - m
    ));
    std::fs::write(path("old.json"), &old).unwrap();
    std::fs::write(path("new.json"), &new).unwrap();
    std::fs::write(path("proof.json"), &proof).unwrap();
    std::fs::write(
        path("audit.pem"),
        get(format!("{}/v1/audit/public-key", daemon.api)),
    )
    .unwrap();
    let verify = |records: &[u8]| {
        std::fs::write(path("since.ndjson"), records).unwrap();
        run(ctl()
            .args(["audit", "verify", "--since-checkpoint"])
            .arg(path("old.json"))
            .arg("--checkpoint")
            .arg(path("new.json"))
            .arg("--records")
            .arg(path("since.ndjson"))
            .arg("--consistency-proof")
            .arg(path("proof.json"))
            .arg("--public-key")
            .arg(path("audit.pem")))
    };
    let good = verify(&since);
    assert!(good.status.success(), "{}", describe(&good));
    assert!(String::from_utf8_lossy(&good.stdout).contains(&format!("{} records added", n - m)));

    let text = String::from_utf8(since.clone()).unwrap();
    let records: Vec<&str> = text.lines().collect();
    let join = |lines: &[&str]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let changed = text.replacen("u-since", "u-sincf", 1);
    let dropped = join(&[&records[..2], &records[3..]].concat());
    let mut inserted_lines = records.clone();
    inserted_lines.insert(2, records[1]);
    let inserted = join(&inserted_lines);
    let extra = format!("{text}{}\n", records[0]);
    for (what, bad) in [
        ("changed", changed),
        ("dropped", dropped),
        ("inserted", inserted),
        ("extra", extra),
    ] {
        let refused = verify(bad.as_bytes());
        assert!(!refused.status.success(), "{what}: {}", describe(&refused));
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("do NOT verify"),
            "{what}: {}",
            describe(&refused)
        );
    }
    // The old checkpoint's own records are no proof of the new one.
    std::fs::write(path("new.json"), &old).unwrap();
    assert!(!verify(&since).status.success());
}

fn watch(daemon: &DevDaemon, state: &Path, key: Option<&Path>) -> Output {
    let clients = daemon.state_dir().join("clients");
    let mut command = ctl();
    command
        .args(["audit", "watch", "--once", "--url", &daemon.api])
        .arg("--cert")
        .arg(clients.join("auditor.pem"))
        .arg("--key")
        .arg(clients.join("auditor.key"))
        .arg("--ca")
        .arg(daemon.state_dir().join("tls/ca.pem"))
        .arg("--state")
        .arg(state);
    if let Some(key) = key {
        command.arg("--public-key").arg(key);
    }
    run(&mut command)
}

#[test]
fn audit_watch_follows_the_log_and_catches_a_fork() {
    let mut daemon = DevDaemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("watch.json");

    // First round: the key is trusted on first use and pinned with the checkpoint.
    let first = watch(&daemon, &state, None);
    assert!(first.status.success(), "{}", describe(&first));
    let stored: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert!(
        stored["public_key"]
            .as_str()
            .unwrap()
            .contains("PUBLIC KEY")
    );
    signed(&daemon, "u-watch-1");
    let second = watch(&daemon, &state, None);
    assert!(second.status.success(), "{}", describe(&second));
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("records added, consistent"),
        "{}",
        describe(&second)
    );
    let unchanged = watch(&daemon, &state, None);
    assert!(unchanged.status.success(), "{}", describe(&unchanged));

    // A checkpoint that does not verify under the pinned key.
    let other_key = dir.path().join("other.pem");
    let made = run(Command::new("sh").arg("-c").arg(format!(
        "openssl ecparam -name prime256v1 -genkey -noout | openssl ec -pubout -out {}",
        other_key.display()
    )));
    assert!(made.status.success(), "{}", describe(&made));
    let fresh = dir.path().join("fresh.json");
    let wrong = watch(&daemon, &fresh, Some(&other_key));
    assert!(!wrong.status.success(), "{}", describe(&wrong));
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        said.contains("INCONSISTENT") && said.contains("signature"),
        "{said}"
    );
    assert!(
        !fresh.exists(),
        "nothing stored from a checkpoint that did not verify"
    );

    // A fork: a copy of the appliance (same token, so the same audit key) goes its own way.
    let fork = daemon.fork();
    signed(&daemon, "u-watch-original");
    let on_original = watch(&daemon, &state, None);
    assert!(on_original.status.success(), "{}", describe(&on_original));
    signed(&fork, "u-watch-fork");
    signed(&fork, "u-watch-fork-2");
    let before = std::fs::read(&state).unwrap();
    let forked = watch(&fork, &state, None);
    assert!(!forked.status.success(), "{}", describe(&forked));
    let said = String::from_utf8_lossy(&forked.stderr);
    assert!(said.contains("INCONSISTENT"), "{said}");
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the last good checkpoint is kept"
    );
    // The original is still consistent with what the monitor saw.
    let again = watch(&daemon, &state, None);
    assert!(again.status.success(), "{}", describe(&again));
}
