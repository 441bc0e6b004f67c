//! The embedded CA's CMP server driven by `openssl cmp` as the client: ir with PBM and a
//! software key, kur signed by that certificate's key, rr signed by the new one; a wrong secret
//! gets an error message and changes nothing.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::SystemTime;

use ca_bridge::cmp::CmpServer;
use ca_bridge::{CaProfileConfig, CertificateState};
use common::{
    P256, assert_good, ca_config, cert_der, genkey, openssl_in, serial_of, serve_cmp,
    server_config, spki_of, try_open_ca, verify_and_print,
};

const ADULT: &str = "1.3.6.1.4.1.99999.1.1";
const MINOR: &str = "1.3.6.1.4.1.99999.1.2";
const SUBJECT: &str = "/C=HK/O=smartsign test/SN=CHAN/CN=Tai Man CHAN";
/// The trust arguments of a signed exchange: the root, and the issuing CA that signs.
const TRUST: [&str; 4] = ["-trusted", "root.pem", "-untrusted", "issuing.pem"];

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

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "openssl cmp failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The arguments of an ir for the key k1.pem and `policy`, protected by `protection`, the
/// response checked against root.pem.
fn ir<'a>(protection: &[&'a str], policy: &'a str) -> Vec<&'a str> {
    let mut args = vec!["-cmd", "ir"];
    args.extend_from_slice(protection);
    args.extend([
        "-mac",
        "hmacWithSHA256",
        "-newkey",
        "k1.pem",
        "-subject",
        SUBJECT,
    ]);
    args.extend(["-policy_oids", policy, "-trusted", "root.pem"]);
    args
}

