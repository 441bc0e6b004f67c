//! The registrar's account routes (API.md "Accounts"): register, read, upgrade, device switch,
//! suspend and resume, the matching result, invalidation, deregistration, TAIDs and certificate
//! revocation. The rules themselves live in `cert-lifecycle`; this module applies them, seals the
//! personal data, and audits every change before answering.

use application::accounts::Change;
use application::ports::{AuditTrail, Keys};
pub(crate) use application::{certificate_status, rfc3339};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cert_lifecycle::Store;
use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, CertProfile, CertSerial, CertStatus,
    CertificateRecord, HkicNumber, RevocationReason, RuleError, ServiceName, SuspendedBy, Tier,
};
use hsm_adapter::UserKeyRef;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{Date, OffsetDateTime};

use crate::app::{App, PersonalName};
use crate::http::{Ctx, Reply};
use crate::problem::ApiError;
use crate::signing::device_key;
use application::fields;

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

fn date(field: &str, text: &str) -> Result<Date, ApiError> {
    let bad = || ApiError::InvalidRequest(format!("{field} must be a date YYYY-MM-DD"));
    if text.len() != 10 {
        return Err(bad());
    }
    Date::parse(text, &Iso8601::DATE).map_err(|_| bad())
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
    let body: RegisterBody = ctx.json()?;
    let now = app.clock.now();
    let id = account_id(&body.account_id)?;
    let tier: Tier = body
        .tier
        .parse()
        .map_err(|_| ApiError::InvalidRequest("tier must be iam_smart or iam_smart_plus".into()))?;
    let name = PersonalName {
        surname: name_part("surname", &body.surname)?,
        given_name: body
            .given_name
            .as_deref()
            .map(|given| name_part("given_name", given))
            .transpose()?,
    };
    let dob = date("date_of_birth", &body.date_of_birth)?;
    let hkic_number = hkic("hkic_number", &body.hkic_number)?;
    let device = device_key(&body.device_public_key)?;
    let (guardian_hkic, guardian_dob) = match &body.guardian {
        Some(guardian) => (
            Some(hkic("guardian.hkic_number", &guardian.hkic_number)?),
            Some(date("guardian.date_of_birth", &guardian.date_of_birth)?),
        ),
        None => (None, None),
    };
    if dob > cert_lifecycle::hk_date(now) {
        return Err(ApiError::InvalidRequest(
            "date_of_birth is in the future".into(),
        ));
    }
    cert_lifecycle::check_registration(dob, guardian_dob, now).map_err(|rule| match rule {
        RuleError::Underage => ApiError::Underage,
        RuleError::GuardianRequired => ApiError::GuardianRequired,
        RuleError::GuardianUnderage => ApiError::GuardianUnderage,
        _ => ApiError::InvalidRequest("guardian: an adult registers without a guardian".into()),
    })?;
    {
        let id = id.clone();
        if app
            .store(move |store| store.get_account(&id))
            .await?
            .is_some()
        {
            return Err(ApiError::AccountExists);
        }
    }

    // One account per person: no other account that is not deregistered may hold this HKIC
    // number (the store's unique index decides a race between two registrations).
    let hkic_hash = app.hkic_hash(&hkic_number).await?;
    drop(hkic_number);
    // The guardian is kept as the keyed hash of their number, like the holder's; their date of
    // birth only served the check above.
    let guardian_hkic_hash = match guardian_hkic {
        Some(number) => Some(app.hkic_hash(&number).await?),
        None => None,
    };
    if hkic_taken(&app, hkic_hash).await? {
        return Err(ApiError::HkicAlreadyRegistered);
    }

    let name_json =
        zeroize::Zeroizing::new(serde_json::to_vec(&name).map_err(|_| ApiError::Internal)?);
    let mut record = AccountRecord {
        id: id.clone(),
        tier: Tier::IamSmart,
        status: AccountStatus::Active,
        status_changed_at: now,
        suspended_by: None,
        rectify_by: None,
        sealed_name: app.seal("name", id.as_str(), &name_json).await?,
        sealed_dob: app
            .seal("dob", id.as_str(), body.date_of_birth.as_bytes())
            .await?,
        hkic_hash,
        device_public_key: device,
        device_generation: 1,
        current_certificate: None,
        created_at: now,
        guardian_hkic_hash,
        version: 0,
    };
    let minor = cert_lifecycle::is_minor(dob, now);
    let certificate = if tier == Tier::IamSmartPlus {
        record.tier = Tier::IamSmartPlus;
        let certificate = issue_certificate(&app, &record, &name, dob, now).await?;
        record.current_certificate = Some(certificate.serial.clone());
        Some(certificate)
    } else {
        None
    };
    let mut audit_fields = fields([
        ("account_id", json!(id.as_str())),
        ("tier", json!(tier.as_str())),
        ("minor", json!(minor)),
    ]);
    if let Some(certificate) = &certificate {
        audit_fields.insert("serial".into(), json!(certificate.serial.as_str()));
        audit_fields.insert("profile".into(), json!(certificate.profile.as_str()));
    }
    let stored = async {
        app.append("account.registered", &ctx.caller.to_string(), audit_fields)
            .await?;
        let (record, certificate) = (record.clone(), certificate.clone());
        app.store(move |store| match &certificate {
            Some(certificate) => store.insert_account_with_certificate(&record, certificate),
            None => store.insert_account(&record),
        })
        .await
    }
    .await;
    if let Err(error) = stored {
        // Undo the half-done registration: the key must not outlive its record.
        if let Some(certificate) = &certificate {
            discard_certificate(&app, certificate).await;
        }
        // A registration of the same person that won the race meanwhile.
        if matches!(error, ApiError::AccountExists) && hkic_taken(&app, hkic_hash).await? {
            let id = id.clone();
            if app
                .store(move |store| store.get_account(&id))
                .await?
                .is_none()
            {
                return Err(ApiError::HkicAlreadyRegistered);
            }
        }
        return Err(error);
    }
    tracing::info!(
        account = id.as_str(),
        tier = tier.as_str(),
        "account registered"
    );
    Ok(Reply::json(
        StatusCode::CREATED,
        &account_view(&app, &record, now).await?,
    ))
}

