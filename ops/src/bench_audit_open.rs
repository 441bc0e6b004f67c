//! `smartsign-ctl bench audit-open`: how long an audit log of N records takes to open, and the
//! resident memory of a process that has opened it, then appended to it and served proofs and
//! pages of records from it. Both must stay the same whether the log holds 10^6 records or 10^7.
//!
//! The log is built in `--dir` (or topped up to `--records` when it holds fewer) and kept for the
//! next run. The measurement runs in a fresh child process (this program again, with the hidden
//! `--measure`), so that what the build allocated does not count. Progress goes to stderr, the
//! report to stdout.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use audit_log::{
    Actor, AuditEvent, AuditLog, AuditLogConfig, EventName, Origin, SoftwareSigner, TreeHash,
};

use crate::bench_audit::filesystem_of;

/// The scalar of the bench's checkpoint key: a fixed, public value, for a scratch log only.
const BENCH_KEY: [u8; 32] = [0x5b; 32];

#[derive(clap::Args, Debug)]
#[command(
    after_help = "The log takes about 300 bytes a record on disk (10^7 records: about \
    3 GB), and is kept in --dir for the next run: remove the directory when done. Put it on a \
    disk, not tmpfs. A run against a bigger log measures it as it is; each run adds --appends \
    records.\n\nExamples:\n  \
    smartsign-ctl bench audit-open --records 1000000 --dir /var/tmp/audit-1e6\n  \
    smartsign-ctl bench audit-open --records 10000000 --dir /var/tmp/audit-1e7 --appends 1000000"
)]
pub(crate) struct BenchAuditOpenArgs {
    /// Records the log must hold before the measurement; a log with fewer is topped up first
    /// (with group commit, --appenders at a time; an interrupted build resumes).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// The log directory, created when missing and kept afterwards.
    #[arg(long, default_value = "smartsign-bench-audit-open")]
    dir: PathBuf,
    /// Appends the measuring process makes after the open, sampling its memory as it goes: a
    /// large count shows whether memory stays flat while the log grows.
    #[arg(long, default_value_t = 10_000)]
    appends: u64,
    /// Inclusion proofs, consistency proofs and pages of 100 records, each, that the measuring
    /// process serves after its appends, at random places in the log.
    #[arg(long, default_value_t = 1_000)]
    proofs: u64,
    /// Concurrent appenders for the build and for the measured appends.
    #[arg(long, default_value_t = 256)]
    appenders: u64,
    /// Internal: be the measuring child process.
    #[arg(long, hide = true)]
    measure: bool,
}

/// What the measuring child reports, as one JSON line on its stdout.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measurement {
    records_at_open: u64,
    open_seconds: f64,
    records_scanned_at_open: u64,
    rss_before_open_kb: u64,
    rss_after_open_kb: u64,
    peak_after_open_kb: u64,
    hashes_after_open: u64,
    appends: u64,
    append_seconds: f64,
    /// VmRSS at each tenth of the appends.
    rss_during_appends_kb: Vec<u64>,
    proofs: u64,
    proof_seconds: f64,
    page_seconds: f64,
    rss_after_kb: u64,
    peak_after_kb: u64,
    hashes_after: u64,
    records_after: u64,
}

pub(crate) async fn run(args: BenchAuditOpenArgs) -> Result<(), Box<dyn Error>> {
    if args.appenders == 0 {
        return Err("--appenders must be at least 1".into());
    }
    if args.measure {
        let measurement = measure(&args).await?;
        println!("{}", serde_json::to_string(&measurement)?);
        return Ok(());
    }
    fs::create_dir_all(&args.dir)?;
    let dir = fs::canonicalize(&args.dir)?;
    let filesystem = filesystem_of(&dir);
    eprintln!("bench audit-open: log in {} ({filesystem})", dir.display());
    if filesystem.starts_with("tmpfs") || filesystem.starts_with("ramfs") {
        eprintln!("bench audit-open: warning: {filesystem} is memory; pass --dir on a disk");
    }
    build(&dir, args.records, args.appenders).await?;

    eprintln!("bench audit-open: measuring in a fresh process ...");
    let exe = std::env::current_exe()?;
    let child_args = [
        "bench".into(),
        "audit-open".into(),
        "--measure".into(),
        "--dir".into(),
        dir.clone().into_os_string(),
        "--appends".into(),
        args.appends.to_string().into(),
        "--proofs".into(),
        args.proofs.to_string().into(),
        "--appenders".into(),
        args.appenders.to_string().into(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        Command::new(exe)
            .args(child_args)
            .stderr(Stdio::inherit())
            .output()
    })
    .await??;
    if !output.status.success() {
        return Err(format!("the measuring process failed: {}", output.status).into());
    }
    let line = String::from_utf8(output.stdout)?;
    let m: Measurement = serde_json::from_str(line.trim())?;
    report(&m, &dir, &filesystem);
    Ok(())
}

