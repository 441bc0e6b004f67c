//! The lifecycle routes (API.md, "Consent for renewal and re-application"): the list of accounts
//! due for renewal, the consent challenge, renewal, re-application and deregistration from the
//! app. They parse, call the workflow of [`application::renewal`], and map its outcome.

use std::sync::Arc;

use application::renewal::{self, Consent};
use cert_lifecycle::ConsentPurpose;
use serde::Deserialize;
use serde_json::json;

use crate::accounts::{account_id, account_view, rfc3339};
use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;

/// `GET /v1/renewals/due` (registrar).
pub(crate) async fn due(app: Arc<App>, _ctx: Ctx) -> Result<Reply, ApiError> {
    let due = renewal::due(&*app, &app.renewal, app.clock.now()).await?;
    let accounts: Vec<_> = due
        .iter()
        .map(|(id, certificate)| {
            json!({
                "account_id": id.as_str(),
                "serial": certificate.serial.as_str(),
                "not_after": rfc3339(certificate.not_after),
            })
        })
        .collect();
    Ok(Reply::ok(&json!({ "accounts": accounts })))
}

/// `GET /v1/accounts/{id}/consent-challenge?purpose=renew|reapply|deregister` (gateway).
pub(crate) async fn consent_challenge(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let purpose: ConsentPurpose = ctx.query("purpose")?.parse().map_err(|_| {
        ApiError::InvalidRequest("purpose must be renew, reapply or deregister".into())
    })?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let now = app.clock.now();
    let challenge = renewal::challenge(&*app, &app.renewal, &actor, &id, purpose, now).await?;
    Ok(Reply::ok(&json!({
        "purpose": purpose.as_str(),
        "nonce": challenge.nonce,
        "expires_at": rfc3339(challenge.expires_at),
    })))
}

/// The body of the routes that need the user's consent.
pub(crate) fn consent(ctx: &Ctx) -> Result<Consent, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        nonce: String,
        device_signature: String,
    }
    let body: Body = ctx.json()?;
    if !(1..=128).contains(&body.nonce.len()) || !body.nonce.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::InvalidRequest(
            "nonce must be the nonce of a consent challenge".into(),
        ));
    }
    let device_signature = crate::signing::device_signature(&body.device_signature)?;
    Ok(Consent {
        nonce: body.nonce,
        device_signature,
    })
}

/// `POST /v1/accounts/{id}/deregistration` (gateway): the user ends the account from the app,
/// with the device's consent to a `deregister` challenge; the same effect as the registrar's
/// `DELETE /v1/accounts/{id}`.
pub(crate) async fn deregistration(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let consent = consent(&ctx)?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    renewal::deregister(&*app, &actor, &id, &consent, app.clock.now()).await?;
    Ok(Reply::empty(axum::http::StatusCode::NO_CONTENT))
}

/// `POST /v1/accounts/{id}/certificate/renewal` (gateway).
pub(crate) async fn renew(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let consent = consent(&ctx)?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let now = app.clock.now();
    let record = renewal::renew(&*app, &app.renewal, &actor, &id, &consent, now).await?;
    Ok(Reply::ok(&account_view(&app, &record, now).await?))
}

/// `POST /v1/accounts/{id}/certificate/reapply` (gateway). A certificate that is still valid is
/// renewed, not replaced: re-applying then answers `renewal_not_due`.
pub(crate) async fn reapply(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let consent = consent(&ctx)?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let now = app.clock.now();
    let record = renewal::reapply(&*app, &app.renewal, &actor, &id, &consent, now).await?;
    Ok(Reply::ok(&account_view(&app, &record, now).await?))
}
