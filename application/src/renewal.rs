//! Renewal and re-application of iAM Smart-Certs (API.md, "Consent for renewal and
//! re-application"; DOMAIN.md, "iAM Smart-Cert lifecycle"), the user's consent that each needs
//! (and deregistration from the app), and the start-up recovery of a key change that a crash
//! interrupted.
//!
//! A key change is journalled (`key_changes` in the store) before the new key is made, and the
//! journal follows every step: the new key's reference, then the new certificate. The new
//! certificate becomes current in one conditional transaction: if the account changed meanwhile
//! (a device switch) the change applies on top of it; if it may no longer take the new
//! certificate (suspended, invalidated, deregistered, or its certificate changed), the new
//! certificate is revoked and its key destroyed. Only once the new certificate is current is the
//! old one revoked (renewal) or its key destroyed (re-application), and the journal row deleted.
//! [`recover`] runs before the daemon serves and, per unfinished row, finishes the change when
//! the new certificate is current and otherwise undoes it.
//!
//! With resident keys one gap remains: a crash between the HSM's key generation and the journal
//! write of its reference leaves that key in the token unreferenced (wrapped keys, the default,
//! leave nothing behind).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertStatus, CertificateRecord,
    ConsentChallenge, ConsentPurpose, EventKind, KeyChangeJournal, RevocationReason, RuleError,
    Store, StoreError, Tier,
};
use serde_json::json;
use time::OffsetDateTime;

use crate::accounts::{load, require_active};
use crate::registration::{IssuanceSettings, issue_request};
use crate::signing::device_signature_valid;
use crate::{AppError, Ports, certificate_status, events, fields, rfc3339};

/// The actor of what start-up recovery does.
const RECOVERY_ACTOR: &str = "system";

/// How often a key change re-reads the account after losing a race before it gives up.
const ATTACH_TRIES: usize = 4;

/// What renewal and re-application need from the configuration.
#[derive(Debug, Clone)]
pub struct RenewalSettings {
    /// How long a new certificate is valid.
    pub issuance: IssuanceSettings,
    /// How long before `not_after` renewal opens.
    pub renewal_window: time::Duration,
    /// How long a consent challenge lives.
    pub challenge_ttl: time::Duration,
}

/// The user's answer to a consent challenge, as the edge parsed it.
#[derive(Debug)]
pub struct Consent {
    /// The challenge's nonce.
    pub nonce: String,
    /// The device's signature (DER) over the consent statement.
    pub device_signature: Vec<u8>,
}

/// The accounts whose current certificate ends within the renewal window, soonest first.
pub async fn due<P: Ports>(
    ports: &P,
    settings: &RenewalSettings,
    now: OffsetDateTime,
) -> Result<Vec<(AccountId, CertificateRecord)>, AppError> {
    let until = now + settings.renewal_window;
    ports
        .write(move |store| store.current_certificates_ending(now, until))
        .await
}

/// Gives account `id` a consent challenge for `purpose` (one per account and purpose, used
/// once).
pub async fn challenge<P: Ports>(
    ports: &P,
    settings: &RenewalSettings,
    actor: &str,
    id: &AccountId,
    purpose: ConsentPurpose,
    now: OffsetDateTime,
) -> Result<ConsentChallenge, AppError> {
    let record = load(ports, id)?;
    if purpose == ConsentPurpose::Deregister {
        // A user may end any account of theirs that is not ended already, suspended or not.
        if record.status == AccountStatus::Deregistered {
            return Err(AppError::AccountNotActive(record.status.as_str()));
        }
    } else {
        require_active(&record)?;
        if record.tier != Tier::IamSmartPlus {
            return Err(AppError::NotIamSmartPlus);
        }
    }
    let nonce = URL_SAFE_NO_PAD.encode(ports.random(32).await?);
    let challenge = ConsentChallenge {
        account_id: record.id.clone(),
        purpose,
        nonce,
        expires_at: (now + settings.challenge_ttl)
            .replace_nanosecond(0)
            .unwrap_or(now),
    };
    ports
        .append(
            "certificate.consent_challenged",
            actor,
            fields([
                ("account_id", json!(record.id.as_str())),
                ("purpose", json!(purpose.as_str())),
                ("expires_at", json!(rfc3339(challenge.expires_at))),
            ]),
        )
        .await?;
    let stored = challenge.clone();
    ports
        .write(move |store| store.put_consent_challenge(&stored))
        .await?;
    Ok(challenge)
}

