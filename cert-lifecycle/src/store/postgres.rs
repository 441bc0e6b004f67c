//! The server store: PostgreSQL, shared by several daemons (nodes) in front of one HSM cluster.
//!
//! Every state change is one conditional statement or one transaction, as in the SQLite store:
//! the expected version or prior status is in the `WHERE`, so that of two nodes making the same
//! change from the same read, exactly one wins (the approval pending → approved is the
//! single-use guard). Statements run at PostgreSQL's default isolation, READ COMMITTED: an
//! `UPDATE` that waits for another transaction's row lock re-checks its `WHERE` against the row
//! that transaction left, which is what the conditional updates need. The one check that spans
//! rows, the pending-request cap of [`Store::insert_request`], first locks the account's row
//! (`FOR NO KEY UPDATE`), so that requests of one account are added one at a time across nodes
//! and each count sees the ones before it; requests of different accounts do not wait for each
//! other, and nothing is retried. Times are unix seconds (`BIGINT`), enums their wire names,
//! and every text column compares bytes (`COLLATE "C"`), as SQLite does.
//!
//! # Sync over async
//!
//! [`Store`] is synchronous; the driver (tokio-postgres, pooled by deadpool-postgres) is async.
//! A [`PgStore`] owns a small tokio runtime of its own, two worker threads on
//! which the pool's connections live (each connection is a task reading and writing its
//! socket). A trait method builds its statements as a future and waits for it on the calling
//! thread, which polls it while the store's workers drive the sockets:
//! - on a plain thread (a `spawn_blocking` thread of the daemon included): `Handle::block_on`
//!   of the store's runtime;
//! - on a worker of a multi-thread tokio runtime: the same inside
//!   `tokio::task::block_in_place`, which first hands the worker's other tasks to another
//!   worker;
//! - on a current-thread runtime, where neither is allowed (blocking the only thread would stop
//!   the caller's runtime, and `block_on` inside an async context panics): a scoped thread
//!   blocks on the store's runtime and the caller waits for it to finish. The future borrows
//!   the caller's arguments, so it cannot be spawned onto the runtime as a `'static` task.
//!
//! One `get_account` costs about 0.1 ms on a Unix socket (the store's tests measure it), one
//! round trip: statements are prepared once per connection and cached.
//!
//! # Failures
//!
//! A unique violation is [`StoreError::AlreadyExists`], a foreign-key violation
//! [`StoreError::Conflict`]. A server that cannot be reached, a lost connection, a server
//! shutting down, a lock or pool wait past 5 s is [`StoreError::Unavailable`]; the pool
//! drops a closed connection and opens a new one for the next call, so the store recovers
//! when the server is back, without a restart.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod,
};
use time::OffsetDateTime;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{NoTls, Row};
use zeroize::Zeroizing;

use super::{Store, TaidRecord};
use crate::error::DatabaseError;
use crate::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertificateNotice, CertificateRecord,
    ConsentChallenge, CscSad, EventDetails, IssuanceJournal, KeyChangeJournal, PendingAudit,
    RequestId, RevocationReason, ServiceName, SigningRequest, SigningStatus, StoreError,
    StoredEvent, UserEvent,
};

mod audit_ledger;

/// Worker threads of the store's runtime: they only move bytes between the sockets and the
/// callers, which parse and build the rows.
const RUNTIME_THREADS: usize = 2;

/// How long a call waits for a pooled connection, a new connection, or another transaction's
/// lock before it is [`StoreError::Unavailable`] (SQLite's busy timeout).
const WAIT: Duration = Duration::from_secs(5);

/// How long a transaction may wait for its client between statements before the server ends
/// it (and releases its locks).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// How long one statement may run before the server cancels it (the migrations excepted).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The key of the advisory lock under which a node brings the schema up to date, so that
/// nodes starting together migrate once ("smartsig" in ASCII).
const MIGRATION_LOCK: i64 = 0x736d_6172_7473_6967;

/// The key of the advisory lock under which one node at a time appends to the audit ledger or
/// stores an audit checkpoint ("smartaud" in ASCII); see the `audit_ledger` module.
const AUDIT_LOCK: i64 = 0x736d_6172_7461_7564;

/// The key of the advisory lock that every transaction storing user events holds from just
/// before its first event until it ends ("smartevt" in ASCII).
///
/// An identity (like a sequence) hands out numbers in the order transactions ask, not in the
/// order they commit: a transaction that took position 7 may commit after one that took 8. A
/// reader that saw 8 and goes on from there would miss 7 for ever. Under this lock the
/// transactions that store events run their insert and commit one at a time, so positions are
/// taken in commit order and every position below a visible one is visible or never will be
/// (a rolled-back transaction's). The lock is taken last, after the transaction's row locks,
/// so it adds no deadlock; lifecycle events are rare, so serialising them costs nothing that
/// matters.
const EVENTS_LOCK: i64 = 0x736d_6172_7465_7674;

