//! Several nodes on PostgreSQL (`[store] backend = "postgres"`): the store lost and found again
//! without a restart, requests that move between nodes, and a node killed under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use smartsign_tests::flow::{Pending, problem, verify_signature};
use smartsign_tests::pg::{self, Cluster, Database};
use smartsign_tests::{DevDaemon, device_key};

/// `[store]` on the PostgreSQL database `url`, as node `id`.
fn on_postgres(url: &str, id: &str) -> impl FnOnce(&mut toml::Table) {
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
