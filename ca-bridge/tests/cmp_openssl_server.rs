//! Our CMP client against the `openssl cmp` mock server (PEERS.md): ir with PBM, ir with the RA
//! key's signature, same-key kur, rr with a reason; a response under another secret or signed by
//! an untrusted server certificate is rejected.
//!
//! `openssl cmp -port` listens on every interface, so the test re-runs itself inside a network
//! namespace of its own (`unshare -n`, only loopback up): the mock servers cannot be reached
//! from outside.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use ca_bridge::cmp::{ClientProtection, CmpClient};
use ca_bridge::{CaError, Profile};
use common::{
    OpensslPki, ServerProcess, cert_der, cmp_client, cmp_config, hsm, in_network_namespace, request,
};
use hsm_adapter::{KeyAlgorithm, KeyMode, SystemKey, UserKeyRef};

const SECRET: &str = "mock-secret";

#[test]
fn client_against_openssl_mock_server() {
    in_network_namespace("client_against_openssl_mock_server", || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(against_mock_server());
    });
}

fn mock_server(dir: &Path, args: &[&str]) -> ServerProcess {
    let mut child = Command::new("sh")
        .current_dir(dir)
        .args([
            "-c",
            "exec openssl cmp -config '' -port 0 \"$@\" 2>&1",
            "sh",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("mock server ended").unwrap();
        if let Some(rest) = line.strip_prefix("ACCEPT ") {
            let addr = rest.split_whitespace().next().unwrap();
            break addr.rsplit(':').next().unwrap().to_owned();
        }
    };
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    ServerProcess {
        child,
        url: format!("http://127.0.0.1:{port}/pkix/"),
    }
}

/// root -> ica -> {srv, c1 (for the HSM user key), ra (for the HSM CMP client key)}; and a
/// rogue self-signed server certificate.
fn make_pki(dir: &Path, user_spki: &[u8], ra_spki: &[u8]) {
    let pki = OpensslPki::new(dir);
    let pem =
        |der: &[u8]| der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, der).unwrap();
    std::fs::write(dir.join("user.pub"), pem(user_spki)).unwrap();
    std::fs::write(dir.join("ra.pub"), pem(ra_spki)).unwrap();
    pki.self_signed("rogue", "/CN=Mock CMP Server", "signer_ext");
    pki.issue_by("srv", "/CN=Mock CMP Server", "ica", "signer_ext");
    pki.issue_for_key(
        "c1",
        "/O=smartsign test/CN=Tai Man CHAN",
        "ica",
        "signer_ext",
        Some("user.pub"),
    );
    pki.issue_for_key(
        "ra",
        "/O=smartsign test/CN=smartsign RA",
        "ica",
        "signer_ext",
        Some("ra.pub"),
    );
}

fn client(url: &str, protection: ClientProtection, trusted: Vec<Vec<u8>>) -> CmpClient {
    cmp_client(cmp_config(url.to_owned(), protection, trusted))
}

fn pbm(secret: &str) -> ClientProtection {
    ClientProtection::Pbm {
        reference: b"mock-ref".to_vec(),
        secret: secret.as_bytes().to_vec().into(),
    }
}

async fn against_mock_server() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let hsm = hsm();
    let key: UserKeyRef = hsm
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
        .await
        .unwrap();
    let user_spki = key.public_key().as_der().to_vec();
    let ra_spki = hsm
        .system_public_key(SystemKey::CmpClient)
        .await
        .unwrap()
        .as_der()
        .to_vec();
    make_pki(work, &user_spki, &ra_spki);
    let root = cert_der(work, "root.pem");
    let ica = cert_der(work, "ica.pem");
    let c1 = cert_der(work, "c1.pem");
    let ra = cert_der(work, "ra.pem");
    let common = [
        "-srv_trusted",
        "root.pem",
        "-srv_untrusted",
        "ica.pem",
        "-rsp_cert",
        "c1.pem",
        "-rsp_extracerts",
        "ica.pem",
        "-rsp_capubs",
        "root.pem",
    ];
    let with_secret = |cert: &'static str, key: &'static str| {
        let mut args = vec![
            "-srv_ref",
            "mock-ref",
            "-srv_secret",
            "pass:mock-secret",
            "-mac",
            "hmacWithSHA256",
            "-srv_cert",
            cert,
            "-srv_key",
            key,
        ];
        args.extend(common);
        args
    };
    let signing = |cert: &'static str, key: &'static str| {
        let mut args = vec!["-srv_cert", cert, "-srv_key", key];
        args.extend(common);
        args
    };
    let pbm_server = mock_server(work, &with_secret("srv.pem", "srv.key"));
    let sig_server = mock_server(work, &signing("srv.pem", "srv.key"));
    let rogue_server = mock_server(work, &signing("rogue.pem", "rogue.key"));
    let ee_request = request(user_spki.clone(), Profile::Adult);

    // ir with PBM.
    let pbm_client = client(&pbm_server.url, pbm(SECRET), vec![root.clone()]);
    let pending = pbm_client.issue(&ee_request, &key).await.unwrap();
    let issued = pbm_client.confirm(pending, true).await.unwrap();
    assert_eq!(issued.der, c1);

    // rr with a reason, PBM.
    pbm_client.revoke(&c1, 4).await.unwrap();

    // ir with the RA key's signature; the response is signed by srv.pem (via ica to root).
    let ra_protection = || ClientProtection::Signature {
        certificate_der: ra.clone(),
        extra_certs_der: vec![ica.clone()],
    };
    let sig_client = client(&sig_server.url, ra_protection(), vec![root.clone()]);
    let pending = sig_client.issue(&ee_request, &key).await.unwrap();
    let issued = sig_client.confirm(pending, true).await.unwrap();
    assert_eq!(issued.der, c1);

    // Same-key kur, protected by c1's key.
    let pending = sig_client
        .rekey(&c1, &key, &ee_request, &key)
        .await
        .unwrap();
    let renewed = sig_client.confirm(pending, true).await.unwrap();
    assert_eq!(renewed.der, c1);

    // rr with a reason, RA signature.
    sig_client.revoke(&c1, 1).await.unwrap();

    // A response under another secret.
    let wrong = client(&pbm_server.url, pbm("not the secret"), vec![root.clone()]);
    let refused = wrong.issue(&ee_request, &key).await;
    assert!(
        matches!(refused, Err(CaError::Protection(_))),
        "{refused:?}"
    );

    // A response signed by a server certificate that does not chain to the trusted root.
    let rogue = client(&rogue_server.url, ra_protection(), vec![root.clone()]);
    let refused = rogue.issue(&ee_request, &key).await;
    assert!(
        matches!(refused, Err(CaError::Protection(_))),
        "{refused:?}"
    );
}
