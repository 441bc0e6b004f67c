//! The PostgreSQL store's tests: the shared suite (`conformance`), and what only a server
//! database has (nodes, connections, the password, plans). Each test has a schema of its own in
//! the cluster that `SMARTSIGN_TEST_PG` names.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use deadpool_postgres::GenericClient;
use time::Duration;
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::{EVENTS_LOCK, PgStore, WAIT};
use crate::signing::tests::{CREATED, request};
use crate::store::conformance::{self, account, event, id, registered};
use crate::{AccountStatus, SigningStatus, Store, StoreError};

/// The plans of the statements a store ran while recording (`EXPLAIN (FORMAT JSON)` with the
/// same parameters, on the same connection, just before each).
#[derive(Default)]
pub(super) struct Plans(Mutex<Option<Vec<(String, serde_json::Value)>>>);

impl Plans {
    pub(super) async fn explain<C: GenericClient>(
        &self,
        client: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) {
        if self.0.lock().unwrap().is_none() {
            return;
        }
        let row = client
            .query_one(&format!("EXPLAIN (FORMAT JSON) {sql}"), params)
            .await
            .unwrap();
        let plan: serde_json::Value = row.get(0);
        if let Some(plans) = self.0.lock().unwrap().as_mut() {
            plans.push((sql.to_owned(), plan));
        }
    }
}

impl Plans {
    fn start(&self) {
        *self.0.lock().unwrap() = Some(Vec::new());
    }

    fn take(&self) -> Vec<(String, serde_json::Value)> {
        self.0.lock().unwrap().take().unwrap_or_default()
    }
}

/// Where the tests find their PostgreSQL: libpq `key=value`s naming a host (or socket
/// directory) and a superuser, as `ops/pg start DIR` prints them.
const ENV: &str = "SMARTSIGN_TEST_PG";

/// The administrator's connection string; `None` when the PostgreSQL tests are skipped.
fn admin() -> Option<String> {
    match std::env::var(ENV) {
        Ok(value) if value == "skip" => None,
        Ok(value) => Some(value),
        Err(_) => panic!(
            "{ENV} is not set: start a throwaway cluster with `ops/pg start DIR` and export the \
             line it prints (ops/test does both), or set {ENV}=skip to skip the PostgreSQL tests"
        ),
    }
}

/// Runs `sql` (several statements) as the administrator.
fn admin_sql(
    admin: &str,
    sql: &str,
) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(admin, NoTls).await?;
        let connection = tokio::spawn(connection);
        let result = client.simple_query(sql).await;
        drop(client);
        let _ = connection.await;
        result
    })
}

/// A schema of its own in the test cluster for one test, so that tests run in parallel; dropped
/// with everything in it at the end.
pub(in crate::store) struct Schema {
    admin: String,
    name: String,
}

impl Schema {
    fn new() -> Option<Schema> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let admin = admin()?;
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin_sql(&admin, &format!("CREATE SCHEMA {name}")).unwrap();
        Some(Schema { admin, name })
    }

    /// The store's connection string: the administrator's, in this schema.
    fn url(&self) -> String {
        format!(
            "{} application_name={} options='-c search_path={}'",
            self.admin, self.name, self.name
        )
    }

    fn connect(&self) -> Result<PgStore, StoreError> {
        PgStore::connect(&self.url(), None, 4)
    }

    fn sql(&self, sql: &str) -> Vec<tokio_postgres::SimpleQueryMessage> {
        admin_sql(
            &self.admin,
            &format!("SET search_path TO {}; {sql}", self.name),
        )
        .unwrap()
    }

    /// The first column of the first row `sql` gives.
    fn value(&self, sql: &str) -> Option<String> {
        self.sql(sql).into_iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0)?.to_owned()),
            _ => None,
        })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // Best effort (the cluster is thrown away anyway): a failure here must not hide the
        // test's own.
        let _ = admin_sql(
            &self.admin,
            &format!(
                "DROP SCHEMA {name} CASCADE; DROP ROLE IF EXISTS {name}_pw",
                name = self.name
            ),
        );
    }
}

