//! The key ceremony and the quorum unseal, as officers run them: `smartsign-ctl ceremony split`
//! on the user PIN, `[hsm.quorum]` in the daemon's configuration, a daemon that serves sealed,
//! and `POST /v1/admin/unseal` with two of three shares.

// Test helpers outside #[test] functions: a panic is how they report a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::Digest;
use smartsign_tests::flow::{problem, registration};
use smartsign_tests::{DevDaemon, binary, describe, device_key, free_address, run};

fn ctl() -> PathBuf {
    binary("smartsign-ops", "smartsign-ctl")
}

/// `ceremony split` of `pin_file` into `out_dir`.
fn split(pin_file: &Path, threshold: &str, shares: &str, out_dir: &Path) -> std::process::Output {
    run(Command::new(ctl())
        .args(["ceremony", "split", "--pin-file"])
        .arg(pin_file)
        .args(["--threshold", threshold, "--shares", shares, "--out-dir"])
        .arg(out_dir))
}

/// A loopback address with a port that is free now.
/// A dev state directory (its daemon stopped), split into 2-of-3 shares: the shares' texts, the
/// `[hsm.quorum]` section the ceremony printed, and the dev configuration's text.
fn ceremony() -> (DevDaemon, Vec<String>, String, String) {
    let mut daemon = DevDaemon::start(&[]);
    daemon.stop();
    let state = daemon.state_dir();
    let out = state.join("shares");
    let output = split(&state.join("hsm/user.pin"), "2", "3", &out);
    assert!(output.status.success(), "{}", describe(&output));
    let block = String::from_utf8(output.stdout).unwrap();
    let shares: Vec<String> = (1..=3)
        .map(|i| {
            let path = out.join(format!("share-{i}.txt"));
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            std::fs::read_to_string(&path).unwrap().trim().to_owned()
        })
        .collect();
    assert!(block.contains("[hsm.quorum]\nthreshold = 2\n"), "{block}");
    for share in &shares {
        let digest = hex::encode(sha2::Sha256::digest(share.as_bytes()));
        assert!(block.contains(&digest), "{block}");
    }
    let config = std::fs::read_to_string(state.join("smartsignd.toml")).unwrap();
    (daemon, shares, block, config)
}

/// The dev configuration's lines without `hsm.pin_file`.
fn without_pin_file(config: &str) -> String {
    let kept: Vec<&str> = config
        .lines()
        .filter(|line| !line.starts_with("pin_file = "))
        .collect();
    assert_ne!(
        kept.len(),
        config.lines().count(),
        "no pin_file in {config}"
    );
    kept.join("\n") + "\n"
}

/// Runs `smartsignd --config` on the dev configuration with `block` (`[hsm.quorum]`) in place
/// of `hsm.pin_file`, on free ports.
fn start_sealed(daemon: &mut DevDaemon, config: &str, block: &str) {
    let (api, metrics) = (free_address(), free_address());
    let quorum = without_pin_file(config)
        .replace(
            "metrics_listen = \"127.0.0.1:0\"",
            &format!("metrics_listen = \"{metrics}\""),
        )
        .replace(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"{api}\""),
        )
        + "\n"
        + block;
    let path = daemon.state_dir().join("quorum.toml");
    std::fs::write(&path, &quorum).unwrap();
    daemon.launch_with_config(
        &path,
        &format!("https://{api}"),
        &format!("http://{metrics}"),
    );
}

fn unseal(daemon: &DevDaemon, who: &str, share: &str) -> reqwest::blocking::Response {
    daemon
        .client(who)
        .post(format!("{}/v1/admin/unseal", daemon.api))
        .json(&json!({"share": share}))
        .send()
        .unwrap()
}

fn admin_status(daemon: &DevDaemon) -> Value {
    let response = daemon
        .client("officer")
        .get(format!("{}/v1/admin/status", daemon.api))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().unwrap()
}

fn readyz(daemon: &DevDaemon) -> (u16, String) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/readyz", daemon.metrics))
        .send()
        .unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

