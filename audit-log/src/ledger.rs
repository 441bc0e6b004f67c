//! The shared ledger of several nodes: where records are durable first and get their indexes.
//!
//! With a [`Ledger`] (PostgreSQL in the daemon's several-node mode), the ledger holds the truth
//! and every node's log directory is a full local copy of it. The writer thread of each node
//! hands each batch to [`Ledger::append`], which, in one transaction under the ledger's exclusive
//! lock, gives it the records other nodes appended since this node's copy ends, lets the writer
//! number the batch after them, and stores it. Only then does the writer add those records and
//! its own to the local copy (one write and one fsync), extend the tree and answer the appenders.
//! Indexes are therefore assigned by one writer at a time in the ledger's order, and every node's
//! tree is the same RFC 9162 tree, whose checkpoints the ledger keeps as one growing series.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::error::AuditError;

/// Where the records of a log shared by several nodes are made durable and numbered.
///
/// Used from the log's writer thread (a plain thread: blocking calls are fine). A line is a
/// record as the log writes it, without its newline; a line's index is its position in the
/// ledger, 0-based and contiguous.
pub trait Ledger: Send + fmt::Debug {
    /// In one transaction under the ledger's exclusive lock: reads every line with index at or
    /// after `from` (what other nodes appended after this node's copy ends), calls
    /// `batch(first_index)` with `first_index` = `from` + the number of lines read, stores the
    /// lines it returns at `first_index`, `first_index + 1`, ..., and commits. Returns the lines
    /// read, in index order.
    ///
    /// The lines are durable in the ledger when this returns `Ok`. When `batch` fails, nothing is
    /// stored and the error is [`LedgerError::Batch`]. Any other error leaves the outcome unknown
    /// (the commit may have landed): the caller must not treat the batch as recorded, and learns
    /// what the ledger holds by reading it again. A ledger holding fewer than `from` lines is
    /// [`LedgerError::Inconsistent`], and nothing is stored; so is one whose record `from - 1`
    /// is not `previous` (this node's last line, given when `from > 0`): the ledger is not the
    /// log this node copied (restored from a backup, or a replica that missed commits), and
    /// appending to it would fork the log.
    fn append(
        &mut self,
        from: u64,
        previous: Option<&[u8]>,
        batch: &mut (dyn FnMut(u64) -> Result<Vec<Vec<u8>>, AuditError> + Send),
    ) -> Result<Vec<Vec<u8>>, LedgerError>;

    /// Up to `limit` lines from index `from` on, in index order; empty when `from` is at or past
    /// the end. Needs no lock: the ledger only ever grows, by whole committed batches.
    fn read(&mut self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, LedgerError>;

    /// The stored checkpoint of the largest tree size (its JSON form), if any.
    fn latest_checkpoint(&mut self) -> Result<Option<Vec<u8>>, LedgerError>;

    /// Stores the checkpoint `note` (its JSON form) for `tree_size` only if `tree_size` is larger
    /// than that of the latest stored one, so that the stored checkpoints of all nodes form one
    /// series that only grows. Returns whether it was stored.
    fn put_checkpoint(&mut self, tree_size: u64, note: &[u8]) -> Result<bool, LedgerError>;
}

/// A failure of a [`Ledger`]. As an [`AuditError`] it is of kind
/// [`Unavailable`](crate::ErrorKind::Unavailable): the log fails closed, and takes appends again
/// once the ledger answers.
///
/// Cheap to clone (its cause is shared), so that every appender of a failed batch gets it.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The ledger could not be reached, or its transaction failed.
    #[error("{context}: {source}")]
    Unavailable {
        /// What was being done, e.g. "appending to the audit ledger".
        context: String,
        /// The database's (or driver's) error.
        #[source]
        source: Arc<dyn Error + Send + Sync + 'static>,
    },

    /// The ledger's contents do not fit the request: fewer lines than `from`, or a gap in the
    /// indexes.
    #[error("the audit ledger is inconsistent: {0}")]
    Inconsistent(String),

    /// The batch closure of [`Ledger::append`] failed; nothing was stored.
    #[error("the batch was not stored: {0}")]
    Batch(#[source] Arc<AuditError>),
}

impl LedgerError {
    /// The ledger failed while doing `context`, because of `source`.
    pub fn unavailable(
        context: impl Into<String>,
        source: impl Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}
