//! The crate's one error type, and the coarse kinds the daemon maps to HTTP problems.

use std::io;
use std::path::PathBuf;

use crate::ledger::LedgerError;
use crate::merkle::TreeHash;

/// Everything that can go wrong in the audit log, its proofs and its offline verification.
///
/// Variants keep their cause (file, line, byte offset, the failed check) so that an operator or
/// an auditor can find the damage without a debugger. [`AuditError::kind`] sorts them for callers
/// that only need to decide how to answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A file-system operation failed; `context` says which one and on which path.
    #[error("{context}: {source}")]
    Io {
        /// The operation and path, e.g. "fsync of /var/lib/smartsign/audit/audit.log".
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Another process (or another handle in this process) holds the log directory's lock.
    #[error("audit log directory {} is locked by another process", dir.display())]
    Locked {
        /// The log directory.
        dir: PathBuf,
    },

    /// The log file is damaged somewhere other than a torn last line. Never repaired: an
    /// operator must look at it.
    #[error(
        "audit log {} is corrupt at line {line} (byte offset {offset}): {reason}",
        path.display()
    )]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Byte offset of the start of that line.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// The stored checkpoint cannot be read, or the log does not match it (records lost or
    /// rewritten). Never repaired.
    #[error("audit checkpoint {}: {reason}", path.display())]
    CheckpointMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },

    /// A file the log derives from `audit.log` (a hash tile, the tree state, the record offsets)
    /// is missing, damaged, or does not match the log. At open the log warns and rebuilds what
    /// it needs from `audit.log`; after open the request that found it fails, and nothing is
    /// served from it.
    #[error("{} does not match audit.log: {reason}", path.display())]
    DerivedMismatch {
        /// The derived file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },

    /// The log cannot take appends: its writer failed (write or fsync error) or has stopped.
    /// Signing must stop until the log is reopened (fail closed).
    #[error("audit log unavailable: {reason}")]
    Unavailable {
        /// Why, for `/readyz` and the daemon's log.
        reason: String,
    },

    /// The event handed to `append` cannot be recorded (bad name, float, too large, ...).
    #[error("invalid audit event: {0}")]
    InvalidEvent(String),

    /// A proof or record range was asked for outside the tree (e.g. index ≥ tree size).
    #[error("invalid range: {0}")]
    InvalidRange(String),

    /// An inclusion or consistency proof does not verify.
    #[error("proof does not verify: {0}")]
    InvalidProof(String),

    /// A record of an export is malformed: not canonical compact JSON, a wrong index, or no
    /// terminating newline.
    #[error("record line {line} (byte offset {offset}): {reason}")]
    InvalidRecord {
        /// 1-based line number in the export.
        line: u64,
        /// Byte offset of the start of that line.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// The export does not hold exactly the records the checkpoint covers.
    #[error("the export holds {records} records but the checkpoint covers {tree_size}")]
    RecordCountMismatch {
        /// Records in the export.
        records: u64,
        /// The checkpoint's tree size.
        tree_size: u64,
    },

    /// The records' Merkle root differs from the checkpoint's.
    #[error("Merkle root of the {tree_size} records is {computed}, the checkpoint says {expected}")]
    RootMismatch {
        /// The tree size both refer to.
        tree_size: u64,
        /// The checkpoint's root.
        expected: TreeHash,
        /// The root computed from the records.
        computed: TreeHash,
    },

    /// A checkpoint is malformed (JSON, field, hex, base64, DER, origin, timestamp).
    #[error("invalid checkpoint: {0}")]
    InvalidCheckpoint(String),

    /// A checkpoint's signature does not verify under the audit public key.
    #[error("checkpoint signature does not verify under the audit public key")]
    BadCheckpointSignature,

    /// A ceremony transcript's signature does not verify under the audit public key.
    #[error("the ceremony transcript's signature does not verify under the audit public key")]
    BadTranscriptSignature,

    /// A ceremony transcript is not one (not a JSON object with a base64 signature).
    #[error("invalid ceremony transcript: {0}")]
    InvalidTranscript(String),

    /// The audit public key is not a P-256 SubjectPublicKeyInfo in PEM or DER.
    #[error("invalid audit public key: {0}")]
    InvalidPublicKey(String),

    /// The checkpoint signer (the HSM audit key in the daemon) failed.
    #[error(transparent)]
    Signer(#[from] SignerError),

    /// The clock gave a time that cannot be written as an RFC 3339 UTC time (before 1970 or
    /// after 9999).
    #[error("clock: {0}")]
    Clock(String),

    /// The shared ledger (several nodes) failed: appends fail until it answers again, without
    /// reopening the log.
    #[error(transparent)]
    Ledger(#[from] LedgerError),

    /// What the shared ledger holds does not match the local copy of the log, or itself: a record
    /// that does not check, a record that differs from the local copy's, fewer records than the
    /// local copy (the ledger was replaced or restored from an older backup), a checkpoint that
    /// does not match the records. Never repaired: an operator must look at it.
    #[error("the audit ledger does not match the log: {reason}")]
    LedgerMismatch {
        /// What does not match.
        reason: String,
    },

    /// The record index (`index.sqlite`, derived from `audit.log`) cannot be read or written.
    /// Appends are not affected; queries by filter fail until it works again.
    #[error("audit record index: {0}")]
    Index(String),

    /// A signing receipt is malformed or does not prove what it claims (record, index, proof,
    /// event).
    #[error("invalid receipt: {0}")]
    InvalidReceipt(String),
}

/// How a caller should treat an [`AuditError`]: the one mapping the daemon needs for its HTTP
/// problems and its readiness report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller asked for something impossible (bad event, range out of the tree): 400.
    InvalidInput,
    /// The log cannot be used now (I/O failure, locked, writer stopped, signer down): fail
    /// closed, 503 `audit_unavailable`.
    Unavailable,
    /// The stored log, checkpoint or a file derived from the log is damaged; an operator must
    /// investigate.
    Corrupt,
    /// Something an auditor was given does not verify (records, checkpoint, proof, key).
    Verification,
    /// The environment misbehaves (the clock).
    Internal,
}

impl AuditError {
    /// The kind of this error, for callers that only need to decide how to answer.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidEvent(_) | Self::InvalidRange(_) => ErrorKind::InvalidInput,
            Self::Io { .. }
            | Self::Locked { .. }
            | Self::Unavailable { .. }
            | Self::Signer(_)
            | Self::Ledger(_)
            | Self::Index(_) => ErrorKind::Unavailable,
            Self::Corrupt { .. }
            | Self::CheckpointMismatch { .. }
            | Self::DerivedMismatch { .. }
            | Self::LedgerMismatch { .. } => ErrorKind::Corrupt,
            Self::InvalidProof(_)
            | Self::InvalidRecord { .. }
            | Self::RecordCountMismatch { .. }
            | Self::RootMismatch { .. }
            | Self::InvalidCheckpoint(_)
            | Self::BadCheckpointSignature
            | Self::BadTranscriptSignature
            | Self::InvalidTranscript(_)
            | Self::InvalidReceipt(_)
            | Self::InvalidPublicKey(_) => ErrorKind::Verification,
            Self::Clock(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn derived(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::DerivedMismatch {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unavailable(reason: impl Into<String>) -> Self {
        Self::Unavailable {
            reason: reason.into(),
        }
    }

    /// The same error again, for each appender of a failed batch: the ledger's errors whole,
    /// others by their message.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::Ledger(error) => Self::Ledger(error.clone()),
            Self::LedgerMismatch { reason } => Self::ledger_mismatch(reason.clone()),
            Self::Unavailable { reason } => Self::unavailable(reason.clone()),
            other => Self::unavailable(other.to_string()),
        }
    }

    pub(crate) fn ledger_mismatch(reason: impl Into<String>) -> Self {
        Self::LedgerMismatch {
            reason: reason.into(),
        }
    }
}

/// The failure of a [`CheckpointSigner`](crate::CheckpointSigner), e.g. the HSM refusing or being
/// unreachable. It keeps its cause for the daemon's log.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint signer failed: {message}")]
pub struct SignerError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl SignerError {
    /// A failure described by `message` alone.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A failure with its underlying cause (e.g. the HSM adapter's error).
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}
