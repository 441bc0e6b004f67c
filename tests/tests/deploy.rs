//! The deployment files (`ops/deploy/`) against the daemon they deploy: every metric the alert
//! rules and the dashboard use exists in a running daemon's `/metrics`, and the example
//! configuration is one that `smartsignd --check-config` accepts once its files are in place;
//! `smartsign-ctl status` reports a running daemon to an officer only; `smartsign-ctl docs`
//! writes man pages that render and completions that the shells parse.
//! (`ops/deploy/check` runs the real tools on them: systemd-analyze and promtool.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::process::Command;

use smartsign_tests::flow::Pending;
use smartsign_tests::{DevDaemon, binary, describe, run, workspace_root};

/// The `smartsign_*` names in `text`.
fn metric_names(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("smartsign_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // `smartsign_*` in a comment is a pattern, not a name.
        if !tail[..end].ends_with('_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_use_is_served() {
    let daemon = DevDaemon::start(&[]);
    // One signature, so that the per-signature series exist as they do in production.
    let pending = Pending::new(&daemon, "metrics-1");
    assert_eq!(pending.approve(&daemon).status(), 200);
    let exposed = reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap();
    let families: HashSet<&str> = exposed
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let deploy = workspace_root().join("ops/deploy");
    let mut used = HashSet::new();
    for file in [
        "prometheus/smartsign-alerts.yml",
        "prometheus/smartsign-alerts.test.yml",
        "grafana/smartsign.json",
    ] {
        used.extend(metric_names(
            &std::fs::read_to_string(deploy.join(file)).unwrap(),
        ));
    }
    assert!(used.len() > 15, "{used:?}");
    let mut missing: Vec<String> = used
        .into_iter()
        .filter(|name| {
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| families.contains(base))
                .unwrap_or(name);
            !families.contains(family)
        })
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "used by the deployment files, not served: {missing:?}"
    );
}

#[test]
fn the_example_configuration_passes_check_config_once_its_files_are_in_place() {
    let dev = DevDaemon::start(&[]);
    let state = dev.state_dir();
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/smartsign");
    let example =
        std::fs::read_to_string(workspace_root().join("ops/deploy/smartsignd.toml")).unwrap();
    // The files the example names, from the development run's state: TLS, the CA's
    // certificates, the RA certificate, and the ceremony transcript of its token.
    for (name, from) in [
        ("tls/server.pem", state.join("tls/server.pem")),
        ("tls/server.key", state.join("tls/server.key")),
        ("tls/client-ca.pem", state.join("tls/ca.pem")),
        ("ca/issuing.pem", state.join("ca/issuing.pem")),
        ("ca/root.pem", state.join("ca/root.pem")),
        ("ca/ra.pem", state.join("ca/cmp-client.pem")),
    ] {
        let to = etc.join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    let text = example
        .replace("/etc/smartsign/", &format!("{}/", etc.display()))
        // A ceremony transcript is the token's own, and a client CRL the client CA's: the
        // development run has neither (the check reads and verifies both).
        .lines()
        .filter(|line| !line.starts_with("ceremony_transcript") && !line.starts_with("client_crl"))
        .collect::<Vec<_>>()
        .join("\n");
    let path = etc.join("smartsignd.toml");
    std::fs::write(&path, text).unwrap();
    let checked = run(Command::new(binary("smartsignd", "smartsignd"))
        .arg("--check-config")
        .arg(&path));
    assert!(checked.status.success(), "{}", describe(&checked));

    // And a file the example names that is missing is said by name.
    std::fs::remove_file(etc.join("ca/root.pem")).unwrap();
    let checked = run(Command::new(binary("smartsignd", "smartsignd"))
        .arg("--check-config")
        .arg(&path));
    assert!(!checked.status.success());
    assert!(
        String::from_utf8_lossy(&checked.stderr).contains("ca.root_certificate"),
        "{}",
        describe(&checked)
    );
}

/// `smartsign-ctl status` against `daemon` as the client `name`.
fn ctl_status(daemon: &DevDaemon, name: &str, extra: &[&str]) -> std::process::Output {
    let state = daemon.state_dir();
    run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .args(["status", "--url", &daemon.api])
        .arg("--cert")
        .arg(state.join(format!("clients/{name}.pem")))
        .arg("--key")
        .arg(state.join(format!("clients/{name}.key")))
        .arg("--ca")
        .arg(state.join("tls/ca.pem"))
        .args(extra))
}

