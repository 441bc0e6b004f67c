//! The officer's routes (API.md "Operations"): the appliance's state and, in `--dev` mode only,
//! the settable clock.

use application::ports::AuditTrail;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::accounts::rfc3339;
use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;
use application::fields;

/// `GET /v1/admin/status`: what `smartsign-ctl status` shows an officer.
pub(crate) async fn status(app: Arc<App>, _ctx: Ctx) -> Result<Reply, ApiError> {
    let readiness = crate::operations::readiness(&app).await;
    let stats = app.audit.stats();
    let now = app.clock.now();
    let checkpoint = app.audit.latest_checkpoint();
    let checkpoint_time = checkpoint
        .as_ref()
        .and_then(|c| OffsetDateTime::parse(c.timestamp().as_str(), &Rfc3339).ok());
    let pending = app.store(move |store| store.count_pending(now)).await.ok();
    let mut body = json!({
        "sealed": false,
        "ready": readiness.iter().all(|(_, problem)| problem.is_none()),
        "components": readiness
            .iter()
            .map(|(name, problem)| (name.to_string(), json!(problem.as_deref().unwrap_or("ok"))))
            .collect::<serde_json::Map<_, _>>(),
        "now": rfc3339(now),
        "dev": app.dev,
        "node": app.node_id,
        "leader": app.leader.leads(),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "hsm_workers": app.hsm.workers(),
        "key_mode": format!("{:?}", app.policy.key_mode).to_lowercase(),
        "pending_requests": pending,
        "audit": {
            "tree_size": stats.tree_size,
            "checkpoint_tree_size": checkpoint.as_ref().map(|c| c.tree_size()),
            "checkpoint_time": checkpoint_time.map(rfc3339),
            "checkpoint_age_seconds": checkpoint_time.map(|at| (now - at).whole_seconds()),
        },
    });
    app.metrics.catch_up(
        app.hsm.key_cache(),
        app.store.commit_counts(),
        app.store.round_trips(),
    );
    if let (Some(body), serde_json::Value::Object(report)) =
        (body.as_object_mut(), app.metrics.status_report())
    {
        body.extend(report);
    }
    Ok(Reply::ok(&body))
}

/// The body of `POST /v1/admin/clock`: the time to set, from 2000 to 2200.
pub(crate) fn clock_body(ctx: &Ctx) -> Result<OffsetDateTime, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        now: String,
    }
    let body: Body = ctx.json()?;
    // The clock's offset covers ±292 years; a development clock has no use beyond this range.
    OffsetDateTime::parse(&body.now, &Rfc3339)
        .ok()
        .filter(|now| (2000..=2200).contains(&now.year()))
        .ok_or_else(|| {
            ApiError::InvalidRequest("now must be an RFC 3339 time from 2000 to 2200".into())
        })
}

/// `POST /v1/admin/clock` (`--dev` only): sets the daemon's clock.
pub(crate) async fn set_clock(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    if !app.dev {
        return Err(ApiError::NotFound("route"));
    }
    let now = clock_body(&ctx)?;
    app.append(
        "admin.clock_set",
        &ctx.caller.to_string(),
        fields([("now", json!(rfc3339(now)))]),
    )
    .await?;
    app.clock.set(now);
    tracing::warn!(now = %rfc3339(now), "development clock moved");
    Ok(Reply::ok(&json!({"now": rfc3339(app.clock.now())})))
}
