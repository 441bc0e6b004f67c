//! `smartsign-ctl audit verify` and `audit verify-receipt`: check an audit export, the records
//! added since an earlier checkpoint, or a signing receipt offline, with `audit_log`'s verifiers
//! (`verify_export`, `verify_since`, `verify_receipt`), trusting nothing but the key.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use audit_log::{AuditError, TreeHash, verify_export, verify_receipt, verify_since};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  smartsign-ctl audit verify --records audit.ndjson --checkpoint checkpoint.json \\
      --public-key audit-key.pem
  smartsign-ctl audit verify --since-checkpoint old.json --checkpoint new.json \\
      --records since.ndjson --consistency-proof proof.json --public-key audit-key.pem")]
pub(crate) struct VerifyArgs {
    /// The records as NDJSON from index 0, exactly the checkpoint's tree size of them
    /// (`GET /v1/audit/records?from=0&limit=<tree_size>`). With --since-checkpoint: the records
    /// added since, from the old checkpoint's tree size to the new one's
    /// (`GET /v1/audit/records?from=<old tree_size>&limit=<the difference>`).
    #[arg(long)]
    records: PathBuf,
    /// The signed checkpoint JSON (`GET /v1/audit/checkpoint`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// An earlier checkpoint, verified before (e.g. a line of checkpoints.ndjson, or a
    /// monitor's last): verify the new checkpoint, the consistency proof from the old one, and
    /// that --records are exactly the records added since.
    #[arg(long, value_name = "OLD.json")]
    since_checkpoint: Option<PathBuf>,
    /// The consistency proof from the old checkpoint's tree size to the new one's, as
    /// `GET /v1/audit/proofs/consistency?first=<old>&second=<new>` gives it (`{"hashes": [...]}`);
    /// not needed when the old tree is empty or as large as the new one.
    #[arg(long, value_name = "PROOF.json", requires = "since_checkpoint")]
    consistency_proof: Option<PathBuf>,
    /// The audit public key, a P-256 SubjectPublicKeyInfo in PEM (`GET /v1/audit/public-key`,
    /// obtained out of band for a real audit).
    #[arg(long)]
    public_key: PathBuf,
}

/// Why `audit verify` did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyCommandError {
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
    #[error("the records since the old checkpoint do NOT verify: {0}")]
    SinceFailed(AuditError),
    #[error("{}: not a consistency proof ({{\"hashes\": [hex, ...]}}): {reason}", path.display())]
    BadProofFile { path: PathBuf, reason: String },
    #[error("receipt does NOT verify: {0}")]
    ReceiptFailed(AuditError),
}

/// Arguments of `audit verify-receipt`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:
  smartsign-ctl audit verify-receipt receipt.json --public-key audit-key.pem
The receipt is GET /v1/signing-requests/{id}/receipt, as the service that made the request
received it.")]
pub(crate) struct VerifyReceiptArgs {
    /// The receipt JSON.
    receipt: PathBuf,
    /// The audit public key, a P-256 SubjectPublicKeyInfo in PEM, obtained out of band.
    #[arg(long)]
    public_key: PathBuf,
}

/// Verifies a signing receipt; prints what it proves, or returns the precise failure.
pub(crate) fn verify_receipt_cmd(args: VerifyReceiptArgs) -> Result<(), Box<dyn Error>> {
    let receipt = read(&args.receipt)?;
    let public_key = read_pem(&args.public_key)?;
    let report =
        verify_receipt(&receipt, &public_key).map_err(VerifyCommandError::ReceiptFailed)?;
    println!(
        "OK: request {} was signed, and the log holds its record",
        report.request_id
    );
    println!("  service:          {}", report.service);
    if report.hashes.is_empty() {
        println!(
            "  hash:             {} {}",
            report.hash_algorithm, report.hash
        );
    } else {
        println!(
            "  batch:            {} hashes, SHA-256 of them {}",
            report.hashes.len(),
            report.hash
        );
        for (index, hash) in report.hashes.iter().enumerate() {
            println!("  hash {index:>3}:        {} {hash}", report.hash_algorithm);
        }
    }
    println!("  certificate:      serial {}", report.serial);
    println!("  signed at:        {}", report.time);
    println!("  record index:     {}", report.index);
    println!(
        "  checkpoint:       {} records, root {}, {}",
        report.tree_size, report.root_hash, report.timestamp
    );
    println!("  origin:           {}", report.origin.as_str());
    println!(
        "  signature:        valid under {}",
        args.public_key.display()
    );
    Ok(())
}

fn read_pem(path: &Path) -> Result<String, VerifyCommandError> {
    String::from_utf8(read(path)?).map_err(|_| VerifyCommandError::NotText {
        path: path.to_owned(),
    })
}

