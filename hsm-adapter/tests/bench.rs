//! The benchmark functions run and measure something (no timing assertions: CI machines vary).
#![cfg(feature = "bench")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use hsm_adapter::bench;
use hsm_adapter::{KeyAlgorithm, KeyMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_functions_run_and_report_positive_rates() {
    let config = common::token().config();
    let _ = common::hsm();
    let threads = NonZeroUsize::new(2).unwrap();
    let duration = Duration::from_millis(200);
    for mode in [KeyMode::Resident, KeyMode::Wrapped] {
        let key = common::user_key(KeyAlgorithm::EcP256, mode).await.clone();
        let raw = {
            let (config, key) = (config.clone(), key.clone());
            tokio::task::spawn_blocking(move || bench::raw_cryptoki(&config, &key, threads, duration))
                .await
                .unwrap()
                .unwrap()
        };
        let adapter = bench::adapter(&config, &key, threads, NonZeroUsize::new(8).unwrap(), duration)
            .await
            .unwrap();
        assert!(raw.operations > 0 && raw.per_second() > 0.0);
        assert!(adapter.operations > 0 && adapter.per_second() > 0.0);
        eprintln!(
            "{mode}: raw {:.0}/s, adapter {:.0}/s, ratio {:.3}",
            raw.per_second(),
            adapter.per_second(),
            adapter.per_second() / raw.per_second()
        );
    }
}
