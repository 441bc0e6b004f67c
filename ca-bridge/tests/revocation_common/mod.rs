//! What the OCSP, CRL and status tests share: the SoftHSM token with the embedded CA's system
//! keys, an `openssl ca` PKI in a temporary directory, and running commands.

// Each test binary uses its own part of this module; its items are `pub` for those binaries.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ca_bridge::{CaProfileConfig, EmbeddedCa, IssueRequest, IssuedCertificate, Profile};
use hsm_adapter::{Hsm, HsmConfig, TokenSelector};
use secrecy::SecretString;

pub const DAY: Duration = Duration::from_secs(24 * 3600);

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

/// This process's token with its system keys provisioned (as tests/embedded_ca.rs does).
pub fn hsm() -> Arc<Hsm> {
    static HSM: OnceLock<Arc<Hsm>> = OnceLock::new();
    HSM.get_or_init(|| {
        let conf = PathBuf::from(std::env::var_os("SOFTHSM2_CONF").expect("SOFTHSM2_CONF"));
        let dir = conf.parent().unwrap().to_path_buf();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let label = format!("rv{}-{nanos}", std::process::id());
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

/// Opens an embedded CA in `dir` whose certificates point at `ocsp_url` and `crl_url`.
pub async fn embedded_ca(dir: &Path, ocsp_url: &str, crl_url: &str) -> EmbeddedCa {
    let config = CaProfileConfig::new("smartsign revocation test", ocsp_url, crl_url);
    EmbeddedCa::open(hsm(), dir, config, SystemTime::now())
        .await
        .unwrap()
}

/// Issues an adult certificate for a fresh openssl P-256 key; writes it to `dir/name`.
pub async fn issue(ca: &EmbeddedCa, dir: &Path, name: &str) -> IssuedCertificate {
    let key = dir.join(format!("{name}.key"));
    run(openssl()
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key));
    let spki = run(openssl()
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key))
    .stdout;
    let now = SystemTime::now();
    let issued = ca
        .issue(IssueRequest {
            surname: "CHAN".into(),
            given_name: Some("Tai Man".into()),
            hkic_hash_hex: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                .into(),
            public_key_spki_der: spki,
            profile: Profile::Adult,
            not_before: now - Duration::from_secs(60),
            not_after: now + 365 * DAY,
        })
        .await
        .unwrap();
    std::fs::write(dir.join(name), issued.to_pem()).unwrap();
    issued
}

/// An `openssl ca` PKI: root, issuing CA `ica` (with its index.txt), all EC P-256.
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
        pki.self_signed("root", "Test Root");
        pki.key("ica");
        pki.csr("ica", "Test Issuing CA");
        run(openssl().current_dir(dir).args([
            "x509",
            "-req",
            "-in",
            "ica.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ca.cnf",
            "-extensions",
            "ca_ext",
            "-out",
            "ica.pem",
        ]));
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn der(&self, name: &str) -> Vec<u8> {
        run(openssl()
            .current_dir(&self.dir)
            .args(["x509", "-outform", "DER", "-in", name]))
        .stdout
    }

    pub fn key(&self, name: &str) {
        run(openssl().current_dir(&self.dir).args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ]));
    }

    fn csr(&self, name: &str, cn: &str) {
        run(openssl().current_dir(&self.dir).args([
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &format!("{name}.csr"),
        ]));
    }

    /// A self-signed CA certificate `name.pem` with key `name.key`.
    pub fn self_signed(&self, name: &str, cn: &str) {
        self.key(name);
        run(openssl().current_dir(&self.dir).args([
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            "30",
            "-config",
            "ca.cnf",
            "-extensions",
            "ca_ext",
            "-out",
            &format!("{name}.pem"),
        ]));
    }

    /// `name.pem` issued by the issuing CA through `openssl ca` with the `extensions` section.
    pub fn issue(&self, name: &str, cn: &str, extensions: &str) {
        self.key(name);
        self.csr(name, cn);
        run(openssl().current_dir(&self.dir).args([
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
        ]));
    }

    /// `name.pem` issued by another CA certificate `ca` (not recorded in the index).
    pub fn issue_by(&self, name: &str, cn: &str, ca: &str, extensions: &str) {
        self.key(name);
        self.csr(name, cn);
        run(openssl().current_dir(&self.dir).args([
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ca.cnf",
            "-extensions",
            extensions,
            "-out",
            &format!("{name}.pem"),
        ]));
    }

    /// `openssl ca -revoke` with a CRLReason name (e.g. `cessationOfOperation`).
    pub fn revoke(&self, name: &str, reason: &str) {
        run(openssl().current_dir(&self.dir).args([
            "ca",
            "-config",
            "ca.cnf",
            "-revoke",
            &format!("{name}.pem"),
            "-crl_reason",
            reason,
        ]));
    }

    /// `openssl ca -gencrl` into `crl.pem`, valid for `hours`.
    pub fn gencrl(&self, hours: u32) -> PathBuf {
        run(openssl().current_dir(&self.dir).args([
            "ca",
            "-config",
            "ca.cnf",
            "-gencrl",
            "-crlhours",
            &hours.to_string(),
            "-out",
            "crl.pem",
        ]));
        self.path("crl.pem")
    }

    /// The serial of `name.pem`, lowercase hex.
    pub fn serial(&self, name: &str) -> String {
        let out = run(openssl()
            .current_dir(&self.dir)
            .args(["x509", "-noout", "-serial", "-in", name]));
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .trim_start_matches("serial=")
            .trim_start_matches('0')
            .to_ascii_lowercase()
    }
}
