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
    #[command(flatten)]
    daemon: crate::client::DaemonArgs,
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
    let client = args.daemon.client()?;
    let body = Zeroizing::new(serde_json::to_vec(&serde_json::json!({ "share": share }))?);
    let response = client
        .post(args.daemon.at("/v1/admin/unseal"))
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
