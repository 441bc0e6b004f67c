//! `smartsign-ctl bench sign`: the whole signing flow under load, beside the raw HSM rate.
//!
//! N clients each own an "iAM Smart+" account and loop through the flow of API.md as the real
//! parties do: the service creates a request, the gateway sends the device-signed approval, the
//! service fetches the result. Every step goes over HTTPS with mutual TLS to a `smartsignd --dev`.
//! Before the load, the raw cryptoki rate of the same key algorithm and mode (one unwrap, sign
//! and destroy per signature in wrapped mode) is measured on the daemon's own token with as many
//! sessions as the machine has cores, in the same run, so that the ratio does not depend on how
//! busy this machine happens to be.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hsm_adapter::bench::Throughput;
use hsm_adapter::{
    Hsm, HsmConfig, HsmError, KeyAlgorithm, KeyMode, SOFTHSM_MODULE, TokenSelector, UserKeyRef,
};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::hsm_opts::read_secret;

/// The target of the issue: full-flow throughput at least this share of the raw wrapped rate.
const TARGET_RATIO: f64 = 0.5;

/// Arguments of `bench sign`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchSignArgs {
    /// State directory of a running `smartsignd --dev`. Without it, one is started in a
    /// temporary directory (on tmpfs when there is one) and stopped after.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Concurrent clients, each with its own account.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of measurement (after a short warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Key algorithm of the daemon started here (ignored with --state-dir).
    #[arg(long, default_value = "ec-p256")]
    key_algorithm: String,
    /// Key mode of the daemon started here (ignored with --state-dir).
    #[arg(long, default_value = "wrapped")]
    key_mode: String,
}

