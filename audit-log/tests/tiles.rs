//! The tree on disk (docs/audit-log.md): hash tiles, the offsets file and the tree state. An
//! open hashes only the records after the tree state; derived files that do not match the log
//! are rebuilt at open or refused when read; memory holds the right edge of the tree only.

// Test code: a panic is how a helper reports a failure (clippy.toml covers only #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_log::{AuditError, AuditLog, ErrorKind, LOG_FILE, TreeHash, verify_export};
use common::*;

const TREE_STATE: &str = "tree-state";

/// Appends events `from..from + count` from 16 tasks, so that they share fsyncs.
async fn append_many(log: &Arc<AuditLog>, from: u64, count: u64) {
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let log = Arc::clone(log);
            tokio::spawn(async move {
                for i in (from + task..from + count).step_by(16) {
                    log.append(event(i)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// A log in `dir` with `count` records (more if it had some), closed.
async fn log_with(dir: &Path, count: u64) {
    let log = Arc::new(open(dir).await);
    let size = log.tree_size();
    append_many(&log, size, count).await;
    Arc::into_inner(log).unwrap().close().await.unwrap();
}

/// The leaf hash of every line of `audit.log`, computed here from the file.
fn leaves_on_disk(dir: &Path) -> Vec<[u8; 32]> {
    lines(&fs::read(dir.join(LOG_FILE)).unwrap())
        .into_iter()
        .map(reference_leaf)
        .collect()
}

/// The root of every prefix of `leaves` (index `n` is the root of `n` leaves), streamed with a
/// stack of complete subtrees: independent of both the crate and the recursive reference.
fn prefix_roots(leaves: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut stack: Vec<(u64, [u8; 32])> = Vec::new();
    let mut roots = vec![sha(&[])];
    for leaf in leaves {
        let mut node = (1, *leaf);
        while let Some(&(size, left)) = stack.last() {
            if size != node.0 {
                break;
            }
            stack.pop();
            node = (size * 2, sha(&[&[1], &left, &node.1]));
        }
        stack.push(node);
        let mut nodes = stack.iter().rev();
        let mut root = nodes.next().unwrap().1;
        for (_, left) in nodes {
            root = sha(&[&[1], left, &root]);
        }
        roots.push(root);
    }
    roots
}

fn bytes(hashes: &[TreeHash]) -> Vec<[u8; 32]> {
    hashes.iter().map(|hash| *hash.as_bytes()).collect()
}

/// Every root up to the log's size, and proofs at sizes around the tile boundaries, against
/// the references computed from `audit.log` itself.
fn check_against_reference(log: &AuditLog, dir: &Path) {
    let leaves = leaves_on_disk(dir);
    let size = leaves.len();
    assert_eq!(log.tree_size(), size as u64);
    let roots = prefix_roots(&leaves);
    for (n, root) in roots.iter().enumerate() {
        assert_eq!(
            log.root_hash(n as u64).unwrap().as_bytes(),
            root,
            "root {n}"
        );
    }
    let sizes = [1, 255, 256, 257, 511, 512, 513, 1000, size - 1, size];
    for &n in sizes.iter().filter(|&&n| (1..=size).contains(&n)) {
        for m in [0, n / 3, n / 2, n - 1] {
            let proof = log.inclusion_proof(m as u64, n as u64).unwrap();
            assert_eq!(
                bytes(&proof),
                reference_path(m, &leaves[..n]),
                "inclusion {m} in {n}"
            );
        }
        for first in [1, n / 2 + 1, n] {
            let proof = log.consistency_proof(first as u64, size as u64).unwrap();
            assert_eq!(
                bytes(&proof),
                reference_consistency(first, &leaves, true),
                "consistency {first} -> {size}"
            );
        }
    }
    for index in [0, size / 2, size - 1] {
        let leaf = log.leaf_hash(index as u64).unwrap().unwrap();
        assert_eq!(leaf.as_bytes(), &leaves[index], "leaf {index}");
    }
}

fn corrupt_kind(error: &AuditError) -> bool {
    error.kind() == ErrorKind::Corrupt
}

#[tokio::test]
async fn reopening_hashes_only_the_records_after_the_tree_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 0);
    log.close().await.unwrap();
    log_with(dir.path(), 1000).await;
    for name in [
        "tile/0/000",
        "tile/0/001",
        "tile/0/002",
        "offsets",
        TREE_STATE,
    ] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
    // 768 records are in full tiles; 232 follow them, and one ties the state to the log.
    for _ in 0..2 {
        let log = open(dir.path()).await;
        assert_eq!(log.stats().records_scanned_at_open, 1 + 232);
        assert_eq!(log.tree_size(), 1000);
        check_against_reference(&log, dir.path());
        log.close().await.unwrap();
    }
    log_with(dir.path(), 1000).await;
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 1 + 2000 % 256);
    check_against_reference(&log, dir.path());
    let checkpoint = log.checkpoint(&signer()).await.unwrap();
    let records = log.records(0, 2000).await.unwrap();
    assert_eq!(records, fs::read(dir.path().join(LOG_FILE)).unwrap());
    verify_export(&records, &checkpoint.to_json(), &public_key_pem()).unwrap();
}

/// A crash after records reached `audit.log` and before the tiles and the tree state did:
/// the log is ahead, and the open replays the records after the older tree state.
#[tokio::test]
async fn a_log_ahead_of_its_tiles_is_replayed_from_the_tree_state() {
    let dir = tempfile::tempdir().unwrap();
    log_with(dir.path(), 1000).await;
    let old_state = fs::read(dir.path().join(TREE_STATE)).unwrap();
    log_with(dir.path(), 1000).await;
    // Back to the state at 768 records; the tiles and offsets written since are lost, or
    // half-written.
    fs::write(dir.path().join(TREE_STATE), &old_state).unwrap();
    for index in 3..7 {
        fs::remove_file(dir.path().join(format!("tile/0/00{index}"))).unwrap();
    }
    fs::write(dir.path().join("tile/0/003"), [0xee; 100]).unwrap();
    let offsets = fs::read(dir.path().join("offsets")).unwrap();
    fs::write(dir.path().join("offsets"), &offsets[..8 * 900 + 3]).unwrap();

    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 1 + 2000 - 768);
    check_against_reference(&log, dir.path());
    let records = log.records(0, 2000).await.unwrap();
    assert_eq!(records, fs::read(dir.path().join(LOG_FILE)).unwrap());
    log.close().await.unwrap();
    // The close wrote a new tree state.
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 1 + 2000 % 256);
}

