//! `smartsign-ctl keys clone-request | clone-export | clone-import`: the system keys copied to a
//! second HSM (a standby, another site, a second node) without plaintext, under the SO quorum.
//! The HSM side is `hsm_adapter::clone`; this file moves its public data through files.

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hsm_adapter::SystemKey;
use hsm_adapter::clone::{CloneBundle, ClonedKey, TransportKey};
use serde_json::{Value, json};

use crate::hsm_opts::{SoPinArgs, TokenArgs};

type BoxError = Box<dyn std::error::Error>;

/// Arguments of `keys clone-request`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Run on the TARGET token (the new HSM), before clone-export. It makes a \
transport key pair there (as the security officer) and writes its public key; read the printed \
fingerprint aloud to the officers at the source, who type it into clone-export."
)]
pub(crate) struct RequestArgs {
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    so_pin: SoPinArgs,
    /// Where the transport public key (PEM) goes.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Arguments of `keys clone-export`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Run on the SOURCE token, with the daemon stopped. The SO quorum marks \
the target's transport key trusted for this one export, once its fingerprint matches the one \
the officers confirmed, and every system key leaves wrapped for it. The bundle is useless \
without the target token."
)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    so_pin: SoPinArgs,
    /// The transport public key that `clone-request` wrote on the target.
    #[arg(long, value_name = "FILE")]
    transport_key: PathBuf,
    /// Its SHA-256 fingerprint as the officers read it off the target (hex).
    #[arg(long, value_name = "HEX")]
    fingerprint: String,
    /// Where the bundle (JSON) goes.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Arguments of `keys clone-import`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Run on the TARGET token, which must hold no system key yet. Every key \
is unwrapped with the same template and attributes as on the source (the KEK as the security \
officer), the transport key pair is destroyed, and every key is checked against the key \
policy."
)]
pub(crate) struct ImportArgs {
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    so_pin: SoPinArgs,
    /// The bundle that `clone-export` wrote.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// SHA-256 of the source's audit public key (hex), as `clone-export` printed it or the
    /// source's ceremony transcript lists it: the bundle must come from that key.
    #[arg(long, value_name = "HEX")]
    source_audit_key_sha256: String,
}

pub(crate) async fn request(args: RequestArgs) -> Result<(), BoxError> {
    let so_pin = args.so_pin.pin()?;
    let hsm = args.token.open().await?;
    let transport = hsm.clone_request(&so_pin).await;
    hsm.shutdown().await;
    let transport = transport?;
    let pem = der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, &transport.spki_der)
        .map_err(|error| format!("cannot encode the transport key: {error}"))?;
    std::fs::write(&args.out, pem)
        .map_err(|error| format!("cannot write {}: {error}", args.out.display()))?;
    eprintln!("wrote the transport public key to {}", args.out.display());
    println!("{}", transport.fingerprint());
    Ok(())
}

pub(crate) async fn export(args: ExportArgs) -> Result<(), BoxError> {
    let so_pin = args.so_pin.pin()?;
    let pem = std::fs::read_to_string(&args.transport_key)
        .map_err(|error| format!("cannot read {}: {error}", args.transport_key.display()))?;
    let (label, spki_der) = der::pem::decode_vec(pem.as_bytes())
        .map_err(|error| format!("{}: {error}", args.transport_key.display()))?;
    if label != "PUBLIC KEY" {
        return Err(format!("{} is not a PUBLIC KEY", args.transport_key.display()).into());
    }
    let hsm = args.token.open().await?;
    let bundle = hsm
        .clone_export(&so_pin, TransportKey { spki_der }, args.fingerprint.clone())
        .await;
    hsm.shutdown().await;
    let bundle = bundle?;
    let keys: Vec<Value> = bundle
        .keys
        .iter()
        .map(|k| {
            json!({"label": k.key.label(), "id": hex::encode(&k.id),
                   "wrapped": STANDARD.encode(&k.wrapped),
                   "ec_point": k.ec_point.as_ref().map(|p| STANDARD.encode(p))})
        })
        .collect();
    let file = json!({
        "format": "smartsign-clone-v1",
        "transport_sha256": bundle.transport_fingerprint,
        "wrapped_transfer_key": STANDARD.encode(&bundle.wrapped_transfer_key),
        "keys": keys,
        "signature": STANDARD.encode(&bundle.signature),
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&file)?)
        .map_err(|error| format!("cannot write {}: {error}", args.out.display()))?;
    eprintln!(
        "wrote {} system keys, wrapped for transport key {}, to {}; give clone-import the \
         source's audit key fingerprint below",
        bundle.keys.len(),
        bundle.transport_fingerprint,
        args.out.display()
    );
    println!("{}", bundle.source_audit_sha256()?);
    Ok(())
}

pub(crate) async fn import(args: ImportArgs) -> Result<(), BoxError> {
    let so_pin = args.so_pin.pin()?;
    let text = std::fs::read(&args.input)
        .map_err(|error| format!("cannot read {}: {error}", args.input.display()))?;
    let bundle = parse_bundle(&serde_json::from_slice(&text)?)
        .map_err(|error| format!("{}: {error}", args.input.display()))?;
    let count = bundle.keys.len();
    let hsm = args.token.open().await?;
    let imported = hsm
        .clone_import(&so_pin, bundle, args.source_audit_key_sha256.clone())
        .await;
    hsm.shutdown().await;
    imported?;
    println!(
        "imported {count} system keys; the transport key is destroyed; all pass the key policy"
    );
    Ok(())
}

fn parse_bundle(file: &Value) -> Result<CloneBundle, BoxError> {
    if file["format"] != "smartsign-clone-v1" {
        return Err("not a smartsign-clone-v1 bundle".into());
    }
    let text = |v: &Value, what: &str| -> Result<String, BoxError> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{what} is missing").into())
    };
    let bytes = |v: &Value, what: &str| -> Result<Vec<u8>, BoxError> {
        Ok(STANDARD.decode(text(v, what)?)?)
    };
    let mut keys = Vec::new();
    for entry in file["keys"].as_array().ok_or("keys is missing")? {
        let label = text(&entry["label"], "label")?;
        let key = SystemKey::ALL
            .into_iter()
            .find(|k| k.label() == label)
            .ok_or_else(|| format!("unknown system key {label}"))?;
        keys.push(ClonedKey {
            key,
            id: hex::decode(text(&entry["id"], "id")?)?,
            wrapped: bytes(&entry["wrapped"], "wrapped")?,
            ec_point: match &entry["ec_point"] {
                Value::Null => None,
                point => Some(bytes(point, "ec_point")?),
            },
        });
    }
    Ok(CloneBundle {
        transport_fingerprint: text(&file["transport_sha256"], "transport_sha256")?,
        wrapped_transfer_key: bytes(&file["wrapped_transfer_key"], "wrapped_transfer_key")?,
        keys,
        signature: bytes(&file["signature"], "signature")?,
    })
}
