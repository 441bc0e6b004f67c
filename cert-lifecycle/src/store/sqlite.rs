//! The embedded store: one SQLite file in WAL mode.
//!
//! One connection writes (behind a mutex, so writes are serialised in this process as SQLite
//! serialises them anyway); reads take a read-only connection from a small pool and run beside the
//! writer, which WAL allows. Every commit is synced (`synchronous=FULL`): a signing request's state
//! is durable before the daemon acts on it. Times are unix seconds, enums their wire names.
//!
//! Writes are group-committed ([`Writer`]): each write runs in a savepoint of its own (all of it
//! or nothing), and while other writes wait for the connection the transaction stays open for
//! them, so that one commit, one fsync, makes a batch of them durable. A write returns only once
//! its batch is committed. With one fsync per write the signing flow's three commits bounded it
//! at a third of the disk's fsync rate (449 flows/s against 692 with no fsync at all, `bench
//! sign`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use rusqlite::params_from_iter;
use rusqlite::types::{Type, Value};
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, ffi, params,
};
use time::OffsetDateTime;

use super::{Store, TaidRecord};
use crate::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertificateNotice, CertificateRecord,
    ConsentChallenge, CscSad, EventDetails, IssuanceJournal, KeyChangeJournal, PendingAudit,
    RequestId, RevocationReason, ServiceName, SigningRequest, SigningStatus, StoreError,
    StoredEvent, UserEvent,
};

/// How long a connection waits for another process's lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle read connections kept for reuse; more are opened under load and closed after.
const MAX_IDLE_READERS: usize = 4;
/// Prepared statements kept per connection: every statement of this file fits, so that none is
/// parsed again on the signing path.
const STATEMENT_CACHE: usize = 64;

/// The schema, one entry per version; `PRAGMA user_version` counts those applied.
/// Append new versions, never edit an old one.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        tier TEXT NOT NULL,
        status TEXT NOT NULL,
        status_changed_at INTEGER NOT NULL,
        suspended_by TEXT,
        rectify_by INTEGER,
        sealed_name BLOB NOT NULL,
        sealed_dob BLOB NOT NULL,
        hkic_hash BLOB NOT NULL,
        device_public_key BLOB NOT NULL,
        device_generation INTEGER NOT NULL,
        current_certificate TEXT REFERENCES certificates(serial) DEFERRABLE INITIALLY DEFERRED,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX accounts_hkic_hash ON accounts(hkic_hash);

    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        profile TEXT NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        status TEXT NOT NULL,
        revocation_reason TEXT,
        revoked_at INTEGER,
        sealed_der BLOB NOT NULL,
        key_ref BLOB,
        key_algorithm TEXT NOT NULL
    ) STRICT;
    CREATE INDEX certificates_account ON certificates(account_id);

    CREATE TABLE taids (
        taid TEXT PRIMARY KEY,
        service TEXT NOT NULL,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        UNIQUE (service, account_id)
    ) STRICT;

    CREATE TABLE signing_requests (
        id TEXT PRIMARY KEY,
        service TEXT NOT NULL,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        certificate TEXT NOT NULL REFERENCES certificates(serial),
        identification_code TEXT NOT NULL,
        hash_algorithm TEXT NOT NULL,
        hash BLOB NOT NULL,
        description TEXT,
        status TEXT NOT NULL,
        bad_attempts INTEGER NOT NULL,
        device_generation INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        sealed_result BLOB,
        signed_at INTEGER
    ) STRICT;
    CREATE INDEX signing_requests_account_status
        ON signing_requests(account_id, status, expires_at);",
    // Version 2: consent challenges and the key-change journal (renewal, re-application).
    "CREATE TABLE consent_challenges (
        account_id TEXT NOT NULL REFERENCES accounts(id),
        purpose TEXT NOT NULL,
        nonce TEXT NOT NULL UNIQUE,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (account_id, purpose)
    ) STRICT;

    CREATE TABLE key_changes (
        account_id TEXT PRIMARY KEY REFERENCES accounts(id),
        purpose TEXT NOT NULL,
        old_serial TEXT,
        new_key_ref BLOB,
        new_serial TEXT,
        new_sealed_der BLOB,
        started_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX certificates_not_after ON certificates(not_after);",
    // Version 3: the journal of KEK rotations (`smartsign-ctl keys rotate-kek`). At most one is
    // open (finished_at NULL). old_kek is NULL for a KEK without an id.
    "CREATE TABLE kek_rotations (
        new_kek BLOB PRIMARY KEY,
        old_kek BLOB,
        started_at INTEGER NOT NULL,
        finished_at INTEGER
    ) STRICT;
    CREATE UNIQUE INDEX kek_rotations_one_open ON kek_rotations(finished_at IS NULL)
        WHERE finished_at IS NULL;",
    // Version 4: key-ceremony transcripts recorded in the audit log, by SHA-256 of the file.
    "CREATE TABLE ceremony_transcripts (
        sha256 BLOB PRIMARY KEY,
        audit_index INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL
    ) STRICT;",
    // Version 5: the deferred foreign key accounts.current_certificate -> certificates is
    // checked from the certificate's side at each commit that inserts one; without this index
    // that check scans every account (registration slowed from 1,000/s to 500/s by 40,000
    // accounts in `bench rotate-kek`'s population).
    "CREATE INDEX accounts_current_certificate ON accounts(current_certificate);",
    // Version 6: an account's version, which every update names and bumps, so that a change
    // made from a stale copy is refused (`Conflict`) instead of undoing a concurrent one.
    "ALTER TABLE accounts ADD COLUMN version INTEGER NOT NULL DEFAULT 0;",
    // Version 7: one account per person: no two accounts that are not deregistered share an
    // HKIC hash (deregistration zeroes it too).
    "CREATE UNIQUE INDEX accounts_one_per_person ON accounts(hkic_hash)
        WHERE status != 'deregistered';",
    // Version 8: when a request finished (the user's signing history).
    "ALTER TABLE signing_requests ADD COLUMN finished_at INTEGER;
    CREATE INDEX signing_requests_account ON signing_requests(account_id);",
    // Version 9: a minor's guardian, by the keyed hash of their HKIC number.
    "ALTER TABLE accounts ADD COLUMN guardian_hkic_hash BLOB;",
    // Version 10: the journal of first issuances (registration, upgrade). No foreign key: a
    // registration's account is stored only with its certificate.
    "CREATE TABLE issuances (
        account_id TEXT PRIMARY KEY,
        purpose TEXT NOT NULL,
        key_ref BLOB NOT NULL,
        serial TEXT,
        sealed_der BLOB,
        started_at INTEGER NOT NULL
    ) STRICT;",
    // Version 11: the audit outbox: an account change's audit record, written with the change
    // and deleted once the audit log holds it.
    "CREATE TABLE audit_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event TEXT NOT NULL,
        actor TEXT NOT NULL,
        fields TEXT NOT NULL
    ) STRICT;",
    // Version 12: HKIC numbers sent with signing requests that were not the account holder's,
    // by time (three in 24 hours lock HKIC-carrying requests of the account).
    "CREATE TABLE hkic_mismatches (
        account_id TEXT NOT NULL REFERENCES accounts(id),
        at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX hkic_mismatches_account ON hkic_mismatches(account_id, at);",
    // Version 13: what the sweeps look for, each through an index, in time proportional to
    // what is due. A minor's 18th birthday is kept only as a keyed hash of the date
    // (`adult_day_key`), which the sweep computes for each day it covers; `sweep_marks` keeps
    // how far it got.
    "ALTER TABLE accounts ADD COLUMN adult_day_key BLOB;
    CREATE INDEX accounts_adult_day ON accounts(adult_day_key) WHERE adult_day_key IS NOT NULL;
    CREATE INDEX accounts_status ON accounts(status, status_changed_at);
    CREATE INDEX accounts_rectification ON accounts(rectify_by)
        WHERE status = 'rectification_pending';
    CREATE INDEX certificates_keyed ON certificates(status, not_after)
        WHERE key_ref IS NOT NULL;
    CREATE INDEX certificates_minor ON certificates(account_id)
        WHERE profile = 'minor' AND status = 'valid';
    CREATE INDEX signing_requests_status ON signing_requests(status, expires_at);
    CREATE TABLE sweep_marks (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) STRICT;",
    // Version 14: the user events (`GET /v1/events`), each written with the change it reports;
    // `seq` is the feed's position (AUTOINCREMENT: never reused, increasing in commit order, as
    // one connection writes). Ids and facts only, each in a typed column. A certificate's
    // `notice` is how far the sweep has told its time-based events (0 nothing, 1 renewal window
    // open, 2 expired); the index holds only the valid certificates still to be told they
    // expired, so the sweep finds what is due without reading the others.
    "CREATE TABLE user_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        event TEXT NOT NULL,
        serial TEXT,
        reason TEXT,
        not_after INTEGER,
        by_party TEXT,
        rectify_by INTEGER
    ) STRICT;
    ALTER TABLE certificates ADD COLUMN notice INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX certificates_to_notify ON certificates(not_after, serial)
        WHERE status = 'valid' AND notice < 2;",
    // Version 15: batch signing. A batch's hashes, concatenated in order (each of the
    // request's algorithm's length); NULL for a single-hash request (`hash`), so every older
    // row reads as one.
    "ALTER TABLE signing_requests ADD COLUMN hashes BLOB;",
    // Version 16: the CSC facade. A service lists its credentials (its TAIDs) in TAID order;
    // each signature activation datum (SAD) is kept as its SHA-256 only, bound to its service,
    // credential, request and hashes, and redeemed once (`used_at`, set by a conditional
    // update).
    "CREATE INDEX taids_of_service ON taids(service, taid);
    CREATE TABLE csc_sads (
        sad_hash BLOB PRIMARY KEY,
        service TEXT NOT NULL,
        taid TEXT NOT NULL,
        request_id TEXT NOT NULL REFERENCES signing_requests(id),
        hashes_sha256 BLOB NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
    ) STRICT;
    CREATE INDEX csc_sads_request ON csc_sads(request_id);",
];