/// A fresh, empty store in a schema of its own.
pub(in crate::store) fn fresh() -> Option<(Schema, PgStore)> {
    let schema = Schema::new()?;
    let store = schema.connect().unwrap();
    Some((schema, store))
}

conformance::suite!(fresh());

#[test]
fn store_is_a_cloneable_send_sync_handle() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<PgStore>();
    let Some((_schema, store)) = fresh() else {
        return;
    };
    let other = store.clone();
    store.insert_account(&account("u-1")).unwrap();
    assert!(other.get_account(&id("u-1")).unwrap().is_some());
    let _: Arc<dyn Store> = Arc::new(other);
}

#[test]
fn nodes_starting_together_migrate_once() {
    let Some(schema) = Schema::new() else { return };
    let schema = Arc::new(schema);
    let start = Arc::new(Barrier::new(4));
    let nodes: Vec<_> = (0..4)
        .map(|_| {
            let (schema, start) = (Arc::clone(&schema), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                schema.connect().unwrap()
            })
        })
        .collect();
    for node in nodes {
        node.join().unwrap().health().unwrap();
    }
    assert_eq!(
        schema.value("SELECT count(*) || ':' || max(version) FROM schema_version"),
        Some(format!("1:{}", PgStore::schema_version()))
    );
    // And again, over the schema as it is.
    schema.connect().unwrap().health().unwrap();
    assert_eq!(
        schema.value("SELECT count(*) FROM schema_version"),
        Some("1".to_owned())
    );
}

#[test]
fn newer_schema_is_refused() {
    let Some((schema, store)) = fresh() else {
        return;
    };
    drop(store);
    schema.sql("UPDATE schema_version SET version = 99");
    assert!(matches!(schema.connect(), Err(StoreError::Corrupt(_))));
}

/// A database made before batch signing and the CSC facade (schema 3) upgrades: its requests
/// read as the single-hash requests they are, and batches and SADs can be added beside them.
/// Versions 4 and 5 only add, so undoing them on a current schema makes a version 3 one.
#[test]
fn a_database_from_before_batches_upgrades() {
    let Some((schema, store)) = fresh() else {
        return;
    };
    registered(&store, "u-1", "3f9a");
    let old = request(1, "u-1", "3f9a");
    store.insert_request(&old, usize::MAX, CREATED).unwrap();
    drop(store);
    schema.sql(
        "DROP TABLE csc_sads; DROP INDEX taids_of_service; \
         ALTER TABLE signing_requests DROP COLUMN hashes; UPDATE schema_version SET version = 3",
    );

    let store = schema.connect().unwrap();
    assert_eq!(
        schema.value("SELECT version FROM schema_version"),
        Some(PgStore::schema_version().to_string())
    );
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

#[test]
fn the_password_comes_from_a_file_and_shows_nowhere() {
    const PASSWORD: &str = "correct-horse-7f3a";
    let Some((schema, _store)) = fresh() else {
        return;
    };
    let role = format!("{}_pw", schema.name);
    schema.sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'; \
         GRANT ALL ON SCHEMA {name} TO {role}; \
         GRANT ALL ON ALL TABLES IN SCHEMA {name} TO {role}",
        name = schema.name
    ));
    let database = schema.value("SELECT current_database()").unwrap();
    let url = format!("{} user={role} dbname={database}", schema.url());
    assert!(url.contains(&role), "{url}");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, format!("{PASSWORD}\n")).unwrap();
    let store = PgStore::connect(&url, Some(&good), 2).unwrap();
    store.insert_account(&account("u-1")).unwrap();
    assert!(!format!("{store:?}").contains(PASSWORD));

    // Every failure names what is wrong, never the password.
    let shows = |e: &StoreError| {
        let mut text = format!("{e} {e:?}");
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            text.push_str(&format!(" {cause} {cause:?}"));
            source = cause.source();
        }
        text
    };
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong-password").unwrap();
    let refused = PgStore::connect(&url, Some(&bad), 2).unwrap_err();
    assert!(
        matches!(refused, StoreError::Database(_)),
        "a wrong password is not worth retrying: {refused:?}"
    );
    assert!(!shows(&refused).contains("wrong-password"));
    let in_url = PgStore::connect(&format!("{url} password={PASSWORD}"), None, 2).unwrap_err();
    assert!(matches!(in_url, StoreError::Config { .. }), "{in_url:?}");
    assert!(!shows(&in_url).contains(PASSWORD));
    let missing = PgStore::connect(&url, Some(&dir.path().join("none")), 2).unwrap_err();
    assert!(matches!(missing, StoreError::Config { .. }), "{missing:?}");
    assert!(matches!(
        PgStore::connect("host='unterminated", None, 2),
        Err(StoreError::Config { .. })
    ));
}

