//! Renewal and re-application of iAM Smart-Certs (API.md, "Consent for renewal and
//! re-application"; DOMAIN.md, "iAM Smart-Cert lifecycle"): the consent challenge, the list of
//! accounts due for renewal, the two key changes, and the start-up recovery of a key change that a
//! crash interrupted.
//!
//! A key change is journalled (`key_changes` in the store) before the new key is made, and the
//! journal follows every step: the new key's reference, then the new certificate. The new
//! certificate becomes current in one transaction; only then is the old one revoked (renewal) or
//! its key destroyed (re-application), and the journal row deleted. [`recover`] runs before the
//! daemon serves and, per unfinished row, finishes the change when the new certificate is current
//! and otherwise undoes it: the unused certificate is revoked at the CA and the new key destroyed.
//!
//! With resident keys one gap remains: a crash between the HSM's key generation and the journal
//! write of its reference leaves that key in the token unreferenced (wrapped keys, the default,
//! leave nothing behind).

use application::ports::{AuditTrail, Keys};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cert_lifecycle::{
    AccountRecord, CertSerial, CertStatus, CertificateRecord, ConsentChallenge, ConsentPurpose,
    KeyChangeJournal, RevocationReason, RuleError, Store, StoreError, Tier,
};
use hsm_adapter::UserKeyRef;
use serde::Deserialize;
use serde_json::json;
use time::{Date, OffsetDateTime};

use crate::accounts::{
    account_id, account_view, certificate_status, load, require_active, rfc3339,
};
use crate::app::{App, PersonalName};
use crate::http::{Ctx, Reply};
use crate::problem::ApiError;
use application::fields;
use application::signing::device_signature_valid;

/// The actor of what start-up recovery does.
const RECOVERY_ACTOR: &str = "system";

/// The failpoint ([`App::failpoint`]) of a key-change step: `renewal-after-key`,
/// `renewal-after-issue`, `renewal-after-store`, and the same three of `reapply-`.
fn failpoint(app: &App, purpose: ConsentPurpose, step: &str) {
    let name = match purpose {
        ConsentPurpose::Renew => format!("renewal-{step}"),
        _ => format!("reapply-{step}"),
    };
    app.failpoint(&name);
}

