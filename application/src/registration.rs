//! Registration and upgrade: an account's first certificate (DOMAIN.md, "Registration").
//!
//! The first issuance is journalled (`issuances` in the store) once the new key exists and
//! before the CA is asked, and the journal follows what the CA issued. The account and its
//! certificate are stored in one transaction; only then is the journal row deleted. A row that
//! [`recover`] finds at start-up names a certificate that the store did not keep: it is revoked
//! at the CA and its key destroyed, so no valid certificate stays at the CA without its account.

use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertStatus, CertificateRecord, EventKind,
    HkicNumber, IssuanceJournal, IssuancePurpose, Profile, RuleError, Store, StoreError, Tier,
};
use serde_json::json;
use time::{Date, OffsetDateTime};
use zeroize::Zeroizing;

use crate::{AppError, PersonalName, Ports, events, fields};

/// What issuance needs from the configuration.
#[derive(Debug, Clone)]
pub struct IssuanceSettings {
    /// How long a new certificate is valid.
    pub certificate_validity: time::Duration,
}

/// A registration as the edge parsed it. `Debug` names only the account.
pub struct NewAccount {
    /// The registrar's id for the account.
    pub id: AccountId,
    /// "iAM Smart" or "iAM Smart+".
    pub tier: Tier,
    /// The holder's name (sealed at once; only the CA sees it in plaintext).
    pub name: PersonalName,
    /// The holder's date of birth.
    pub date_of_birth: Date,
    /// The holder's HKIC number: kept only as its keyed hash.
    pub hkic: HkicNumber,
    /// The bound device's public key (SubjectPublicKeyInfo, DER).
    pub device_public_key: Vec<u8>,
    /// A minor's guardian: their HKIC number (kept as its keyed hash) and date of birth (only
    /// checked).
    pub guardian: Option<(HkicNumber, Date)>,
}

impl std::fmt::Debug for NewAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewAccount")
            .field("id", &self.id)
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

/// The actor of what start-up recovery does.
const RECOVERY_ACTOR: &str = "system";

/// How often an upgrade re-reads the account after losing a race before it gives up.
const ATTACH_TRIES: usize = 4;