#[test]
fn quorum_unseal_opens_the_hsm_with_two_of_three_shares() {
    let (mut daemon, shares, block, config) = ceremony();
    daemon.issue_client_certificate("officer-2", "officer");
    start_sealed(&mut daemon, &config, &block);

    // Sealed: alive, not ready, and every route but the officer's two is 503 `sealed`.
    let (status, body) = readyz(&daemon);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("sealed"), "{body}");
    let metrics_text = reqwest::blocking::Client::new()
        .get(format!("{}/metrics", daemon.metrics))
        .send()
        .unwrap();
    assert_eq!(metrics_text.status(), 200);
    let metrics_text = metrics_text.text().unwrap();
    assert!(
        metrics_text.contains("smartsign_sealed 1"),
        "{metrics_text}"
    );
    let account = daemon
        .client("registrar")
        .get(format!("{}/v1/accounts/x", daemon.api))
        .send()
        .unwrap();
    assert_eq!(
        account.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(problem(account), (503, "sealed".into()));
    assert_eq!(
        problem(unseal(&daemon, "gateway", &shares[0])),
        (403, "forbidden".into())
    );
    let status = admin_status(&daemon);
    assert_eq!(status["sealed"], true, "{status}");
    assert_eq!(status["shares_received"], 0, "{status}");
    assert_eq!(status["threshold"], 2, "{status}");

    // Garbage and a tampered share are refused and change nothing.
    let mut tampered = shares[0].clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'Q' } else { 'A' });
    for bad in ["not a share", tampered.as_str()] {
        assert_eq!(
            problem(unseal(&daemon, "officer", bad)),
            (422, "invalid_share".into())
        );
    }
    assert_eq!(admin_status(&daemon)["shares_received"], 0);

    // One share, twice: counted once.
    for _ in 0..2 {
        let response = unseal(&daemon, "officer", &shares[0]);
        assert_eq!(response.status(), 202);
        let body: Value = response.json().unwrap();
        assert_eq!(
            body,
            json!({"sealed": true, "shares_received": 1, "threshold": 2})
        );
    }
    // A second, different share from the same officer is refused: one person cannot unseal
    // alone. The share held stays.
    assert_eq!(
        problem(unseal(&daemon, "officer", &shares[2])),
        (409, "share_already_given".into())
    );
    assert_eq!(admin_status(&daemon)["shares_received"], 1);
    // Another officer's share reaches the threshold: the HSM opens and start-up runs.
    let response = unseal(&daemon, "officer-2", &shares[2]);
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().unwrap(), json!({"sealed": false}));
    assert_eq!(admin_status(&daemon)["sealed"], false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, body) = readyz(&daemon);
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready: {body}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        problem(unseal(&daemon, "officer", &shares[1])),
        (409, "already_unsealed".into())
    );

    // Unsealed, the daemon serves: a registration goes through the HSM and the CA.
    let registered = daemon
        .client("registrar")
        .post(format!("{}/v1/accounts", daemon.api))
        .json(&registration("u-unseal-1", "1990-01-01", &device_key()))
        .send()
        .unwrap();
    assert_eq!(registered.status(), 201, "{}", registered.text().unwrap());

    // The unseal is audited with the officer's name, and no share is in the log or the audit.
    let records = daemon
        .client("auditor")
        .get(format!(
            "{}/v1/audit/records?from=0&limit=100000",
            daemon.api
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let unsealed: Vec<Value> = records
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|record| record["event"] == "admin.unsealed")
        .collect();
    assert_eq!(unsealed.len(), 1, "{records}");
    let named = unsealed[0].to_string();
    assert!(
        named.contains("\"officer\"") && named.contains("\"officer-2\""),
        "{named}"
    );
    daemon.stop();
    let log = daemon.log();
    assert!(log.contains("sealed"), "{log}");
    for share in &shares {
        let payload = share.rsplit('.').next().unwrap();
        assert!(!records.contains(payload), "a share is in the audit log");
        assert!(!log.contains(payload), "a share is in the daemon's log");
    }
}