const ACCOUNT_COLUMNS: &str = "id, tier, status, status_changed_at, suspended_by, rectify_by, \
    sealed_name, sealed_dob, hkic_hash, device_public_key, device_generation, \
    current_certificate, created_at, version, guardian_hkic_hash, adult_day_key";

const CERTIFICATE_COLUMNS: &str = "serial, account_id, profile, not_before, not_after, status, \
    revocation_reason, revoked_at, sealed_der, key_ref, key_algorithm";

const CHALLENGE_COLUMNS: &str = "account_id, purpose, nonce, expires_at";

const KEY_CHANGE_COLUMNS: &str =
    "account_id, purpose, old_serial, new_key_ref, new_serial, new_sealed_der, started_at";

const ISSUANCE_COLUMNS: &str = "account_id, purpose, key_ref, serial, sealed_der, started_at";

const REQUEST_COLUMNS: &str = "id, service, account_id, certificate, identification_code, \
    hash_algorithm, hash, description, status, bad_attempts, device_generation, created_at, \
    expires_at, sealed_result, signed_at, hashes";

/// Writes in one batch at most: a bound on how long a batch holds SQLite's write lock.
const MAX_BATCH: usize = 64;

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    writer: Writer,
    readers: Mutex<Vec<Connection>>,
}

/// The writing connection and its group commit.
///
/// A write takes the connection, opens the batch's transaction if none is open, and runs in a
/// savepoint of its own. Then, if other writes are waiting for the connection and the batch is
/// not full, it leaves the transaction open and waits for the batch to end; otherwise it
/// commits, and so ends the batch for every write in it. Whoever takes the connection last
/// finds no one waiting and commits: no write waits on a batch that nobody will end.
struct Writer {
    batch: Mutex<Batch>,
    /// Signalled when a batch ends.
    ended: Condvar,
    /// Writes waiting for the connection.
    waiting: AtomicUsize,
    /// Writes that succeeded, and the commits that made them durable, since open.
    writes: AtomicU64,
    commits: AtomicU64,
}

/// The connection and the batch open on it.
struct Batch {
    conn: Connection,
    /// How the open batch ended, once it has; `None` while none is open.
    open: Option<Arc<OnceLock<Result<(), BatchFailure>>>>,
    /// Writes in the open batch that wait for its commit.
    members: usize,
    /// Copy the WAL into the database file and empty it after this batch (deregistration).
    checkpoint_after: bool,
}

/// Why a batch's commit failed (each write of it gets the same error).
#[derive(Clone, Debug)]
struct BatchFailure {
    code: ffi::Error,
    message: Option<String>,
}

impl BatchFailure {
    fn error(&self) -> StoreError {
        StoreError::from(rusqlite::Error::SqliteFailure(
            self.code,
            self.message.clone(),
        ))
        .classify()
    }
}

impl Writer {
    fn new(conn: Connection) -> Writer {
        Writer {
            batch: Mutex::new(Batch {
                conn,
                open: None,
                members: 0,
                checkpoint_after: false,
            }),
            ended: Condvar::new(),
            waiting: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        }
    }

    /// Runs `f` atomically in the open batch, and returns once the batch is durable.
    fn write<T>(
        &self,
        checkpoint_after: bool,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut batch = lock(&self.batch);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let outcome = match &batch.open {
            Some(outcome) => Arc::clone(outcome),
            None => {
                batch
                    .conn
                    .execute_batch("BEGIN IMMEDIATE")
                    .map_err(|error| StoreError::from(error).classify())?;
                let outcome = Arc::new(OnceLock::new());
                batch.open = Some(Arc::clone(&outcome));
                outcome
            }
        };
        let result = {
            // A panic in `f` ends the batch on the way out, so that its other writes do not
            // wait for ever.
            let guard = EndOnPanic {
                batch: &mut batch,
                ended: &self.ended,
            };
            let result = in_savepoint(&mut guard.batch.conn, f);
            std::mem::forget(guard);
            result
        };
        if result.is_ok() {
            self.writes.fetch_add(1, Ordering::Relaxed);
            batch.members += 1;
            batch.checkpoint_after |= checkpoint_after;
        }
        let others_waiting = self.waiting.load(Ordering::SeqCst) > 0;
        if others_waiting && batch.members < MAX_BATCH {
            // Nothing of a failed write is in the batch: it need not wait for it.
            let value = result?;
            while outcome.get().is_none() {
                batch = self
                    .ended
                    .wait(batch)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(batch);
            return match outcome.get() {
                Some(Err(failure)) => Err(failure.error()),
                _ => Ok(value),
            };
        }
        end_batch(&mut batch, &self.ended);
        self.commits.fetch_add(1, Ordering::Relaxed);
        drop(batch);
        match (result, outcome.get()) {
            (Ok(_), Some(Err(failure))) => Err(failure.error()),
            (result, _) => result,
        }
    }
}

/// Ends the open batch if the thread is panicking.
struct EndOnPanic<'a, 'b> {
    batch: &'a mut MutexGuard<'b, Batch>,
    ended: &'a Condvar,
}

impl Drop for EndOnPanic<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            end_batch(self.batch, self.ended);
        }
    }
}

/// Runs `f` in a savepoint: all of it or, on an error, nothing.
fn in_savepoint<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let savepoint = conn.savepoint().map_err(StoreError::from)?;
    let value = f(&savepoint).map_err(StoreError::classify)?;
    savepoint.commit().map_err(write_error)?;
    Ok(value)
}

/// Commits the open batch (rolls it back if the commit fails), records how it ended for its
/// writes and wakes them.
fn end_batch(batch: &mut Batch, ended: &Condvar) {
    let Some(outcome) = batch.open.take() else {
        return;
    };
    let committed = batch.conn.execute_batch("COMMIT").map_err(|error| {
        if !batch.conn.is_autocommit() {
            let _ = batch.conn.execute_batch("ROLLBACK");
        }
        match error {
            rusqlite::Error::SqliteFailure(code, message) => BatchFailure { code, message },
            other => BatchFailure {
                code: ffi::Error::new(ffi::SQLITE_ERROR),
                message: Some(other.to_string()),
            },
        }
    });
    let _ = outcome.set(committed);
    batch.members = 0;
    if std::mem::take(&mut batch.checkpoint_after) {
        // Copy deleted personal data out of the WAL into the main file and empty the WAL, so
        // that the old values do not linger in it. A reader still using an old snapshot makes
        // this a partial checkpoint; the next one finishes it.
        let _ = batch
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
    ended.notify_all();
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and brings its schema up to date.
    ///
    /// Fails with `Corrupt` when the file's schema is newer than this build.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut writer = Connection::open(&path)?;
        writer.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String =
            writer.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "cannot use WAL (journal mode {mode})"
            )));
        }
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.pragma_update(None, "foreign_keys", true)?;
        // Deleted personal data is overwritten in the file, not left in free pages.
        writer.pragma_update(None, "secure_delete", true)?;
        writer.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut writer)?;
        #[cfg(test)]
        traced::on(&writer);
        Ok(SqliteStore {
            path,
            writer: Writer::new(writer),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Writes that succeeded since open, and the commits (fsyncs) that made them durable:
    /// their ratio is what group commit saves.
    pub fn write_counts(&self) -> (u64, u64) {
        (
            self.writer.writes.load(Ordering::Relaxed),
            self.writer.commits.load(Ordering::Relaxed),
        )
    }

    /// The schema version this build writes.
    pub fn schema_version() -> usize {
        MIGRATIONS.len()
    }

    /// Runs `f` on the writing connection, atomically, and returns once it is durable (group
    /// commit: see [`Writer`]).
    pub(super) fn write<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.writer.write(false, f).map_err(StoreError::classify)
    }

    /// [`SqliteStore::write`], then a checkpoint that empties the WAL of what the write
    /// replaced (deleted personal data).
    fn write_and_checkpoint<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.writer.write(true, f).map_err(StoreError::classify)
    }

    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.read_unclassified(f).map_err(StoreError::classify)
    }

    fn read_unclassified<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = lock(&self.readers).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI;
                let conn = Connection::open_with_flags(&self.path, flags)?;
                #[cfg(test)]
                traced::on(&conn);
                conn.busy_timeout(BUSY_TIMEOUT)?;
                conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                conn
            }
        };
        let result = f(&conn);
        let mut idle = lock(&self.readers);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

