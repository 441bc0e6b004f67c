//! How `smartsign-ctl` reaches a running daemon: its API over mutual TLS, with the caller's
//! client certificate (the role is in its OU) and the CA the daemon's server certificate chains
//! to. HTTPS only, and only that CA: no system roots.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The daemon and the caller's TLS identity.
#[derive(Debug, clap::Args)]
pub(crate) struct DaemonArgs {
    /// The daemon's API, e.g. `https://appliance:8443`.
    #[arg(long)]
    pub(crate) url: String,
    /// The client certificate (PEM) whose OU names the caller's role.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The CA certificate the daemon's server certificate chains to (PEM).
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
}

impl DaemonArgs {
    /// A client for the daemon's API.
    pub(crate) fn client(&self) -> Result<reqwest::Client, Box<dyn std::error::Error>> {
        let mut identity = Zeroizing::new(read(&self.cert)?);
        identity.extend_from_slice(b"\n");
        identity.extend_from_slice(&Zeroizing::new(read(&self.key)?));
        Ok(reqwest::Client::builder()
            .use_rustls_tls()
            // Shares and audit evidence never cross the network in clear text, whatever the
            // URL says.
            .https_only(true)
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&read(&self.ca)?)?)
            .identity(reqwest::Identity::from_pem(&identity)?)
            .timeout(std::time::Duration::from_secs(60))
            .build()?)
    }

    /// The URL of `path` (which starts with `/`) on the daemon.
    pub(crate) fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}