#[test]
fn two_nodes_approving_one_request_at_once_one_wins() {
    let Some((schema, first)) = fresh() else {
        return;
    };
    let second = schema.connect().unwrap();
    registered(&first, "u-1", "3f9a");
    for n in 0..30u8 {
        let r = request(n, "u-1", "3f9a");
        first.insert_request(&r, usize::MAX, r.created_at).unwrap();
        let start = Arc::new(Barrier::new(2));
        let outcomes: Vec<_> = std::thread::scope(|scope| {
            let racers: Vec<_> = [&first, &second]
                .into_iter()
                .map(|node| {
                    let (start, r) = (Arc::clone(&start), r.clone());
                    scope.spawn(move || {
                        let mut approved = r;
                        approved.status = SigningStatus::Approved;
                        start.wait();
                        node.transition_request(&approved, (SigningStatus::Pending, 0), CREATED)
                    })
                })
                .collect();
            racers.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let won = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(won, 1, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, Err(StoreError::Conflict)))
        );
    }
    assert_eq!(first.approved_requests().unwrap().len(), 30);
}

#[test]
fn the_pending_cap_holds_across_nodes() {
    let Some((schema, first)) = fresh() else {
        return;
    };
    let second = schema.connect().unwrap();
    registered(&first, "u-1", "3f9a");
    let start = Arc::new(Barrier::new(8));
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..8u8)
            .map(|n| {
                let node = if n % 2 == 0 { &first } else { &second };
                let start = Arc::clone(&start);
                scope.spawn(move || {
                    let r = request(n, "u-1", "3f9a");
                    start.wait();
                    node.insert_request(&r, 3, CREATED)
                })
            })
            .collect();
        racers.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        3,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(()) | Err(StoreError::Conflict)))
    );
    assert_eq!(
        first.pending_requests(&id("u-1"), CREATED).unwrap().len(),
        3
    );
}

#[test]
fn an_unreachable_server_is_unavailable() {
    if admin().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("host={} user=postgres", dir.path().display());
    let e = PgStore::connect(&url, None, 2).unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
}

#[test]
fn a_lost_connection_is_unavailable_and_the_store_recovers() {
    let Some((schema, store)) = fresh() else {
        return;
    };
    store.insert_account(&account("u-1")).unwrap();
    for _ in 0..3 {
        // The server ends every connection of the store (as a restart does).
        let ended = schema.value(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = '{}'",
            schema.name
        ));
        assert_ne!(ended, Some("0".to_owned()));
        let mut answers = Vec::new();
        loop {
            match store.get_account(&id("u-1")) {
                Ok(found) => {
                    assert!(found.is_some());
                    break;
                }
                Err(e) => {
                    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
                    answers.push(e);
                    assert!(answers.len() < 8, "never recovered: {answers:?}");
                }
            }
        }
    }
}

