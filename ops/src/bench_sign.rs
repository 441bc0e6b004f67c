//! `smartsign-ctl bench sign`: the whole signing flow against a `smartsignd --dev` with its state
//! on disk, for accounts drawn at random from a real population, beside raw cryptoki doing the
//! same HSM work in the same run.
//!
//! A flow is what API.md describes: the service creates a request, the gateway sends the
//! device-signed approval, the service reads the result, each over HTTPS with mutual TLS. Each
//! flow draws its account at random from the population `bench populate` made (made first if
//! it is smaller than `--accounts`), so that the daemon's wrapped-key cache hits as rarely as it
//! would with millions of users; the hit rate is printed from the daemon's metrics.
//!
//! The baseline ([`hsm_adapter::bench_flow`]) does through raw cryptoki what one flow asks of
//! the HSM: the random draws, the certificate's and the result's AES-GCM operations, the unwrap,
//! both signatures and the destroy, from as many sessions as the machine has cores.
//!
//! Closed loop (the default), `--clients` clients each run flows back to back, in rounds that
//! alternate with the baseline's (ABBA), and the ratio of the rates is the figure. Open loop
//! (`--rate R`, or `--half-load` for half the closed-loop rate just measured), flow `k` starts
//! `k / R` seconds in whatever the others do, and so does the baseline's operation `k`; the
//! percentiles of both, from when each was due, give the latency the daemon adds.
//!
//! SoftHSM reads `SOFTHSM2_CONF` when the module loads: the command makes sure the daemon runs
//! and the population exists, then runs itself again with the daemon's token in its environment
//! for the measurement.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hsm_adapter::bench_flow::{Arrivals, FlowWork};
use hsm_adapter::{Hsm, HsmConfig, KeyAlgorithm, KeyMode, SOFTHSM_MODULE, TokenSelector};
use ring::rand::SystemRandom;
use serde_json::{Value, json};

use crate::bench_accounts::{Daemon, DaemonArgs, Listed, SERVICES, device, send_patiently};
use crate::hsm_opts::read_secret;

/// Full flow at least this share of the same-work raw rate (issue 15).
const TARGET_RATIO: f64 = 0.8;
/// The daemon adds at most this much at p99 at half load (issue 15).
const TARGET_ADDED_P99: Duration = Duration::from_millis(5);
/// Length of one closed-loop round of either side.
const ROUND: Duration = Duration::from_millis(2500);
/// Open-loop flows in flight at most; past it the load generator itself is the bottleneck.
const MAX_IN_FLIGHT: usize = 4096;

/// Arguments of `bench sign`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchSignArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Accounts to draw from (made first with `bench populate`'s code when fewer exist).
    #[arg(long, default_value_t = 1000)]
    accounts: u64,
    /// Concurrent clients in the closed loop.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of measurement of each side and each mode.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Open loop at this many flows per second (and the baseline at the same rate), after the
    /// closed loop.
    #[arg(long, conflicts_with = "half_load")]
    rate: Option<f64>,
    /// Open loop at half the full-flow rate the closed loop measured.
    #[arg(long)]
    half_load: bool,
}

