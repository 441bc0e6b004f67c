//! Key custody end to end: `smartsign-ctl keys rotate-kek` on a daemon's state, killed half-way
//! and resumed; the daemon signs for every account afterwards (openssl verifies); a backup of
//! the store from before the rotation no longer signs; the rotation is in the audit log. And a
//! token made by the old code (its KEK without templates) is refused at start with the message
//! that names the rotation, which then fixes it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use p256::ecdsa::SigningKey;
use secrecy::SecretString;
use sha2::Digest as _;
use smartsign_tests::flow::{Pending, hkic_for, registration, verify_audit, verify_signature};
use smartsign_tests::{DevDaemon, binary, describe, device_key, run};

const ACCOUNTS: usize = 24;
const LEGACY_CHILD: &str = "KEY_CUSTODY_LEGACY_KEK";

fn ctl(daemon: &DevDaemon) -> Command {
    let mut command = Command::new(binary("smartsign-ops", "smartsign-ctl"));
    command.env(
        "SOFTHSM2_CONF",
        daemon.state_dir().join("hsm/softhsm2.conf"),
    );
    command
}

fn rotate_kek(daemon: &DevDaemon) -> Command {
    let state = daemon.state_dir();
    let mut command = ctl(daemon);
    command
        .args(["keys", "rotate-kek", "--config"])
        .arg(state.join("smartsignd.toml"))
        .arg("--so-pin-file")
        .arg(state.join("hsm/so.pin"))
        .args(["--officer", "officer-1"]);
    command
}

fn register(daemon: &DevDaemon, id: &str) -> SigningKey {
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

/// Asks for a signature over `document` for `id` and approves it; the request as read after.
fn sign(daemon: &DevDaemon, id: &str, key: &SigningKey, document: &[u8]) -> serde_json::Value {
    let pending = Pending::for_account(
        daemon,
        id,
        key.clone(),
        sha2::Sha256::digest(document).to_vec(),
    );
    let _ = pending.approve(daemon);
    pending.read(daemon)
}

/// The KEK id each stored certificate's key reference names (version 2 of the documented
/// encoding: "SSKR" | 2 | algorithm | 1 (wrapped) | 16 | KEK id | ...), and the KEK id of the
/// rotation the store's journal has open.
fn keks_in_store(store: &Path) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
    let conn = rusqlite::Connection::open(store).unwrap();
    let refs: Vec<Vec<u8>> = conn
        .prepare("SELECT key_ref FROM certificates WHERE key_ref IS NOT NULL")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let keks = refs
        .iter()
        .map(|r| {
            assert_eq!((&r[..4], r[4], r[6], r[7]), (&b"SSKR"[..], 2, 1, 16));
            r[8..24].to_vec()
        })
        .collect();
    let open = conn
        .query_row(
            "SELECT new_kek FROM kek_rotations WHERE finished_at IS NULL",
            [],
            |row| row.get(0),
        )
        .ok();
    (keks, open)
}

fn copy_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("smartsign.sqlite{suffix}");
        if from.join(&name).exists() {
            std::fs::copy(from.join(&name), to.join(&name)).unwrap();
        } else {
            let _ = std::fs::remove_file(to.join(&name));
        }
    }
}

