//! `smartsign-ctl bench hsm`: signatures per second through raw cryptoki and through the HSM
//! adapter's async API, for each key algorithm, key mode and thread count, in the same run.
//!
//! The target is that the adapter reaches at least 0.95 of the raw throughput: its queue,
//! worker threads and replies must cost next to nothing beside the HSM's own work. How both are
//! measured is described in `hsm_adapter::bench`.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use hsm_adapter::bench::{self, Comparison, LoadScheduling, Placement};
use hsm_adapter::{
    Hsm, HsmConfig, HsmError, KeyAlgorithm, KeyMode, SOFTHSM_MODULE, SystemKey, TokenSelector,
    UserKeyRef,
};

use crate::hsm_opts::read_secret;

/// The ratio of adapter to raw throughput the adapter must reach.
const TARGET_RATIO: f64 = 0.95;

/// Arguments of `bench hsm`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchHsmArgs {
    /// The PKCS#11 module.
    #[arg(long, default_value = SOFTHSM_MODULE)]
    pub(crate) module: PathBuf,
    /// Label of the token to measure on (it must exist). Without it, a scratch SoftHSM token is
    /// made for the run.
    #[arg(long)]
    pub(crate) token: Option<String>,
    /// File holding the user PIN (its first line).
    #[arg(long)]
    pub(crate) pin_file: Option<PathBuf>,
    /// File holding the security officer's PIN, used to create the key-encryption key (and the
    /// other system keys) if the token lacks them.
    #[arg(long)]
    pub(crate) so_pin_file: Option<PathBuf>,
    /// Seconds of measurement per case, for each of raw cryptoki and the adapter. They are
    /// spent in blocks of four quarter-second rounds (raw, adapter, adapter, raw): five seconds
    /// make ten blocks.
    #[arg(long, default_value_t = 5)]
    pub(crate) seconds: u64,
    /// Key algorithms to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ec-p256,ec-p384,rsa-2048,rsa-3072",
        value_parser = parse_algorithm
    )]
    pub(crate) algorithms: Vec<KeyAlgorithm>,
    /// Key modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "wrapped,resident", value_parser = parse_mode)]
    pub(crate) modes: Vec<KeyMode>,
    /// Numbers of threads (raw sessions, adapter workers) to measure with.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) threads: Vec<NonZeroUsize>,
    /// Scheduling policy of the thread that sends the adapter its requests. `batch`
    /// (SCHED_BATCH): its fair share of the CPU, but its wake-ups do not preempt a busy worker.
    /// `normal`: the default policy, under which, with as many workers as cores, each wake-up
    /// preempts a worker, often while it holds a lock inside a software HSM.
    #[arg(long, default_value = "batch", value_parser = parse_load)]
    pub(crate) load_scheduling: LoadScheduling,
    /// Pin raw thread i and adapter worker i to the same CPU (the i-th this process may use,
    /// round robin), so that both sides run on the same cores and no thread loses its caches to
    /// a move. `--pin false` lets them float.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) pin: bool,
}

fn parse_load(name: &str) -> Result<LoadScheduling, String> {
    match name {
        "batch" => Ok(LoadScheduling::Batch),
        "normal" => Ok(LoadScheduling::Normal),
        _ => Err(format!(
            "unknown scheduling {name:?} (expected batch or normal)"
        )),
    }
}

fn parse_algorithm(name: &str) -> Result<KeyAlgorithm, String> {
    name.parse().map_err(|_| {
        format!("unknown algorithm {name:?} (expected ec-p256, ec-p384, rsa-2048 or rsa-3072)")
    })
}

fn parse_mode(name: &str) -> Result<KeyMode, String> {
    name.parse()
        .map_err(|_| format!("unknown key mode {name:?} (expected wrapped or resident)"))
}

/// One line of the table.
struct Row {
    algorithm: KeyAlgorithm,
    mode: KeyMode,
    threads: NonZeroUsize,
    result: Comparison,
}

