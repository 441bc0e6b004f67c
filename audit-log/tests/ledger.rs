//! Several nodes over one shared ledger (an in-memory one here; PostgreSQL in the daemon): one
//! sequence of records, one tree, one series of checkpoints, and catch-up, outages and
//! uncertain commits.

// Test code: a panic is how a helper reports a failure (clippy.toml covers only #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use audit_log::{
    AuditError, AuditLog, Checkpoint, ErrorKind, Ledger, LedgerError, leaf_hash,
    verify_consistency, verify_export, verify_inclusion,
};
use common::*;

/// What the in-memory ledger holds, and how its next calls fail.
#[derive(Debug, Default)]
struct Books {
    lines: Vec<Vec<u8>>,
    checkpoints: BTreeMap<u64, Vec<u8>>,
    /// Every call fails while set: the database is down.
    down: bool,
    /// The next append stores its batch, then reports a failure (a connection lost after the
    /// commit).
    fail_after_commit: bool,
    appends: u64,
}

/// A ledger in memory, shared by the logs of several "nodes" in one process: its mutex is the
/// exclusive lock, held through each append's read, batch and store.
#[derive(Clone, Debug, Default)]
struct MemoryLedger(Arc<Mutex<Books>>);

impl MemoryLedger {
    fn books(&self) -> MutexGuard<'_, Books> {
        self.0.lock().unwrap()
    }

    fn boxed(&self) -> Box<dyn Ledger> {
        Box::new(self.clone())
    }

    fn lines(&self) -> Vec<Vec<u8>> {
        self.books().lines.clone()
    }

    /// The ledger's records as NDJSON, as a log serves them.
    fn ndjson(&self) -> Vec<u8> {
        self.lines()
            .iter()
            .flat_map(|line| [&line[..], b"\n"].concat())
            .collect()
    }
}

impl Books {
    fn answer(&self) -> Result<(), LedgerError> {
        if self.down {
            return Err(LedgerError::unavailable(
                "reaching the test ledger",
                io::Error::new(io::ErrorKind::ConnectionRefused, "the ledger is down"),
            ));
        }
        Ok(())
    }
}

impl Ledger for MemoryLedger {
    fn append(
        &mut self,
        from: u64,
        previous: Option<&[u8]>,
        batch: &mut (dyn FnMut(u64) -> Result<Vec<Vec<u8>>, AuditError> + Send),
    ) -> Result<Vec<Vec<u8>>, LedgerError> {
        let mut books = self.books();
        books.answer()?;
        let from = usize::try_from(from).unwrap();
        if from > books.lines.len() {
            return Err(LedgerError::Inconsistent(format!(
                "it holds {} records, fewer than {from}",
                books.lines.len()
            )));
        }
        if let Some(previous) = previous
            && books.lines[from - 1] != previous
        {
            return Err(LedgerError::Inconsistent(format!(
                "its record {} is not this node's",
                from - 1
            )));
        }
        let others = books.lines[from..].to_vec();
        let lines = batch(books.lines.len() as u64).map_err(|e| LedgerError::Batch(Arc::new(e)))?;
        books.lines.extend(lines);
        books.appends += 1;
        if std::mem::take(&mut books.fail_after_commit) {
            return Err(LedgerError::unavailable(
                "committing to the test ledger",
                io::Error::new(io::ErrorKind::ConnectionReset, "lost after the commit"),
            ));
        }
        Ok(others)
    }

