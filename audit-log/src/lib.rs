//! `audit-log`: smartsign's tamper-evident, append-only audit log.
//!
//! It owns one directory: a file of records (one compact JSON line each, appended durably with
//! group commit), the RFC 9162 Merkle tree over them (its full hash tiles on disk in the C2SP
//! tlog-tiles layout, its right edge in memory), inclusion and consistency proofs, and the latest
//! checkpoint signed through a [`CheckpointSigner`] (the HSM audit key in the daemon). [`verify_export`] checks an auditor's export offline. It does not
//! decide what is audited or serve HTTP: the daemon does, and maps [`AuditError::kind`] to its
//! problems.
//!
//! With a [`Ledger`] (several nodes: PostgreSQL in the daemon) the records are durable and numbered
//! in the ledger first, and the directory is this node's full copy of one log shared by all
//! nodes: see [`AuditLogConfig::with_ledger`].
//!
//! A record's leaf hash is SHA-256(0x00 || line), the line as stored and served, without its
//! newline; records have one canonical spelling (see [`AuditEvent`] and the `record` module), so
//! the log refuses at open any line it could not have written.

#![forbid(unsafe_code)]

mod checkpoint;
mod error;
mod files;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod index;
mod ledger;
mod log;
mod merkle;
mod offsets;
mod record;
mod tiles;
mod time;
mod transcript;
mod tree_state;
mod verify;

pub use checkpoint::{AuditPublicKey, Checkpoint, CheckpointSigner, Origin, SoftwareSigner};
pub use error::{AuditError, ErrorKind, SignerError};
pub use index::RecordFilter;
pub use ledger::{Ledger, LedgerError};
pub use log::{
    AppendReceipt, AuditLog, AuditLogConfig, AuditStats, CHECKPOINT_FILE, CHECKPOINT_HISTORY_FILE,
    LOG_FILE, RecordPage,
};
pub use merkle::{TreeHash, empty_root, leaf_hash, verify_consistency, verify_inclusion};
pub use record::{Actor, AuditEvent, EventName, MAX_RECORD_LEN};
pub use time::{Clock, SystemClock, Timestamp};
pub use transcript::Transcript;
pub use verify::{
    ReceiptReport, SinceReport, VerifyReport, verify_export, verify_receipt, verify_since,
};
