//! `smartsign-ctl bench nodes`: the aggregate signing rate of 1, 2, ... N `smartsignd` nodes on
//! one PostgreSQL database and one SoftHSM token, with each node's CPU time and database round
//! trips per signature, so that a deployment can be sized on paper.
//!
//! A `smartsignd --dev` on the state directory hosts the token, the TLS files and the embedded
//! CA (its own store is not used). Each node runs `smartsignd --config` with that run's
//! configuration, `[store] backend = "postgres"` on `--database`, no embedded CA, and an audit
//! directory of its own (its copy of the log whose ledger is in the database). The population
//! lives in the database, made through the first node; its list is kept beside the nodes'
//! directories, one per database.
//!
//! Each flow (create, authorise, fetch) runs against one node, the clients spread evenly over
//! the nodes, as a load balancer with affinity would. A node's CPU time is its process's
//! (`/proc/PID/stat`), PostgreSQL's is the sum over its processes; the round trips are the
//! node's `smartsign_store_round_trips_total`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::bench_accounts::{Daemon, DaemonArgs, Listed};
use crate::bench_sign::{FlowSide, Measured};

/// Arguments of `bench nodes`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchNodesArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// The PostgreSQL database the nodes share, as libpq keywords or a URL, without a password
    /// (`ops/pg start DIR` prints a cluster's; add `dbname=...`). Use one for this benchmark
    /// only: it is filled with benchmark accounts.
    #[arg(long)]
    database: String,
    /// Measure 1, 2, ... up to this many nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Accounts to draw from (made first through the first node when fewer exist).
    #[arg(long, default_value_t = 1000)]
    accounts: u64,
    /// Concurrent clients in all, spread over the nodes.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of measurement for each number of nodes.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
}

/// One node's process and listeners.
struct Node {
    child: Child,
    api: String,
    metrics: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// What a node or the database did in one measurement.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu: Duration,
    round_trips: f64,
}

/// Runs the benchmark.
pub(crate) async fn run(args: BenchNodesArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    let dev = Daemon::ensure(&args.daemon)?;
    let dir = nodes_dir(&dev.state, &args.database)?;
    let mut nodes: Vec<Node> = Vec::new();
    nodes.push(start_node(&dev, &dir, &args.database, 1).await?);
    let first = Daemon::attached(dir.clone(), nodes[0].api.clone(), nodes[0].metrics.clone());
    let made = crate::bench_populate::populate(&first, args.accounts, 32).await?;
    if made.made > 0 {
        eprintln!(
            "made {} accounts in {:.1} s through node 1",
            made.made,
            made.elapsed.as_secs_f64()
        );
    }
    let population: Vec<Listed> = first
        .populated()?
        .into_iter()
        .filter(|(i, _)| *i < args.accounts)
        .collect();
    let mut rows = Vec::new();
    for count in 1..=args.nodes {
        while nodes.len() < count {
            let node = start_node(&dev, &dir, &args.database, nodes.len() + 1).await?;
            nodes.push(node);
        }
        let sides = nodes
            .iter()
            .map(|node| FlowSide::at(&first, population.clone(), &node.api))
            .collect::<Result<Vec<_>, _>>()?;
        let per_node = (args.clients / count).max(1);
        // Warm up: connections, caches, the nodes' statement caches.
        measure(&sides, per_node, Duration::from_secs(2)).await;
        let before = usage(&nodes).await?;
        let began = Instant::now();
        let measured = measure(&sides, per_node, Duration::from_secs(args.seconds)).await;
        let elapsed = began.elapsed();
        let after = usage(&nodes).await?;
        rows.push(Row::new(count, measured, elapsed, &before, &after));
        eprintln!("{count} node(s) measured");
    }
    drop(nodes);
    println!(
        "{} accounts in PostgreSQL; {} clients in all; {} s a measurement",
        population.len(),
        args.clients,
        args.seconds
    );
    println!(
        "nodes  signatures/s  failed  p50 / p99 ms     node CPU ms/signature  DB round trips/signature  PostgreSQL CPU ms/signature"
    );
    for row in &rows {
        println!("{row}");
    }
    Ok(())
}

/// Each node's flows with `clients` clients, at once, for `duration`; the sum.
async fn measure(
    sides: &[std::sync::Arc<FlowSide>],
    clients: usize,
    duration: Duration,
) -> Measured {
    let mut tasks = tokio::task::JoinSet::new();
    for side in sides {
        let side = std::sync::Arc::clone(side);
        tasks.spawn(async move { side.closed(clients, duration).await });
    }
    let mut all = Measured::default();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(measured) = joined {
            all.add(measured);
        }
    }
    all
}

/// A line of the table.
struct Row {
    nodes: usize,
    rate: f64,
    failed: u64,
    percentiles: String,
    node_cpu: Vec<f64>,
    round_trips: Vec<f64>,
    database_cpu: f64,
}

