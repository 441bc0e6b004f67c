//! Several nodes on PostgreSQL (`[store] backend = "postgres"`): the store lost and found again
//! without a restart, requests that move between nodes, and a node killed under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest as _;
use smartsign_tests::flow::{Pending, problem, verify_signature};
use smartsign_tests::pg::{self, Cluster, Database};
use smartsign_tests::{DevDaemon, device_key};

/// `[store]` on the PostgreSQL database `url`, as node `id`.
fn on_postgres(url: &str, id: &str) -> impl FnOnce(&mut toml::Table) + use<> {
    let (url, id) = (url.to_owned(), id.to_owned());
    move |config| {
        let mut store = toml::Table::new();
        store.insert("backend".into(), "postgres".into());
        store.insert("url".into(), url.into());
        store.insert("pool_size".into(), 8.into());
        store.insert("node_id".into(), id.into());
        config.insert("store".into(), store.into());
    }
}

fn readyz(node: &DevDaemon) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/readyz", node.metrics))
        .timeout(Duration::from_secs(30))
        .send()
        .expect("/readyz answers");
    (response.status().as_u16(), response.json().expect("JSON"))
}

/// Polls until `done` holds or `seconds` pass.
fn eventually(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {seconds} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_lost_database_fails_closed_and_recovers_without_a_restart() {
    if pg::admin().is_none() {
        return;
    }
    let cluster = Cluster::start();
    let database = Database::create(&cluster.admin());
    let dev = DevDaemon::start(&[]);
    let mut node = dev.node("a", on_postgres(&database.url(), "node-a"));
    let pid = node.pid();
    let (status, ready) = readyz(&node);
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["node"], "node-a");
    assert_eq!(ready["components"]["store"], "ok");

    // The accounts live in PostgreSQL.
    let first = Pending::new(&node, "pg-user-1");
    assert_eq!(
        database.sql("SELECT count(*) FROM accounts WHERE id = 'pg-user-1'"),
        "1"
    );

    cluster.stop();
    let (status, ready) = readyz(&node);
    assert_eq!(status, 503, "{ready}");
    assert_ne!(ready["components"]["store"], "ok", "{ready}");
    // Fail closed: no signature, no account, with the store's error.
    let approved = first.approve(&node);
    assert_eq!(problem(approved), (503, "store_unavailable".to_owned()));
    let registered = node
        .client("registrar")
        .post(format!("{}/v1/accounts", node.api))
        .json(&smartsign_tests::flow::registration(
            "pg-user-2",
            "1990-01-01",
            &device_key(),
        ))
        .send()
        .unwrap();
    assert_eq!(problem(registered), (503, "store_unavailable".to_owned()));

    cluster.resume();
    eventually("/readyz is 200 again", 30, || readyz(&node).0 == 200);
    assert_eq!(node.pid(), pid, "the daemon was not restarted");
    assert_eq!(first.approve(&node).status(), 200);
    verify_signature(&first.read(&node), b"document");
    let second = Pending::new(&node, "pg-user-2");
    assert_eq!(second.read(&node)["status"], "pending");
    assert!(!node.exited());
}

/// Three nodes on one database, one token and one CA (the `--dev` run that hosts it), audit
/// checkpoints every 2 s.
struct Nodes {
    _database: Database,
    dev: DevDaemon,
    nodes: Vec<DevDaemon>,
}

impl Nodes {
    fn start(admin: &str) -> Nodes {
        let database = Database::create(admin);
        let dev = DevDaemon::start(&[]);
        let nodes = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let on_pg = on_postgres(&database.url(), &format!("node-{name}"));
                dev.node(name, move |config| {
                    on_pg(config);
                    config["audit"]
                        .as_table_mut()
                        .unwrap()
                        .insert("checkpoint_interval_seconds".into(), 2.into());
                })
            })
            .collect();
        Nodes {
            _database: database,
            dev,
            nodes,
        }
    }

    /// The index of the node that leads now, once one does.
    fn leader(&self, alive: &[usize]) -> usize {
        let mut found = None;
        eventually("a node leads", 30, || {
            found = alive
                .iter()
                .copied()
                .find(|&i| readyz(&self.nodes[i]).1["leader"] == true);
            found.is_some()
        });
        found.unwrap()
    }
}

