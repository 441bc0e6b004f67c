//! The record index: `index.sqlite` in the log directory, one row per record with the columns
//! auditors filter on (time, event, account, service, signing request), so that one account's
//! records, or one request's signing record, are found without reading the whole log.
//!
//! It is derived data, like the tiles: `audit.log` is the truth, and the index is brought up to
//! date from it (at open, after each published batch, and before every query), never the other
//! way round. It holds ids only, as the records do. Its writes are not on the append path: a
//! thread of its own indexes what the writer published, after the batch's fsync, and a query
//! first catches the index up to the tree size it answers for. A crash between a batch and its
//! indexing loses nothing: the rows missing at the next open are added then. The row of the last
//! indexed record keeps its leaf hash, so an index that belongs to another log (a directory
//! restored without it, a log replaced) is noticed and rebuilt.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension as _, params_from_iter};
use serde_json::Value;

use crate::error::AuditError;
use crate::merkle::TreeHash;
use crate::time::Timestamp;

/// The index file in the log directory (with SQLite's `-wal` and `-shm` beside it).
pub(crate) const INDEX_FILE: &str = "index.sqlite";

/// The schema's version, in `PRAGMA user_version`; another version is rebuilt.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE records (
    idx        INTEGER PRIMARY KEY,
    time       TEXT NOT NULL,
    event      TEXT NOT NULL,
    account_id TEXT,
    service    TEXT,
    request_id TEXT
);
CREATE INDEX records_account ON records (account_id, idx);
CREATE INDEX records_service ON records (service, idx);
CREATE INDEX records_event   ON records (event, idx);
CREATE INDEX records_request ON records (request_id, idx);
CREATE INDEX records_time    ON records (time, idx);
CREATE TABLE last (
    one       INTEGER PRIMARY KEY CHECK (one = 1),
    idx       INTEGER NOT NULL,
    leaf_hash BLOB NOT NULL
);
";

/// Which records a query wants: every condition given must hold. Times are compared as the log
/// writes them (whole seconds, UTC): `from_time` inclusive, `to_time` exclusive.
// Not `non_exhaustive`: callers build it with `..RecordFilter::default()`, which a new
// filter keeps working.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// The first index that may match.
    pub from: u64,
    /// `fields.account_id`.
    pub account_id: Option<String>,
    /// `fields.service`, or for a record without one, the service that acted (actor
    /// `service:NAME`).
    pub service: Option<String>,
    /// The event name.
    pub event: Option<String>,
    /// `fields.request_id`.
    pub request_id: Option<String>,
    /// Records at or after this time.
    pub from_time: Option<Timestamp>,
    /// Records before this time.
    pub to_time: Option<Timestamp>,
}

impl RecordFilter {
    /// Every record from index `from`.
    pub fn from_index(from: u64) -> Self {
        Self {
            from,
            ..Self::default()
        }
    }
}

/// The columns of one record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Row {
    time: String,
    event: String,
    account_id: Option<String>,
    service: Option<String>,
    request_id: Option<String>,
}

impl Row {
    /// The columns of a record line that the log has checked (canonical form).
    pub(crate) fn of_line(line: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(line).map_err(|error| format!("not a record: {error}"))?;
        let text = |value: &Value| value.as_str().map(str::to_owned);
        let fields = &value["fields"];
        let service = text(&fields["service"]).or_else(|| {
            value["actor"]
                .as_str()
                .and_then(|actor| actor.strip_prefix("service:"))
                .map(str::to_owned)
        });
        Ok(Self {
            time: text(&value["time"]).ok_or("no time")?,
            event: text(&value["event"]).ok_or("no event")?,
            account_id: text(&fields["account_id"]),
            service,
            request_id: text(&fields["request_id"]),
        })
    }
}

/// The open index.
#[derive(Debug)]
pub(crate) struct RecordIndex {
    connection: Connection,
}

fn sql_error(what: &str) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |error| AuditError::Index(format!("{what}: {error}"))
}

