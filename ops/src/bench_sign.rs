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
use hsm_adapter::{Hsm, HsmConfig, KeyAlgorithm, KeyMode, SOFTHSM_MODULE, TokenSelector};
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        eprintln!(
            "measuring raw cryptoki signing ({algorithm:?}, {mode:?}) with {cores} sessions for {} s",
            args.seconds
        );
        let raw = raw_rate(state, algorithm, mode, cores, Duration::from_secs(args.seconds)).await?;
        let flow = full_flow(state, api, args.clients, Duration::from_secs(args.seconds)).await?;
        let ratio = flow.per_second / raw;
        println!("key: {algorithm:?} {mode:?}; {} clients; {} s", args.clients, args.seconds);
        println!("raw HSM signatures/s ({cores} sessions)    {raw:>10.0}");
        println!("full flow signatures/s                 {:>10.0}", flow.per_second);
        println!("full flow latency p50 / p99 (ms)       {:>10.1} / {:.1}", flow.p50_ms, flow.p99_ms);
        println!("flows completed / failed               {:>10} / {}", flow.completed, flow.failed);
        println!("ratio to raw                           {ratio:>10.3}");
        println!(
            "full flow >= {TARGET_RATIO} of raw: {}",
            if ratio >= TARGET_RATIO { "yes" } else { "no" }
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

async fn raw_rate(
    state: &Path,
    algorithm: KeyAlgorithm,
    mode: KeyMode,
    threads: NonZeroUsize,
    duration: Duration,
) -> Result<f64, Box<dyn std::error::Error>> {
    let config = HsmConfig::new(
        SOFTHSM_MODULE,
        TokenSelector::Label("smartsign-dev".into()),
        read_secret(&state.join("hsm/user.pin"))?,
    );
    let hsm = Hsm::open(config.clone()).await?;
    let key = hsm.generate_user_key(algorithm, mode).await?;
    let throughput = hsm_adapter::bench::raw(&config, &key, threads, duration).await?;
    hsm.destroy_user_key(&key).await?;
    hsm.shutdown().await;
    Ok(throughput.per_second())
}

struct FlowResult {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    completed: u64,
    failed: u64,
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

async fn full_flow(
    state: &Path,
    api: &str,
    clients: usize,
    duration: Duration,
) -> Result<FlowResult, Box<dyn std::error::Error>> {
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
        // The phones sign with ring: they run on this machine too, and the faster they sign,
        // the more of the machine is left to the daemon being measured.
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| "cannot make a device key")?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| "cannot load a device key")?;
        let device_public_key = p256::PublicKey::from_sec1_bytes(key.public_key().as_ref())?
            .to_public_key_pem(LineEnding::LF)?;
        let id = format!("bench-{run_id}-{i}");
        let response = registrar
            .post(format!("{api}/v1/accounts"))
            .json(&json!({
                "account_id": id, "tier": "iam_smart_plus", "surname": "BENCH",
                "date_of_birth": "1980-01-01", "hkic_number": "A1234563",
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
        accounts.push((taid, key));
    }
    eprintln!(
        "running the flow with {clients} clients for {} s",
        duration.as_secs()
    );
    // A short warm-up fills connection pools and the HSM's key cache.
    let warm_up = Duration::from_secs(1);
    let start = Instant::now() + warm_up;
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (taid, key) in accounts {
        let party = party.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            let mut counter = 0u64;
            while Instant::now() < end {
                counter += 1;
                let began = Instant::now();
                let ok = one_flow(&party, &taid, &key, counter).await;
                if began >= start {
                    match ok {
                        Ok(()) if Instant::now() <= end => latencies.push(began.elapsed()),
                        Ok(()) => {}
                        Err(_) => failed += 1,
                    }
                }
            }
            (latencies, failed)
        });
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        let (mut some, bad) = joined?;
        latencies.append(&mut some);
        failed += bad;
    }
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    Ok(FlowResult {
        per_second: latencies.len() as f64 / duration.as_secs_f64(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        completed: latencies.len() as u64,
        failed,
    })
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
