//! Scratch SoftHSM tokens for benchmarks run without a token of their own.
//!
//! SoftHSM reads `SOFTHSM2_CONF` when the module is initialised, and a process cannot safely set
//! its own environment once threads run. So the command makes a token in a temporary directory
//! with `softhsm-config/softhsm-setup`, runs itself again with that configuration in the child's
//! environment and the token's PIN files on its command line, and removes the directory after.

use std::path::PathBuf;
use std::process::Command;

/// Where the benchmark's token comes from.
#[derive(Debug)]
pub(crate) enum Token {
    /// The caller named a token: run against it in this process.
    Given,
    /// A scratch token was made and the command already ran against it in a child process.
    RanInScratch,
}

const SCRATCH_LABEL: &str = "smartsign-bench";

/// Makes a scratch token and re-runs this command against it, unless `token` names one.
pub(crate) fn ensure_token(token: &Option<String>) -> Result<Token, Box<dyn std::error::Error>> {
    if token.is_some() {
        return Ok(Token::Given);
    }
    // Key generation and token writes are far faster on tmpfs, and nothing here must survive.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("smartsign-bench-")
            .tempdir_in("/dev/shm")?
    } else {
        tempfile::Builder::new()
            .prefix("smartsign-bench-")
            .tempdir()?
    };
    let hsm_dir = base.path().join("hsm");
    let so_pin = base.path().join("so.pin");
    let user_pin = base.path().join("user.pin");
    eprintln!("making a scratch SoftHSM token in {}", hsm_dir.display());
    let status = Command::new(setup_script())
        .arg("token")
        .arg("--dir")
        .arg(&hsm_dir)
        .args(["--label", SCRATCH_LABEL])
        .arg("--so-pin-file")
        .arg(&so_pin)
        .arg("--pin-file")
        .arg(&user_pin)
        .status()
        .map_err(|error| format!("cannot run {}: {error}", setup_script().display()))?;
    if !status.success() {
        return Err(format!("softhsm-setup could not make the scratch token ({status})").into());
    }
    let status = Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .args(["--token", SCRATCH_LABEL])
        .arg("--pin-file")
        .arg(&user_pin)
        .arg("--so-pin-file")
        .arg(&so_pin)
        .env("SOFTHSM2_CONF", hsm_dir.join("softhsm2.conf"))
        .status()?;
    if !status.success() {
        return Err(format!("the benchmark on the scratch token failed ({status})").into());
    }
    Ok(Token::RanInScratch)
}

/// The SoftHSM set-up script: `SMARTSIGN_SOFTHSM_SETUP` when set, else the one in the source tree
/// this binary was built from.
fn setup_script() -> PathBuf {
    match std::env::var_os("SMARTSIGN_SOFTHSM_SETUP") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../softhsm-config/softhsm-setup"
        )),
    }
}