/// Tiles and a tree state beyond the log's end (the log lost its end, or was replaced) are not
/// trusted: the tree is rebuilt from the records the log holds.
#[tokio::test]
async fn tiles_and_a_tree_state_beyond_the_log_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    log_with(dir.path(), 1000).await;
    let path = dir.path().join(LOG_FILE);
    let intact = fs::read(&path).unwrap();
    let first_500: Vec<u8> = lines(&intact)[..500]
        .iter()
        .flat_map(|line| [*line, b"\n"].concat())
        .collect();
    fs::write(&path, &first_500).unwrap();
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 500);
    check_against_reference(&log, dir.path());
    log.close().await.unwrap();

    // Another log, just as long, in its place: the record before the tree state's end is not
    // the one its tiles hold.
    let other = tempfile::tempdir().unwrap();
    let log = Arc::new(open(other.path()).await);
    append_many(&log, 5000, 1000).await;
    Arc::into_inner(log).unwrap().close().await.unwrap();
    log_with(dir.path(), 500).await;
    fs::copy(other.path().join(LOG_FILE), &path).unwrap();
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 1000);
    check_against_reference(&log, dir.path());
}

#[tokio::test]
async fn a_damaged_or_missing_tree_state_or_offsets_file_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    log_with(dir.path(), 1000).await;
    let state_path = dir.path().join(TREE_STATE);
    let mut state = fs::read(&state_path).unwrap();
    state[20] ^= 0x01;
    fs::write(&state_path, &state).unwrap();
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 1000);
    check_against_reference(&log, dir.path());
    log.close().await.unwrap();

    for removed in [TREE_STATE, "offsets"] {
        fs::remove_file(dir.path().join(removed)).unwrap();
        let log = open(dir.path()).await;
        assert_eq!(log.stats().records_scanned_at_open, 1000, "{removed}");
        check_against_reference(&log, dir.path());
        log.close().await.unwrap();
        let log = open(dir.path()).await;
        assert_eq!(log.stats().records_scanned_at_open, 1 + 232, "{removed}");
        log.close().await.unwrap();
    }
}