/// The user ends account `id` from the app, with the device's consent to a `deregister`
/// challenge: the same effect as the registrar's deregistration.
pub async fn deregister<P: Ports>(
    ports: &P,
    actor: &str,
    id: &AccountId,
    consent: &Consent,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    use crate::accounts::{deregister_if, deregistrable};
    let mut record = load(ports, id)?;
    if !deregistrable(&record) {
        return Err(AppError::AccountNotActive(record.status.as_str()));
    }
    check_consent(
        ports,
        actor,
        &record,
        ConsentPurpose::Deregister,
        consent,
        now,
    )
    .await?;
    if !deregister_if(ports, &mut record, actor, now, deregistrable).await? {
        return Err(AppError::AccountNotActive(record.status.as_str()));
    }
    Ok(record)
}

/// Takes the challenge (used once, whatever the answer) and checks the device's consent; a
/// refusal is audited.
async fn check_consent<P: Ports>(
    ports: &P,
    actor: &str,
    record: &AccountRecord,
    purpose: ConsentPurpose,
    consent: &Consent,
    now: OffsetDateTime,
) -> Result<(), AppError> {
    if consent.nonce.is_empty() || consent.nonce.len() > 100 {
        return Err(AppError::InvalidRequest(
            "nonce must be the challenge's nonce".into(),
        ));
    }
    let (id, nonce) = (record.id.clone(), consent.nonce.clone());
    let challenge = ports
        .write(move |store| store.take_consent_challenge(&id, &nonce))
        .await?;
    let refusal = match challenge {
        None => Some(AppError::AuthorisationInvalid),
        Some(challenge) if challenge.purpose != purpose => Some(AppError::AuthorisationInvalid),
        Some(challenge) if now >= challenge.expires_at => Some(AppError::RequestExpired),
        Some(challenge) => {
            let statement = purpose.statement(&record.id, &challenge.nonce);
            (!device_signature_valid(
                &record.device_public_key,
                &statement,
                &consent.device_signature,
            ))
            .then_some(AppError::AuthorisationInvalid)
        }
    };
    let Some(error) = refusal else {
        return Ok(());
    };
    ports
        .append(
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

/// The account's current certificate.
fn current_certificate<P: Ports>(
    ports: &P,
    record: &AccountRecord,
) -> Result<CertificateRecord, AppError> {
    let serial = record
        .current_certificate
        .clone()
        .ok_or(AppError::NoCertificate)?;
    ports
        .read(|store| store.get_certificate(&serial))?
        .ok_or(AppError::NoCertificate)
}

/// The refusals both key changes share: the account must be active and "iAM Smart+".
fn require_plus_and_active(record: &AccountRecord) -> Result<(), AppError> {
    if record.tier != Tier::IamSmartPlus {
        return Err(AppError::NotIamSmartPlus);
    }
    require_active(record)
}

/// Renews account `id`'s certificate inside the renewal window, with the user's consent: a new
/// key, certified by a key update protected by the old key; the old certificate is then revoked
/// as superseded. Gives the account as stored.
pub async fn renew<P: Ports>(
    ports: &P,
    settings: &RenewalSettings,
    actor: &str,
    id: &AccountId,
    consent: &Consent,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    let record = load(ports, id)?;
    check_consent(ports, actor, &record, ConsentPurpose::Renew, consent, now).await?;
    require_plus_and_active(&record)?;
    let old = current_certificate(ports, &record)?;
    if old.status == CertStatus::Revoked {
        return Err(AppError::CertificateRevoked);
    }
    old.check_renewal(settings.renewal_window, now)
        .map_err(|rule| match rule {
            RuleError::RenewalTooLate => AppError::RenewalTooLate,
            _ => AppError::RenewalNotDue,
        })?;
    let old_key = old
        .key_ref
        .clone()
        .ok_or_else(|| AppError::fault("a valid certificate has no key"))?;
    let old_der = ports
        .unseal("certificate", record.id.as_str(), &old.sealed_der)
        .await?;
    ports
        .append(
            "certificate.renewal_requested",
            actor,
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
    let change = KeyChange {
        ports,
        settings,
        actor,
        purpose: ConsentPurpose::Renew,
        now,
    };
    change.run(record, &old, via).await
}

/// Re-applies for account `id`'s certificate after it expired or was revoked, with the user's
/// consent: a new key and certificate (an initial request); the old key is destroyed. A
/// certificate that is still valid is renewed, not replaced: re-applying then answers
/// `renewal_not_due`. Gives the account as stored.
pub async fn reapply<P: Ports>(
    ports: &P,
    settings: &RenewalSettings,
    actor: &str,
    id: &AccountId,
    consent: &Consent,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    let record = load(ports, id)?;
    check_consent(ports, actor, &record, ConsentPurpose::Reapply, consent, now).await?;
    require_plus_and_active(&record)?;
    let old = current_certificate(ports, &record)?;
    if certificate_status(&old, now) == CertStatus::Valid {
        return Err(AppError::RenewalNotDue);
    }
    ports
        .append(
            "certificate.reapply_requested",
            actor,
            fields([
                ("account_id", json!(record.id.as_str())),
                ("old_serial", json!(old.serial.as_str())),
            ]),
        )
        .await?;
    let change = KeyChange {
        ports,
        settings,
        actor,
        purpose: ConsentPurpose::Reapply,
        now,
    };
    change.run(record, &old, Via::Issue).await
}

/// How the CA is asked for the new certificate.
enum Via<'a> {
    /// Key update (kur), protected by the old certificate's key.
    Rekey {
        old_der: &'a [u8],
        old_key: &'a [u8],
    },
    /// Initial request (ir), as at registration.
    Issue,
}

/// One key change (renewal or re-application) of one account.
struct KeyChange<'a, P> {
    ports: &'a P,
    settings: &'a RenewalSettings,
    actor: &'a str,
    purpose: ConsentPurpose,
    now: OffsetDateTime,
}

impl<P: Ports> KeyChange<'_, P> {
    /// The failpoint of a step: `renewal-after-key`, `renewal-after-issue`,
    /// `renewal-after-store`, and the same three of `reapply-`.
    fn step(&self, step: &'static str) {
        self.ports.step(match (self.purpose, step) {
            (ConsentPurpose::Renew, "after-key") => "renewal-after-key",
            (ConsentPurpose::Renew, "after-issue") => "renewal-after-issue",
            (ConsentPurpose::Renew, _) => "renewal-after-store",
            (_, "after-key") => "reapply-after-key",
            (_, "after-issue") => "reapply-after-issue",
            _ => "reapply-after-store",
        });
    }

    /// Journals, certifies, makes current, finishes.
    async fn run(
        &self,
        record: AccountRecord,
        old: &CertificateRecord,
        via: Via<'_>,
    ) -> Result<AccountRecord, AppError> {
        let ports = self.ports;
        let mut journal = KeyChangeJournal {
            account_id: record.id.clone(),
            purpose: self.purpose,
            old_serial: Some(old.serial.clone()),
            new_key_ref: None,
            new_serial: None,
            new_sealed_der: None,
            started_at: self.now,
        };
        let started = journal.clone();
        match ports
            .write(move |store| store.insert_key_change(&started))
            .await
        {
            Ok(()) => {}
            Err(AppError::Store(StoreError::AlreadyExists)) => {
                tracing::warn!(
                    account = record.id.as_str(),
                    "a key change of this account is in progress"
                );
                return Err(AppError::RenewalNotDue);
            }
            Err(error) => return Err(error),
        }
        let new = match self.certify(&record, via, &mut journal).await {
            Ok(new) => new,
            Err(error) => {
                undo(ports, &journal, RECOVERY_ACTOR).await;
                return Err(error);
            }
        };
        let updated = match self.make_current(record.clone(), &new, &journal).await {
            Ok(updated) => updated,
            Err(error) => {
                undo(ports, &journal, self.actor).await;
                return Err(error);
            }
        };
        self.step("after-store");
        // The new certificate is current: from here on the change is finished, by recovery if
        // not now.
        match finish(ports, &journal, &record, self.actor, self.now).await {
            Ok(()) => delete_journal(ports, &journal).await,
            Err(error) => tracing::error!(%error, account = record.id.as_str(),
                "the old certificate or key is not retired yet; start-up recovery finishes it"),
        }
        Ok(updated)
    }

    /// The steps after the journal row exists; each one is journalled.
    async fn certify(
        &self,
        record: &AccountRecord,
        via: Via<'_>,
        journal: &mut KeyChangeJournal,
    ) -> Result<CertificateRecord, AppError> {
        let ports = self.ports;
        let name = crate::personal_name(ports, record).await?;
        let dob = crate::date_of_birth(ports, record).await?;
        let key = ports.generate().await?;
        journal.new_key_ref = Some(key.key_ref.clone());
        save_journal(ports, journal).await?;
        self.step("after-key");
        let (profile, request) = issue_request(
            &self.settings.issuance,
            record,
            &name,
            dob,
            key.public_key_der.clone(),
            self.now,
        );
        let (not_before, not_after) = (request.not_before.into(), request.not_after.into());
        let (issued, pending) = match via {
            Via::Rekey { old_der, old_key } => {
                ports.rekey(old_der, old_key, &request, &key.key_ref).await
            }
            Via::Issue => ports.issue(&request, &key.key_ref).await,
        }?;
        let (serial, sealed_der) = crate::record_then_confirm(
            ports,
            &record.id,
            issued,
            pending,
            match self.purpose {
                ConsentPurpose::Renew => "renewal-after-record",
                _ => "reapply-after-record",
            },
            |serial, sealed_der| async move {
                journal.new_serial = Some(serial);
                journal.new_sealed_der = Some(sealed_der);
                save_journal(ports, journal).await
            },
        )
        .await?;
        self.step("after-issue");
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
            key_ref: Some(key.key_ref),
            key_algorithm: key.algorithm.to_string(),
        })
    }

    /// Audits the change and stores the new certificate as current, in one conditional
    /// transaction. A change made to the account meanwhile is kept (the new certificate is put
    /// on top of it) unless the account may no longer take it: then its error, and the caller
    /// undoes the key change.
    async fn make_current(
        &self,
        mut record: AccountRecord,
        new: &CertificateRecord,
        journal: &KeyChangeJournal,
    ) -> Result<AccountRecord, AppError> {
        let ports = self.ports;
        let (event, tell) = match self.purpose {
            ConsentPurpose::Renew => ("certificate.renewed", EventKind::CertificateRenewed),
            // A new certificate after expiry or revocation: to the user, one issued.
            _ => ("certificate.reapplied", EventKind::CertificateIssued),
        };
        ports
            .append(
                event,
                self.actor,
                fields([
                    ("account_id", json!(record.id.as_str())),
                    (
                        "old_serial",
                        json!(journal.old_serial.as_ref().map(CertSerial::as_str)),
                    ),
                    ("serial", json!(new.serial.as_str())),
                    ("profile", json!(new.profile.as_str())),
                ]),
            )
            .await?;
        for _ in 0..ATTACH_TRIES {
            crate::key_adult_day(ports, &mut record, new.profile).await?;
            record.current_certificate = Some(new.serial.clone());
            let (stored, certificate) = (record.clone(), new.clone());
            let told = events::certificate_in_use(tell, new, self.now);
            match ports
                .write(move |store| store.attach_certificate(&stored, &certificate, &[told]))
                .await
            {
                Ok(()) => {
                    record.version += 1;
                    return Ok(record);
                }
                Err(AppError::Conflict) => {
                    record = load(ports, &journal.account_id)?;
                    require_plus_and_active(&record)?;
                    if record.current_certificate != journal.old_serial {
                        // Another key change won meanwhile.
                        return Err(AppError::Conflict);
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Err(AppError::Conflict)
    }
}

async fn save_journal<P: Ports>(ports: &P, journal: &KeyChangeJournal) -> Result<(), AppError> {
    let journal = journal.clone();
    ports
        .write(move |store| store.update_key_change(&journal))
        .await
}

async fn delete_journal<P: Ports>(ports: &P, journal: &KeyChangeJournal) {
    let id = journal.account_id.clone();
    if let Err(error) = ports.write(move |store| store.delete_key_change(&id)).await {
        tracing::error!(%error, "could not end a key change; start-up recovery ends it");
    }
}

/// The last step of a key change whose new certificate is current: a renewal revokes the old
/// certificate as superseded (and destroys its key); a re-application destroys the old key if it
/// is still there.
async fn finish<P: Ports>(
    ports: &P,
    journal: &KeyChangeJournal,
    old_record: &AccountRecord,
    actor: &str,
    now: OffsetDateTime,
) -> Result<(), AppError> {
    let Some(old_serial) = journal.old_serial.clone() else {
        return Ok(());
    };
    match journal.purpose {
        ConsentPurpose::Renew => {
            let mut old_view = old_record.clone();
            old_view.current_certificate = Some(old_serial);
            let reason = RevocationReason::Superseded;
            crate::accounts::revoke_current(
                ports,
                &old_view,
                reason,
                actor,
                now,
                crate::accounts::nothing_more,
            )
            .await
        }
        _ => {
            let Some(old) = ports.read(|store| store.get_certificate(&old_serial))? else {
                return Ok(());
            };
            let Some(key_ref) = old.key_ref else {
                return Ok(());
            };
            // Destroyed first: a crash before the store forgets the reference leaves a
            // reference to nothing on a certificate that no longer signs, not a key.
            ports.destroy(&key_ref).await?;
            ports
                .write(move |store| store.forget_key(&old_serial, &key_ref))
                .await
        }
    }
}

/// Undoes a key change whose new certificate is not current: revokes the new certificate at the
/// CA if it was issued, destroys the new key, and deletes the journal row. Each step is
/// journalled, so a crash in between repeats none. Audited before it acts.
async fn undo<P: Ports>(ports: &P, journal: &KeyChangeJournal, actor: &str) {
    if let Err(error) = try_undo(ports, journal, actor).await {
        tracing::error!(%error, account = journal.account_id.as_str(),
            "could not undo a key change; start-up recovery retries");
    }
}

async fn try_undo<P: Ports>(
    ports: &P,
    journal: &KeyChangeJournal,
    actor: &str,
) -> Result<(), AppError> {
    let mut journal = journal.clone();
    ports
        .append(
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
    if let (Some(sealed), Some(serial)) = (&journal.new_sealed_der, &journal.new_serial) {
        crate::revoke_unused(ports, &journal.account_id, serial, sealed).await?;
        journal.new_sealed_der = None;
        save_journal(ports, &journal).await?;
    }
    if let Some(key_ref) = journal.new_key_ref.take() {
        ports.destroy(&key_ref).await?;
        save_journal(ports, &journal).await?;
    }
    let id = journal.account_id.clone();
    ports.write(move |store| store.delete_key_change(&id)).await
}

/// Finishes or undoes every key change a crash interrupted that `scope` covers; run at start-up
/// before serving (and by the leader's sweeps, with several nodes). A row that cannot be
/// settled now (the CA or the HSM unavailable) stays for the next try.
pub async fn recover<P: Ports>(
    ports: &P,
    now: OffsetDateTime,
    scope: crate::Stranded,
) -> Result<(), AppError> {
    for journal in ports.write(|store| store.key_changes()).await? {
        if !scope.covers(journal.started_at) {
            continue;
        }
        let account = ports.read(|store| store.get_account(&journal.account_id))?;
        let finished = account.as_ref().is_some_and(|account| {
            journal.new_serial.is_some() && account.current_certificate == journal.new_serial
        });
        match account {
            Some(account) if finished => {
                tracing::info!(
                    account = journal.account_id.as_str(),
                    "finishing an interrupted key change"
                );
                let result = async {
                    ports
                        .append(
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
                    finish(ports, &journal, &account, RECOVERY_ACTOR, now).await?;
                    let id = journal.account_id.clone();
                    ports.write(move |store| store.delete_key_change(&id)).await
                }
                .await;
                if let Err(error) = result {
                    tracing::error!(%error, account = journal.account_id.as_str(),
                        "could not finish an interrupted key change; the next start retries");
                }
            }
            _ => {
                tracing::info!(
                    account = journal.account_id.as_str(),
                    "undoing an interrupted key change"
                );
                undo(ports, &journal, RECOVERY_ACTOR).await;
            }
        }
    }
    Ok(())
}
