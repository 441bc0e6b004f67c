//! `smartsign-ctl unseal`: an officer gives their share of the user PIN to a sealed daemon, with
//! their client certificate, from a file or standard input, so that the share is never on a
//! command line (where `ps` and shell history would keep it).

use std::io::Read as _;
use std::path::PathBuf;

use zeroize::Zeroizing;

/// Arguments of `unseal`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example (each officer, with their own certificate and share):
  smartsign-ctl unseal --url https://appliance:8443 --cert officer-1.pem --key officer-1.key \\
      --ca tls-ca.pem --share-file officer-1.user-pin-share.txt
It prints the daemon's answer: 202 while more shares are needed, 200 once unsealed."
)]
pub(crate) struct UnsealArgs {
    /// The daemon's API, e.g. `https://appliance:8443`.
    #[arg(long)]
    url: String,
    /// The officer's client certificate (PEM, role `officer` in its OU).
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The CA certificate the daemon's server certificate chains to (PEM).
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// The share file; without it the share is read from standard input.
    #[arg(long, value_name = "FILE")]
    share_file: Option<PathBuf>,
}

pub(crate) async fn run(args: UnsealArgs) -> Result<(), Box<dyn std::error::Error>> {
    let share = Zeroizing::new(match &args.share_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?,
        None => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            text
        }
    });
    let share = share.trim();
    if share.is_empty() {
        return Err("the share is empty".into());
    }
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
    };
    let mut identity = Zeroizing::new(read(&args.cert)?);
    identity.extend_from_slice(b"\n");
    identity.extend_from_slice(&Zeroizing::new(read(&args.key)?));
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        // A share never crosses the network in clear text, whatever the URL says.
        .https_only(true)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&read(&args.ca)?)?)
        .identity(reqwest::Identity::from_pem(&identity)?)
        .build()?;
    let body = Zeroizing::new(serde_json::to_vec(&serde_json::json!({ "share": share }))?);
    let response = client
        .post(format!(
            "{}/v1/admin/unseal",
            args.url.trim_end_matches('/')
        ))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await?;
    let status = response.status();
    let answer = response.text().await?;
    println!("{} {answer}", status.as_u16());
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the daemon refused the share ({status})").into())
    }
}
