//! What the ca-bridge test binaries share: the SoftHSM token with the system keys, the embedded
//! CA in a temporary directory, a loopback HTTP server for its protocol handlers, and openssl
//! (running it, keys, certificates, an `openssl ca` PKI).

// Each test binary uses its own part of this module; its items are `pub` for those binaries.
#![allow(dead_code, unreachable_pub)]

mod http;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ca_bridge::cmp::{ClientProtection, CmpClient, CmpClientConfig, CmpServer, CmpServerConfig};
use ca_bridge::transport::{
    CMP_CONTENT_TYPE, CRL_CONTENT_TYPE, HttpTransport, OCSP_RESPONSE_CONTENT_TYPE,
};
use ca_bridge::{
    CaError, CaProfileConfig, CertificateState, DEFAULT_ADULT_POLICY_OID, DEFAULT_MINOR_POLICY_OID,
    EmbeddedCa, IssueRequest, IssuedCertificate, Profile,
};
use hsm_adapter::{Hsm, HsmConfig, TokenSelector};
use secrecy::SecretString;

pub use http::{Answer, TestServer, serve};

pub const HOUR: Duration = Duration::from_secs(3600);
pub const DAY: Duration = Duration::from_secs(24 * 3600);
/// The organisation of the test CA's profile.
pub const ORGANISATION: &str = "smartsign test";
/// The test CA's OCSP and CRL URLs (in its certificates; nothing listens there).
pub const OCSP_URL: &str = "http://127.0.0.1:1/ocsp";
pub const CRL_URL: &str = "http://127.0.0.1:1/crl";
/// `openssl genpkey` options for an EC P-256 key.
pub const P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];

/// Runs `cmd`, failing the test with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` and returns its exit success and stdout + stderr.
pub fn run_any(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run a command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn openssl() -> Command {
    Command::new("openssl")
}

/// `openssl args` in `dir`, which must succeed.
pub fn openssl_in(dir: &Path, args: &[&str]) -> Output {
    run(openssl().current_dir(dir).args(args))
}

/// A fresh `openssl genpkey` key with `algorithm` options (e.g. [`P256`]) in `dir/file`.
pub fn genkey(dir: &Path, file: &str, algorithm: &[&str]) {
    let mut args = vec!["genpkey", "-out", file];
    args.extend_from_slice(algorithm);
    openssl_in(dir, &args);
}

/// The public key of the key file `dir/file`, as SPKI DER.
pub fn spki_of(dir: &Path, file: &str) -> Vec<u8> {
    openssl_in(dir, &["pkey", "-pubout", "-outform", "DER", "-in", file]).stdout
}

/// The certificate in the PEM file `dir/file`, as DER.
pub fn cert_der(dir: &Path, file: &str) -> Vec<u8> {
    der::pem::decode_vec(&std::fs::read(dir.join(file)).unwrap())
        .unwrap()
        .1
}

/// The serial of the certificate `dir/file`, lowercase hex without leading zeros.
pub fn serial_of(dir: &Path, file: &str) -> String {
    let out = openssl_in(dir, &["x509", "-noout", "-serial", "-in", file]);
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_ascii_lowercase()
}

/// `openssl x509 -text` of the certificate file `cert`.
pub fn x509_text(cert: &Path) -> String {
    let out = run(openssl()
        .args(["x509", "-noout", "-text", "-nameopt", "RFC2253", "-in"])
        .arg(cert));
    String::from_utf8(out.stdout).unwrap()
}

/// `openssl verify` of `cert` against the embedded CA's root in `ca_dir`, its issuing CA as
/// untrusted.
pub fn verify_with_ca(ca_dir: &Path, cert: &Path) {
    let out = run(openssl()
        .arg("verify")
        .arg("-CAfile")
        .arg(ca_dir.join("root.pem"))
        .arg("-untrusted")
        .arg(ca_dir.join("issuing.pem"))
        .arg(cert));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
}

/// Checks `der` with `openssl verify` against the CA's files; returns `openssl x509 -text`.
pub fn verify_and_print(ca_dir: &Path, der: &[u8]) -> String {
    let ee = ca_dir.join("ee.pem");
    let pem = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap();
    std::fs::write(&ee, pem).unwrap();
    verify_with_ca(ca_dir, &ee);
    x509_text(&ee)
}

pub fn assert_contains(text: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(text.contains(w), "missing {w:?} in\n{text}");
    }
}