#[test]
fn rotate_kek_killed_half_way_resumes_and_old_backups_cannot_sign() {
    let mut daemon = DevDaemon::start(&[]);
    let keys: Vec<(String, SigningKey)> = (0..ACCOUNTS)
        .map(|i| {
            let id = format!("u-kek-{i}");
            let key = register(&daemon, &id);
            (id, key)
        })
        .collect();
    verify_signature(&sign(&daemon, "u-kek-0", &keys[0].1, b"before"), b"before");

    // Refused while the daemon runs: the audit log is locked, and nothing is touched.
    let refused = run(rotate_kek(&daemon).args(["--batch", "1"]));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is smartsignd running"),
        "{}",
        describe(&refused)
    );
    daemon.stop();
    let state = daemon.state_dir();
    let store = state.join("smartsign.sqlite");
    let (before, open) = keks_in_store(&store);
    assert_eq!(open, None);
    let old_kek = before[0].clone();
    assert!(before.iter().all(|k| *k == old_kek));
    let backup = tempfile::tempdir().unwrap();
    copy_store(&state, backup.path());

    // Killed (SIGKILL) right after its first progress line: one key per batch, so most of the
    // keys are still under the old KEK.
    let mut child = rotate_kek(&daemon)
        .args(["--batch", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut progress = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        progress.push_str(&line);
        progress.push('\n');
        if line.starts_with("re-wrapped ") {
            child.kill().unwrap();
            break;
        }
    }
    child.wait().unwrap();
    assert!(
        progress.contains("24 wrapped keys to re-wrap"),
        "{progress}"
    );
    let (during, open) = keks_in_store(&store);
    let new_kek = open.expect("the journal keeps the rotation open");
    let moved = during.iter().filter(|k| **k == new_kek).count();
    let stayed = during.iter().filter(|k| **k == old_kek).count();
    assert_eq!(
        moved + stayed,
        ACCOUNTS,
        "every key under one of the two KEKs"
    );
    assert!(moved >= 1 && stayed >= 1, "killed half-way: {moved} moved");

    // The daemon will not start on a token with two KEKs, and says how to finish.
    let status = run(ctl(&daemon)
        .args(["keys", "status", "--config"])
        .arg(state.join("smartsignd.toml")));
    assert!(!status.status.success());
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("rotate-kek"),
        "{}",
        describe(&status)
    );

    // Run again: it resumes, re-wraps only what is left, and finishes.
    let resumed = run(&mut rotate_kek(&daemon));
    assert!(resumed.status.success(), "{}", describe(&resumed));
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(stderr.contains("resuming the rotation"), "{stderr}");
    assert!(
        stderr.contains(&format!("{stayed} wrapped keys to re-wrap")),
        "{stderr}"
    );
    let (after, open) = keks_in_store(&store);
    assert_eq!(open, None);
    assert!(after.iter().all(|k| *k == new_kek));
    // A rotation with nothing to do still replaces the KEK.
    let again = run(&mut rotate_kek(&daemon));
    assert!(again.status.success(), "{}", describe(&again));
    let (after_again, _) = keks_in_store(&store);
    let newest = after_again[0].clone();
    assert_ne!(newest, new_kek);
    assert!(after_again.iter().all(|k| *k == newest));

    // Every account signs, and openssl verifies.
    daemon.restart();
    for (id, key) in keys.iter().step_by(5) {
        verify_signature(&sign(&daemon, id, key, b"after"), b"after");
    }
    let export = tempfile::tempdir().unwrap();
    let records = verify_audit(&daemon, export.path());
    for event in [
        "kek.rotation_started",
        "kek.rotation_resumed",
        "kek.rotation_progress",
        "kek.rotation_finished",
    ] {
        assert!(
            records
                .lines()
                .any(|r| r.contains(event) && r.contains("officer:officer-1")),
            "{event} in the audit log"
        );
    }

    // The attacker's copy of the store from before: its blobs name a destroyed KEK.
    daemon.stop();
    copy_store(backup.path(), &state);
    daemon.restart();
    let stale = Pending::for_account(
        &daemon,
        "u-kek-1",
        keys[1].1.clone(),
        sha2::Sha256::digest(b"stale").to_vec(),
    );
    let refused = stale.approve(&daemon);
    assert_ne!(refused.status(), 200);
    let stale = stale.read(&daemon);
    assert_ne!(stale["status"], "signed", "{stale}");
    assert!(stale["result"].is_null(), "{stale}");
    assert!(
        daemon.log().contains("not on this token"),
        "the refusal is logged with its cause"
    );
}

/// The child of `a_token_made_by_the_old_code_is_refused_until_its_kek_is_rotated`: with
/// `SOFTHSM2_CONF` pointing at a stopped daemon's token, replaces its KEK with one made as the
/// code before key custody made it (no CKA_ID, no templates).
#[test]
#[ignore = "the child process of a_token_made_by_the_old_code_is_refused_until_its_kek_is_rotated"]
fn legacy_kek_child() {
    let Some(state) = std::env::var_os(LEGACY_CHILD).map(PathBuf::from) else {
        return;
    };
    let module = run(Command::new(
        smartsign_tests::workspace_root().join("softhsm-config/softhsm-setup"),
    )
    .arg("module"));
    let pkcs11 = Pkcs11::new(String::from_utf8(module.stdout).unwrap().trim()).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11.get_slots_with_initialized_token().unwrap()[0];
    let session = pkcs11.open_rw_session(slot).unwrap();
    let so_pin = std::fs::read_to_string(state.join("hsm/so.pin")).unwrap();
    session
        .login(UserType::So, Some(&SecretString::from(so_pin.trim())))
        .unwrap();
    let label = Attribute::Label(b"smartsign-kek".to_vec());
    for kek in session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), label.clone()])
        .unwrap()
    {
        session.destroy_object(kek).unwrap();
    }
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(false),
                label,
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(false),
                Attribute::Copyable(false),
                Attribute::Trusted(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Modifiable(false),
            ],
        )
        .unwrap();
    session.logout().unwrap();
    println!("legacy KEK made");
}