#[test]
fn a_pool_wait_past_the_timeout_is_unavailable() {
    let Some(schema) = Schema::new() else { return };
    let store = PgStore::connect(&schema.url(), None, 1).unwrap();
    let held = store.inner.handle.block_on(store.inner.pool.get()).unwrap();
    let started = Instant::now();
    let busy = store.health();
    assert!(matches!(busy, Err(StoreError::Unavailable(_))), "{busy:?}");
    assert!(started.elapsed() >= WAIT);
    drop(held);
    store.health().unwrap();
}

#[test]
fn calls_work_from_every_kind_of_thread() {
    let Some((_schema, store)) = fresh() else {
        return;
    };
    store.insert_account(&account("u-1")).unwrap();
    let read = |store: &PgStore| store.get_account(&id("u-1")).unwrap().unwrap().id;
    // A plain thread: this one.
    assert_eq!(read(&store), id("u-1"));
    // A worker of a multi-thread runtime, and one of its blocking threads.
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    multi.block_on(async {
        let worker = store.clone();
        let on_worker = tokio::spawn(async move { read(&worker) });
        assert_eq!(on_worker.await.unwrap(), id("u-1"));
        let blocking = store.clone();
        let on_blocking = tokio::task::spawn_blocking(move || read(&blocking));
        assert_eq!(on_blocking.await.unwrap(), id("u-1"));
        store.health_async().await.unwrap();
    });
    // The only thread of a current-thread runtime, inside `block_on`.
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(async {
        assert_eq!(read(&store), id("u-1"));
        store.health_async().await.unwrap();
    });
    // The last handle dropped inside an async context stops the store's runtime quietly.
    current.block_on(async move { drop(store) });
}

/// Measures one `get_account` (one round trip, statement cached) on this thread.
#[test]
fn a_read_is_one_quick_round_trip() {
    let Some((_schema, store)) = fresh() else {
        return;
    };
    store.insert_account(&account("u-1")).unwrap();
    for _ in 0..100 {
        store.get_account(&id("u-1")).unwrap();
    }
    const N: u32 = 2000;
    let started = Instant::now();
    for _ in 0..N {
        store.get_account(&id("u-1")).unwrap();
    }
    let each = started.elapsed() / N;
    eprintln!("PgStore::get_account: {each:?} a call over {N}");
    // Generous: the machine is shared; a regression to several round trips or a new
    // connection per call shows well above it.
    assert!(each < std::time::Duration::from_millis(2), "{each:?}");
}