/// Reads a consistency proof as the API gives it: `{"hashes": [hex, ...]}`.
pub(crate) fn proof_hashes(bytes: &[u8], path: &Path) -> Result<Vec<TreeHash>, VerifyCommandError> {
    let bad = |reason: String| VerifyCommandError::BadProofFile {
        path: path.to_owned(),
        reason,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Proof {
        hashes: Vec<TreeHash>,
    }
    serde_json::from_slice::<Proof>(bytes)
        .map(|proof| proof.hashes)
        .map_err(|error| bad(error.to_string()))
}

/// Verifies the export; prints what was established on stdout, or returns the precise failure.
pub(crate) fn verify(args: VerifyArgs) -> Result<(), Box<dyn Error>> {
    let records = read(&args.records)?;
    let checkpoint = read(&args.checkpoint)?;
    let public_key = read_pem(&args.public_key)?;
    if let Some(old) = &args.since_checkpoint {
        let old_checkpoint = read(old)?;
        let proof = match &args.consistency_proof {
            Some(path) => proof_hashes(&read(path)?, path)?,
            None => Vec::new(),
        };
        let report = verify_since(&old_checkpoint, &checkpoint, &proof, &records, &public_key)
            .map_err(VerifyCommandError::SinceFailed)?;
        println!(
            "OK: {} records added since the old checkpoint verified",
            report.new_size - report.old_size
        );
        println!("  origin:           {}", report.origin.as_str());
        println!(
            "  old tree size:    {} (a prefix of the new tree)",
            report.old_size
        );
        println!("  new tree size:    {}", report.new_size);
        println!("  new root hash:    {}", report.root_hash);
        println!("  checkpoint time:  {}", report.timestamp);
        println!(
            "  signatures:       both valid under {}",
            args.public_key.display()
        );
        return Ok(());
    }
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
            since_checkpoint: None,
            consistency_proof: None,
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

    #[tokio::test]
    async fn verifies_records_since_an_old_checkpoint_and_refuses_any_change() {
        let dir = tempfile::tempdir().unwrap();
        let signer = SoftwareSigner::from_secret_scalar(&[5; 32]).unwrap();
        let log = AuditLog::open(
            dir.path().join("log"),
            AuditLogConfig::new(Origin::new("test/audit").unwrap()),
        )
        .await
        .unwrap();
        let event = |i: u64| {
            AuditEvent::new(
                EventName::new("account.suspended").unwrap(),
                Actor::new("registrar:test").unwrap(),
            )
            .with_field("account_id", format!("u-{i}"))
        };
        for i in 0..5 {
            log.append(event(i)).await.unwrap();
        }
        let old = log.checkpoint(&signer).await.unwrap();
        for i in 5..13 {
            log.append(event(i)).await.unwrap();
        }
        let new = log.checkpoint(&signer).await.unwrap();
        let since = log.records(5, 8).await.unwrap();
        let proof = log.consistency_proof(5, 13).unwrap();
        let hex: Vec<String> = proof.iter().map(TreeHash::to_hex).collect();
        let path = |name: &str| dir.path().join(name);
        fs::write(path("old.json"), old.to_json()).unwrap();
        fs::write(path("new.json"), new.to_json()).unwrap();
        fs::write(
            path("proof.json"),
            serde_json::json!({ "hashes": hex }).to_string(),
        )
        .unwrap();
        fs::write(path("key.pem"), signer.public_key().to_spki_pem().unwrap()).unwrap();
        let args = || VerifyArgs {
            records: path("since.ndjson"),
            checkpoint: path("new.json"),
            public_key: path("key.pem"),
            since_checkpoint: Some(path("old.json")),
            consistency_proof: Some(path("proof.json")),
        };
        fs::write(path("since.ndjson"), &since).unwrap();
        verify(args()).unwrap();

        let text = String::from_utf8(since).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let changed = text.replacen("u-7", "u-8", 1);
        let dropped = lines[..7]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        let swapped = [lines[1], lines[0]]
            .into_iter()
            .chain(lines[2..].iter().copied())
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        for (what, records) in [
            ("changed", changed),
            ("dropped", dropped),
            ("swapped", swapped),
        ] {
            fs::write(path("since.ndjson"), records).unwrap();
            let error = verify(args()).unwrap_err().to_string();
            assert!(error.contains("do NOT verify"), "{what}: {error}");
        }
        // A proof for another old tree does not verify.
        fs::write(path("since.ndjson"), text).unwrap();
        let other: Vec<String> = log
            .consistency_proof(6, 13)
            .unwrap()
            .iter()
            .map(TreeHash::to_hex)
            .collect();
        fs::write(
            path("proof.json"),
            serde_json::json!({ "hashes": other }).to_string(),
        )
        .unwrap();
        assert!(verify(args()).is_err());
    }
}
