//! The embedded CA on a SoftHSM token, checked with openssl: the chain verifies, the extensions
//! of the profile are there, state survives a reopen, revocation is recorded.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ca_bridge::{
    CaError, CaProfileConfig, CertificateState, DEFAULT_ADULT_POLICY_OID, DEFAULT_MINOR_POLICY_OID,
    EmbeddedCa, IssueRequest, Profile,
};
use hsm_adapter::{Hsm, HsmConfig, TokenSelector};
use secrecy::SecretString;

const OCSP_URL: &str = "http://127.0.0.1:8090/ocsp";
const CRL_URL: &str = "http://127.0.0.1:8090/crl/issuing.crl";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// This process's token with its system keys provisioned (the pattern of
/// hsm-adapter/tests/common: `softhsm-setup token` under `SOFTHSM2_CONF`'s directory).
fn hsm() -> Arc<Hsm> {
    static HSM: OnceLock<Arc<Hsm>> = OnceLock::new();
    HSM.get_or_init(|| {
        let conf = PathBuf::from(std::env::var_os("SOFTHSM2_CONF").expect("SOFTHSM2_CONF"));
        let dir = conf.parent().unwrap().to_path_buf();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let label = format!("ca{}-{nanos}", std::process::id());
        let pins = dir.join("pins");
        std::fs::create_dir_all(&pins).unwrap();
        let pin_file = pins.join(format!("{label}.pin"));
        let so_pin_file = pins.join(format!("{label}.so-pin"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-config/softhsm-setup");
        let status = Command::new(&script)
            .args(["token", "--dir"])
            .arg(&dir)
            .args(["--label", &label, "--so-pin-file"])
            .arg(&so_pin_file)
            .arg("--pin-file")
            .arg(&pin_file)
            .status()
            .unwrap();
        assert!(status.success(), "softhsm-setup token");
        let module = Command::new(&script).arg("module").output().unwrap();
        let module = PathBuf::from(String::from_utf8(module.stdout).unwrap().trim());
        let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
        let config = HsmConfig::new(
            &module,
            TokenSelector::Label(label),
            SecretString::from(read(&pin_file)),
        );
        let so_pin = SecretString::from(read(&so_pin_file));
        // Opened on a runtime of its own: the fixture is shared by the tests' runtimes.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let hsm = Hsm::open(config).await.unwrap();
                hsm.provision_system_keys(&so_pin).await.unwrap();
                Arc::new(hsm)
            })
        })
        .join()
        .unwrap()
    })
    .clone()
}

fn config() -> CaProfileConfig {
    CaProfileConfig::new("smartsign test", OCSP_URL, CRL_URL)
}

async fn open(dir: &Path) -> Result<EmbeddedCa, CaError> {
    EmbeddedCa::open(hsm(), dir, config(), SystemTime::now()).await
}

/// A subject public key made by openssl, as SPKI DER.
fn openssl_key(dir: &Path, algorithm: &[&str]) -> Vec<u8> {
    let key = dir.join("subject.key");
    run(Command::new("openssl")
        .arg("genpkey")
        .args(algorithm)
        .arg("-out")
        .arg(&key));
    let out = run(Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key));
    out.stdout
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run openssl");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn request(spki: Vec<u8>, profile: Profile, given_name: Option<&str>) -> IssueRequest {
    let now = SystemTime::now();
    IssueRequest {
        surname: "CHAN".into(),
        given_name: given_name.map(str::to_owned),
        hkic_hash_hex: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        public_key_spki_der: spki,
        profile,
        not_before: now - Duration::from_secs(60),
        not_after: now + 3 * 365 * DAY,
    }
}

/// Writes the certificate beside the CA files and checks it with `openssl verify`; returns the
/// `openssl x509 -text` output.
fn verify_and_print(ca_dir: &Path, pem: &str) -> String {
    let ee = ca_dir.join("ee.pem");
    std::fs::write(&ee, pem).unwrap();
    let out = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca_dir.join("root.pem"))
        .arg("-untrusted")
        .arg(ca_dir.join("issuing.pem"))
        .arg(&ee));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-nameopt", "RFC2253", "-in"])
        .arg(&ee));
    String::from_utf8(out.stdout).unwrap()
}