/// Runs `body` in a network namespace of its own with only loopback up (for openssl servers,
/// which listen on every interface): the test binary re-runs the test `test_name` under
/// `unshare -n` and checks that it passed there.
pub fn in_network_namespace(test_name: &str, body: impl FnOnce()) {
    const IN_NAMESPACE: &str = "CA_BRIDGE_TEST_IN_NETNS";
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return body();
    }
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .output()
        .expect("run unshare (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "the test in the network namespace failed:\n{text}"
    );
}

/// A server process (an openssl responder); killed (by its own pid) when dropped.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration [`hsm`] opened its token with.
static CONFIG: OnceLock<HsmConfig> = OnceLock::new();

/// Another `Hsm` on this process's token (its keys provisioned by [`hsm`]), with the
/// configuration `adjust` makes of the fixture's.
pub async fn another_hsm(adjust: impl FnOnce(HsmConfig) -> HsmConfig) -> Arc<Hsm> {
    let _ = hsm();
    let config = adjust(CONFIG.get().unwrap().clone());
    Arc::new(Hsm::open(config).await.unwrap())
}

/// This process's token with its system keys provisioned (the pattern of
/// hsm-adapter/tests/common: `softhsm-setup token` under `SOFTHSM2_CONF`'s directory).
pub fn hsm() -> Arc<Hsm> {
    static HSM: OnceLock<Arc<Hsm>> = OnceLock::new();
    HSM.get_or_init(|| {
        let conf = PathBuf::from(std::env::var_os("SOFTHSM2_CONF").expect("SOFTHSM2_CONF"));
        let dir = conf.parent().unwrap().to_path_buf();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let label = format!("cab{}-{nanos}", std::process::id());
        let pins = dir.join("pins");
        std::fs::create_dir_all(&pins).unwrap();
        let pin_file = pins.join(format!("{label}.pin"));
        let so_pin_file = pins.join(format!("{label}.so-pin"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-config/softhsm-setup");
        run(Command::new(&script)
            .args(["token", "--dir"])
            .arg(&dir)
            .args(["--label", &label, "--so-pin-file"])
            .arg(&so_pin_file)
            .arg("--pin-file")
            .arg(&pin_file));
        let module = run(Command::new(&script).arg("module"));
        let module = PathBuf::from(String::from_utf8(module.stdout).unwrap().trim());
        let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
        let config = HsmConfig::new(
            &module,
            TokenSelector::Label(label),
            SecretString::from(read(&pin_file)),
        );
        let so_pin = SecretString::from(read(&so_pin_file));
        let _ = CONFIG.set(config.clone());
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

/// The test CA's profile: [`ORGANISATION`], [`OCSP_URL`], [`CRL_URL`], the default policies.
pub fn ca_config() -> CaProfileConfig {
    CaProfileConfig::new(ORGANISATION, OCSP_URL, CRL_URL)
}

/// Opens the embedded CA in `dir` with `config`, on this process's token.
pub async fn try_open_ca(dir: &Path, config: CaProfileConfig) -> Result<EmbeddedCa, CaError> {
    EmbeddedCa::open(hsm(), dir, config, SystemTime::now()).await
}

/// The embedded CA in `dir` with the test profile ([`ca_config`]).
pub async fn open_ca(dir: &Path) -> Arc<EmbeddedCa> {
    Arc::new(try_open_ca(dir, ca_config()).await.unwrap())
}

/// A request for an adult or minor certificate for "Tai Man CHAN", valid for a year.
pub fn request(spki: Vec<u8>, profile: Profile) -> IssueRequest {
    let now = SystemTime::now();
    IssueRequest {
        surname: "CHAN".into(),
        given_name: Some("Tai Man".into()),
        hkic_hash_hex: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        public_key_spki_der: spki,
        profile,
        not_before: now - Duration::from_secs(60),
        not_after: now + 365 * DAY,
    }
}

/// Issues an adult certificate for a fresh openssl P-256 key `dir/name.key`; writes it to
/// `dir/name`.
pub async fn issue(ca: &EmbeddedCa, dir: &Path, name: &str) -> IssuedCertificate {
    let key = format!("{name}.key");
    genkey(dir, &key, P256);
    let issued = ca
        .issue(request(spki_of(dir, &key), Profile::Adult))
        .await
        .unwrap();
    std::fs::write(dir.join(name), issued.to_pem()).unwrap();
    issued
}

/// The embedded CA's OCSP and CRL endpoints as the tests serve them: OCSP responses (valid for
/// an hour) to POST /ocsp and GET /ocsp/<base64 request>, the CRL (valid for a day) on GET /crl
/// (500 when it cannot be made); 404 elsewhere.
pub async fn ca_endpoints(ca: &EmbeddedCa, method: &str, path: &str, body: &[u8]) -> Answer {
    match (method, path) {
        ("POST", "/ocsp") => (
            200,
            OCSP_RESPONSE_CONTENT_TYPE.to_owned(),
            ca.ocsp_response(body, SystemTime::now(), HOUR).await,
        ),
        ("GET", path) if path.starts_with("/ocsp/") => {
            let body = match ca_bridge::ocsp::request_from_get_path(&path[6..]) {
                Ok(der) => ca.ocsp_response(&der, SystemTime::now(), HOUR).await,
                Err(_) => ca.ocsp_response(b"", SystemTime::now(), HOUR).await,
            };
            (200, OCSP_RESPONSE_CONTENT_TYPE.to_owned(), body)
        }
        ("GET", "/crl") => match ca.crl(SystemTime::now(), 24 * HOUR).await {
            Ok(crl) => (200, CRL_CONTENT_TYPE.to_owned(), crl),
            Err(_) => (500, "text/plain".to_owned(), Vec::new()),
        },
        _ => (404, "text/plain".to_owned(), Vec::new()),
    }
}

/// `CmpServer::handle` behind the loopback test server (any path).
pub async fn serve_cmp(server: Arc<CmpServer>) -> TestServer {
    serve(move |_method, _path, body| {
        let server = Arc::clone(&server);
        async move {
            let answer = server.handle(&body, SystemTime::now()).await;
            (200, CMP_CONTENT_TYPE.to_owned(), answer)
        }
    })
    .await
}

/// A CMP server configuration with these PBM (reference, secret) pairs.
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

/// An `openssl ca` PKI: root, issuing CA `ica` (with its index.txt), all EC P-256. The
/// extension sections of its `ca.cnf`: `ca_ext`, `ee_ext`, `ocsp_ext`, `signer_ext` (an end
/// entity that signs, with SKI and AKI).
pub struct OpensslPki {
    pub dir: PathBuf,
}

impl OpensslPki {
    /// Makes root.pem/root.key and ica.pem/ica.key in `dir`, with a `ca.cnf` for `openssl ca`.
    pub fn new(dir: &Path) -> OpensslPki {
        let pki = OpensslPki {
            dir: dir.to_path_buf(),
        };
        std::fs::create_dir_all(dir.join("newcerts")).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "1000\n").unwrap();
        std::fs::write(dir.join("crlnumber"), "01\n").unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            format!(
                "[ ca ]\ndefault_ca = ica\n\
                 [ ica ]\ndir = {dir}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/newcerts\n\
                 certificate = $dir/ica.pem\nprivate_key = $dir/ica.key\nserial = $dir/serial\n\
                 crlnumber = $dir/crlnumber\ndefault_md = sha256\ndefault_days = 30\n\
                 default_crl_days = 7\npolicy = any\nunique_subject = no\n\
                 [ any ]\ncommonName = supplied\n\
                 [ ee_ext ]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
                 [ signer_ext ]\nbasicConstraints = critical,CA:FALSE\n\
                 keyUsage = critical,digitalSignature\nsubjectKeyIdentifier = hash\n\
                 authorityKeyIdentifier = keyid\n\
                 [ ocsp_ext ]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
                 extendedKeyUsage = OCSPSigning\n\
                 [ ca_ext ]\nbasicConstraints = critical,CA:TRUE\n\
                 keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
                 authorityKeyIdentifier = keyid\n\
                 [ req ]\ndistinguished_name = dn\n[ dn ]\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        pki.self_signed("root", "/CN=Test Root", "ca_ext");
        pki.issue_by("ica", "/CN=Test Issuing CA", "root", "ca_ext");
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn der(&self, name: &str) -> Vec<u8> {
        cert_der(&self.dir, name)
    }

    pub fn key(&self, name: &str) {
        genkey(&self.dir, &format!("{name}.key"), P256);
    }

    /// A fresh key `name.key` and a request `name.csr` for `subject` (`/CN=...`).
    fn key_and_csr(&self, name: &str, subject: &str) {
        self.key(name);
        openssl_in(
            &self.dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                subject,
                "-out",
                &format!("{name}.csr"),
            ],
        );
    }

    /// A self-signed certificate `name.pem` for `subject` with key `name.key` and the
    /// `extensions` section (`ca_ext` for a CA).
    pub fn self_signed(&self, name: &str, subject: &str, extensions: &str) {
        self.key(name);
        openssl_in(
            &self.dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                subject,
                "-days",
                "30",
                "-config",
                "ca.cnf",
                "-extensions",
                extensions,
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    /// `name.pem` for `subject` issued by the issuing CA through `openssl ca` with the
    /// `extensions` section.
    pub fn issue(&self, name: &str, subject: &str, extensions: &str) {
        self.key_and_csr(name, subject);
        openssl_in(
            &self.dir,
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                "ca.cnf",
                "-extensions",
                extensions,
                "-in",
                &format!("{name}.csr"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    /// `name.pem` for `subject` issued by another CA certificate `ca` (not recorded in the
    /// index).
    pub fn issue_by(&self, name: &str, subject: &str, ca: &str, extensions: &str) {
        self.issue_for_key(name, subject, ca, extensions, None);
    }

    /// [`OpensslPki::issue_by`], for the public key in the PEM file `public_key` if given
    /// (a key held elsewhere, e.g. in the HSM) instead of `name.key`'s.
    pub fn issue_for_key(
        &self,
        name: &str,
        subject: &str,
        ca: &str,
        extensions: &str,
        public_key: Option<&str>,
    ) {
        self.key_and_csr(name, subject);
        let (csr, ca_pem, ca_key, out) = (
            format!("{name}.csr"),
            format!("{ca}.pem"),
            format!("{ca}.key"),
            format!("{name}.pem"),
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ca.cnf",
            "-extensions",
            extensions,
            "-out",
            &out,
        ];
        if let Some(public_key) = public_key {
            args.extend(["-force_pubkey", public_key]);
        }
        openssl_in(&self.dir, &args);
    }

    /// `openssl ca -revoke` with a CRLReason name (e.g. `cessationOfOperation`).
    pub fn revoke(&self, name: &str, reason: &str) {
        openssl_in(
            &self.dir,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-revoke",
                &format!("{name}.pem"),
                "-crl_reason",
                reason,
            ],
        );
    }

    /// `openssl ca -gencrl` into `crl.pem`, valid for `hours`.
    pub fn gencrl(&self, hours: u32) -> PathBuf {
        openssl_in(
            &self.dir,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-gencrl",
                "-crlhours",
                &hours.to_string(),
                "-out",
                "crl.pem",
            ],
        );
        self.path("crl.pem")
    }

    /// The serial of `name.pem`, lowercase hex.
    pub fn serial(&self, name: &str) -> String {
        serial_of(&self.dir, name)
    }
}

/// A CMP client configuration for `url` with the test profile, trusting `trusted_der`.
pub fn cmp_config(
    url: String,
    protection: ClientProtection,
    trusted_der: Vec<Vec<u8>>,
) -> CmpClientConfig {
    CmpClientConfig {
        url,
        organisation: ORGANISATION.into(),
        adult_policy_oid: DEFAULT_ADULT_POLICY_OID.into(),
        minor_policy_oid: DEFAULT_MINOR_POLICY_OID.into(),
        protection,
        trusted_der,
    }
}

/// A CMP client on this process's token, over HTTP.
pub fn cmp_client(config: CmpClientConfig) -> CmpClient {
    CmpClient::new(
        hsm(),
        HttpTransport::new(Duration::from_secs(20)).unwrap(),
        config,
    )
    .unwrap()
}

/// The CA has `serial_hex` as issued and not revoked.
pub async fn assert_good(ca: &EmbeddedCa, serial_hex: &str) {
    let state = ca.status(serial_hex).await.unwrap();
    assert!(matches!(state, CertificateState::Good { .. }), "{state:?}");
}
