//! The benchmark runs and measures something (no timing assertions: machines vary).
#![cfg(feature = "bench")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use hsm_adapter::bench::{self, Comparison, LoadScheduling, Placement, Throughput};
use hsm_adapter::{KeyAlgorithm, KeyMode, allowed_cpus};

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
        let placement = Placement {
            load: LoadScheduling::Batch,
            cpus: allowed_cpus().unwrap(),
        };
        let result = bench::compare(&config, key, threads, duration, &placement)
            .await
            .unwrap();
        assert!(result.raw.operations > 0 && result.raw.per_second() > 0.0);
        assert!(result.adapter.operations > 0 && result.adapter.per_second() > 0.0);
        // One block per 500 ms (two rounds of each side), at least one.
        let blocks = (duration.as_millis() / 500).max(1) as usize;
        assert_eq!(result.block_ratios.len(), blocks);
        if blocks == 1 {
            // One block's ratio is the run's.
            assert!((result.ratio() - result.overall_ratio()).abs() < 1e-9);
        }
        eprintln!(
            "{mode}: raw {:.0}/s, adapter {:.0}/s, ratio {:.3}",
            result.raw.per_second(),
            result.adapter.per_second(),
            result.ratio()
        );
    }
}

#[test]
fn the_ratio_is_the_median_of_the_blocks() {
    let second = |operations| Throughput {
        operations,
        elapsed: Duration::from_secs(1),
    };
    let mut result = Comparison {
        raw: second(100),
        adapter: second(80),
        block_ratios: vec![],
    };
    // No blocks: the overall ratio.
    assert!((result.ratio() - 0.8).abs() < 1e-9);
    // A burst on one side of one block moves the overall ratio, not the median.
    result.block_ratios = vec![0.97, 0.5, 0.96, 1.3, 0.98];
    assert!((result.ratio() - 0.97).abs() < 1e-9);
    result.block_ratios.push(0.99);
    assert!((result.ratio() - 0.975).abs() < 1e-9);
}

/// The scheduling policy (field 41) and nice value (field 19) of the calling thread, from
/// /proc (see proc_pid_stat(5)).
fn policy_and_nice() -> (u32, i32) {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // The first field after the name is field 3.
    (
        fields[41 - 3].parse().unwrap(),
        fields[19 - 3].parse().unwrap(),
    )
}

#[test]
fn batch_scheduling_changes_the_policy_and_keeps_the_nice_value() {
    const SCHED_BATCH: u32 = 3;
    std::thread::spawn(|| {
        // A nice value other than the default, which the crate underneath would reset.
        rustix::process::setpriority_process(None, 5).unwrap();
        let (policy, nice) = policy_and_nice();
        assert_eq!(nice, 5);
        LoadScheduling::Normal.apply().unwrap();
        assert_eq!(policy_and_nice(), (policy, nice));
        LoadScheduling::Batch.apply().unwrap();
        assert_eq!(policy_and_nice(), (SCHED_BATCH, nice));
        // A thread started now inherits the policy: why the bench applies it only after the
        // adapter's workers started.
        let child = std::thread::spawn(policy_and_nice).join().unwrap();
        assert_eq!(child, (SCHED_BATCH, nice));
    })
    .join()
    .unwrap();
}