fn assert_contains(text: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(text.contains(w), "missing {w:?} in\n{text}");
    }
}

#[tokio::test]
async fn issues_p256_and_rsa_certificates_that_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open(dir.path()).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("root.pem")).unwrap(),
        ca.root_pem()
    );
    assert_eq!(
        ca.chain_der(),
        vec![ca.issuing_der().to_vec(), ca.root_der().to_vec()]
    );

    let spki = openssl_key(
        dir.path(),
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let issued = ca
        .issue(request(spki, Profile::Adult, Some("Tai Man")))
        .await
        .unwrap();
    assert_eq!(issued.serial_hex.len(), 32);
    assert!(!issued.serial_hex.starts_with('0'));
    let text = verify_and_print(dir.path(), &issued.to_pem());
    let serial_colons = issued
        .serial_hex
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    assert_contains(
        &text,
        &[
            &serial_colons,
            "Signature Algorithm: ecdsa-with-SHA256",
            "Issuer: CN=smartsign test Issuing CA,O=smartsign test,C=HK",
            "serialNumber=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "GN=Tai Man",
            "SN=CHAN",
            "CN=Tai Man CHAN",
            "O=smartsign test",
            "C=HK",
            "X509v3 Basic Constraints: critical",
            "CA:FALSE",
            "X509v3 Key Usage: critical",
            "Digital Signature, Non Repudiation",
            "X509v3 Certificate Policies:",
            &format!("Policy: {DEFAULT_ADULT_POLICY_OID}"),
            "Authority Information Access:",
            &format!("OCSP - URI:{OCSP_URL}"),
            "X509v3 CRL Distribution Points:",
            &format!("URI:{CRL_URL}"),
            "X509v3 Subject Key Identifier:",
            "X509v3 Authority Key Identifier:",
            "Public Key Algorithm: id-ecPublicKey",
        ],
    );
    assert!(!text.contains(DEFAULT_MINOR_POLICY_OID));

    let spki = openssl_key(
        dir.path(),
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let issued = ca.issue(request(spki, Profile::Minor, None)).await.unwrap();
    let text = verify_and_print(dir.path(), &issued.to_pem());
    assert_contains(
        &text,
        &[
            "Public Key Algorithm: rsaEncryption",
            "Public-Key: (2048 bit)",
            "CN=CHAN",
            &format!("Policy: {DEFAULT_MINOR_POLICY_OID}"),
        ],
    );
    assert!(!text.contains("GN="));
    assert!(!text.contains(DEFAULT_ADULT_POLICY_OID));
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Good { .. }
    ));
}

#[tokio::test]
async fn ca_certificates_have_the_ca_profile() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open(dir.path()).await.unwrap();
    let print = |file: &str| {
        let out = run(Command::new("openssl")
            .args(["x509", "-noout", "-text", "-nameopt", "RFC2253", "-in"])
            .arg(dir.path().join(file)));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_contains(
        &print("root.pem"),
        &[
            "Signature Algorithm: ecdsa-with-SHA384",
            "Subject: CN=smartsign test Root CA,O=smartsign test,C=HK",
            "Issuer: CN=smartsign test Root CA,O=smartsign test,C=HK",
            "NIST CURVE: P-384",
            "CA:TRUE",
            "Certificate Sign, CRL Sign",
        ],
    );
    assert_contains(
        &print("issuing.pem"),
        &[
            "Signature Algorithm: ecdsa-with-SHA384",
            "Subject: CN=smartsign test Issuing CA,O=smartsign test,C=HK",
            "NIST CURVE: P-256",
            "CA:TRUE, pathlen:0",
            "Digital Signature, Certificate Sign, CRL Sign",
            "X509v3 Authority Key Identifier:",
        ],
    );
    // The issuing CA verifies against the root.
    run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.path().join("root.pem"))
        .arg(dir.path().join("issuing.pem")));
    assert_eq!(ca.chain_pem().len(), 2);
}

