//! `smartsign-ctl bench populate`: N real "iAM Smart+" accounts, made through the daemon's API
//! as the registration system makes them (a key in the HSM, a certificate from the embedded CA
//! over CMP, the personal data sealed, the audit records written), then each account's TAID at
//! the demo services. Resumable: accounts already listed in the state directory are skipped.
//! Progress goes to stderr every few seconds; the rate to stdout at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::bench_accounts::{
    DaemonArgs, Listed, SERVICES, account_id, device, hkic_number, send_patiently,
};

/// Arguments of `bench populate`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchPopulateArgs {
    #[command(flatten)]
    pub(crate) daemon: DaemonArgs,
    /// Accounts the population should hold when done (those already made count).
    #[arg(long)]
    pub(crate) accounts: u64,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
}

/// Seconds between progress lines.
const PROGRESS: Duration = Duration::from_secs(5);
/// Finished accounts written to the list at a time.
const RECORD_BATCH: usize = 256;

/// Runs the command.
pub(crate) async fn run(args: BenchPopulateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let daemon = crate::bench_accounts::Daemon::ensure(&args.daemon)?;
    let made = populate(&daemon, args.accounts, args.concurrency).await?;
    println!(
        "accounts: {} ({} made now in {:.1} s, {:.0}/s), listed in {}",
        made.total,
        made.made,
        made.elapsed.as_secs_f64(),
        made.made as f64 / made.elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        daemon
            .state
            .join(crate::bench_accounts::ACCOUNTS_FILE)
            .display()
    );
    Ok(())
}

/// What a population run did.
pub(crate) struct Populated {
    /// Accounts listed when done.
    pub(crate) total: u64,
    /// Accounts made by this run.
    pub(crate) made: u64,
    /// How long this run took.
    pub(crate) elapsed: Duration,
}

/// Makes accounts until `accounts` are listed.
pub(crate) async fn populate(
    daemon: &crate::bench_accounts::Daemon,
    accounts: u64,
    concurrency: usize,
) -> Result<Populated, Box<dyn std::error::Error>> {
    let listed = daemon.populated()?;
    let done: std::collections::HashSet<u64> = listed.iter().map(|(i, _)| *i).collect();
    let todo: Vec<u64> = (0..accounts).filter(|i| !done.contains(i)).collect();
    let started = Instant::now();
    if todo.is_empty() {
        return Ok(Populated {
            total: listed.len() as u64,
            made: 0,
            elapsed: started.elapsed(),
        });
    }
    eprintln!(
        "{} accounts listed; making {} more with {concurrency} in flight",
        listed.len(),
        todo.len()
    );
    let registrar = daemon.client("registrar")?;
    let api = daemon.api.clone();
    let todo = Arc::new(todo);
    let next = Arc::new(AtomicU64::new(0));
    let made = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(Mutex::new(Vec::<Listed>::new()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (registrar, api, todo, next, made, limited, finished) = (
            registrar.clone(),
            api.clone(),
            todo.clone(),
            next.clone(),
            made.clone(),
            limited.clone(),
            finished.clone(),
        );
        let state = daemon.state.clone();
        workers.spawn(async move {
            loop {
                let slot = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = usize::try_from(slot).ok().and_then(|slot| todo.get(slot)) else {
                    return Ok::<_, String>(());
                };
                let taids = register(&registrar, &api, i, &limited)
                    .await
                    .map_err(|error| format!("account {i}: {error}"))?;
                made.fetch_add(1, Ordering::Relaxed);
                let batch = {
                    let mut finished = finished.lock().await;
                    finished.push((i, taids));
                    if finished.len() >= RECORD_BATCH {
                        std::mem::take(&mut *finished)
                    } else {
                        Vec::new()
                    }
                };
                if !batch.is_empty() {
                    record(&state, &batch)?;
                }
            }
        });
    }
    let total = todo.len() as u64;
    let mut ticker = tokio::time::interval(PROGRESS);
    ticker.tick().await;
    let mut failure = None;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(error))) => { failure.get_or_insert(error); workers.abort_all(); }
                Some(Err(error)) if error.is_cancelled() => {}
                Some(Err(error)) => { failure.get_or_insert(error.to_string()); }
            },
            _ = ticker.tick() => {
                let count = made.load(Ordering::Relaxed);
                let rate = count as f64 / started.elapsed().as_secs_f64();
                let left = total.saturating_sub(count) as f64 / rate.max(f64::MIN_POSITIVE);
                eprintln!(
                    "made {count} of {total} ({rate:.0}/s, about {:.0} s left; {} waits on 429)",
                    left,
                    limited.load(Ordering::Relaxed)
                );
            }
        }
    }
    // What finished before a failure is listed too, so that a new run resumes after it.
    let rest = std::mem::take(&mut *finished.lock().await);
    record(&daemon.state, &rest)?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    Ok(Populated {
        total: daemon.populated()?.len() as u64,
        made: made.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

fn record(state: &std::path::Path, batch: &[Listed]) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join(crate::bench_accounts::ACCOUNTS_FILE))
        .map_err(|error| format!("cannot open the account list: {error}"))?;
    let text: String = batch
        .iter()
        .map(|(index, [a, b])| format!("{index} {a} {b}\n"))
        .collect();
    std::io::Write::write_all(&mut file, text.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|error| format!("cannot write the account list: {error}"))
}

/// Registers account `i` (an account left by an earlier run that stopped before listing it is
/// taken as it is) and gives its TAIDs at the demo services.
async fn register(
    registrar: &reqwest::Client,
    api: &str,
    i: u64,
    limited: &AtomicU64,
) -> Result<[String; 2], Box<dyn std::error::Error + Send + Sync>> {
    let id = account_id(i);
    let public_key = device(i).map_err(|error| error.to_string())?.1;
    let response = send_patiently(
        registrar.post(format!("{api}/v1/accounts")).json(&json!({
            "account_id": id, "tier": "iam_smart_plus", "surname": "BENCH",
            "given_name": "POPULATION", "date_of_birth": "1980-01-01",
            "hkic_number": hkic_number(i), "device_public_key": public_key,
        })),
        limited,
    )
    .await?;
    match response.status().as_u16() {
        201 => {}
        409 => {
            let body: Value = response.json().await?;
            if body["code"] != "account_exists" {
                return Err(format!("registration refused: {body}").into());
            }
        }
        status => {
            return Err(format!("registration: {status} {}", response.text().await?).into());
        }
    }
    let mut taids = [String::new(), String::new()];
    for (taid, service) in taids.iter_mut().zip(SERVICES) {
        let response = send_patiently(
            registrar.get(format!("{api}/v1/accounts/{id}/taid?service={service}")),
            limited,
        )
        .await?;
        if !response.status().is_success() {
            return Err(format!("TAID: {} {}", response.status(), response.text().await?).into());
        }
        let body: Value = response.json().await?;
        *taid = body["taid"].as_str().ok_or("no taid")?.to_owned();
    }
    Ok(taids)
}
