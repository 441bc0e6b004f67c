//! What `bench populate` and `bench sign` share: a `smartsignd --dev` whose state lives where the
//! benchmark says (on disk unless asked otherwise), the parties' mutual-TLS clients, and the
//! population of "iAM Smart+" accounts with their device keys.
//!
//! Account `i` is `bench-{i}`, with an HKIC number of its own and a device key derived from `i`,
//! so that `bench sign` can approve for any of millions of accounts without storing their keys.
//! `bench populate` records each account's TAIDs at the two demo services in
//! `DIR/bench-accounts.txt` (`{i} {taid at demo-a} {taid at demo-b}` per line) once its
//! registration is done, which makes it resumable: a second run skips what the file lists. The
//! flows of `bench sign` alternate between the two services, as a national appliance serves
//! many: one service alone would meet its own per-client rate limit first.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::Value;
use sha2::Digest;

/// The benchmark accounts' TAIDs, in the state directory.
pub(crate) const ACCOUNTS_FILE: &str = "bench-accounts.txt";
/// The services the benchmark signs for.
pub(crate) const SERVICES: [&str; 2] = ["demo-a", "demo-b"];

/// An account of the population: its index and its TAID at each of [`SERVICES`].
pub(crate) type Listed = (u64, [String; 2]);

/// Where the daemon's state goes and how it is started.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DaemonArgs {
    /// State directory of the daemon. A running `smartsignd --dev` there is used as it is;
    /// otherwise one is started on it (made if missing) and stopped after. Without it, a
    /// temporary directory under the current directory is used and removed after.
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// Put the temporary state directory on tmpfs (/dev/shm), where fsync costs nothing: not
    /// the workload production sees.
    #[arg(long, conflicts_with = "state_dir")]
    pub(crate) tmpfs: bool,
    /// Key algorithm of a daemon started here on a new state directory.
    #[arg(long, default_value = "ec-p256")]
    pub(crate) key_algorithm: String,
    /// Key mode of a daemon started here on a new state directory.
    #[arg(long, default_value = "wrapped")]
    pub(crate) key_mode: String,
    /// Where a daemon started here looks first for certificate status: ocsp or crl
    /// (`[status] first`).
    #[arg(long, default_value = "ocsp", value_parser = ["ocsp", "crl"])]
    pub(crate) status_first: String,
}