/// Whether an account that is not deregistered holds this HKIC hash.
async fn hkic_taken(app: &App, hkic_hash: [u8; 32]) -> Result<bool, ApiError> {
    let holders = app
        .store(move |store| store.accounts_with_hkic_hash(&hkic_hash))
        .await?;
    for holder in holders {
        if load(app, &holder).await?.status != AccountStatus::Deregistered {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Generates the user key in the HSM and has the CA certify it; on failure nothing is left.
async fn issue_certificate(
    app: &App,
    account: &AccountRecord,
    name: &PersonalName,
    dob: Date,
    now: OffsetDateTime,
) -> Result<CertificateRecord, ApiError> {
    let started = std::time::Instant::now();
    let key = app
        .hsm
        .generate_user_key(app.policy.key_algorithm, app.policy.key_mode)
        .await?;
    app.metrics.observe_hsm("generate", started.elapsed());
    let (profile, request) = issue_request(app, account, name, dob, &key, now);
    let (not_before, not_after) = (request.not_before.into(), request.not_after.into());
    let started = std::time::Instant::now();
    let issued = app.ca.cmp.issue(&request, &key).await;
    app.metrics.observe_cmp(started.elapsed(), issued.is_ok());
    let issued = match issued {
        Ok(issued) => issued,
        Err(error) => {
            tracing::error!(%error, account = account.id.as_str(), "the CA did not issue");
            destroy_key(app, &key).await;
            return Err(ApiError::Internal);
        }
    };
    let serial = CertSerial::parse(&issued.serial_hex).map_err(|_| ApiError::Internal)?;
    let sealed_der = match app
        .seal("certificate", account.id.as_str(), &issued.der)
        .await
    {
        Ok(sealed) => sealed,
        Err(error) => {
            destroy_key(app, &key).await;
            return Err(error.into());
        }
    };
    Ok(CertificateRecord {
        serial,
        account_id: account.id.clone(),
        profile,
        not_before,
        not_after,
        status: CertStatus::Valid,
        revocation_reason: None,
        revoked_at: None,
        sealed_der,
        key_ref: Some(key.to_bytes()),
        key_algorithm: key.algorithm().to_string(),
    })
}

/// What the CA is asked to certify for `key`: the account's name and keyed HKIC hash, the
/// profile that fits the holder's age at `now`, and the configured validity from `now`.
pub(crate) fn issue_request(
    app: &App,
    account: &AccountRecord,
    name: &PersonalName,
    dob: Date,
    key: &UserKeyRef,
    now: OffsetDateTime,
) -> (CertProfile, ca_bridge::IssueRequest) {
    let profile = if cert_lifecycle::is_minor(dob, now) {
        CertProfile::Minor
    } else {
        CertProfile::Adult
    };
    let not_before = now.replace_nanosecond(0).unwrap_or(now);
    let request = ca_bridge::IssueRequest {
        surname: name.surname.clone(),
        given_name: name.given_name.clone(),
        hkic_hash_hex: hex::encode(account.hkic_hash),
        public_key_spki_der: key.public_key().as_der().to_vec(),
        profile: match profile {
            CertProfile::Minor => ca_bridge::Profile::Minor,
            _ => ca_bridge::Profile::Adult,
        },
        not_before: not_before.into(),
        not_after: (not_before + app.policy.certificate_validity).into(),
    };
    (profile, request)
}

async fn destroy_key(app: &App, key: &UserKeyRef) {
    if let Err(error) = app.hsm.destroy_user_key(key).await {
        tracing::error!(%error, "could not destroy a user key; it is orphaned in the HSM");
    }
}

/// Undoes an issuance whose record could not be stored: the CA revokes the certificate (it was
/// never handed out) and the key is destroyed.
async fn discard_certificate(app: &App, certificate: &CertificateRecord) {
    let reason = RevocationReason::CessationOfOperation;
    if let Err(error) = application::accounts::revoke_at_ca(app, certificate, reason).await {
        tracing::error!(%error, serial = certificate.serial.as_str(), "could not revoke an unused certificate");
    }
    if let Some(key) = certificate
        .key_ref
        .as_deref()
        .and_then(|bytes| UserKeyRef::from_bytes(bytes).ok())
    {
        destroy_key(app, &key).await;
    }
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
pub(crate) async fn load(app: &App, id: &AccountId) -> Result<AccountRecord, ApiError> {
    app.lookup(|store| store.get_account(id))?
        .ok_or(ApiError::NotFound("account"))
}

async fn reply_account(app: &App, record: &AccountRecord) -> Result<Reply, ApiError> {
    Ok(Reply::ok(
        &account_view(app, record, app.clock.now()).await?,
    ))
}

fn require_empty_object(ctx: &Ctx) -> Result<(), ApiError> {
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
    let record = load(&app, &account_id(ctx.param(0))?).await?;
    reply_account(&app, &record).await
}

/// `POST /v1/accounts/{id}/upgrade`: "iAM Smart" to "iAM Smart+".
pub(crate) async fn upgrade(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    require_empty_object(&ctx)?;
    let now = app.clock.now();
    let mut record = load(&app, &account_id(ctx.param(0))?).await?;
    require_active(&record)?;
    if record.tier == Tier::IamSmartPlus {
        return Err(ApiError::AlreadyIamSmartPlus);
    }
    let name_json = app
        .unseal("name", record.id.as_str(), &record.sealed_name)
        .await?;
    let name: PersonalName = serde_json::from_slice(&name_json).map_err(|_| ApiError::Internal)?;
    let dob = application::date_of_birth(&*app, &record).await?;
    let certificate = issue_certificate(&app, &record, &name, dob, now).await?;
    record.tier = Tier::IamSmartPlus;
    record.current_certificate = Some(certificate.serial.clone());
    let result = async {
        app.append(
            "account.upgraded",
            &ctx.caller.to_string(),
            fields([
                ("account_id", json!(record.id.as_str())),
                ("serial", json!(certificate.serial.as_str())),
                ("profile", json!(certificate.profile.as_str())),
            ]),
        )
        .await?;
        let (record, certificate) = (record.clone(), certificate.clone());
        app.store(move |store| store.attach_certificate(&record, &certificate))
            .await
    }
    .await;
    if let Err(error) = result {
        discard_certificate(&app, &certificate).await;
        return Err(error);
    }
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

pub(crate) fn require_active(record: &AccountRecord) -> Result<(), ApiError> {
    Ok(application::accounts::require_active(record)?)
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
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        device_public_key: String,
    }
    let body: Body = ctx.json()?;
    let device = device_key(&body.device_public_key)?;
    change(&app, &ctx, Change::SwitchDevice(device)).await
}

/// `POST /v1/accounts/{id}/suspend`.
pub(crate) async fn suspend(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
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
    change(&app, &ctx, Change::Suspend(by)).await
}

/// `POST /v1/accounts/{id}/resume`.
pub(crate) async fn resume(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
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
    let by = match by {
        None => SuspendedBy::User,
        Some(by) => suspended_by(&by)?,
    };
    change(&app, &ctx, Change::Resume(by)).await
}

/// `POST /v1/accounts/{id}/matching`: the result of the regular HKIC / residency check.
pub(crate) async fn matching(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
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
                })?,
        ),
        "matched" => None,
        _ => {
            return Err(ApiError::InvalidRequest(
                "result must be matched or mismatch".into(),
            ));
        }
    };
    change(&app, &ctx, Change::Matching(acknowledged)).await
}