#[test]
fn a_token_made_by_the_old_code_is_refused_until_its_kek_is_rotated() {
    let mut daemon = DevDaemon::start(&[]);
    daemon.stop();
    let state = daemon.state_dir();
    let made = run(Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "legacy_kek_child", "--ignored", "--nocapture"])
        .env(LEGACY_CHILD, &state)
        .env("SOFTHSM2_CONF", state.join("hsm/softhsm2.conf")));
    assert!(
        String::from_utf8_lossy(&made.stdout).contains("legacy KEK made"),
        "{}",
        describe(&made)
    );

    // The daemon refuses to start, and says how to fix it.
    let refused = run(Command::new(binary("smartsignd", "smartsignd"))
        .arg("--dev")
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--ca-listen", "127.0.0.1:0"]));
    assert!(!refused.status.success());
    let log = String::from_utf8_lossy(&refused.stderr);
    assert!(
        log.contains("CKA_UNWRAP_TEMPLATE") && log.contains("smartsign-ctl keys rotate-kek"),
        "{log}"
    );
    // So does `keys status`.
    let status = run(ctl(&daemon)
        .args(["keys", "status", "--config"])
        .arg(state.join("smartsignd.toml")));
    assert!(!status.status.success());
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("REFUSED"),
        "{}",
        describe(&status)
    );

    // The rotation replaces the KEK; the daemon starts and signs.
    let rotated = run(&mut rotate_kek(&daemon));
    assert!(rotated.status.success(), "{}", describe(&rotated));
    daemon.restart();
    let key = register(&daemon, "u-after-legacy");
    verify_signature(&sign(&daemon, "u-after-legacy", &key, b"doc"), b"doc");
}

/// A command that sees only the token(s) of the SoftHSM directory `hsm`.
fn on_token(program: &Path, hsm: &Path) -> Command {
    let mut command = Command::new(program);
    command.env("SOFTHSM2_CONF", hsm.join("softhsm2.conf"));
    command
}

