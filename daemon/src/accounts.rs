//! The registrar's account routes (API.md "Accounts"): register, read, upgrade, device switch,
//! suspend and resume, the matching result, invalidation, deregistration, TAIDs and certificate
//! revocation. The rules themselves live in `cert-lifecycle`; this module applies them, seals the
//! personal data, and audits every change before answering.

use application::PersonalName;
use application::accounts::Change;
use application::ports::Keys;
use application::registration::{self, NewAccount};
pub(crate) use application::{certificate_status, rfc3339};
use std::sync::Arc;

use axum::http::StatusCode;

use cert_lifecycle::{
    AccountId, AccountRecord, CertificateRecord, HkicNumber, RevocationReason, ServiceName,
    SuspendedBy, Tier,
};
use serde::Deserialize;
use serde_json::{Value, json};
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{Date, OffsetDateTime};

use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;
use crate::signing::device_key;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    account_id: String,
    tier: String,
    surname: String,
    given_name: Option<String>,
    date_of_birth: String,
    hkic_number: String,
    device_public_key: String,
    guardian: Option<GuardianBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardianBody {
    hkic_number: String,
    date_of_birth: String,
}

pub(crate) fn account_id(text: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(text).map_err(|error| ApiError::InvalidRequest(format!("account_id: {error}")))
}

/// A date of birth: `YYYY-MM-DD`, from 1900-01-01 to today.
fn date(field: &str, text: &str, today: Date) -> Result<Date, ApiError> {
    let bad = || {
        ApiError::InvalidRequest(format!(
            "{field} must be a date YYYY-MM-DD from 1900-01-01 to today"
        ))
    };
    if text.len() != 10 {
        return Err(bad());
    }
    let date = Date::parse(text, &Iso8601::DATE).map_err(|_| bad())?;
    if date < time::macros::date!(1900 - 01 - 01) || date > today {
        return Err(bad());
    }
    Ok(date)
}

fn hkic(field: &str, text: &str) -> Result<HkicNumber, ApiError> {
    HkicNumber::parse(text).map_err(|error| ApiError::InvalidHkic(format!("{field}: {error}")))
}

fn name_part(field: &str, text: &str) -> Result<String, ApiError> {
    let text = text.trim();
    if text.is_empty() || text.chars().count() > 100 || text.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(format!(
            "{field} must be 1 to 100 characters without control characters"
        )));
    }
    Ok(text.to_owned())
}

/// `POST /v1/accounts`.
pub(crate) async fn register(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let now = app.clock.now();
    let new = registration_body(&ctx, now.date())?;
    let actor = ctx.caller.to_string();
    let record = registration::register(&*app, &app.issuance, &actor, new, now).await?;
    Ok(Reply::json(
        StatusCode::CREATED,
        &account_view(&app, &record, now).await?,
    ))
}

/// The body of `POST /v1/accounts`, each field checked where it is parsed (dates of birth
/// from 1900 to `today`).
pub(crate) fn registration_body(ctx: &Ctx, today: Date) -> Result<NewAccount, ApiError> {
    let body: RegisterBody = ctx.json()?;
    let tier: Tier = body
        .tier
        .parse()
        .map_err(|_| ApiError::InvalidRequest("tier must be iam_smart or iam_smart_plus".into()))?;
    let guardian = match &body.guardian {
        Some(guardian) => Some((
            hkic("guardian.hkic_number", &guardian.hkic_number)?,
            date("guardian.date_of_birth", &guardian.date_of_birth, today)?,
        )),
        None => None,
    };
    let new = NewAccount {
        id: account_id(&body.account_id)?,
        tier,
        name: PersonalName {
            surname: name_part("surname", &body.surname)?,
            given_name: body
                .given_name
                .as_deref()
                .map(|given| name_part("given_name", given))
                .transpose()?,
        },
        date_of_birth: date("date_of_birth", &body.date_of_birth, today)?,
        hkic: hkic("hkic_number", &body.hkic_number)?,
        device_public_key: device_key(&body.device_public_key)?,
        guardian,
    };
    Ok(new)
}

/// The body of every account route.
pub(crate) async fn account_view(
    app: &App,
    record: &AccountRecord,
    now: OffsetDateTime,
) -> Result<Value, ApiError> {
    let dob = if record.sealed_dob.is_empty() {
        None
    } else {
        Some(application::date_of_birth(app, record).await?)
    };
    let certificate = match &record.current_certificate {
        None => Value::Null,
        Some(serial) => {
            let serial = serial.clone();
            match app
                .store(move |store| store.get_certificate(&serial))
                .await?
            {
                None => Value::Null,
                Some(certificate) => certificate_view(app, &certificate, now).await?,
            }
        }
    };
    Ok(json!({
        "account_id": record.id.as_str(),
        "tier": record.tier.as_str(),
        "status": record.status.as_str(),
        "minor": dob.is_some_and(|dob| cert_lifecycle::is_minor(dob, now)),
        "adult_on": dob.map(|dob| cert_lifecycle::adult_on(dob).to_string()),
        "rectify_by": record.rectify_by.map(rfc3339),
        "certificate": certificate,
        "device_generation": record.device_generation,
        "guardian": record.guardian_hkic_hash.is_some(),
    }))
}