fn config() -> Result<AuditLogConfig, Box<dyn Error>> {
    let key = SoftwareSigner::from_secret_scalar(&BENCH_KEY)?.public_key();
    Ok(AuditLogConfig::new(Origin::new("bench.smartsign/audit-open")?).with_checkpoint_key(key))
}

/// Tops the log in `dir` up to `records`, then signs a checkpoint, so that the measured open
/// checks one as the daemon's does.
async fn build(dir: &Path, records: u64, appenders: u64) -> Result<(), Box<dyn Error>> {
    eprintln!("bench audit-open: opening the log to build it ...");
    let started = Instant::now();
    let log = Arc::new(AuditLog::open(dir, config()?).await?);
    let have = log.tree_size();
    eprintln!(
        "bench audit-open: {have} records (opened in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    if have < records {
        eprintln!(
            "bench audit-open: appending {} records with {appenders} appenders ...",
            records - have
        );
        let started = Instant::now();
        append(&log, records - have, appenders, |done, total| {
            let elapsed = started.elapsed().as_secs_f64();
            let rate = done as f64 / elapsed.max(1e-9);
            let left = (total - done) as f64 / rate.max(1.0);
            eprintln!(
                "bench audit-open:   {done} of {total} ({:.0}%), {rate:.0} appends/s, \
                 about {left:.0} s left",
                100.0 * done as f64 / total as f64
            );
        })
        .await?;
    }
    if log.latest_checkpoint().map(|c| c.tree_size()) != Some(log.tree_size()) {
        log.checkpoint(&SoftwareSigner::from_secret_scalar(&BENCH_KEY)?)
            .await?;
    }
    let log = Arc::into_inner(log).ok_or("audit log still shared after the build")?;
    log.close().await?;
    Ok(())
}

/// Appends `count` records from `appenders` tasks, calling `progress(done, count)` about every
/// second.
async fn append(
    log: &Arc<AuditLog>,
    count: u64,
    appenders: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), Box<dyn Error>> {
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let name = EventName::new("bench.append")?;
    let tasks: Vec<_> = (0..appenders)
        .map(|task| {
            let (log, next, done) = (Arc::clone(log), Arc::clone(&next), Arc::clone(&done));
            let event = AuditEvent::new(name.clone(), Actor::new(format!("bench:{task}"))?)
                .with_field("request_id", "bench-0000000000000000")
                .with_field("hash_algorithm", "sha256");
            Ok(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    log.append(event.clone().with_field("n", n)).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), audit_log::AuditError>(())
            }))
        })
        .collect::<Result<_, audit_log::AuditError>>()?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let all = join_all(tasks);
    tokio::pin!(all);
    loop {
        tokio::select! {
            result = &mut all => return result,
            _ = ticker.tick() => progress(done.load(Ordering::Relaxed), count),
        }
    }
}