fn insert_account_row(conn: &Connection, a: &AccountRecord) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO accounts ({ACCOUNT_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
    );
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(account_values(a)))
        .map_err(write_error)?;
    Ok(())
}

/// Writes `a` over the stored row only if that row is still at `a.version`, and bumps the
/// version: `Conflict` when another change came first, `NotFound` when there is no account.
fn update_account_row(conn: &Connection, a: &AccountRecord) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE accounts SET tier = ?2, status = ?3, status_changed_at = ?4, \
                 suspended_by = ?5, rectify_by = ?6, sealed_name = ?7, sealed_dob = ?8, \
                 hkic_hash = ?9, device_public_key = ?10, device_generation = ?11, \
                 current_certificate = ?12, created_at = ?13, version = ?14 + 1, \
                 guardian_hkic_hash = ?15, adult_day_key = ?16 WHERE id = ?1 AND version = ?14",
        )?
        .execute(params_from_iter(account_values(a)))
        .map_err(write_error)?;
    if changed == 1 {
        return require_current_certificate(conn, a);
    }
    let exists: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)")?
        .query_row([a.id.as_str()], |row| row.get(0))?;
    Err(if exists {
        StoreError::Conflict
    } else {
        StoreError::NotFound
    })
}

/// `Conflict` unless `a`'s current certificate is stored. The foreign key is deferred (an
/// account and its first certificate refer to each other), so SQLite would check it only at
/// the commit, which a group commit shares with other writes: each write checks its own.
fn require_current_certificate(conn: &Connection, a: &AccountRecord) -> Result<(), StoreError> {
    let Some(serial) = &a.current_certificate else {
        return Ok(());
    };
    let stored: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM certificates WHERE serial = ?1)")?
        .query_row([serial.as_str()], |row| row.get(0))?;
    if stored {
        Ok(())
    } else {
        Err(StoreError::Conflict)
    }
}

fn insert_certificate_row(conn: &Connection, c: &CertificateRecord) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO certificates ({CERTIFICATE_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    );
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(certificate_values(c)))
        .map_err(write_error)?;
    Ok(())
}

/// Stores `events` in the transaction of the change they report.
fn insert_events(conn: &Connection, events: &[UserEvent]) -> Result<(), StoreError> {
    for event in events {
        let details = &event.details;
        conn.prepare_cached(
            "INSERT INTO user_events (at, account_id, event, serial, reason, not_after, \
             by_party, rectify_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            secs(event.at),
            event.account_id.as_str(),
            event.kind.as_str(),
            details.serial.as_ref().map(CertSerial::as_str),
            details.reason.map(RevocationReason::as_str),
            opt_secs(details.not_after),
            details.by.map(|by| by.as_str()),
            opt_secs(details.rectify_by),
        ])
        .map_err(write_error)?;
    }
    Ok(())
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        position: row.get(0)?,
        event: UserEvent {
            at: time_at(row, 1)?,
            account_id: parsed(row, 2)?,
            kind: parsed(row, 3)?,
            details: EventDetails {
                serial: opt_parsed(row, 4)?,
                reason: opt_parsed(row, 5)?,
                not_after: opt_time_at(row, 6)?,
                by: opt_parsed(row, 7)?,
                rectify_by: opt_time_at(row, 8)?,
            },
        },
    })
}

/// A panic while a connection was borrowed rolled its transaction back when the transaction
/// dropped, so the connection is consistent and may be used again.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?;
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "schema version {applied} was written by a newer smartsign than this one (schema {}): \
             start that version again (after an update, boot the updated root), or restore \
             the state from before the update",
            MIGRATIONS.len()
        )));
    }
    for sql in &MIGRATIONS[applied..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    tx.commit()?;
    Ok(())
}

/// Sorts a failed write into the store's error kinds.
pub(super) fn write_error(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, _) = &e
        && failure.code == ErrorCode::ConstraintViolation
    {
        match failure.extended_code {
            ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE => {
                return StoreError::AlreadyExists;
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => return StoreError::Conflict,
            _ => {}
        }
    }
    StoreError::from(e)
}

