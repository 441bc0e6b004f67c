//! The audit log's shared ledger (several nodes): the records and checkpoints that the daemon's
//! audit log keeps in the database, so that every node's log directory is a copy of one log.
//! The daemon adapts these methods to `audit_log::Ledger`; this crate knows nothing of records
//! but that they are byte strings numbered from 0 without gaps, and of checkpoints but their
//! tree size.
//!
//! One writer at a time: an append takes the transaction-scoped advisory lock [`AUDIT_LOCK`]
//! before it reads, so that batches get their indexes in lock order, each right after the one
//! before. At READ COMMITTED each statement reads the rows committed before it started, and the
//! lock's previous holder committed before it let go, so the read after the lock sees every
//! record. Readers take no lock: a batch becomes visible whole, at its commit.

use tokio_postgres::Row;

use super::{AUDIT_LOCK, PgStore, get, limit_value, pg_error};
use crate::StoreError;

impl PgStore {
    /// Appends one batch to the audit ledger, in one transaction under the ledger's advisory
    /// lock: reads the records from index `from` on (those other nodes appended after the
    /// caller's copy ends), calls `batch(first)` with `first` = `from` + their number, stores the
    /// lines it returns at `first`, `first + 1`, ... (one statement), and commits. Returns the
    /// records read, in index order.
    ///
    /// When `batch` fails, nothing is stored and its error is returned. A ledger holding fewer
    /// than `from` records is [`StoreError::Conflict`] (the caller's copy is ahead of it), one
    /// with a gap in its indexes [`StoreError::Corrupt`]; nothing is stored then either. Any
    /// other error leaves the outcome unknown: the commit may have landed.
    pub fn audit_append<E>(
        &self,
        from: u64,
        previous: Option<&[u8]>,
        batch: &mut (dyn FnMut(u64) -> Result<Vec<Vec<u8>>, E> + Send),
    ) -> Result<Vec<Vec<u8>>, E>
    where
        E: From<StoreError> + Send,
    {
        let from = index(from)?;
        let appended = self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            db.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
                .await?;
            // From the record before `from`, whose presence shows that the ledger reaches `from`.
            let rows = db
                .query(
                    "SELECT idx, line FROM audit_records WHERE idx >= $1 ORDER BY idx",
                    &[&(from - 1).max(0)],
                )
                .await?;
            let others = after(rows, from, previous)?;
            let first = from + others.len() as i64;
            let lines = match batch(first as u64) {
                Ok(lines) => lines,
                // Dropping the transaction rolls it back.
                Err(error) => return Ok(Err(error)),
            };
            if !lines.is_empty() {
                db.execute(
                    "INSERT INTO audit_records (idx, line) \
                     SELECT $1::BIGINT + n - 1, line \
                     FROM UNNEST($2::BYTEA[]) WITH ORDINALITY AS batch (line, n)",
                    &[&first, &lines],
                )
                .await?;
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(Ok(others))
        });
        appended?
    }

    /// Up to `limit` records of the audit ledger from index `from` on, in index order; empty
    /// when `from` is at or past the end. [`StoreError::Corrupt`] for a gap in the indexes.
    pub fn audit_read(&self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let from = index(from)?;
        self.run(async {
            let client = self.client().await?;
            let rows = self
                .db(&client)
                .query(
                    "SELECT idx, line FROM audit_records WHERE idx >= $1 ORDER BY idx LIMIT $2",
                    &[&from, &limit_value(limit)],
                )
                .await?;
            contiguous(rows, from)
        })
    }

    /// The stored audit checkpoint of the largest tree size, if any.
    pub fn audit_latest_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query_opt(
                    "SELECT note FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1",
                    &[],
                )
                .await?
                .map(|row| get(&row, 0))
                .transpose()
        })
    }

    /// Stores the audit checkpoint `note` of `tree_size` records only if `tree_size` is larger
    /// than every stored one's, so that the stored checkpoints of all nodes form one growing
    /// series. Returns whether it was stored.
    pub fn audit_put_checkpoint(&self, tree_size: u64, note: &[u8]) -> Result<bool, StoreError> {
        let tree_size = index(tree_size)?;
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            // Of two nodes storing at once, the second waits here, then compares with the
            // first's.
            db.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
                .await?;
            let stored = db
                .execute(
                    "INSERT INTO audit_checkpoints (tree_size, note) \
                     SELECT $1::BIGINT, $2::BYTEA \
                     WHERE $1 > (SELECT COALESCE(max(tree_size), -1) FROM audit_checkpoints)",
                    &[&tree_size, &note],
                )
                .await?;
            tx.commit().await.map_err(pg_error)?;
            Ok(stored == 1)
        })
    }
}

/// An index or tree size as a `BIGINT`.
fn index(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("audit index {value} does not fit a BIGINT")))
}

/// The lines of `rows` (of `idx >= from - 1`, in order) after record `from - 1`, which must be
/// there when `from > 0`: a ledger that does not reach `from` is [`StoreError::Conflict`]; one
/// whose record `from - 1` is not `previous` (the caller's last line, when given) is
/// [`StoreError::Corrupt`]: it is not the log the caller holds.
fn after(rows: Vec<Row>, from: i64, previous: Option<&[u8]>) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut rows = rows.into_iter();
    if from > 0 {
        let Some(before) = rows.next() else {
            return Err(StoreError::Conflict);
        };
        if get::<i64>(&before, 0)? != from - 1 {
            return Err(StoreError::Conflict);
        }
        if let Some(previous) = previous
            && get::<Vec<u8>>(&before, 1)? != previous
        {
            return Err(StoreError::Corrupt(format!(
                "the audit ledger's record {} is not the one this node holds: the database was \
                 restored or failed over to a copy that missed commits",
                from - 1
            )));
        }
    }
    contiguous(rows, from)
}

/// The lines of `rows` (`idx`, `line`), which must be records `from`, `from + 1`, ...
fn contiguous(rows: impl IntoIterator<Item = Row>, from: i64) -> Result<Vec<Vec<u8>>, StoreError> {
    rows.into_iter()
        .zip(from..)
        .map(|(row, expected)| {
            let idx: i64 = get(&row, 0)?;
            if idx != expected {
                return Err(StoreError::Corrupt(format!(
                    "the audit ledger has no record {expected} (the next is {idx})"
                )));
            }
            get(&row, 1)
        })
        .collect()
}
