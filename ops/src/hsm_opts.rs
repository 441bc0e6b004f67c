//! The options every token-opening command shares, and opening the token with them.

use std::path::{Path, PathBuf};

use hsm_adapter::{Hsm, HsmConfig, SOFTHSM_MODULE, TokenSelector};
use secrecy::SecretString;

/// Which PKCS#11 module and token to open, and the file holding the user PIN: on the command
/// line, or from the `[hsm]` section of the daemon's configuration file (`--config`).
#[derive(Debug, clap::Args)]
pub(crate) struct TokenArgs {
    /// The daemon's configuration file (TOML): its `[hsm]` section names the module, the token
    /// and the PIN file, so that officers and the daemon cannot disagree about them.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["token", "serial", "pin_file"])]
    pub(crate) config: Option<PathBuf>,
    /// The PKCS#11 module.
    #[arg(long, env = "SMARTSIGN_PKCS11_MODULE", default_value = SOFTHSM_MODULE)]
    pub(crate) module: PathBuf,
    /// The token's label.
    #[arg(long, conflicts_with = "serial", required_unless_present_any = ["serial", "config"])]
    pub(crate) token: Option<String>,
    /// The token's serial number, instead of its label.
    #[arg(long)]
    pub(crate) serial: Option<String>,
    /// File holding the user PIN (its first line; mode 0600 expected).
    #[arg(long, required_unless_present = "config")]
    pub(crate) pin_file: Option<PathBuf>,
}

/// The `[hsm]` section of the daemon's configuration, as far as opening the token needs it.
#[derive(serde::Deserialize)]
struct DaemonConfig {
    hsm: HsmSection,
}

#[derive(serde::Deserialize)]
struct HsmSection {
    module: PathBuf,
    token_label: Option<String>,
    token_serial: Option<String>,
    /// Absent when the daemon unseals with a quorum (`[hsm.quorum]`).
    pin_file: Option<PathBuf>,
}

impl TokenArgs {
    pub(crate) async fn open(&self) -> Result<Hsm, Box<dyn std::error::Error>> {
        match &self.config {
            Some(path) => open_configured(path, None).await,
            None => {
                let pin_file = self.pin_file.as_deref().ok_or("give --pin-file")?;
                open_token(
                    &self.module,
                    self.token.clone(),
                    self.serial.clone(),
                    pin_file,
                )
                .await
            }
        }
    }
}

/// Opens the token that the daemon's configuration at `path` names, with the PIN in
/// `pin_file` or, without one, in the configuration's `hsm.pin_file`.
pub(crate) async fn open_configured(
    path: &Path,
    pin_file: Option<&Path>,
) -> Result<Hsm, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let config: DaemonConfig =
        toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?;
    let hsm = config.hsm;
    let pin_file = match (pin_file, &hsm.pin_file) {
        (Some(given), _) => given,
        (None, Some(configured)) => configured.as_path(),
        (None, None) => {
            return Err(format!(
                "{} has no hsm.pin_file (the daemon unseals with a quorum): give the PIN file \
                 with --pin-file, or name the token with --token or --serial instead",
                path.display()
            )
            .into());
        }
    };
    open_token(&hsm.module, hsm.token_label, hsm.token_serial, pin_file).await
}

async fn open_token(
    module: &Path,
    label: Option<String>,
    serial: Option<String>,
    pin_file: &Path,
) -> Result<Hsm, Box<dyn std::error::Error>> {
    let selector = match (label, serial) {
        (Some(label), _) => TokenSelector::Label(label),
        (None, Some(serial)) => TokenSelector::Serial(serial),
        (None, None) => return Err("name the token with --token or --serial".into()),
    };
    let pin = read_secret(pin_file)?;
    let config = HsmConfig::new(module, selector, pin);
    Ok(Hsm::open(config).await?)
}

/// Reads a PIN from the first line of `path`. The file's contents never appear in an error.
pub(crate) fn read_secret(path: &Path) -> Result<SecretString, Box<dyn std::error::Error>> {
    let contents = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read PIN file {}: {error}", path.display()))?,
    );
    let line = contents.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(format!("PIN file {} is empty", path.display()).into());
    }
    Ok(SecretString::from(line.to_owned()))
}