#[test]
fn a_second_hsm_cloned_without_plaintext_serves_the_same_accounts() {
    let mut daemon = DevDaemon::start(&[]);
    let accounts: Vec<(String, SigningKey, String)> = (0..3)
        .map(|i| {
            let id = format!("u-clone-{i}");
            let key = register(&daemon, &id);
            let taid = Pending::for_account(&daemon, &id, key.clone(), vec![7; 32]).taid;
            (id, key, taid)
        })
        .collect();
    daemon.stop();

    // The first token moves aside; a new, empty token takes its place under the same label.
    let state = daemon.state_dir();
    let first = state.join("hsm-first");
    std::fs::rename(state.join("hsm"), &first).unwrap();
    let conf = std::fs::read_to_string(first.join("softhsm2.conf")).unwrap();
    std::fs::write(
        first.join("softhsm2.conf"),
        conf.replace(
            &state.join("hsm").display().to_string(),
            &first.display().to_string(),
        ),
    )
    .unwrap();
    let second = state.join("hsm");
    let made = run(Command::new(
        smartsign_tests::workspace_root().join("softhsm-config/softhsm-setup"),
    )
    .args(["token", "--dir"])
    .arg(&second)
    .args(["--label", "smartsign-dev", "--so-pin-file"])
    .arg(second.join("so.pin"))
    .arg("--pin-file")
    .arg(second.join("user.pin")));
    assert!(made.status.success(), "{}", describe(&made));
    let ctl = binary("smartsign-ops", "smartsign-ctl");
    let token_args = |hsm: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "--token".into(),
            "smartsign-dev".into(),
            "--pin-file".into(),
            hsm.join("user.pin").into(),
            "--so-pin-file".into(),
            hsm.join("so.pin").into(),
        ]
    };

    // Target: the transport key and its fingerprint.
    let transport = state.join("transport.pem");
    let requested = run(on_token(&ctl, &second)
        .args(["keys", "clone-request"])
        .args(token_args(&second))
        .arg("--out")
        .arg(&transport));
    assert!(requested.status.success(), "{}", describe(&requested));
    let fingerprint = String::from_utf8(requested.stdout)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(fingerprint.len(), 64);

    // Source: a fingerprint that is not the one confirmed is refused.
    let bundle = state.join("clone.json");
    let export = |fingerprint: &str| {
        run(on_token(&ctl, &first)
            .args(["keys", "clone-export"])
            .args(token_args(&first))
            .arg("--transport-key")
            .arg(&transport)
            .args(["--fingerprint", fingerprint, "--out"])
            .arg(&bundle))
    };
    let wrong = export(&"0".repeat(64));
    assert!(!wrong.status.success());
    assert!(!bundle.exists());
    let exported = export(&fingerprint);
    assert!(exported.status.success(), "{}", describe(&exported));
    let source_audit = String::from_utf8(exported.stdout.clone())
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(source_audit.len(), 64, "{}", describe(&exported));
    let text = std::fs::read_to_string(&bundle).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["keys"].as_array().unwrap().len(), 8, "{text}");

    // Target: a bundle whose audit key is not the one the officers name is refused, and the
    // failed import leaves no key and no transport key behind.
    let import = |audit: &str| {
        run(on_token(&ctl, &second)
            .args(["keys", "clone-import"])
            .args(token_args(&second))
            .arg("--in")
            .arg(&bundle)
            .args(["--source-audit-key-sha256", audit]))
    };
    let refused = import(&"ab".repeat(32));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not the source's"),
        "{}",
        describe(&refused)
    );
    let empty = run(on_token(&ctl, &second)
        .args(["keys", "status", "--token", "smartsign-dev", "--pin-file"])
        .arg(second.join("user.pin")));
    assert_eq!(
        String::from_utf8_lossy(&empty.stdout)
            .matches("missing")
            .count(),
        8,
        "{}",
        describe(&empty)
    );
    // So the target needs a new transport key, and the source a new bundle.
    let requested = run(on_token(&ctl, &second)
        .args(["keys", "clone-request"])
        .args(token_args(&second))
        .arg("--out")
        .arg(&transport));
    assert!(requested.status.success(), "{}", describe(&requested));
    let fingerprint = String::from_utf8(requested.stdout)
        .unwrap()
        .trim()
        .to_owned();
    std::fs::remove_file(&bundle).unwrap();
    let exported = export(&fingerprint);
    assert!(exported.status.success(), "{}", describe(&exported));

    // Target: import, and every key passes the policy there.
    let imported = import(&source_audit);
    assert!(imported.status.success(), "{}", describe(&imported));
    let status = run(on_token(&ctl, &second)
        .args(["keys", "status", "--token", "smartsign-dev", "--pin-file"])
        .arg(second.join("user.pin")));
    assert!(status.status.success(), "{}", describe(&status));
    // The transport key is gone: the bundle opens nowhere now.
    assert!(!import(&source_audit).status.success());

    // The daemon on the second token, with the store and the audit log of the first: the same
    // TAIDs, the personal data and HKIC hashes open, every account signs, the log verifies.
    daemon.restart();
    for (id, key, taid) in &accounts {
        let pending = Pending::for_account(&daemon, id, key.clone(), vec![9; 32]);
        assert_eq!(&pending.taid, taid);
        verify_signature(
            &sign(&daemon, id, key, b"on the second HSM"),
            b"on the second HSM",
        );
    }
    let with_hkic = daemon
        .client("demo-a")
        .post(format!("{}/v1/signing-requests", daemon.api))
        .json(
            &serde_json::json!({"taid": accounts[0].2, "hash_algorithm": "sha256",
            "hash": base64_of(&[5; 32]), "hkic_number": hkic_for(&accounts[0].0)}),
        )
        .send()
        .unwrap();
    assert_eq!(with_hkic.status(), 201);
    let export_dir = tempfile::tempdir().unwrap();
    verify_audit(&daemon, export_dir.path());
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
