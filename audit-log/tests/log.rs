//! The log on real files: appends, reopen, recovery, refusal of damage, locking, group commit,
//! proofs, checkpoints, and the offline verifier.

// Test code: a panic is how a helper reports a failure (clippy.toml covers only #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use audit_log::{
    AppendReceipt, AuditError, AuditLog, AuditLogConfig, CHECKPOINT_FILE, Checkpoint, ErrorKind,
    LOG_FILE, Origin, SoftwareSigner, TreeHash, leaf_hash, verify_consistency, verify_export,
    verify_inclusion,
};
use common::*;

#[tokio::test]
async fn appends_are_contiguous_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FixedClock::new();
    let log = AuditLog::open(dir.path(), config_with_clock(clock.clone()))
        .await
        .unwrap();
    assert_eq!(log.tree_size(), 0);
    let mut receipts = Vec::new();
    for i in 0..10 {
        receipts.push(log.append(event(i)).await.unwrap());
        clock.advance(1);
    }
    for (i, receipt) in receipts.iter().enumerate() {
        assert_eq!(receipt.index, i as u64);
        assert!(receipt.tree_size > receipt.index);
    }
    assert_eq!(receipts[3].time.as_str(), "2026-11-22T10:00:03Z");

    let ndjson = log.records(0, 100).await.unwrap();
    let lines = lines(&ndjson);
    assert_eq!(lines.len(), 10);
    assert_eq!(
        String::from_utf8(lines[0].to_vec()).unwrap(),
        r#"{"index":0,"time":"2026-11-22T10:00:00Z","event":"signing.signed","actor":"service:demo-0","fields":{"attempt":0,"request_id":"req-000000"}}"#
    );
    for (line, receipt) in lines.iter().zip(&receipts) {
        assert_eq!(leaf_hash(line), receipt.leaf_hash);
        assert_eq!(reference_leaf(line), *receipt.leaf_hash.as_bytes());
    }
    // The file holds exactly the served bytes.
    assert_eq!(fs::read(dir.path().join(LOG_FILE)).unwrap(), ndjson);
    // Paging.
    assert_eq!(
        log.records(3, 2).await.unwrap(),
        [lines[3], b"\n", lines[4], b"\n"].concat()
    );
    assert_eq!(log.records(9, 5).await.unwrap(), [lines[9], b"\n"].concat());
    assert!(log.records(10, 5).await.unwrap().is_empty());
    assert!(log.records(0, 0).await.unwrap().is_empty());

    let checkpoint = log.checkpoint(&signer()).await.unwrap();
    assert_eq!(checkpoint.tree_size(), 10);
    assert_eq!(checkpoint.timestamp().as_str(), "2026-11-22T10:00:10Z");
    let root = log.root_hash(10).unwrap();
    assert_eq!(*checkpoint.root_hash(), root);
    let stored = fs::read(dir.path().join(CHECKPOINT_FILE)).unwrap();
    assert_eq!(Checkpoint::from_json(&stored).unwrap(), checkpoint);
    log.close().await.unwrap();

    let log = open(dir.path()).await;
    assert_eq!(log.tree_size(), 10);
    assert_eq!(log.root_hash(10).unwrap(), root);
    assert_eq!(log.latest_checkpoint(), Some(checkpoint));
    let receipt = log.append(event(10)).await.unwrap();
    assert_eq!(receipt.index, 10);
    assert_eq!(receipt.tree_size, 11);
    let stats = log.stats();
    assert_eq!((stats.tree_size, stats.appends, stats.fsyncs), (11, 1, 1));
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(GateClock::default());
    let log = AuditLog::open(dir.path(), config_with_clock(clock.clone()))
        .await
        .unwrap();

    // Start 64 appends and poll each once: that queues them all. The writer takes the first
    // batch and then waits in the clock, so everything queued meanwhile must share the next
    // write and fsync.
    type Append<'a> = Pin<Box<dyn Future<Output = Result<AppendReceipt, AuditError>> + 'a>>;
    let mut appends: Vec<Append<'_>> = (0..64)
        .map(|i| Box::pin(tokio::task::unconstrained(log.append(event(i)))) as Append<'_>)
        .collect();
    let mut context = Context::from_waker(Waker::noop());
    for append in &mut appends {
        assert!(matches!(append.as_mut().poll(&mut context), Poll::Pending));
    }
    clock.open();
    let mut indexes = Vec::new();
    for append in appends {
        let receipt = append.await.unwrap();
        indexes.push(receipt.index);
    }
    indexes.sort_unstable();
    assert_eq!(indexes, (0..64).collect::<Vec<_>>());
    let stats = log.stats();
    assert_eq!(stats.appends, 64);
    assert!(stats.fsyncs < stats.appends, "{stats:?}");
    assert!(stats.fsyncs <= 2, "{stats:?}");
}