/// The schema, one entry per version; `schema_version` holds how many are applied. Append new
/// versions, never edit an old one.
const MIGRATIONS: &[&str] = &[
    // Version 1: the schema of SQLite's version 13, with every index. The deferred foreign key
    // accounts.current_certificate -> certificates is added once both tables exist.
    r#"CREATE TABLE accounts (
        id TEXT COLLATE "C" PRIMARY KEY,
        tier TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        status_changed_at BIGINT NOT NULL,
        suspended_by TEXT COLLATE "C",
        rectify_by BIGINT,
        sealed_name BYTEA NOT NULL,
        sealed_dob BYTEA NOT NULL,
        hkic_hash BYTEA NOT NULL,
        device_public_key BYTEA NOT NULL,
        device_generation BIGINT NOT NULL,
        current_certificate TEXT COLLATE "C",
        created_at BIGINT NOT NULL,
        version BIGINT NOT NULL DEFAULT 0,
        guardian_hkic_hash BYTEA,
        adult_day_key BYTEA
    );
    CREATE INDEX accounts_hkic_hash ON accounts (hkic_hash);
    CREATE INDEX accounts_current_certificate ON accounts (current_certificate);
    CREATE UNIQUE INDEX accounts_one_per_person ON accounts (hkic_hash)
        WHERE status <> 'deregistered';
    CREATE INDEX accounts_adult_day ON accounts (adult_day_key) WHERE adult_day_key IS NOT NULL;
    CREATE INDEX accounts_status ON accounts (status, status_changed_at);
    CREATE INDEX accounts_rectification ON accounts (rectify_by)
        WHERE status = 'rectification_pending';

    CREATE TABLE certificates (
        serial TEXT COLLATE "C" PRIMARY KEY,
        account_id TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
        profile TEXT COLLATE "C" NOT NULL,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        revocation_reason TEXT COLLATE "C",
        revoked_at BIGINT,
        sealed_der BYTEA NOT NULL,
        key_ref BYTEA,
        key_algorithm TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX certificates_account ON certificates (account_id);
    CREATE INDEX certificates_not_after ON certificates (not_after);
    CREATE INDEX certificates_keyed ON certificates (status, not_after) WHERE key_ref IS NOT NULL;
    CREATE INDEX certificates_minor ON certificates (account_id)
        WHERE profile = 'minor' AND status = 'valid';
    ALTER TABLE accounts ADD FOREIGN KEY (current_certificate) REFERENCES certificates (serial)
        DEFERRABLE INITIALLY DEFERRED;

    CREATE TABLE taids (
        taid TEXT COLLATE "C" PRIMARY KEY,
        service TEXT COLLATE "C" NOT NULL,
        account_id TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
        UNIQUE (service, account_id)
    );

    CREATE TABLE signing_requests (
        id TEXT COLLATE "C" PRIMARY KEY,
        service TEXT COLLATE "C" NOT NULL,
        account_id TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
        certificate TEXT COLLATE "C" NOT NULL REFERENCES certificates (serial),
        identification_code TEXT COLLATE "C" NOT NULL,
        hash_algorithm TEXT COLLATE "C" NOT NULL,
        hash BYTEA NOT NULL,
        description TEXT COLLATE "C",
        status TEXT COLLATE "C" NOT NULL,
        bad_attempts BIGINT NOT NULL,
        device_generation BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        sealed_result BYTEA,
        signed_at BIGINT,
        finished_at BIGINT
    );
    CREATE INDEX signing_requests_account_status
        ON signing_requests (account_id, status, expires_at);
    CREATE INDEX signing_requests_account ON signing_requests (account_id);
    CREATE INDEX signing_requests_status ON signing_requests (status, expires_at);

    CREATE TABLE consent_challenges (
        account_id TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
        purpose TEXT COLLATE "C" NOT NULL,
        nonce TEXT COLLATE "C" NOT NULL UNIQUE,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (account_id, purpose)
    );

    CREATE TABLE key_changes (
        account_id TEXT COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
        purpose TEXT COLLATE "C" NOT NULL,
        old_serial TEXT COLLATE "C",
        new_key_ref BYTEA,
        new_serial TEXT COLLATE "C",
        new_sealed_der BYTEA,
        started_at BIGINT NOT NULL
    );

    CREATE TABLE kek_rotations (
        new_kek BYTEA PRIMARY KEY,
        old_kek BYTEA,
        started_at BIGINT NOT NULL,
        finished_at BIGINT
    );
    CREATE UNIQUE INDEX kek_rotations_one_open ON kek_rotations ((finished_at IS NULL))
        WHERE finished_at IS NULL;

    CREATE TABLE ceremony_transcripts (
        sha256 BYTEA PRIMARY KEY,
        audit_index BIGINT NOT NULL,
        recorded_at BIGINT NOT NULL
    );

    CREATE TABLE issuances (
        account_id TEXT COLLATE "C" PRIMARY KEY,
        purpose TEXT COLLATE "C" NOT NULL,
        key_ref BYTEA NOT NULL,
        serial TEXT COLLATE "C",
        sealed_der BYTEA,
        started_at BIGINT NOT NULL
    );

    CREATE TABLE audit_outbox (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event TEXT NOT NULL,
        actor TEXT NOT NULL,
        fields TEXT NOT NULL
    );

    CREATE TABLE hkic_mismatches (
        account_id TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
        at BIGINT NOT NULL
    );
    CREATE INDEX hkic_mismatches_account ON hkic_mismatches (account_id, at);

    CREATE TABLE sweep_marks (
        name TEXT COLLATE "C" PRIMARY KEY,
        value BIGINT NOT NULL
    );"#,
    // Version 2: the audit log's shared ledger (the `audit_ledger` module): its records, one
    // line each at its index, and its signed checkpoints (their JSON) by tree size. SQLite has
    // no counterpart: one node keeps the audit log in its own files.
    r#"CREATE TABLE audit_records (
        idx BIGINT PRIMARY KEY CHECK (idx >= 0),
        line BYTEA NOT NULL
    );

    CREATE TABLE audit_checkpoints (
        tree_size BIGINT PRIMARY KEY CHECK (tree_size >= 0),
        note BYTEA NOT NULL
    );"#,
    // Version 3: the user events and the certificates' notice stage, as SQLite's version 14.
    // `seq` comes from an identity, which alone would not follow commit order across nodes:
    // every transaction that stores events takes the events lock first (`insert_events`).
    r#"CREATE TABLE user_events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at BIGINT NOT NULL,
        account_id TEXT COLLATE "C" NOT NULL,
        event TEXT COLLATE "C" NOT NULL,
        serial TEXT COLLATE "C",
        reason TEXT COLLATE "C",
        not_after BIGINT,
        by_party TEXT COLLATE "C",
        rectify_by BIGINT
    );
    ALTER TABLE certificates ADD COLUMN notice SMALLINT NOT NULL DEFAULT 0;
    CREATE INDEX certificates_to_notify ON certificates (not_after, serial)
        WHERE status = 'valid' AND notice < 2;"#,
    // Version 4: batch signing, as SQLite's version 15: a batch's hashes concatenated in
    // order; NULL for a single-hash request.
    "ALTER TABLE signing_requests ADD COLUMN hashes BYTEA;",
    // Version 5: the CSC facade, as SQLite's version 16.
    r#"CREATE INDEX taids_of_service ON taids (service, taid);
    CREATE TABLE csc_sads (
        sad_hash BYTEA PRIMARY KEY,
        service TEXT COLLATE "C" NOT NULL,
        taid TEXT COLLATE "C" NOT NULL,
        request_id TEXT COLLATE "C" NOT NULL REFERENCES signing_requests (id),
        hashes_sha256 BYTEA NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT
    );
    CREATE INDEX csc_sads_request ON csc_sads (request_id);"#,
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

/// The PostgreSQL implementation of [`Store`]: a handle; clones share one pool and runtime.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    handle: Handle,
    pool: Pool,
    /// See [`PgStore::round_trips`].
    round_trips: AtomicU64,
    /// What the pool connects with, for the connections of their own that leaders hold.
    config: tokio_postgres::Config,
    /// Host, port, database and user, for `Debug` (never the password).
    target: String,
    #[cfg(test)]
    plans: tests::Plans,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks stop, which panics inside an async
        // context (where the last handle may well be dropped); its connection tasks need no
        // waiting for.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (a `postgresql://` URL or libpq `key=value` string,
    /// without a password) with the password in `password_file` (its first line; `None` for a
    /// server that asks none, such as one trusting its Unix socket), keeps up to `pool_size`
    /// connections, and brings the schema up to date.
    ///
    /// Fails with `Config` for a URL that does not parse or carries a password, or an
    /// unreadable password file; `Unavailable` when the server cannot be reached; `Corrupt`
    /// when the database's schema is newer than this build.
    pub fn connect(
        url: &str,
        password_file: Option<&Path>,
        pool_size: usize,
    ) -> Result<PgStore, StoreError> {
        let mut config = parse_url(url)?;
        if let Some(path) = password_file {
            let contents = Zeroizing::new(std::fs::read(path).map_err(|e| StoreError::Config {
                what: "cannot read the PostgreSQL password file",
                source: Some(Box::new(e)),
            })?);
            let line = contents.split(|&b| b == b'\n').next().unwrap_or(&[]);
            config.password(line.strip_suffix(b"\r").unwrap_or(line));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(WAIT);
        }
        // A statement waiting for a lock fails like SQLite's busy timeout, instead of holding
        // its caller for as long as the other transaction runs. A node that dies, pauses or
        // loses the network inside a transaction (the audit ledger's, whose lock every node
        // needs) loses it within seconds, not when the kernel gives up on the socket: the
        // server ends a transaction left idle, cancels a statement that runs too long, and
        // probes a silent client; the client probes a silent server.
        let options = format!(
            "{} -c lock_timeout={wait} -c idle_in_transaction_session_timeout={idle} \
             -c statement_timeout={statement} -c tcp_keepalives_idle=10 \
             -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
            config.get_options().unwrap_or(""),
            wait = WAIT.as_millis(),
            idle = IDLE_IN_TRANSACTION.as_millis(),
            statement = STATEMENT_TIMEOUT.as_millis(),
        );
        config.options(options.trim_start());
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        let target = describe(&config);

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("smartsign-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(DatabaseError::Threads(e)))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                // A connection whose socket closed is dropped, one still open is reused as it
                // is (no extra round trip per call); a server restart closes them all.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .recycle_timeout(Some(WAIT))
            .build()
            .map_err(|e| StoreError::Config {
                what: "cannot build the PostgreSQL connection pool",
                source: Some(Box::new(e)),
            })?;
        let store = PgStore {
            inner: Arc::new(Inner {
                handle: runtime.handle().clone(),
                runtime: Some(runtime),
                pool,
                round_trips: AtomicU64::new(0),
                config,
                target,
                #[cfg(test)]
                plans: tests::Plans::default(),
            }),
        };
        store.run(async {
            let mut client = store.client().await?;
            migrate(&mut client).await
        })?;
        Ok(store)
    }

    /// Checks a connection URL as [`PgStore::connect`] would, without connecting (for
    /// `smartsignd --check-config`).
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        parse_url(url).map(drop)
    }

    /// The schema version this build writes.
    pub fn schema_version() -> usize {
        MIGRATIONS.len()
    }

    /// [`Store::health`] for async callers: runs on the store's runtime, and blocks no thread.
    pub async fn health_async(&self) -> Result<(), StoreError> {
        let store = self.clone();
        self.inner
            .handle
            .spawn(async move {
                let client = store.client().await?;
                store.db(&client).query_one("SELECT 1", &[]).await?;
                Ok(())
            })
            .await
            .unwrap_or_else(|e| {
                // The task cannot be cancelled (nothing aborts it) and a panic in it is a bug
                // to surface, not an error to report.
                std::panic::resume_unwind(e.into_panic())
            })
    }

    /// Waits on the calling thread for `future`, which runs its statements on the store's
    /// runtime (see the module documentation).
    fn run<T: Send>(
        &self,
        future: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        let handle = &self.inner.handle;
        match Handle::try_current().map(|current| current.runtime_flavor()) {
            Err(_) => handle.block_on(future),
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| handle.block_on(future))
            }
            Ok(_) => std::thread::scope(|scope| {
                scope
                    .spawn(|| handle.block_on(future))
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            }),
        }
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    fn db<'a, C: GenericClient>(&'a self, client: &'a C) -> Db<'a, C> {
        Db {
            client,
            round_trips: &self.inner.round_trips,
            #[cfg(test)]
            plans: &self.inner.plans,
        }
    }

    /// Begins a transaction: two round trips with its commit (`BEGIN`, `COMMIT`).
    async fn begin<'a>(
        &self,
        client: &'a mut Object,
    ) -> Result<deadpool_postgres::Transaction<'a>, StoreError> {
        self.inner.round_trips.fetch_add(2, Ordering::Relaxed);
        client.transaction().await.map_err(pg_error)
    }

    /// Round trips to the server since the store was opened: one per statement, two per
    /// transaction (a benchmark divides it by the signatures made).
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }
}

