//! `smartsign-ctl` as a security officer and an auditor use it: provisioning the system keys on
//! a fresh token, and verifying an audit export offline.

// Test helpers outside #[test] functions: a panic is how they report a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use audit_log::{Actor, AuditEvent, AuditLog, AuditLogConfig, EventName, Origin, SoftwareSigner};
use smartsign_tests::{SoftHsmToken, binary, describe, run};

const SYSTEM_KEY_LABELS: [&str; 8] = [
    "smartsign-kek",
    "smartsign-taid",
    "smartsign-hkic",
    "smartsign-data",
    "smartsign-audit",
    "smartsign-ca-root",
    "smartsign-ca-issuing",
    "smartsign-cmp-client",
];

fn ctl() -> std::path::PathBuf {
    binary("smartsign-ops", "smartsign-ctl")
}

fn keys_init(token: &SoftHsmToken) -> std::process::Output {
    run(token
        .command(ctl())
        .args(["keys", "init", "--token", token.label()])
        .arg("--pin-file")
        .arg(token.pin_file())
        .arg("--so-pin-file")
        .arg(token.so_pin_file()))
}

#[test]
fn keys_init_creates_every_system_key_once() {
    let token = SoftHsmToken::new("ctl-init");

    let first = keys_init(&token);
    assert!(first.status.success(), "{}", describe(&first));
    let stdout = String::from_utf8_lossy(&first.stdout);
    for label in SYSTEM_KEY_LABELS {
        assert!(
            stdout.contains(&format!("created  {label}")),
            "{label} not created: {stdout}"
        );
    }

    let again = keys_init(&token);
    assert!(again.status.success(), "{}", describe(&again));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        !stdout.contains("created"),
        "a second init created keys: {stdout}"
    );
    for label in SYSTEM_KEY_LABELS {
        assert!(
            stdout.contains(&format!("found    {label}")),
            "{label} not found: {stdout}"
        );
    }

    // An independent PKCS#11 client sees the keys, and the secret ones as sensitive.
    let listing = run(token
        .command("pkcs11-tool")
        .args([
            "--module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--token-label",
            token.label(),
        ])
        .args(["--login", "--pin", &token.pin(), "--list-objects"]));
    assert!(listing.status.success(), "{}", describe(&listing));
    let listing = String::from_utf8_lossy(&listing.stdout);
    for label in SYSTEM_KEY_LABELS {
        assert!(
            listing.contains(&format!("label:      {label}")),
            "{label} missing:\n{listing}"
        );
    }
    let taid = listing
        .split("Secret Key Object")
        .find(|object| object.contains("smartsign-taid"));
    let taid = taid.expect("the TAID key is a secret key object");
    // Sensitive and made in the HSM; it leaves only under a key the SO trusted, for a clone to a
    // second HSM (hsm-adapter/tests/key_custody.rs shows the user's own keys and the KEK cannot
    // wrap it).
    assert!(
        taid.contains("sensitive, always sensitive") && taid.contains("local"),
        "TAID key:\n{taid}"
    );

    let status = run(token
        .command(ctl())
        .args(["keys", "status", "--token", token.label()])
        .arg("--pin-file")
        .arg(token.pin_file()));
    assert!(status.status.success(), "{}", describe(&status));
    let stdout = String::from_utf8_lossy(&status.stdout);
    for label in SYSTEM_KEY_LABELS {
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with(label) && line.ends_with("ok")),
            "{label} not reported ok: {stdout}"
        );
    }
}

#[test]
fn keys_init_with_a_wrong_pin_fails_clearly_without_showing_it() {
    let token = SoftHsmToken::new("ctl-wrong-pin");
    let wrong = token.scratch().join("wrong.pin");
    std::fs::write(&wrong, "not-the-pin-4711\n").unwrap();

    let output = run(token
        .command(ctl())
        .args(["keys", "init", "--token", token.label()])
        .arg("--pin-file")
        .arg(&wrong)
        .arg("--so-pin-file")
        .arg(token.so_pin_file()));

    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.to_lowercase().contains("pin"),
        "no word of the PIN: {stderr}"
    );
    let all = describe(&output);
    assert!(
        !all.contains("not-the-pin-4711"),
        "the PIN was printed: {all}"
    );
    assert!(
        !all.contains(&token.pin()),
        "the real PIN was printed: {all}"
    );
}

#[test]
fn keys_status_on_a_token_without_system_keys_fails() {
    let token = SoftHsmToken::new("ctl-empty");
    let output = run(token
        .command(ctl())
        .args(["keys", "status", "--token", token.label()])
        .arg("--pin-file")
        .arg(token.pin_file()));
    assert!(!output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("smartsign-kek") && stdout.contains("missing"),
        "{}",
        describe(&output)
    );
}

/// Writes an audit log signed with a key openssl made, and exports it as an auditor receives it.
fn write_export(dir: &Path) -> (Vec<u8>, Vec<u8>, String) {
    let key = run(Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ]));
    assert!(key.status.success(), "{}", describe(&key));
    let key_pem = String::from_utf8(key.stdout).unwrap();
    std::fs::write(dir.join("audit.key"), &key_pem).unwrap();
    let public = run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(dir.join("audit.key")));
    assert!(public.status.success(), "{}", describe(&public));
    let public_pem = String::from_utf8(public.stdout).unwrap();

    let signer = SoftwareSigner::from_pkcs8_pem(&key_pem).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let origin = Origin::new("test.smartsign.example/audit").unwrap();
        let log = AuditLog::open(dir.join("log"), AuditLogConfig::new(origin))
            .await
            .unwrap();
        for index in 0..25 {
            let event = AuditEvent::new(
                EventName::new("signing.signed").unwrap(),
                Actor::new("service:demo-a").unwrap(),
            )
            .with_field("request", format!("r-{index}"));
            log.append(event).await.unwrap();
        }
        let checkpoint = log.checkpoint(&signer).await.unwrap();
        let records = log.records(0, log.tree_size()).await.unwrap();
        (records, checkpoint.to_json(), public_pem)
    })
}

