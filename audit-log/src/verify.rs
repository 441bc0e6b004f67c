//! Offline verification of an auditor's export: records from index 0, a checkpoint and the audit
//! public key, with nothing trusted but the key.

use crate::checkpoint::{AuditPublicKey, Checkpoint, Origin};
use crate::error::AuditError;
use crate::merkle::{RootBuilder, TreeHash, leaf_hash};
use crate::record::check_line;
use crate::time::Timestamp;

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Records verified (the checkpoint's tree size).
    pub records: u64,
    /// Their Merkle root, equal to the checkpoint's.
    pub root_hash: TreeHash,
    /// The checkpoint's origin.
    pub origin: Origin,
    /// The checkpoint's time.
    pub timestamp: Timestamp,
}

/// Verifies an export:
///
/// 1. `public_key_pem` is a P-256 SubjectPublicKeyInfo;
/// 2. `checkpoint_json` is a well-formed checkpoint whose signature verifies under that key;
/// 3. `records` is NDJSON, every line `\n`-terminated and in the records' canonical compact form,
///    with indexes 0, 1, 2, ... and exactly as many records as the checkpoint covers;
/// 4. their Merkle root is the checkpoint's.
///
/// The first failure is returned, naming the line and byte offset for a record.
pub fn verify_export(
    records: &[u8],
    checkpoint_json: &[u8],
    public_key_pem: &str,
) -> Result<VerifyReport, AuditError> {
    let key = AuditPublicKey::from_spki_pem(public_key_pem)?;
    let checkpoint = Checkpoint::from_json(checkpoint_json)?;
    checkpoint.verify(&key)?;

    let mut tree = RootBuilder::new();
    let mut rest = records;
    let mut offset = 0u64;
    while !rest.is_empty() {
        let line = tree.size() + 1;
        let bad = |reason: String| AuditError::InvalidRecord {
            line,
            offset,
            reason,
        };
        if tree.size() == checkpoint.tree_size() {
            return Err(bad(format!(
                "beyond the {} records the checkpoint covers; export exactly those",
                checkpoint.tree_size()
            )));
        }
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(bad("no newline at the end of the record".into()));
        };
        let content = &rest[..end];
        let index = check_line(content).map_err(bad)?;
        if index != tree.size() {
            return Err(bad(format!(
                "index {index} where {} was expected",
                tree.size()
            )));
        }
        tree.push(leaf_hash(content));
        rest = &rest[end + 1..];
        offset += end as u64 + 1;
    }
    if tree.size() != checkpoint.tree_size() {
        return Err(AuditError::RecordCountMismatch {
            records: tree.size(),
            tree_size: checkpoint.tree_size(),
        });
    }
    let computed = tree.root();
    if computed != *checkpoint.root_hash() {
        return Err(AuditError::RootMismatch {
            tree_size: checkpoint.tree_size(),
            expected: *checkpoint.root_hash(),
            computed,
        });
    }
    Ok(VerifyReport {
        records: tree.size(),
        root_hash: computed,
        origin: checkpoint.origin().clone(),
        timestamp: checkpoint.timestamp().clone(),
    })
}