#[tokio::test]
async fn reopening_reuses_the_ca_and_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path()).await.unwrap();
    let spki = openssl_key(
        dir.path(),
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let issued = first
        .issue(request(spki, Profile::Adult, None))
        .await
        .unwrap();
    let revoked_at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    first
        .revoke(&issued.serial_hex.to_uppercase(), 4, revoked_at)
        .await
        .unwrap();
    drop(first);

    let again = open(dir.path()).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("root.pem")).unwrap(),
        again.root_pem()
    );
    verify_and_print(dir.path(), &issued.to_pem());
    assert_eq!(
        again
            .status(&format!("00{}", issued.serial_hex))
            .await
            .unwrap(),
        CertificateState::Revoked {
            revoked_at,
            reason_code: 4
        }
    );
    let list = again.revocations().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].serial_hex, issued.serial_hex);

    // A lost issuing certificate is made again from the root.
    std::fs::remove_file(dir.path().join("issuing.pem")).unwrap();
    let third = open(dir.path()).await.unwrap();
    assert_eq!(third.root_pem(), again.root_pem());
    assert_ne!(third.issuing_pem(), again.issuing_pem());
    run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.path().join("root.pem"))
        .arg(dir.path().join("issuing.pem")));
}

#[tokio::test]
async fn revocation_checks_serial_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open(dir.path()).await.unwrap();
    let now = SystemTime::now();
    assert!(matches!(
        ca.revoke("4f00aa", 1, now).await,
        Err(CaError::UnknownSerial)
    ));
    assert!(matches!(
        ca.revoke("4f00aa", 7, now).await,
        Err(CaError::InvalidReason(7))
    ));
    assert!(matches!(
        ca.revoke("zz", 1, now).await,
        Err(CaError::InvalidRequest(_))
    ));
    assert_eq!(
        ca.status("4f00aa").await.unwrap(),
        CertificateState::Unknown
    );

    let spki = openssl_key(
        dir.path(),
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let issued = ca.issue(request(spki, Profile::Minor, None)).await.unwrap();
    assert!(matches!(
        ca.status(&issued.serial_hex).await.unwrap(),
        CertificateState::Good { .. }
    ));
    ca.revoke(&issued.serial_hex, 9, now).await.unwrap();
    // Revoking again keeps the first reason.
    ca.revoke(&issued.serial_hex, 1, now + DAY).await.unwrap();
    match ca.status(&issued.serial_hex).await.unwrap() {
        CertificateState::Revoked { reason_code, .. } => assert_eq!(reason_code, 9),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = open(dir.path()).await.unwrap();
    let spki = openssl_key(
        dir.path(),
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );

    let mut outlives = request(spki.clone(), Profile::Adult, None);
    outlives.not_after = SystemTime::now() + 100 * 365 * DAY;
    assert!(matches!(
        ca.issue(outlives).await,
        Err(CaError::OutsideCaValidity)
    ));

    let mut backwards = request(spki.clone(), Profile::Adult, None);
    backwards.not_after = backwards.not_before;
    assert!(matches!(
        ca.issue(backwards).await,
        Err(CaError::InvalidRequest(_))
    ));

    let mut no_surname = request(spki.clone(), Profile::Adult, None);
    no_surname.surname = " ".into();
    assert!(matches!(
        ca.issue(no_surname).await,
        Err(CaError::InvalidRequest(_))
    ));

    let mut bad_hash = request(spki.clone(), Profile::Adult, None);
    bad_hash.hkic_hash_hex = "A1234563".into();
    assert!(matches!(
        ca.issue(bad_hash).await,
        Err(CaError::InvalidRequest(_))
    ));

    let mut not_a_key = request(spki, Profile::Adult, None);
    not_a_key.public_key_spki_der = vec![0x30, 0x00];
    assert!(matches!(
        ca.issue(not_a_key).await,
        Err(CaError::InvalidRequest(_))
    ));
    assert!(ca.revocations().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_root_for_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ca_bridge::dev_pki::DevPki::ensure(dir.path()).unwrap();
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::copy(&pki.ca_cert, ca_dir.join("root.pem")).unwrap();
    assert!(matches!(
        open(&ca_dir).await,
        Err(CaError::KeyMismatch {
            file: "root.pem",
            ..
        })
    ));
}