/// `POST /v1/accounts/{id}/invalidate`.
pub(crate) async fn invalidate(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        // Free text; checked for size, never stored or audited.
        reason: Option<String>,
    }
    let body: Body = ctx.json()?;
    check_reason(body.reason.as_deref())?;
    let id = account_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let record = application::accounts::invalidate(&*app, &actor, &id, app.clock.now()).await?;
    reply_account(&app, &record).await
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
    let record = load(&app, &account_id(ctx.param(0))?).await?;
    if record.status == AccountStatus::Deregistered {
        return Err(ApiError::AccountNotActive(record.status.as_str()));
    }
    let mut input = Vec::with_capacity(service.as_str().len() + 1 + record.id.as_str().len());
    input.extend_from_slice(service.as_str().as_bytes());
    input.push(0);
    input.extend_from_slice(record.id.as_str().as_bytes());
    let mac = app
        .hsm
        .hmac_sha256(hsm_adapter::SystemKey::Taid, &input)
        .await?;
    let taid = URL_SAFE_NO_PAD.encode(&mac[..16]);
    let stored = {
        let taid = cert_lifecycle::TaidRecord {
            taid,
            service: service.clone(),
            account_id: record.id.clone(),
        };
        app.store(move |store| store.put_taid(&taid)).await?
    };
    Ok(Reply::ok(
        &json!({"service": service.as_str(), "taid": stored.taid}),
    ))
}