/// Shares of a ceremony on another PIN (their digests configured, as after a PIN change that
/// skipped the ceremony): the quorum is reached, the HSM refuses the PIN, the officer is told,
/// the shares are forgotten and the daemon stays sealed.
#[test]
fn a_quorum_whose_pin_the_hsm_refuses_leaves_the_daemon_sealed() {
    let (mut daemon, _shares, _block, config) = ceremony();
    daemon.issue_client_certificate("officer-2", "officer");
    let state = daemon.state_dir();
    let wrong_pin = state.join("wrong.pin");
    std::fs::write(&wrong_pin, "not-the-pin-0000\n").unwrap();
    let out = state.join("wrong-shares");
    let output = split(&wrong_pin, "2", "2", &out);
    assert!(output.status.success(), "{}", describe(&output));
    let block = String::from_utf8(output.stdout).unwrap();
    let shares: Vec<String> = (1..=2)
        .map(|i| {
            std::fs::read_to_string(out.join(format!("share-{i}.txt")))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    start_sealed(&mut daemon, &config, &block);

    assert_eq!(unseal(&daemon, "officer", &shares[0]).status(), 202);
    let refused = unseal(&daemon, "officer-2", &shares[1]);
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().unwrap();
    assert_eq!(body["code"], "sealed", "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("refused the PIN"), "{detail}");
    assert!(detail.contains("stays sealed"), "{detail}");
    let status = admin_status(&daemon);
    assert_eq!(status["sealed"], true, "{status}");
    assert_eq!(
        status["shares_received"], 0,
        "the shares are forgotten: {status}"
    );
    assert_eq!(readyz(&daemon).0, 503);
    // The same shares again: the same answer, not a crash or a half-open daemon.
    assert_eq!(unseal(&daemon, "officer", &shares[0]).status(), 202);
    assert_eq!(unseal(&daemon, "officer-2", &shares[1]).status(), 503);
    daemon.stop();
    let log = daemon.log();
    assert!(!log.contains("not-the-pin-0000"), "the PIN is in the log");
    for share in &shares {
        let payload = share.rsplit('.').next().unwrap();
        assert!(!log.contains(payload), "a share is in the daemon's log");
    }
}

#[test]
fn check_config_wants_exactly_one_of_pin_file_and_quorum() {
    let (daemon, _shares, block, config) = ceremony();
    let dir = daemon.state_dir();
    let check = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        run(Command::new(binary("smartsignd", "smartsignd"))
            .arg("--check-config")
            .arg(&path))
    };
    let quorum = check("quorum.toml", &(without_pin_file(&config) + &block));
    assert!(quorum.status.success(), "{}", describe(&quorum));

    let both = check("both.toml", &(config.clone() + "\n" + &block));
    assert!(!both.status.success());
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(
        stderr.contains("either hsm.pin_file or [hsm.quorum], not both"),
        "{}",
        describe(&both)
    );

    let neither = check("neither.toml", &without_pin_file(&config));
    assert!(!neither.status.success());
    let stderr = String::from_utf8_lossy(&neither.stderr);
    assert!(
        stderr.contains("hsm.pin_file") && stderr.contains("[hsm.quorum]"),
        "{}",
        describe(&neither)
    );

    let one_of_one = block.replace("threshold = 2", "threshold = 1");
    let weak = check("weak.toml", &(without_pin_file(&config) + &one_of_one));
    assert!(!weak.status.success());
    assert!(
        String::from_utf8_lossy(&weak.stderr).contains("hsm.quorum"),
        "{}",
        describe(&weak)
    );
}

#[test]
fn ceremony_split_refuses_a_weak_quorum_and_never_overwrites_shares() {
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("user.pin");
    std::fs::write(&pin_file, "1234-5678\n").unwrap();
    let out = dir.path().join("shares");
    for (k, n, says) in [
        ("1", "3", "at least 2"),
        ("4", "3", "more than --shares"),
        ("2", "256", "at most 255"),
    ] {
        let output = split(&pin_file, k, n, &out);
        assert!(!output.status.success(), "{}", describe(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(says),
            "{}",
            describe(&output)
        );
    }
    assert!(!out.exists(), "nothing is written for a refused split");
    let help = run(Command::new(ctl()).args(["ceremony", "split", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("[hsm.quorum]") && help.contains("/v1/admin/unseal"),
        "{help}"
    );

    let first = split(&pin_file, "2", "3", &out);
    assert!(first.status.success(), "{}", describe(&first));
    let again = split(&pin_file, "2", "3", &out);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("never overwritten"),
        "{}",
        describe(&again)
    );
    // The PIN is in no share and not on the output.
    for i in 1..=3 {
        let text = std::fs::read_to_string(out.join(format!("share-{i}.txt"))).unwrap();
        assert!(text.starts_with(&format!("smartsign-share-v1.{i}.")));
        assert!(!text.contains("1234-5678"));
    }
    assert!(!describe(&first).contains("1234-5678"));
}

/// `smartsign-ctl` with the dev token of the state directory `state` in its environment.
fn ctl_on(state: &Path) -> Command {
    let mut command = Command::new(ctl());
    command.env("SOFTHSM2_CONF", state.join("hsm/softhsm2.conf"));
    command
}

/// `smartsign-ctl unseal` as officer `who` with the share in `share_file`, or on standard input.
fn ctl_unseal(daemon: &DevDaemon, who: &str, share_file: &Path, stdin: bool) -> String {
    let state = daemon.state_dir();
    let mut command = Command::new(ctl());
    command
        .args(["unseal", "--url", &daemon.api, "--cert"])
        .arg(state.join(format!("clients/{who}.pem")))
        .arg("--key")
        .arg(state.join(format!("clients/{who}.key")))
        .arg("--ca")
        .arg(state.join("tls/ca.pem"));
    let output = if stdin {
        command
            .stdin(std::fs::File::open(share_file).unwrap())
            .output()
            .unwrap()
    } else {
        run(command.arg("--share-file").arg(share_file))
    };
    assert!(output.status.success(), "{}", describe(&output));
    String::from_utf8(output.stdout).unwrap()
}

fn ceremony_records(daemon: &DevDaemon) -> Vec<Value> {
    let export = tempfile::tempdir().unwrap();
    smartsign_tests::flow::verify_audit(daemon, export.path())
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|record| record["event"] == "ceremony.transcript")
        .collect()
}

#[test]
fn ceremony_init_replaces_the_pins_and_its_signed_transcript_is_checked_and_anchored() {
    let mut daemon = DevDaemon::start(&[]);
    daemon.issue_client_certificate("officer-2", "officer");
    daemon.stop();
    let state = daemon.state_dir();
    let out = state.join("ceremony");

    // The whole ceremony, taking over the dev token (its PINs were in files).
    let init = run(ctl_on(&state)
        .args(["ceremony", "init", "--token", "smartsign-dev"])
        .arg("--take-token-so-pin-file")
        .arg(state.join("hsm/so.pin"))
        .args(["--officer", "officer", "--officer", "officer-2"])
        .args(["--officer", "officer-3", "--threshold", "2", "--out-dir"])
        .arg(&out));
    assert!(init.status.success(), "{}", describe(&init));
    let printed = String::from_utf8(init.stdout).unwrap();
    assert!(
        printed.contains("[hsm.quorum]\nthreshold = 2\n"),
        "{printed}"
    );
    for officer in ["officer", "officer-2", "officer-3"] {
        for kind in ["user-pin-share", "so-pin-share"] {
            let path = out.join(format!("{officer}.{kind}.txt"));
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
    }
    let share = |officer: &str, kind: &str| out.join(format!("{officer}.{kind}.txt"));
    let transcript_path = out.join("transcript.json");
    let transcript: Value =
        serde_json::from_slice(&std::fs::read(&transcript_path).unwrap()).unwrap();
    assert_eq!(
        transcript["officers"],
        json!(["officer", "officer-2", "officer-3"])
    );
    let keys = transcript["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 8, "{transcript}");
    let kek = keys.iter().find(|k| k["label"] == "smartsign-kek").unwrap();
    assert_eq!(kek["attributes"]["CKA_TRUSTED"], "CK_TRUE");
    assert!(
        kek["attributes"]["CKA_UNWRAP_TEMPLATE"]
            .as_str()
            .unwrap()
            .contains("CKA_SENSITIVE=CK_TRUE"),
        "{kek}"
    );
    let audit = keys
        .iter()
        .find(|k| k["label"] == "smartsign-audit")
        .unwrap();
    assert_eq!(audit["public_key_sha256"].as_str().unwrap().len(), 64);

    // The old PIN file no longer opens the token: the PINs came from the HSM, and nobody saw them.
    let old_pin = run(ctl_on(&state)
        .args(["keys", "status", "--config"])
        .arg(state.join("smartsignd.toml")));
    assert!(!old_pin.status.success());
    assert!(
        String::from_utf8_lossy(&old_pin.stderr).contains("refused the PIN"),
        "{}",
        describe(&old_pin)
    );

    // Two officers' shares open the token, and it matches the transcript.
    let verify = |transcript: &Path| {
        run(ctl_on(&state)
            .args(["ceremony", "verify"])
            .arg(transcript)
            .args(["--token", "smartsign-dev", "--share-file"])
            .arg(share("officer", "user-pin-share"))
            .arg("--share-file")
            .arg(share("officer-3", "user-pin-share")))
    };
    let verified = verify(&transcript_path);
    assert!(verified.status.success(), "{}", describe(&verified));
    assert!(String::from_utf8_lossy(&verified.stdout).contains("matches the transcript"));
    // A changed transcript does not verify.
    let tampered = state.join("tampered.json");
    std::fs::write(
        &tampered,
        std::fs::read_to_string(&transcript_path)
            .unwrap()
            .replace("officer-3", "officer-9"),
    )
    .unwrap();
    let refused = verify(&tampered);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("does not verify"),
        "{}",
        describe(&refused)
    );

    // The daemon: quorum and transcript in its configuration, unsealed with `smartsign-ctl
    // unseal` (a share file, and standard input).
    let block = &printed[printed.find("[hsm.quorum]").unwrap()..];
    let config = std::fs::read_to_string(state.join("smartsignd.toml"))
        .unwrap()
        .replacen(
            "[hsm]\n",
            &format!(
                "[hsm]\nceremony_transcript = {:?}\n",
                transcript_path.display().to_string()
            ),
            1,
        );
    start_sealed(&mut daemon, &config, block);
    let first = ctl_unseal(
        &daemon,
        "officer",
        &share("officer", "user-pin-share"),
        false,
    );
    assert!(first.starts_with("202 "), "{first}");
    let second = ctl_unseal(
        &daemon,
        "officer-2",
        &share("officer-2", "user-pin-share"),
        true,
    );
    assert!(second.starts_with("200 "), "{second}");
    let records = ceremony_records(&daemon);
    assert_eq!(records.len(), 1, "{records:?}");
    let digest = hex::encode(sha2::Sha256::digest(
        std::fs::read(&transcript_path).unwrap(),
    ));
    assert_eq!(records[0]["fields"]["sha256"], digest.as_str());
    // The next start does not record it again.
    start_sealed(&mut daemon, &config, block);
    ctl_unseal(
        &daemon,
        "officer-2",
        &share("officer-2", "user-pin-share"),
        false,
    );
    ctl_unseal(
        &daemon,
        "officer",
        &share("officer", "user-pin-share"),
        false,
    );
    assert_eq!(ceremony_records(&daemon).len(), 1);
    daemon.stop();

    // A KEK rotation under the SO quorum; the token then differs from the transcript, and
    // `ceremony verify` says how.
    let quorum_config = state.join("quorum.toml");
    let rotated = run(ctl_on(&state)
        .args(["keys", "rotate-kek", "--config"])
        .arg(&quorum_config)
        .arg("--share-file")
        .arg(share("officer", "user-pin-share"))
        .arg("--share-file")
        .arg(share("officer-3", "user-pin-share"))
        .arg("--so-share-file")
        .arg(share("officer-2", "so-pin-share"))
        .arg("--so-share-file")
        .arg(share("officer-3", "so-pin-share"))
        .args(["--officer", "officer-2"]));
    assert!(rotated.status.success(), "{}", describe(&rotated));
    let differs = verify(&transcript_path);
    assert!(!differs.status.success());
    let report = String::from_utf8_lossy(&differs.stdout);
    assert!(report.contains("signature: verifies"), "{report}");
    assert!(
        report.contains("DIFFERS: smartsign-kek") && report.contains("not on the token"),
        "{report}"
    );
}
