//! Test fixture: one SoftHSM token per test process, made before the module is loaded.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`; `.cargo/config.toml` points it at
//! `target/softhsm/softhsm2.conf` for every test process. The first test to ask for the fixture
//! runs `softhsm-setup token` there with a label of this process's own, then opens the [`Hsm`]
//! and provisions the system keys. `cargo test` runs a file's tests as threads of one process
//! (they share the token and the `Hsm`); nextest runs each test in a process of its own (each
//! gets its own token). Either way the token directory is shared with other processes, so tests
//! use their own keys and never assume they are alone on the token directory.
// Each test file uses a different part of the fixture; in tests a panic is the failure report.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use hsm_adapter::{Hsm, HsmConfig, KeyAlgorithm, KeyMode, TokenSelector, UserKeyRef};
use secrecy::SecretString;
use tokio::sync::OnceCell;

/// The token of this test process.
#[derive(Debug)]
pub struct Token {
    pub label: String,
    pub dir: PathBuf,
    pub module: PathBuf,
    pub pin_file: PathBuf,
    pub so_pin_file: PathBuf,
}

impl Token {
    pub fn pin(&self) -> String {
        read_pin(&self.pin_file)
    }

    pub fn so_pin(&self) -> SecretString {
        SecretString::from(read_pin(&self.so_pin_file))
    }

    pub fn config(&self) -> HsmConfig {
        HsmConfig::new(
            &self.module,
            TokenSelector::Label(self.label.clone()),
            SecretString::from(self.pin()),
        )
    }
}

fn read_pin(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("PIN file")
        .trim()
        .to_owned()
}

fn setup_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-config/softhsm-setup")
}

/// Creates this process's token (once); loads nothing.
pub fn token() -> &'static Token {
    static TOKEN: OnceLock<Token> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let conf = std::env::var_os("SOFTHSM2_CONF")
            .map(PathBuf::from)
            .expect("SOFTHSM2_CONF is set by .cargo/config.toml");
        let dir = conf
            .parent()
            .expect("SOFTHSM2_CONF has a directory")
            .to_path_buf();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let label = format!("t{}-{nanos}", std::process::id());
        let pins = dir.join("pins");
        std::fs::create_dir_all(&pins).unwrap();
        let pin_file = pins.join(format!("{label}.pin"));
        let so_pin_file = pins.join(format!("{label}.so-pin"));
        let status = Command::new(setup_script())
            .args(["token", "--dir"])
            .arg(&dir)
            .args(["--label", &label, "--so-pin-file"])
            .arg(&so_pin_file)
            .arg("--pin-file")
            .arg(&pin_file)
            .status()
            .expect("run softhsm-setup");
        assert!(status.success(), "softhsm-setup token failed");
        let module = Command::new(setup_script())
            .arg("module")
            .output()
            .expect("softhsm-setup");
        assert!(module.status.success());
        let module = PathBuf::from(String::from_utf8(module.stdout).unwrap().trim());
        Token {
            label,
            dir,
            module,
            pin_file,
            so_pin_file,
        }
    })
}

/// The process's shared `Hsm` (2 workers, default cache) with the system keys provisioned.
pub fn hsm() -> &'static Hsm {
    static HSM: OnceLock<Hsm> = OnceLock::new();
    HSM.get_or_init(|| {
        let token = token();
        // Opening is async; the fixture may be first asked for inside any test's runtime, so it
        // runs on a thread and runtime of its own (the Hsm does not depend on a runtime).
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let hsm = Hsm::open(token.config())
                    .await
                    .expect("open the test token");
                hsm.provision_system_keys(&token.so_pin())
                    .await
                    .expect("provision");
                hsm
            })
        })
        .join()
        .unwrap()
    })
}

/// Opens another `Hsm` on the same token (it shares the process's module and login).
pub async fn open_another(config: HsmConfig) -> Hsm {
    let _ = hsm();
    Hsm::open(config).await.expect("open")
}