impl RecordIndex {
    /// Opens `dir/index.sqlite`, making it when missing; a file that cannot be opened or has
    /// another schema is removed and made again (it is derived data).
    pub(crate) fn open(dir: &Path) -> Result<Self, AuditError> {
        let path = dir.join(INDEX_FILE);
        match Self::open_file(&path) {
            Ok(index) => Ok(index),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "rebuilding the audit record index");
                for suffix in ["", "-wal", "-shm"] {
                    let file = format!("{}{suffix}", path.display());
                    crate::files::remove_if_exists(Path::new(&file))?;
                }
                Self::open_file(&path)
            }
        }
    }

    fn open_file(path: &Path) -> Result<Self, AuditError> {
        let connection = Connection::open(path).map_err(sql_error("opening"))?;
        // A log dropped without `close` may leave its index thread finishing a page while the
        // directory is opened again: wait for it rather than fail.
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql_error("setting its busy timeout"))?;
        // Derived data: a crash may lose the last transactions (the catch-up adds them again),
        // never corrupt the file (WAL).
        connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            .and_then(|_| connection.pragma_update(None, "synchronous", "NORMAL"))
            .map_err(sql_error("setting it up"))?;
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(sql_error("reading its version"))?;
        match version {
            SCHEMA_VERSION => {}
            0 => connection
                .execute_batch(&format!(
                    "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(sql_error("creating its tables"))?,
            other => {
                return Err(AuditError::Index(format!(
                    "schema version {other}, this build writes {SCHEMA_VERSION}"
                )));
            }
        }
        Ok(Self { connection })
    }

    /// How many records are indexed (indexes `0..n`), and the leaf hash of the last one.
    pub(crate) fn indexed(&self) -> Result<(u64, Option<TreeHash>), AuditError> {
        let last: Option<(i64, Vec<u8>)> = self
            .connection
            .query_row("SELECT idx, leaf_hash FROM last", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
            .map_err(sql_error("reading its end"))?;
        let Some((idx, leaf)) = last else {
            return Ok((0, None));
        };
        let leaf: [u8; 32] = leaf
            .try_into()
            .map_err(|_| AuditError::Index("a leaf hash is not 32 bytes".into()))?;
        let count =
            u64::try_from(idx).map_err(|_| AuditError::Index(format!("negative index {idx}")))? + 1;
        Ok((count, Some(TreeHash::from_bytes(leaf))))
    }

    /// Adds the records `first, first + 1, ...` in one transaction; the last one's leaf hash
    /// marks how far the index goes.
    pub(crate) fn add(
        &mut self,
        first: u64,
        rows: &[Row],
        last_leaf: &TreeHash,
    ) -> Result<(), AuditError> {
        if rows.is_empty() {
            return Ok(());
        }
        let transaction = self
            .connection
            .transaction()
            .map_err(sql_error("starting a transaction"))?;
        {
            let mut insert = transaction
                .prepare_cached(
                    "INSERT INTO records (idx, time, event, account_id, service, request_id) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(sql_error("preparing an insert"))?;
            for (row, index) in rows.iter().zip(first..) {
                insert
                    .execute(rusqlite::params![
                        sql_index(index)?,
                        row.time,
                        row.event,
                        row.account_id,
                        row.service,
                        row.request_id
                    ])
                    .map_err(sql_error("inserting a record"))?;
            }
            let last = first + rows.len() as u64 - 1;
            transaction
                .execute(
                    "INSERT INTO last (one, idx, leaf_hash) VALUES (1, ?1, ?2) \
                     ON CONFLICT (one) DO UPDATE SET idx = excluded.idx, \
                     leaf_hash = excluded.leaf_hash",
                    rusqlite::params![sql_index(last)?, last_leaf.as_bytes().as_slice()],
                )
                .map_err(sql_error("moving its end"))?;
        }
        transaction.commit().map_err(sql_error("committing"))
    }

    /// Empties the index (it belongs to another log, or runs past this one).
    pub(crate) fn clear(&mut self) -> Result<(), AuditError> {
        self.connection
            .execute_batch("BEGIN; DELETE FROM records; DELETE FROM last; COMMIT;")
            .map_err(sql_error("emptying it"))
    }

    /// The indexes of up to `limit` records below `below` that `filter` matches, in order.
    pub(crate) fn find(
        &self,
        filter: &RecordFilter,
        below: u64,
        limit: u64,
    ) -> Result<Vec<u64>, AuditError> {
        let mut sql = String::from("SELECT idx FROM records WHERE idx >= ? AND idx < ?");
        let mut values: Vec<String> = Vec::new();
        let conditions = [
            ("account_id = ?", &filter.account_id),
            ("service = ?", &filter.service),
            ("event = ?", &filter.event),
            ("request_id = ?", &filter.request_id),
        ];
        for (condition, value) in conditions {
            if let Some(value) = value {
                sql.push_str(" AND ");
                sql.push_str(condition);
                values.push(value.clone());
            }
        }
        if let Some(time) = &filter.from_time {
            sql.push_str(" AND time >= ?");
            values.push(time.as_str().to_owned());
        }
        if let Some(time) = &filter.to_time {
            sql.push_str(" AND time < ?");
            values.push(time.as_str().to_owned());
        }
        sql.push_str(" ORDER BY idx LIMIT ?");
        let mut statement = self
            .connection
            .prepare_cached(&sql)
            .map_err(sql_error("preparing a query"))?;
        let numbers = [
            sql_index(filter.from)?,
            sql_index(below)?,
            i64::try_from(limit).unwrap_or(i64::MAX),
        ];
        let parameters = numbers[..2]
            .iter()
            .map(|n| rusqlite::types::Value::Integer(*n))
            .chain(values.into_iter().map(rusqlite::types::Value::Text))
            .chain(std::iter::once(rusqlite::types::Value::Integer(numbers[2])));
        let rows = statement
            .query_map(params_from_iter(parameters), |row| row.get::<_, i64>(0))
            .map_err(sql_error("querying"))?;
        rows.map(|row| {
            let idx = row.map_err(sql_error("reading a row"))?;
            u64::try_from(idx).map_err(|_| AuditError::Index(format!("negative index {idx}")))
        })
        .collect()
    }
}

/// An index as SQLite's integer; the log never reaches 2^63 records.
fn sql_index(index: u64) -> Result<i64, AuditError> {
    i64::try_from(index).map_err(|_| AuditError::InvalidRange(format!("index {index} too large")))
}
