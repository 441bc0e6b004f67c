//! The lifecycle sweeps' schedule and route: they run [`application::sweeps::run`] at start,
//! then every `policy.sweep_interval_seconds`, and on `POST /v1/admin/sweep`, one run at a
//! time. Each takes `now` from the daemon's clock, so `--dev` can move it.

use std::sync::Arc;
use std::time::Duration;

use application::sweeps::{self, Changes};
use cert_lifecycle::{AccountId, CertSerial};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::accounts::rfc3339;
use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;

/// The audit actor of the scheduled sweeps.
const SCHEDULER: &str = "system:sweep";

/// `POST /v1/admin/sweep` (officer): runs the sweeps now and answers what changed.
pub(crate) async fn sweep_now(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let now = app.clock.now();
    let started = std::time::Instant::now();
    let changes = run(&app, &ctx.caller.to_string(), now).await?;
    let mut body = report(&changes, now);
    body["duration_ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
    Ok(Reply::ok(&body))
}

/// How often a node checks that it leads, or whether the leader is gone: how long the sweeps
/// can stop when their node dies.
const LEADER_TICK: Duration = Duration::from_secs(5);

/// How often the leader of several nodes settles the work of nodes that died (work older than
/// `server::STRANDED_AFTER`).
const SETTLE_INTERVAL: Duration = Duration::from_secs(60);

/// Runs the sweeps at start and then every `interval` until shutdown, while this node leads
/// (always, on SQLite); a node that takes the lead over runs them at once. A failed run is
/// logged and retried at the next interval.
pub(crate) async fn scheduler(
    app: Arc<App>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_run: Option<std::time::Instant> = None;
    let mut last_settled: Option<std::time::Instant> = None;
    loop {
        if !app.leader.check(&app.metrics).await {
            last_run = None;
        } else if app.leader.shared()
            && last_run.is_some()
            && last_settled.is_none_or(|at| at.elapsed() >= SETTLE_INTERVAL)
        {
            // A dead node's work is settled within minutes, not at the next hourly sweep.
            last_settled = Some(std::time::Instant::now());
            let _running = app.sweeping.lock().await;
            settle_stranded(&app, app.clock.now()).await;
        } else if last_run.is_none_or(|at| at.elapsed() >= interval) {
            last_run = Some(std::time::Instant::now());
            let now = app.clock.now();
            match run(&app, SCHEDULER, now).await {
                Ok(changes) if changes.count() > 0 => {
                    tracing::info!(changed = changes.count(), "lifecycle sweep");
                }
                Ok(_) => tracing::debug!("lifecycle sweep: nothing due"),
                Err(error) => tracing::error!(%error, "lifecycle sweep stopped"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval.min(LEADER_TICK)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One run at a time in this process (a second one would only repeat the first's work).
async fn run(
    app: &App,
    actor: &str,
    now: OffsetDateTime,
) -> Result<Changes, application::AppError> {
    let _running = app.sweeping.lock().await;
    let started = std::time::Instant::now();
    if app.leader.shared() {
        settle_stranded(app, now).await;
    }
    let changes = sweeps::run(app, app.renewal.renewal_window, actor, now).await?;
    app.metrics
        .sweep_duration
        .set(started.elapsed().as_secs_f64());
    app.metrics
        .sweep_last_run
        .set(app.clock.now().unix_timestamp());
    Ok(changes)
}

/// With several nodes, work that a node's crash interrupted long enough ago is settled here, as
/// a node settles its own at start: the node may never come back.
async fn settle_stranded(app: &App, now: OffsetDateTime) {
    let scope = crate::server::stranded(app);
    if let Err(error) = application::renewal::recover(app, now, scope).await {
        tracing::error!(%error, "cannot settle the stranded key changes");
    }
    if let Err(error) = application::registration::recover(app, scope).await {
        tracing::error!(%error, "cannot settle the stranded issuances");
    }
    match application::signing::recover(app, now, scope).await {
        Ok(0) => {}
        Ok(failed) => tracing::warn!(failed, "stranded signing requests failed"),
        Err(error) => tracing::error!(%error, "cannot fail the stranded signing requests"),
    }
}

/// The route's answer.
fn report(changes: &Changes, now: OffsetDateTime) -> Value {
    let certificates = |list: &[(AccountId, CertSerial)]| -> Vec<Value> {
        list.iter()
            .map(|(account, serial)| {
                json!({"account_id": account.as_str(), "serial": serial.as_str()})
            })
            .collect()
    };
    let accounts =
        |list: &[AccountId]| -> Vec<Value> { list.iter().map(|id| json!(id.as_str())).collect() };
    json!({
        "now": rfc3339(now),
        "revocations_finished": certificates(&changes.revocations_finished),
        "minors_revoked": certificates(&changes.minors_revoked),
        "expired_keys_destroyed": certificates(&changes.expired_keys_destroyed),
        "invalidated": accounts(&changes.invalidated),
        "deregistered": accounts(&changes.deregistered),
        "renewal_windows_opened": certificates(&changes.renewal_windows_opened),
        "expiries_told": certificates(&changes.expiries_told),
        "audits_delivered": changes.audits_delivered,
    })
}