/// Runs the benchmark and prints the table on stdout (progress on stderr).
pub(crate) async fn run(args: BenchHsmArgs) -> Result<(), Box<dyn std::error::Error>> {
    let token = args
        .token
        .clone()
        .ok_or("bench hsm: name the token with --token")?;
    let pin_file = args
        .pin_file
        .as_ref()
        .ok_or("bench hsm: give the user PIN with --pin-file")?;
    if args.seconds == 0 {
        return Err("bench hsm: --seconds must be at least 1".into());
    }
    let duration = Duration::from_secs(args.seconds);
    let config = HsmConfig::new(
        &args.module,
        TokenSelector::Label(token),
        read_secret(pin_file)?,
    );

    eprintln!(
        "opening token with {} in {}",
        config.token(),
        args.module.display()
    );
    // Keys are made first and the token closed again, so that no idle sessions of this setup
    // stand by while the rounds measure (on SoftHSM they slow whoever is measured).
    let hsm = Hsm::open(config.clone()).await?;
    if let Some(so_pin_file) = &args.so_pin_file {
        let report = hsm
            .provision_system_keys(&read_secret(so_pin_file)?)
            .await?;
        if !report.created.is_empty() {
            let created: Vec<&str> = report.created.iter().map(|k| k.label()).collect();
            eprintln!("created system keys: {}", created.join(", "));
        }
    }
    let mut keys = Vec::new();
    let generated = generate(&hsm, &args.algorithms, &args.modes, &mut keys).await;
    if generated.is_err() {
        destroy(&hsm, &keys).await?;
    }
    hsm.shutdown().await;
    generated?;

    let placement = Placement {
        load: args.load_scheduling,
        cpus: if args.pin {
            hsm_adapter::allowed_cpus()?
        } else {
            Vec::new()
        },
    };
    let mut rows = Vec::new();
    let measured = measure(
        &config,
        &keys,
        &args.threads,
        duration,
        &placement,
        &mut rows,
    )
    .await;

    let hsm = Hsm::open(config).await?;
    destroy(&hsm, &keys).await?;
    hsm.shutdown().await;
    measured?;

    print_table(&rows);
    Ok(())
}

/// Generates a key for every algorithm and mode.
async fn generate(
    hsm: &Hsm,
    algorithms: &[KeyAlgorithm],
    modes: &[KeyMode],
    keys: &mut Vec<UserKeyRef>,
) -> Result<(), Box<dyn std::error::Error>> {
    for &algorithm in algorithms {
        for &mode in modes {
            eprintln!("generating a {algorithm} {mode} key");
            match hsm.generate_user_key(algorithm, mode).await {
                Ok(key) => keys.push(key),
                Err(HsmError::SystemKeyMissing(SystemKey::Kek)) => {
                    return Err(
                        "the token has no key-encryption key: pass --so-pin-file, or \
                                run `smartsign-ctl keys init` first"
                            .into(),
                    );
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
    Ok(())
}

/// Destroys the benchmark's keys: a resident key would otherwise stay on the token (a wrapped
/// one lives only in `keys`).
async fn destroy(hsm: &Hsm, keys: &[UserKeyRef]) -> Result<(), HsmError> {
    for key in keys {
        hsm.destroy_user_key(key).await?;
    }
    Ok(())
}

/// Measures every key with every thread count.
async fn measure(
    config: &HsmConfig,
    keys: &[UserKeyRef],
    threads: &[NonZeroUsize],
    duration: Duration,
    placement: &Placement,
    rows: &mut Vec<Row>,
) -> Result<(), HsmError> {
    for key in keys {
        for &threads in threads {
            let (algorithm, mode) = (key.algorithm(), key.mode());
            eprintln!(
                "measuring {algorithm} {mode} with {threads} thread(s): {}s raw, {}s adapter",
                duration.as_secs(),
                duration.as_secs()
            );
            let result = bench::compare(config, key, threads, duration, placement).await?;
            rows.push(Row {
                algorithm,
                mode,
                threads,
                result,
            });
        }
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<10} {:<9} {:>7} {:>12} {:>14} {:>8} {:>8}",
        "algorithm", "mode", "threads", "raw ops/s", "adapter ops/s", "overall", "ratio"
    );
    for row in rows {
        println!(
            "{:<10} {:<9} {:>7} {:>12.0} {:>14.0} {:>8.3} {:>8.3}",
            row.algorithm.to_string(),
            row.mode.to_string(),
            row.threads,
            row.result.raw.per_second(),
            row.result.adapter.per_second(),
            row.result.overall_ratio(),
            row.result.ratio()
        );
    }
    println!(
        "overall: adapter over raw for the whole run; ratio: the median of that ratio over the \
         blocks of four rounds (raw, adapter, adapter, raw)"
    );
    let below: Vec<&Row> = rows
        .iter()
        .filter(|r| r.result.ratio() < TARGET_RATIO)
        .collect();
    if below.is_empty() {
        println!("every ratio >= {TARGET_RATIO}: yes");
    } else {
        println!(
            "every ratio >= {TARGET_RATIO}: no ({} of {} below)",
            below.len(),
            rows.len()
        );
    }
}