/// Runs the benchmark.
pub(crate) fn run(args: BenchSignArgs) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if std::env::var_os("SMARTSIGN_BENCH_MEASURE").is_some() {
        return runtime.block_on(measure(&args));
    }
    let daemon = Daemon::ensure(&args.daemon)?;
    runtime.block_on(async {
        let made = crate::bench_populate::populate(&daemon, args.accounts, 32).await?;
        if made.made > 0 {
            eprintln!(
                "made {} accounts in {:.1} s ({:.0}/s)",
                made.made,
                made.elapsed.as_secs_f64(),
                made.made as f64 / made.elapsed.as_secs_f64()
            );
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    // The child finds the daemon by its state directory, whatever chose it here.
    let mut child_args = strip_state_args(std::env::args_os().skip(1).collect());
    child_args.extend(["--state-dir".into(), daemon.state.clone().into_os_string()]);
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(child_args)
        .env("SOFTHSM2_CONF", daemon.state.join("hsm/softhsm2.conf"))
        .env("SMARTSIGN_BENCH_MEASURE", "1")
        .status()?;
    drop(daemon);
    if status.success() {
        Ok(())
    } else {
        Err(format!("the measurement failed ({status})").into())
    }
}

/// The arguments without `--state-dir X`, `--state-dir=X` and `--tmpfs`.
fn strip_state_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for arg in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        match arg.to_str() {
            Some("--state-dir") => skip_next = true,
            Some(text) if text.starts_with("--state-dir=") || text == "--tmpfs" => {}
            _ => out.push(arg),
        }
    }
    out
}

