//! The audit log's shared ledger in several-node mode: [`audit_log::Ledger`] over the PostgreSQL
//! store's audit tables (`PgStore::audit_append` and its siblings in `cert-lifecycle`), so that
//! each node's audit log is a copy of one log kept in the database.

use std::sync::Arc;

use audit_log::{AuditError, Ledger, LedgerError};
use cert_lifecycle::{PgStore, StoreError};

/// The audit ledger in the PostgreSQL store shared by the nodes.
#[derive(Debug)]
pub(crate) struct PgLedger {
    store: Arc<PgStore>,
}

impl PgLedger {
    pub(crate) fn new(store: Arc<PgStore>) -> Self {
        Self { store }
    }
}

/// Why an append to the ledger failed: the log's batch closure, or the store.
enum AppendFailure {
    Batch(AuditError),
    Store(StoreError),
}

impl From<StoreError> for AppendFailure {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

impl Ledger for PgLedger {
    fn append(
        &mut self,
        from: u64,
        previous: Option<&[u8]>,
        batch: &mut (dyn FnMut(u64) -> Result<Vec<Vec<u8>>, AuditError> + Send),
    ) -> Result<Vec<Vec<u8>>, LedgerError> {
        self.store
            .audit_append(from, previous, &mut |first| {
                batch(first).map_err(AppendFailure::Batch)
            })
            .map_err(|failure| match failure {
                AppendFailure::Batch(error) => LedgerError::Batch(Arc::new(error)),
                AppendFailure::Store(error) => ledger_error("appending to the audit ledger", error),
            })
    }

    fn read(&mut self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, LedgerError> {
        self.store
            .audit_read(from, limit)
            .map_err(|error| ledger_error("reading the audit ledger", error))
    }

    fn latest_checkpoint(&mut self) -> Result<Option<Vec<u8>>, LedgerError> {
        self.store
            .audit_latest_checkpoint()
            .map_err(|error| ledger_error("reading the audit ledger's checkpoint", error))
    }

    fn put_checkpoint(&mut self, tree_size: u64, note: &[u8]) -> Result<bool, LedgerError> {
        self.store
            .audit_put_checkpoint(tree_size, note)
            .map_err(|error| ledger_error("storing an audit checkpoint in the ledger", error))
    }
}

/// A store error as the ledger's: what contradicts the ledger's contents is `Inconsistent`,
/// anything else (the server down, a lock wait past the timeout, a failed statement) keeps its
/// cause.
fn ledger_error(context: &str, error: StoreError) -> LedgerError {
    match error {
        StoreError::Conflict => LedgerError::Inconsistent(
            "it holds fewer records than this node's copy of the log".to_owned(),
        ),
        StoreError::Corrupt(reason) => LedgerError::Inconsistent(reason),
        error => LedgerError::unavailable(format!("{context} in PostgreSQL"), error),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use audit_log::{
        Actor, AuditEvent, AuditLog, AuditLogConfig, EventName, Origin, SoftwareSigner,
        verify_export,
    };
    use tokio_postgres::NoTls;

    use super::*;

    /// Where the PostgreSQL tests find their cluster, as in cert-lifecycle's store tests.
    const ENV: &str = "SMARTSIGN_TEST_PG";

    /// A schema of its own in the test cluster, dropped at the end.
    struct Schema {
        admin: String,
        name: String,
    }

    impl Schema {
        async fn new() -> Option<Schema> {
            let admin = match std::env::var(ENV) {
                Ok(value) if value == "skip" => return None,
                Ok(value) => value,
                Err(_) => panic!(
                    "{ENV} is not set: start a throwaway cluster with `ops/pg start DIR` and \
                     export the line it prints, or set {ENV}=skip to skip the PostgreSQL tests"
                ),
            };
            let name = format!("daemon_audit_{}", std::process::id());
            let schema = Schema { admin, name };
            schema.sql(&format!("CREATE SCHEMA {}", schema.name)).await;
            Some(schema)
        }

        async fn sql(&self, sql: &str) {
            let (client, connection) = tokio_postgres::connect(&self.admin, NoTls).await.unwrap();
            let connection = tokio::spawn(connection);
            client.batch_execute(sql).await.unwrap();
            drop(client);
            let _ = connection.await;
        }

        /// A node's store.
        fn connect(&self) -> Arc<PgStore> {
            let url = format!(
                "{} application_name={name} options='-c search_path={name}'",
                self.admin,
                name = self.name
            );
            Arc::new(PgStore::connect(&url, None, 2).unwrap())
        }
    }

    fn signer() -> SoftwareSigner {
        SoftwareSigner::from_secret_scalar(&[0x42; 32]).unwrap()
    }

    async fn open_node(dir: &Path, store: Arc<PgStore>) -> AuditLog {
        let config = AuditLogConfig::new(Origin::new("test.smartsign/audit").unwrap())
            .with_checkpoint_key(signer().public_key())
            .with_ledger(Box::new(PgLedger::new(store)));
        AuditLog::open(dir, config).await.unwrap()
    }

    fn event(node: u64, i: u64) -> AuditEvent {
        AuditEvent::new(
            EventName::new("test.event").unwrap(),
            Actor::new(format!("node:{node}")).unwrap(),
        )
        .with_field("i", i)
    }

    /// The audit logs of two nodes over one PostgreSQL ledger: appends from both make one
    /// sequence, one tree and one series of checkpoints, which a third node opened on an empty
    /// directory catches up with, and the offline verifier accepts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_share_one_audit_log_through_postgres() {
        let Some(schema) = Schema::new().await else {
            return;
        };
        let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let a = Arc::new(open_node(dirs[0].path(), schema.connect()).await);
        let b = Arc::new(open_node(dirs[1].path(), schema.connect()).await);

        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let node = Arc::clone(if task % 2 == 0 { &a } else { &b });
                tokio::spawn(async move {
                    let mut indexes = Vec::new();
                    for i in 0..20 {
                        indexes.push(node.append(event(task % 2, i)).await.unwrap().index);
                    }
                    indexes
                })
            })
            .collect();
        let mut indexes = BTreeSet::new();
        for task in tasks {
            indexes.extend(task.await.unwrap());
        }
        assert_eq!(indexes, (0..160).collect());

        assert_eq!(a.sync().await.unwrap(), 160);
        assert_eq!(b.sync().await.unwrap(), 160);
        let records = a.records(0, 200).await.unwrap();
        assert_eq!(records, b.records(0, 200).await.unwrap());
        assert_eq!(a.root_hash(160).unwrap(), b.root_hash(160).unwrap());
        let checkpoint = a.checkpoint(&signer()).await.unwrap();
        assert_eq!(b.checkpoint(&signer()).await.unwrap(), checkpoint);
        let pem = signer().public_key().to_spki_pem().unwrap();
        assert_eq!(
            verify_export(&records, &checkpoint.to_json(), &pem)
                .unwrap()
                .records,
            160
        );

        let c = open_node(dirs[2].path(), schema.connect()).await;
        assert_eq!(c.tree_size(), 160);
        assert_eq!(c.records(0, 200).await.unwrap(), records);
        assert_eq!(c.latest_checkpoint(), Some(checkpoint));

        for log in [a, b] {
            Arc::into_inner(log).unwrap().close().await.unwrap();
        }
        c.close().await.unwrap();
        schema
            .sql(&format!("DROP SCHEMA {} CASCADE", schema.name))
            .await;
    }
}
