//! `smartsign-ctl bench soak`: the signing flow at a fixed arrival rate for a long time, against
//! a `smartsignd --dev` on a population of `bench populate`, printing each minute the flows
//! done, their p99 and the daemon's resident memory, so that a leak or a cost that grows with
//! time shows. The figure is the memory's growth after the first minutes (issue 15: within 10%
//! over an hour at half load).

use std::time::Duration;

use crate::bench_accounts::{Daemon, DaemonArgs, Listed};
use crate::bench_sign::FlowSide;

/// Memory may grow this much after the warm-up (issue 15).
const TARGET_GROWTH: f64 = 0.10;

/// Arguments of `bench soak`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchSoakArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Accounts to draw from (made first when fewer exist).
    #[arg(long, default_value_t = 1000)]
    accounts: u64,
    /// Flows started per second (half the closed-loop rate of `bench sign` is "half load").
    #[arg(long)]
    rate: f64,
    /// Minutes to run.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// Minutes of warm-up that the growth is not measured from.
    #[arg(long, default_value_t = 5)]
    warm_up: u64,
}

/// Runs the soak.
pub(crate) async fn run(args: BenchSoakArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.rate <= 0.0 || args.minutes == 0 {
        return Err("--rate and --minutes must be positive".into());
    }
    let daemon = Daemon::ensure(&args.daemon)?;
    crate::bench_populate::populate(&daemon, args.accounts, 32).await?;
    let population: Vec<Listed> = daemon
        .populated()?
        .into_iter()
        .filter(|(i, _)| *i < args.accounts)
        .collect();
    let pid = daemon.pid().ok_or("cannot find the daemon's process")?;
    let side = FlowSide::new(&daemon, population)?;
    println!(
        "soak: {} flows/s for {} min; the daemon's resident memory each minute",
        args.rate, args.minutes
    );
    println!("minute  flows   failed  p99 ms   RSS MB");
    let mut samples = Vec::new();
    for minute in 1..=args.minutes {
        let mut measured = side.open(args.rate, Duration::from_secs(60)).await;
        let rss = resident_mb(pid).ok_or("the daemon exited")?;
        samples.push(rss);
        let p99 = measured.percentile(0.99).as_secs_f64() * 1000.0;
        println!(
            "{minute:>6}  {:>6}  {:>6}  {p99:>7.1}  {rss:>7.1}",
            measured.latencies.len(),
            measured.failed,
        );
    }
    let warm = usize::try_from(args.warm_up.min(args.minutes - 1)).unwrap_or(0);
    let base = samples
        .get(warm.saturating_sub(1))
        .copied()
        .unwrap_or(samples[0]);
    let last = samples[samples.len() - 1];
    let peak = samples[warm..].iter().copied().fold(0.0, f64::max);
    let growth = (peak - base) / base;
    println!(
        "resident memory after minute {}: {base:.1} MB; at the end {last:.1} MB; peak since \
         {peak:.1} MB ({:+.1}%); within {:.0}%: {}",
        warm.max(1),
        growth * 100.0,
        TARGET_GROWTH * 100.0,
        if growth <= TARGET_GROWTH { "yes" } else { "NO" }
    );
    Ok(())
}

/// The process's resident memory in MB (`VmRSS` of `/proc/PID/status`).
fn resident_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
