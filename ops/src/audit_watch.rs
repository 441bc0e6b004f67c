//! `smartsign-ctl audit watch`: an auditor's monitor. It keeps the last checkpoint it verified in
//! a state file, and each round fetches the daemon's latest checkpoint, checks its signature
//! under the pinned audit key, and proves it consistent with the stored one (the consistency
//! proof, and the records added since, with `audit_log::verify_since`). Any inconsistency (a
//! bad signature, a smaller tree, a failed proof, the same size with another root: a fork) ends
//! it with a non-zero exit saying why, and the stored checkpoint is never replaced by one that
//! did not verify.

use std::error::Error;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use audit_log::{AuditPublicKey, Checkpoint, verify_since};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit_cmd::proof_hashes;

/// Most records one `GET /v1/audit/records` returns.
const PAGE: u64 = 10_000;

/// Arguments of `audit watch`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example (every 5 minutes, as a service):
  smartsign-ctl audit watch --url https://appliance:8443 --cert auditor.pem --key auditor.key \\
      --ca tls-ca.pem --public-key audit-key.pem --state /var/lib/audit-watch/state.json \\
      --interval 300
It exits non-zero, saying why, when the log is not consistent with what it saw before.")]
pub(crate) struct WatchArgs {
    /// The daemon, with the auditor's client certificate (role `auditor` in its OU).
    #[command(flatten)]
    daemon: crate::client::DaemonArgs,
    /// Where the last verified checkpoint (and the pinned key) is kept; made on the first run.
    #[arg(long, value_name = "FILE")]
    state: PathBuf,
    /// The audit public key (PEM), obtained out of band. Without it, the key in the state file;
    /// on the first run without either, the daemon's key is trusted on first use and pinned.
    #[arg(long, value_name = "FILE")]
    public_key: Option<PathBuf>,
    /// Seconds between rounds.
    #[arg(long, default_value_t = 60)]
    interval: u64,
    /// One round, then exit (0 when consistent).
    #[arg(long)]
    once: bool,
}

/// The state file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    /// The pinned audit key, PEM.
    public_key: String,
    /// The last checkpoint verified, as the daemon served it.
    checkpoint: Value,
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    /// The log contradicts what was verified before, or its checkpoint does not verify.
    #[error("INCONSISTENT: {0}; the last good checkpoint stays in {1}")]
    Inconsistent(String, String),
    /// The daemon could not be asked (network, TLS, an error answer).
    #[error("cannot reach the audit log: {0}")]
    Unreachable(String),
    /// A local problem: the state file, the key file.
    #[error("{0}")]
    Local(String),
}

pub(crate) async fn run(args: WatchArgs) -> Result<(), Box<dyn Error>> {
    let client = Client::new(&args)?;
    loop {
        match round(&args, &client).await {
            Ok(line) => println!("{line}"),
            Err(error @ WatchError::Unreachable(_)) if !args.once => {
                // A daemon that is down now proves nothing either way: ask again next round.
                eprintln!("smartsign-ctl: audit watch: {error}; trying again");
            }
            Err(error) => return Err(error.into()),
        }
        if args.once {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(args.interval.max(1))).await;
    }
}

