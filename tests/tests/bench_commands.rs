//! `smartsign-ctl bench populate` and `bench sign`, run short as a user runs them: the population
//! is real (every flow signs for one of its accounts), resumable, and on disk; the report names
//! the figures issue 15 asks for. No timing is asserted: machines vary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use smartsign_tests::{binary, describe, run};

fn ctl(args: &[&str], state: &Path) -> String {
    // The benchmark starts the daemon from beside itself.
    binary("smartsignd", "smartsignd");
    let output = run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .args(args)
        .arg("--state-dir")
        .arg(state));
    let text = describe(&output);
    assert!(output.status.success(), "{text}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The numbers after `label` in the report, split at `/`, parenthesised notes left out.
fn figures(report: &str, label: &str) -> Vec<f64> {
    let line = report
        .lines()
        .find(|line| line.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in:\n{report}"));
    let mut rest = String::new();
    let mut depth = 0;
    for c in line[line.find(label).unwrap() + label.len()..].chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => rest.push(c),
            _ => {}
        }
    }
    rest.split('/')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn populate_resumes_and_sign_draws_from_the_population() {
    // On the disk under the target directory, as production keeps its state (not tmpfs).
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state = base.path().join("state");

    let first = ctl(&["bench", "populate", "--accounts", "12"], &state);
    assert!(first.contains("accounts: 12 (12 made now"), "{first}");
    let again = ctl(&["bench", "populate", "--accounts", "12"], &state);
    assert!(again.contains("accounts: 12 (0 made now"), "{again}");
    let grown = ctl(&["bench", "populate", "--accounts", "15"], &state);
    assert!(grown.contains("accounts: 15 (3 made now"), "{grown}");
    let listed = std::fs::read_to_string(state.join("bench-accounts.txt")).unwrap();
    let mut indexes: Vec<u64> = listed
        .lines()
        .map(|line| line.split(' ').next().unwrap().parse().unwrap())
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (0..15).collect::<Vec<_>>());

    let swept = ctl(
        &["bench", "sweep", "--accounts", "15", "--runs", "2"],
        &state,
    );
    assert!(swept.contains("accounts: 15"), "{swept}");
    assert_eq!(
        figures(&swept, "sweep with nothing due, 2 runs: min").len(),
        1,
        "{swept}"
    );

    let report = ctl(
        &[
            "bench",
            "sign",
            "--accounts",
            "15",
            "--seconds",
            "1",
            "--clients",
            "4",
        ],
        &state,
    );
    let report = report
        + &ctl(
            &[
                "bench",
                "sign",
                "--accounts",
                "15",
                "--seconds",
                "1",
                "--rate",
                "10",
            ],
            &state,
        );
    assert!(
        report.contains("state on ") && !report.contains("state on tmpfs"),
        "{report}"
    );
    let closed = figures(&report, "flows completed / failed / 429 waits");
    assert!(closed[0] > 0.0 && closed[1] == 0.0, "{report}");
    assert!(figures(&report, "raw same-work ops/s")[0] > 0.0, "{report}");
    assert!(figures(&report, "ratio to raw")[0] > 0.0, "{report}");
    assert!(report.contains("wrapped-key cache:"), "{report}");
    let open = figures(&report, "flows completed / failed ");
    assert!(open.len() >= 2, "{report}");
    assert!(report.contains("open loop at 10.0/s"), "{report}");
    assert_eq!(
        figures(&report, "HSM work alone p50 / p99 / p99.9").len(),
        3,
        "{report}"
    );
    assert_eq!(
        figures(&report, "added by the daemon p50 / p99 / p99.9").len(),
        3,
        "{report}"
    );
}

#[test]
fn nodes_reports_each_node_count_with_its_costs() {
    let Some(admin) = smartsign_tests::pg::admin() else {
        return;
    };
    let database = smartsign_tests::pg::Database::create(&admin);
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state = base.path().join("state");
    let args = [
        "bench",
        "nodes",
        "--database",
        &database.url(),
        "--nodes",
        "2",
        "--accounts",
        "12",
        "--clients",
        "4",
        "--seconds",
        "2",
    ];
    let report = ctl(&args, &state);
    assert!(report.contains("12 accounts in PostgreSQL"), "{report}");
    // The accounts are in the shared database, made through the first node.
    assert_eq!(
        database.sql("SELECT count(*) FROM accounts WHERE id LIKE 'bench-%'"),
        "12"
    );
    for nodes in ["1", "2"] {
        let row: Vec<&str> = report
            .lines()
            .find(|line| line.split_whitespace().next() == Some(nodes))
            .unwrap_or_else(|| panic!("no row for {nodes} node(s):\n{report}"))
            .split_whitespace()
            .collect();
        let rate: f64 = row[1].parse().unwrap();
        assert!(rate > 0.0, "{report}");
        assert_eq!(row[2], "0", "no flow failed: {report}");
    }
    // Each node made its own database round trips: one figure per node on the 2-node row.
    let two = report.lines().find(|line| line.starts_with('2')).unwrap();
    assert!(two.matches(" / ").count() >= 4, "{two}");
    // And the signing log in the database holds their signatures, once each.
    let signed: u64 = database
        .sql("SELECT count(*) FROM audit_records WHERE convert_from(line, 'UTF8') LIKE '%\"signing.signed\"%'")
        .parse()
        .unwrap();
    let requests: u64 = database
        .sql("SELECT count(*) FROM signing_requests WHERE status = 'signed'")
        .parse()
        .unwrap();
    assert_eq!(signed, requests);
    assert!(signed > 0);
}