struct Daemon {
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    state: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

fn start_daemon(args: &BenchSignArgs) -> Result<Daemon, Box<dyn std::error::Error>> {
    if let Some(state) = &args.state_dir {
        return Ok(Daemon {
            child: None,
            _dir: None,
            state: state.clone(),
        });
    }
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("smartsign-bench-sign-")
            .tempdir_in("/dev/shm")?
    } else {
        tempfile::Builder::new()
            .prefix("smartsign-bench-sign-")
            .tempdir()?
    };
    let state = dir.path().join("state");
    let daemon_binary = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("smartsignd"))
        .filter(|path| path.is_file())
        .ok_or("smartsignd is not beside smartsign-ctl; build it, or pass --state-dir")?;
    eprintln!("starting smartsignd --dev in {}", state.display());
    let child = Command::new(daemon_binary)
        .args([
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--ca-listen",
            "127.0.0.1:0",
            "--key-algorithm",
            &args.key_algorithm,
        ])
        .args(["--key-mode", &args.key_mode])
        .arg("--state-dir")
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("smartsignd.log"))?)
        .spawn()?;
    let daemon = Daemon {
        child: Some(child),
        _dir: Some(dir),
        state,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !daemon.state.join("endpoints.json").is_file() {
        if Instant::now() > deadline {
            return Err("smartsignd did not start within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(daemon)
}

/// Runs the benchmark. Re-runs itself with `SOFTHSM2_CONF` of the daemon's token so that the raw
/// baseline measures the same token.
pub(crate) fn run(args: BenchSignArgs) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(state) = std::env::var_os("SMARTSIGN_BENCH_STATE") {
        return measure(&args, Path::new(&state));
    }
    let daemon = start_daemon(&args)?;
    let state = std::fs::canonicalize(&daemon.state)?;
    let status = Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", state.join("hsm/softhsm2.conf"))
        .env("SMARTSIGN_BENCH_STATE", &state)
        .status()?;
    drop(daemon);
    if status.success() {
        Ok(())
    } else {
        Err(format!("the benchmark failed ({status})").into())
    }
}

fn measure(args: &BenchSignArgs, state: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let config: toml::Table = std::fs::read_to_string(state.join("smartsignd.toml"))?.parse()?;
    let algorithm: KeyAlgorithm = config["policy"]["key_algorithm"]
        .as_str()
        .unwrap_or("ec-p256")
        .parse()
        .map_err(|_| "unknown key algorithm in smartsignd.toml")?;
    let mode = match config["hsm"]["key_mode"].as_str() {
        Some("resident") => KeyMode::Resident,
        _ => KeyMode::Wrapped,
    };
    let endpoints: Value = serde_json::from_slice(&std::fs::read(state.join("endpoints.json"))?)?;
    let api = endpoints["api"]
        .as_str()
        .ok_or("endpoints.json has no api")?;
    let cores = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    let duration = Duration::from_secs(args.seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let raw = RawSide::open(state, algorithm, mode, cores).await?;
        let flow = FlowSide::open(state, api, args.clients).await?;
        eprintln!(
            "measuring {} s each of raw cryptoki signing ({algorithm:?}, {mode:?}, {cores} \
             sessions) and the full flow ({} clients), in alternating rounds",
            args.seconds, args.clients
        );
        // A short warm-up fills the connection pools and the daemon's key cache.
        flow.run(Duration::from_secs(1)).await;
        // Rounds in the order ABBA ABBA ...: a machine whose speed drifts (a shared VM does)
        // slows both sides alike, and a linear drift cancels out.
        let rounds = (duration.as_nanos() / ROUND.as_nanos()).max(1) as u32;
        let round = duration / rounds;
        let mut raw_ops = 0u64;
        let mut raw_time = Duration::ZERO;
        let mut flows = FlowRound::default();
        for i in 0..rounds * 2 {
            if i % 4 == 0 || i % 4 == 3 {
                let measured = raw.run(round).await?;
                raw_ops += measured.operations;
                raw_time += measured.elapsed;
            } else {
                flows.add(flow.run(round).await);
            }
        }
        raw.close().await?;
        let raw = raw_ops as f64 / raw_time.as_secs_f64();
        let per_second = flows.latencies.len() as f64 / flows.elapsed.as_secs_f64();
        let (p50, p99) = (flows.percentile(0.50), flows.percentile(0.99));
        let ratio = per_second / raw;
        println!(
            "key: {algorithm:?} {mode:?}; {} clients; {} s",
            args.clients, args.seconds
        );
        println!("raw HSM signatures/s ({cores} sessions)    {raw:>10.0}");
        println!("full flow signatures/s                 {per_second:>10.0}");
        println!("full flow latency p50 / p99 (ms)       {p50:>10.1} / {p99:.1}");
        println!(
            "flows completed / failed               {:>10} / {}",
            flows.latencies.len(),
            flows.failed
        );
        println!("ratio to raw                           {ratio:>10.3}");
        println!(
            "full flow >= {TARGET_RATIO} of raw: {}",
            if ratio >= TARGET_RATIO { "yes" } else { "no" }
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// Length of one measuring round of either side.
const ROUND: Duration = Duration::from_millis(2500);

/// The raw baseline: a key of the daemon's algorithm and mode on the daemon's own token. The
/// adapter that makes the key is closed again, so that no idle session of this set-up stands by
/// while either side measures.
struct RawSide {
    config: HsmConfig,
    key: UserKeyRef,
    threads: NonZeroUsize,
}

impl RawSide {
    async fn open(
        state: &Path,
        algorithm: KeyAlgorithm,
        mode: KeyMode,
        threads: NonZeroUsize,
    ) -> Result<RawSide, Box<dyn std::error::Error>> {
        let config = HsmConfig::new(
            SOFTHSM_MODULE,
            TokenSelector::Label("smartsign-dev".into()),
            read_secret(&state.join("hsm/user.pin"))?,
        )
        .with_workers(NonZeroUsize::MIN);
        let hsm = Hsm::open(config.clone()).await?;
        let key = hsm.generate_user_key(algorithm, mode).await;
        hsm.shutdown().await;
        Ok(RawSide {
            config,
            key: key?,
            threads,
        })
    }

    async fn run(&self, duration: Duration) -> Result<Throughput, HsmError> {
        hsm_adapter::bench::raw(&self.config, &self.key, self.threads, duration, &[]).await
    }

    /// Destroys the key (a resident one would otherwise stay on the token).
    async fn close(self) -> Result<(), HsmError> {
        let hsm = Hsm::open(self.config).await?;
        let destroyed = hsm.destroy_user_key(&self.key).await;
        hsm.shutdown().await;
        destroyed
    }
}

/// What the flow's rounds measured.
#[derive(Default)]
struct FlowRound {
    latencies: Vec<Duration>,
    failed: u64,
    elapsed: Duration,
}

impl FlowRound {
    fn add(&mut self, mut other: FlowRound) {
        self.latencies.append(&mut other.latencies);
        self.failed += other.failed;
        self.elapsed += other.elapsed;
    }

    fn percentile(&mut self, p: f64) -> f64 {
        self.latencies.sort();
        let index = ((self.latencies.len() as f64 * p) as usize)
            .min(self.latencies.len().saturating_sub(1));
        self.latencies
            .get(index)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    }
}

struct Party {
    service: reqwest::Client,
    gateway: reqwest::Client,
    api: String,
}

fn client(state: &Path, name: &str) -> Result<reqwest::Client, Box<dyn std::error::Error>> {
    let mut identity = std::fs::read(state.join(format!("clients/{name}.pem")))?;
    identity.extend(std::fs::read(state.join(format!("clients/{name}.key")))?);
    let ca = std::fs::read(state.join("tls/ca.pem"))?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .identity(reqwest::Identity::from_pem(&identity)?)
        .pool_max_idle_per_host(256)
        .build()?)
}

/// A valid HKIC number of its own for the `i`-th bench account (one account per person):
/// the letter A, six digits, and the check digit.
fn hkic_number(i: usize) -> String {
    let digits = format!("{:06}", i % 1_000_000);
    // Weights 8..2 over A (10), then the six digits; a leading space counts 36 at weight 9.
    let sum: u32 = 36 * 9
        + 10 * 8
        + digits
            .bytes()
            .zip((2..=7).rev())
            .map(|(d, w)| u32::from(d - b'0') * w)
            .sum::<u32>();
    let check = match 11 - sum % 11 {
        11 => '0',
        10 => 'A',
        n => char::from_digit(n, 10).unwrap_or('0'),
    };
    format!("A{digits}{check}")
}

/// The clients of the full flow: one account (TAID and device key) each, and the parties.
struct FlowSide {
    party: Arc<Party>,
    accounts: Vec<Arc<(String, EcdsaKeyPair)>>,
}

impl FlowSide {
    /// Registers one "iAM Smart+" account per client.
    async fn open(
        state: &Path,
        api: &str,
        clients: usize,
    ) -> Result<FlowSide, Box<dyn std::error::Error>> {
        let registrar = client(state, "registrar")?;
        let party = Arc::new(Party {
            service: client(state, "demo-a")?,
            gateway: client(state, "gateway")?,
            api: api.to_owned(),
        });
        let run_id = std::process::id();
        eprintln!("registering {clients} accounts");
        let mut accounts = Vec::new();
        let rng = SystemRandom::new();
        for i in 0..clients {
            // The phones sign with ring: they run on this machine too, and the faster they
            // sign, the more of the machine is left to the daemon being measured.
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                .map_err(|_| "cannot make a device key")?;
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                    .map_err(|_| "cannot load a device key")?;
            let device_public_key = p256::PublicKey::from_sec1_bytes(key.public_key().as_ref())?
                .to_public_key_pem(LineEnding::LF)?;
            let id = format!("bench-{run_id}-{i}");
            let response = registrar
                .post(format!("{api}/v1/accounts"))
                .json(&json!({
                    "account_id": id, "tier": "iam_smart_plus", "surname": "BENCH",
                    "date_of_birth": "1980-01-01", "hkic_number": hkic_number(i),
                    "device_public_key": device_public_key,
                }))
                .send()
                .await?;
            if response.status() != 201 {
                return Err(format!("registration failed: {}", response.text().await?).into());
            }
            let taid: Value = registrar
                .get(format!("{api}/v1/accounts/{id}/taid?service=demo-a"))
                .send()
                .await?
                .json()
                .await?;
            let taid = taid["taid"].as_str().ok_or("no taid")?.to_owned();
            accounts.push(Arc::new((taid, key)));
        }
        Ok(FlowSide { party, accounts })
    }

    /// Every client loops through the flow for `duration`; flows that end after it are not
    /// counted (their work is in the next round's time, of whichever side).
    async fn run(&self, duration: Duration) -> FlowRound {
        let start = Instant::now();
        let end = start + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for account in &self.accounts {
            let (party, account) = (self.party.clone(), account.clone());
            tasks.spawn(async move {
                let (taid, key) = &*account;
                let mut round = FlowRound::default();
                let mut counter = 0u64;
                while Instant::now() < end {
                    counter += 1;
                    let began = Instant::now();
                    match one_flow(&party, taid, key, counter).await {
                        Ok(()) if Instant::now() <= end => round.latencies.push(began.elapsed()),
                        Ok(()) => {}
                        Err(_) => round.failed += 1,
                    }
                }
                round
            });
        }
        let mut round = FlowRound::default();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(client) = joined {
                round.add(client);
            } else {
                round.failed += 1;
            }
        }
        round.elapsed = duration;
        round
    }
}

async fn one_flow(
    party: &Party,
    taid: &str,
    key: &EcdsaKeyPair,
    counter: u64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(counter.to_be_bytes());
    let api = &party.api;
    let created: Value = party
        .service
        .post(format!("{api}/v1/signing-requests"))
        .json(&json!({"taid": taid, "hash_algorithm": "sha256", "hash": STANDARD.encode(hash)}))
        .send()
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
    party
        .gateway
        .post(format!("{api}/v1/signing-requests/{id}/authorisation"))
        .json(&json!({"decision": "approve",
                      "device_signature": STANDARD.encode(signature.as_ref())}))
        .send()
        .await?
        .error_for_status()?;
    let result: Value = party
        .service
        .get(format!("{api}/v1/signing-requests/{id}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    if result["status"] != "signed" {
        return Err("not signed".into());
    }
    Ok(())
}