/// A connection URL (or libpq keywords) without a password: the password comes from a file.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| StoreError::Config {
        what: "the PostgreSQL connection URL does not parse",
        source: Some(Box::new(e)),
    })?;
    if config.get_password().is_some() {
        return Err(StoreError::Config {
            what: "the PostgreSQL connection URL carries a password: give it in a file",
            source: None,
        });
    }
    Ok(config)
}

/// "host=… port=… dbname=… user=…" of a configuration, for `Debug`.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let ports = config
        .get_ports()
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "host={hosts} port={ports} dbname={} user={}",
        config.get_dbname().unwrap_or(""),
        config.get_user().unwrap_or("")
    )
}

async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_error)?;
    // Building an index over millions of rows may take longer than a statement may.
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .map_err(pg_error)?;
    // Held until the transaction ends: the second node to start waits here, then finds the
    // schema up to date.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await
        .map_err(pg_error)?;
    let version: i64 = match tx
        .query_opt("SELECT version FROM schema_version", &[])
        .await
        .map_err(pg_error)?
    {
        Some(row) => row.try_get(0).map_err(pg_error)?,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                .await
                .map_err(pg_error)?;
            0
        }
    };
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
        tx.batch_execute(sql).await.map_err(pg_error)?;
    }
    let current = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    tx.execute("UPDATE schema_version SET version = $1", &[&current])
        .await
        .map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)
}

/// Sorts a PostgreSQL error into the store's error kinds.
fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if let Some(code) = e.code() {
        if *code == SqlState::UNIQUE_VIOLATION {
            return StoreError::AlreadyExists;
        }
        if *code == SqlState::FOREIGN_KEY_VIOLATION {
            return StoreError::Conflict;
        }
        let unavailable = code.code().starts_with("08") // connection exception
            || [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
            ]
            .contains(code);
        return if unavailable {
            StoreError::Unavailable(DatabaseError::Postgres(e))
        } else {
            StoreError::Database(DatabaseError::Postgres(e))
        };
    }
    // Not the server's answer: a closed connection or a socket error (the server down or
    // restarting) is worth retrying; a value that does not convert is not.
    let mut source = e.source();
    let mut io = false;
    while let Some(cause) = source {
        io |= cause.is::<std::io::Error>();
        source = cause.source();
    }
    if e.is_closed() || io {
        StoreError::Unavailable(DatabaseError::Postgres(e))
    } else {
        StoreError::Database(DatabaseError::Postgres(e))
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        e @ (PoolError::Timeout(_) | PoolError::Closed) => {
            StoreError::Unavailable(DatabaseError::Pool(e))
        }
        e => StoreError::Database(DatabaseError::Pool(e)),
    }
}

type Param = Box<dyn ToSql + Sync + Send>;

fn refs(values: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect()
}

/// Runs statements on a pooled connection or on a transaction, each prepared once per
/// connection.
struct Db<'a, C> {
    client: &'a C,
    round_trips: &'a AtomicU64,
    #[cfg(test)]
    plans: &'a tests::Plans,
}

impl<C: GenericClient> Db<'_, C> {
    async fn prepare(&self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        self.client.prepare_cached(sql).await.map_err(pg_error)
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        #[cfg(test)]
        self.plans.explain(self.client, sql, params).await;
        let statement = self.prepare(sql).await?;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.client
            .execute(&statement, params)
            .await
            .map_err(pg_error)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        #[cfg(test)]
        self.plans.explain(self.client, sql, params).await;
        let statement = self.prepare(sql).await?;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.client
            .query(&statement, params)
            .await
            .map_err(pg_error)
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        #[cfg(test)]
        self.plans.explain(self.client, sql, params).await;
        let statement = self.prepare(sql).await?;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.client
            .query_opt(&statement, params)
            .await
            .map_err(pg_error)
    }

    async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, StoreError> {
        #[cfg(test)]
        self.plans.explain(self.client, sql, params).await;
        let statement = self.prepare(sql).await?;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.client
            .query_one(&statement, params)
            .await
            .map_err(pg_error)
    }

    async fn exists(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<bool, StoreError> {
        get(&self.query_one(sql, params).await?, 0)
    }
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| StoreError::Database(DatabaseError::Postgres(e)))
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// A text column holding a wire name or checked id.
struct Parsed<T>(T);

impl<'a, T> FromSql<'a> for Parsed<T>
where
    T: std::str::FromStr,
    T::Err: StdError + Send + Sync + 'static,
{
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Parsed(<&str>::from_sql(ty, raw)?.parse()?))
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

/// A `BIGINT` holding a narrower number.
struct Int<T>(T);

impl<'a, T> FromSql<'a> for Int<T>
where
    T: TryFrom<i64>,
    T::Error: StdError + Send + Sync + 'static,
{
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Int(T::try_from(i64::from_sql(ty, raw)?)?))
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as FromSql>::accepts(ty)
    }
}

/// A `BIGINT` of unix seconds.
struct Secs(OffsetDateTime);

impl<'a> FromSql<'a> for Secs {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Secs(OffsetDateTime::from_unix_timestamp(i64::from_sql(
            ty, raw,
        )?)?))
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as FromSql>::accepts(ty)
    }
}

/// A `BYTEA` of a 32-byte hash or key.
struct Bytes32([u8; 32]);

impl<'a> FromSql<'a> for Bytes32 {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Bytes32(<[u8; 32]>::try_from(<&[u8]>::from_sql(ty, raw)?)?))
    }

    fn accepts(ty: &Type) -> bool {
        <&[u8] as FromSql>::accepts(ty)
    }
}

fn parsed<T>(row: &Row, idx: usize) -> Result<T, StoreError>
where
    T: std::str::FromStr,
    T::Err: StdError + Send + Sync + 'static,
{
    Ok(get::<Parsed<T>>(row, idx)?.0)
}

fn opt_parsed<T>(row: &Row, idx: usize) -> Result<Option<T>, StoreError>
where
    T: std::str::FromStr,
    T::Err: StdError + Send + Sync + 'static,
{
    Ok(get::<Option<Parsed<T>>>(row, idx)?.map(|p| p.0))
}

fn time_at(row: &Row, idx: usize) -> Result<OffsetDateTime, StoreError> {
    Ok(get::<Secs>(row, idx)?.0)
}