async fn certificate_view(
    app: &App,
    certificate: &CertificateRecord,
    now: OffsetDateTime,
) -> Result<Value, ApiError> {
    // A deregistered account's certificates are erased: the summary stays, the PEM goes.
    let pem = if certificate.sealed_der.is_empty() {
        None
    } else {
        let der = app
            .unseal(
                "certificate",
                certificate.account_id.as_str(),
                &certificate.sealed_der,
            )
            .await?;
        Some(application::pem("CERTIFICATE", &der))
    };
    Ok(json!({
        "serial": certificate.serial.as_str(),
        "profile": certificate.profile.as_str(),
        "status": certificate_status(certificate, now).as_str(),
        "not_before": rfc3339(certificate.not_before),
        "not_after": rfc3339(certificate.not_after),
        "revocation_reason": certificate.revocation_reason.map(|reason| reason.as_str()),
        "pem": pem,
    }))
}

/// Loads an account or gives `not_found`.
fn load(app: &App, id: &AccountId) -> Result<AccountRecord, ApiError> {
    Ok(application::accounts::load(app, id)?)
}

async fn reply_account(app: &App, record: &AccountRecord) -> Result<Reply, ApiError> {
    Ok(Reply::ok(
        &account_view(app, record, app.clock.now()).await?,
    ))
}

pub(crate) fn require_empty_object(ctx: &Ctx) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if ctx.body.is_empty() {
        return Ok(());
    }
    ctx.json::<Empty>().map(|_| ())
}

/// `GET /v1/accounts/{id}`.
pub(crate) async fn get(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let record = load(&app, &account_id(ctx.param(0))?)?;
    reply_account(&app, &record).await
}

/// `POST /v1/accounts/{id}/upgrade`: "iAM Smart" to "iAM Smart+".
pub(crate) async fn upgrade(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    require_empty_object(&ctx)?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let record = registration::upgrade(&*app, &app.issuance, &actor, &id, app.clock.now()).await?;
    reply_account(&app, &record).await
}

/// Free-text reasons may name the person: they are checked for size and then dropped, never
/// stored or audited.
fn check_reason(reason: Option<&str>) -> Result<(), ApiError> {
    if reason.is_some_and(|reason| reason.chars().count() > 500) {
        return Err(ApiError::InvalidRequest(
            "reason must be at most 500 characters".into(),
        ));
    }
    Ok(())
}

/// Applies `change` to the account of the route through the application layer and answers with
/// the account as stored.
async fn change(app: &App, ctx: &Ctx, change: Change) -> Result<Reply, ApiError> {
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let now = app.clock.now();
    let record = application::accounts::change(app, &actor, &id, change, now).await?;
    reply_account(app, &record).await
}

fn suspended_by(text: &str) -> Result<SuspendedBy, ApiError> {
    text.parse()
        .map_err(|_| ApiError::InvalidRequest("by must be user or government".into()))
}

/// `PUT /v1/accounts/{id}/device`: binds a new device; the old key stops working.
pub(crate) async fn switch_device(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let device = device_body(&ctx)?;
    change(&app, &ctx, Change::SwitchDevice(device)).await
}

/// The body of `PUT /v1/accounts/{id}/device`: the new device key's DER.
pub(crate) fn device_body(ctx: &Ctx) -> Result<Vec<u8>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        device_public_key: String,
    }
    let body: Body = ctx.json()?;
    device_key(&body.device_public_key)
}

/// `POST /v1/accounts/{id}/suspend`.
pub(crate) async fn suspend(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let by = suspension_body(&ctx)?;
    change(&app, &ctx, Change::Suspend(by)).await
}

/// The body of `POST /v1/accounts/{id}/suspend`: who suspends.
pub(crate) fn suspension_body(ctx: &Ctx) -> Result<SuspendedBy, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        by: String,
        // Free text that may name the person; checked for size, never stored or audited.
        reason: Option<String>,
    }
    let body: Body = ctx.json()?;
    let by = suspended_by(&body.by)?;
    check_reason(body.reason.as_deref())?;
    Ok(by)
}

/// `POST /v1/accounts/{id}/resume`.
pub(crate) async fn resume(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let by = resumption_body(&ctx)?;
    change(&app, &ctx, Change::Resume(by)).await
}

/// The body of `POST /v1/accounts/{id}/resume`: whose suspension is lifted.
pub(crate) fn resumption_body(ctx: &Ctx) -> Result<SuspendedBy, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        by: Option<String>,
    }
    // Without `by`, the user's own suspension (a client of API.md before its additions).
    let by = if ctx.body.is_empty() {
        None
    } else {
        ctx.json::<Body>()?.by
    };
    match by {
        None => Ok(SuspendedBy::User),
        Some(by) => suspended_by(&by),
    }
}

