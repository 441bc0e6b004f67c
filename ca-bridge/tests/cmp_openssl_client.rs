//! The embedded CA's CMP server driven by `openssl cmp` as the client: ir with PBM and a
//! software key, kur signed by that certificate's key, rr signed by the new one; a wrong secret
//! gets an error message and changes nothing.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unreachable_pub)] // shared test modules: `pub` for the binaries that use them
mod cmp_fixture;
#[allow(unreachable_pub)]
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::SystemTime;

use ca_bridge::CertificateState;
use ca_bridge::cmp::CmpServer;
use cmp_fixture::{open_ca, run, serve_cmp, server_config, verify_and_print};

const ADULT: &str = "1.3.6.1.4.1.99999.1.1";
const MINOR: &str = "1.3.6.1.4.1.99999.1.2";
const SUBJECT: &str = "/C=HK/O=smartsign test/SN=CHAN/CN=Tai Man CHAN";

/// `openssl cmp` with these arguments, off the async threads; returns its output, whatever
/// its exit status.
async fn openssl_cmp(dir: &Path, url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir)
        .args(["cmp", "-config", "", "-server", url])
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn genkey(dir: &Path, name: &str) {
    run(Command::new("openssl")
        .current_dir(dir)
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(name));
}

fn serial_of(dir: &Path, cert: &str) -> String {
    let out = run(Command::new("openssl")
        .current_dir(dir)
        .args(["x509", "-noout", "-serial", "-in", cert]));
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_ascii_lowercase()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "openssl cmp failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_client_enrolls_updates_and_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = open_ca(&ca_dir, ADULT, MINOR).await;
    let server = Arc::new(CmpServer::new(
        Arc::clone(&ca),
        server_config(&[("ra-1", "s3cret")]),
    ));
    let http = serve_cmp(server).await;
    let url = http.url("/cmp");
    let work = dir.path();
    std::fs::copy(ca_dir.join("root.pem"), work.join("root.pem")).unwrap();
    std::fs::copy(ca_dir.join("issuing.pem"), work.join("issuing.pem")).unwrap();
    genkey(work, "k1.pem");
    genkey(work, "k2.pem");

    // A wrong secret: an error message, nothing issued.
    let out = openssl_cmp(
        work,
        &url,
        &[
            "-cmd",
            "ir",
            "-ref",
            "ra-1",
            "-secret",
            "pass:wrong",
            "-mac",
            "hmacWithSHA256",
            "-newkey",
            "k1.pem",
            "-subject",
            SUBJECT,
            "-policy_oids",
            ADULT,
            "-trusted",
            "root.pem",
            "-certout",
            "bad.pem",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(!work.join("bad.pem").exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the MAC does not verify"),
        "{stdout}{stderr}"
    );

    // ir with PBM.
    let out = openssl_cmp(
        work,
        &url,
        &[
            "-cmd",
            "ir",
            "-ref",
            "ra-1",
            "-secret",
            "pass:s3cret",
            "-mac",
            "hmacWithSHA256",
            "-newkey",
            "k1.pem",
            "-subject",
            SUBJECT,
            "-policy_oids",
            MINOR,
            "-trusted",
            "root.pem",
            "-certout",
            "c1.pem",
        ],
    )
    .await;
    assert_ok(&out);
    let c1 = std::fs::read(work.join("c1.pem")).unwrap();
    let c1_der = der::pem::decode_vec(&c1).unwrap().1;
    let text = verify_and_print(&ca_dir, &c1_der);
    assert!(text.contains(&format!("Policy: {MINOR}")), "{text}");
    let serial1 = serial_of(work, "c1.pem");
    assert!(matches!(
        ca.status(&serial1).await.unwrap(),
        CertificateState::Good { .. }
    ));

    // kur signed with c1's key, new key k2; the response is signed by the issuing CA.
    let out = openssl_cmp(
        work,
        &url,
        &[
            "-cmd",
            "kur",
            "-cert",
            "c1.pem",
            "-key",
            "k1.pem",
            "-newkey",
            "k2.pem",
            "-trusted",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-certout",
            "c2.pem",
        ],
    )
    .await;
    assert_ok(&out);
    let c2 = std::fs::read(work.join("c2.pem")).unwrap();
    let c2_der = der::pem::decode_vec(&c2).unwrap().1;
    let text = verify_and_print(&ca_dir, &c2_der);
    assert!(text.contains(&format!("Policy: {MINOR}")), "{text}");
    assert!(text.contains("CN=Tai Man CHAN"), "{text}");
    let serial2 = serial_of(work, "c2.pem");
    assert_ne!(serial1, serial2);

    // An RA with a software key, certified by issue_ra_certificate: ir, and kur naming the old
    // certificate in oldCertID, both signed by the RA.
    genkey(work, "ra.key");
    genkey(work, "k3.pem");
    genkey(work, "k4.pem");
    let ra_spki = run(Command::new("openssl")
        .current_dir(work)
        .args(["pkey", "-pubout", "-outform", "DER", "-in", "ra.key"]))
    .stdout;
    let ra = ca
        .issue_ra_certificate(&ra_spki, "test RA", SystemTime::now())
        .await
        .unwrap();
    std::fs::write(work.join("ra.pem"), ra.to_pem()).unwrap();
    let text = verify_and_print(&ca_dir, &ra.der);
    assert!(
        text.contains("CMC Registration Authority") || text.contains("1.3.6.1.5.5.7.3.28"),
        "{text}"
    );
    let out = openssl_cmp(
        work,
        &url,
        &[
            "-cmd",
            "ir",
            "-cert",
            "ra.pem",
            "-key",
            "ra.key",
            "-newkey",
            "k3.pem",
            "-days",
            "30",
            "-subject",
            SUBJECT,
            "-policy_oids",
            ADULT,
            "-trusted",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-certout",
            "c3.pem",
        ],
    )
    .await;
    assert_ok(&out);
    let c3 = der::pem::decode_vec(&std::fs::read(work.join("c3.pem")).unwrap())
        .unwrap()
        .1;
    let text = verify_and_print(&ca_dir, &c3);
    // -days 30 travels as the template's OptionalValidity.
    let cert = <x509_cert::Certificate as der::Decode>::from_der(&c3).unwrap();
    let validity = &cert.tbs_certificate.validity;
    let days = validity
        .not_after
        .to_system_time()
        .duration_since(validity.not_before.to_system_time())
        .unwrap()
        .as_secs()
        / 86400;
    assert_eq!(days, 30);
    assert!(text.contains(&format!("Policy: {ADULT}")), "{text}");
    let out = openssl_cmp(
        work,
        &url,
        &[
            "-cmd",
            "kur",
            "-cert",
            "ra.pem",
            "-key",
            "ra.key",
            "-oldcert",
            "c3.pem",
            "-newkey",
            "k4.pem",
            "-policy_oids",
            ADULT,
            "-trusted",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-certout",
            "c4.pem",
        ],
    )
    .await;
    assert_ok(&out);
    let c4 = der::pem::decode_vec(&std::fs::read(work.join("c4.pem")).unwrap())
        .unwrap()
        .1;
    let text = verify_and_print(&ca_dir, &c4);
    assert!(text.contains(&format!("Policy: {ADULT}")), "{text}");
    assert!(text.contains("CN=Tai Man CHAN"), "{text}");

    // rr of c2, signed with c2's own key, reason keyCompromise (1).
    let out = openssl_cmp(
        work,
        &url,
        &[
            "-cmd",
            "rr",
            "-cert",
            "c2.pem",
            "-key",
            "k2.pem",
            "-oldcert",
            "c2.pem",
            "-revreason",
            "1",
            "-trusted",
            "root.pem",
            "-untrusted",
            "issuing.pem",
        ],
    )
    .await;
    assert_ok(&out);
    assert!(matches!(
        ca.status(&serial2).await.unwrap(),
        CertificateState::Revoked { reason_code: 1, .. }
    ));
    assert!(matches!(
        ca.status(&serial1).await.unwrap(),
        CertificateState::Good { .. }
    ));

    // openssl rejects a certificate it cannot verify (-out_trusted names another root) in its
    // certConf: the CA revokes it (cessationOfOperation) and still answers pkiConf.
    run(Command::new("openssl").current_dir(work).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.pem",
        "-subj",
        "/CN=Other Root",
        "-days",
        "2",
    ]));
    let before = ca.revocations().await.unwrap().len();
    let out = openssl_cmp(
        work,
        &url,
        &[
            "-cmd",
            "ir",
            "-ref",
            "ra-1",
            "-secret",
            "pass:s3cret",
            "-newkey",
            "k1.pem",
            "-subject",
            SUBJECT,
            "-policy_oids",
            ADULT,
            "-out_trusted",
            "other.pem",
            "-certout",
            "rejected.pem",
        ],
    )
    .await;
    assert!(!out.status.success());
    let revocations = ca.revocations().await.unwrap();
    assert_eq!(
        revocations.len(),
        before + 1,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(revocations.iter().any(|r| r.reason_code == 5));
}
