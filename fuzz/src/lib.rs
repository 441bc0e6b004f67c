//! What the fuzz targets share: the framing of inputs with several fields, and the embedded CA
//! on a SoftHSM token for the targets that fuzz its protocol handlers as the daemon runs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use ca_bridge::cmp::{CmpServer, CmpServerConfig};
use ca_bridge::{CaProfileConfig, EmbeddedCa};
use hsm_adapter::{Hsm, HsmConfig, TokenSelector};
use secrecy::{SecretSlice, SecretString};

/// An input of several fields: each but the last is a 2-byte big-endian length and that many
/// bytes; the last field is the rest. A short input gives empty fields. (`make-seeds` writes
/// this framing.)
pub struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Fields(data)
    }

    /// The next length-prefixed field.
    pub fn next(&mut self) -> &'a [u8] {
        let data = self.0;
        let Some((len, rest)) = data.split_first_chunk::<2>() else {
            self.0 = &[];
            return &[];
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (field, rest) = rest.split_at(len);
        self.0 = rest;
        field
    }

    /// The next field as text (lossy).
    pub fn next_str(&mut self) -> String {
        String::from_utf8_lossy(self.next()).into_owned()
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// The clock of the CA and status targets: fixed, so that a crash reproduces. The seeds'
/// certificates, CRLs and OCSP responses (made by `make-seeds` in December 2026, valid for ten
/// years) are current at this time.
pub fn now() -> SystemTime {
    // 2027-01-01T00:00:00Z.
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_761_600)
}

/// The PBM reference and secret the CMP server accepts (the seeds' requests use them).
pub const PBM_REFERENCE: &[u8] = b"fuzz-ra";
pub const PBM_SECRET: &[u8] = b"fuzz-pbm-secret";

/// The embedded CA and its CMP server on this process's SoftHSM token, and a runtime for their
/// async handlers. Made on first use.
pub struct Ca {
    pub runtime: tokio::runtime::Runtime,
    pub ca: Arc<EmbeddedCa>,
    pub cmp: CmpServer,
    _dir: tempfile::TempDir,
}

/// The CA fixture. Needs `SOFTHSM2_CONF` (ops/fuzz sets it to fuzz/target/softhsm/softhsm2.conf)
/// and SoftHSM (`softhsm-config/softhsm-setup install`).
pub fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let conf = PathBuf::from(
            std::env::var_os("SOFTHSM2_CONF").expect("SOFTHSM2_CONF (ops/fuzz sets it)"),
        );
        let dir = conf
            .parent()
            .expect("SOFTHSM2_CONF names a file")
            .to_path_buf();
        let label = "smartsign-fuzz";
        let pins = dir.join("pins");
        std::fs::create_dir_all(&pins).expect("create the PIN directory");
        let pin_file = pins.join(format!("{label}.pin"));
        let so_pin_file = pins.join(format!("{label}.so-pin"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-config/softhsm-setup");
        let status = Command::new(&script)
            .args(["token", "--dir"])
            .arg(&dir)
            .args(["--label", label, "--so-pin-file"])
            .arg(&so_pin_file)
            .arg("--pin-file")
            .arg(&pin_file)
            .status()
            .expect("run softhsm-setup");
        assert!(status.success(), "softhsm-setup token failed");
        let module = Command::new(&script)
            .arg("module")
            .output()
            .expect("run softhsm-setup");
        let module = PathBuf::from(String::from_utf8_lossy(&module.stdout).trim());
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .expect("read a PIN file")
                .trim()
                .to_owned()
        };
        let config = HsmConfig::new(
            &module,
            TokenSelector::Label(label.into()),
            SecretString::from(read(&pin_file)),
        );
        let so_pin = SecretString::from(read(&so_pin_file));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let ca_dir = tempfile::tempdir().expect("a temporary directory");
        let ca = runtime.block_on(async {
            let hsm = Hsm::open(config).await.expect("open the SoftHSM token");
            hsm.provision_system_keys(&so_pin)
                .await
                .expect("provision the system keys");
            let profile = CaProfileConfig::new(
                "smartsign fuzz",
                "http://127.0.0.1:1/ocsp",
                "http://127.0.0.1:1/crl",
            );
            EmbeddedCa::open(Arc::new(hsm), ca_dir.path(), profile, now())
                .await
                .expect("open the embedded CA")
        });
        let ca = Arc::new(ca);
        let cmp = CmpServer::new(
            ca.clone(),
            CmpServerConfig {
                pbm_secrets: vec![(
                    PBM_REFERENCE.to_vec(),
                    SecretSlice::from(PBM_SECRET.to_vec()),
                )],
                default_validity: Duration::from_secs(365 * 24 * 3600),
            },
        );
        Ca {
            runtime,
            ca,
            cmp,
            _dir: ca_dir,
        }
    })
}