fn registered(node: &DevDaemon, id: &str) -> p256::ecdsa::SigningKey {
    let key = device_key();
    let answer = node
        .client("registrar")
        .post(format!("{}/v1/accounts", node.api))
        .json(&smartsign_tests::flow::registration(id, "1990-01-01", &key))
        .send()
        .unwrap();
    assert_eq!(answer.status(), 201);
    key
}

fn metric(node: &DevDaemon, name: &str) -> f64 {
    let text = reqwest::blocking::get(format!("{}/metrics", node.metrics))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

#[test]
fn a_request_moves_between_nodes_and_two_nodes_approving_it_sign_once() {
    let Some(admin) = pg::admin() else { return };
    let cluster = Nodes::start(&admin);
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let key = registered(a, "moving-1");

    // Created on a, approved on b, read on c.
    let hash = sha2::Sha256::digest(b"moving").to_vec();
    let pending = Pending::for_account(a, "moving-1", key.clone(), hash.clone());
    assert_eq!(pending.approve(b).status(), 200);
    verify_signature(&pending.read(c), b"moving");
    // Approved again, on any node: the approval was used once.
    assert_eq!(problem(pending.approve(c)).1, "request_not_pending");

    // Approved on b and c at the same moment, ten times over: one signature each.
    for round in 0..10 {
        let pending = Pending::for_account(a, "moving-1", key.clone(), hash.clone());
        let start = std::sync::Barrier::new(2);
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let approvals: Vec<_> = [b, c]
                .into_iter()
                .map(|node| {
                    let (pending, start) = (&pending, &start);
                    scope.spawn(move || {
                        start.wait();
                        pending.approve(node).status().as_u16()
                    })
                })
                .collect();
            approvals.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut sorted = statuses.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [200, 409], "round {round}: {statuses:?}");
        assert_eq!(pending.read(a)["status"], "signed");
    }

    // One log for the three nodes: every signature once, verified offline from any node.
    let dir = tempfile::tempdir().unwrap();
    eventually("the leader's checkpoint covers the log", 30, || {
        let records = a
            .client("auditor")
            .get(format!("{}/v1/audit/checkpoint", a.api))
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap();
        records["tree_size"].as_u64().unwrap_or(0) >= signed_count(c, 11)
    });
    for node in [a, b, c] {
        let records = smartsign_tests::flow::verify_audit(node, dir.path());
        let signed: Vec<&str> = records
            .lines()
            .filter(|line| line.contains("\"signing.signed\""))
            .collect();
        assert_eq!(signed.len(), 11, "{records}");
        // Each node's record index holds the records the others appended: the filter finds
        // them all (after the node's sync), exactly as they are in its copy of the log.
        let filtered = node
            .client("auditor")
            .get(format!(
                "{}/v1/audit/records?event=signing.signed&account_id=moving-1",
                node.api
            ))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert_eq!(filtered.lines().collect::<Vec<_>>(), signed);
        // And each node gives the owner its receipt, to the leader's checkpoint.
        let receipt = node
            .client("demo-a")
            .get(format!("{}/receipt", pending.url(node)))
            .send()
            .unwrap();
        assert_eq!(receipt.status(), 200, "{}", node.api);
        let receipt: Value = receipt.json().unwrap();
        assert!(signed.contains(&receipt["record"].as_str().unwrap()));
    }
}

/// The size of the log once it holds `expected` signatures, as `node` serves its records.
fn signed_count(node: &DevDaemon, expected: usize) -> u64 {
    let text = node
        .client("auditor")
        .get(format!("{}/v1/audit/records?from=0&limit=10000", node.api))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let signed = text
        .lines()
        .filter(|line| line.contains("\"signing.signed\""))
        .count();
    if signed < expected {
        return u64::MAX;
    }
    text.lines().count() as u64
}

