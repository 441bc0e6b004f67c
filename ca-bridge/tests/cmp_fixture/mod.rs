//! What the CMP tests share: a SoftHSM token with the system keys, the embedded CA, its CMP
//! server behind the loopback test server, and openssl helpers.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ca_bridge::cmp::{CmpServer, CmpServerConfig};
use ca_bridge::transport::CMP_CONTENT_TYPE;
use ca_bridge::{CaProfileConfig, EmbeddedCa, IssueRequest, Profile};
use hsm_adapter::{Hsm, HsmConfig, TokenSelector};
use secrecy::SecretString;

use crate::support::{self, TestServer};

pub const ORGANISATION: &str = "smartsign test";
pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// This process's token with its system keys provisioned (as in tests/embedded_ca.rs).
pub fn hsm() -> Arc<Hsm> {
    static HSM: OnceLock<Arc<Hsm>> = OnceLock::new();
    HSM.get_or_init(|| {
        let conf = PathBuf::from(std::env::var_os("SOFTHSM2_CONF").expect("SOFTHSM2_CONF"));
        let dir = conf.parent().unwrap().to_path_buf();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let label = format!("cmp{}-{nanos}", std::process::id());
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

/// The embedded CA in `dir`, with these policy OIDs.
pub async fn open_ca(dir: &Path, adult: &str, minor: &str) -> Arc<EmbeddedCa> {
    let mut config = CaProfileConfig::new(
        ORGANISATION,
        "http://127.0.0.1:8090/ocsp",
        "http://127.0.0.1:8090/crl/issuing.crl",
    );
    config.adult_policy_oid = adult.into();
    config.minor_policy_oid = minor.into();
    Arc::new(
        EmbeddedCa::open(hsm(), dir, config, SystemTime::now())
            .await
            .unwrap(),
    )
}

/// `CmpServer::handle` behind the loopback test server (any path).
pub async fn serve_cmp(server: Arc<CmpServer>) -> TestServer {
    support::serve(move |_method, _path, body| {
        let server = Arc::clone(&server);
        async move {
            let answer = server.handle(&body, SystemTime::now()).await;
            (200, CMP_CONTENT_TYPE.to_owned(), answer)
        }
    })
    .await
}

pub fn server_config(pbm: &[(&str, &str)]) -> CmpServerConfig {
    CmpServerConfig {
        pbm_secrets: pbm
            .iter()
            .map(|(reference, secret)| {
                (
                    reference.as_bytes().to_vec(),
                    secret.as_bytes().to_vec().into(),
                )
            })
            .collect(),
        default_validity: 365 * DAY,
    }
}

pub fn request(spki: Vec<u8>, profile: Profile) -> IssueRequest {
    let now = SystemTime::now();
    IssueRequest {
        surname: "CHAN".into(),
        given_name: Some("Tai Man".into()),
        hkic_hash_hex: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        public_key_spki_der: spki,
        profile,
        not_before: now,
        not_after: now + 365 * DAY,
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run openssl");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn pem(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap()
}

/// Checks `der` with `openssl verify` against the CA's files; returns `openssl x509 -text`.
pub fn verify_and_print(ca_dir: &Path, der: &[u8]) -> String {
    let ee = ca_dir.join("ee.pem");
    std::fs::write(&ee, pem(der)).unwrap();
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