pub(super) fn one_row_changed(changed: usize) -> Result<(), StoreError> {
    if changed == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

/// An account's columns in `ACCOUNT_COLUMNS` order (`?1` to `?15`), for insert and update alike.
/// Every statement this thread's store calls ran, for the query-plan test.
#[cfg(test)]
mod traced {
    use std::cell::RefCell;

    thread_local! {
        static STATEMENTS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// Records, on the calling thread, every statement `conn` runs, with its parameters.
    pub(super) fn on(conn: &rusqlite::Connection) {
        use rusqlite::trace::{TraceEvent, TraceEventCodes};
        fn record(event: TraceEvent<'_>) {
            if let TraceEvent::Stmt(statement, sql) = event {
                let sql = statement.expanded_sql().unwrap_or_else(|| sql.to_owned());
                STATEMENTS.with(|statements| statements.borrow_mut().push(sql));
            }
        }
        conn.trace_v2(TraceEventCodes::SQLITE_TRACE_STMT, Some(record));
    }

    pub(super) fn take() -> Vec<String> {
        STATEMENTS.with(|statements| std::mem::take(&mut *statements.borrow_mut()))
    }
}

/// A `LIMIT` value: SQLite's integers are signed.
fn limit_value(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn account_values(a: &AccountRecord) -> [Value; 16] {
    [
        a.id.as_str().to_owned().into(),
        a.tier.as_str().to_owned().into(),
        a.status.as_str().to_owned().into(),
        secs(a.status_changed_at).into(),
        a.suspended_by.map(|s| s.as_str().to_owned()).into(),
        opt_secs(a.rectify_by).into(),
        a.sealed_name.clone().into(),
        a.sealed_dob.clone().into(),
        a.hkic_hash.to_vec().into(),
        a.device_public_key.clone().into(),
        i64::from(a.device_generation).into(),
        a.current_certificate
            .as_ref()
            .map(|serial| serial.as_str().to_owned())
            .into(),
        secs(a.created_at).into(),
        i64::try_from(a.version).unwrap_or(i64::MAX).into(),
        a.guardian_hkic_hash.map(|hash| hash.to_vec()).into(),
        a.adult_day_key.map(|key| key.to_vec()).into(),
    ]
}

/// A certificate's columns in `CERTIFICATE_COLUMNS` order (`?1` to `?11`), for insert and update.
fn certificate_values(c: &CertificateRecord) -> [Value; 11] {
    [
        c.serial.as_str().to_owned().into(),
        c.account_id.as_str().to_owned().into(),
        c.profile.as_str().to_owned().into(),
        secs(c.not_before).into(),
        secs(c.not_after).into(),
        c.status.as_str().to_owned().into(),
        c.revocation_reason.map(|r| r.as_str().to_owned()).into(),
        opt_secs(c.revoked_at).into(),
        c.sealed_der.clone().into(),
        c.key_ref.clone().into(),
        c.key_algorithm.clone().into(),
    ]
}

/// A request's columns in `REQUEST_COLUMNS` order (`?1` to `?16`), for insert and update alike.
fn request_values(r: &SigningRequest) -> [Value; 16] {
    [
        r.id.as_str().to_owned().into(),
        r.service.as_str().to_owned().into(),
        r.account_id.as_str().to_owned().into(),
        r.certificate.as_str().to_owned().into(),
        r.identification_code.clone().into(),
        r.hash_algorithm.as_str().to_owned().into(),
        r.hash.clone().into(),
        r.description.clone().into(),
        r.status.as_str().to_owned().into(),
        i64::from(r.bad_attempts).into(),
        i64::from(r.device_generation).into(),
        secs(r.created_at).into(),
        secs(r.expires_at).into(),
        r.sealed_result.clone().into(),
        opt_secs(r.signed_at).into(),
        crate::signing::joined_hashes(r.hashes.as_ref()).into(),
    ]
}

/// A journal row's columns in `KEY_CHANGE_COLUMNS` order (`?1` to `?7`).
fn key_change_values(j: &KeyChangeJournal) -> [Value; 7] {
    [
        j.account_id.as_str().to_owned().into(),
        j.purpose.as_str().to_owned().into(),
        j.old_serial.as_ref().map(|s| s.as_str().to_owned()).into(),
        j.new_key_ref.clone().into(),
        j.new_serial.as_ref().map(|s| s.as_str().to_owned()).into(),
        j.new_sealed_der.clone().into(),
        secs(j.started_at).into(),
    ]
}

fn issuance_values(j: &IssuanceJournal) -> [Value; 6] {
    [
        j.account_id.as_str().to_owned().into(),
        j.purpose.as_str().to_owned().into(),
        j.key_ref.clone().into(),
        j.serial.as_ref().map(|s| s.as_str().to_owned()).into(),
        j.sealed_der.clone().into(),
        secs(j.started_at).into(),
    ]
}

fn issuance_from_row(row: &Row<'_>) -> rusqlite::Result<IssuanceJournal> {
    Ok(IssuanceJournal {
        account_id: parsed(row, 0)?,
        purpose: parsed(row, 1)?,
        key_ref: row.get(2)?,
        serial: opt_parsed(row, 3)?,
        sealed_der: row.get(4)?,
        started_at: time_at(row, 5)?,
    })
}

fn challenge_from_row(row: &Row<'_>) -> rusqlite::Result<ConsentChallenge> {
    Ok(ConsentChallenge {
        account_id: parsed(row, 0)?,
        purpose: parsed(row, 1)?,
        nonce: row.get(2)?,
        expires_at: time_at(row, 3)?,
    })
}

fn key_change_from_row(row: &Row<'_>) -> rusqlite::Result<KeyChangeJournal> {
    Ok(KeyChangeJournal {
        account_id: parsed(row, 0)?,
        purpose: parsed(row, 1)?,
        old_serial: opt_parsed(row, 2)?,
        new_key_ref: row.get(3)?,
        new_serial: opt_parsed(row, 4)?,
        new_sealed_der: row.get(5)?,
        started_at: time_at(row, 6)?,
    })
}

pub(super) fn secs(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn opt_secs(t: Option<OffsetDateTime>) -> Option<i64> {
    t.map(secs)
}

fn conversion(
    idx: usize,
    ty: Type,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, ty, e.into())
}

/// A column holding a wire name or checked id.
fn parsed<T>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let s: String = row.get(idx)?;
    s.parse().map_err(|e| conversion(idx, Type::Text, e))
}

fn opt_parsed<T>(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<T>>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let s: Option<String> = row.get(idx)?;
    s.map(|s| s.parse().map_err(|e| conversion(idx, Type::Text, e)))
        .transpose()
}

pub(super) fn time_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<OffsetDateTime> {
    let t: i64 = row.get(idx)?;
    OffsetDateTime::from_unix_timestamp(t).map_err(|e| conversion(idx, Type::Integer, e))
}

pub(super) fn opt_time_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<OffsetDateTime>> {
    let t: Option<i64> = row.get(idx)?;
    t.map(|t| OffsetDateTime::from_unix_timestamp(t).map_err(|e| conversion(idx, Type::Integer, e)))
        .transpose()
}

fn account_from_row(row: &Row<'_>) -> rusqlite::Result<AccountRecord> {
    let hkic_hash: Vec<u8> = row.get(8)?;
    let hkic_hash = <[u8; 32]>::try_from(hkic_hash.as_slice())
        .map_err(|_| conversion(8, Type::Blob, "hkic_hash is not 32 bytes"))?;
    Ok(AccountRecord {
        id: parsed(row, 0)?,
        tier: parsed(row, 1)?,
        status: parsed(row, 2)?,
        status_changed_at: time_at(row, 3)?,
        suspended_by: opt_parsed(row, 4)?,
        rectify_by: opt_time_at(row, 5)?,
        sealed_name: row.get(6)?,
        sealed_dob: row.get(7)?,
        hkic_hash,
        device_public_key: row.get(9)?,
        device_generation: row.get(10)?,
        current_certificate: opt_parsed(row, 11)?,
        created_at: time_at(row, 12)?,
        version: u64::try_from(row.get::<_, i64>(13)?)
            .map_err(|e| conversion(13, Type::Integer, e))?,
        guardian_hkic_hash: row
            .get::<_, Option<Vec<u8>>>(14)?
            .map(|hash| {
                <[u8; 32]>::try_from(hash.as_slice())
                    .map_err(|_| conversion(14, Type::Blob, "guardian hash is not 32 bytes"))
            })
            .transpose()?,
        adult_day_key: row
            .get::<_, Option<Vec<u8>>>(15)?
            .map(|key| {
                <[u8; 32]>::try_from(key.as_slice())
                    .map_err(|_| conversion(15, Type::Blob, "adult day key is not 32 bytes"))
            })
            .transpose()?,
    })
}

fn certificate_from_row(row: &Row<'_>) -> rusqlite::Result<CertificateRecord> {
    Ok(CertificateRecord {
        serial: parsed(row, 0)?,
        account_id: parsed(row, 1)?,
        profile: parsed(row, 2)?,
        not_before: time_at(row, 3)?,
        not_after: time_at(row, 4)?,
        status: parsed(row, 5)?,
        revocation_reason: opt_parsed(row, 6)?,
        revoked_at: opt_time_at(row, 7)?,
        sealed_der: row.get(8)?,
        key_ref: row.get(9)?,
        key_algorithm: row.get(10)?,
    })
}

fn request_from_row(row: &Row<'_>) -> rusqlite::Result<SigningRequest> {
    let hash_algorithm = parsed(row, 5)?;
    let hashes = crate::signing::split_hashes(hash_algorithm, row.get(15)?)
        .map_err(|e| conversion(15, Type::Blob, e))?;
    Ok(SigningRequest {
        id: parsed(row, 0)?,
        service: parsed(row, 1)?,
        account_id: parsed(row, 2)?,
        certificate: parsed(row, 3)?,
        identification_code: row.get(4)?,
        hash_algorithm,
        hash: row.get(6)?,
        hashes,
        description: row.get(7)?,
        status: parsed(row, 8)?,
        bad_attempts: row.get(9)?,
        device_generation: row.get(10)?,
        created_at: time_at(row, 11)?,
        expires_at: time_at(row, 12)?,
        sealed_result: row.get(13)?,
        signed_at: opt_time_at(row, 14)?,
    })
}

fn get_account(conn: &Connection, id: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
    let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id.as_str()], account_from_row)
        .optional()?)
}

fn get_certificate(
    conn: &Connection,
    serial: &CertSerial,
) -> Result<Option<CertificateRecord>, StoreError> {
    let sql = format!("SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE serial = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([serial.as_str()], certificate_from_row)
        .optional()?)
}

impl Store for SqliteStore {
    fn ceremony_record(&self, sha256: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        self.read(|conn| {
            let index: Option<i64> = conn
                .prepare_cached("SELECT audit_index FROM ceremony_transcripts WHERE sha256 = ?1")?
                .query_row(params![sha256.as_slice()], |row| row.get(0))
                .optional()?;
            index
                .map(|i| u64::try_from(i).map_err(|_| StoreError::Corrupt("audit index".into())))
                .transpose()
        })
    }