/// Registers an account; an "iAM Smart+" one with its first certificate. Gives the account as
/// stored.
pub async fn register<P: Ports>(
    ports: &P,
    settings: &IssuanceSettings,
    actor: &str,
    new: NewAccount,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    let dob = new.date_of_birth;
    if dob > cert_lifecycle::hk_date(now) {
        return Err(AppError::InvalidRequest(
            "date_of_birth is in the future".into(),
        ));
    }
    let guardian_dob = new.guardian.as_ref().map(|(_, dob)| *dob);
    cert_lifecycle::check_registration(dob, guardian_dob, now).map_err(|rule| match rule {
        RuleError::Underage => AppError::Underage,
        RuleError::GuardianRequired => AppError::GuardianRequired,
        RuleError::GuardianUnderage => AppError::GuardianUnderage,
        _ => AppError::InvalidRequest("guardian: an adult registers without a guardian".into()),
    })?;
    if ports.read(|store| store.get_account(&new.id))?.is_some() {
        return Err(AppError::AccountExists);
    }
    // One account per person: no other account that is not deregistered may hold this HKIC
    // number (the store's unique index decides a race between two registrations).
    let hkic_hash = ports.hkic_hash(&new.hkic).await?;
    // The guardian is kept as the keyed hash of their number, like the holder's; their date of
    // birth only served the check above.
    let guardian_hkic_hash = match &new.guardian {
        Some((number, _)) => Some(ports.hkic_hash(number).await?),
        None => None,
    };
    if hkic_taken(ports, hkic_hash)? {
        return Err(AppError::HkicAlreadyRegistered);
    }
    let id = new.id;
    let name_json = Zeroizing::new(serde_json::to_vec(&new.name).map_err(AppError::fault)?);
    let dob_text = dob.to_string();
    let mut record = AccountRecord {
        id: id.clone(),
        tier: Tier::IamSmart,
        status: AccountStatus::Active,
        status_changed_at: now,
        suspended_by: None,
        rectify_by: None,
        sealed_name: ports.seal("name", id.as_str(), &name_json).await?,
        sealed_dob: ports.seal("dob", id.as_str(), dob_text.as_bytes()).await?,
        hkic_hash,
        device_public_key: new.device_public_key,
        device_generation: 1,
        current_certificate: None,
        created_at: now,
        guardian_hkic_hash,
        adult_day_key: if cert_lifecycle::is_minor(dob, now) {
            Some(crate::adult_day_key(ports, cert_lifecycle::adult_on(dob)).await?)
        } else {
            None
        },
        version: 0,
    };
    let issued = if new.tier == Tier::IamSmartPlus {
        record.tier = Tier::IamSmartPlus;
        let purpose = IssuancePurpose::Register;
        let issued = issue(ports, settings, &record, &new.name, dob, purpose, now).await?;
        record.current_certificate = Some(issued.certificate.serial.clone());
        Some(issued)
    } else {
        None
    };
    let mut audit = fields([
        ("account_id", json!(id.as_str())),
        ("tier", json!(new.tier.as_str())),
        ("minor", json!(cert_lifecycle::is_minor(dob, now))),
    ]);
    if let Some(Issued { certificate, .. }) = &issued {
        audit.insert("serial".into(), json!(certificate.serial.as_str()));
        audit.insert("profile".into(), json!(certificate.profile.as_str()));
    }
    let stored = async {
        ports.append("account.registered", actor, audit).await?;
        let (record, certificate) = (
            record.clone(),
            issued.as_ref().map(|issued| issued.certificate.clone()),
        );
        ports
            .write(move |store| match &certificate {
                Some(certificate) => {
                    let issued =
                        events::certificate_in_use(EventKind::CertificateIssued, certificate, now);
                    store.insert_account_with_certificate(&record, certificate, &[issued])
                }
                None => store.insert_account(&record),
            })
            .await
    }
    .await;
    if let Err(error) = stored {
        // Undo the half-done registration: the certificate and key must not outlive it.
        if let Some(issued) = &issued {
            undo(ports, &issued.journal, actor).await;
        }
        // A registration of the same person that won the race meanwhile.
        if matches!(error, AppError::Store(StoreError::AlreadyExists))
            && hkic_taken(ports, hkic_hash)?
            && ports.read(|store| store.get_account(&id))?.is_none()
        {
            return Err(AppError::HkicAlreadyRegistered);
        }
        return Err(match error {
            AppError::Store(StoreError::AlreadyExists) => AppError::AccountExists,
            error => error,
        });
    }
    if let Some(issued) = &issued {
        ports.step("issuance-after-store");
        end(ports, &issued.journal).await;
    }
    tracing::info!(
        account = id.as_str(),
        tier = new.tier.as_str(),
        "account registered"
    );
    Ok(record)
}