/// Every statement of the signing path and of the sweeps is served by an index once the
/// tables hold as many rows as a real deployment's (20,000 accounts, certificates, TAIDs and
/// requests, analysed): no plan has a sequential scan of those tables. The statements are the
/// ones the store ran, with their parameters.
#[test]
fn signing_path_and_sweep_queries_use_indexes() {
    const LARGE: &[&str] = &[
        "accounts",
        "certificates",
        "signing_requests",
        "taids",
        "user_events",
    ];
    let Some((schema, store)) = fresh() else {
        return;
    };
    schema.sql(
        "BEGIN;
         INSERT INTO accounts (id, tier, status, status_changed_at, sealed_name, sealed_dob,
             hkic_hash, device_public_key, device_generation, current_certificate, created_at)
         SELECT 'p-' || i, 'iam_smart_plus', 'active', 1767225600, '\\x01', '\\x02',
             sha256(int4send(i)), '\\x04', 1, 'a' || i, 1767225600
         FROM generate_series(1, 20000) AS i;
         INSERT INTO certificates (serial, account_id, profile, not_before, not_after, status,
             sealed_der, key_ref, key_algorithm)
         SELECT 'a' || i, 'p-' || i, 'adult', 1767225600, 1893456000 + i * 1000, 'valid',
             '\\x01', '\\x09', 'ecdsa_p256'
         FROM generate_series(1, 20000) AS i;
         INSERT INTO user_events (at, account_id, event, serial)
         SELECT 1767225600, 'p-' || i, 'certificate.issued', 'a' || i
         FROM generate_series(1, 20000) AS i;
         INSERT INTO taids (taid, service, account_id)
         SELECT 't' || i, 'demo-a', 'p-' || i FROM generate_series(1, 20000) AS i;
         INSERT INTO signing_requests (id, service, account_id, certificate,
             identification_code, hash_algorithm, hash, status, bad_attempts,
             device_generation, created_at, expires_at, signed_at, finished_at)
         SELECT 'r' || i, 'demo-a', 'p-' || i, 'a' || i, '0001', 'sha256', '\\xab', 'signed',
             0, 1, 1767225600, 1767225720, 1767225610, 1767225610
         FROM generate_series(1, 20000) AS i;
         COMMIT;
         ANALYZE;",
    );
    let at = CREATED;
    store.inner.plans.start();
    // Registration, TAIDs, HKIC checks.
    let mut a = registered(&store, "u-1", "3f9a");
    registered(&store, "u-2", "3f9b");
    store
        .put_taid(&conformance::taid("t-1", "demo-a", "u-1"))
        .unwrap();
    store
        .put_taid(&conformance::taid("t-9", "demo-a", "u-1"))
        .unwrap();
    store
        .find_taid(&crate::ServiceName::parse("demo-a").unwrap(), "t-1")
        .unwrap();
    store
        .accounts_with_hkic_hash(&conformance::hkic_hash_of("u-1"))
        .unwrap();
    store.record_hkic_mismatch(&id("u-1"), at).unwrap();
    store.hkic_mismatches_since(&id("u-1"), at).unwrap();
    // The signing flow.
    let mut r = request(1, "u-1", "3f9a");
    store.insert_request(&r, 5, at).unwrap();
    store.get_request(&r.id).unwrap();
    store.account_with_certificate(&id("u-1")).unwrap();
    store
        .get_certificate(&crate::CertSerial::parse("3f9a").unwrap())
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
        (crate::CertificateNotice::Expired, at),
        (
            crate::CertificateNotice::RenewalWindowOpen,
            at + Duration::days(60),
        ),
    ] {
        store.certificates_to_notify(notice, until, 500).unwrap();
    }
    let told = event(crate::EventKind::CertificateExpired, "u-1");
    store
        .record_notice(
            &crate::CertSerial::parse("3f9a").unwrap(),
            crate::CertificateNotice::Expired,
            &[told],
        )
        .unwrap();
    store.events_after(0, 100).unwrap();
    store.events_after(10, 100).unwrap();
    let b_serial = crate::CertSerial::parse("3f9b").unwrap();
    store
        .mark_revoked(&b_serial, crate::RevocationReason::KeyCompromise, at, &[])
        .unwrap();
    store.forget_key(&b_serial, &[9]).unwrap();
    let mut b = store.get_account(&id("u-2")).unwrap().unwrap();
    b.status = AccountStatus::Deregistered;
    store.deregister(&b, &[]).unwrap();

    let plans = store.inner.plans.take();
    assert!(plans.len() > 30, "only {} statements", plans.len());
    fn seq_scans<'a>(node: &'a serde_json::Value, found: &mut Vec<&'a str>) {
        match node {
            serde_json::Value::Object(fields) => {
                if fields.get("Node Type").and_then(|t| t.as_str()) == Some("Seq Scan")
                    && let Some(table) = fields.get("Relation Name").and_then(|t| t.as_str())
                {
                    found.push(table);
                }
                fields.values().for_each(|v| seq_scans(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| seq_scans(v, found)),
            _ => {}
        }
    }
    for (sql, plan) in &plans {
        let mut scanned = Vec::new();
        seq_scans(plan, &mut scanned);
        assert!(
            scanned.iter().all(|table| !LARGE.contains(table)),
            "a whole-table scan of {scanned:?}\nin: {sql}\nplan: {plan:#}"
        );
    }
}