impl Row {
    fn new(
        nodes: usize,
        mut measured: Measured,
        elapsed: Duration,
        before: &(Vec<Usage>, Duration),
        after: &(Vec<Usage>, Duration),
    ) -> Row {
        let signatures = measured.latencies.len().max(1) as f64;
        // A node's share: the flows ran evenly over the nodes, so per signature of its own.
        let share = signatures / nodes as f64;
        let node_cpu = before
            .0
            .iter()
            .zip(&after.0)
            .map(|(b, a)| (a.cpu - b.cpu).as_secs_f64() * 1000.0 / share)
            .collect();
        let round_trips = before
            .0
            .iter()
            .zip(&after.0)
            .map(|(b, a)| (a.round_trips - b.round_trips) / share)
            .collect();
        Row {
            nodes,
            rate: signatures / elapsed.as_secs_f64(),
            failed: measured.failed,
            percentiles: measured.percentiles(),
            node_cpu,
            round_trips,
            database_cpu: (after.1.saturating_sub(before.1)).as_secs_f64() * 1000.0 / signatures,
        }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |values: &[f64]| {
            values
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        write!(
            f,
            "{:<6} {:>12.1}  {:>6}  {:<16} {:<22} {:<25} {:.1}",
            self.nodes,
            self.rate,
            self.failed,
            self.percentiles,
            list(&self.node_cpu),
            list(&self.round_trips),
            self.database_cpu
        )
    }
}

/// Each node's CPU time and round trips, and PostgreSQL's CPU time.
async fn usage(nodes: &[Node]) -> Result<(Vec<Usage>, Duration), Box<dyn std::error::Error>> {
    let mut each = Vec::new();
    for node in nodes {
        let metrics = Daemon::attached(PathBuf::new(), node.api.clone(), node.metrics.clone());
        each.push(Usage {
            cpu: process_cpu(node.child.id()).unwrap_or_default(),
            round_trips: metrics.metric("smartsign_store_round_trips_total").await?,
        });
    }
    Ok((each, postgres_cpu()))
}

/// User and system CPU time of process `pid` (`/proc/PID/stat`, in clock ticks of 10 ms).
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are plain.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of every `postgres` process on the machine (the server and its backends; those
/// that ended during a measurement are not counted, so it is a lower bound).
fn postgres_cpu() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == "postgres")
        })
        .filter_map(process_cpu)
        .sum()
}

/// The nodes' directory for this database: beside the dev state, named by the database, with
/// the dev run's TLS files and clients linked in (the population list needs them).
fn nodes_dir(state: &Path, database: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let digest = sha2::Sha256::digest(database.as_bytes());
    let dir = state.join(format!("nodes-{}", hex::encode(&digest[..4])));
    std::fs::create_dir_all(&dir)?;
    for shared in ["clients", "tls"] {
        let link = dir.join(shared);
        if !link.exists() {
            std::os::unix::fs::symlink(state.join(shared), link)?;
        }
    }
    Ok(dir)
}

/// Starts node `n` (`smartsignd --config`) and waits until it is ready.
async fn start_node(
    dev: &Daemon,
    dir: &Path,
    database: &str,
    n: usize,
) -> Result<Node, Box<dyn std::error::Error>> {
    let mut config: toml::Table =
        std::fs::read_to_string(dev.state.join("smartsignd.toml"))?.parse()?;
    let (api, metrics) = (free_address()?, free_address()?);
    let server = config["server"]
        .as_table_mut()
        .ok_or("no [server] in smartsignd.toml")?;
    server.insert("listen".into(), api.clone().into());
    server.insert("metrics_listen".into(), metrics.clone().into());
    config["ca"]
        .as_table_mut()
        .ok_or("no [ca] in smartsignd.toml")?
        .remove("embedded");
    let node_dir = dir.join(format!("node-{n}"));
    // The node's copy of the audit log is rebuilt from the ledger at start.
    let _ = std::fs::remove_dir_all(node_dir.join("audit"));
    std::fs::create_dir_all(&node_dir)?;
    config["audit"]
        .as_table_mut()
        .ok_or("no [audit] in smartsignd.toml")?
        .insert(
            "dir".into(),
            node_dir.join("audit").display().to_string().into(),
        );
    let mut store = toml::Table::new();
    store.insert("backend".into(), "postgres".into());
    store.insert("url".into(), database.into());
    store.insert("node_id".into(), format!("node-{n}").into());
    config.insert("store".into(), store.into());
    let path = node_dir.join("smartsignd.toml");
    std::fs::write(&path, toml::to_string(&config)?)?;
    let daemon_binary = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("smartsignd"))
        .filter(|path| path.is_file())
        .ok_or("smartsignd is not beside smartsign-ctl; build it")?;
    eprintln!("starting node {n}");
    let log = node_dir.join("smartsignd.log");
    let child = Command::new(daemon_binary)
        .arg("--config")
        .arg(&path)
        .env("SOFTHSM2_CONF", dev.state.join("hsm/softhsm2.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut node = Node {
        child,
        api: format!("https://{api}"),
        metrics: format!("http://{metrics}"),
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = node.child.try_wait()? {
            return Err(format!("node {n} exited ({status}); see {}", log.display()).into());
        }
        let ready = reqwest::get(format!("{}/readyz", node.metrics))
            .await
            .is_ok_and(|response| response.status().is_success());
        if ready {
            return Ok(node);
        }
        if Instant::now() > deadline {
            node.child.kill()?;
            return Err(
                format!("node {n} was not ready within 300 s; see {}", log.display()).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_address() -> std::io::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}
