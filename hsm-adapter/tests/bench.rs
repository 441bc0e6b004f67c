//! The benchmark runs and measures something (no timing assertions: machines vary).
#![cfg(feature = "bench")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use hsm_adapter::bench;
use hsm_adapter::{KeyAlgorithm, KeyMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compare_runs_and_reports_positive_rates() {
    // BENCH_THREADS / BENCH_MS let a developer run a longer measurement with this test.
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let config = common::token().config();
    let _ = common::hsm();
    let threads = NonZeroUsize::new(env("BENCH_THREADS", 2) as usize).unwrap();
    let duration = Duration::from_millis(env("BENCH_MS", 200));
    for mode in [KeyMode::Resident, KeyMode::Wrapped] {
        let key = common::user_key(KeyAlgorithm::EcP256, mode).await;
        let result = bench::compare(&config, key, threads, duration)
            .await
            .unwrap();
        assert!(result.raw.operations > 0 && result.raw.per_second() > 0.0);
        assert!(result.adapter.operations > 0 && result.adapter.per_second() > 0.0);
        eprintln!(
            "{mode}: raw {:.0}/s, adapter {:.0}/s, ratio {:.3}",
            result.raw.per_second(),
            result.adapter.per_second(),
            result.ratio()
        );
    }
}
