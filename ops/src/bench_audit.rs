//! `smartsign-ctl bench audit`: durable appends per second with group commit at several
//! concurrencies, beside the one-fsync-per-append baseline measured in the same run on the same
//! file system.
//!
//! Progress goes to stderr, the table to stdout.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_log::{Actor, AuditError, AuditEvent, AuditLog, AuditLogConfig, EventName, Origin};

/// The concurrency whose speed-up the target is about.
const TARGET_APPENDERS: usize = 64;
/// Group commit at that concurrency must beat the baseline by this factor.
const TARGET_SPEEDUP: f64 = 10.0;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchAuditArgs {
    /// Directory in which to make the scratch logs (removed afterwards). Default: a temporary
    /// directory under the current directory, because /tmp may be tmpfs, where fsync costs
    /// nothing; the file system used is printed.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds to measure each configuration.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Concurrent appenders to measure group commit with, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8, 64])]
    appenders: Vec<usize>,
    /// Keep the record index during the group-commit runs, as the daemon does (its thread
    /// indexes each batch after its fsync), to see what it costs the append path.
    #[arg(long)]
    record_index: bool,
}

/// One measured configuration.
#[derive(Debug)]
struct Measurement {
    appenders: usize,
    appends: u64,
    fsyncs: u64,
    elapsed: Duration,
}

impl Measurement {
    fn per_second(&self, count: u64) -> f64 {
        count as f64 / self.elapsed.as_secs_f64()
    }
}

pub(crate) async fn run(args: BenchAuditArgs) -> Result<(), Box<dyn Error>> {
    if args.appenders.is_empty() || args.appenders.contains(&0) {
        return Err("--appenders needs one or more counts, each at least 1".into());
    }
    if args.seconds == 0 {
        return Err("--seconds must be at least 1".into());
    }
    let parent = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    fs::create_dir_all(&parent)?;
    let parent = fs::canonicalize(&parent)?;
    let scratch = tempfile::Builder::new()
        .prefix(".smartsign-bench-audit-")
        .tempdir_in(&parent)?;
    let filesystem = filesystem_of(scratch.path());
    eprintln!(
        "bench audit: scratch logs in {} ({filesystem})",
        scratch.path().display()
    );
    if filesystem.starts_with("tmpfs") || filesystem.starts_with("ramfs") {
        eprintln!("bench audit: warning: fsync is free on {filesystem}; pass --dir on a disk");
    }
    let duration = Duration::from_secs(args.seconds);
    let baseline_appenders = args
        .appenders
        .iter()
        .copied()
        .max()
        .unwrap_or(TARGET_APPENDERS);

    eprintln!("bench audit: baseline, one fsync per append, {baseline_appenders} appenders ...");
    let baseline = measure(
        &scratch.path().join("baseline"),
        baseline_appenders,
        duration,
        true,
        false,
    )
    .await?;
    let mut group = Vec::new();
    for &appenders in &args.appenders {
        eprintln!("bench audit: group commit, {appenders} appenders ...");
        let dir = scratch.path().join(format!("group-{appenders}"));
        group.push(measure(&dir, appenders, duration, false, args.record_index).await?);
    }

    let baseline_rate = baseline.per_second(baseline.appends);
    println!(
        "audit log durable appends, {} s per run, on {filesystem} ({}){}",
        args.seconds,
        scratch.path().display(),
        if args.record_index {
            ", group commit with the record index"
        } else {
            ""
        }
    );
    println!(
        "{:<22} {:>9} {:>12} {:>10} {:>14} {:>12}",
        "mode", "appenders", "appends/s", "fsyncs/s", "appends/fsync", "vs baseline"
    );
    let row = |mode: &str, m: &Measurement| {
        let per_fsync = if m.fsyncs == 0 {
            0.0
        } else {
            m.appends as f64 / m.fsyncs as f64
        };
        println!(
            "{mode:<22} {:>9} {:>12.0} {:>10.0} {:>14.1} {:>11.1}x",
            m.appenders,
            m.per_second(m.appends),
            m.per_second(m.fsyncs),
            per_fsync,
            m.per_second(m.appends) / baseline_rate
        );
    };
    row("one fsync per append", &baseline);
    for measurement in &group {
        row("group commit", measurement);
    }

    let target = group
        .iter()
        .find(|m| m.appenders == TARGET_APPENDERS)
        .or_else(|| group.iter().max_by_key(|m| m.appenders));
    if let Some(target) = target {
        let speedup = target.per_second(target.appends) / baseline_rate;
        let verdict = if speedup >= TARGET_SPEEDUP {
            "yes"
        } else {
            "NO"
        };
        println!(
            "group commit at {} appenders: {speedup:.1}x the one-fsync-per-append baseline; \
             reaches >= {TARGET_SPEEDUP:.0}x: {verdict}",
            target.appenders
        );
    }
    Ok(())
}

/// Appends from `appenders` tasks into a new log in `dir` for `duration`.
async fn measure(
    dir: &Path,
    appenders: usize,
    duration: Duration,
    fsync_per_append: bool,
    record_index: bool,
) -> Result<Measurement, Box<dyn Error>> {
    let mut config = AuditLogConfig::new(Origin::new("bench.smartsign/audit")?)
        .with_fsync_per_append(fsync_per_append);
    if record_index {
        config = config.with_record_index();
    }
    let log = Arc::new(AuditLog::open(dir, config).await?);
    let event_name = EventName::new("bench.append")?;
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..appenders)
        .map(|task| {
            let log = Arc::clone(&log);
            let event = AuditEvent::new(event_name.clone(), Actor::new(format!("bench:{task}"))?)
                .with_field("request_id", "bench-0000000000000000")
                .with_field("account_id", format!("u-{task}"))
                .with_field("hash_algorithm", "sha256");
            Ok(tokio::spawn(async move {
                let mut appends = 0u64;
                while Instant::now() < deadline {
                    log.append(event.clone().with_field("n", appends)).await?;
                    appends += 1;
                }
                Ok::<u64, AuditError>(appends)
            }))
        })
        .collect::<Result<_, AuditError>>()?;
    let mut appends = 0;
    for task in tasks {
        appends += task.await??;
    }
    let elapsed = started.elapsed();
    let fsyncs = log.stats().fsyncs;
    let log = Arc::into_inner(log).ok_or("audit log still shared after the run")?;
    log.close().await?;
    Ok(Measurement {
        appenders,
        appends,
        fsyncs,
        elapsed,
    })
}

/// "ext4 (/dev/vda)": the type and source of the mount holding `path`, from
/// /proc/self/mountinfo (the longest mount point that contains the path).
pub(crate) fn filesystem_of(path: &Path) -> String {
    let unknown = || "an unknown file system".to_owned();
    let (Ok(path), Ok(mountinfo)) = (
        fs::canonicalize(path),
        fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return unknown();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            // "id parent major:minor root mount-point options ... - type source super-options"
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?.replace("\\040", " ");
            let mut after = after.split(' ');
            let (kind, source) = (after.next()?, after.next()?);
            path.starts_with(&mount_point)
                .then(|| (mount_point.len(), format!("{kind} ({source})")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(unknown, |(_, description)| description)
}