/// A daemon the benchmark uses; stopped on drop if it was started here.
pub(crate) struct Daemon {
    child: Option<Child>,
    _temporary: Option<tempfile::TempDir>,
    pub(crate) state: PathBuf,
    pub(crate) api: String,
    pub(crate) metrics: String,
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

/// The listeners a daemon announced in `endpoints.json`, if it answers there.
fn running(state: &Path) -> Option<(String, String)> {
    let endpoints: Value =
        serde_json::from_slice(&std::fs::read(state.join("endpoints.json")).ok()?).ok()?;
    let api = endpoints["api"].as_str()?.to_owned();
    let metrics = endpoints["metrics"].as_str()?.to_owned();
    let address: SocketAddr = api.strip_prefix("https://")?.parse().ok()?;
    TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    Some((api, metrics))
}

impl Daemon {
    /// The daemon at `args.state_dir` if one runs there, else one started here.
    pub(crate) fn ensure(args: &DaemonArgs) -> Result<Daemon, Box<dyn std::error::Error>> {
        let (state, temporary) = match &args.state_dir {
            Some(state) => {
                std::fs::create_dir_all(state)?;
                (std::fs::canonicalize(state)?, None)
            }
            None => {
                let parent = if args.tmpfs {
                    PathBuf::from("/dev/shm")
                } else {
                    std::env::current_dir()?
                };
                let dir = tempfile::Builder::new()
                    .prefix("smartsign-bench-")
                    .tempdir_in(parent)?;
                (dir.path().join("state"), Some(dir))
            }
        };
        if let Some((api, metrics)) = running(&state) {
            eprintln!("using the smartsignd running on {}", state.display());
            return Ok(Daemon {
                child: None,
                _temporary: temporary,
                state,
                api,
                metrics,
            });
        }
        let _ = std::fs::remove_file(state.join("endpoints.json"));
        let daemon_binary = std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("smartsignd"))
            .filter(|path| path.is_file())
            .ok_or("smartsignd is not beside smartsign-ctl; build it, or start it yourself")?;
        eprintln!("starting smartsignd --dev on {}", state.display());
        let log_dir = state.parent().unwrap_or(Path::new(".")).to_path_buf();
        let child = Command::new(daemon_binary)
            .args(["--dev", "--listen", "127.0.0.1:0", "--metrics-listen"])
            .args(["127.0.0.1:0", "--ca-listen", "127.0.0.1:0"])
            .args(["--key-algorithm", &args.key_algorithm])
            .args(["--key-mode", &args.key_mode])
            .args(["--status-first", &args.status_first])
            .arg("--state-dir")
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log_dir.join("smartsignd-bench.log"))?)
            .spawn()?;
        let mut daemon = Daemon {
            child: Some(child),
            _temporary: temporary,
            state,
            api: String::new(),
            metrics: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some((api, metrics)) = running(&daemon.state) {
                (daemon.api, daemon.metrics) = (api, metrics);
                return Ok(daemon);
            }
            if let Some(child) = &mut daemon.child
                && let Some(status) = child.try_wait()?
            {
                return Err(format!(
                    "smartsignd exited ({status}); see {}",
                    log_dir.join("smartsignd-bench.log").display()
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err("smartsignd did not start within 300 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A daemon that runs elsewhere (a node of `bench nodes`), its TLS clients and population
    /// list in `state`.
    pub(crate) fn attached(state: PathBuf, api: String, metrics: String) -> Daemon {
        Daemon {
            child: None,
            _temporary: None,
            state,
            api,
            metrics,
        }
    }

    /// The process id of the `smartsignd` serving this state directory: the one started here,
    /// or the one whose command line names the directory.
    pub(crate) fn pid(&self) -> Option<u32> {
        if let Some(child) = &self.child {
            return Some(child.id());
        }
        let wanted = self.state.to_str()?;
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|line| {
                    let args: Vec<&[u8]> = line.split(|&b| b == 0).collect();
                    args.first()
                        .is_some_and(|program| program.ends_with(b"smartsignd"))
                        && args.contains(&wanted.as_bytes())
                })
            })
    }

    /// A mutual-TLS client with the development certificate of `name`.
    pub(crate) fn client(&self, name: &str) -> Result<reqwest::Client, Box<dyn std::error::Error>> {
        let mut identity = std::fs::read(self.state.join(format!("clients/{name}.pem")))?;
        identity.extend(std::fs::read(
            self.state.join(format!("clients/{name}.key")),
        )?);
        let ca = std::fs::read(self.state.join("tls/ca.pem"))?;
        Ok(reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .identity(reqwest::Identity::from_pem(&identity)?)
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(60))
            .build()?)
    }

    /// The value of a counter or gauge series in the daemon's `/metrics` (0 if absent).
    pub(crate) async fn metric(&self, series: &str) -> Result<f64, Box<dyn std::error::Error>> {
        let text = reqwest::get(format!("{}/metrics", self.metrics))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// The accounts `bench populate` finished here, in the order they were done.
    pub(crate) fn populated(&self) -> Result<Vec<Listed>, Box<dyn std::error::Error>> {
        let path = self.state.join(ACCOUNTS_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        let mut seen = HashSet::new();
        let mut accounts = Vec::new();
        for line in BufReader::new(file).lines() {
            // A line cut short by a crash is not a line.
            let line = line?;
            let fields: Vec<&str> = line.split(' ').collect();
            if let [index, a, b] = fields[..]
                && let Ok(index) = index.parse::<u64>()
                && !a.is_empty()
                && !b.is_empty()
                && seen.insert(index)
            {
                accounts.push((index, [a.to_owned(), b.to_owned()]));
            }
        }
        Ok(accounts)
    }
}

/// Account `i`'s id.
pub(crate) fn account_id(i: u64) -> String {
    format!("bench-{i}")
}

/// A valid HKIC number of account `i`'s own (one account per person): a letter (A for the
/// first million, B for the next...), six digits and the check digit. Distinct for 26 million.
pub(crate) fn hkic_number(i: u64) -> String {
    let letter = u32::try_from(i / 1_000_000).unwrap_or(25).min(25);
    let digits = format!("{:06}", i % 1_000_000);
    // Weights 9..2: a leading space counts 36 at weight 9, the letter (A = 10) at 8, then the
    // six digits.
    let sum: u32 = 36 * 9
        + (10 + letter) * 8
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
    let letter = char::from(b'A' + u8::try_from(letter).unwrap_or(0));
    format!("{letter}{digits}{check}")
}

/// Account `i`'s device: its P-256 key, derived from `i` (a benchmark's phones need no secret),
/// as a ring key pair for fast signing, and its public key PEM.
pub(crate) fn device(i: u64) -> Result<(EcdsaKeyPair, String), Box<dyn std::error::Error>> {
    let mut counter = 0u32;
    let secret = loop {
        let seed = sha2::Sha256::new()
            .chain_update(b"smartsign-bench-device\0")
            .chain_update(i.to_be_bytes())
            .chain_update(counter.to_be_bytes())
            .finalize();
        if let Ok(secret) = p256::SecretKey::from_slice(&seed) {
            break secret;
        }
        counter += 1;
    };
    let public = secret
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|error| format!("device key: {error}"))?;
    let pkcs8 = secret
        .to_pkcs8_der()
        .map_err(|error| format!("device key: {error}"))?;
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_bytes(),
        &SystemRandom::new(),
    )
    .map_err(|_| "ring refused the device key")?;
    Ok((key, public))
}

/// Sends `request` again while the daemon answers 429 (after its `Retry-After`), counting the
/// waits in `limited`.
pub(crate) async fn send_patiently(
    request: reqwest::RequestBuilder,
    limited: &std::sync::atomic::AtomicU64,
) -> Result<reqwest::Response, Box<dyn std::error::Error + Send + Sync>> {
    loop {
        let attempt = request
            .try_clone()
            .ok_or("a request that cannot be sent again")?;
        let response = attempt.send().await?;
        if response.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Ok(response);
        }
        limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wait = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(1);
        tokio::time::sleep(Duration::from_millis(50).max(Duration::from_secs(wait) / 4)).await;
    }
}