fn verify(dir: &Path, records: &[u8], checkpoint: &[u8], public_pem: &str) -> std::process::Output {
    std::fs::write(dir.join("records.ndjson"), records).unwrap();
    std::fs::write(dir.join("checkpoint.json"), checkpoint).unwrap();
    std::fs::write(dir.join("audit-key.pem"), public_pem).unwrap();
    run(Command::new(ctl())
        .args(["audit", "verify", "--records"])
        .arg(dir.join("records.ndjson"))
        .arg("--checkpoint")
        .arg(dir.join("checkpoint.json"))
        .arg("--public-key")
        .arg(dir.join("audit-key.pem")))
}

#[test]
fn audit_verify_accepts_an_export_and_refuses_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (records, checkpoint, public_pem) = write_export(dir.path());

    let good = verify(dir.path(), &records, &checkpoint, &public_pem);
    assert!(good.status.success(), "{}", describe(&good));
    assert!(
        String::from_utf8_lossy(&good.stdout).contains("25"),
        "{}",
        describe(&good)
    );

    // A byte in the middle of a record, then one in the checkpoint's root hash.
    let mut tampered = records.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    let bad = verify(dir.path(), &tampered, &checkpoint, &public_pem);
    assert!(
        !bad.status.success(),
        "a flipped record byte verified: {}",
        describe(&bad)
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("NOT verify"),
        "{}",
        describe(&bad)
    );

    let text = String::from_utf8(checkpoint.clone()).unwrap();
    let root_at = text.find("root_hash").unwrap() + "root_hash\":\"".len();
    let mut tampered = checkpoint.clone();
    tampered[root_at] = if tampered[root_at] == b'0' {
        b'1'
    } else {
        b'0'
    };
    let bad = verify(dir.path(), &records, &tampered, &public_pem);
    assert!(
        !bad.status.success(),
        "a changed root verified: {}",
        describe(&bad)
    );
}

#[test]
fn keys_init_and_status_read_the_token_from_the_daemon_configuration() {
    let token = SoftHsmToken::new("ctl-config");
    let config = token.scratch().join("smartsignd.toml");
    std::fs::write(
        &config,
        format!(
            "[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"{}\"\n\
             pin_file = \"{}\"\nkey_mode = \"wrapped\"\n\n[store]\npath = \"/unused\"\n",
            token.label(),
            token.pin_file().display()
        ),
    )
    .unwrap();
    let init = run(token
        .command(ctl())
        .args(["keys", "init", "--config"])
        .arg(&config)
        .arg("--so-pin-file")
        .arg(token.so_pin_file()));
    assert!(init.status.success(), "{}", describe(&init));
    let status = run(token
        .command(ctl())
        .args(["keys", "status", "--config"])
        .arg(&config));
    assert!(status.status.success(), "{}", describe(&status));
    let listed = String::from_utf8_lossy(&status.stdout);
    for label in SYSTEM_KEY_LABELS {
        assert!(listed.contains(&format!("{label:<22} ok")), "{listed}");
    }
    // --config and --token name the token twice: refused before anything is opened.
    let both = run(token
        .command(ctl())
        .args(["keys", "status", "--token", "x", "--config"])
        .arg(&config));
    assert!(!both.status.success());
}

/// The RA enrolment request is signed in the HSM by the CMP client key: openssl verifies its
/// self-signature, and its public key is the one the token holds.
#[test]
fn keys_ra_request_writes_a_request_openssl_verifies() {
    let token = SoftHsmToken::new("ctl-ra");
    let init = keys_init(&token);
    assert!(init.status.success(), "{}", describe(&init));
    let csr = token.scratch().join("ra.csr");
    let made = run(token
        .command(ctl())
        .args(["keys", "ra-request", "--token", token.label()])
        .arg("--pin-file")
        .arg(token.pin_file())
        .args(["--common-name", "appliance-1.example", "--out"])
        .arg(&csr));
    assert!(made.status.success(), "{}", describe(&made));
    let verified = run(Command::new("openssl")
        .args(["req", "-verify", "-noout", "-subject", "-in"])
        .arg(&csr));
    let text = describe(&verified);
    assert!(verified.status.success(), "{text}");
    assert!(text.contains("verify OK"), "{text}");
    assert!(text.contains("CN = appliance-1.example"), "{text}");

    // Another token's request does not carry this token's key.
    let other = SoftHsmToken::new("ctl-ra-other");
    assert!(keys_init(&other).status.success());
    let other_csr = other.scratch().join("ra.csr");
    let made = run(other
        .command(ctl())
        .args(["keys", "ra-request", "--token", other.label()])
        .arg("--pin-file")
        .arg(other.pin_file())
        .args(["--common-name", "appliance-2.example", "--out"])
        .arg(&other_csr));
    assert!(made.status.success(), "{}", describe(&made));
    let pubkey = |path: &Path| {
        let output = run(Command::new("openssl")
            .args(["req", "-noout", "-pubkey", "-in"])
            .arg(path));
        assert!(output.status.success(), "{}", describe(&output));
        output.stdout
    };
    assert_ne!(pubkey(&csr), pubkey(&other_csr));
}