#[tokio::test]
async fn many_tasks_appending_concurrently_use_fewer_fsyncs_than_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()).await);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                for j in 0..8 {
                    log.append(event(i * 8 + j)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.appends, 512);
    assert!(stats.fsyncs < stats.appends, "{stats:?}");
    let checkpoint = log.checkpoint(&signer()).await.unwrap();
    let records = log.records(0, u64::MAX).await.unwrap();
    verify_export(&records, &checkpoint.to_json(), &public_key_pem()).unwrap();
}

#[tokio::test]
async fn a_torn_last_line_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    for i in 0..3 {
        log.append(event(i)).await.unwrap();
    }
    log.checkpoint(&signer()).await.unwrap();
    log.close().await.unwrap();
    let path = dir.path().join(LOG_FILE);
    let intact = fs::read(&path).unwrap();

    for torn in [
        &b"{"[..],
        b"{\"index\":3,\"time\":\"2026",
        lines(&intact)[0],
    ] {
        fs::write(&path, [&intact[..], torn].concat()).unwrap();
        let log = open(dir.path()).await;
        assert_eq!(log.tree_size(), 3);
        assert_eq!(fs::read(&path).unwrap(), intact, "torn bytes cut");
        log.close().await.unwrap();
    }

    let log = open(dir.path()).await;
    assert_eq!(log.append(event(3)).await.unwrap().index, 3);
    let checkpoint = log.checkpoint(&signer()).await.unwrap();
    let records = log.records(0, 10).await.unwrap();
    assert_eq!(
        verify_export(&records, &checkpoint.to_json(), &public_key_pem())
            .unwrap()
            .records,
        4
    );
}

#[tokio::test]
async fn damage_before_the_last_line_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    for i in 0..4 {
        log.append(event(i)).await.unwrap();
    }
    log.close().await.unwrap();
    let path = dir.path().join(LOG_FILE);
    let intact = fs::read(&path).unwrap();
    let original = lines(&intact)
        .iter()
        .map(|l| l.to_vec())
        .collect::<Vec<_>>();
    let offset_of_line_2 = (original[0].len() + 1) as u64;
    let join = |lines: &[Vec<u8>]| {
        lines
            .iter()
            .flat_map(|l| [&l[..], b"\n"].concat())
            .collect::<Vec<u8>>()
    };

    let replace_line_2 = |new: Vec<u8>| {
        let mut lines = original.clone();
        lines[1] = new;
        join(&lines)
    };
    let text = |line: &[u8]| String::from_utf8(line.to_vec()).unwrap();
    let damaged: Vec<(&str, Vec<u8>)> = vec![
        ("flipped byte", {
            let mut bytes = intact.clone();
            bytes[offset_of_line_2 as usize + 5] ^= 0x01;
            bytes
        }),
        ("not JSON", replace_line_2(b"garbage".to_vec())),
        ("empty line", replace_line_2(Vec::new())),
        (
            "not compact",
            replace_line_2(text(&original[1]).replacen(",", ", ", 1).into_bytes()),
        ),
        (
            "wrong index",
            replace_line_2(
                text(&original[1])
                    .replacen("\"index\":1", "\"index\":7", 1)
                    .into_bytes(),
            ),
        ),
        (
            "reordered",
            join(&[
                original[0].clone(),
                original[2].clone(),
                original[1].clone(),
                original[3].clone(),
            ]),
        ),
        (
            "duplicated",
            join(&[
                original[0].clone(),
                original[0].clone(),
                original[1].clone(),
            ]),
        ),
        (
            "removed",
            join(&[
                original[0].clone(),
                original[2].clone(),
                original[3].clone(),
            ]),
        ),
    ];
    for (what, bytes) in damaged {
        fs::write(&path, &bytes).unwrap();
        let error = AuditLog::open(dir.path(), config()).await.unwrap_err();
        match &error {
            AuditError::Corrupt { line, offset, .. } => {
                assert_eq!((*line, *offset), (2, offset_of_line_2), "{what}: {error}");
            }
            other => panic!("{what}: expected Corrupt, got {other}"),
        }
        assert_eq!(error.kind(), ErrorKind::Corrupt);
        assert!(error.to_string().contains("line 2"), "{error}");
        assert_eq!(fs::read(&path).unwrap(), bytes, "{what}: never repaired");
    }
}

