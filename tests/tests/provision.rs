//! The appliance's provisioning (issue 18), on this machine: a daemon with no configuration
//! waits and says so; `smartsign-ctl provision` from a development medium writes the
//! configuration, and the daemon comes up sealed on its own; two officers unseal it with what
//! the medium carried back, and a signature verifies with openssl. The qemu boot test
//! (`ops/image/test`) does the same on the image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use smartsign_tests::flow::{Pending, unseal_from_medium, verify_signature};
use smartsign_tests::{DevDaemon, binary, describe, free_address, run};

/// A daemon started as the appliance's unit starts it, waiting for its configuration.
struct Appliance {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

fn readyz(ops: &str) -> Option<(u16, String)> {
    let response = reqwest::blocking::get(format!("http://{ops}/readyz")).ok()?;
    Some((response.status().as_u16(), response.text().ok()?))
}

/// Waits until `/readyz` answers with a body that `wanted` accepts.
fn wait_readyz(ops: &str, appliance: &Appliance, wanted: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((status, body)) = readyz(ops)
            && wanted(status, &body)
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never became what the test waits for; log:\n{}",
            std::fs::read_to_string(&appliance.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn provision(
    medium: &Path,
    etc: &Path,
    state: &Path,
    addresses: [&str; 3],
) -> std::process::Output {
    run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .arg("provision")
        .arg("--medium")
        .arg(medium)
        .arg("--config-dir")
        .arg(etc)
        .arg("--state-dir")
        .arg(state)
        .arg("--smartsignd")
        .arg(binary("smartsignd", "smartsignd"))
        .args(["--api-listen", addresses[0]])
        .args(["--ops-listen", addresses[1]])
        .args(["--ca-listen", addresses[2]]))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn an_unprovisioned_appliance_waits_then_comes_up_sealed_and_signs_after_two_officers() {
    let root = tempfile::tempdir().unwrap();
    let (medium, etc, state) = (
        root.path().join("medium"),
        root.path().join("etc"),
        root.path().join("state"),
    );
    std::fs::create_dir_all(&medium).unwrap();
    std::fs::write(
        medium.join("provision.toml"),
        "profile = \"development\"\n[officers]\nnames = [\"officer-1\", \"officer-2\", \
         \"officer-3\"]\nthreshold = 2\n",
    )
    .unwrap();
    let (api, ops, ca) = (free_address(), free_address(), free_address());
    let config = etc.join("smartsignd.toml");
    let log = root.path().join("daemon.log");
    let child = Command::new(binary("smartsignd", "smartsignd"))
        .arg("--config")
        .arg(&config)
        .args(["--wait-for-config", &ops])
        .env("SOFTHSM2_CONF", state.join("hsm/softhsm2.conf"))
        .stdout(std::fs::File::create(root.path().join("daemon.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let appliance = Appliance { child, log };

    // Not provisioned: /readyz says so, nothing else listens, and no state is made.
    let body = wait_readyz(&ops, &appliance, |status, _| status == 503);
    let waiting: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(waiting["provisioned"], false, "{body}");
    assert!(
        waiting["reason"]
            .as_str()
            .unwrap()
            .contains("not provisioned"),
        "{body}"
    );
    let metrics = reqwest::blocking::get(format!("http://{ops}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    assert!(metrics.contains("smartsign_provisioned 0"), "{metrics}");
    assert!(
        std::net::TcpStream::connect(&api).is_err(),
        "the API listens unprovisioned"
    );
    assert!(!state.exists());

    // A medium without officers is refused before anything is made.
    let bare = root.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join("provision.toml"), "profile = \"development\"\n").unwrap();
    let refused = provision(&bare, &etc, &state, [&api, &ops, &ca]);
    assert!(!refused.status.success());
    assert!(
        describe(&refused).contains("[officers]"),
        "{}",
        describe(&refused)
    );
    assert!(!config.exists() && !state.exists());

    let provisioned = provision(&medium, &etc, &state, [&api, &ops, &ca]);
    assert!(provisioned.status.success(), "{}", describe(&provisioned));

    // What rebuilds a PIN or mints a client certificate has left the appliance.
    for gone in [
        "hsm/user.pin",
        "hsm/so.pin",
        "tls/ca.key",
        "clients/demo-a.key",
    ] {
        assert!(
            !state.join(gone).exists(),
            "{gone} is still on the appliance"
        );
    }
    let out = medium.join("out");
    for officer in ["officer-1", "officer-2", "officer-3"] {
        for (file, wanted) in [
            ("client.pem", 0o644),
            ("client.key", 0o600),
            ("unseal-share.txt", 0o600),
            ("so-pin-share.txt", 0o600),
        ] {
            assert_eq!(mode(&out.join("officers").join(officer).join(file)), wanted);
        }
    }
    assert_eq!(mode(&out.join("tls/ca.key")), 0o600);
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("[hsm.quorum]"), "{written}");
    assert!(!written.contains("pin_file"), "{written}");

    // The waiting daemon found its configuration and serves sealed.
    let body = wait_readyz(&ops, &appliance, |status, body| {
        status == 503 && body.contains("\"sealed\":true")
    });
    assert!(!body.contains("provisioned\":false"), "{body}");

    // Provisioning happens once.
    let again = provision(&medium, &etc, &state, [&api, &ops, &ca]);
    assert!(!again.status.success());
    assert!(
        describe(&again).contains("provisioned already"),
        "{}",
        describe(&again)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);

    // Two officers unseal with their certificate and share from the medium.
    for officer in ["officer-1", "officer-3"] {
        unseal_from_medium(&format!("https://{api}"), &out, officer);
    }
    wait_readyz(&ops, &appliance, |status, _| status == 200);

    // A full signature with the medium's client certificates, verified with openssl.
    let daemon = DevDaemon::attach(&out, &format!("https://{api}"), &format!("http://{ops}"));
    let pending = Pending::new(&daemon, "u-appliance");
    assert_eq!(pending.approve(&daemon).status(), 200);
    verify_signature(&pending.read(&daemon), b"document");
}

#[test]
fn a_production_medium_is_checked_and_a_failing_one_leaves_nothing() {
    // A valid configuration: a stopped dev daemon's, whose files stay where it names them.
    let mut daemon = DevDaemon::start(&[]);
    daemon.stop();
    let valid = std::fs::read_to_string(daemon.state_dir().join("smartsignd.toml")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let (medium, etc, state) = (
        root.path().join("medium"),
        root.path().join("etc"),
        root.path().join("state"),
    );
    std::fs::create_dir_all(medium.join("etc/tls")).unwrap();
    std::fs::write(medium.join("provision.toml"), "profile = \"production\"\n").unwrap();
    std::fs::write(medium.join("etc/tls/note.txt"), "the operator's files\n").unwrap();
    let addresses = [free_address(), free_address(), free_address()];
    let addresses = [
        addresses[0].as_str(),
        addresses[1].as_str(),
        addresses[2].as_str(),
    ];

    // A configuration that --check-config refuses: refused, and nothing stays.
    std::fs::write(
        medium.join("etc/smartsignd.toml"),
        valid.replacen("[server]", "[server]\nno_such_setting = 1", 1),
    )
    .unwrap();
    let refused = provision(&medium, &etc, &state, addresses);
    assert!(!refused.status.success());
    assert!(
        describe(&refused).contains("--check-config"),
        "{}",
        describe(&refused)
    );
    assert_eq!(std::fs::read_dir(&etc).unwrap().count(), 0);

    // A good one: the files and then smartsignd.toml, as the medium has them.
    std::fs::write(medium.join("etc/smartsignd.toml"), &valid).unwrap();
    let provisioned = provision(&medium, &etc, &state, addresses);
    assert!(provisioned.status.success(), "{}", describe(&provisioned));
    assert_eq!(
        std::fs::read_to_string(etc.join("smartsignd.toml")).unwrap(),
        valid
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("tls/note.txt")).unwrap(),
        "the operator's files\n"
    );
    assert_eq!(mode(&etc.join("smartsignd.toml")), 0o640);
    assert!(!state.exists(), "a production medium makes no state");
    assert!(!medium.join("out").exists());
}

/// The update path's guard: an appliance booted from an older root (a rollback, or the other
/// slot) refuses a state partition that a newer smartsign has written, and says what to do.
#[test]
fn a_daemon_refuses_a_store_written_by_a_newer_smartsign() {
    let mut daemon = DevDaemon::start(&[]);
    daemon.stop();
    let store = rusqlite::Connection::open(daemon.state_dir().join("smartsign.sqlite")).unwrap();
    let version: i64 = store
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    store
        .pragma_update(None, "user_version", version + 1)
        .unwrap();
    drop(store);
    let refused = run(Command::new(binary("smartsignd", "smartsignd"))
        .arg("--config")
        .arg(daemon.state_dir().join("smartsignd.toml"))
        .env(
            "SOFTHSM2_CONF",
            daemon.state_dir().join("hsm/softhsm2.conf"),
        ));
    assert!(!refused.status.success());
    let said = describe(&refused);
    assert!(said.contains("written by a newer smartsign"), "{said}");
}