/// A user key per algorithm and mode, generated once per process (RSA-3072 is slow).
pub async fn user_key(algorithm: KeyAlgorithm, mode: KeyMode) -> &'static UserKeyRef {
    static KEYS: [OnceCell<UserKeyRef>; 8] = [const { OnceCell::const_new() }; 8];
    let index = KeyAlgorithm::ALL
        .iter()
        .position(|a| *a == algorithm)
        .unwrap()
        * 2
        + usize::from(mode == KeyMode::Resident);
    KEYS[index]
        .get_or_init(|| async {
            hsm()
                .generate_user_key(algorithm, mode)
                .await
                .expect("generate a user key")
        })
        .await
}

/// The module through cryptoki directly (tests may; product code outside the adapter never
/// does), and the slot of this process's token.
///
/// The adapter loads and initialises the module first: SoftHSM's `C_Initialize` is not safe to
/// run from two threads at once, and the adapter serialises only its own calls.
pub fn pkcs11() -> (Pkcs11, Slot) {
    static PKCS11: OnceLock<(Pkcs11, Slot)> = OnceLock::new();
    PKCS11
        .get_or_init(|| {
            let _ = hsm();
            let token = token();
            let pkcs11 = Pkcs11::new(&token.module).unwrap();
            match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) => {}
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::CryptokiAlreadyInitialized,
                    _,
                )) => {}
                Err(e) => panic!("C_Initialize: {e}"),
            }
            let slot = pkcs11
                .get_slots_with_initialized_token()
                .unwrap()
                .into_iter()
                .find(|s| pkcs11.get_token_info(*s).unwrap().label() == token.label)
                .expect("the test token");
            (pkcs11, slot)
        })
        .clone()
}

/// A read-write session through cryptoki directly, logged in (or already logged in).
pub fn raw_session() -> Session {
    let (pkcs11, slot) = pkcs11();
    let session = pkcs11.open_rw_session(slot).unwrap();
    match session.login(
        cryptoki::session::UserType::User,
        Some(&SecretString::from(token().pin())),
    ) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    session
}

/// The wrapped blob inside a reference, read from the documented encoding (version 2):
/// "SSKR" | version | algorithm | storage (1 = wrapped) | KEK id length (16) | KEK id |
/// mechanism (8) | key type (8) | blob length (4) | blob | ...
pub fn blob_of(key: &UserKeyRef) -> Vec<u8> {
    let bytes = key.to_bytes();
    assert_eq!(&bytes[..4], b"SSKR");
    assert_eq!((bytes[4], bytes[6], bytes[7]), (2, 1, 16));
    let len = u32::from_be_bytes(bytes[40..44].try_into().unwrap()) as usize;
    bytes[44..44 + len].to_vec()
}

/// How openssl should check a signature.
#[derive(Debug, Clone, Copy)]
pub enum Padding {
    /// ECDSA or RSA PKCS#1 v1.5.
    Default,
    /// RSA-PSS with salt length = digest length.
    Pss,
}

/// Verifies `signature` over `data` with openssl (`openssl dgst -<md> -verify`).
pub fn openssl_verify(spki_pem: &str, md: &str, data: &[u8], signature: &[u8], padding: Padding) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("pub.pem");
    let sig = dir.path().join("sig.bin");
    let msg = dir.path().join("data.bin");
    std::fs::write(&key, spki_pem).unwrap();
    std::fs::write(&sig, signature).unwrap();
    std::fs::write(&msg, data).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("dgst")
        .arg(format!("-{md}"))
        .arg("-verify")
        .arg(&key)
        .arg("-signature")
        .arg(&sig);
    if let Padding::Pss = padding {
        cmd.args([
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:digest",
        ]);
    }
    let out = cmd.arg(&msg).output().expect("run openssl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Verified OK"),
        "openssl did not verify: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