/// A damaged tile is never used: the requests that need it fail as corrupt. When the
/// checkpoint's root needs it, the open notices and rebuilds the tiles from the log.
#[tokio::test]
async fn a_corrupt_tile_is_refused_and_a_checkpoint_that_needs_it_has_it_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()).await);
    append_many(&log, 0, 300).await;
    log.checkpoint(&signer()).await.unwrap();
    append_many(&log, 300, 700).await;
    Arc::into_inner(log).unwrap().close().await.unwrap();

    let tile = dir.path().join("tile/0/000");
    let intact = fs::read(&tile).unwrap();
    let mut damaged = intact.clone();
    damaged[100] ^= 0x01;
    fs::write(&tile, &damaged).unwrap();
    // Nothing at open reads tile 0: it opens, and fails closed where the tile is needed.
    let log = open(dir.path()).await;
    let error = log.inclusion_proof(5, 1000).unwrap_err();
    assert!(corrupt_kind(&error), "{error}");
    assert!(error.to_string().contains("tile/0/000"), "{error}");
    assert!(corrupt_kind(&log.records(0, 10).await.unwrap_err()));
    assert!(corrupt_kind(&log.leaf_hash(3).unwrap_err()));
    assert!(corrupt_kind(&log.root_hash(100).unwrap_err()));
    // What does not need it still works.
    assert_eq!(log.records(256, 1).await.unwrap().len(), {
        let all = fs::read(dir.path().join(LOG_FILE)).unwrap();
        lines(&all)[256].len() + 1
    });
    log.inclusion_proof(700, 1000).unwrap();
    log.close().await.unwrap();
    fs::write(&tile, &intact).unwrap();

    // The checkpoint at 300 needs tile 1 of level 0.
    let tile = dir.path().join("tile/0/001");
    let intact = fs::read(&tile).unwrap();
    fs::write(&tile, &intact[..4096]).unwrap();
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 1 + 232 + 1000);
    assert_eq!(fs::read(&tile).unwrap(), intact, "rebuilt");
    check_against_reference(&log, dir.path());
}

/// A record rewritten in place after the tree state covered it is not hashed at open, but it
/// is never served: its leaf hash is not the tree's.
#[tokio::test]
async fn a_record_changed_after_it_was_hashed_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    log_with(dir.path(), 1000).await;
    let path = dir.path().join(LOG_FILE);
    let intact = fs::read(&path).unwrap();
    let target = lines(&intact)[5];
    // Still a canonical record of the same length; only its request id differs.
    let changed = String::from_utf8(target.to_vec())
        .unwrap()
        .replace("req-000", "req-999");
    assert_ne!(changed.as_bytes(), target);
    assert_eq!(changed.len(), target.len());
    let offset = intact
        .windows(target.len())
        .position(|window| window == target)
        .unwrap();
    let mut rewritten = intact.clone();
    rewritten[offset..offset + target.len()].copy_from_slice(changed.as_bytes());
    fs::write(&path, &rewritten).unwrap();

    let log = open(dir.path()).await;
    let error = log.records(0, 10).await.unwrap_err();
    match &error {
        AuditError::Corrupt {
            line, offset: at, ..
        } => {
            assert_eq!((*line, *at), (6, offset as u64), "{error}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(!log.records(6, 100).await.unwrap().is_empty());
}

/// Memory holds the partial tile of each level and nothing per record.
#[tokio::test]
async fn memory_holds_the_right_edge_only() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()).await);
    append_many(&log, 0, 100_000).await;
    // 100,000 = 1·65,536 + 134·256 + 160: partial tiles of 160, 134 and 1 hashes, each with
    // the roots of its complete blocks of 2, 4, ... hashes.
    let held = |width: u64| (0..9).map(|height| width >> height).sum::<u64>();
    let expected = held(160) + held(134) + held(1);
    assert_eq!(log.stats().hashes_in_memory, expected);
    assert!(expected < 3 * 512);
    // The tree state follows while the log runs, not only at close.
    let started = Instant::now();
    while !dir.path().join(TREE_STATE).exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "no tree state");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Arc::into_inner(log).unwrap().close().await.unwrap();
    let log = open(dir.path()).await;
    assert_eq!(log.stats().records_scanned_at_open, 1 + 160);
    assert_eq!(log.stats().hashes_in_memory, expected);
    // Readers keep at most 64 checked tiles with their nodes (511 hashes each) besides.
    for index in (0..100_000).step_by(997) {
        log.inclusion_proof(index, 100_000).unwrap();
    }
    let stats = log.stats();
    assert!(stats.hashes_in_memory > expected, "{stats:?}");
    assert!(stats.hashes_in_memory <= expected + 64 * 511, "{stats:?}");
}
