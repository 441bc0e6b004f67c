//! `smartsign-ctl bench sweep`: how long the lifecycle sweeps take over a population of N
//! accounts with nothing due, as the daemon measures a run (`duration_ms` of
//! `POST /v1/admin/sweep`). The first run is reported apart: on a store that has no sweep mark
//! yet (a daemon started on it runs a sweep at once, which sets it) it reads every minor once.

use std::time::Instant;

use serde_json::Value;

use crate::bench_accounts::{Daemon, DaemonArgs};

/// The target of issue 15: a sweep with nothing due over 10^6 accounts.
const TARGET_MS: f64 = 100.0;

/// Arguments of `bench sweep`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchSweepArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Accounts the population should hold (made first when fewer exist).
    #[arg(long, default_value_t = 1000)]
    accounts: u64,
    /// Sweep runs measured after the first.
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// Runs the command.
pub(crate) async fn run(args: BenchSweepArgs) -> Result<(), Box<dyn std::error::Error>> {
    let daemon = Daemon::ensure(&args.daemon)?;
    let population = crate::bench_populate::populate(&daemon, args.accounts, 32).await?;
    let officer = daemon.client("officer")?;
    let sweep = || async {
        let started = Instant::now();
        let response = officer
            .post(format!("{}/v1/admin/sweep", daemon.api))
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("sweep: {} {}", response.status(), response.text().await?).into());
        }
        let body: Value = response.json().await?;
        let changed = [
            "revocations_finished",
            "minors_revoked",
            "expired_keys_destroyed",
        ]
        .iter()
        .chain(&["invalidated", "deregistered"])
        .map(|key| body[*key].as_array().map_or(0, Vec::len))
        .sum::<usize>();
        let server = body["duration_ms"].as_f64().ok_or("no duration_ms")?;
        Ok::<_, Box<dyn std::error::Error>>((
            server,
            started.elapsed().as_secs_f64() * 1e3,
            changed,
        ))
    };
    let (first, _, first_changed) = sweep().await?;
    let mut runs = Vec::with_capacity(args.runs);
    for _ in 0..args.runs.max(1) {
        let (server, client, changed) = sweep().await?;
        if changed > 0 {
            return Err(format!("{changed} changes in a population with nothing due").into());
        }
        runs.push((server, client));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let median = runs[runs.len() / 2];
    println!("accounts: {}", population.total);
    println!("first run: {first:.1} ms, {first_changed} changes");
    println!(
        "sweep with nothing due, {} runs: min {:.2} ms, median {:.2} ms, max {:.2} ms \
         (median over HTTPS {:.2} ms)",
        runs.len(),
        runs[0].0,
        median.0,
        runs[runs.len() - 1].0,
        median.1
    );
    println!(
        "under {TARGET_MS} ms: {}",
        if median.0 < TARGET_MS { "yes" } else { "NO" }
    );
    Ok(())
}
