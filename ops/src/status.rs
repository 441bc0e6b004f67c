//! `smartsign-ctl status`: a running daemon's state for an officer, from `GET /v1/admin/status`
//! with the officer's client certificate: sealed or not, readiness by component, keys, the
//! audit log and its checkpoint, the CA and the status cache, the last lifecycle sweep.

use std::fmt::Write as _;

use serde_json::Value;

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:
  smartsign-ctl status --url https://appliance:8443 --cert officer-1.pem --key officer-1.key \\
      --ca tls-ca.pem

Exit status: 0 when the daemon is unsealed and every component is ready, 1 otherwise (sealed,
a component failing, or the daemon unreachable), so that a script or a check can use it.")]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    daemon: crate::client::DaemonArgs,
    /// Print the daemon's JSON answer as it is, instead of the summary.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: StatusArgs) -> Result<(), Box<dyn std::error::Error>> {
    let client = args.daemon.client()?;
    let url = args.daemon.at("/v1/admin/status");
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|error| format!("cannot reach {url}: {error}"))?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        return Err(format!("the daemon answered {status}: {body}").into());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", summary(&body));
    }
    if body["ready"] == true && body["sealed"] == false {
        Ok(())
    } else {
        Err("the daemon is not ready (see above)".into())
    }
}

/// A value for the summary: text as it is, `null` as a dash.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The officer's summary of a status answer, a line a fact.
fn summary(body: &Value) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<18}{value}");
    };
    if body["sealed"] == true {
        line(
            "sealed",
            format!(
                "yes: {} of {} shares received (smartsign-ctl unseal)",
                show(&body["shares_received"]),
                show(&body["threshold"])
            ),
        );
        line("uptime", format!("{} s", show(&body["uptime_seconds"])));
        return out;
    }
    line("sealed", "no".into());
    let ready = if body["ready"] == true { "yes" } else { "NO" };
    line("ready", ready.into());
    if let Some(components) = body["components"].as_object() {
        for (name, state) in components {
            line(&format!("  {name}"), show(state));
        }
    }
    line(
        "node",
        format!(
            "{} ({})",
            show(&body["node"]),
            if body["leader"] == true {
                "leader"
            } else {
                "follower"
            }
        ),
    );
    line("uptime", format!("{} s", show(&body["uptime_seconds"])));
    line(
        "keys",
        format!(
            "{} mode, {} HSM workers, key cache {} hits / {} misses",
            show(&body["key_mode"]),
            show(&body["hsm_workers"]),
            show(&body["key_cache"]["hits"]),
            show(&body["key_cache"]["misses"])
        ),
    );
    line("pending requests", show(&body["pending_requests"]));
    let audit = &body["audit"];
    line(
        "audit log",
        format!(
            "{} records; checkpoint at {} ({}, {} s old)",
            show(&audit["tree_size"]),
            show(&audit["checkpoint_tree_size"]),
            show(&audit["checkpoint_time"]),
            show(&audit["checkpoint_age_seconds"])
        ),
    );
    let ca = &body["ca"];
    let errors = &ca["errors"];
    line(
        "CA",
        format!(
            "{}; errors cmp {} / ocsp {} / crl {}; CRL {} s old",
            if ca["ok"] == true {
                "answering".to_owned()
            } else {
                show(&ca["problem"])
            },
            show(&errors["cmp"]),
            show(&errors["ocsp"]),
            show(&errors["crl"]),
            show(&ca["crl_age_seconds"])
        ),
    );
    line(
        "status cache",
        format!(
            "{} hits / {} misses",
            show(&body["status_cache"]["hits"]),
            show(&body["status_cache"]["misses"])
        ),
    );
    line(
        "last sweep",
        format!(
            "{} (took {} s)",
            show(&body["sweep"]["last_run"]),
            show(&body["sweep"]["duration_seconds"])
        ),
    );
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_sealed_daemon_shows_the_shares_still_needed() {
        let text = super::summary(&json!({
            "sealed": true, "shares_received": 1, "threshold": 2, "ready": false,
            "uptime_seconds": 7,
        }));
        assert!(text.contains("yes: 1 of 2 shares received"), "{text}");
    }

    #[test]
    fn a_failing_component_and_a_missing_checkpoint_show() {
        let text = super::summary(&json!({
            "sealed": false, "ready": false,
            "components": {"hsm": "ok", "ca": "the latest request to the CA failed"},
            "audit": {"tree_size": 3, "checkpoint_tree_size": null},
        }));
        assert!(text.contains("ready             NO"), "{text}");
        assert!(
            text.contains("the latest request to the CA failed"),
            "{text}"
        );
        assert!(text.contains("checkpoint at -"), "{text}");
    }
}