fn opt_time_at(row: &Row, idx: usize) -> Result<Option<OffsetDateTime>, StoreError> {
    Ok(get::<Option<Secs>>(row, idx)?.map(|s| s.0))
}

fn secs(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn limit_value(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// An account's columns from `offset` on, in `ACCOUNT_COLUMNS` order.
fn account_at(row: &Row, offset: usize) -> Result<AccountRecord, StoreError> {
    let at = |i: usize| offset + i;
    Ok(AccountRecord {
        id: parsed(row, at(0))?,
        tier: parsed(row, at(1))?,
        status: parsed(row, at(2))?,
        status_changed_at: time_at(row, at(3))?,
        suspended_by: opt_parsed(row, at(4))?,
        rectify_by: opt_time_at(row, at(5))?,
        sealed_name: get(row, at(6))?,
        sealed_dob: get(row, at(7))?,
        hkic_hash: get::<Bytes32>(row, at(8))?.0,
        device_public_key: get(row, at(9))?,
        device_generation: get::<Int<u32>>(row, at(10))?.0,
        current_certificate: opt_parsed(row, at(11))?,
        created_at: time_at(row, at(12))?,
        version: get::<Int<u64>>(row, at(13))?.0,
        guardian_hkic_hash: get::<Option<Bytes32>>(row, at(14))?.map(|h| h.0),
        adult_day_key: get::<Option<Bytes32>>(row, at(15))?.map(|k| k.0),
    })
}

fn account_from_row(row: &Row) -> Result<AccountRecord, StoreError> {
    account_at(row, 0)
}

/// A certificate's columns from `offset` on, in `CERTIFICATE_COLUMNS` order.
fn certificate_at(row: &Row, offset: usize) -> Result<CertificateRecord, StoreError> {
    let at = |i: usize| offset + i;
    Ok(CertificateRecord {
        serial: parsed(row, at(0))?,
        account_id: parsed(row, at(1))?,
        profile: parsed(row, at(2))?,
        not_before: time_at(row, at(3))?,
        not_after: time_at(row, at(4))?,
        status: parsed(row, at(5))?,
        revocation_reason: opt_parsed(row, at(6))?,
        revoked_at: opt_time_at(row, at(7))?,
        sealed_der: get(row, at(8))?,
        key_ref: get(row, at(9))?,
        key_algorithm: get(row, at(10))?,
    })
}

fn certificate_from_row(row: &Row) -> Result<CertificateRecord, StoreError> {
    certificate_at(row, 0)
}

fn request_from_row(row: &Row) -> Result<SigningRequest, StoreError> {
    let hash_algorithm = parsed(row, 5)?;
    let hashes = crate::signing::split_hashes(hash_algorithm, get(row, 15)?)
        .map_err(|e| StoreError::Corrupt(e.into()))?;
    Ok(SigningRequest {
        id: parsed(row, 0)?,
        service: parsed(row, 1)?,
        account_id: parsed(row, 2)?,
        certificate: parsed(row, 3)?,
        identification_code: get(row, 4)?,
        hash_algorithm,
        hash: get(row, 6)?,
        hashes,
        description: get(row, 7)?,
        status: parsed(row, 8)?,
        bad_attempts: get::<Int<u8>>(row, 9)?.0,
        device_generation: get::<Int<u32>>(row, 10)?.0,
        created_at: time_at(row, 11)?,
        expires_at: time_at(row, 12)?,
        sealed_result: get(row, 13)?,
        signed_at: opt_time_at(row, 14)?,
    })
}

fn challenge_from_row(row: &Row) -> Result<ConsentChallenge, StoreError> {
    Ok(ConsentChallenge {
        account_id: parsed(row, 0)?,
        purpose: parsed(row, 1)?,
        nonce: get(row, 2)?,
        expires_at: time_at(row, 3)?,
    })
}

fn key_change_from_row(row: &Row) -> Result<KeyChangeJournal, StoreError> {
    Ok(KeyChangeJournal {
        account_id: parsed(row, 0)?,
        purpose: parsed(row, 1)?,
        old_serial: opt_parsed(row, 2)?,
        new_key_ref: get(row, 3)?,
        new_serial: opt_parsed(row, 4)?,
        new_sealed_der: get(row, 5)?,
        started_at: time_at(row, 6)?,
    })
}

fn issuance_from_row(row: &Row) -> Result<IssuanceJournal, StoreError> {
    Ok(IssuanceJournal {
        account_id: parsed(row, 0)?,
        purpose: parsed(row, 1)?,
        key_ref: get(row, 2)?,
        serial: opt_parsed(row, 3)?,
        sealed_der: get(row, 4)?,
        started_at: time_at(row, 5)?,
    })
}

fn rows<T>(
    rows: Vec<Row>,
    from_row: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(from_row).collect()
}

/// An account's columns in `ACCOUNT_COLUMNS` order (`$1` to `$16`), for insert and update alike.
fn account_values(a: &AccountRecord) -> Vec<Param> {
    vec![
        Box::new(a.id.as_str().to_owned()),
        Box::new(a.tier.as_str()),
        Box::new(a.status.as_str()),
        Box::new(secs(a.status_changed_at)),
        Box::new(a.suspended_by.map(|s| s.as_str())),
        Box::new(a.rectify_by.map(secs)),
        Box::new(a.sealed_name.clone()),
        Box::new(a.sealed_dob.clone()),
        Box::new(a.hkic_hash.to_vec()),
        Box::new(a.device_public_key.clone()),
        Box::new(i64::from(a.device_generation)),
        Box::new(
            a.current_certificate
                .as_ref()
                .map(|serial| serial.as_str().to_owned()),
        ),
        Box::new(secs(a.created_at)),
        Box::new(i64::try_from(a.version).unwrap_or(i64::MAX)),
        Box::new(a.guardian_hkic_hash.map(|hash| hash.to_vec())),
        Box::new(a.adult_day_key.map(|key| key.to_vec())),
    ]
}

/// A certificate's columns in `CERTIFICATE_COLUMNS` order (`$1` to `$11`).
fn certificate_values(c: &CertificateRecord) -> Vec<Param> {
    vec![
        Box::new(c.serial.as_str().to_owned()),
        Box::new(c.account_id.as_str().to_owned()),
        Box::new(c.profile.as_str()),
        Box::new(secs(c.not_before)),
        Box::new(secs(c.not_after)),
        Box::new(c.status.as_str()),
        Box::new(c.revocation_reason.map(|r| r.as_str())),
        Box::new(c.revoked_at.map(secs)),
        Box::new(c.sealed_der.clone()),
        Box::new(c.key_ref.clone()),
        Box::new(c.key_algorithm.clone()),
    ]
}

/// A request's columns in `REQUEST_COLUMNS` order (`$1` to `$16`).
fn request_values(r: &SigningRequest) -> Vec<Param> {
    vec![
        Box::new(r.id.as_str().to_owned()),
        Box::new(r.service.as_str().to_owned()),
        Box::new(r.account_id.as_str().to_owned()),
        Box::new(r.certificate.as_str().to_owned()),
        Box::new(r.identification_code.clone()),
        Box::new(r.hash_algorithm.as_str()),
        Box::new(r.hash.clone()),
        Box::new(r.description.clone()),
        Box::new(r.status.as_str()),
        Box::new(i64::from(r.bad_attempts)),
        Box::new(i64::from(r.device_generation)),
        Box::new(secs(r.created_at)),
        Box::new(secs(r.expires_at)),
        Box::new(r.sealed_result.clone()),
        Box::new(r.signed_at.map(secs)),
        Box::new(crate::signing::joined_hashes(r.hashes.as_ref())),
    ]
}

/// A journal row's columns in `KEY_CHANGE_COLUMNS` order (`$1` to `$7`).
fn key_change_values(j: &KeyChangeJournal) -> Vec<Param> {
    vec![
        Box::new(j.account_id.as_str().to_owned()),
        Box::new(j.purpose.as_str()),
        Box::new(j.old_serial.as_ref().map(|s| s.as_str().to_owned())),
        Box::new(j.new_key_ref.clone()),
        Box::new(j.new_serial.as_ref().map(|s| s.as_str().to_owned())),
        Box::new(j.new_sealed_der.clone()),
        Box::new(secs(j.started_at)),
    ]
}

/// A journal row's columns in `ISSUANCE_COLUMNS` order (`$1` to `$6`).
fn issuance_values(j: &IssuanceJournal) -> Vec<Param> {
    vec![
        Box::new(j.account_id.as_str().to_owned()),
        Box::new(j.purpose.as_str()),
        Box::new(j.key_ref.clone()),
        Box::new(j.serial.as_ref().map(|s| s.as_str().to_owned())),
        Box::new(j.sealed_der.clone()),
        Box::new(secs(j.started_at)),
    ]
}

/// `$1, $2, …, $n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn one_row_changed(changed: u64) -> Result<(), StoreError> {
    if changed == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

async fn insert_account_row<C: GenericClient>(
    db: &Db<'_, C>,
    a: &AccountRecord,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES ({})",
        placeholders(16)
    );
    db.execute(&sql, &refs(&account_values(a))).await?;
    Ok(())
}

/// Writes `a` over the stored row only if that row is still at `a.version`, and bumps the
/// version: `Conflict` when another change came first, `NotFound` when there is no account.
async fn update_account_row<C: GenericClient>(
    db: &Db<'_, C>,
    a: &AccountRecord,
) -> Result<(), StoreError> {
    let changed = db
        .execute(
            "UPDATE accounts SET tier = $2, status = $3, status_changed_at = $4, \
                 suspended_by = $5, rectify_by = $6, sealed_name = $7, sealed_dob = $8, \
                 hkic_hash = $9, device_public_key = $10, device_generation = $11, \
                 current_certificate = $12, created_at = $13, version = $14 + 1, \
                 guardian_hkic_hash = $15, adult_day_key = $16 WHERE id = $1 AND version = $14",
            &refs(&account_values(a)),
        )
        .await?;
    if changed == 0 {
        let exists = db
            .exists(
                "SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)",
                &[&a.id.as_str()],
            )
            .await?;
        return Err(if exists {
            StoreError::Conflict
        } else {
            StoreError::NotFound
        });
    }
    Ok(())
}

async fn insert_certificate_row<C: GenericClient>(
    db: &Db<'_, C>,
    c: &CertificateRecord,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO certificates ({CERTIFICATE_COLUMNS}) VALUES ({})",
        placeholders(11)
    );
    db.execute(&sql, &refs(&certificate_values(c))).await?;
    Ok(())
}