/// `POST /v1/accounts/{id}/certificate/revoke` (registrar, officer).
pub(crate) async fn revoke_certificate(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
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
    let record = load(&app, &account_id(ctx.param(0))?).await?;
    if record.tier != Tier::IamSmartPlus {
        return Err(ApiError::NotIamSmartPlus);
    }
    let Some(serial) = record.current_certificate.clone() else {
        return Err(ApiError::NoCertificate);
    };
    let certificate = app
        .store(move |store| store.get_certificate(&serial))
        .await?
        .ok_or(ApiError::NoCertificate)?;
    if certificate.status == CertStatus::Revoked {
        return Err(ApiError::CertificateRevoked);
    }
    let actor = ctx.caller.to_string();
    application::accounts::revoke_current(&*app, &record, reason, &actor, app.clock.now()).await?;
    reply_account(&app, &record).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_must_have_the_exact_form() {
        assert!(date("d", "2009-05-01").is_ok());
        assert!(date("d", "2009-5-1").is_err());
        assert!(date("d", "2009-02-30").is_err());
    }

    #[test]
    fn names_refuse_control_characters_and_empty_text() {
        assert!(name_part("surname", "CHAN").is_ok());
        assert!(name_part("surname", "  ").is_err());
        assert!(name_part("surname", "CH\nAN").is_err());
    }
}
