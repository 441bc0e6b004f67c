//! Pinning the workers to CPUs (`HsmConfig::with_worker_cpus`).
//!
//! One test function on purpose: it reads the CPU affinity of every `hsm-worker-*` thread of
//! this process, so no other test may start workers beside it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::num::NonZeroUsize;

use hsm_adapter::{
    Digest, ErrorKind, HashAlgorithm, Hsm, HsmError, KeyAlgorithm, KeyMode, SignatureScheme,
    allowed_cpus,
};
use sha2::Digest as _;

/// `Cpus_allowed_list` of each `hsm-worker-*` thread of this process, by thread name.
fn worker_affinities() -> Vec<(String, String)> {
    let mut workers = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = name.trim();
        if !name.starts_with("hsm-worker-") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_owned();
        workers.push((name.to_owned(), allowed));
    }
    workers.sort();
    workers
}

/// [`worker_affinities`] once it lists `count` workers: a listing of `/proc/self/task` can skip
/// a thread while another exits (here the thread that opened the HSM).
fn affinities_of(count: usize) -> Vec<(String, String)> {
    let mut workers = worker_affinities();
    for _ in 0..100 {
        if workers.len() == count {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        workers = worker_affinities();
    }
    workers
}

#[tokio::test]
async fn workers_run_on_their_configured_cpus_and_an_unavailable_cpu_is_refused() {
    let config = common::token().config();
    let allowed = allowed_cpus().unwrap();
    assert!(!allowed.is_empty());

    // A CPU the process may not use: opening fails before any worker starts, and says why.
    let unavailable = (0..).find(|cpu| !allowed.contains(cpu)).unwrap();
    let err = Hsm::open(config.clone().with_worker_cpus(vec![unavailable]))
        .await
        .unwrap_err();
    assert!(matches!(err, HsmError::InvalidInput(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains(&format!("CPU {unavailable}")),
        "{err}"
    );
    assert!(worker_affinities().is_empty());

    // Three workers on the last allowed CPU and the first, round robin.
    let (first, last) = (allowed[0], allowed[allowed.len() - 1]);
    let hsm = Hsm::open(
        config
            .with_workers(NonZeroUsize::new(3).unwrap())
            .with_worker_cpus(vec![last, first]),
    )
    .await
    .unwrap();
    assert_eq!(
        affinities_of(3),
        vec![
            ("hsm-worker-0".to_owned(), last.to_string()),
            ("hsm-worker-1".to_owned(), first.to_string()),
            ("hsm-worker-2".to_owned(), last.to_string()),
        ]
    );

    // Pinned workers still sign, and the signature verifies.
    hsm.provision_system_keys(&common::token().so_pin())
        .await
        .unwrap();
    let key = hsm
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
        .await
        .unwrap();
    let digest = Digest::new(
        HashAlgorithm::Sha256,
        sha2::Sha256::digest(b"pinned").to_vec(),
    )
    .unwrap();
    let signature = hsm
        .sign(&key, SignatureScheme::Ecdsa, &digest)
        .await
        .unwrap();
    common::openssl_verify(
        &key.public_key().to_pem(),
        "sha256",
        b"pinned",
        &signature,
        common::Padding::Default,
    );
    hsm.shutdown().await;
}