/// Appends `count` records to the audit ledger as a node's audit log does: from the end of its
/// copy (`copy`), which it extends with what other nodes appended, then with its own. Each
/// record says its index and its node.
fn append_as_node(store: &PgStore, copy: &mut Vec<Vec<u8>>, node: usize, count: u64) {
    let mut ours = Vec::new();
    let previous = copy.last().cloned();
    let others = store
        .audit_append(copy.len() as u64, previous.as_deref(), &mut |first| {
            ours = (first..first + count)
                .map(|idx| format!("{idx}:{node}").into_bytes())
                .collect();
            Ok::<_, StoreError>(ours.clone())
        })
        .unwrap();
    copy.extend(others);
    copy.extend(ours);
}

#[test]
fn audit_appends_from_several_nodes_get_contiguous_indexes() {
    let Some(schema) = Schema::new() else { return };
    let nodes: Vec<PgStore> = (0..4).map(|_| schema.connect().unwrap()).collect();
    let start = Barrier::new(nodes.len());
    let copies: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
        let writers: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(node, store)| {
                let start = &start;
                scope.spawn(move || {
                    let mut copy = Vec::new();
                    start.wait();
                    for batch in 0..30 {
                        append_as_node(store, &mut copy, node, 1 + batch % 3);
                    }
                    copy
                })
            })
            .collect();
        writers.into_iter().map(|t| t.join().unwrap()).collect()
    });

    let ledger = nodes[0].audit_read(0, 10_000).unwrap();
    assert_eq!(ledger.len(), 4 * 60);
    for (idx, line) in ledger.iter().enumerate() {
        let line = String::from_utf8(line.clone()).unwrap();
        assert!(line.starts_with(&format!("{idx}:")), "{line} at {idx}");
    }
    // Each node's copy is the ledger up to its last append, the others' records included.
    for copy in &copies {
        assert_eq!(copy[..], ledger[..copy.len()]);
    }
    // Pages of it.
    assert_eq!(nodes[1].audit_read(100, 7).unwrap(), ledger[100..107]);
    assert_eq!(nodes[1].audit_read(238, 7).unwrap(), ledger[238..]);
    assert!(nodes[1].audit_read(240, 7).unwrap().is_empty());
}

#[test]
fn an_audit_batch_that_fails_stores_nothing() {
    let Some((_schema, store)) = fresh() else {
        return;
    };
    let mut copy = Vec::new();
    append_as_node(&store, &mut copy, 0, 2);
    let refused = store.audit_append(2, copy.last().map(Vec::as_slice), &mut |_| {
        Err(StoreError::NotFound)
    });
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    assert_eq!(store.audit_read(0, 10).unwrap(), copy);

    // Not past the end of the ledger; from inside it, the records after come back.
    let beyond = store.audit_append(3, None, &mut |_| Ok::<_, StoreError>(vec![b"x".to_vec()]));
    assert!(matches!(beyond, Err(StoreError::Conflict)), "{beyond:?}");
    let mut first = None;
    // A node whose record 0 is not the ledger's holds another log: refused, nothing stored.
    let forked = store.audit_append(1, Some(b"0:other".as_slice()), &mut |_| {
        Ok::<_, StoreError>(vec![b"fork".to_vec()])
    });
    assert!(matches!(forked, Err(StoreError::Corrupt(_))), "{forked:?}");
    assert_eq!(store.audit_read(0, 10).unwrap(), copy);
    let others = store
        .audit_append(1, Some(copy[0].as_slice()), &mut |index| {
            first = Some(index);
            Ok::<_, StoreError>(vec![b"2:0".to_vec()])
        })
        .unwrap();
    assert_eq!((others, first), (copy[1..].to_vec(), Some(2)));
    assert_eq!(store.audit_read(0, 10).unwrap().len(), 3);
}

