//! `smartsign-ctl keys`: the system keys on the token.

use std::path::PathBuf;

use hsm_adapter::{HsmError, SystemKey};

use crate::hsm_opts::{SoPinArgs, TokenArgs};

/// Arguments of `keys init`.
#[derive(Debug, clap::Args)]
pub(crate) struct InitArgs {
    #[command(flatten)]
    token: TokenArgs,
    /// The security officer's PIN (a file, or the officers' SO-PIN shares), needed to create the
    /// trusted key-encryption key.
    #[command(flatten)]
    so_pin: SoPinArgs,
}

/// Arguments of `keys ra-request`.
#[derive(Debug, clap::Args)]
pub(crate) struct RaRequestArgs {
    #[command(flatten)]
    token: TokenArgs,
    /// The RA's common name, e.g. the appliance's host name.
    #[arg(long)]
    common_name: String,
    /// The organisation (O) of the request's subject.
    #[arg(long, default_value = "smartsign")]
    organisation: String,
    /// Write the PEM request here instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Arguments of `keys status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    token: TokenArgs,
}

pub(crate) async fn init(args: InitArgs) -> Result<(), Box<dyn std::error::Error>> {
    let so_pin = args.so_pin.pin()?;
    let hsm = args.token.open().await?;
    eprintln!("provisioning the system keys");
    let report = hsm.provision_system_keys(&so_pin).await?;
    for key in &report.created {
        println!("created  {}", key.label());
    }
    for key in &report.found {
        println!("found    {}", key.label());
    }
    println!(
        "all {} system keys pass the key policy",
        report.created.len() + report.found.len()
    );
    hsm.shutdown().await;
    Ok(())
}

pub(crate) async fn status(args: StatusArgs) -> Result<(), Box<dyn std::error::Error>> {
    let hsm = args.token.open().await?;
    let mut failures = 0;
    for key in SystemKey::ALL {
        match hsm.check_system_key(key).await {
            Ok(()) => println!("{:<22} ok", key.label()),
            Err(error) => {
                failures += 1;
                let verdict = match error {
                    HsmError::SystemKeyMissing(_) => "missing".to_owned(),
                    other => format!("REFUSED: {other}"),
                };
                println!("{:<22} {verdict}", key.label());
            }
        }
    }
    let trusted = hsm.foreign_trusted_objects().await;
    hsm.shutdown().await;
    match trusted? {
        trusted if trusted.is_empty() => {}
        trusted => {
            failures += trusted.len();
            for object in trusted {
                println!("REFUSED: a trusted {object} besides the KEK (only the SO makes one)");
            }
        }
    }
    match failures {
        0 => Ok(()),
        n => Err(
            format!("{n} system key(s) missing or refused; `keys init` creates missing ones")
                .into(),
        ),
    }
}

pub(crate) async fn ra_request(args: RaRequestArgs) -> Result<(), Box<dyn std::error::Error>> {
    let hsm = args.token.open().await?;
    let request =
        ca_bridge::enrolment::ra_certification_request(&hsm, &args.organisation, &args.common_name)
            .await;
    hsm.shutdown().await;
    let pem = der::pem::encode_string("CERTIFICATE REQUEST", der::pem::LineEnding::LF, &request?)
        .map_err(|error| format!("cannot encode the request as PEM: {error}"))?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, pem)?;
            eprintln!(
                "wrote {}: give it to the CA operator to certify as an RA (id-kp-cmcRA); \
                 the certificate they return is ca.ra_certificate",
                path.display()
            );
        }
        None => print!("{pem}"),
    }
    Ok(())
}
