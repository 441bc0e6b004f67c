//! The dev TLS PKI, checked with openssl: every certificate verifies for its purpose, keys are
//! private, and `ensure` is idempotent.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ca_bridge::dev_pki::{DEV_CLIENTS, DevPki};
use common::{run, run_any};

fn openssl(args: &[&str], files: &[&Path]) -> String {
    let out = run(common::openssl().args(args).args(files));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn verify(ca: &Path, cert: &Path, purpose: &str) {
    let ca = ca.to_str().unwrap();
    let out = openssl(&["verify", "-purpose", purpose, "-CAfile", ca], &[cert]);
    assert!(out.contains(": OK"), "{out}");
}

/// The key matches the certificate: same public key.
fn assert_pair(cert: &Path, key: &Path) {
    let from_cert = openssl(&["x509", "-noout", "-pubkey", "-in"], &[cert]);
    let from_key = openssl(&["pkey", "-pubout", "-in"], &[key]);
    assert_eq!(from_cert, from_key);
    let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
    assert!(
        std::fs::read_to_string(key)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
}

#[test]
fn makes_a_server_and_client_certificates_that_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(dir.path()).unwrap();
    assert_eq!(pki.ca_cert, dir.path().join("tls/ca.pem"));
    assert_eq!(pki.server_key, dir.path().join("tls/server.key"));
    assert_eq!(pki.clients.len(), DEV_CLIENTS.len());
    assert_eq!(
        pki.client("demo-a").unwrap().cert,
        dir.path().join("clients/demo-a.pem")
    );
    let ca_mode = std::fs::metadata(&pki.ca_key).unwrap().permissions().mode() & 0o777;
    assert_eq!(ca_mode, 0o600);
    assert_pair(&pki.ca_cert, &pki.ca_key);

    verify(&pki.ca_cert, &pki.server_cert, "sslserver");
    assert_pair(&pki.server_cert, &pki.server_key);
    let text = openssl(&["x509", "-noout", "-text", "-in"], &[&pki.server_cert]);
    for wanted in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "TLS Web Server Authentication",
    ] {
        assert!(text.contains(wanted), "missing {wanted} in {text}");
    }

    for client in &pki.clients {
        verify(&pki.ca_cert, &client.cert, "sslclient");
        assert_pair(&client.cert, &client.key);
        let subject = openssl(
            &["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"],
            &[&client.cert],
        );
        assert_eq!(
            subject.trim(),
            format!(
                "subject=CN={},OU={},O=smartsign dev",
                client.name, client.role
            )
        );
        // A client certificate is not a server certificate.
        let (ok, _) = run_any(
            common::openssl()
                .args(["verify", "-purpose", "sslserver", "-CAfile"])
                .arg(&pki.ca_cert)
                .arg(&client.cert),
        );
        assert!(!ok);
    }
}

#[test]
fn ensure_is_idempotent_and_fills_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let first = DevPki::ensure(dir.path()).unwrap();
    let read = |p: &Path| std::fs::read(p).unwrap();
    let ca = read(&first.ca_cert);
    let server = read(&first.server_cert);
    let gateway = read(&first.client("gateway").unwrap().cert);

    let again = DevPki::ensure(dir.path()).unwrap();
    assert_eq!(again, first);
    assert_eq!(read(&again.ca_cert), ca);
    assert_eq!(read(&again.server_cert), server);

    // A lost client certificate is made again under the same CA; the rest stays.
    let demo_b = first.client("demo-b").unwrap();
    std::fs::remove_file(&demo_b.key).unwrap();
    DevPki::ensure(dir.path()).unwrap();
    assert_eq!(read(&first.ca_cert), ca);
    assert_eq!(read(&first.client("gateway").unwrap().cert), gateway);
    verify(&first.ca_cert, &demo_b.cert, "sslclient");
    assert_pair(&demo_b.cert, &demo_b.key);

    // A lost CA key means a new CA, and everything is issued again under it.
    std::fs::remove_file(&first.ca_key).unwrap();
    DevPki::ensure(dir.path()).unwrap();
    assert_ne!(read(&first.ca_cert), ca);
    verify(&first.ca_cert, &first.server_cert, "sslserver");
    verify(
        &first.ca_cert,
        &first.client("gateway").unwrap().cert,
        "sslclient",
    );
}