#[tokio::test]
async fn a_log_that_does_not_match_its_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    for i in 0..5 {
        log.append(event(i)).await.unwrap();
    }
    log.checkpoint(&signer()).await.unwrap();
    log.close().await.unwrap();
    let path = dir.path().join(LOG_FILE);
    let intact = fs::read(&path).unwrap();
    let original = lines(&intact);

    // Records lost: the last two whole lines gone.
    let shortened: Vec<u8> = original[..3]
        .iter()
        .flat_map(|l| [*l, b"\n"].concat())
        .collect();
    fs::write(&path, &shortened).unwrap();
    let error = AuditLog::open(dir.path(), config()).await.unwrap_err();
    assert!(
        matches!(error, AuditError::CheckpointMismatch { .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("covers 5 records but the log holds 3"),
        "{error}"
    );

    // A record rewritten in its canonical form: only the root can tell.
    let rewritten = String::from_utf8(intact.clone())
        .unwrap()
        .replace("req-000002", "req-999999");
    fs::write(&path, &rewritten).unwrap();
    let error = AuditLog::open(dir.path(), config()).await.unwrap_err();
    assert!(
        matches!(error, AuditError::CheckpointMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("the log was altered"), "{error}");

    // The right log under another origin, or with another key.
    fs::write(&path, &intact).unwrap();
    let other_origin = AuditLogConfig::new(Origin::new("elsewhere/audit").unwrap());
    let error = AuditLog::open(dir.path(), other_origin).await.unwrap_err();
    assert!(
        matches!(error, AuditError::CheckpointMismatch { .. }),
        "{error}"
    );
    let other_key = config().with_checkpoint_key(
        SoftwareSigner::from_secret_scalar(&[9; 32])
            .unwrap()
            .public_key(),
    );
    let error = AuditLog::open(dir.path(), other_key).await.unwrap_err();
    assert!(
        error.to_string().contains("signature does not verify"),
        "{error}"
    );

    // A damaged checkpoint file.
    let checkpoint_path = dir.path().join(CHECKPOINT_FILE);
    let checkpoint = fs::read(&checkpoint_path).unwrap();
    fs::write(&checkpoint_path, &checkpoint[..checkpoint.len() - 1]).unwrap();
    let error = AuditLog::open(dir.path(), config()).await.unwrap_err();
    assert!(
        matches!(error, AuditError::CheckpointMismatch { .. }),
        "{error}"
    );
    fs::write(&checkpoint_path, &checkpoint).unwrap();

    let log = AuditLog::open(dir.path(), config()).await.unwrap();
    assert_eq!(log.tree_size(), 5);
}

#[tokio::test]
async fn a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let error = AuditLog::open(dir.path(), config()).await.unwrap_err();
    assert!(matches!(error, AuditError::Locked { .. }), "{error}");
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    log.close().await.unwrap();
    open(dir.path()).await.close().await.unwrap();
}

#[tokio::test]
async fn creates_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("state").join("audit");
    let log = open(&nested).await;
    log.append(event(0)).await.unwrap();
    assert!(nested.join(LOG_FILE).is_file());
    assert_eq!(log.dir(), nested);
}