/// `openssl cmp` with `args` and `-certout certout` succeeds; the certificate verifies against
/// the CA in `ca_dir` and names `policy`. Returns its DER and `openssl x509 -text`.
async fn enrol(
    work: &Path,
    url: &str,
    ca_dir: &Path,
    args: &[&str],
    certout: &str,
    policy: &str,
) -> (Vec<u8>, String) {
    let mut args = args.to_vec();
    args.extend(["-certout", certout]);
    assert_ok(&openssl_cmp(work, url, &args).await);
    let der = cert_der(work, certout);
    let text = verify_and_print(ca_dir, &der);
    assert!(text.contains(&format!("Policy: {policy}")), "{text}");
    (der, text)
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_client_enrolls_updates_and_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let config = CaProfileConfig {
        adult_policy_oid: ADULT.into(),
        minor_policy_oid: MINOR.into(),
        ..ca_config()
    };
    let ca = Arc::new(try_open_ca(&ca_dir, config).await.unwrap());
    let server = Arc::new(CmpServer::new(
        Arc::clone(&ca),
        server_config(&[("ra-1", "s3cret")]),
    ));
    let http = serve_cmp(server).await;
    let url = http.url("/cmp");
    let work = dir.path();
    std::fs::copy(ca_dir.join("root.pem"), work.join("root.pem")).unwrap();
    std::fs::copy(ca_dir.join("issuing.pem"), work.join("issuing.pem")).unwrap();
    genkey(work, "k1.pem", P256);
    genkey(work, "k2.pem", P256);
    // PBM under reference ra-1.
    let wrong = ["-ref", "ra-1", "-secret", "pass:wrong"];
    let good = ["-ref", "ra-1", "-secret", "pass:s3cret"];

    // A wrong secret: an error message, nothing issued. The sender is not authenticated, so
    // the error is unprotected (no HSM work for an unknown sender): openssl refuses it as such
    // unless told to read unprotected errors, and then shows its text.
    let mut args = ir(&wrong, ADULT);
    args.extend(["-certout", "bad.pem"]);
    let out = openssl_cmp(work, &url, &args).await;
    assert!(!out.status.success());
    assert!(!work.join("bad.pem").exists());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("missing protection"), "{said}");
    args.push("-unprotected_errors");
    let out = openssl_cmp(work, &url, &args).await;
    assert!(!out.status.success());
    assert!(!work.join("bad.pem").exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the MAC does not verify") || stderr.contains("the MAC does not verify"),
        "{stdout}{stderr}"
    );

    // ir with PBM.
    enrol(work, &url, &ca_dir, &ir(&good, MINOR), "c1.pem", MINOR).await;
    let serial1 = serial_of(work, "c1.pem");
    assert_good(&ca, &serial1).await;

    // kur signed with c1's key, new key k2; the response is signed by the issuing CA.
    let mut args = vec![
        "-cmd", "kur", "-cert", "c1.pem", "-key", "k1.pem", "-newkey", "k2.pem",
    ];
    args.extend(TRUST);
    let (_, text) = enrol(work, &url, &ca_dir, &args, "c2.pem", MINOR).await;
    assert!(text.contains("CN=Tai Man CHAN"), "{text}");
    let serial2 = serial_of(work, "c2.pem");
    assert_ne!(serial1, serial2);

    // An RA with a software key, certified by issue_ra_certificate: ir, and kur naming the old
    // certificate in oldCertID, both signed by the RA.
    genkey(work, "ra.key", P256);
    genkey(work, "k3.pem", P256);
    genkey(work, "k4.pem", P256);
    let ra = ca
        .issue_ra_certificate(&spki_of(work, "ra.key"), "test RA", SystemTime::now())
        .await
        .unwrap();
    std::fs::write(work.join("ra.pem"), ra.to_pem()).unwrap();
    let text = verify_and_print(&ca_dir, &ra.der);
    assert!(
        text.contains("CMC Registration Authority") || text.contains("1.3.6.1.5.5.7.3.28"),
        "{text}"
    );
    let by_ra = ["-cert", "ra.pem", "-key", "ra.key"];
    let mut args = vec!["-cmd", "ir"];
    args.extend(by_ra);
    args.extend(["-newkey", "k3.pem", "-days", "30", "-subject", SUBJECT]);
    args.extend(["-policy_oids", ADULT]);
    args.extend(TRUST);
    let (c3, _) = enrol(work, &url, &ca_dir, &args, "c3.pem", ADULT).await;
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
    let mut args = vec!["-cmd", "kur"];
    args.extend(by_ra);
    args.extend([
        "-oldcert",
        "c3.pem",
        "-newkey",
        "k4.pem",
        "-policy_oids",
        ADULT,
    ]);
    args.extend(TRUST);
    let (_, text) = enrol(work, &url, &ca_dir, &args, "c4.pem", ADULT).await;
    assert!(text.contains("CN=Tai Man CHAN"), "{text}");

    // rr of c2, signed with c2's own key, reason keyCompromise (1).
    let mut args = vec!["-cmd", "rr", "-cert", "c2.pem", "-key", "k2.pem"];
    args.extend(["-oldcert", "c2.pem", "-revreason", "1"]);
    args.extend(TRUST);
    assert_ok(&openssl_cmp(work, &url, &args).await);
    assert!(matches!(
        ca.status(&serial2).await.unwrap(),
        CertificateState::Revoked { reason_code: 1, .. }
    ));
    assert_good(&ca, &serial1).await;

    // openssl rejects a certificate it cannot verify (-out_trusted names another root) in its
    // certConf: the CA revokes it (cessationOfOperation) and still answers pkiConf.
    openssl_in(
        work,
        &[
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
        ],
    );
    let before = ca.revocations().await.unwrap().len();
    let mut args = vec!["-cmd", "ir"];
    args.extend(good);
    args.extend([
        "-newkey",
        "k1.pem",
        "-subject",
        SUBJECT,
        "-policy_oids",
        ADULT,
    ]);
    args.extend(["-out_trusted", "other.pem", "-certout", "rejected.pem"]);
    let out = openssl_cmp(work, &url, &args).await;
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