#[test]
fn ctl_status_shows_an_officer_the_running_daemon() {
    let daemon = DevDaemon::start(&[]);
    // A signature first, so that the audit log, the key cache and the status cache have
    // something to show; then a checkpoint and a sweep.
    let pending = Pending::new(&daemon, "status-user");
    assert_eq!(pending.approve(&daemon).status(), 200);
    let officer = daemon.client("officer");
    let swept = officer
        .post(format!("{}/v1/admin/sweep", daemon.api))
        .send()
        .unwrap();
    assert_eq!(swept.status(), 200);
    let checkpoint = daemon
        .client("auditor")
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap();
    assert_eq!(checkpoint.status(), 200);

    let shown = ctl_status(&daemon, "officer", &[]);
    assert!(shown.status.success(), "{}", describe(&shown));
    let text = String::from_utf8_lossy(&shown.stdout);
    for expected in [
        "sealed            no",
        "ready             yes",
        "  hsm             ok",
        "  audit           ok",
        "wrapped mode",
        "CA                answering",
        "status cache",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    assert!(
        !text.contains("last sweep        -"),
        "a sweep ran:\n{text}"
    );

    let json = ctl_status(&daemon, "officer", &["--json"]);
    assert!(json.status.success(), "{}", describe(&json));
    let body: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(body["audit"]["tree_size"].as_u64().unwrap() > 0, "{body}");
    assert!(
        body["audit"]["checkpoint_age_seconds"].as_i64().is_some(),
        "{body}"
    );
    assert!(
        body["status_cache"]["hits"].as_u64().unwrap()
            + body["status_cache"]["misses"].as_u64().unwrap()
            > 0,
        "{body}"
    );
    assert!(body["sweep"]["last_run"].is_string(), "{body}");

    // Only an officer: an auditor's certificate is refused, and the command says so.
    let refused = ctl_status(&daemon, "auditor", &[]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{}",
        describe(&refused)
    );
}

#[test]
fn ctl_docs_writes_man_pages_that_render_and_completions_the_shells_parse() {
    let out = tempfile::tempdir().unwrap();
    let written = run(Command::new(binary("smartsign-ops", "smartsign-ctl"))
        .args(["docs", "--out-dir"])
        .arg(out.path()));
    assert!(written.status.success(), "{}", describe(&written));
    for page in [
        "man/man8/smartsignd.8",
        "man/man1/smartsign-ctl.1",
        "man/man1/smartsign-ctl-status.1",
        "man/man1/smartsign-ctl-audit-verify.1",
    ] {
        let rendered = run(Command::new("man")
            .env("MANWIDTH", "100")
            .arg("-l")
            .arg(out.path().join(page)));
        assert!(rendered.status.success(), "{page}: {}", describe(&rendered));
        assert!(
            rendered.stderr.is_empty(),
            "{page} renders without warnings: {}",
            describe(&rendered)
        );
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(
            text.contains("OPTIONS") || text.contains("SUBCOMMANDS"),
            "{page}: {text}"
        );
    }
    let daemon_page = run(Command::new("man")
        .arg("-l")
        .arg(out.path().join("man/man8/smartsignd.8")));
    assert!(String::from_utf8_lossy(&daemon_page.stdout).contains("--check-config"));
    for bin in ["smartsignd", "smartsign-ctl"] {
        let bash = out.path().join("bash-completion/completions").join(bin);
        let parsed = run(Command::new("bash").arg("-n").arg(&bash));
        assert!(parsed.status.success(), "{bin}: {}", describe(&parsed));
        assert!(
            out.path()
                .join(format!("zsh/vendor-completions/_{bin}"))
                .exists()
        );
        assert!(
            out.path()
                .join(format!("fish/vendor_completions.d/{bin}.fish"))
                .exists()
        );
    }
    // The completion knows the subcommands: completing `smartsign-ctl st` offers `status`.
    let completed = run(Command::new("bash").arg("-c").arg(format!(
        "source {}; complete=$(complete -p smartsign-ctl) && function=${{complete##*-F }} && \
         COMP_WORDS=(smartsign-ctl st) && COMP_CWORD=1 && \
         ${{function%% *}} smartsign-ctl st smartsign-ctl && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        out.path()
            .join("bash-completion/completions/smartsign-ctl")
            .display()
    )));
    assert!(
        String::from_utf8_lossy(&completed.stdout)
            .lines()
            .any(|line| line == "status"),
        "{}",
        describe(&completed)
    );
}