async fn get_certificate<C: GenericClient>(
    db: &Db<'_, C>,
    serial: &CertSerial,
) -> Result<Option<CertificateRecord>, StoreError> {
    let sql = format!("SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE serial = $1");
    db.query_opt(&sql, &[&serial.as_str()])
        .await?
        .as_ref()
        .map(certificate_from_row)
        .transpose()
}

/// Stores `events` in the transaction `db` runs (it must be one: the events lock is held until
/// it ends), under the events lock ([`EVENTS_LOCK`]).
async fn insert_events<C: GenericClient>(
    db: &Db<'_, C>,
    events: &[UserEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    db.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])
        .await?;
    for event in events {
        let details = &event.details;
        db.execute(
            "INSERT INTO user_events (at, account_id, event, serial, reason, not_after, \
             by_party, rectify_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &secs(event.at),
                &event.account_id.as_str(),
                &event.kind.as_str(),
                &details.serial.as_ref().map(CertSerial::as_str),
                &details.reason.map(RevocationReason::as_str),
                &details.not_after.map(secs),
                &details.by.map(|by| by.as_str()),
                &details.rectify_by.map(secs),
            ],
        )
        .await?;
    }
    Ok(())
}

fn event_from_row(row: &Row) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        position: get(row, 0)?,
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