/// `POST /v1/accounts/{id}/matching`: the result of the regular HKIC / residency check.
pub(crate) async fn matching(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let acknowledged = matching_body(&ctx, app.clock.now())?;
    change(&app, &ctx, Change::Matching(acknowledged)).await
}

/// The body of `POST /v1/accounts/{id}/matching`: for a mismatch, when the user acknowledged
/// it (a past time from 2000 on, given `now`).
pub(crate) fn matching_body(
    ctx: &Ctx,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        result: String,
        acknowledged_at: Option<String>,
    }
    let body: Body = ctx.json()?;
    let acknowledged = match body.result.as_str() {
        "mismatch" => Some(
            body.acknowledged_at
                .as_deref()
                .ok_or_else(|| {
                    ApiError::InvalidRequest("acknowledged_at is required for a mismatch".into())
                })
                .and_then(|text| {
                    OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
                        ApiError::InvalidRequest("acknowledged_at must be an RFC 3339 time".into())
                    })
                })
                .and_then(|at| acknowledged_in_range(at, now))?,
        ),
        "matched" => None,
        _ => {
            return Err(ApiError::InvalidRequest(
                "result must be matched or mismatch".into(),
            ));
        }
    };
    Ok(acknowledged)
}

/// The user acknowledged a mismatch in the past (a minute of clock skew allowed), and not
/// before the scheme existed: anything else is a client's error, refused naming the field.
fn acknowledged_in_range(
    at: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, ApiError> {
    let earliest = time::macros::datetime!(2000-01-01 00:00 UTC);
    if at < earliest || at > now + time::Duration::minutes(1) {
        return Err(ApiError::InvalidRequest(
            "acknowledged_at must be a past time, from 2000 on".into(),
        ));
    }
    Ok(at)
}

/// `POST /v1/accounts/{id}/invalidate`.
pub(crate) async fn invalidate(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    invalidation_body(&ctx)?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let record = application::accounts::invalidate(&*app, &actor, &id, app.clock.now()).await?;
    reply_account(&app, &record).await
}

/// The body of `POST /v1/accounts/{id}/invalidate`: a reason, checked and dropped.
pub(crate) fn invalidation_body(ctx: &Ctx) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        // Free text; checked for size, never stored or audited.
        reason: Option<String>,
    }
    let body: Body = ctx.json()?;
    check_reason(body.reason.as_deref())
}

/// `DELETE /v1/accounts/{id}`: revoke, destroy the key, delete the personal data.
pub(crate) async fn deregister(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    application::accounts::deregister(&*app, &actor, &id, app.clock.now()).await?;
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// `GET /v1/accounts/{id}/taid?service=NAME`.
pub(crate) async fn taid(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = ServiceName::parse(ctx.query("service")?)
        .map_err(|error| ApiError::InvalidRequest(format!("service: {error}")))?;
    let id = account_id(ctx.param(0))?;
    let stored = application::accounts::taid(&*app, &id, &service).await?;
    Ok(Reply::ok(
        &json!({"service": service.as_str(), "taid": stored.taid}),
    ))
}

/// `POST /v1/accounts/{id}/certificate/revoke` (registrar, officer).
pub(crate) async fn revoke_certificate(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let reason = revocation_body(&ctx)?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let now = app.clock.now();
    let record = application::accounts::revoke_certificate(&*app, &actor, &id, reason, now).await?;
    reply_account(&app, &record).await
}

/// The body of `POST /v1/accounts/{id}/certificate/revoke`: the RFC 5280 reason.
pub(crate) fn revocation_body(ctx: &Ctx) -> Result<RevocationReason, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        reason: String,
    }
    let body: Body = ctx.json()?;
    let reason: RevocationReason = body.reason.parse().map_err(|_| {
        ApiError::InvalidRequest(
            "reason must be key_compromise, affiliation_changed, superseded, \
             cessation_of_operation or privilege_withdrawn"
                .into(),
        )
    })?;
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_must_have_the_exact_form_and_be_in_range() {
        let today = time::macros::date!(2026 - 12 - 06);
        assert!(date("d", "2009-05-01", today).is_ok());
        assert!(date("d", "1900-01-01", today).is_ok());
        assert!(date("d", "2026-12-06", today).is_ok());
        for bad in [
            "2009-5-1",
            "2009-02-30",
            "1899-12-31",
            "2026-12-07",
            "9999-12-31",
        ] {
            assert!(date("d", bad, today).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_refuse_control_characters_and_empty_text() {
        assert!(name_part("surname", "CHAN").is_ok());
        assert!(name_part("surname", "  ").is_err());
        assert!(name_part("surname", "CH\nAN").is_err());
    }
}