/// `GET /v1/renewals/due` (registrar).
pub(crate) async fn due(app: Arc<App>, _ctx: Ctx) -> Result<Reply, ApiError> {
    let now = app.clock.now();
    let until = now + app.policy.renewal_window;
    let due = app
        .store(move |store| store.current_certificates_ending(now, until))
        .await?;
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
    let record = load(&app, &account_id(ctx.param(0))?).await?;
    if purpose == ConsentPurpose::Deregister {
        // A user may end any account of theirs that is not ended already, suspended or not.
        if record.status == cert_lifecycle::AccountStatus::Deregistered {
            return Err(ApiError::AccountNotActive(record.status.as_str()));
        }
    } else {
        require_active(&record)?;
        if record.tier != Tier::IamSmartPlus {
            return Err(ApiError::NotIamSmartPlus);
        }
    }
    let now = app.clock.now();
    let nonce = URL_SAFE_NO_PAD.encode(app.random(32).await?);
    let challenge = ConsentChallenge {
        account_id: record.id.clone(),
        purpose,
        nonce,
        expires_at: (now + app.policy.request_ttl)
            .replace_nanosecond(0)
            .unwrap_or(now),
    };
    app.append(
        "certificate.consent_challenged",
        &ctx.caller.to_string(),
        fields([
            ("account_id", json!(record.id.as_str())),
            ("purpose", json!(purpose.as_str())),
            ("expires_at", json!(rfc3339(challenge.expires_at))),
        ]),
    )
    .await?;
    {
        let challenge = challenge.clone();
        app.store(move |store| store.put_consent_challenge(&challenge))
            .await?;
    }
    Ok(Reply::ok(&json!({
        "purpose": purpose.as_str(),
        "nonce": challenge.nonce,
        "expires_at": rfc3339(challenge.expires_at),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentBody {
    nonce: String,
    device_signature: String,
}

/// `POST /v1/accounts/{id}/deregistration` (gateway): the user ends the account from the app,
/// with the device's consent to a `deregister` challenge; the same effect as the registrar's
/// `DELETE /v1/accounts/{id}`.
pub(crate) async fn deregistration(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let body: ConsentBody = ctx.json()?;
    let now = app.clock.now();
    let mut record = load(&app, &account_id(ctx.param(0))?).await?;
    if record.status == cert_lifecycle::AccountStatus::Deregistered {
        return Err(ApiError::AccountNotActive(record.status.as_str()));
    }
    let actor = ctx.caller.to_string();
    check_consent(
        &app,
        &actor,
        &record,
        ConsentPurpose::Deregister,
        &body,
        now,
    )
    .await?;
    application::accounts::deregister_account(&*app, &mut record, &actor, now).await?;
    Ok(Reply::empty(hyper::StatusCode::NO_CONTENT))
}

/// Takes the challenge (used once, whatever the answer) and checks the device's consent; a
/// refusal is audited.
async fn check_consent(
    app: &App,
    actor: &str,
    record: &AccountRecord,
    purpose: ConsentPurpose,
    body: &ConsentBody,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    let signature = STANDARD
        .decode(&body.device_signature)
        .map_err(|_| ApiError::InvalidRequest("device_signature must be standard base64".into()))?;
    if body.nonce.is_empty() || body.nonce.len() > 100 {
        return Err(ApiError::InvalidRequest(
            "nonce must be the challenge's nonce".into(),
        ));
    }
    let challenge = {
        let (id, nonce) = (record.id.clone(), body.nonce.clone());
        app.store(move |store| store.take_consent_challenge(&id, &nonce))
            .await?
    };
    let refusal = match challenge {
        None => Some(ApiError::AuthorisationInvalid),
        Some(challenge) if challenge.purpose != purpose => Some(ApiError::AuthorisationInvalid),
        Some(challenge) if now >= challenge.expires_at => Some(ApiError::RequestExpired),
        Some(challenge) => {
            let statement = purpose.statement(&record.id, &challenge.nonce);
            (!device_signature_valid(&record.device_public_key, &statement, &signature))
                .then_some(ApiError::AuthorisationInvalid)
        }
    };
    match refusal {
        None => Ok(()),
        Some(error) => {
            app.append(
                "certificate.consent_refused",
                actor,
                fields([
                    ("account_id", json!(record.id.as_str())),
                    ("purpose", json!(purpose.as_str())),
                    ("code", json!(error.code())),
                ]),
            )
            .await?;
            Err(error)
        }
    }
}

/// The account's current certificate.
async fn current_certificate(
    app: &App,
    record: &AccountRecord,
) -> Result<CertificateRecord, ApiError> {
    let Some(serial) = record.current_certificate.clone() else {
        return Err(ApiError::NoCertificate);
    };
    app.store(move |store| store.get_certificate(&serial))
        .await?
        .ok_or(ApiError::NoCertificate)
}

fn user_key(bytes: Option<&[u8]>) -> Option<UserKeyRef> {
    bytes.and_then(|bytes| UserKeyRef::from_bytes(bytes).ok())
}

/// The refusals both key changes share: the account must be active and "iAM Smart+".
fn require_plus_and_active(record: &AccountRecord) -> Result<(), ApiError> {
    if record.tier != Tier::IamSmartPlus {
        return Err(ApiError::NotIamSmartPlus);
    }
    require_active(record)
}

/// `POST /v1/accounts/{id}/certificate/renewal` (gateway).
pub(crate) async fn renew(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let body: ConsentBody = ctx.json()?;
    let now = app.clock.now();
    let record = load(&app, &account_id(ctx.param(0))?).await?;
    let actor = ctx.caller.to_string();
    check_consent(&app, &actor, &record, ConsentPurpose::Renew, &body, now).await?;
    require_plus_and_active(&record)?;
    let old = current_certificate(&app, &record).await?;
    if old.status == CertStatus::Revoked {
        return Err(ApiError::CertificateRevoked);
    }
    old.check_renewal(app.policy.renewal_window, now)
        .map_err(|rule| match rule {
            RuleError::RenewalTooLate => ApiError::RenewalTooLate,
            _ => ApiError::RenewalNotDue,
        })?;
    let old_key = user_key(old.key_ref.as_deref()).ok_or_else(|| {
        tracing::error!(
            serial = old.serial.as_str(),
            "a valid certificate has no key"
        );
        ApiError::Internal
    })?;
    let old_der = app
        .unseal("certificate", record.id.as_str(), &old.sealed_der)
        .await?;
    app.append(
        "certificate.renewal_requested",
        &actor,
        fields([
            ("account_id", json!(record.id.as_str())),
            ("old_serial", json!(old.serial.as_str())),
        ]),
    )
    .await?;
    let via = Via::Rekey {
        old_der: &old_der,
        old_key: &old_key,
    };
    let (new, journal) =
        change_key(&app, &record, ConsentPurpose::Renew, Some(&old), via, now).await?;
    let mut updated = record.clone();
    updated.current_certificate = Some(new.serial.clone());
    make_current(
        &app,
        &actor,
        "certificate.renewed",
        &updated,
        &new,
        &journal,
    )
    .await?;
    failpoint(&app, ConsentPurpose::Renew, "after-store");
    // The new certificate is current: from here on the change is finished, by recovery if not now.
    match finish(&app, &journal, &record, &actor).await {
        Ok(()) => delete_journal(&app, &journal).await,
        Err(error) => tracing::error!(
            code = error.code(),
            account = record.id.as_str(),
            "the old certificate is not revoked yet; start-up recovery finishes it"
        ),
    }
    Ok(Reply::ok(&account_view(&app, &updated, now).await?))
}

/// `POST /v1/accounts/{id}/certificate/reapply` (gateway). A certificate that is still valid is
/// renewed, not replaced: re-applying then answers `renewal_not_due`.
pub(crate) async fn reapply(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let body: ConsentBody = ctx.json()?;
    let now = app.clock.now();
    let record = load(&app, &account_id(ctx.param(0))?).await?;
    let actor = ctx.caller.to_string();
    check_consent(&app, &actor, &record, ConsentPurpose::Reapply, &body, now).await?;
    require_plus_and_active(&record)?;
    let old = current_certificate(&app, &record).await?;
    if certificate_status(&old, now) == CertStatus::Valid {
        return Err(ApiError::RenewalNotDue);
    }
    app.append(
        "certificate.reapply_requested",
        &actor,
        fields([
            ("account_id", json!(record.id.as_str())),
            ("old_serial", json!(old.serial.as_str())),
        ]),
    )
    .await?;
    let (new, journal) = change_key(
        &app,
        &record,
        ConsentPurpose::Reapply,
        Some(&old),
        Via::Issue,
        now,
    )
    .await?;
    let mut updated = record.clone();
    updated.current_certificate = Some(new.serial.clone());
    make_current(
        &app,
        &actor,
        "certificate.reapplied",
        &updated,
        &new,
        &journal,
    )
    .await?;
    failpoint(&app, ConsentPurpose::Reapply, "after-store");
    match finish(&app, &journal, &record, &actor).await {
        Ok(()) => delete_journal(&app, &journal).await,
        Err(error) => tracing::error!(
            code = error.code(),
            account = record.id.as_str(),
            "the old key is not destroyed yet; start-up recovery finishes it"
        ),
    }
    Ok(Reply::ok(&account_view(&app, &updated, now).await?))
}

/// How the CA is asked for the new certificate.
enum Via<'a> {
    /// Key update (kur), protected by the old certificate's key.
    Rekey {
        old_der: &'a [u8],
        old_key: &'a UserKeyRef,
    },
    /// Initial request (ir), as at registration.
    Issue,
}

/// Journals the change, makes the new key and has the CA certify it. On failure nothing is left
/// and the journal row is gone.
async fn change_key(
    app: &App,
    record: &AccountRecord,
    purpose: ConsentPurpose,
    old: Option<&CertificateRecord>,
    via: Via<'_>,
    now: OffsetDateTime,
) -> Result<(CertificateRecord, KeyChangeJournal), ApiError> {
    let name_json = app
        .unseal("name", record.id.as_str(), &record.sealed_name)
        .await?;
    let name: PersonalName = serde_json::from_slice(&name_json).map_err(|_| ApiError::Internal)?;
    let dob = application::date_of_birth(app, record).await?;
    let mut journal = KeyChangeJournal {
        account_id: record.id.clone(),
        purpose,
        old_serial: old.map(|old| old.serial.clone()),
        new_key_ref: None,
        new_serial: None,
        new_sealed_der: None,
        started_at: now,
    };
    {
        let journal = journal.clone();
        match app
            .store(move |store| {
                store
                    .insert_key_change(&journal)
                    .map(|()| true)
                    .or_else(|error| match error {
                        StoreError::AlreadyExists => Ok(false),
                        error => Err(error),
                    })
            })
            .await?
        {
            true => {}
            false => {
                tracing::warn!(
                    account = record.id.as_str(),
                    "a key change of this account is in progress"
                );
                return Err(ApiError::RenewalNotDue);
            }
        }
    }
    let result = certify(app, record, &name, dob, via, now, &mut journal).await;
    if result.is_err() {
        undo(app, &journal, RECOVERY_ACTOR).await;
    }
    result.map(|certificate| (certificate, journal))
}

/// The steps of [`change_key`] after the journal row exists; each one is journalled.
async fn certify(
    app: &App,
    record: &AccountRecord,
    name: &PersonalName,
    dob: Date,
    via: Via<'_>,
    now: OffsetDateTime,
    journal: &mut KeyChangeJournal,
) -> Result<CertificateRecord, ApiError> {
    let started = std::time::Instant::now();
    let key = app
        .hsm
        .generate_user_key(app.policy.key_algorithm, app.policy.key_mode)
        .await?;
    app.metrics.observe_hsm("generate", started.elapsed());
    journal.new_key_ref = Some(key.to_bytes());
    save_journal(app, journal).await?;
    failpoint(app, journal.purpose, "after-key");
    let (profile, request) = crate::accounts::issue_request(app, record, name, dob, &key, now);
    let (not_before, not_after): (OffsetDateTime, OffsetDateTime) =
        (request.not_before.into(), request.not_after.into());
    let started = std::time::Instant::now();
    let issued = match via {
        Via::Rekey { old_der, old_key } => app.ca.cmp.rekey(old_der, old_key, &request, &key).await,
        Via::Issue => app.ca.cmp.issue(&request, &key).await,
    };
    app.metrics.observe_cmp(started.elapsed(), issued.is_ok());
    let issued = issued.map_err(|error| {
        tracing::error!(%error, account = record.id.as_str(), "the CA did not issue");
        ApiError::Internal
    })?;
    let serial = CertSerial::parse(&issued.serial_hex).map_err(|_| ApiError::Internal)?;
    let sealed_der = match app
        .seal("certificate", record.id.as_str(), &issued.der)
        .await
    {
        Ok(sealed) => sealed,
        Err(error) => {
            // The journal cannot name the certificate: revoke it here, while it is in hand.
            let reason = RevocationReason::CessationOfOperation.crl_reason_code();
            if let Err(error) = app.ca.cmp.revoke(&issued.der, reason).await {
                tracing::error!(%error, "could not revoke an unused certificate");
            }
            return Err(error.into());
        }
    };
    journal.new_serial = Some(serial.clone());
    journal.new_sealed_der = Some(sealed_der.clone());
    save_journal(app, journal).await?;
    failpoint(app, journal.purpose, "after-issue");
    Ok(CertificateRecord {
        serial,
        account_id: record.id.clone(),
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

/// Audits the change and stores the new certificate as current, in one transaction; on failure
/// the change is undone.
async fn make_current(
    app: &App,
    actor: &str,
    event: &'static str,
    updated: &AccountRecord,
    new: &CertificateRecord,
    journal: &KeyChangeJournal,
) -> Result<(), ApiError> {
    let result = async {
        app.append(
            event,
            actor,
            fields([
                ("account_id", json!(updated.id.as_str())),
                (
                    "old_serial",
                    json!(journal.old_serial.as_ref().map(CertSerial::as_str)),
                ),
                ("serial", json!(new.serial.as_str())),
                ("profile", json!(new.profile.as_str())),
            ]),
        )
        .await?;
        let (updated, new) = (updated.clone(), new.clone());
        app.store(move |store| store.attach_certificate(&updated, &new))
            .await
    }
    .await;
    if result.is_err() {
        undo(app, journal, actor).await;
    }
    result
}

async fn save_journal(app: &App, journal: &KeyChangeJournal) -> Result<(), ApiError> {
    let journal = journal.clone();
    app.store(move |store| store.update_key_change(&journal))
        .await
}

async fn delete_journal(app: &App, journal: &KeyChangeJournal) {
    let id = journal.account_id.clone();
    if let Err(error) = app.store(move |store| store.delete_key_change(&id)).await {
        tracing::error!(
            code = error.code(),
            "could not end a key change; start-up recovery ends it"
        );
    }
}

/// The last step of a key change whose new certificate is current: a renewal revokes the old
/// certificate as superseded (and destroys its key); a re-application destroys the old key if it
/// is still there.
async fn finish(
    app: &App,
    journal: &KeyChangeJournal,
    old_record: &AccountRecord,
    actor: &str,
) -> Result<(), ApiError> {
    let Some(old_serial) = journal.old_serial.clone() else {
        return Ok(());
    };
    match journal.purpose {
        ConsentPurpose::Renew => {
            let mut old_view = old_record.clone();
            old_view.current_certificate = Some(old_serial);
            let now = app.clock.now();
            Ok(application::accounts::revoke_current(
                app,
                &old_view,
                RevocationReason::Superseded,
                actor,
                now,
            )
            .await?)
        }
        _ => {
            let old = app
                .store(move |store| store.get_certificate(&old_serial))
                .await?;
            let Some(mut old) = old else {
                return Ok(());
            };
            let Some(key) = user_key(old.key_ref.as_deref()) else {
                return Ok(());
            };
            // Destroyed first: a crash before the store forgets the reference leaves a
            // reference to nothing on a certificate that no longer signs, not a key.
            destroy_quietly(app, &key).await?;
            old.key_ref = None;
            app.store(move |store| store.update_certificate(&old)).await
        }
    }
}

/// Destroys a key; one that is gone already counts as destroyed.
async fn destroy_quietly(app: &App, key: &UserKeyRef) -> Result<(), ApiError> {
    match app.hsm.destroy_user_key(key).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == hsm_adapter::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Undoes a key change whose new certificate is not current: revokes the new certificate at the
/// CA if it was issued, destroys the new key, and deletes the journal row. Each step is journalled,
/// so a crash in between repeats none. Audited before it acts.
async fn undo(app: &App, journal: &KeyChangeJournal, actor: &str) {
    if let Err(error) = try_undo(app, journal, actor).await {
        tracing::error!(
            code = error.code(),
            account = journal.account_id.as_str(),
            "could not undo a key change; start-up recovery retries"
        );
    }
}

async fn try_undo(app: &App, journal: &KeyChangeJournal, actor: &str) -> Result<(), ApiError> {
    let mut journal = journal.clone();
    app.append(
        "certificate.key_change_undone",
        actor,
        fields([
            ("account_id", json!(journal.account_id.as_str())),
            ("purpose", json!(journal.purpose.as_str())),
            (
                "serial",
                json!(journal.new_serial.as_ref().map(CertSerial::as_str)),
            ),
            ("revoked_at_ca", json!(journal.new_sealed_der.is_some())),
        ]),
    )
    .await?;
    if let Some(sealed) = &journal.new_sealed_der {
        let der = app
            .unseal("certificate", journal.account_id.as_str(), sealed)
            .await?;
        let reason = RevocationReason::CessationOfOperation;
        let started = std::time::Instant::now();
        let revoked = app.ca.cmp.revoke(&der, reason.crl_reason_code()).await;
        app.metrics.observe_cmp(started.elapsed(), revoked.is_ok());
        revoked.map_err(|error| {
            tracing::error!(%error, "the CA did not revoke an unused certificate");
            ApiError::Internal
        })?;
        if let Some(serial) = &journal.new_serial {
            app.ca.status.forget(serial.as_str());
        }
        journal.new_sealed_der = None;
        save_journal(app, &journal).await?;
    }
    if let Some(key) = user_key(journal.new_key_ref.as_deref()) {
        destroy_quietly(app, &key).await?;
        journal.new_key_ref = None;
        save_journal(app, &journal).await?;
    }
    let id = journal.account_id.clone();
    app.store(move |store| store.delete_key_change(&id)).await
}

/// Finishes or undoes every key change a crash interrupted; run at start-up before serving.
/// A row that cannot be settled now (the CA or the HSM unavailable) stays for the next start.
pub(crate) async fn recover(app: &App) -> Result<(), String> {
    let journals = app
        .store(|store| store.key_changes())
        .await
        .map_err(|error| format!("cannot read the key-change journal: {}", error.code()))?;
    for journal in journals {
        let account = {
            let id = journal.account_id.clone();
            app.store(move |store| store.get_account(&id))
                .await
                .map_err(|error| format!("cannot read an account: {}", error.code()))?
        };
        let finished = account.as_ref().is_some_and(|account| {
            journal.new_serial.is_some() && account.current_certificate == journal.new_serial
        });
        match (finished, account) {
            (true, Some(account)) => {
                tracing::info!(
                    account = journal.account_id.as_str(),
                    "finishing an interrupted key change"
                );
                let result = async {
                    app.append(
                        "certificate.key_change_finished",
                        RECOVERY_ACTOR,
                        fields([
                            ("account_id", json!(journal.account_id.as_str())),
                            ("purpose", json!(journal.purpose.as_str())),
                            (
                                "serial",
                                json!(journal.new_serial.as_ref().map(CertSerial::as_str)),
                            ),
                            (
                                "old_serial",
                                json!(journal.old_serial.as_ref().map(CertSerial::as_str)),
                            ),
                        ]),
                    )
                    .await?;
                    finish(app, &journal, &account, RECOVERY_ACTOR).await?;
                    let id = journal.account_id.clone();
                    app.store(move |store| store.delete_key_change(&id)).await
                }
                .await;
                if let Err(error) = result {
                    tracing::error!(
                        code = error.code(),
                        account = journal.account_id.as_str(),
                        "could not finish an interrupted key change; the next start retries"
                    );
                }
            }
            _ => {
                tracing::info!(
                    account = journal.account_id.as_str(),
                    "undoing an interrupted key change"
                );
                undo(app, &journal, RECOVERY_ACTOR).await;
            }
        }
    }
    Ok(())
}
