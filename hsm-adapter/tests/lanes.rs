//! The two lanes of the worker pool: a flood of background work (CA and OCSP signatures) fills
//! its own lane and is refused with `Busy` there, while a user signature still goes through at
//! once, ahead of the background backlog.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{open_another, token, user_key};
use hsm_adapter::{
    Digest, HashAlgorithm, HsmError, KeyAlgorithm, KeyMode, Lane, SignatureScheme, SystemKey,
};
use sha2::Digest as _;

const BACKGROUND_CAPACITY: usize = 256;
const FLOOD: usize = 3 * BACKGROUND_CAPACITY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_background_lane_does_not_hold_up_user_signatures() {
    let key = user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .clone();
    let config = token()
        .config()
        .with_workers(NonZeroUsize::new(2).unwrap())
        .with_background_queue_capacity(BACKGROUND_CAPACITY);
    let hsm = Arc::new(open_another(config).await);
    let digest = Digest::new(HashAlgorithm::Sha256, sha2::Sha256::digest(b"x").to_vec()).unwrap();

    // The flood: many more CA signatures than the background lane holds.
    let (done, busy) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        let (hsm, digest) = (Arc::clone(&hsm), digest.clone());
        let (done, busy) = (Arc::clone(&done), Arc::clone(&busy));
        flood.spawn(async move {
            match hsm
                .sign_with_system_key(SystemKey::CaIssuing, &digest)
                .await
            {
                Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                Err(HsmError::Busy) => busy.fetch_add(1, Ordering::SeqCst),
                Err(other) => panic!("background signature failed: {other}"),
            };
        });
    }
    // Wait until the background lane has refused work: it is full.
    let start = Instant::now();
    while busy.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the lane never filled"
        );
        tokio::task::yield_now().await;
    }
    let backlog_before = hsm.queued(Lane::Background);
    assert!(backlog_before > 0, "the background lane is full");

    // A user signature now: it goes through, and before the background backlog has drained.
    let signature = hsm
        .sign(&key, SignatureScheme::Ecdsa, &digest)
        .await
        .expect("a user signature while the background lane is full");
    let backlog_after = hsm.queued(Lane::Background);
    let background_done = done.load(Ordering::SeqCst);
    println!(
        "background lane: {backlog_before} queued before the user signature, {backlog_after} \
         after; {background_done} background signatures done, {} refused as busy",
        busy.load(Ordering::SeqCst)
    );
    assert!(!signature.is_empty());
    assert!(
        backlog_after > 0,
        "the user signature waited for the whole background backlog"
    );

    while flood.join_next().await.is_some() {}
    assert_eq!(
        done.load(Ordering::SeqCst) + busy.load(Ordering::SeqCst),
        FLOOD
    );
    assert!(done.load(Ordering::SeqCst) >= BACKGROUND_CAPACITY);
    // The background lane serves again once drained.
    hsm.sign_with_system_key(SystemKey::CaIssuing, &digest)
        .await
        .unwrap();
}