/// One round: fetch, verify, and on success store the new checkpoint. Returns what was proven.
async fn round(args: &WatchArgs, client: &Client) -> Result<String, WatchError> {
    let state = load_state(&args.state)?;
    let given =
        match &args.public_key {
            Some(path) => Some(fs::read_to_string(path).map_err(|error| {
                WatchError::Local(format!("reading {}: {error}", path.display()))
            })?),
            None => None,
        };
    let state_file = args.state.display().to_string();
    let inconsistent = |reason: String| WatchError::Inconsistent(reason, state_file.clone());
    let public_key = match (&given, &state) {
        (Some(given), Some(state)) if given.trim() != state.public_key.trim() => {
            return Err(WatchError::Local(format!(
                "--public-key is not the key pinned in {state_file}; use another state file \
                 for another log"
            )));
        }
        (Some(given), _) => given.clone(),
        (None, Some(state)) => state.public_key.clone(),
        (None, None) => {
            let key = client.get("/v1/audit/public-key").await?;
            String::from_utf8(key)
                .map_err(|_| WatchError::Unreachable("the public key is not PEM".into()))?
        }
    };
    let key = AuditPublicKey::from_spki_pem(&public_key)
        .map_err(|error| WatchError::Local(format!("the audit public key: {error}")))?;

    let new_json = client.get("/v1/audit/checkpoint").await?;
    let new = Checkpoint::from_json(&new_json)
        .map_err(|error| inconsistent(format!("the daemon's checkpoint: {error}")))?;
    new.verify(&key)
        .map_err(|error| inconsistent(format!("the daemon's checkpoint: {error}")))?;

    let summary = match &state {
        None => format!(
            "OK: first checkpoint stored: {} records, root {}, {} (signature valid)",
            new.tree_size(),
            new.root_hash(),
            new.timestamp()
        ),
        Some(state) => {
            let old_json = serde_json::to_vec(&state.checkpoint)
                .map_err(|error| WatchError::Local(format!("{state_file}: {error}")))?;
            let old = Checkpoint::from_json(&old_json)
                .map_err(|error| WatchError::Local(format!("{state_file}: {error}")))?;
            let (m, n) = (old.tree_size(), new.tree_size());
            if n < m {
                return Err(inconsistent(format!(
                    "the log shrank: the daemon's checkpoint covers {n} records, the last \
                     verified one {m}"
                )));
            }
            if n == m {
                if old.root_hash() != new.root_hash() {
                    return Err(inconsistent(format!(
                        "a fork: the daemon's tree of {n} records has root {}, the one verified \
                         before has {}",
                        new.root_hash(),
                        old.root_hash()
                    )));
                }
                return Ok(format!(
                    "OK: unchanged: {n} records, root {} (signature valid)",
                    new.root_hash()
                ));
            }
            let proof = match m {
                0 => Vec::new(),
                _ => {
                    let path = format!("/v1/audit/proofs/consistency?first={m}&second={n}");
                    let bytes = client.get(&path).await?;
                    proof_hashes(&bytes, Path::new(&path)).map_err(|error| {
                        WatchError::Unreachable(format!("the consistency proof: {error}"))
                    })?
                }
            };
            let mut records = Vec::new();
            let mut from = m;
            while from < n {
                let limit = (n - from).min(PAGE);
                let page = client
                    .get(&format!("/v1/audit/records?from={from}&limit={limit}"))
                    .await?;
                let lines = page.iter().filter(|&&b| b == b'\n').count() as u64;
                if lines == 0 {
                    return Err(inconsistent(format!(
                        "the daemon serves no record {from}, which its checkpoint covers"
                    )));
                }
                records.extend_from_slice(&page);
                from += lines;
            }
            verify_since(&old_json, &new_json, &proof, &records, &public_key).map_err(|error| {
                inconsistent(format!(
                    "the checkpoint of {n} records is not an extension of the one of {m} \
                     verified before: {error}"
                ))
            })?;
            format!(
                "OK: {} records added, consistent: {m} -> {n} records, root {}, {}",
                n - m,
                new.root_hash(),
                new.timestamp()
            )
        }
    };
    let checkpoint: Value = serde_json::from_slice(&new_json)
        .map_err(|error| WatchError::Local(format!("the checkpoint: {error}")))?;
    save_state(
        &args.state,
        &State {
            public_key,
            checkpoint,
        },
    )?;
    Ok(summary)
}

fn load_state(path: &Path) -> Result<Option<State>, WatchError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            WatchError::Local(format!("{} is not a watch state: {error}", path.display()))
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(WatchError::Local(format!(
            "reading {}: {error}",
            path.display()
        ))),
    }
}

/// Replaces the state file atomically: a temporary file beside it, fsync, rename, then the
/// directory fsync. A crash leaves the old state or the new one.
fn save_state(path: &Path, state: &State) -> Result<(), WatchError> {
    let local = |what: &str, error: std::io::Error| {
        WatchError::Local(format!("{what} {}: {error}", path.display()))
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut temp_name = path.file_name().unwrap_or_default().to_owned();
    temp_name.push(".tmp");
    let temp = dir.join(temp_name);
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|error| WatchError::Local(format!("the state: {error}")))?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .map_err(|error| local("writing the state beside", error))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| local("writing the state beside", error))?;
    drop(file);
    fs::rename(&temp, path).map_err(|error| local("replacing", error))?;
    File::open(&dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| local("syncing the directory of", error))
}

/// The daemon's API with the auditor's client certificate.
struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(args: &WatchArgs) -> Result<Self, Box<dyn Error>> {
        Ok(Self {
            http: args.daemon.client()?,
            base: args.daemon.at(""),
        })
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>, WatchError> {
        let unreachable =
            |error: reqwest::Error| WatchError::Unreachable(format!("{path}: {error}"));
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?.to_vec();
        if !status.is_success() {
            return Err(WatchError::Unreachable(format!(
                "{path}: {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(body)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}