/// Waits for every task, returning the first error.
async fn join_all(
    tasks: Vec<tokio::task::JoinHandle<Result<(), audit_log::AuditError>>>,
) -> Result<(), Box<dyn Error>> {
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The child: open, append, prove, and report memory at each step.
async fn measure(args: &BenchAuditOpenArgs) -> Result<Measurement, Box<dyn Error>> {
    let rss_before_open_kb = memory()?.0;
    let started = Instant::now();
    let log = Arc::new(AuditLog::open(&args.dir, config()?).await?);
    let open_seconds = started.elapsed().as_secs_f64();
    let (rss_after_open_kb, peak_after_open_kb) = memory()?;
    let at_open = log.stats();
    eprintln!(
        "bench audit-open: opened {} records in {:.3} s; VmRSS {} kB",
        at_open.tree_size, open_seconds, rss_after_open_kb
    );

    let started = Instant::now();
    let mut rss_during_appends_kb = Vec::new();
    let tenth = (args.appends / 10).max(1);
    let mut appended = 0;
    while appended < args.appends {
        let chunk = tenth.min(args.appends - appended);
        append(&log, chunk, args.appenders, |_, _| {}).await?;
        appended += chunk;
        let rss = memory()?.0;
        rss_during_appends_kb.push(rss);
        eprintln!(
            "bench audit-open:   {appended} of {} appends, VmRSS {rss} kB",
            args.appends
        );
    }
    let append_seconds = started.elapsed().as_secs_f64();

    let size = log.tree_size();
    let mut random = Xorshift(0x9e37_79b9_7f4a_7c15 ^ size);
    let started = Instant::now();
    for _ in 0..args.proofs {
        let index = random.below(size);
        let root = log.root_hash(size)?;
        let leaf = log
            .leaf_hash(index)?
            .ok_or("a leaf below the size is missing")?;
        let proof = log.inclusion_proof(index, size)?;
        audit_log::verify_inclusion(&leaf, index, size, &proof, &root)?;
        let first = 1 + random.below(size);
        let proof = log.consistency_proof(first, size)?;
        let first_root: TreeHash = log.root_hash(first)?;
        audit_log::verify_consistency(first, size, &first_root, &root, &proof)?;
    }
    let proof_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..args.proofs {
        let page = log.records(random.below(size), 100).await?;
        if page.is_empty() {
            return Err("an empty page of records".into());
        }
    }
    let page_seconds = started.elapsed().as_secs_f64();
    let (rss_after_kb, peak_after_kb) = memory()?;
    let after = log.stats();
    let log = Arc::into_inner(log).ok_or("audit log still shared after the measurement")?;
    log.close().await?;
    Ok(Measurement {
        records_at_open: at_open.tree_size,
        open_seconds,
        records_scanned_at_open: at_open.records_scanned_at_open,
        rss_before_open_kb,
        rss_after_open_kb,
        peak_after_open_kb,
        hashes_after_open: at_open.hashes_in_memory,
        appends: args.appends,
        append_seconds,
        rss_during_appends_kb,
        proofs: args.proofs,
        proof_seconds,
        page_seconds,
        rss_after_kb,
        peak_after_kb,
        hashes_after: after.hashes_in_memory,
        records_after: after.tree_size,
    })
}

/// VmRSS and VmHWM (the peak) of this process, in kB, from /proc/self/status.
fn memory() -> Result<(u64, u64), Box<dyn Error>> {
    let status = fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .ok_or_else(|| format!("no {name} in /proc/self/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// xorshift64: reproducible positions without a dependency.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn report(m: &Measurement, dir: &Path, filesystem: &str) {
    let mb = |kb: u64| kb as f64 / 1024.0;
    let during = &m.rss_during_appends_kb;
    // The first tenth warms up the allocator and the queues; flatness is judged after it.
    let settled = during
        .get(1..)
        .filter(|rest| !rest.is_empty())
        .unwrap_or(during);
    let low = settled.iter().copied().min().unwrap_or(0);
    let high = settled.iter().copied().max().unwrap_or(0);
    let row = |label: String, value: String| println!("  {label:<34} {value}");
    println!(
        "audit log open: {} records in {} ({filesystem}), measured in a fresh process",
        m.records_at_open,
        dir.display()
    );
    row(
        "open".into(),
        format!(
            "{:.1} ms, {} records hashed",
            m.open_seconds * 1000.0,
            m.records_scanned_at_open
        ),
    );
    row(
        "VmRSS before open".into(),
        format!("{:.1} MB", mb(m.rss_before_open_kb)),
    );
    row(
        "VmRSS after open".into(),
        format!(
            "{:.1} MB (peak {:.1} MB), {} tree hashes in memory",
            mb(m.rss_after_open_kb),
            mb(m.peak_after_open_kb),
            m.hashes_after_open
        ),
    );
    row(
        format!("{} appends", m.appends),
        format!(
            "{:.0} appends/s; VmRSS {:.1} to {:.1} MB after the first tenth",
            m.appends as f64 / m.append_seconds.max(1e-9),
            mb(low),
            mb(high)
        ),
    );
    if m.proofs > 0 {
        row(
            format!("{} proof pairs, verified", m.proofs),
            format!(
                "{:.0} µs per inclusion + consistency proof with their roots",
                m.proof_seconds * 1e6 / m.proofs as f64
            ),
        );
        row(
            format!("{} pages of 100 records", m.proofs),
            format!("{:.0} µs per page", m.page_seconds * 1e6 / m.proofs as f64),
        );
    }
    row(
        "VmRSS at the end".into(),
        format!(
            "{:.1} MB (peak {:.1} MB), {} records, {} tree hashes in memory",
            mb(m.rss_after_kb),
            mb(m.peak_after_kb),
            m.records_after,
            m.hashes_after
        ),
    );
}
