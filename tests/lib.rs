//! Black-box tests of smartsign: they run the built `smartsignd` and `smartsign-ctl` on SoftHSM
//! tokens made in temporary directories and talk to them as their users do, with real peers
//! (openssl, pkcs11-tool) checking what comes out. The tests are in `tests/`; this library holds
//! what they share: finding the freshly built binaries and making tokens.

#![forbid(unsafe_code)]
// Test support: a panic, with the reason, is how it reports a failure.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The workspace's root directory.
pub fn workspace_root() -> &'static Path {
    // This crate's manifest sits one level below the workspace root.
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The path of binary `bin` of package `package`, built now from the current sources.
///
/// `cargo test` does not build other packages' binaries, so the first call for each binary runs
/// `cargo build` (cargo releases its build lock while tests run). Panics with cargo's output if
/// the build fails: a test cannot run without its binary.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A relative CARGO_TARGET_DIR is relative to where cargo ran: the workspace, for these tests.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace_root().join(dir))
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target_dir.join("debug").join(bin);
    if !built.iter().any(|name| name == bin) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .args(["build", "--quiet", "--locked", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .output()
            .unwrap_or_else(|error| panic!("cannot run cargo build for {bin}: {error}"));
        assert!(
            output.status.success(),
            "cargo build of {bin} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        built.push(bin.to_owned());
    }
    path
}

/// A SoftHSM token in a directory of its own, with its own `softhsm2.conf`, made by
/// `softhsm-config/softhsm-setup` as the development run and CI make theirs. Processes started
/// with [`SoftHsmToken::command`] see only this token.
#[derive(Debug)]
pub struct SoftHsmToken {
    dir: tempfile::TempDir,
    label: String,
}

impl SoftHsmToken {
    /// Makes a token labelled `label` with random PINs.
    pub fn new(label: &str) -> SoftHsmToken {
        // Token generation is far faster on tmpfs.
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::Builder::new()
                .prefix("smartsign-test-")
                .tempdir_in("/dev/shm"),
            false => tempfile::Builder::new().prefix("smartsign-test-").tempdir(),
        }
        .expect("temporary directory");
        let token = SoftHsmToken {
            dir,
            label: label.to_owned(),
        };
        let output = Command::new(workspace_root().join("softhsm-config/softhsm-setup"))
            .arg("token")
            .arg("--dir")
            .arg(token.hsm_dir())
            .args(["--label", label])
            .arg("--so-pin-file")
            .arg(token.so_pin_file())
            .arg("--pin-file")
            .arg(token.pin_file())
            .output()
            .expect("run softhsm-setup");
        assert!(
            output.status.success(),
            "softhsm-setup: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        token
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The directory holding `softhsm2.conf` and `tokens/`.
    pub fn hsm_dir(&self) -> PathBuf {
        self.dir.path().join("hsm")
    }

    /// The `softhsm2.conf` to put in `SOFTHSM2_CONF`.
    pub fn conf(&self) -> PathBuf {
        self.hsm_dir().join("softhsm2.conf")
    }

    /// The file holding the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user.pin")
    }

    /// The file holding the security officer's PIN.
    pub fn so_pin_file(&self) -> PathBuf {
        self.dir.path().join("so.pin")
    }

    /// The user PIN, for peers (pkcs11-tool) that only take it on the command line.
    pub fn pin(&self) -> String {
        std::fs::read_to_string(self.pin_file())
            .expect("read PIN file")
            .trim()
            .to_owned()
    }

    /// A scratch directory that lives as long as the token.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// A command for `program` that sees this token (and only this one).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("SOFTHSM2_CONF", self.conf());
        command
    }
}

/// Runs `command` and returns its output, panicking if it could not start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"))
}

/// Standard output and error of `output`, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