/// Whether an account that is not deregistered holds this HKIC hash.
fn hkic_taken<P: Ports>(ports: &P, hkic_hash: [u8; 32]) -> Result<bool, AppError> {
    for holder in ports.read(|store| store.accounts_with_hkic_hash(&hkic_hash))? {
        let account = ports.read(|store| store.get_account(&holder))?;
        if account.is_some_and(|account| account.status != AccountStatus::Deregistered) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Upgrades account `id` from "iAM Smart" to "iAM Smart+": its first certificate. A change made
/// to the account meanwhile (a device switch) is kept: the upgrade applies on top of it, or, if
/// the account may no longer be upgraded, the certificate is revoked and its key destroyed.
pub async fn upgrade<P: Ports>(
    ports: &P,
    settings: &IssuanceSettings,
    actor: &str,
    id: &AccountId,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    let record = crate::accounts::load(ports, id)?;
    upgradable(&record)?;
    let name = crate::personal_name(ports, &record).await?;
    let dob = crate::date_of_birth(ports, &record).await?;
    let purpose = IssuancePurpose::Upgrade;
    let issued = issue(ports, settings, &record, &name, dob, purpose, now).await?;
    let certificate = &issued.certificate;
    if let Err(error) = ports
        .append(
            "account.upgraded",
            actor,
            fields([
                ("account_id", json!(record.id.as_str())),
                ("serial", json!(certificate.serial.as_str())),
                ("profile", json!(certificate.profile.as_str())),
            ]),
        )
        .await
    {
        undo(ports, &issued.journal, actor).await;
        return Err(error);
    }
    let mut record = record;
    for _ in 0..ATTACH_TRIES {
        crate::key_adult_day(ports, &mut record, certificate.profile).await?;
        record.tier = Tier::IamSmartPlus;
        record.current_certificate = Some(certificate.serial.clone());
        let (stored, new) = (record.clone(), certificate.clone());
        let told = events::certificate_in_use(EventKind::CertificateIssued, certificate, now);
        match ports
            .write(move |store| store.attach_certificate(&stored, &new, &[told]))
            .await
        {
            Ok(()) => {
                ports.step("issuance-after-store");
                end(ports, &issued.journal).await;
                record.version += 1;
                return Ok(record);
            }
            Err(AppError::Conflict) => {
                record = crate::accounts::load(ports, id)?;
                if let Err(error) = upgradable(&record) {
                    undo(ports, &issued.journal, actor).await;
                    return Err(error);
                }
            }
            Err(error) => {
                undo(ports, &issued.journal, actor).await;
                return Err(error);
            }
        }
    }
    undo(ports, &issued.journal, actor).await;
    Err(AppError::Conflict)
}

/// An account may be upgraded while it is active and "iAM Smart".
fn upgradable(record: &AccountRecord) -> Result<(), AppError> {
    crate::accounts::require_active(record)?;
    if record.tier == Tier::IamSmartPlus {
        return Err(AppError::AlreadyIamSmartPlus);
    }
    Ok(())
}

/// A certificate the CA issued and the journal row that names it.
struct Issued {
    certificate: CertificateRecord,
    journal: IssuanceJournal,
}

/// Makes the user key, journals it, and has the CA certify it. On failure nothing is left and
/// the journal row is gone (or, if even that failed, start-up recovery finishes the undoing).
async fn issue<P: Ports>(
    ports: &P,
    settings: &IssuanceSettings,
    record: &AccountRecord,
    name: &PersonalName,
    dob: Date,
    purpose: IssuancePurpose,
    now: OffsetDateTime,
) -> Result<Issued, AppError> {
    let key = ports.generate().await?;
    let mut journal = IssuanceJournal {
        account_id: record.id.clone(),
        purpose,
        key_ref: key.key_ref.clone(),
        serial: None,
        sealed_der: None,
        started_at: now,
    };
    let started = journal.clone();
    if let Err(error) = ports
        .write(move |store| store.insert_issuance(&started))
        .await
    {
        destroy_quietly(ports, &key.key_ref).await;
        return Err(match error {
            // Another registration of this id, or another upgrade of this account, is under
            // way: this one makes nothing.
            AppError::Store(StoreError::AlreadyExists) => match purpose {
                IssuancePurpose::Register => AppError::AccountExists,
                _ => AppError::Conflict,
            },
            error => error,
        });
    }
    ports.step("issuance-after-key");
    let (profile, request) =
        issue_request(settings, record, name, dob, key.public_key_der.clone(), now);
    let (not_before, not_after) = (request.not_before.into(), request.not_after.into());
    let result = async {
        let (issued, pending) = ports.issue(&request, &key.key_ref).await?;
        let journal = &mut journal;
        crate::record_then_confirm(
            ports,
            &record.id,
            issued,
            pending,
            "issuance-after-record",
            |serial, sealed_der| async move {
                journal.serial = Some(serial);
                journal.sealed_der = Some(sealed_der);
                let progress = journal.clone();
                ports
                    .write(move |store| store.update_issuance(&progress))
                    .await
            },
        )
        .await
    }
    .await;
    let (serial, sealed_der) = match result {
        Ok(issued) => issued,
        Err(error) => {
            tracing::error!(%error, account = record.id.as_str(), "the CA did not issue");
            undo(ports, &journal, RECOVERY_ACTOR).await;
            return Err(error);
        }
    };
    ports.step("issuance-after-issue");
    Ok(Issued {
        certificate: CertificateRecord {
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
        },
        journal,
    })
}

/// What the CA is asked to certify for a key: the account's name and keyed HKIC hash, the
/// profile that fits the holder's age at `now`, and the configured validity from `now`.
pub fn issue_request(
    settings: &IssuanceSettings,
    account: &AccountRecord,
    name: &PersonalName,
    dob: Date,
    public_key_der: Vec<u8>,
    now: OffsetDateTime,
) -> (Profile, ca_bridge::IssueRequest) {
    let profile = cert_lifecycle::profile_for(dob, now);
    let not_before = now.replace_nanosecond(0).unwrap_or(now);
    let request = ca_bridge::IssueRequest {
        surname: name.surname.clone(),
        given_name: name.given_name.clone(),
        hkic_hash_hex: hex::encode(account.hkic_hash),
        public_key_spki_der: public_key_der,
        profile,
        not_before: not_before.into(),
        not_after: (not_before + settings.certificate_validity).into(),
    };
    (profile, request)
}

/// Ends a kept issuance. If the row cannot be deleted now, start-up recovery finds the
/// certificate kept and deletes it then.
async fn end<P: Ports>(ports: &P, journal: &IssuanceJournal) {
    let id = journal.account_id.clone();
    if let Err(error) = ports.write(move |store| store.delete_issuance(&id)).await {
        tracing::error!(%error, "could not end an issuance; start-up recovery ends it");
    }
}

/// Destroys a key that nothing refers to; a failure is logged (the key is orphaned).
async fn destroy_quietly<P: Ports>(ports: &P, key_ref: &[u8]) {
    if let Err(error) = ports.destroy(key_ref).await {
        tracing::error!(%error, "could not destroy a user key; it is orphaned in the HSM");
    }
}

/// Undoes an issuance whose certificate the store did not keep: revokes it at the CA if it was
/// issued, destroys the key, and deletes the journal row. Each step is journalled, so a crash
/// in between repeats none. Audited before it acts; a failure leaves the row for recovery.
async fn undo<P: Ports>(ports: &P, journal: &IssuanceJournal, actor: &str) {
    if let Err(error) = try_undo(ports, journal, actor).await {
        tracing::error!(%error, account = journal.account_id.as_str(),
            "could not undo an issuance; start-up recovery retries");
    }
}

async fn try_undo<P: Ports>(
    ports: &P,
    journal: &IssuanceJournal,
    actor: &str,
) -> Result<(), AppError> {
    let mut journal = journal.clone();
    ports
        .append(
            "certificate.issuance_undone",
            actor,
            fields([
                ("account_id", json!(journal.account_id.as_str())),
                ("purpose", json!(journal.purpose.as_str())),
                (
                    "serial",
                    json!(journal.serial.as_ref().map(CertSerial::as_str)),
                ),
                ("revoked_at_ca", json!(journal.sealed_der.is_some())),
            ]),
        )
        .await?;
    if let (Some(sealed), Some(serial)) = (&journal.sealed_der, &journal.serial) {
        crate::revoke_unused(ports, &journal.account_id, serial, sealed).await?;
        journal.sealed_der = None;
        let progress = journal.clone();
        ports
            .write(move |store| store.update_issuance(&progress))
            .await?;
    }
    ports.destroy(&journal.key_ref).await?;
    let id = journal.account_id.clone();
    ports.write(move |store| store.delete_issuance(&id)).await
}

/// Settles every first issuance a crash interrupted that `scope` covers; run at start-up before
/// serving (and by the leader's sweeps, with several nodes). A certificate the store keeps ends
/// its row; any other is revoked at the CA and its key destroyed. A row that cannot be settled
/// now (the CA or the HSM unavailable) stays for the next try. Gives how many were undone.
pub async fn recover<P: Ports>(ports: &P, scope: crate::Stranded) -> Result<usize, AppError> {
    let mut undone = 0;
    for journal in ports.write(|store| store.issuances()).await? {
        if !scope.covers(journal.started_at) {
            continue;
        }
        let kept = match &journal.serial {
            Some(serial) => ports.read(|store| store.get_certificate(serial))?.is_some(),
            None => false,
        };
        if kept {
            end(ports, &journal).await;
            continue;
        }
        tracing::warn!(
            account = journal.account_id.as_str(),
            purpose = journal.purpose.as_str(),
            "undoing an interrupted issuance"
        );
        match try_undo(ports, &journal, RECOVERY_ACTOR).await {
            Ok(()) => undone += 1,
            Err(error) => tracing::error!(%error, account = journal.account_id.as_str(),
                "could not undo an interrupted issuance; the next start retries"),
        }
    }
    Ok(undone)
}