async fn measure(args: &BenchSignArgs) -> Result<(), Box<dyn std::error::Error>> {
    let daemon = Daemon::ensure(&args.daemon)?;
    let state = daemon.state.clone();
    let config: toml::Table = std::fs::read_to_string(state.join("smartsignd.toml"))?.parse()?;
    let algorithm: KeyAlgorithm = config["policy"]["key_algorithm"]
        .as_str()
        .unwrap_or("ec-p256")
        .parse()
        .map_err(|_| "unknown key algorithm in smartsignd.toml")?;
    if config["hsm"]["key_mode"].as_str() == Some("resident") {
        return Err("bench sign measures wrapped keys (the production mode)".into());
    }
    let cores = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    let seconds = Duration::from_secs(args.seconds);
    let population: Vec<Listed> = daemon
        .populated()?
        .into_iter()
        .filter(|(i, _)| *i < args.accounts)
        .collect();
    if population.is_empty() {
        return Err("no accounts to sign for".into());
    }
    let raw = RawSide::open(&state, algorithm).await?;
    let flows = FlowSide::new(&daemon, population)?;
    eprintln!(
        "{} accounts; measuring {} s each of the same-work raw baseline ({cores} sessions) and \
         the full flow ({} clients), in alternating rounds",
        flows.accounts.len(),
        args.seconds,
        args.clients
    );
    flows.closed(args.clients, Duration::from_secs(1)).await;
    let before = cache_counts(&daemon).await?;
    let rounds = (seconds.as_nanos() / ROUND.as_nanos()).max(1) as u32;
    let round = seconds / rounds;
    let mut raw_work = FlowWork::default();
    let mut flow = Measured::default();
    for i in 0..rounds * 2 {
        if i % 4 == 0 || i % 4 == 3 {
            raw_work.add(raw.run(cores, round, Arrivals::Closed).await?);
        } else {
            flow.add(flows.closed(args.clients, round).await);
        }
    }
    let after = cache_counts(&daemon).await?;
    let [
        hits,
        misses,
        status_hits,
        status_misses,
        ocsp_requests,
        crl_fetches,
    ] = std::array::from_fn(|i| after[i] - before[i]);
    let raw_rate = raw_work.per_second();
    let flow_rate = flow.per_second();
    let ratio = flow_rate / raw_rate;
    println!(
        "key {algorithm:?} wrapped; {} accounts; state on {}",
        flows.accounts.len(),
        file_system(&state)
    );
    println!(
        "closed loop, {} clients, {} s a side:",
        args.clients, args.seconds
    );
    println!("  raw same-work ops/s ({cores} sessions)   {raw_rate:>10.1}");
    println!("  full flow signatures/s               {flow_rate:>10.1}");
    println!("  ratio to raw                         {ratio:>10.3}  (target >= {TARGET_RATIO})");
    println!(
        "  flow latency p50 / p99 / p99.9 (ms)   {}",
        flow.percentiles()
    );
    println!(
        "  flows completed / failed / 429 waits {:>10} / {} / {}",
        flow.latencies.len(),
        flow.failed,
        flows.limited.load(Ordering::Relaxed)
    );
    let signatures = hits + misses;
    println!(
        "  wrapped-key cache: {hits:.0} hits, {misses:.0} misses ({:.1}% of signatures hit; \
         {:.2} unwraps per flow)",
        100.0 * hits / signatures.max(1.0),
        misses / (flow.latencies.len().max(1) as f64)
    );
    println!(
        "  certificate status: {:.1}% of checks from the OCSP cache; {ocsp_requests:.0} OCSP \
         requests, {crl_fetches:.0} CRL fetches",
        100.0 * status_hits / (status_hits + status_misses).max(1.0)
    );
    println!(
        "  full flow >= {TARGET_RATIO} of raw: {}",
        if ratio >= TARGET_RATIO { "yes" } else { "NO" }
    );
    let rate = match (args.rate, args.half_load) {
        (Some(rate), _) => Some(rate),
        (None, true) => Some(flow_rate / 2.0),
        (None, false) => None,
    };
    if let Some(rate) = rate {
        eprintln!("open loop at {rate:.1}/s for {} s each side", args.seconds);
        let open_flow = flows.open(rate, seconds).await;
        let open_raw = raw.run(cores, seconds, Arrivals::Open { rate }).await?;
        let mut raw_measured = Measured {
            latencies: open_raw.latencies.clone(),
            ..Measured::default()
        };
        let mut flow_measured = open_flow;
        println!(
            "open loop at {rate:.1}/s ({:.0}% of the closed-loop rate):",
            100.0 * rate / flow_rate
        );
        println!(
            "  full flow p50 / p99 / p99.9 (ms)     {}",
            flow_measured.percentiles()
        );
        println!(
            "  HSM work alone p50 / p99 / p99.9     {}",
            raw_measured.percentiles()
        );
        let mut added = |p: f64| {
            flow_measured
                .percentile(p)
                .saturating_sub(raw_measured.percentile(p))
        };
        let added_p99 = added(0.99);
        println!(
            "  added by the daemon p50 / p99 / p99.9 {:.2} / {:.2} / {:.2}",
            ms(added(0.50)),
            ms(added_p99),
            ms(added(0.999))
        );
        println!(
            "  flows completed / failed              {} / {}",
            flow_measured.latencies.len(),
            flow_measured.failed
        );
        println!(
            "  daemon adds < {} ms at p99: {}",
            TARGET_ADDED_P99.as_millis(),
            if added_p99 < TARGET_ADDED_P99 {
                "yes"
            } else {
                "NO"
            }
        );
    }
    raw.close().await?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The file system type of `path` (from /proc/mounts: the longest mount point above it).
fn file_system(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max()
        .map_or_else(|| "an unknown file system".into(), |(_, kind)| kind)
}

/// The daemon's cache counters: the wrapped-key cache's hits and misses, and the certificate
/// status cache's.
async fn cache_counts(daemon: &Daemon) -> Result<[f64; 6], Box<dyn std::error::Error>> {
    let mut counts = [0.0; 6];
    for (count, series) in counts.iter_mut().zip([
        "smartsign_hsm_key_cache_total{result=\"hit\"}",
        "smartsign_hsm_key_cache_total{result=\"miss\"}",
        "smartsign_status_cache_total{result=\"hit\"}",
        "smartsign_status_cache_total{result=\"miss\"}",
        "smartsign_ca_request_duration_seconds_count{kind=\"ocsp\"}",
        "smartsign_ca_request_duration_seconds_count{kind=\"crl\"}",
    ]) {
        *count = daemon.metric(series).await?;
    }
    Ok(counts)
}

/// The raw baseline: a wrapped key of the daemon's algorithm on the daemon's own token.
struct RawSide {
    config: HsmConfig,
    key: hsm_adapter::UserKeyRef,
}

impl RawSide {
    async fn open(
        state: &Path,
        algorithm: KeyAlgorithm,
    ) -> Result<RawSide, Box<dyn std::error::Error>> {
        let config = HsmConfig::new(
            SOFTHSM_MODULE,
            TokenSelector::Label("smartsign-dev".into()),
            read_secret(&state.join("hsm/user.pin"))?,
        )
        .with_workers(NonZeroUsize::MIN);
        let hsm = Hsm::open(config.clone()).await?;
        let key = hsm.generate_user_key(algorithm, KeyMode::Wrapped).await;
        hsm.shutdown().await;
        Ok(RawSide { config, key: key? })
    }

    async fn run(
        &self,
        threads: NonZeroUsize,
        duration: Duration,
        arrivals: Arrivals,
    ) -> Result<FlowWork, hsm_adapter::HsmError> {
        hsm_adapter::bench_flow::run(&self.config, &self.key, threads, duration, arrivals).await
    }

    /// A wrapped key leaves nothing on the token; nothing to destroy but the handle's session.
    async fn close(self) -> Result<(), hsm_adapter::HsmError> {
        let hsm = Hsm::open(self.config).await?;
        let destroyed = hsm.destroy_user_key(&self.key).await;
        hsm.shutdown().await;
        destroyed
    }
}

/// Flows measured: their latencies, failures and the time they took.
#[derive(Default)]
pub(crate) struct Measured {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) failed: u64,
    elapsed: Duration,
}