    fn read(&mut self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, LedgerError> {
        let books = self.books();
        books.answer()?;
        let from = usize::try_from(from).unwrap().min(books.lines.len());
        Ok(books.lines[from..].iter().take(limit).cloned().collect())
    }

    fn latest_checkpoint(&mut self) -> Result<Option<Vec<u8>>, LedgerError> {
        let books = self.books();
        books.answer()?;
        Ok(books.checkpoints.values().next_back().cloned())
    }

    fn put_checkpoint(&mut self, tree_size: u64, note: &[u8]) -> Result<bool, LedgerError> {
        let mut books = self.books();
        books.answer()?;
        if books
            .checkpoints
            .keys()
            .next_back()
            .is_some_and(|&latest| latest >= tree_size)
        {
            return Ok(false);
        }
        books.checkpoints.insert(tree_size, note.to_vec());
        Ok(true)
    }
}

async fn open_node(dir: &Path, ledger: &MemoryLedger) -> AuditLog {
    AuditLog::open(dir, config().with_ledger(ledger.boxed()))
        .await
        .unwrap()
}

/// Record `index` in its canonical form, as another node would have written it.
fn record(index: u64) -> Vec<u8> {
    format!(
        r#"{{"index":{index},"time":"2026-11-22T10:00:00Z","event":"test.seeded","actor":"system","fields":{{"n":{index}}}}}"#
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_appending_concurrently_make_one_sequence_and_one_tree() {
    let ledger = MemoryLedger::default();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Arc::new(open_node(dir_a.path(), &ledger).await);
    let b = Arc::new(open_node(dir_b.path(), &ledger).await);

    let tasks: Vec<_> = (0..16u64)
        .map(|task| {
            let node = Arc::clone(if task % 2 == 0 { &a } else { &b });
            tokio::spawn(async move {
                let mut receipts = Vec::new();
                for i in 0..25 {
                    receipts.push(node.append(event(task * 100 + i)).await.unwrap());
                }
                (task % 2, receipts)
            })
        })
        .collect();
    let mut receipts = Vec::new();
    for task in tasks {
        receipts.push(task.await.unwrap());
    }
    let indexes: BTreeSet<u64> = receipts
        .iter()
        .flat_map(|(_, receipts)| receipts.iter().map(|receipt| receipt.index))
        .collect();
    assert_eq!(indexes, (0..400).collect());
    // Both nodes' batches interleaved in the ledger, in many transactions.
    assert!(ledger.books().appends >= 2);

    assert_eq!(a.sync().await.unwrap(), 400);
    assert_eq!(b.sync().await.unwrap(), 400);
    let records = a.records(0, 400).await.unwrap();
    assert_eq!(records, b.records(0, 400).await.unwrap());
    assert_eq!(records, ledger.ndjson());
    let lines = lines(&records);
    for (node, receipts) in &receipts {
        for receipt in receipts {
            let line = lines[receipt.index as usize];
            assert_eq!(leaf_hash(line), receipt.leaf_hash, "node {node}");
        }
    }

    for size in 1..=400 {
        assert_eq!(a.root_hash(size).unwrap(), b.root_hash(size).unwrap());
    }
    // A proof from either node verifies against the other's roots.
    for (prover, checker) in [(&a, &b), (&b, &a)] {
        for (index, size) in [(0, 1), (7, 64), (199, 200), (250, 399), (399, 400)] {
            let proof = prover.inclusion_proof(index, size).unwrap();
            let leaf = checker.leaf_hash(index).unwrap().unwrap();
            let root = checker.root_hash(size).unwrap();
            verify_inclusion(&leaf, index, size, &proof, &root).unwrap();
        }
        for (first, second) in [(1, 400), (100, 257), (256, 400)] {
            let proof = prover.consistency_proof(first, second).unwrap();
            let (first_root, second_root) = (
                checker.root_hash(first).unwrap(),
                checker.root_hash(second).unwrap(),
            );
            verify_consistency(first, second, &first_root, &second_root, &proof).unwrap();
        }
    }

    // One node's export verifies with the other's checkpoint.
    let checkpoint = b.checkpoint(&signer()).await.unwrap();
    let report = verify_export(&records, &checkpoint.to_json(), &public_key_pem()).unwrap();
    assert_eq!(report.records, 400);
    assert_eq!(a.sync().await.unwrap(), 400);
    assert_eq!(a.latest_checkpoint(), Some(checkpoint));
}

#[tokio::test]
async fn a_node_opened_on_an_empty_directory_catches_up_fully() {
    // More than a page of catch-up, as another node wrote it.
    let ledger = MemoryLedger::default();
    ledger.books().lines = (0..5000).map(record).collect();

    let dir_a = tempfile::tempdir().unwrap();
    let a = open_node(dir_a.path(), &ledger).await;
    assert_eq!(a.tree_size(), 5000);
    assert_eq!(a.stats().records_scanned_at_open, 5000);
    assert_eq!(a.records(0, 5000).await.unwrap(), ledger.ndjson());
    assert_eq!(a.append(event(1)).await.unwrap().index, 5000);
    let checkpoint = a.checkpoint(&signer()).await.unwrap();
    assert_eq!(checkpoint.tree_size(), 5001);
    a.close().await.unwrap();

    let dir_b = tempfile::tempdir().unwrap();
    let b = open_node(dir_b.path(), &ledger).await;
    assert_eq!(b.tree_size(), 5001);
    assert_eq!(b.latest_checkpoint(), Some(checkpoint.clone()));
    assert_eq!(b.root_hash(5001).unwrap(), *checkpoint.root_hash());
    let records = b.records(0, 5001).await.unwrap();
    assert_eq!(records, ledger.ndjson());
    verify_export(&records, &checkpoint.to_json(), &public_key_pem()).unwrap();
    b.close().await.unwrap();

    // The copy caught up is a log like any other: it reopens without the ledger's help.
    let b = open(dir_b.path()).await;
    assert_eq!(b.tree_size(), 5001);
    assert_eq!(b.latest_checkpoint(), Some(checkpoint));
}

#[tokio::test]
async fn a_ledger_outage_fails_appends_until_the_ledger_answers() {
    let ledger = MemoryLedger::default();
    let dir = tempfile::tempdir().unwrap();
    let log = open_node(dir.path(), &ledger).await;
    for i in 0..3 {
        log.append(event(i)).await.unwrap();
    }

    ledger.books().down = true;
    let error = log.append(event(3)).await.unwrap_err();
    assert!(matches!(error, AuditError::Ledger(_)), "{error}");
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    assert!(error.to_string().contains("the ledger is down"), "{error}");
    assert!(log.health().is_err());
    assert!(log.sync().await.is_err());
    assert_eq!(log.tree_size(), 3);
    assert_eq!(ledger.lines().len(), 3);

    // Back: the same log appends again, without reopening.
    ledger.books().down = false;
    assert_eq!(log.append(event(3)).await.unwrap().index, 3);
    log.health().unwrap();
    assert_eq!(log.records(0, 10).await.unwrap(), ledger.ndjson());
}

#[tokio::test]
async fn a_failure_after_the_commit_is_repaired_by_the_next_append_or_sync() {
    let ledger = MemoryLedger::default();
    let dir = tempfile::tempdir().unwrap();
    let log = open_node(dir.path(), &ledger).await;
    log.append(event(0)).await.unwrap();

    // The ledger stored record 1 but the node was told it failed: it writes nothing locally.
    ledger.books().fail_after_commit = true;
    let error = log.append(event(1)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    assert_eq!(ledger.lines().len(), 2);
    assert_eq!(log.tree_size(), 1);
    // A sync brings it in.
    assert_eq!(log.sync().await.unwrap(), 2);
    log.health().unwrap();

    // Again; this time the next append brings it in, before its own record.
    ledger.books().fail_after_commit = true;
    log.append(event(2)).await.unwrap_err();
    let receipt = log.append(event(3)).await.unwrap();
    assert_eq!((receipt.index, receipt.tree_size), (3, 4));
    assert_eq!(log.records(0, 10).await.unwrap(), ledger.ndjson());
    log.close().await.unwrap();

    // A write of the local copy that fails after the ledger's commit is repaired at the next
    // open the same way: here the node's copy lost its last record altogether.
    let log_path = dir.path().join(audit_log::LOG_FILE);
    let mut local = std::fs::read(&log_path).unwrap();
    local.truncate(local.len() - ledger.lines()[3].len() - 1);
    std::fs::write(&log_path, &local).unwrap();
    std::fs::remove_file(dir.path().join("tree-state")).ok();
    let log = open_node(dir.path(), &ledger).await;
    assert_eq!(log.tree_size(), 4);
    assert_eq!(log.records(0, 10).await.unwrap(), ledger.ndjson());
}

#[tokio::test]
async fn checkpoints_of_all_nodes_form_one_growing_series() {
    let ledger = MemoryLedger::default();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open_node(dir_a.path(), &ledger).await;
    let b = open_node(dir_b.path(), &ledger).await;
    for i in 0..10 {
        a.append(event(i)).await.unwrap();
    }
    let first = a.checkpoint(&signer()).await.unwrap();
    assert_eq!(first.tree_size(), 10);

    // B has nothing new to sign: it adopts A's checkpoint rather than make another of size 10.
    assert_eq!(b.checkpoint(&signer()).await.unwrap(), first);
    for i in 10..15 {
        b.append(event(i)).await.unwrap();
    }
    let second = b.checkpoint(&signer()).await.unwrap();
    assert_eq!(second.tree_size(), 15);

    // A learns of it at its next sync, and signs nothing smaller or equal.
    assert_eq!(a.latest_checkpoint(), Some(first.clone()));
    assert_eq!(a.sync().await.unwrap(), 15);
    assert_eq!(a.latest_checkpoint(), Some(second.clone()));
    assert_eq!(a.checkpoint(&signer()).await.unwrap(), second);

    let series: Vec<(u64, Checkpoint)> = ledger
        .books()
        .checkpoints
        .iter()
        .map(|(&size, note)| (size, Checkpoint::from_json(note).unwrap()))
        .collect();
    assert_eq!(series, vec![(10, first.clone()), (15, second.clone())]);
    let proof = a.consistency_proof(10, 15).unwrap();
    verify_consistency(10, 15, first.root_hash(), second.root_hash(), &proof).unwrap();

    // A new node starts from the series' latest.
    let dir_c = tempfile::tempdir().unwrap();
    let c = open_node(dir_c.path(), &ledger).await;
    assert_eq!(c.latest_checkpoint(), Some(second));
}

#[tokio::test]
async fn a_local_copy_ahead_of_or_apart_from_the_ledger_is_refused() {
    let ledger = MemoryLedger::default();
    let dir = tempfile::tempdir().unwrap();
    let log = open_node(dir.path(), &ledger).await;
    for i in 0..3 {
        log.append(event(i)).await.unwrap();
    }
    log.close().await.unwrap();

    // The ledger was replaced by an empty one: the node's acknowledged records are not in it.
    let error = AuditLog::open(
        dir.path(),
        config().with_ledger(MemoryLedger::default().boxed()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, AuditError::LedgerMismatch { .. }),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::Corrupt);
    assert!(error.to_string().contains("fewer"), "{error}");

    // Another log altogether, as long as this one.
    let other = MemoryLedger::default();
    other.books().lines = (0..3).map(record).collect();
    let error = AuditLog::open(dir.path(), config().with_ledger(other.boxed()))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("differs"), "{error}");

    // The right ledger still opens it.
    open_node(dir.path(), &ledger).await;
}

#[tokio::test]
async fn a_record_from_the_ledger_that_does_not_check_stops_the_log() {
    let ledger = MemoryLedger::default();
    let dir = tempfile::tempdir().unwrap();
    let log = open_node(dir.path(), &ledger).await;
    log.append(event(0)).await.unwrap();
    let mut bad = record(1);
    bad.extend_from_slice(b" ");
    ledger.books().lines.push(bad);

    let error = log.sync().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Corrupt);
    assert!(error.to_string().contains("record 1"), "{error}");
    // Nothing more goes to the ledger on top of it.
    assert!(log.append(event(2)).await.is_err());
    assert_eq!(ledger.lines().len(), 2);
    assert_eq!(log.tree_size(), 1);
}

/// The database went back in time under a running node (restored from a backup, or failed over
/// to a replica that missed the last commits) and another node appended since: the node's next
/// batch finds the ledger's record before it is not its own, and nothing more is appended by
/// it, rather than a fork of the log being signed.
#[tokio::test]
async fn a_ledger_that_went_back_in_time_under_a_running_node_is_not_forked() {
    let ledger = MemoryLedger::default();
    let dir = tempfile::tempdir().unwrap();
    let log = open_node(dir.path(), &ledger).await;
    for i in 0..4 {
        log.append(event(i)).await.unwrap();
    }
    {
        let mut books = ledger.books();
        books.lines.truncate(2);
        books.lines.extend((2..5).map(record));
    }
    let before = ledger.lines();
    let error = log.append(event(9)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(error.to_string().contains("record 3"), "{error}");
    assert_eq!(
        ledger.lines(),
        before,
        "nothing was appended on top of the fork"
    );
    assert!(log.append(event(10)).await.is_err());
    assert_eq!(ledger.lines(), before);
}
