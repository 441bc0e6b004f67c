//! Offline verification, with nothing trusted but the audit public key: an auditor's export
//! (records from index 0 and a checkpoint), the records added since an earlier checkpoint (with
//! the consistency proof between the two), and a signing receipt (one record, its inclusion
//! proof and the checkpoint it leads to).

use serde::Deserialize;
use serde_json::Value;

use crate::checkpoint::{AuditPublicKey, Checkpoint, Origin};
use crate::error::AuditError;
use crate::merkle::{
    RootBuilder, TreeHash, frontier_from_consistency, leaf_hash, verify_consistency,
    verify_inclusion,
};
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
    push_records(&mut tree, records, checkpoint.tree_size())?;
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

/// Pushes the leaf hashes of `records` (NDJSON, each line `\n`-terminated, in canonical form,
/// with the indexes that follow the tree's size) onto `tree`, refusing any past `until`.
fn push_records(tree: &mut RootBuilder, records: &[u8], until: u64) -> Result<(), AuditError> {
    let mut rest = records;
    let mut offset = 0u64;
    let mut line = 0u64;
    while !rest.is_empty() {
        line += 1;
        let bad = |reason: String| AuditError::InvalidRecord {
            line,
            offset,
            reason,
        };
        if tree.size() == until {
            return Err(bad(format!(
                "beyond the {until} records the checkpoint covers; export exactly those"
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
    Ok(())
}

/// What [`verify_since`] established.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinceReport {
    /// The earlier checkpoint's tree size.
    pub old_size: u64,
    /// The new checkpoint's tree size.
    pub new_size: u64,
    /// The new checkpoint's root, equal to the one computed from the old tree and the records.
    pub root_hash: TreeHash,
    /// The checkpoints' origin.
    pub origin: Origin,
    /// The new checkpoint's time.
    pub timestamp: Timestamp,
}

/// Verifies a new checkpoint against an earlier one that the auditor verified before:
///
/// 1. both checkpoints are well formed, signed under `public_key_pem`, with the same origin, and
///    the new one covers at least as many records;
/// 2. `consistency_proof` proves (RFC 9162 §2.1.4) the old tree a prefix of the new one;
/// 3. `records` (NDJSON) are exactly the records `old.tree_size .. new.tree_size`: the old
///    tree's frontier (its complete subtrees, carried by the proof, which fold to the old signed
///    root), extended by these records' leaf hashes, gives the new signed root. A record changed,
///    dropped, added or moved changes that root.
///
/// Equal sizes need equal roots, an empty proof and no records.
pub fn verify_since(
    old_checkpoint_json: &[u8],
    new_checkpoint_json: &[u8],
    consistency_proof: &[TreeHash],
    records: &[u8],
    public_key_pem: &str,
) -> Result<SinceReport, AuditError> {
    let key = AuditPublicKey::from_spki_pem(public_key_pem)?;
    let old = Checkpoint::from_json(old_checkpoint_json)?;
    let new = Checkpoint::from_json(new_checkpoint_json)?;
    old.verify(&key)?;
    new.verify(&key)?;
    if old.origin() != new.origin() {
        return Err(AuditError::InvalidCheckpoint(format!(
            "the new checkpoint is of log {:?}, the old one of {:?}",
            new.origin().as_str(),
            old.origin().as_str()
        )));
    }
    let (m, n) = (old.tree_size(), new.tree_size());
    if n < m {
        return Err(AuditError::InvalidProof(format!(
            "the new checkpoint covers {n} records, fewer than the {m} of the old one: the log \
             was cut or replaced"
        )));
    }
    if m == n {
        // Equal sizes: the same root (and so the same records), nothing added.
        if m > 0 {
            verify_consistency(m, n, old.root_hash(), new.root_hash(), consistency_proof)?;
        } else if !consistency_proof.is_empty() {
            return Err(AuditError::InvalidProof(
                "a proof between empty trees must be empty".into(),
            ));
        }
        if !records.is_empty() {
            return Err(AuditError::RecordCountMismatch {
                records: records.iter().filter(|&&b| b == b'\n').count() as u64,
                tree_size: 0,
            });
        }
    }
    let mut tree = if m == 0 {
        if !consistency_proof.is_empty() {
            return Err(AuditError::InvalidProof(
                "a proof from the empty tree must be empty".into(),
            ));
        }
        RootBuilder::new()
    } else if m == n {
        return Ok(SinceReport {
            old_size: m,
            new_size: n,
            root_hash: *new.root_hash(),
            origin: new.origin().clone(),
            timestamp: new.timestamp().clone(),
        });
    } else {
        verify_consistency(m, n, old.root_hash(), new.root_hash(), consistency_proof)?;
        let frontier = frontier_from_consistency(m, n, old.root_hash(), consistency_proof)?;
        RootBuilder::from_frontier(m, &frontier)?
    };
    push_records(&mut tree, records, n)?;
    if tree.size() != n {
        return Err(AuditError::RecordCountMismatch {
            records: tree.size() - m,
            tree_size: n - m,
        });
    }
    let computed = tree.root();
    if computed != *new.root_hash() {
        return Err(AuditError::RootMismatch {
            tree_size: n,
            expected: *new.root_hash(),
            computed,
        });
    }
    Ok(SinceReport {
        old_size: m,
        new_size: n,
        root_hash: computed,
        origin: new.origin().clone(),
        timestamp: new.timestamp().clone(),
    })
}

/// A signing receipt as `GET /v1/signing-requests/{id}/receipt` gives it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReceipt {
    record: String,
    index: u64,
    inclusion_proof: Vec<String>,
    checkpoint: Value,
}

/// What [`verify_receipt`] established: this `signing.signed` record is record `index` of the
/// log whose signed checkpoint is given.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiptReport {
    /// The record's index.
    pub index: u64,
    /// The record line.
    pub record: String,
    /// The record's time.
    pub time: String,
    /// `fields.request_id`.
    pub request_id: String,
    /// `fields.service`.
    pub service: String,
    /// `fields.hash_algorithm`.
    pub hash_algorithm: String,
    /// `fields.hash` (hex): the hash signed, or for a batch the SHA-256 of its hashes
    /// concatenated (what the device's batch statement names).
    pub hash: String,
    /// `fields.hashes` (hex, in order): a batch's hashes; empty for a single hash.
    pub hashes: Vec<String>,
    /// `fields.serial`: the signer's certificate.
    pub serial: String,
    /// The checkpoint's tree size.
    pub tree_size: u64,
    /// The checkpoint's root.
    pub root_hash: TreeHash,
    /// The checkpoint's origin.
    pub origin: Origin,
    /// The checkpoint's time.
    pub timestamp: Timestamp,
}

/// Verifies a signing receipt: the checkpoint is well formed and signed under `public_key_pem`;
/// the record is a record in its canonical form whose `index` is the receipt's; its leaf hash,
/// SHA-256(0x00 || record), with the inclusion proof leads to the checkpoint's root at its tree
/// size (RFC 9162 §2.1.3.2); and it is a `signing.signed` record.
pub fn verify_receipt(
    receipt_json: &[u8],
    public_key_pem: &str,
) -> Result<ReceiptReport, AuditError> {
    let key = AuditPublicKey::from_spki_pem(public_key_pem)?;
    let receipt: WireReceipt = serde_json::from_slice(receipt_json)
        .map_err(|error| AuditError::InvalidReceipt(format!("not a receipt: {error}")))?;
    let checkpoint_json = serde_json::to_vec(&receipt.checkpoint)
        .map_err(|error| AuditError::InvalidReceipt(format!("checkpoint: {error}")))?;
    let checkpoint = Checkpoint::from_json(&checkpoint_json)?;
    checkpoint.verify(&key)?;
    let record = receipt.record.as_bytes();
    let index = check_line(record)
        .map_err(|reason| AuditError::InvalidReceipt(format!("record: {reason}")))?;
    if index != receipt.index {
        return Err(AuditError::InvalidReceipt(format!(
            "the record carries index {index}, the receipt says {}",
            receipt.index
        )));
    }
    let proof = receipt
        .inclusion_proof
        .iter()
        .map(|hash| TreeHash::from_hex(hash))
        .collect::<Result<Vec<_>, _>>()?;
    verify_inclusion(
        &leaf_hash(record),
        index,
        checkpoint.tree_size(),
        &proof,
        checkpoint.root_hash(),
    )?;
    let value: Value = serde_json::from_slice(record)
        .map_err(|error| AuditError::InvalidReceipt(format!("record: {error}")))?;
    if value["event"] != "signing.signed" {
        return Err(AuditError::InvalidReceipt(format!(
            "the record is a {} record, not signing.signed",
            value["event"]
        )));
    }
    let field = |name: &str| {
        value["fields"][name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| AuditError::InvalidReceipt(format!("the record has no {name}")))
    };
    Ok(ReceiptReport {
        index,
        record: receipt.record.clone(),
        time: value["time"].as_str().unwrap_or_default().to_owned(),
        request_id: field("request_id")?,
        service: field("service")?,
        hash_algorithm: field("hash_algorithm")?,
        hash: field("hash")?,
        hashes: match &value["fields"]["hashes"] {
            Value::Null => Vec::new(),
            Value::Array(list) => list
                .iter()
                .map(|hash| hash.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    AuditError::InvalidReceipt("the record's hashes are not strings".into())
                })?,
            _ => {
                return Err(AuditError::InvalidReceipt(
                    "the record's hashes are not a list".into(),
                ));
            }
        },
        serial: field("serial")?,
        tree_size: checkpoint.tree_size(),
        root_hash: *checkpoint.root_hash(),
        origin: checkpoint.origin().clone(),
        timestamp: checkpoint.timestamp().clone(),
    })
}