#[tokio::test]
async fn invalid_events_are_refused_without_touching_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let error = log
        .append(event(0).with_field("ratio", 0.5))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    let error = log
        .append(event(0).with_field("big", "x".repeat(audit_log::MAX_RECORD_LEN)))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert_eq!(log.tree_size(), 0);
    assert_eq!(log.append(event(0)).await.unwrap().index, 0);
}

#[tokio::test]
async fn proofs_for_every_size_up_to_64_match_the_rfc_reference() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    for i in 0..64 {
        log.append(event(i)).await.unwrap();
    }
    let records = log.records(0, 64).await.unwrap();
    let leaves: Vec<[u8; 32]> = lines(&records).iter().map(|l| reference_leaf(l)).collect();
    let hashes = |proof: Vec<TreeHash>| proof.iter().map(|h| *h.as_bytes()).collect::<Vec<_>>();
    for n in 1..=64usize {
        let root = log.root_hash(n as u64).unwrap();
        assert_eq!(*root.as_bytes(), reference_root(&leaves[..n]), "root {n}");
        for m in 0..n {
            let proof = log.inclusion_proof(m as u64, n as u64).unwrap();
            assert_eq!(
                hashes(proof.clone()),
                reference_path(m, &leaves[..n]),
                "path {m} {n}"
            );
            let leaf = TreeHash::from_bytes(leaves[m]);
            verify_inclusion(&leaf, m as u64, n as u64, &proof, &root).unwrap();
        }
        for first in 1..=n {
            let proof = log.consistency_proof(first as u64, n as u64).unwrap();
            assert_eq!(
                hashes(proof.clone()),
                reference_consistency(first, &leaves[..n], true),
                "consistency {first} {n}"
            );
            let first_root = log.root_hash(first as u64).unwrap();
            verify_consistency(first as u64, n as u64, &first_root, &root, &proof).unwrap();
        }
    }
    assert_eq!(
        log.inclusion_proof(64, 64).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        log.consistency_proof(3, 65).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        log.consistency_proof(0, 3).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

async fn small_export() -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    for i in 0..3 {
        log.append(event(i).with_field("note", "a\"b\\c\u{1}é"))
            .await
            .unwrap();
    }
    let checkpoint = log.checkpoint(&signer()).await.unwrap();
    (log.records(0, 3).await.unwrap(), checkpoint.to_json())
}

#[tokio::test]
async fn every_flipped_bit_of_an_export_is_detected() {
    let (records, checkpoint) = small_export().await;
    let key = public_key_pem();
    let report = verify_export(&records, &checkpoint, &key).unwrap();
    assert_eq!(report.records, 3);
    for position in 0..records.len() {
        for bit in 0..8 {
            let mut damaged = records.clone();
            damaged[position] ^= 1 << bit;
            let error = verify_export(&damaged, &checkpoint, &key)
                .expect_err(&format!("records byte {position} bit {bit} undetected"));
            assert_eq!(error.kind(), ErrorKind::Verification);
        }
    }
    for position in 0..checkpoint.len() {
        for bit in 0..8 {
            let mut damaged = checkpoint.clone();
            damaged[position] ^= 1 << bit;
            let error = verify_export(&records, &damaged, &key)
                .expect_err(&format!("checkpoint byte {position} bit {bit} undetected"));
            assert_eq!(error.kind(), ErrorKind::Verification);
        }
    }
}