#[test]
fn a_node_killed_under_load_loses_nothing_and_another_takes_the_sweeps() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(admin) = pg::admin() else { return };
    let mut cluster = Nodes::start(&admin);
    let leader = cluster.leader(&[0, 1, 2]);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &i in &survivors {
        assert_eq!(
            metric(
                &cluster.nodes[i],
                "smartsign_sweep_last_run_timestamp_seconds"
            ),
            0.0,
            "only the leader sweeps"
        );
    }
    let accounts: Vec<(String, p256::ecdsa::SigningKey)> = (0..6)
        .map(|i| {
            let id = format!("load-{i}");
            let key = registered(&cluster.nodes[survivors[0]], &id);
            (id, key)
        })
        .collect();

    // Each worker signs for its account: created on one node, approved on the next one alive.
    let dead = [
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    ];
    let stop = AtomicBool::new(false);
    let acknowledged: Mutex<Vec<(String, usize, String)>> = Mutex::new(Vec::new());
    let nodes = &cluster.nodes;
    std::thread::scope(|scope| {
        for (worker, (id, key)) in accounts.iter().enumerate() {
            let (dead, stop, acknowledged) = (&dead, &stop, &acknowledged);
            scope.spawn(move || {
                let mut round = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let alive: Vec<usize> = (0..3)
                        .filter(|&i| !dead[i].load(Ordering::Relaxed))
                        .collect();
                    let create = alive[(worker + round) % alive.len()];
                    let approve = alive[(worker + round + 1) % alive.len()];
                    let document = format!("{id} round {round}");
                    let hash = sha2::Sha256::digest(document.as_bytes()).to_vec();
                    let Ok(pending) = std::panic::catch_unwind(|| {
                        Pending::for_account(&nodes[create], id, key.clone(), hash)
                    }) else {
                        continue; // the node died while it answered: nothing acknowledged
                    };
                    if let Ok(answer) = pending.try_approve(&nodes[approve])
                        && answer.status() == 200
                    {
                        acknowledged.lock().unwrap().push((
                            pending.request["request_id"].as_str().unwrap().to_owned(),
                            approve,
                            document,
                        ));
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(8));
        dead[leader].store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        cluster_kill(nodes, leader);
        std::thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
    });
    cluster.nodes[leader].kill();
    let acknowledged = acknowledged.into_inner().unwrap();
    let before_kill = acknowledged.iter().filter(|(_, n, _)| *n == leader).count();
    eprintln!(
        "{} signatures acknowledged, {before_kill} of them by node {leader}, which was killed",
        acknowledged.len()
    );
    assert!(before_kill > 0, "the killed node had signed under load");
    assert!(
        acknowledged.len() > before_kill,
        "the survivors went on signing"
    );

    // Another node leads, and runs the sweeps.
    let next = cluster.leader(&survivors);
    eventually("the new leader sweeps", 30, || {
        metric(
            &cluster.nodes[next],
            "smartsign_sweep_last_run_timestamp_seconds",
        ) > 0.0
    });

    // Nothing acknowledged is lost: every signed request reads as signed from a survivor, and
    // its signature verifies.
    let reader = &cluster.nodes[survivors[0]];
    for (n, (request, _, document)) in acknowledged.iter().enumerate() {
        let read: Value = reader
            .client("demo-a")
            .get(format!("{}/v1/signing-requests/{request}", reader.api))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(read["status"], "signed", "{request}: {read}");
        if n % 10 == 0 {
            verify_signature(&read, document.as_bytes());
        }
    }

    // One log: it verifies offline, holds every acknowledged signature exactly once, and no
    // request twice.
    let dir = tempfile::tempdir().unwrap();
    let mut records = String::new();
    eventually(
        "the new leader's checkpoint covers every signature",
        60,
        || {
            records = smartsign_tests::flow::verify_audit(reader, dir.path());
            acknowledged
                .iter()
                .all(|(request, _, _)| records.contains(&format!("\"request_id\":\"{request}\"")))
        },
    );
    let mut signed: Vec<String> = records
        .lines()
        .filter(|line| line.contains("\"signing.signed\""))
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap();
            record["fields"]["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let total = signed.len();
    signed.sort();
    signed.dedup();
    assert_eq!(signed.len(), total, "a request signed twice");
    for (request, _, _) in &acknowledged {
        assert!(signed.contains(request), "{request} is not in the log");
    }
    drop(cluster.dev);
}

fn cluster_kill(nodes: &[DevDaemon], index: usize) {
    let pid = nodes[index].pid().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}