impl Measured {
    pub(crate) fn add(&mut self, mut other: Measured) {
        self.latencies.append(&mut other.latencies);
        self.failed += other.failed;
        self.elapsed += other.elapsed;
    }

    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The `p` quantile (nearest rank).
    pub(crate) fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let rank = ((p * self.latencies.len() as f64).ceil() as usize).max(1);
        self.latencies
            .get(rank.min(self.latencies.len()) - 1)
            .copied()
            .unwrap_or_default()
    }

    pub(crate) fn percentiles(&mut self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            ms(self.percentile(0.50)),
            ms(self.percentile(0.99)),
            ms(self.percentile(0.999))
        )
    }
}

/// The parties of the flow and the population they sign for.
pub(crate) struct FlowSide {
    /// A client of each of [`SERVICES`]; flows alternate between them.
    services: [reqwest::Client; 2],
    gateway: reqwest::Client,
    api: String,
    accounts: Vec<Listed>,
    limited: AtomicU64,
    draws: AtomicU64,
}

impl FlowSide {
    pub(crate) fn new(
        daemon: &Daemon,
        accounts: Vec<Listed>,
    ) -> Result<Arc<FlowSide>, Box<dyn std::error::Error>> {
        Self::at(daemon, accounts, &daemon.api)
    }

