//! The options every token-opening command shares, and opening the token with them.

use std::path::PathBuf;

use hsm_adapter::{Hsm, HsmConfig, SOFTHSM_MODULE, TokenSelector};
use secrecy::SecretString;

/// Which PKCS#11 module and token to open, and the file holding the user PIN.
#[derive(Debug, clap::Args)]
pub(crate) struct TokenArgs {
    /// The PKCS#11 module.
    #[arg(long, env = "SMARTSIGN_PKCS11_MODULE", default_value = SOFTHSM_MODULE)]
    pub(crate) module: PathBuf,
    /// The token's label.
    #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
    pub(crate) token: Option<String>,
    /// The token's serial number, instead of its label.
    #[arg(long)]
    pub(crate) serial: Option<String>,
    /// File holding the user PIN (its first line; mode 0600 expected).
    #[arg(long)]
    pub(crate) pin_file: PathBuf,
}

impl TokenArgs {
    pub(crate) async fn open(&self) -> Result<Hsm, Box<dyn std::error::Error>> {
        let selector = match (&self.token, &self.serial) {
            (Some(label), _) => TokenSelector::Label(label.clone()),
            (None, Some(serial)) => TokenSelector::Serial(serial.clone()),
            (None, None) => return Err("name the token with --token or --serial".into()),
        };
        let pin = read_secret(&self.pin_file)?;
        let config = HsmConfig::new(&self.module, selector, pin);
        Ok(Hsm::open(config).await?)
    }
}

/// Reads a PIN from the first line of `path`. The file's contents never appear in an error.
pub(crate) fn read_secret(
    path: &std::path::Path,
) -> Result<SecretString, Box<dyn std::error::Error>> {
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
