//! `smartsign-ctl audit verify`: checks an audit export offline (records, checkpoint, public
//! key) with `audit_log::verify_export`, trusting nothing but the key.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use audit_log::{AuditError, verify_export};

#[derive(clap::Args, Debug)]
pub(crate) struct VerifyArgs {
    /// The records as NDJSON from index 0, exactly the checkpoint's tree size of them
    /// (`GET /v1/audit/records?from=0&limit=<tree_size>`).
    #[arg(long)]
    records: PathBuf,
    /// The signed checkpoint JSON (`GET /v1/audit/checkpoint`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The audit public key, a P-256 SubjectPublicKeyInfo in PEM (`GET /v1/audit/public-key`,
    /// obtained out of band for a real audit).
    #[arg(long)]
    public_key: PathBuf,
}

/// Why `audit verify` did not succeed.
#[derive(Debug, thiserror::Error)]
enum VerifyCommandError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not UTF-8 PEM", path.display())]
    NotText { path: PathBuf },
    // The cause is in the message on purpose: it is the one line the auditor needs.
    #[error("audit export does NOT verify: {0}")]
    Failed(AuditError),
}

/// Verifies the export; prints what was established on stdout, or returns the precise failure.
pub(crate) fn verify(args: VerifyArgs) -> Result<(), Box<dyn Error>> {
    let records = read(&args.records)?;
    let checkpoint = read(&args.checkpoint)?;
    let public_key =
        String::from_utf8(read(&args.public_key)?).map_err(|_| VerifyCommandError::NotText {
            path: args.public_key.clone(),
        })?;
    let report =
        verify_export(&records, &checkpoint, &public_key).map_err(VerifyCommandError::Failed)?;
    println!("OK: {} records verified", report.records);
    println!("  origin:           {}", report.origin.as_str());
    println!("  tree size:        {}", report.records);
    println!("  root hash:        {}", report.root_hash);
    println!("  checkpoint time:  {}", report.timestamp);
    println!(
        "  signature:        valid under {}",
        args.public_key.display()
    );
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, VerifyCommandError> {
    fs::read(path).map_err(|source| VerifyCommandError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use audit_log::{
        Actor, AuditEvent, AuditLog, AuditLogConfig, EventName, Origin, SoftwareSigner,
    };

    use super::*;

    #[tokio::test]
    async fn verifies_an_export_and_names_a_damaged_line() {
        let dir = tempfile::tempdir().unwrap();
        let signer = SoftwareSigner::from_secret_scalar(&[3; 32]).unwrap();
        let log = AuditLog::open(
            dir.path().join("log"),
            AuditLogConfig::new(Origin::new("test/audit").unwrap()),
        )
        .await
        .unwrap();
        for i in 0..4 {
            let event = AuditEvent::new(
                EventName::new("account.suspended").unwrap(),
                Actor::new("registrar:test").unwrap(),
            )
            .with_field("account_id", format!("u-{i}"));
            log.append(event).await.unwrap();
        }
        let checkpoint = log.checkpoint(&signer).await.unwrap();
        let records = log.records(0, 4).await.unwrap();
        let args = || VerifyArgs {
            records: dir.path().join("records.ndjson"),
            checkpoint: dir.path().join("checkpoint.json"),
            public_key: dir.path().join("key.pem"),
        };
        fs::write(&args().records, &records).unwrap();
        fs::write(&args().checkpoint, checkpoint.to_json()).unwrap();
        fs::write(
            &args().public_key,
            signer.public_key().to_spki_pem().unwrap(),
        )
        .unwrap();
        verify(args()).unwrap();

        let damaged = String::from_utf8(records)
            .unwrap()
            .replacen("\"index\":2", "\"index\":9", 1);
        fs::write(&args().records, damaged).unwrap();
        let error = verify(args()).unwrap_err().to_string();
        assert!(error.contains("does NOT verify: record line 3"), "{error}");

        fs::remove_file(&args().checkpoint).unwrap();
        let error = verify(args()).unwrap_err().to_string();
        assert!(error.contains("checkpoint.json"), "{error}");
    }
}
