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
                    read_secret(pin_file)?,
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
    pin: Option<SecretString>,
) -> Result<Hsm, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let config: DaemonConfig =
        toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?;
    let hsm = config.hsm;
    let pin = match (pin, &hsm.pin_file) {
        (Some(given), _) => given,
        (None, Some(configured)) => read_secret(configured)?,
        (None, None) => {
            return Err(format!(
                "{} has no hsm.pin_file (the daemon unseals with a quorum): give the PIN with \
                 --pin-file or the officers' --share-file",
                path.display()
            )
            .into());
        }
    };
    open_token(&hsm.module, hsm.token_label, hsm.token_serial, pin).await
}

pub(crate) async fn open_token(
    module: &Path,
    label: Option<String>,
    serial: Option<String>,
    pin: SecretString,
) -> Result<Hsm, Box<dyn std::error::Error>> {
    let selector = match (label, serial) {
        (Some(label), _) => TokenSelector::Label(label),
        (None, Some(serial)) => TokenSelector::Serial(serial),
        (None, None) => return Err("name the token with --token or --serial".into()),
    };
    let config = HsmConfig::new(module, selector, pin);
    Ok(Hsm::open(config).await?)
}

/// Which token to open, without its PIN (given apart, by [`UserPinArgs`]): the daemon's
/// configuration, or the module and the token's label or serial.
#[derive(Debug, clap::Args)]
pub(crate) struct TokenChoice {
    /// The daemon's configuration file: its `[hsm]` section names the module and the token.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["token", "serial"])]
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
}

impl TokenChoice {
    /// Opens the token with `pin`, or the configuration's PIN file without one.
    pub(crate) async fn open(
        &self,
        pin: Option<SecretString>,
    ) -> Result<Hsm, Box<dyn std::error::Error>> {
        match (&self.config, pin) {
            (Some(path), pin) => open_configured(path, pin).await,
            (None, Some(pin)) => {
                open_token(&self.module, self.token.clone(), self.serial.clone(), pin).await
            }
            (None, None) => {
                Err("give the user PIN: --pin-file or the officers' --share-file".into())
            }
        }
    }
}

/// The user PIN, for commands that open a token the daemon unseals with a quorum: from a file,
/// or rebuilt from the officers' share files.
#[derive(Debug, clap::Args)]
pub(crate) struct UserPinArgs {
    /// File holding the user PIN (its first line), when the configuration names none.
    #[arg(long, value_name = "FILE", conflicts_with = "share_file")]
    pub(crate) pin_file: Option<PathBuf>,
    /// An officer's share of the user PIN (from `ceremony init` or `ceremony split`); give as
    /// many as the threshold, one option each.
    #[arg(long, value_name = "FILE")]
    pub(crate) share_file: Vec<PathBuf>,
}

impl UserPinArgs {
    /// The PIN given, if any (else the configuration's `hsm.pin_file` is read).
    pub(crate) fn pin(&self) -> Result<Option<SecretString>, Box<dyn std::error::Error>> {
        pin_from(self.pin_file.as_deref(), &self.share_file)
    }
}

/// The security officer's PIN: from a file, or rebuilt from the officers' SO-PIN share files
/// (from `ceremony init`), so that no one person holds it.
#[derive(Debug, clap::Args)]
pub(crate) struct SoPinArgs {
    /// File holding the security officer's PIN (its first line).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "so_share_file",
        required_unless_present = "so_share_file"
    )]
    pub(crate) so_pin_file: Option<PathBuf>,
    /// An officer's share of the SO PIN (from `ceremony init`); give as many as the threshold,
    /// one option each.
    #[arg(long, value_name = "FILE")]
    pub(crate) so_share_file: Vec<PathBuf>,
}

impl SoPinArgs {
    pub(crate) fn pin(&self) -> Result<SecretString, Box<dyn std::error::Error>> {
        pin_from(self.so_pin_file.as_deref(), &self.so_share_file)?
            .ok_or_else(|| "give --so-pin-file or the officers' --so-share-file".into())
    }
}

fn pin_from(
    file: Option<&Path>,
    shares: &[PathBuf],
) -> Result<Option<SecretString>, Box<dyn std::error::Error>> {
    if let Some(file) = file {
        return Ok(Some(read_secret(file)?));
    }
    if shares.is_empty() {
        return Ok(None);
    }
    let mut parsed = Vec::with_capacity(shares.len());
    for path in shares {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read share file {}: {error}", path.display()))?,
        );
        parsed.push(
            hsm_adapter::quorum::Share::parse(text.trim())
                .map_err(|error| format!("share file {}: {error}", path.display()))?,
        );
    }
    Ok(Some(hsm_adapter::quorum::combine(&parsed).map_err(
        |error| {
            format!("the shares do not rebuild a PIN ({error}): are there enough, from one split?")
        },
    )?))
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
