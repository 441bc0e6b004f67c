//! Crash safety: a child process appends from 32 tasks and makes checkpoints until it is killed
//! with SIGKILL; every append it had acknowledged must be in the reopened log, which must verify
//! and extend every checkpoint seen before.
//!
//! The child is this test binary run again with `--exact crash_child --ignored`, the log
//! directory in an environment variable. It prints `ack <index> <leaf hash>` after each append
//! returns and `checkpoint <size> <root>` after each checkpoint is stored.

// Test code: a panic is how a helper reports a failure (clippy.toml covers only #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use audit_log::{AuditLog, TreeHash, verify_consistency, verify_export, verify_inclusion};
use common::*;

const DIR_VARIABLE: &str = "AUDIT_LOG_CRASH_CHILD_DIR";
const ROUNDS: usize = 4;
const APPENDERS: u64 = 32;

#[test]
#[ignore = "the child process of crash_keeps_every_acknowledged_append"]
fn crash_child() {
    let Some(dir) = std::env::var_os(DIR_VARIABLE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let log = Arc::new(AuditLog::open(dir, config()).await.unwrap());
        for task in 0..APPENDERS {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                for i in 0.. {
                    let receipt = log.append(event(task * 1_000_000 + i)).await.unwrap();
                    println!("ack {} {}", receipt.index, receipt.leaf_hash);
                }
            });
        }
        let signer = signer();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let checkpoint = log.checkpoint(&signer).await.unwrap();
            println!(
                "checkpoint {} {}",
                checkpoint.tree_size(),
                checkpoint.root_hash()
            );
        }
    });
}

#[test]
fn crash_keeps_every_acknowledged_append() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acknowledged: BTreeMap<u64, TreeHash> = BTreeMap::new();
    let mut checkpoints: Vec<(u64, TreeHash)> = Vec::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VARIABLE, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, received) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if lines.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });

        let mut record = |line: &str| {
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("ack"), Some(index), Some(hash)) => {
                    let hash = TreeHash::from_hex(hash).unwrap();
                    let previous = acknowledged.insert(index.parse().unwrap(), hash);
                    assert!(previous.is_none(), "index {index} acknowledged twice");
                    1
                }
                (Some("checkpoint"), Some(size), Some(root)) => {
                    checkpoints.push((size.parse().unwrap(), TreeHash::from_hex(root).unwrap()));
                    0
                }
                _ => 0, // the test harness's own lines
            }
        };

        // Let it run until it has acknowledged a good number of appends, then kill it while
        // the 32 appenders are still going.
        let started = Instant::now();
        let mut new = 0;
        while new < 500 || started.elapsed() < Duration::from_millis(300) {
            let line = received
                .recv_timeout(Duration::from_secs(60).saturating_sub(started.elapsed()))
                .unwrap_or_else(|_| panic!("round {round}: child stalled after {new} acks"));
            new += record(&line);
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited before the kill"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines already in the pipe were printed before the kill: those appends returned too.
        for line in received.iter() {
            record(&line);
        }
        reader.join().unwrap();

        runtime.block_on(async {
            let log = AuditLog::open(dir.path(), config()).await.unwrap();
            let size = log.tree_size();
            let root = log.root_hash(size).unwrap();
            eprintln!(
                "round {round}: {} acknowledged, {size} in the log, {} checkpoints",
                acknowledged.len(),
                checkpoints.len()
            );
            for (&index, hash) in &acknowledged {
                assert_eq!(
                    log.leaf_hash(index).unwrap(),
                    Some(*hash),
                    "acknowledged {index}"
                );
            }
            // Spot-check inclusion of acknowledged records in today's tree.
            for (&index, hash) in acknowledged.iter().step_by(97) {
                let proof = log.inclusion_proof(index, size).unwrap();
                verify_inclusion(hash, index, size, &proof, &root).unwrap();
            }
            // Every checkpoint the child stored is a prefix of the tree now.
            for &(first, first_root) in checkpoints.iter().filter(|(s, _)| *s > 0) {
                let proof = log.consistency_proof(first, size).unwrap();
                verify_consistency(first, size, &first_root, &root, &proof).unwrap();
            }
            // The stored checkpoint verifies with its records, and so does a fresh one over all.
            let stored = log
                .latest_checkpoint()
                .expect("the child stored checkpoints");
            let records = log.records(0, stored.tree_size()).await.unwrap();
            verify_export(&records, &stored.to_json(), &public_key_pem()).unwrap();
            let fresh = log.checkpoint(&signer()).await.unwrap();
            let records = log.records(0, size).await.unwrap();
            let report = verify_export(&records, &fresh.to_json(), &public_key_pem()).unwrap();
            assert_eq!(report.records, size);
            log.close().await.unwrap();
        });
    }
    assert!(acknowledged.len() >= ROUNDS * 500);
}
