//! PostgreSQL for the tests of several nodes: the cluster `SMARTSIGN_TEST_PG` names (ops/test
//! starts a throwaway one with `ops/pg start`), a database of its own for each test, and, for a
//! test that stops its database, a throwaway cluster of its own.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{describe, workspace_root};

/// Where the tests find their PostgreSQL: libpq `key=value`s naming a socket directory and a
/// superuser, as `ops/pg start DIR` prints them.
pub const ENV: &str = "SMARTSIGN_TEST_PG";

/// The administrator's connection string; `None` when the PostgreSQL tests are skipped
/// (`SMARTSIGN_TEST_PG=skip`). Unset is a failure: the suite must not pass by running less.
pub fn admin() -> Option<String> {
    match std::env::var(ENV) {
        Ok(value) if value == "skip" => None,
        Ok(value) => Some(value),
        Err(_) => panic!(
            "{ENV} is not set: start a throwaway cluster with `ops/pg start DIR` and export the \
             line it prints (ops/test does both), or set {ENV}=skip to skip the PostgreSQL tests"
        ),
    }
}

/// Runs `sql` with psql as `admin`; panics with psql's output when it fails.
pub fn psql(admin: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .arg(admin)
        .args(["--no-psqlrc", "--tuples-only", "--no-align", "--quiet"])
        .args(["--set", "ON_ERROR_STOP=1", "--command", sql])
        .output()
        .expect("run psql");
    assert!(output.status.success(), "psql {sql}: {}", describe(&output));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A database of its own in a cluster, dropped (with its connections) at the end.
#[derive(Debug)]
pub struct Database {
    admin: String,
    name: String,
}

impl Database {
    /// A new, empty database in the cluster `admin` reaches.
    pub fn create(admin: &str) -> Database {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "smartsign_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        psql(admin, &format!("CREATE DATABASE {name}"));
        Database {
            admin: admin.to_owned(),
            name,
        }
    }

    /// The connection string of the database (the administrator's, no password).
    pub fn url(&self) -> String {
        format!("{} dbname={}", self.admin, self.name)
    }

    /// Runs `sql` in the database.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.url(), sql)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // Best effort: a failure here must not hide the test's own.
        let _ = Command::new("psql")
            .arg(&self.admin)
            .args(["--no-psqlrc", "--quiet", "--command"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

/// A throwaway cluster of one test's own (`ops/pg start`), which the test may stop and start
/// again; stopped and removed when dropped.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Makes and starts a cluster (initdb: a few seconds).
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("smartsign-pg-")
            .tempdir()
            .expect("temporary directory");
        let cluster = Cluster { dir };
        cluster.ops(&["start"]);
        cluster
    }

    /// The administrator's connection string.
    pub fn admin(&self) -> String {
        format!("host={} user=postgres", self.dir.path().display())
    }

    /// Stops the server (`pg_ctl stop --mode=fast`): every connection is closed.
    pub fn stop(&self) {
        self.ops(&["stop"]);
    }

    /// Starts the stopped server again.
    pub fn resume(&self) {
        self.ops(&["resume"]);
    }

    fn ops(&self, action: &[&str]) {
        let output = Command::new(workspace_root().join("ops/pg"))
            .args(action)
            .arg(self.dir.path())
            .output()
            .expect("run ops/pg");
        assert!(
            output.status.success(),
            "ops/pg {action:?}: {}",
            describe(&output)
        );
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("ops/pg"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}