/// `columns` with each name prefixed by `table.`.
fn qualified(table: &str, columns: &str) -> String {
    columns
        .split(", ")
        .map(|column| format!("{table}.{column}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store for PgStore {
    fn insert_account(&self, a: &AccountRecord) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            insert_account_row(&self.db(&client), a).await
        })
    }

    fn get_account(&self, id: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1");
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query_opt(&sql, &[&id.as_str()])
                .await?
                .as_ref()
                .map(account_from_row)
                .transpose()
        })
    }

    fn update_account(&self, a: &AccountRecord, events: &[UserEvent]) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            if events.is_empty() {
                return update_account_row(&self.db(&client), a).await;
            }
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            update_account_row(&db, a).await?;
            insert_events(&db, events).await?;
            tx.commit().await.map_err(pg_error)
        })
    }

    fn insert_account_with_certificate(
        &self,
        account: &AccountRecord,
        certificate: &CertificateRecord,
        events: &[UserEvent],
    ) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            insert_account_row(&db, account).await?;
            insert_certificate_row(&db, certificate).await?;
            insert_events(&db, events).await?;
            tx.commit().await.map_err(pg_error)
        })
    }

    fn attach_certificate(
        &self,
        account: &AccountRecord,
        certificate: &CertificateRecord,
        events: &[UserEvent],
    ) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            insert_certificate_row(&db, certificate).await?;
            update_account_row(&db, account).await?;
            insert_events(&db, events).await?;
            tx.commit().await.map_err(pg_error)
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
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            update_account_row(&db, a).await?;
            insert_events(&db, events).await?;
            let row = db
                .query_one(
                    "INSERT INTO audit_outbox (event, actor, fields) VALUES ($1, $2, $3) \
                     RETURNING id",
                    &[&event, &actor, &fields],
                )
                .await?;
            let id = get(&row, 0)?;
            tx.commit().await.map_err(pg_error)?;
            Ok(id)
        })
    }

    fn record_hkic_mismatch(
        &self,
        account: &AccountId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute(
                    "INSERT INTO hkic_mismatches (account_id, at) VALUES ($1, $2)",
                    &[&account.as_str(), &secs(at)],
                )
                .await?;
            Ok(())
        })
    }

    fn hkic_mismatches_since(
        &self,
        account: &AccountId,
        since: OffsetDateTime,
    ) -> Result<Vec<OffsetDateTime>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(
                    "SELECT at FROM hkic_mismatches WHERE account_id = $1 AND at >= $2 \
                     ORDER BY at",
                    &[&account.as_str(), &secs(since)],
                )
                .await?;
            rows(found, |row| time_at(row, 0))
        })
    }

    fn pending_audits(&self) -> Result<Vec<PendingAudit>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(
                    "SELECT id, event, actor, fields FROM audit_outbox ORDER BY id",
                    &[],
                )
                .await?;
            rows(found, |row| {
                Ok(PendingAudit {
                    id: get(row, 0)?,
                    event: get(row, 1)?,
                    actor: get(row, 2)?,
                    fields: get(row, 3)?,
                })
            })
        })
    }

    fn delete_pending_audit(&self, id: i64) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute("DELETE FROM audit_outbox WHERE id = $1", &[&id])
                .await?;
            Ok(())
        })
    }

    fn accounts_with_hkic_hash(&self, hkic_hash: &[u8; 32]) -> Result<Vec<AccountId>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(
                    "SELECT id FROM accounts WHERE hkic_hash = $1 ORDER BY id",
                    &[&&hkic_hash[..]],
                )
                .await?;
            rows(found, |row| parsed(row, 0))
        })
    }

    fn deregister(&self, account: &AccountRecord, events: &[UserEvent]) -> Result<(), StoreError> {
        let id = account.id.as_str();
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            update_account_row(&db, account).await?;
            db.execute(
                "UPDATE accounts SET sealed_name = '', sealed_dob = '', \
                 hkic_hash = decode(repeat('00', 32), 'hex'), guardian_hkic_hash = NULL, \
                 adult_day_key = NULL WHERE id = $1",
                &[&id],
            )
            .await?;
            // A certificate whose key is still there has not had its revocation reach the CA:
            // its DER stays (sealed) until then, erased with the key (`forget_key`).
            db.execute(
                "UPDATE certificates SET sealed_der = '' \
                 WHERE account_id = $1 AND key_ref IS NULL",
                &[&id],
            )
            .await?;
            // A request still open ends here: an approval in flight can no longer store (and
            // release) its result.
            db.execute(
                "UPDATE signing_requests SET status = 'failed', finished_at = $2 \
                 WHERE account_id = $1 AND status IN ('pending', 'approved')",
                &[&id, &secs(account.status_changed_at)],
            )
            .await?;
            db.execute(
                "UPDATE signing_requests SET sealed_result = NULL, hash = '', \
                 hashes = CASE WHEN hashes IS NULL THEN NULL ELSE ''::BYTEA END, \
                 description = NULL WHERE account_id = $1",
                &[&id],
            )
            .await?;
            insert_events(&db, events).await?;
            tx.commit().await.map_err(pg_error)
        })
    }

    fn insert_certificate(&self, c: &CertificateRecord) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            insert_certificate_row(&self.db(&client), c).await
        })
    }

    fn get_certificate(
        &self,
        serial: &CertSerial,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            get_certificate(&self.db(&client), serial).await
        })
    }

    fn mark_revoked(
        &self,
        serial: &CertSerial,
        reason: RevocationReason,
        at: OffsetDateTime,
        events: &[UserEvent],
    ) -> Result<bool, StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            let changed = db
                .execute(
                    "UPDATE certificates SET status = 'revoked', revocation_reason = $2, \
                     revoked_at = $3 WHERE serial = $1 AND status <> 'revoked'",
                    &[&serial.as_str(), &reason.as_str(), &secs(at)],
                )
                .await?;
            if changed == 0 && get_certificate(&db, serial).await?.is_none() {
                return Err(StoreError::NotFound);
            }
            if changed == 1 {
                insert_events(&db, events).await?;
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(changed == 1)
        })
    }

    fn certificates_to_notify(
        &self,
        notice: CertificateNotice,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates \
             WHERE status = 'valid' AND notice < 2 AND notice < $1 AND not_after <= $2 \
             ORDER BY not_after, serial LIMIT $3"
        );
        let stage = i16::try_from(notice.stage()).unwrap_or(i16::MAX);
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(&sql, &[&stage, &secs(until), &limit_value(limit)])
                .await?;
            rows(found, certificate_from_row)
        })
    }

    fn record_notice(
        &self,
        serial: &CertSerial,
        notice: CertificateNotice,
        events: &[UserEvent],
    ) -> Result<bool, StoreError> {
        let stage = i16::try_from(notice.stage()).unwrap_or(i16::MAX);
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            let changed = db
                .execute(
                    "UPDATE certificates SET notice = $2 \
                     WHERE serial = $1 AND status = 'valid' AND notice < $2",
                    &[&serial.as_str(), &stage],
                )
                .await?;
            if changed == 1 {
                insert_events(&db, events).await?;
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(changed == 1)
        })
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(
                    "SELECT seq, at, account_id, event, serial, reason, not_after, by_party, \
                     rectify_by FROM user_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &limit_value(limit)],
                )
                .await?;
            rows(found, event_from_row)
        })
    }

    fn forget_key(&self, serial: &CertSerial, key_ref: &[u8]) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            db.execute(
                "UPDATE certificates SET key_ref = NULL WHERE serial = $1 AND key_ref = $2",
                &[&serial.as_str(), &key_ref],
            )
            .await?;
            db.execute(
                "UPDATE certificates SET sealed_der = '' \
                 WHERE serial = $1 AND key_ref IS NULL AND octet_length(sealed_der) > 0 \
                 AND EXISTS (SELECT 1 FROM accounts WHERE accounts.id = \
                     certificates.account_id AND accounts.status = 'deregistered')",
                &[&serial.as_str()],
            )
            .await?;
            tx.commit().await.map_err(pg_error)
        })
    }

    fn certificates_of(&self, account: &AccountId) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE account_id = $1 \
             ORDER BY not_before, serial"
        );
        self.run(async {
            let client = self.client().await?;
            let found = self.db(&client).query(&sql, &[&account.as_str()]).await?;
            rows(found, certificate_from_row)
        })
    }

    fn account_with_certificate(
        &self,
        id: &AccountId,
    ) -> Result<Option<(AccountRecord, Option<CertificateRecord>)>, StoreError> {
        // One statement: both records from the same snapshot, in one round trip.
        let sql = format!(
            "SELECT {}, {} FROM accounts a LEFT JOIN certificates c \
             ON c.serial = a.current_certificate WHERE a.id = $1",
            qualified("a", ACCOUNT_COLUMNS),
            qualified("c", CERTIFICATE_COLUMNS)
        );
        self.run(async {
            let client = self.client().await?;
            let Some(row) = self.db(&client).query_opt(&sql, &[&id.as_str()]).await? else {
                return Ok(None);
            };
            let account = account_from_row(&row)?;
            let certificate = match get::<Option<&str>>(&row, 16)? {
                Some(_) => Some(certificate_at(&row, 16)?),
                None => None,
            };
            Ok(Some((account, certificate)))
        })
    }

    fn unfinished_revocations(&self, limit: usize) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates \
             WHERE status = 'revoked' AND key_ref IS NOT NULL ORDER BY not_after, serial LIMIT $1"
        );
        self.run(async {
            let client = self.client().await?;
            let found = self.db(&client).query(&sql, &[&limit_value(limit)]).await?;
            rows(found, certificate_from_row)
        })
    }

    fn expired_with_keys(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = format!(
            "SELECT {CERTIFICATE_COLUMNS} FROM certificates \
             WHERE status = 'valid' AND key_ref IS NOT NULL AND not_after <= $1 \
             ORDER BY not_after, serial LIMIT $2"
        );
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(&sql, &[&secs(now), &limit_value(limit)])
                .await?;
            rows(found, certificate_from_row)
        })
    }

    fn accounts_with_adult_day(&self, key: &[u8; 32]) -> Result<Vec<AccountRecord>, StoreError> {
        let sql =
            format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE adult_day_key = $1 ORDER BY id");
        self.run(async {
            let client = self.client().await?;
            let found = self.db(&client).query(&sql, &[&&key[..]]).await?;
            rows(found, account_from_row)
        })
    }

    fn current_minors(
        &self,
        after: Option<&AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM certificates c JOIN accounts a ON a.id = c.account_id \
             WHERE c.profile = 'minor' AND c.status = 'valid' AND c.account_id > $1 \
             AND a.current_certificate = c.serial ORDER BY c.account_id LIMIT $2",
            qualified("a", ACCOUNT_COLUMNS)
        );
        let after = after.map_or("", AccountId::as_str);
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(&sql, &[&after, &limit_value(limit)])
                .await?;
            rows(found, account_from_row)
        })
    }

    fn rectifications_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts \
             WHERE status = 'rectification_pending' AND rectify_by <= $1 \
             ORDER BY rectify_by, id LIMIT $2"
        );
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(&sql, &[&secs(now), &limit_value(limit)])
                .await?;
            rows(found, account_from_row)
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
             WHERE status = $1 AND status_changed_at < $2 \
             ORDER BY status_changed_at, id LIMIT $3"
        );
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(
                    &sql,
                    &[&status.as_str(), &secs(before), &limit_value(limit)],
                )
                .await?;
            rows(found, account_from_row)
        })
    }

    fn sweep_mark(&self, name: &str) -> Result<Option<i64>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query_opt("SELECT value FROM sweep_marks WHERE name = $1", &[&name])
                .await?
                .map(|row| get(&row, 0))
                .transpose()
        })
    }

    fn advance_sweep_mark(
        &self,
        name: &str,
        from: Option<i64>,
        to: i64,
    ) -> Result<bool, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let db = self.db(&client);
            let changed = match from {
                None => {
                    db.execute(
                        "INSERT INTO sweep_marks (name, value) VALUES ($1, $2) \
                         ON CONFLICT (name) DO NOTHING",
                        &[&name, &to],
                    )
                    .await?
                }
                Some(from) => {
                    db.execute(
                        "UPDATE sweep_marks SET value = $3 WHERE name = $1 AND value = $2",
                        &[&name, &from, &to],
                    )
                    .await?
                }
            };
            Ok(changed == 1)
        })
    }

    fn put_taid(&self, t: &TaidRecord) -> Result<TaidRecord, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let db = self.db(&client);
            // Another taid for the same (service, account) keeps the stored one; the same taid
            // for another (service, account) is a unique violation: `AlreadyExists`.
            let inserted = db
                .execute(
                    "INSERT INTO taids (taid, service, account_id) VALUES ($1, $2, $3) \
                     ON CONFLICT (service, account_id) DO NOTHING",
                    &[&t.taid, &t.service.as_str(), &t.account_id.as_str()],
                )
                .await?;
            if inserted == 1 {
                return Ok(t.clone());
            }
            // The row that won is committed (the insert waited for it): this statement sees
            // it.
            let row = db
                .query_one(
                    "SELECT taid FROM taids WHERE service = $1 AND account_id = $2",
                    &[&t.service.as_str(), &t.account_id.as_str()],
                )
                .await?;
            Ok(TaidRecord {
                taid: get(&row, 0)?,
                ..t.clone()
            })
        })
    }

    fn find_taid(
        &self,
        service: &ServiceName,
        taid: &str,
    ) -> Result<Option<AccountId>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query_opt(
                    "SELECT account_id FROM taids WHERE service = $1 AND taid = $2",
                    &[&service.as_str(), &taid],
                )
                .await?
                .map(|row| parsed(&row, 0))
                .transpose()
        })
    }

    fn taids_of(
        &self,
        service: &ServiceName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query(
                    "SELECT t.taid FROM taids t JOIN accounts a ON a.id = t.account_id \
                     WHERE t.service = $1 AND t.taid > $2 AND a.status <> 'deregistered' \
                     ORDER BY t.taid LIMIT $3",
                    &[&service.as_str(), &after.unwrap_or(""), &limit_value(limit)],
                )
                .await?
                .iter()
                .map(|row| get(row, 0))
                .collect()
        })
    }

    fn insert_sad(&self, sad: &CscSad) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute(
                    "INSERT INTO csc_sads (sad_hash, service, taid, request_id, hashes_sha256, \
                     expires_at, used_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &sad.sad_hash.as_slice(),
                        &sad.service.as_str(),
                        &sad.taid,
                        &sad.request_id.as_str(),
                        &sad.hashes_sha256.as_slice(),
                        &secs(sad.expires_at),
                        &sad.used_at.map(secs),
                    ],
                )
                .await?;
            Ok(())
        })
    }

    fn get_sad(&self, sad_hash: &[u8; 32]) -> Result<Option<CscSad>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query_opt(
                    "SELECT sad_hash, service, taid, request_id, hashes_sha256, expires_at, \
                     used_at FROM csc_sads WHERE sad_hash = $1",
                    &[&sad_hash.as_slice()],
                )
                .await?
                .map(|row| {
                    Ok(CscSad {
                        sad_hash: get::<Bytes32>(&row, 0)?.0,
                        service: parsed(&row, 1)?,
                        taid: get(&row, 2)?,
                        request_id: parsed(&row, 3)?,
                        hashes_sha256: get::<Bytes32>(&row, 4)?.0,
                        expires_at: time_at(&row, 5)?,
                        used_at: opt_time_at(&row, 6)?,
                    })
                })
                .transpose()
        })
    }

    fn redeem_sad(&self, sad_hash: &[u8; 32], now: OffsetDateTime) -> Result<bool, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let changed = self
                .db(&client)
                .execute(
                    "UPDATE csc_sads SET used_at = $2 \
                     WHERE sad_hash = $1 AND used_at IS NULL AND expires_at > $2",
                    &[&sad_hash.as_slice(), &secs(now)],
                )
                .await?;
            Ok(changed == 1)
        })
    }

    fn insert_request(
        &self,
        r: &SigningRequest,
        max_pending: usize,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // Casts: parameters in a SELECT list take no type from the columns they go into.
        let sql = format!(
            "INSERT INTO signing_requests ({REQUEST_COLUMNS}) \
             SELECT $1::TEXT, $2::TEXT, $3::TEXT, $4::TEXT, $5::TEXT, $6::TEXT, $7::BYTEA, \
                 $8::TEXT, $9::TEXT, $10::BIGINT, $11::BIGINT, $12::BIGINT, $13::BIGINT, \
                 $14::BYTEA, $15::BIGINT, $16::BYTEA \
             WHERE (SELECT count(*) FROM signing_requests WHERE account_id = $3 \
                  AND status = 'pending' AND expires_at > $17) < $18 \
             AND NOT EXISTS (SELECT 1 FROM signing_requests WHERE account_id = $3 \
                  AND status = 'pending' AND expires_at > $17 AND identification_code = $5)"
        );
        let mut values = request_values(r);
        values.push(Box::new(secs(now)));
        values.push(Box::new(i64::try_from(max_pending).unwrap_or(i64::MAX)));
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            let known = db
                .exists(
                    "SELECT EXISTS (SELECT 1 FROM signing_requests WHERE id = $1)",
                    &[&r.id.as_str()],
                )
                .await?;
            if known {
                return Err(StoreError::AlreadyExists);
            }
            // The account's row lock orders the account's insertions across connections and
            // nodes: the count below, a new statement, sees every request added before it.
            let active = db
                .query_opt(
                    "SELECT 1 FROM accounts WHERE id = $1 AND status = 'active' \
                     FOR NO KEY UPDATE",
                    &[&r.account_id.as_str()],
                )
                .await?
                .is_some();
            if !active {
                return Err(StoreError::Conflict);
            }
            if db.execute(&sql, &refs(&values)).await? == 0 {
                return Err(StoreError::Conflict);
            }
            tx.commit().await.map_err(pg_error)
        })
    }

    fn get_request(&self, id: &RequestId) -> Result<Option<SigningRequest>, StoreError> {
        let sql = format!("SELECT {REQUEST_COLUMNS} FROM signing_requests WHERE id = $1");
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query_opt(&sql, &[&id.as_str()])
                .await?
                .as_ref()
                .map(request_from_row)
                .transpose()
        })
    }

    fn transition_request(
        &self,
        r: &SigningRequest,
        from: (SigningStatus, u8),
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let (status, attempts) = from;
        self.run(async {
            let client = self.client().await?;
            let db = self.db(&client);
            // One statement: a concurrent transition of the same request makes this one wait
            // for its row lock, then re-check the `WHERE` against what it left.
            let changed = db
                .execute(
                    "UPDATE signing_requests SET status = $2, bad_attempts = $3, \
                     sealed_result = $4, signed_at = $5, finished_at = CASE \
                         WHEN $2 = 'expired' THEN expires_at \
                         WHEN $2 IN ('signed', 'rejected', 'locked', 'failed') THEN $8 \
                         ELSE finished_at END \
                     WHERE id = $1 AND status = $6 AND bad_attempts = $7 \
                     AND ($2 <> 'approved' OR (EXISTS (SELECT 1 FROM accounts \
                          WHERE accounts.id = signing_requests.account_id \
                          AND accounts.status = 'active' \
                          AND accounts.device_generation = signing_requests.device_generation \
                          AND accounts.current_certificate = signing_requests.certificate) \
                      AND EXISTS (SELECT 1 FROM certificates \
                          WHERE certificates.serial = signing_requests.certificate \
                          AND certificates.status = 'valid' \
                          AND certificates.key_ref IS NOT NULL)))",
                    &[
                        &r.id.as_str(),
                        &r.status.as_str(),
                        &i64::from(r.bad_attempts),
                        &r.sealed_result,
                        &r.signed_at.map(secs),
                        &status.as_str(),
                        &i64::from(attempts),
                        &secs(now),
                    ],
                )
                .await?;
            if changed == 0 {
                let exists = db
                    .exists(
                        "SELECT EXISTS (SELECT 1 FROM signing_requests WHERE id = $1)",
                        &[&r.id.as_str()],
                    )
                    .await?;
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
        // A finish time for every finished request: stored, or (pending requests past their
        // expiry) the best the row says.
        let sql = format!(
            "SELECT {REQUEST_COLUMNS}, finished FROM (SELECT *, COALESCE(finished_at, \
                 CASE WHEN status IN ('pending', 'expired') THEN expires_at END, signed_at, \
                 created_at) AS finished FROM signing_requests WHERE account_id = $1 \
                 AND (status IN ('signed', 'rejected', 'expired', 'locked', 'failed') \
                      OR (status = 'pending' AND expires_at <= $2))) AS finished_requests \
             WHERE finished < $3 OR (finished = $3 AND id < $4) \
             ORDER BY finished DESC, id DESC LIMIT $5"
        );
        let (before_time, before_id) = match &before {
            Some((time, id)) => (secs(*time), id.as_str().to_owned()),
            // Past every row: the end of time, and an id above every id.
            None => (i64::MAX, "~".to_owned()),
        };
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(
                    &sql,
                    &[
                        &account.as_str(),
                        &secs(now),
                        &before_time,
                        &before_id,
                        &limit_value(limit),
                    ],
                )
                .await?;
            rows(found, |row| Ok((request_from_row(row)?, time_at(row, 16)?)))
        })
    }

    fn approved_requests(&self) -> Result<Vec<SigningRequest>, StoreError> {
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM signing_requests WHERE status = 'approved' ORDER BY id"
        );
        self.run(async {
            let client = self.client().await?;
            let found = self.db(&client).query(&sql, &[]).await?;
            rows(found, request_from_row)
        })
    }

    fn pending_requests(
        &self,
        account: &AccountId,
        now: OffsetDateTime,
    ) -> Result<Vec<SigningRequest>, StoreError> {
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM signing_requests \
             WHERE account_id = $1 AND status = 'pending' AND expires_at > $2 \
             ORDER BY created_at, id"
        );
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(&sql, &[&account.as_str(), &secs(now)])
                .await?;
            rows(found, request_from_row)
        })
    }

    fn count_pending(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let row = self
                .db(&client)
                .query_one(
                    "SELECT count(*) FROM signing_requests \
                     WHERE status = 'pending' AND expires_at > $1",
                    &[&secs(now)],
                )
                .await?;
            Ok(get::<Int<u64>>(&row, 0)?.0)
        })
    }

    fn health(&self) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client).query_one("SELECT 1", &[]).await?;
            Ok(())
        })
    }

    fn put_consent_challenge(&self, c: &ConsentChallenge) -> Result<(), StoreError> {
        let sql =
            format!("INSERT INTO consent_challenges ({CHALLENGE_COLUMNS}) VALUES ($1, $2, $3, $4)");
        self.run(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let db = self.db(&tx);
            // What SQLite's INSERT OR REPLACE does: the row of either key goes.
            db.execute(
                "DELETE FROM consent_challenges \
                 WHERE (account_id = $1 AND purpose = $2) OR nonce = $3",
                &[&c.account_id.as_str(), &c.purpose.as_str(), &c.nonce],
            )
            .await?;
            db.execute(
                &sql,
                &[
                    &c.account_id.as_str(),
                    &c.purpose.as_str(),
                    &c.nonce,
                    &secs(c.expires_at),
                ],
            )
            .await?;
            tx.commit().await.map_err(pg_error)
        })
    }

    fn take_consent_challenge(
        &self,
        account: &AccountId,
        nonce: &str,
    ) -> Result<Option<ConsentChallenge>, StoreError> {
        let sql = format!(
            "DELETE FROM consent_challenges WHERE account_id = $1 AND nonce = $2 \
             RETURNING {CHALLENGE_COLUMNS}"
        );
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .query_opt(&sql, &[&account.as_str(), &nonce])
                .await?
                .as_ref()
                .map(challenge_from_row)
                .transpose()
        })
    }

    fn insert_key_change(&self, j: &KeyChangeJournal) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO key_changes ({KEY_CHANGE_COLUMNS}) VALUES ({})",
            placeholders(7)
        );
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute(&sql, &refs(&key_change_values(j)))
                .await?;
            Ok(())
        })
    }

    fn update_key_change(&self, j: &KeyChangeJournal) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            let changed = self
                .db(&client)
                .execute(
                    "UPDATE key_changes SET purpose = $2, old_serial = $3, new_key_ref = $4, \
                     new_serial = $5, new_sealed_der = $6, started_at = $7 WHERE account_id = $1",
                    &refs(&key_change_values(j)),
                )
                .await?;
            one_row_changed(changed)
        })
    }

    fn delete_key_change(&self, account: &AccountId) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute(
                    "DELETE FROM key_changes WHERE account_id = $1",
                    &[&account.as_str()],
                )
                .await?;
            Ok(())
        })
    }

    fn key_changes(&self) -> Result<Vec<KeyChangeJournal>, StoreError> {
        let sql =
            format!("SELECT {KEY_CHANGE_COLUMNS} FROM key_changes ORDER BY started_at, account_id");
        self.run(async {
            let client = self.client().await?;
            let found = self.db(&client).query(&sql, &[]).await?;
            rows(found, key_change_from_row)
        })
    }

    fn insert_issuance(&self, j: &IssuanceJournal) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO issuances ({ISSUANCE_COLUMNS}) VALUES ({})",
            placeholders(6)
        );
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute(&sql, &refs(&issuance_values(j)))
                .await?;
            Ok(())
        })
    }

    fn update_issuance(&self, j: &IssuanceJournal) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            let changed = self
                .db(&client)
                .execute(
                    "UPDATE issuances SET purpose = $2, key_ref = $3, serial = $4, \
                     sealed_der = $5, started_at = $6 WHERE account_id = $1",
                    &refs(&issuance_values(j)),
                )
                .await?;
            one_row_changed(changed)
        })
    }

    fn delete_issuance(&self, account: &AccountId) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute(
                    "DELETE FROM issuances WHERE account_id = $1",
                    &[&account.as_str()],
                )
                .await?;
            Ok(())
        })
    }

    fn issuances(&self) -> Result<Vec<IssuanceJournal>, StoreError> {
        let sql =
            format!("SELECT {ISSUANCE_COLUMNS} FROM issuances ORDER BY started_at, account_id");
        self.run(async {
            let client = self.client().await?;
            let found = self.db(&client).query(&sql, &[]).await?;
            rows(found, issuance_from_row)
        })
    }

    fn round_trips(&self) -> Option<u64> {
        Some(PgStore::round_trips(self))
    }

    fn ceremony_record(&self, sha256: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let row = self
                .db(&client)
                .query_opt(
                    "SELECT audit_index FROM ceremony_transcripts WHERE sha256 = $1",
                    &[&sha256.as_slice()],
                )
                .await?;
            row.map(|row| {
                u64::try_from(row.get::<_, i64>(0))
                    .map_err(|_| StoreError::Corrupt("audit index".into()))
            })
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
        self.run(async {
            let client = self.client().await?;
            self.db(&client)
                .execute(
                    "INSERT INTO ceremony_transcripts (sha256, audit_index, recorded_at) \
                     VALUES ($1, $2, $3)",
                    &[&sha256.as_slice(), &index, &secs(now)],
                )
                .await?;
            Ok(())
        })
    }

    fn current_certificates_ending(
        &self,
        after: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<(AccountId, CertificateRecord)>, StoreError> {
        let sql = format!(
            "SELECT {} FROM accounts a JOIN certificates c \
             ON c.serial = a.current_certificate \
             WHERE a.status = 'active' AND a.tier = 'iam_smart_plus' AND c.status = 'valid' \
             AND c.not_after > $1 AND c.not_after <= $2 \
             ORDER BY c.not_after, a.id",
            qualified("c", CERTIFICATE_COLUMNS)
        );
        self.run(async {
            let client = self.client().await?;
            let found = self
                .db(&client)
                .query(&sql, &[&secs(after), &secs(until)])
                .await?;
            rows(found, |row| {
                let c = certificate_from_row(row)?;
                Ok((c.account_id.clone(), c))
            })
        })
    }
}

mod leader;
pub use leader::Leadership;

#[cfg(test)]
pub(super) mod tests;