    /// The flow against the API at `api` (a node that shares `daemon`'s TLS clients).
    pub(crate) fn at(
        daemon: &Daemon,
        accounts: Vec<Listed>,
        api: &str,
    ) -> Result<Arc<FlowSide>, Box<dyn std::error::Error>> {
        Ok(Arc::new(FlowSide {
            services: [daemon.client(SERVICES[0])?, daemon.client(SERVICES[1])?],
            gateway: daemon.client("gateway")?,
            api: api.to_owned(),
            accounts,
            limited: AtomicU64::new(0),
            draws: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
            ),
        }))
    }

    /// An account at random, and a service at random (SplitMix64 over a shared counter:
    /// uniform enough, and lock-free).
    fn draw(&self) -> (&Listed, usize) {
        let mut z = self
            .draws
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let account = &self.accounts[((z >> 1) % self.accounts.len() as u64) as usize];
        (account, (z & 1) as usize)
    }

    /// `clients` clients each run flows back to back for `duration`; flows that end after it
    /// are not counted.
    pub(crate) async fn closed(self: &Arc<Self>, clients: usize, duration: Duration) -> Measured {
        let end = Instant::now() + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients.max(1) {
            let side = Arc::clone(self);
            tasks.spawn(async move {
                let mut measured = Measured::default();
                while Instant::now() < end {
                    match side.prepared_flow().await {
                        Some(flow) => {
                            let began = Instant::now();
                            match flow.await {
                                Ok(()) if Instant::now() <= end => {
                                    measured.latencies.push(began.elapsed());
                                }
                                Ok(()) => {}
                                Err(_) => measured.failed += 1,
                            }
                        }
                        None => measured.failed += 1,
                    }
                }
                measured
            });
        }
        let mut measured = Measured::default();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(client) => measured.add(client),
                Err(_) => measured.failed += 1,
            }
        }
        measured.elapsed = duration;
        measured
    }

    /// Flow `k` starts `k / rate` seconds in, for `duration`; each latency counts from when
    /// its flow was due.
    pub(crate) async fn open(self: &Arc<Self>, rate: f64, duration: Duration) -> Measured {
        let start = tokio::time::Instant::now();
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        let mut k = 0u64;
        loop {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if due >= start + duration {
                break;
            }
            k += 1;
            tokio::time::sleep_until(due).await;
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let side = Arc::clone(self);
            tasks.spawn(async move {
                let _permit = permit;
                match side.prepared_flow().await {
                    Some(flow) => flow.await.map(|()| due.elapsed()).ok(),
                    None => None,
                }
            });
        }
        let mut measured = Measured {
            elapsed: duration,
            ..Measured::default()
        };
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Some(latency)) => measured.latencies.push(latency),
                _ => measured.failed += 1,
            }
        }
        measured
    }

    /// Draws an account and makes its device key (not timed); the flow itself, to be timed.
    async fn prepared_flow(
        self: &Arc<Self>,
    ) -> Option<impl Future<Output = Result<(), FlowError>> + use<>> {
        let ((index, taids), service) = self.draw();
        let (index, taid) = (*index, taids[service].clone());
        let (key, _) = device(index).ok()?;
        let side = Arc::clone(self);
        Some(async move { side.one_flow(service, &taid, &key).await })
    }

    async fn one_flow(
        &self,
        service: usize,
        taid: &str,
        key: &ring::signature::EcdsaKeyPair,
    ) -> Result<(), FlowError> {
        let client = &self.services[service];
        use sha2::Digest;
        let hash = sha2::Sha256::digest(self.draws.load(Ordering::Relaxed).to_be_bytes());
        let api = &self.api;
        let created: Value = send_patiently(
            client
                .post(format!("{api}/v1/signing-requests"))
                .json(&json!({"taid": taid, "hash_algorithm": "sha256",
                              "hash": STANDARD.encode(hash)})),
            &self.limited,
        )
        .await?
        .error_for_status()?
        .json()
        .await?;
        let id = created["request_id"].as_str().ok_or("no request id")?;
        let code = created["identification_code"].as_str().ok_or("no code")?;
        let statement = format!(
            "smartsign-authorise-v1\n{id}\n{code}\nsha256\n{}\napprove",
            hex::encode(hash)
        );
        let signature = key
            .sign(&SystemRandom::new(), statement.as_bytes())
            .map_err(|_| "device signing failed")?;
        send_patiently(
            self.gateway
                .post(format!("{api}/v1/signing-requests/{id}/authorisation"))
                .json(&json!({"decision": "approve",
                              "device_signature": STANDARD.encode(signature.as_ref())})),
            &self.limited,
        )
        .await?
        .error_for_status()?;
        let result: Value = send_patiently(
            client.get(format!("{api}/v1/signing-requests/{id}")),
            &self.limited,
        )
        .await?
        .error_for_status()?
        .json()
        .await?;
        if result["status"] != "signed" {
            return Err("not signed".into());
        }
        Ok(())
    }
}

type FlowError = Box<dyn std::error::Error + Send + Sync>;