    fn record_ceremony(
        &self,
        sha256: &[u8; 32],
        audit_index: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let index = i64::try_from(audit_index)
            .map_err(|_| StoreError::Corrupt("audit index out of range".into()))?;
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO ceremony_transcripts (sha256, audit_index, recorded_at) \
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![sha256.as_slice(), index, secs(now)])
            .map_err(write_error)?;
            Ok(())
        })
    }

    fn commit_counts(&self) -> Option<(u64, u64)> {
        Some(self.write_counts())
    }

    fn insert_account(&self, a: &AccountRecord) -> Result<(), StoreError> {
        self.write(|conn| {
            insert_account_row(conn, a)?;
            require_current_certificate(conn, a)
        })
    }

    fn insert_account_with_certificate(
        &self,
        account: &AccountRecord,
        certificate: &CertificateRecord,
        events: &[UserEvent],
    ) -> Result<(), StoreError> {
        self.write(|conn| {
            insert_account_row(conn, account)?;
            insert_certificate_row(conn, certificate)?;
            require_current_certificate(conn, account)?;
            insert_events(conn, events)
        })
    }

    fn attach_certificate(
        &self,
        account: &AccountRecord,
        certificate: &CertificateRecord,
        events: &[UserEvent],
    ) -> Result<(), StoreError> {
        self.write(|conn| {
            insert_certificate_row(conn, certificate)?;
            update_account_row(conn, account)?;
            insert_events(conn, events)
        })
    }

    fn get_account(&self, id: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        self.read(|conn| get_account(conn, id))
    }

    fn update_account(&self, a: &AccountRecord, events: &[UserEvent]) -> Result<(), StoreError> {
        self.write(|conn| {
            update_account_row(conn, a)?;
            insert_events(conn, events)
        })
    }

    fn update_account_audited(
        &self,
        a: &AccountRecord,
        event: &str,
        actor: &str,
        fields: &str,
        events: &[UserEvent],
    ) -> Result<i64, StoreError> {
        self.write(|conn| {
            update_account_row(conn, a)?;
            insert_events(conn, events)?;
            conn.prepare_cached(
                "INSERT INTO audit_outbox (event, actor, fields) VALUES (?1, ?2, ?3)",
            )?
            .execute([event, actor, fields])
            .map_err(write_error)?;
            let id = conn.last_insert_rowid();
            Ok(id)
        })
    }

    fn record_hkic_mismatch(
        &self,
        account: &AccountId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("INSERT INTO hkic_mismatches (account_id, at) VALUES (?1, ?2)")?
                .execute(params![account.as_str(), secs(at)])
                .map_err(write_error)?;
            Ok(())
        })
    }

    fn hkic_mismatches_since(
        &self,
        account: &AccountId,
        since: OffsetDateTime,
    ) -> Result<Vec<OffsetDateTime>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT at FROM hkic_mismatches WHERE account_id = ?1 AND at >= ?2 ORDER BY at",
            )?;
            let rows = stmt
                .query_map(params![account.as_str(), secs(since)], |row| {
                    time_at(row, 0)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn pending_audits(&self) -> Result<Vec<PendingAudit>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT id, event, actor, fields FROM audit_outbox ORDER BY id")?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(PendingAudit {
                        id: row.get(0)?,
                        event: row.get(1)?,
                        actor: row.get(2)?,
                        fields: row.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn delete_pending_audit(&self, id: i64) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM audit_outbox WHERE id = ?1")?
                .execute([id])?;
            Ok(())
        })
    }

    fn accounts_with_hkic_hash(&self, hkic_hash: &[u8; 32]) -> Result<Vec<AccountId>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id FROM accounts WHERE hkic_hash = ?1 ORDER BY id")?;
            let ids = stmt
                .query_map([&hkic_hash[..]], |row| parsed(row, 0))?
                .collect::<Result<Vec<AccountId>, _>>()?;
            Ok(ids)
        })
    }

    fn deregister(&self, account: &AccountRecord, events: &[UserEvent]) -> Result<(), StoreError> {
        // The WAL is emptied after the commit, so that the erased values do not linger in it.
        self.write_and_checkpoint(|conn| {
            update_account_row(conn, account)?;
            insert_events(conn, events)?;
            let id = account.id.as_str();
            conn.execute(
                "UPDATE accounts SET sealed_name = x'', sealed_dob = x'', \
                 hkic_hash = zeroblob(32), guardian_hkic_hash = NULL, adult_day_key = NULL \
                 WHERE id = ?1",
                [id],
            )?;
            // A certificate whose key is still there has not had its revocation reach the CA:
            // its DER stays (sealed) until then, erased with the key (`forget_key`).
            conn.execute(
                "UPDATE certificates SET sealed_der = x'' \
                 WHERE account_id = ?1 AND key_ref IS NULL",
                [id],
            )?;
            // A request still open ends here: an approval in flight can no longer store (and
            // release) its result.
            conn.execute(
                "UPDATE signing_requests SET status = 'failed', finished_at = ?2 \
                 WHERE account_id = ?1 AND status IN ('pending', 'approved')",
                params![id, secs(account.status_changed_at)],
            )?;
            conn.execute(
                "UPDATE signing_requests SET sealed_result = NULL, hash = x'', \
                 hashes = CASE WHEN hashes IS NULL THEN NULL ELSE x'' END, \
                 description = NULL WHERE account_id = ?1",
                [id],
            )?;
            Ok(())
        })
    }

    fn insert_certificate(&self, c: &CertificateRecord) -> Result<(), StoreError> {
        self.write(|conn| insert_certificate_row(conn, c))
    }

    fn get_certificate(
        &self,
        serial: &CertSerial,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        self.read(|conn| get_certificate(conn, serial))
    }

    fn mark_revoked(
        &self,
        serial: &CertSerial,
        reason: RevocationReason,
        at: OffsetDateTime,
        events: &[UserEvent],
    ) -> Result<bool, StoreError> {
        self.write(|conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE certificates SET status = 'revoked', revocation_reason = ?2, \
                     revoked_at = ?3 WHERE serial = ?1 AND status != 'revoked'",
                )?
                .execute(params![serial.as_str(), reason.as_str(), secs(at)])?;
            if changed == 0 && get_certificate(conn, serial)?.is_none() {
                return Err(StoreError::NotFound);
            }
            if changed == 1 {
                insert_events(conn, events)?;
            }
            Ok(changed == 1)
        })
    }

    fn certificates_to_notify(
        &self,
        notice: CertificateNotice,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        // `status = 'valid' AND notice < 2` is the partial index's own condition, written out
        // so that SQLite uses it.
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates \
             WHERE status = 'valid' AND notice < 2 AND notice < ?1 AND not_after <= ?2 \
             ORDER BY not_after, serial LIMIT ?3"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(
                    params![notice.stage(), secs(until), limit_value(limit)],
                    certificate_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn record_notice(
        &self,
        serial: &CertSerial,
        notice: CertificateNotice,
        events: &[UserEvent],
    ) -> Result<bool, StoreError> {
        self.write(|conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE certificates SET notice = ?2 \
                     WHERE serial = ?1 AND status = 'valid' AND notice < ?2",
                )?
                .execute(params![serial.as_str(), notice.stage()])?;
            if changed == 1 {
                insert_events(conn, events)?;
            }
            Ok(changed == 1)
        })
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, at, account_id, event, serial, reason, not_after, by_party, \
                 rectify_by FROM user_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![after, limit_value(limit)], event_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn forget_key(&self, serial: &CertSerial, key_ref: &[u8]) -> Result<(), StoreError> {
        // As at deregistration: an erased certificate must not linger in the WAL.
        self.write_and_checkpoint(|conn| {
            conn.prepare_cached(
                "UPDATE certificates SET key_ref = NULL WHERE serial = ?1 AND key_ref = ?2",
            )?
            .execute(params![serial.as_str(), key_ref])?;
            conn.prepare_cached(
                "UPDATE certificates SET sealed_der = x'' \
                     WHERE serial = ?1 AND key_ref IS NULL AND length(sealed_der) > 0 \
                     AND EXISTS (SELECT 1 FROM accounts WHERE accounts.id = \
                         certificates.account_id AND accounts.status = 'deregistered')",
            )?
            .execute([serial.as_str()])?;
            Ok(())
        })
    }

    fn certificates_of(&self, account: &AccountId) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE account_id = ?1 \
             ORDER BY not_before, serial"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([account.as_str()], certificate_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn account_with_certificate(
        &self,
        id: &AccountId,
    ) -> Result<Option<(AccountRecord, Option<CertificateRecord>)>, StoreError> {
        self.read(|conn| {
            // One read transaction: both records from the same snapshot.
            let tx = conn.unchecked_transaction()?;
            let Some(account) = get_account(&tx, id)? else {
                return Ok(None);
            };
            let certificate = match &account.current_certificate {
                Some(serial) => get_certificate(&tx, serial)?,
                None => None,
            };
            tx.finish()?;
            Ok(Some((account, certificate)))
        })
    }

    fn unfinished_revocations(&self, limit: usize) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates \
             WHERE status = 'revoked' AND key_ref IS NOT NULL ORDER BY not_after, serial LIMIT ?1"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([limit_value(limit)], certificate_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn expired_with_keys(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates \
             WHERE status = 'valid' AND key_ref IS NOT NULL AND not_after <= ?1 \
             ORDER BY not_after, serial LIMIT ?2"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(params![secs(now), limit_value(limit)], certificate_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn accounts_with_adult_day(&self, key: &[u8; 32]) -> Result<Vec<AccountRecord>, StoreError> {
        let sql =
            format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE adult_day_key = ?1 ORDER BY id");
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([key.as_slice()], account_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn current_minors(
        &self,
        after: Option<&AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let columns = ACCOUNT_COLUMNS
            .split(", ")
            .map(|column| format!("a.{column}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM certificates c JOIN accounts a ON a.id = c.account_id \
             WHERE c.profile = 'minor' AND c.status = 'valid' AND c.account_id > ?1 \
             AND a.current_certificate = c.serial ORDER BY c.account_id LIMIT ?2"
        );
        let after = after.map_or("", AccountId::as_str);
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(params![after, limit_value(limit)], account_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn rectifications_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts \
             WHERE status = 'rectification_pending' AND rectify_by <= ?1 \
             ORDER BY rectify_by, id LIMIT ?2"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(params![secs(now), limit_value(limit)], account_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn accounts_changed_before(
        &self,
        status: AccountStatus,
        before: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts \
             WHERE status = ?1 AND status_changed_at < ?2 \
             ORDER BY status_changed_at, id LIMIT ?3"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(
                    params![status.as_str(), secs(before), limit_value(limit)],
                    account_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn sweep_mark(&self, name: &str) -> Result<Option<i64>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT value FROM sweep_marks WHERE name = ?1")?
                .query_row([name], |row| row.get(0))
                .optional()?)
        })
    }

    fn advance_sweep_mark(
        &self,
        name: &str,
        from: Option<i64>,
        to: i64,
    ) -> Result<bool, StoreError> {
        self.write(|conn| {
            let changed = match from {
                None => conn
                    .prepare_cached(
                        "INSERT INTO sweep_marks (name, value) VALUES (?1, ?2) \
                         ON CONFLICT (name) DO NOTHING",
                    )?
                    .execute(params![name, to]),
                Some(from) => conn
                    .prepare_cached(
                        "UPDATE sweep_marks SET value = ?3 WHERE name = ?1 AND value = ?2",
                    )?
                    .execute(params![name, from, to]),
            }
            .map_err(write_error)?;
            Ok(changed == 1)
        })
    }

    fn put_taid(&self, t: &TaidRecord) -> Result<TaidRecord, StoreError> {
        self.write(|conn| {
            let existing = conn
                .prepare_cached("SELECT taid FROM taids WHERE service = ?1 AND account_id = ?2")?
                .query_row([t.service.as_str(), t.account_id.as_str()], |row| {
                    row.get::<_, String>(0)
                })
                .optional()?;
            let stored = match existing {
                Some(taid) => TaidRecord { taid, ..t.clone() },
                None => {
                    conn.prepare_cached(
                        "INSERT INTO taids (taid, service, account_id) VALUES (?1, ?2, ?3)",
                    )?
                    .execute([t.taid.as_str(), t.service.as_str(), t.account_id.as_str()])
                    .map_err(write_error)?;
                    t.clone()
                }
            };
            Ok(stored)
        })
    }

    fn find_taid(
        &self,
        service: &ServiceName,
        taid: &str,
    ) -> Result<Option<AccountId>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT account_id FROM taids WHERE service = ?1 AND taid = ?2")?
                .query_row([service.as_str(), taid], |row| parsed(row, 0))
                .optional()?)
        })
    }

    fn taids_of(
        &self,
        service: &ServiceName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT t.taid FROM taids t JOIN accounts a ON a.id = t.account_id \
                 WHERE t.service = ?1 AND t.taid > ?2 AND a.status <> 'deregistered' \
                 ORDER BY t.taid LIMIT ?3",
            )?;
            let rows = statement.query_map(
                params![service.as_str(), after.unwrap_or(""), limit_value(limit)],
                |row| row.get::<_, String>(0),
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn insert_sad(&self, sad: &CscSad) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO csc_sads (sad_hash, service, taid, request_id, hashes_sha256, \
                 expires_at, used_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                sad.sad_hash.as_slice(),
                sad.service.as_str(),
                sad.taid,
                sad.request_id.as_str(),
                sad.hashes_sha256.as_slice(),
                secs(sad.expires_at),
                opt_secs(sad.used_at),
            ])
            .map_err(write_error)?;
            Ok(())
        })
    }

    fn get_sad(&self, sad_hash: &[u8; 32]) -> Result<Option<CscSad>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT sad_hash, service, taid, request_id, hashes_sha256, expires_at, \
                     used_at FROM csc_sads WHERE sad_hash = ?1",
                )?
                .query_row([sad_hash.as_slice()], |row| {
                    let bytes = |idx: usize| -> rusqlite::Result<[u8; 32]> {
                        let raw: Vec<u8> = row.get(idx)?;
                        <[u8; 32]>::try_from(raw.as_slice())
                            .map_err(|e| conversion(idx, Type::Blob, e))
                    };
                    Ok(CscSad {
                        sad_hash: bytes(0)?,
                        service: parsed(row, 1)?,
                        taid: row.get(2)?,
                        request_id: parsed(row, 3)?,
                        hashes_sha256: bytes(4)?,
                        expires_at: time_at(row, 5)?,
                        used_at: opt_time_at(row, 6)?,
                    })
                })
                .optional()?)
        })
    }

    fn redeem_sad(&self, sad_hash: &[u8; 32], now: OffsetDateTime) -> Result<bool, StoreError> {
        self.write(|conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE csc_sads SET used_at = ?2 \
                     WHERE sad_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                )?
                .execute(params![sad_hash.as_slice(), secs(now)])
                .map_err(write_error)?;
            Ok(changed == 1)
        })
    }

    fn insert_request(
        &self,
        r: &SigningRequest,
        max_pending: usize,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO signing_requests ({REQUEST_COLUMNS}) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16 \
             WHERE EXISTS (SELECT 1 FROM accounts WHERE id = ?3 AND status = 'active') \
             AND (SELECT count(*) FROM signing_requests WHERE account_id = ?3 \
                  AND status = 'pending' AND expires_at > ?17) < ?18 \
             AND NOT EXISTS (SELECT 1 FROM signing_requests WHERE account_id = ?3 \
                  AND status = 'pending' AND expires_at > ?17 AND identification_code = ?5)"
        );
        let mut values = request_values(r).to_vec();
        values.push(secs(now).into());
        values.push(i64::try_from(max_pending).unwrap_or(i64::MAX).into());
        self.write(|conn| {
            let known: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM signing_requests WHERE id = ?1)")?
                .query_row([r.id.as_str()], |row| row.get(0))?;
            if known {
                return Err(StoreError::AlreadyExists);
            }
            let inserted = conn
                .prepare_cached(&sql)?
                .execute(params_from_iter(values))
                .map_err(write_error)?;
            if inserted == 0 {
                return Err(StoreError::Conflict);
            }
            Ok(())
        })
    }

    fn get_request(&self, id: &RequestId) -> Result<Option<SigningRequest>, StoreError> {
        let sql = format!("SELECT {REQUEST_COLUMNS} FROM signing_requests WHERE id = ?1");
        self.read(|conn| {
            Ok(conn
                .prepare_cached(&sql)?
                .query_row([id.as_str()], request_from_row)
                .optional()?)
        })
    }

    fn transition_request(
        &self,
        r: &SigningRequest,
        from: (SigningStatus, u8),
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let (status, attempts) = from;
        self.write(|conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE signing_requests SET status = ?2, bad_attempts = ?3, \
                     sealed_result = ?4, signed_at = ?5, finished_at = CASE \
                         WHEN ?2 = 'expired' THEN expires_at \
                         WHEN ?2 IN ('signed', 'rejected', 'locked', 'failed') THEN ?8 \
                         ELSE finished_at END \
                     WHERE id = ?1 AND status = ?6 AND bad_attempts = ?7 \
                     AND (?2 != 'approved' OR (EXISTS (SELECT 1 FROM accounts \
                          WHERE accounts.id = signing_requests.account_id \
                          AND accounts.status = 'active' \
                          AND accounts.device_generation = signing_requests.device_generation \
                          AND accounts.current_certificate = signing_requests.certificate) \
                      AND EXISTS (SELECT 1 FROM certificates \
                          WHERE certificates.serial = signing_requests.certificate \
                          AND certificates.status = 'valid' \
                          AND certificates.key_ref IS NOT NULL)))",
                )?
                .execute(params![
                    r.id.as_str(),
                    r.status.as_str(),
                    i64::from(r.bad_attempts),
                    r.sealed_result,
                    opt_secs(r.signed_at),
                    status.as_str(),
                    i64::from(attempts),
                    secs(now),
                ])
                .map_err(write_error)?;
            if changed == 0 {
                let exists: bool = conn
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM signing_requests WHERE id = ?1)")?
                    .query_row([r.id.as_str()], |row| row.get(0))?;
                return Err(if exists {
                    StoreError::Conflict
                } else {
                    StoreError::NotFound
                });
            }
            Ok(())
        })
    }

    fn signing_history(
        &self,
        account: &AccountId,
        now: OffsetDateTime,
        before: Option<(OffsetDateTime, RequestId)>,
        limit: usize,
    ) -> Result<Vec<(SigningRequest, OffsetDateTime)>, StoreError> {
        // A finish time for every finished request: stored, or (rows from before version 8,
        // pending requests past their expiry) the best the row says.
        let sql = format!(
            "SELECT {REQUEST_COLUMNS}, finished FROM (SELECT *, COALESCE(finished_at, \
                 CASE WHEN status IN ('pending', 'expired') THEN expires_at END, signed_at, \
                 created_at) AS finished FROM signing_requests WHERE account_id = ?1 \
                 AND (status IN ('signed', 'rejected', 'expired', 'locked', 'failed') \
                      OR (status = 'pending' AND expires_at <= ?2))) \
             WHERE finished < ?3 OR (finished = ?3 AND id < ?4) \
             ORDER BY finished DESC, id DESC LIMIT ?5"
        );
        let (before_time, before_id) = match &before {
            Some((time, id)) => (secs(*time), id.as_str().to_owned()),
            // Past every row: the end of time, and an id above every id.
            None => (i64::MAX, "~".to_owned()),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(
                    params![account.as_str(), secs(now), before_time, before_id, limit],
                    |row| Ok((request_from_row(row)?, time_at(row, 16)?)),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn approved_requests(&self) -> Result<Vec<SigningRequest>, StoreError> {
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM signing_requests WHERE status = 'approved' ORDER BY id"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([], request_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn pending_requests(
        &self,
        account: &AccountId,
        now: OffsetDateTime,
    ) -> Result<Vec<SigningRequest>, StoreError> {
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM signing_requests \
             WHERE account_id = ?1 AND status = 'pending' AND expires_at > ?2 \
             ORDER BY created_at, id"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(params![account.as_str(), secs(now)], request_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn count_pending(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        self.read(|conn| {
            let count: i64 = conn
                .prepare_cached(
                    "SELECT count(*) FROM signing_requests \
                     WHERE status = 'pending' AND expires_at > ?1",
                )?
                .query_row(params![secs(now)], |row| row.get(0))?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
    }

    fn health(&self) -> Result<(), StoreError> {
        self.read(|conn| Ok(conn.prepare_cached("SELECT 1")?.query_row([], |_| Ok(()))?))
    }

    fn put_consent_challenge(&self, c: &ConsentChallenge) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT OR REPLACE INTO consent_challenges ({CHALLENGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4)"
        );
        self.write(|conn| {
            conn.prepare_cached(&sql)?
                .execute(params![
                    c.account_id.as_str(),
                    c.purpose.as_str(),
                    c.nonce,
                    secs(c.expires_at)
                ])
                .map_err(write_error)?;
            Ok(())
        })
    }

    fn take_consent_challenge(
        &self,
        account: &AccountId,
        nonce: &str,
    ) -> Result<Option<ConsentChallenge>, StoreError> {
        let sql = format!(
            "DELETE FROM consent_challenges WHERE account_id = ?1 AND nonce = ?2 \
             RETURNING {CHALLENGE_COLUMNS}"
        );
        self.write(|conn| {
            Ok(conn
                .prepare_cached(&sql)?
                .query_row(params![account.as_str(), nonce], challenge_from_row)
                .optional()?)
        })
    }

    fn insert_key_change(&self, j: &KeyChangeJournal) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO key_changes ({KEY_CHANGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        );
        self.write(|conn| {
            conn.prepare_cached(&sql)?
                .execute(params_from_iter(key_change_values(j)))
                .map_err(write_error)?;
            Ok(())
        })
    }

    fn update_key_change(&self, j: &KeyChangeJournal) -> Result<(), StoreError> {
        self.write(|conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE key_changes SET purpose = ?2, old_serial = ?3, new_key_ref = ?4, \
                     new_serial = ?5, new_sealed_der = ?6, started_at = ?7 WHERE account_id = ?1",
                )?
                .execute(params_from_iter(key_change_values(j)))
                .map_err(write_error)?;
            one_row_changed(changed)
        })
    }

    fn delete_key_change(&self, account: &AccountId) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM key_changes WHERE account_id = ?1")?
                .execute([account.as_str()])?;
            Ok(())
        })
    }

    fn key_changes(&self) -> Result<Vec<KeyChangeJournal>, StoreError> {
        let sql =
            format!("SELECT {KEY_CHANGE_COLUMNS} FROM key_changes ORDER BY started_at, account_id");
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([], key_change_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn insert_issuance(&self, j: &IssuanceJournal) -> Result<(), StoreError> {
        let sql =
            format!("INSERT INTO issuances ({ISSUANCE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
        self.write(|conn| {
            conn.prepare_cached(&sql)?
                .execute(params_from_iter(issuance_values(j)))
                .map_err(write_error)?;
            Ok(())
        })
    }

    fn update_issuance(&self, j: &IssuanceJournal) -> Result<(), StoreError> {
        self.write(|conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE issuances SET purpose = ?2, key_ref = ?3, serial = ?4, \
                     sealed_der = ?5, started_at = ?6 WHERE account_id = ?1",
                )?
                .execute(params_from_iter(issuance_values(j)))
                .map_err(write_error)?;
            one_row_changed(changed)
        })
    }

    fn delete_issuance(&self, account: &AccountId) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM issuances WHERE account_id = ?1")?
                .execute([account.as_str()])?;
            Ok(())
        })
    }

    fn issuances(&self) -> Result<Vec<IssuanceJournal>, StoreError> {
        let sql =
            format!("SELECT {ISSUANCE_COLUMNS} FROM issuances ORDER BY started_at, account_id");
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([], issuance_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn current_certificates_ending(
        &self,
        after: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<(AccountId, CertificateRecord)>, StoreError> {
        let columns = CERTIFICATE_COLUMNS
            .split(", ")
            .map(|column| format!("c.{column}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM accounts a JOIN certificates c \
             ON c.serial = a.current_certificate \
             WHERE a.status = 'active' AND a.tier = 'iam_smart_plus' AND c.status = 'valid' \
             AND c.not_after > ?1 AND c.not_after <= ?2 \
             ORDER BY c.not_after, a.id"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([secs(after), secs(until)], certificate_from_row)?
                .map(|row| row.map(|c| (c.account_id.clone(), c)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use time::Duration;

    use super::*;
    use crate::AccountStatus;
    use crate::signing::tests::{CREATED, request};
    use crate::store::conformance::{self, account, hkic_hash_of, id, registered, taid};

    fn temp_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.sqlite")).unwrap();
        (dir, store)
    }

    conformance::suite!(Some(temp_store()));

    #[test]
    fn deregistration_leaves_no_old_value_in_the_files() {
        let (dir, store) = temp_store();
        conformance::deregistered_account_keeps_no_personal_data(&store);
        // Neither the database file nor its WAL holds any old value any more.
        drop(store);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for marker in [
                &b"SEALED-NAME-MARKER"[..],
                b"SEALED-CERT-MARKER",
                b"HASH-OF-THE-DOCUMENT-MARKER",
                b"DESCRIPTION-MARKER",
            ] {
                assert!(!bytes.windows(marker.len()).any(|w| w == marker));
            }
        }
    }

    #[test]
    fn store_is_an_object_safe_send_sync_trait() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SqliteStore>();
        let (_dir, store) = temp_store();
        let _: Arc<dyn Store> = Arc::new(store);
    }

    #[test]
    fn store_uses_wal_full_sync_and_foreign_keys() {
        let (dir, store) = temp_store();
        let batch = lock(&store.writer.batch);
        let writer = &batch.conn;
        let mode: String = writer
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = writer
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        let fk: i64 = writer
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        // WAL is a property of the file: a fresh connection sees it too.
        let other = Connection::open(dir.path().join("store.sqlite")).unwrap();
        let mode: String = other
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_write_that_waits_past_the_timeout_is_unavailable() {
        let (dir, store) = temp_store();
        let mut other = Connection::open(dir.path().join("store.sqlite")).unwrap();
        let hold = other
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .unwrap();
        let started = std::time::Instant::now();
        let busy = store.insert_account(&account("u-1"));
        assert!(matches!(busy, Err(StoreError::Unavailable(_))), "{busy:?}");
        assert!(started.elapsed() >= BUSY_TIMEOUT);
        drop(hold);
        store.insert_account(&account("u-1")).unwrap();
    }

    #[test]
    fn reopened_store_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        let a = registered(&store, "u-1", "3f9a");
        let r = request(1, "u-1", "3f9a");
        store.insert_request(&r, usize::MAX, r.created_at).unwrap();
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.get_account(&a.id).unwrap(), Some(a));
        assert_eq!(store.get_request(&r.id).unwrap(), Some(r));
    }

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        for _ in 0..3 {
            let store = SqliteStore::open(&path).unwrap();
            let version: i64 = lock(&store.writer.batch)
                .conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(
                version,
                i64::try_from(SqliteStore::schema_version()).unwrap()
            );
        }
    }

    /// A store made before batch signing (schema 14) upgrades: its requests read as the
    /// single-hash requests they are, and a batch can be added beside them.
    #[test]
    fn a_store_from_before_batches_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        let old = request(1, "u-1", "3f9a");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..14] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 14).unwrap();
            tx.commit().unwrap();
            conn.pragma_update(None, "foreign_keys", false).unwrap();
            let sql = format!(
                "INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            );
            conn.execute(&sql, params_from_iter(account_values(&account("u-1"))))
                .unwrap();
            let sql = format!(
                "INSERT INTO certificates ({CERTIFICATE_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            );
            let c = crate::certificate::tests::record("3f9a", "u-1");
            conn.execute(&sql, params_from_iter(certificate_values(&c)))
                .unwrap();
            // The old schema's columns: all but the new `hashes`.
            let columns = REQUEST_COLUMNS.trim_end_matches(", hashes");
            let sql = format!(
                "INSERT INTO signing_requests ({columns}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            );
            conn.execute(&sql, params_from_iter(&request_values(&old)[..15]))
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let read = store.get_request(&old.id).unwrap().unwrap();
        assert_eq!(read, old);
        assert!(!read.is_batch());
        let mut batch = request(2, "u-1", "3f9a");
        batch.hash = Vec::new();
        batch.hashes = Some(vec![vec![1; 32], vec![2; 32]]);
        store
            .insert_request(&batch, usize::MAX, batch.created_at)
            .unwrap();
        assert_eq!(store.get_request(&batch.id).unwrap(), Some(batch));
    }

    /// A store made before the user events (schema 13) upgrades: its certificates are all still
    /// to be told their time-based events, and the feed starts empty.
    #[test]
    fn a_store_from_before_the_events_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..13] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 13).unwrap();
            tx.commit().unwrap();
        }
        {
            // Rows of the old schema, written without the new columns (the account and its
            // certificate refer to each other; this connection checks no foreign key).
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "foreign_keys", false).unwrap();
            let sql = format!(
                "INSERT INTO accounts ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
                 ?11, ?12, ?13, ?14, ?15, ?16)",
                ACCOUNT_COLUMNS
            );
            let mut a = account("u-1");
            a.current_certificate = Some(CertSerial::parse("3f9a").unwrap());
            conn.execute(&sql, params_from_iter(account_values(&a)))
                .unwrap();
            let sql = format!(
                "INSERT INTO certificates ({CERTIFICATE_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            );
            let c = crate::certificate::tests::record("3f9a", "u-1");
            conn.execute(&sql, params_from_iter(certificate_values(&c)))
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.events_after(0, 10).unwrap().is_empty());
        let c = crate::certificate::tests::record("3f9a", "u-1");
        let due = store
            .certificates_to_notify(CertificateNotice::Expired, c.not_after, 10)
            .unwrap();
        assert_eq!(due, std::slice::from_ref(&c));
        let told = conformance::event(crate::EventKind::CertificateExpired, "u-1");
        assert!(
            store
                .record_notice(&c.serial, CertificateNotice::Expired, &[told])
                .unwrap()
        );
        assert_eq!(store.events_after(0, 10).unwrap().len(), 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn readers_run_beside_the_writer_on_several_threads() {
        let (_dir, store) = temp_store();
        let store = Arc::new(store);
        registered(&*store, "u-1", "1");
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for j in 0..20u8 {
                        let mut r = request(i * 20 + j, "u-1", "1");
                        r.id = RequestId::from_random([
                            i, j, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                        ]);
                        store.insert_request(&r, usize::MAX, r.created_at).unwrap();
                        assert_eq!(store.get_request(&r.id).unwrap(), Some(r));
                        assert!(store.get_account(&id("u-1")).unwrap().is_some());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            store.pending_requests(&id("u-1"), CREATED).unwrap().len(),
            120
        );
        assert!(lock(&store.readers).len() <= MAX_IDLE_READERS);
    }

    /// Every query of the signing path and of the sweeps is served by an index: its plan scans
    /// no table whole (`SCAN <table>`). The statements are the ones the store really ran, as
    /// SQLite traced them. Only the journals and the audit outbox are read whole: they hold
    /// only what is in flight.
    #[test]
    fn signing_path_and_sweep_queries_use_indexes() {
        const READ_WHOLE: &[&str] = &["audit_outbox", "issuances", "key_changes"];
        let (_dir, store) = temp_store();
        let at = CREATED;
        traced::take();
        // Registration, TAIDs, HKIC checks.
        let mut a = registered(&store, "u-1", "3f9a");
        registered(&store, "u-2", "3f9b");
        store.put_taid(&taid("t-1", "demo-a", "u-1")).unwrap();
        store
            .find_taid(&ServiceName::parse("demo-a").unwrap(), "t-1")
            .unwrap();
        store.accounts_with_hkic_hash(&hkic_hash_of("u-1")).unwrap();
        store.record_hkic_mismatch(&id("u-1"), at).unwrap();
        store.hkic_mismatches_since(&id("u-1"), at).unwrap();
        // The signing flow.
        let mut r = request(1, "u-1", "3f9a");
        store.insert_request(&r, 5, at).unwrap();
        store.get_request(&r.id).unwrap();
        store.account_with_certificate(&id("u-1")).unwrap();
        store
            .get_certificate(&CertSerial::parse("3f9a").unwrap())
            .unwrap();
        store.pending_requests(&id("u-1"), at).unwrap();
        r.status = SigningStatus::Approved;
        store
            .transition_request(&r, (SigningStatus::Pending, 0), at)
            .unwrap();
        r.mark_signed(vec![5; 600], at + Duration::seconds(1));
        store
            .transition_request(&r, (SigningStatus::Approved, 0), at)
            .unwrap();
        store.signing_history(&id("u-1"), at, None, 20).unwrap();
        store.count_pending(at).unwrap();
        store.approved_requests().unwrap();
        // Account changes and the outbox.
        a.status = AccountStatus::Suspended;
        let outbox = store
            .update_account_audited(&a, "account.suspended", "x", "{}", &[])
            .unwrap();
        store.pending_audits().unwrap();
        store.delete_pending_audit(outbox).unwrap();
        // The sweeps.
        store.unfinished_revocations(500).unwrap();
        store.expired_with_keys(at, 500).unwrap();
        store.accounts_with_adult_day(&[7; 32]).unwrap();
        store.current_minors(None, 500).unwrap();
        store.rectifications_due(at, 500).unwrap();
        store
            .accounts_changed_before(AccountStatus::Suspended, at, 500)
            .unwrap();
        store.sweep_mark("adult_day").unwrap();
        store.advance_sweep_mark("adult_day", None, 1).unwrap();
        store.advance_sweep_mark("adult_day", Some(1), 2).unwrap();
        store
            .current_certificates_ending(at, at + Duration::days(30))
            .unwrap();
        // The time-based events and the feed.
        for (notice, until) in [
            (CertificateNotice::Expired, at),
            (
                CertificateNotice::RenewalWindowOpen,
                at + Duration::days(60),
            ),
        ] {
            store.certificates_to_notify(notice, until, 500).unwrap();
        }
        let told = conformance::event(crate::EventKind::CertificateExpired, "u-1");
        store
            .record_notice(
                &CertSerial::parse("3f9a").unwrap(),
                CertificateNotice::Expired,
                &[told],
            )
            .unwrap();
        store.events_after(0, 100).unwrap();
        store.events_after(10, 100).unwrap();
        store
            .mark_revoked(
                &CertSerial::parse("3f9b").unwrap(),
                RevocationReason::KeyCompromise,
                at,
                &[],
            )
            .unwrap();
        store
            .forget_key(&CertSerial::parse("3f9b").unwrap(), &[9])
            .unwrap();
        let mut b = store.get_account(&id("u-2")).unwrap().unwrap();
        b.status = AccountStatus::Deregistered;
        store.deregister(&b, &[]).unwrap();

        let statements = traced::take();
        assert!(statements.len() > 30, "{statements:?}");
        let conn = Connection::open(store.path.clone()).unwrap();
        let mut checked = 0;
        for sql in statements {
            let verb = sql
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            if !["SELECT", "UPDATE", "DELETE", "INSERT"].contains(&verb.as_str()) {
                continue;
            }
            let mut plan = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let details: Vec<String> = plan
                .query_map([], |row| row.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for detail in &details {
                let Some(scanned) = detail.strip_prefix("SCAN ") else {
                    continue;
                };
                let table = scanned.split_whitespace().next().unwrap_or("");
                assert!(
                    table == "CONSTANT" || READ_WHOLE.contains(&table),
                    "a whole-table scan: {detail}\nin: {sql}\nplan: {details:?}"
                );
            }
            checked += 1;
        }
        assert!(checked > 30, "only {checked} statements checked");
    }

    /// Group commit: writes from many threads at once share commits; each is durable when it
    /// returns (a new connection sees it) and all of it or nothing, and one write's failure or
    /// panic takes nothing from the others in its batch.
    #[test]
    fn concurrent_writes_share_commits_and_stay_atomic_and_durable_each() {
        let (dir, store) = temp_store();
        let store = std::sync::Arc::new(store);
        let path = dir.path().join("store.sqlite");
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let (store, path) = (store.clone(), path.clone());
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let name = format!("u-{t}-{i}");
                        match i % 5 {
                            // A write that fails half-way: its first statement is undone.
                            0 => {
                                let failed = store.write(|conn| {
                                    insert_account_row(conn, &account(&name))?;
                                    Err::<(), _>(StoreError::Conflict)
                                });
                                assert!(matches!(failed, Err(StoreError::Conflict)));
                            }
                            // A write that panics: its batch still ends for the others.
                            1 => {
                                let store = store.clone();
                                let panicked = std::thread::spawn(move || {
                                    store.write(|conn| {
                                        insert_account_row(conn, &account(&name))?;
                                        panic!("a bug in a write");
                                        #[allow(unreachable_code)]
                                        Ok(())
                                    })
                                })
                                .join();
                                assert!(panicked.is_err());
                            }
                            _ => {
                                store.insert_account(&account(&name)).unwrap();
                                // Durable and visible to any connection once it returned.
                                let other = Connection::open(&path).unwrap();
                                let found: bool = other
                                    .query_row(
                                        "SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)",
                                        [&name],
                                        |row| row.get(0),
                                    )
                                    .unwrap();
                                assert!(found, "{name} not visible after its write returned");
                            }
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let count = |sql: &str| -> i64 {
            Connection::open(&path)
                .unwrap()
                .query_row(sql, [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(count("SELECT count(*) FROM accounts"), 16 * 15);
        assert_eq!(
            count("SELECT count(*) FROM accounts WHERE id LIKE 'u-%-0' OR id LIKE 'u-%-5'"),
            0
        );
        let (writes, commits) = store.write_counts();
        assert_eq!(writes, 16 * 15);
        assert!(
            commits < writes,
            "no write shared a commit: {commits} commits"
        );
        // Nothing is left open: a new write commits on its own.
        store.insert_account(&account("u-last")).unwrap();
        assert_eq!(count("SELECT count(*) FROM accounts"), 16 * 15 + 1);
    }
}
