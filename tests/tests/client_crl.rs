//! Revocation of client certificates (issue 14, section 4): `server.client_crl`, made by the
//! client CA with `openssl ca` as its operator would, refuses the certificates it lists in the
//! handshake; SIGHUP reloads it; a CRL that does not verify or has expired is refused, and a CRL
//! in force that expires fails every handshake closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use smartsign_tests::{DevDaemon, binary, describe, run};

/// The development client CA as an `openssl ca` database in a scratch directory.
struct ClientCa {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl ClientCa {
    fn of(daemon: &DevDaemon) -> ClientCa {
        let state = daemon.state_dir();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.txt"), "").unwrap();
        std::fs::write(dir.path().join("crlnumber"), "01\n").unwrap();
        std::fs::write(
            dir.path().join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = dev\n[dev]\ndatabase = {0}/index.txt\n\
                 crlnumber = {0}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        ClientCa {
            dir,
            cert: state.join("tls/ca.pem"),
            key: state.join("tls/ca.key"),
        }
    }

    fn ca(&self) -> Command {
        let mut command = Command::new("openssl");
        command
            .arg("ca")
            .arg("-config")
            .arg(self.dir.path().join("ca.cnf"))
            .arg("-cert")
            .arg(&self.cert)
            .arg("-keyfile")
            .arg(&self.key)
            .arg("-batch");
        command
    }

    fn revoke(&self, certificate: &Path) {
        let revoked = run(self.ca().arg("-revoke").arg(certificate));
        assert!(revoked.status.success(), "{}", describe(&revoked));
    }

    /// A CRL of what is revoked so far, valid from `last` to `next` (openssl's
    /// `YYYYMMDDHHMMSSZ`), or for a day from now.
    fn crl(&self, out: &Path, window: Option<(String, String)>) {
        let mut command = self.ca();
        command.arg("-gencrl").arg("-out").arg(out);
        if let Some((last, next)) = window {
            command.args(["-crl_lastupdate", &last, "-crl_nextupdate", &next]);
        }
        let made = run(&mut command);
        assert!(made.status.success(), "{}", describe(&made));
    }
}

/// `now` moved by `seconds`, as openssl's `YYYYMMDDHHMMSSZ`.
fn openssl_time(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.format(time::macros::format_description!(
        "[year][month][day][hour][minute][second]Z"
    ))
    .unwrap()
}

/// Whether `client` completes a handshake and gets an answer from the API.
fn answers(daemon: &DevDaemon, client: &str) -> bool {
    daemon
        .client(client)
        .get(format!("{}/v1/signing-requests/r-none", daemon.api))
        .send()
        .is_ok_and(|response| response.status() == 404)
}

fn hang_up(daemon: &DevDaemon) {
    let pid = daemon.pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits until the log has said `what` `times` times in all.
fn logged(daemon: &DevDaemon, what: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.log().matches(what).count() < times {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_revoked_client_certificate_is_refused_and_a_stale_crl_fails_closed() {
    let mut daemon = DevDaemon::start(&[]);
    daemon.issue_client_certificate("svc-stolen", "service");
    let ca = ClientCa::of(&daemon);
    let crl = daemon.state_dir().join("tls/client.crl");
    ca.crl(&crl, None);
    daemon.relaunch_with_settings(&[("client_crl", &format!("{:?}", crl.display().to_string()))]);
    assert!(answers(&daemon, "svc-stolen"), "listed nowhere yet");
    assert!(answers(&daemon, "demo-b"));

    // The CA revokes the stolen certificate; the operator installs the new CRL and sends
    // SIGHUP.
    ca.revoke(&daemon.state_dir().join("clients/svc-stolen.pem"));
    ca.crl(&crl, None);
    hang_up(&daemon);
    logged(
        &daemon,
        "TLS certificate, key, client CA and client CRL reloaded",
        1,
    );
    assert!(
        !answers(&daemon, "svc-stolen"),
        "a revoked certificate is refused"
    );
    assert!(answers(&daemon, "demo-b"), "the others still get in");

    // An expired CRL, or one the client CA did not sign, is refused on reload: the CRL in
    // force stays.
    let fresh = std::fs::read(&crl).unwrap();
    ca.crl(
        &crl,
        Some((openssl_time(-2 * 86_400), openssl_time(-86_400))),
    );
    hang_up(&daemon);
    logged(&daemon, "the TLS files were not reloaded", 1);
    let other_ca = tempfile::tempdir().unwrap();
    let forged = run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/O=smartsign dev/CN=smartsign dev TLS CA",
        ])
        .arg("-keyout")
        .arg(other_ca.path().join("ca.key"))
        .arg("-out")
        .arg(other_ca.path().join("ca.pem")));
    assert!(forged.status.success(), "{}", describe(&forged));
    let impostor = ClientCa {
        cert: other_ca.path().join("ca.pem"),
        key: other_ca.path().join("ca.key"),
        ..ClientCa::of(&daemon)
    };
    impostor.crl(&crl, None);
    hang_up(&daemon);
    logged(&daemon, "the TLS files were not reloaded", 2);
    assert!(
        !answers(&daemon, "svc-stolen"),
        "the CRL in force still lists it"
    );
    assert!(answers(&daemon, "demo-b"));

    // --check-config says what is wrong with such a file, and the daemon does not start on it.
    let config = daemon.state_dir().join("tuned.toml");
    let checked = run(Command::new(binary("smartsignd", "smartsignd"))
        .arg("--check-config")
        .arg(&config));
    assert!(!checked.status.success());
    assert!(
        describe(&checked).contains("client CRL"),
        "{}",
        describe(&checked)
    );

    // A CRL in force that passes its nextUpdate fails every handshake until a fresh one comes.
    let stale_at = Instant::now() + Duration::from_secs(8);
    ca.crl(&crl, Some((openssl_time(-60), openssl_time(8))));
    hang_up(&daemon);
    logged(
        &daemon,
        "TLS certificate, key, client CA and client CRL reloaded",
        2,
    );
    assert!(answers(&daemon, "demo-b"));
    std::thread::sleep(stale_at.saturating_duration_since(Instant::now()) + Duration::from_secs(2));
    assert!(!answers(&daemon, "demo-b"), "a stale CRL admits nobody");
    std::fs::write(&crl, fresh).unwrap();
    hang_up(&daemon);
    logged(
        &daemon,
        "TLS certificate, key, client CA and client CRL reloaded",
        3,
    );
    assert!(answers(&daemon, "demo-b"));
    assert!(!answers(&daemon, "svc-stolen"));
    let metrics = reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("smartsign_client_crl_next_update_timestamp_seconds 1"),
        "{metrics}"
    );
}