#[tokio::test]
async fn the_verifier_names_what_failed() {
    let (records, checkpoint) = small_export().await;
    let key = public_key_pem();
    let lines = lines(&records);
    let second_offset = (lines[0].len() + 1) as u64;

    let error = verify_export(&records[..records.len() - 1], &checkpoint, &key).unwrap_err();
    assert!(
        matches!(error, AuditError::InvalidRecord { line: 3, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("no newline"), "{error}");

    let swapped = [lines[0], b"\n", lines[2], b"\n", lines[1], b"\n"].concat();
    let error = verify_export(&swapped, &checkpoint, &key).unwrap_err();
    assert!(
        matches!(&error, AuditError::InvalidRecord { line: 2, offset, .. } if *offset == second_offset),
        "{error}"
    );
    assert!(
        error.to_string().contains("index 2 where 1 was expected"),
        "{error}"
    );

    let short = [lines[0], b"\n", lines[1], b"\n"].concat();
    let error = verify_export(&short, &checkpoint, &key).unwrap_err();
    assert!(
        matches!(
            error,
            AuditError::RecordCountMismatch {
                records: 2,
                tree_size: 3
            }
        ),
        "{error}"
    );

    let longer = [&records[..], lines[0], b"\n"].concat();
    let error = verify_export(&longer, &checkpoint, &key).unwrap_err();
    assert!(
        matches!(error, AuditError::InvalidRecord { line: 4, .. }),
        "{error}"
    );

    let rewritten = String::from_utf8(records.clone())
        .unwrap()
        .replace("req-000001", "req-000009");
    let error = verify_export(rewritten.as_bytes(), &checkpoint, &key).unwrap_err();
    assert!(
        matches!(error, AuditError::RootMismatch { tree_size: 3, .. }),
        "{error}"
    );

    let other_key = SoftwareSigner::from_secret_scalar(&[9; 32])
        .unwrap()
        .public_key();
    let error =
        verify_export(&records, &checkpoint, &other_key.to_spki_pem().unwrap()).unwrap_err();
    assert!(
        matches!(error, AuditError::BadCheckpointSignature),
        "{error}"
    );

    let error = verify_export(&records, &checkpoint, "not a key").unwrap_err();
    assert!(matches!(error, AuditError::InvalidPublicKey(_)), "{error}");

    let error = verify_export(&records, b"{}", &key).unwrap_err();
    assert!(matches!(error, AuditError::InvalidCheckpoint(_)), "{error}");
}

#[tokio::test]
async fn the_empty_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let checkpoint = log.checkpoint(&signer()).await.unwrap();
    assert_eq!(checkpoint.tree_size(), 0);
    assert_eq!(*checkpoint.root_hash(), audit_log::empty_root());
    let report = verify_export(b"", &checkpoint.to_json(), &public_key_pem()).unwrap();
    assert_eq!(report.records, 0);
}

/// openssl, an independent implementation, accepts the checkpoint signature over the statement.
#[tokio::test]
async fn openssl_verifies_checkpoint_signatures() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("openssl not installed; skipping the independent check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir.path().join("log")).await;
    for i in 0..5 {
        log.append(event(i)).await.unwrap();
    }
    let checkpoint = log.checkpoint(&signer()).await.unwrap();
    let statement = dir.path().join("statement");
    let signature = dir.path().join("signature.der");
    let key = dir.path().join("key.pem");
    fs::write(&statement, checkpoint.signed_statement()).unwrap();
    fs::write(&signature, checkpoint.signature_der()).unwrap();
    fs::write(&key, public_key_pem()).unwrap();
    let output = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&key)
        .arg("-signature")
        .arg(&signature)
        .arg(&statement)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8(fs::read(&statement).unwrap()).unwrap(),
        format!(
            "smartsign-checkpoint-v1\n{ORIGIN}\n5\n{}\n2026-11-22T10:00:00Z",
            checkpoint.root_hash()
        )
    );
}

/// Every checkpoint stored is also appended to `checkpoints.ndjson`, in order, and stays there
/// when later ones replace `checkpoint.json`.
#[tokio::test]
async fn every_checkpoint_is_kept_in_the_append_only_history() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let mut signed = Vec::new();
    for round in 0..3 {
        for i in 0..4 {
            log.append(event(round * 4 + i)).await.unwrap();
        }
        signed.push(log.checkpoint(&signer()).await.unwrap());
    }
    let history = fs::read_to_string(dir.path().join(audit_log::CHECKPOINT_HISTORY_FILE)).unwrap();
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 3, "{history}");
    for (line, checkpoint) in lines.iter().zip(&signed) {
        assert_eq!(line.as_bytes(), checkpoint.to_json().as_slice());
        // Each verifies on its own, against the records it covered.
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(parsed["tree_size"], checkpoint.tree_size());
    }
    assert_eq!(
        fs::read(dir.path().join(CHECKPOINT_FILE)).unwrap(),
        signed[2].to_json()
    );
}