#[test]
fn a_smaller_audit_checkpoint_is_refused() {
    let Some((_schema, store)) = fresh() else {
        return;
    };
    assert_eq!(store.audit_latest_checkpoint().unwrap(), None);
    assert!(store.audit_put_checkpoint(10, b"ten").unwrap());
    assert!(!store.audit_put_checkpoint(5, b"five").unwrap());
    assert!(!store.audit_put_checkpoint(10, b"ten again").unwrap());
    assert_eq!(
        store.audit_latest_checkpoint().unwrap(),
        Some(b"ten".to_vec())
    );
    assert!(store.audit_put_checkpoint(11, b"eleven").unwrap());
    assert_eq!(
        store.audit_latest_checkpoint().unwrap(),
        Some(b"eleven".to_vec())
    );
}

/// A transaction that stores events and commits late cannot be overtaken: one that asks for a
/// position meanwhile waits for the events lock, so the reader never sees a position above
/// one that is still to commit.
#[test]
fn a_later_event_waits_for_an_earlier_one_to_commit() {
    let Some((schema, store)) = fresh() else {
        return;
    };
    let mut a = registered(&store, "u-1", "3f9a");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut slow, connection) = runtime
        .block_on(tokio_postgres::connect(&schema.url(), NoTls))
        .unwrap();
    let connection = runtime.spawn(connection);
    // Another node's transaction: it holds the events lock and has its position, uncommitted.
    let slow_tx = runtime.block_on(slow.transaction()).unwrap();
    runtime
        .block_on(slow_tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK]))
        .unwrap();
    runtime
        .block_on(slow_tx.execute(
            "INSERT INTO user_events (at, account_id, event) \
             VALUES (0, 'u-1', 'account.resumed')",
            &[],
        ))
        .unwrap();
    let later = std::thread::scope(|scope| {
        let later = scope.spawn(|| {
            a.status = AccountStatus::Suspended;
            store.update_account(&a, &[event(crate::EventKind::AccountSuspended, "u-1")])
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !later.is_finished(),
            "the later transaction waits for the lock"
        );
        assert!(store.events_after(0, 10).unwrap().is_empty());
        runtime.block_on(slow_tx.commit()).unwrap();
        later.join().unwrap()
    });
    later.unwrap();
    let events = store.events_after(0, 10).unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.event.kind.as_str()).collect();
    assert_eq!(kinds, ["account.resumed", "account.suspended"]);
    assert!(events[0].position < events[1].position);
    drop(slow);
    let _ = runtime.block_on(connection);
}

/// Nodes storing events at once while a reader polls from its cursor: the reader ends up with
/// every event, in position order, none skipped and none twice.
#[test]
fn a_polling_reader_misses_no_event_of_concurrent_nodes() {
    let Some((schema, first)) = fresh() else {
        return;
    };
    let nodes = [
        first.clone(),
        schema.connect().unwrap(),
        schema.connect().unwrap(),
    ];
    const WRITERS: usize = 4;
    const CHANGES: usize = 40;
    let accounts: Vec<_> = (0..WRITERS)
        .map(|n| registered(&first, &format!("u-{n}"), &format!("{:x}", 0x1000 + n)))
        .collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let read = std::thread::scope(|scope| {
        let writers: Vec<_> = accounts
            .into_iter()
            .enumerate()
            .map(|(n, mut a)| {
                let node = &nodes[n % nodes.len()];
                scope.spawn(move || {
                    for _ in 0..CHANGES {
                        a.device_generation += 1;
                        let told = event(crate::EventKind::AccountResumed, a.id.as_str());
                        node.update_account(&a, &[told]).unwrap();
                        a.version += 1;
                    }
                })
            })
            .collect();
        let reader = scope.spawn(|| {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                // Read the flag first: a page read after it is false covers every commit.
                let finished = done.load(Ordering::SeqCst);
                let page = nodes[1].events_after(after, 7).unwrap();
                if let Some(last) = page.last() {
                    after = last.position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
            }
        });
        for writer in writers {
            writer.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        reader.join().unwrap()
    });
    let all = first.events_after(0, 10_000).unwrap();
    assert_eq!(all.len(), WRITERS * CHANGES);
    assert_eq!(read, all);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
}
