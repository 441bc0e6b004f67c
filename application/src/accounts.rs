//! Changes of an account's state: suspension and its lifting, a device switch, the matching
//! result, invalidation, deregistration, and the revocation of its certificate.
//!
//! Each change is applied to the account as stored and stored only if nobody changed it
//! meanwhile (its version in the `WHERE`); on a lost race it reads again and applies the change
//! to the new state, which may now refuse it. No change is ever written over another.

use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, CertStatus, CertificateRecord, EventKind,
    RECTIFICATION_PERIOD, RevocationReason, ServiceName, Store, StoreError, SuspendedBy,
    TaidRecord, Tier, UserEvent,
};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::{AppError, Ports, events, fields, rfc3339};

/// How often a change re-reads the account after losing a race before it answers `conflict`.
const CHANGE_TRIES: usize = 4;

/// A change to an account that keeps it in service.
#[derive(Debug, Clone)]
pub enum Change {
    /// Suspends an active account, by the user or by the government.
    Suspend(SuspendedBy),
    /// Lifts a suspension; only the party that suspended may.
    Resume(SuspendedBy),
    /// Binds a new device (its SubjectPublicKeyInfo, DER): requests made for the old one can
    /// no longer be authorised.
    SwitchDevice(Vec<u8>),
    /// The regular HKIC / residency check matched (`None`), or did not and the user
    /// acknowledged the mismatch at the time given: rectification is then due within
    /// [`RECTIFICATION_PERIOD`].
    Matching(Option<OffsetDateTime>),
}

impl Change {
    /// The audit event of a change, by the name the outbox keeps.
    fn event_named(name: &str) -> Option<&'static str> {
        [
            "account.suspended",
            "account.resumed",
            "account.device_switched",
            "account.matching",
        ]
        .into_iter()
        .find(|event| *event == name)
    }

    /// Applies the change's rule to `record` as stored now; gives its audit record and the
    /// user events it yields.
    fn apply(&self, record: &mut AccountRecord, now: OffsetDateTime) -> Result<Audited, AppError> {
        let account_id = json!(record.id.as_str());
        match self {
            Change::Suspend(by) => {
                require_active(record)?;
                record.status = AccountStatus::Suspended;
                record.suspended_by = Some(*by);
                record.status_changed_at = now;
                Ok(Audited::new(
                    "account.suspended",
                    fields([("account_id", account_id), ("by", json!(by.as_str()))]),
                )
                .telling(events::suspension(
                    EventKind::AccountSuspended,
                    &record.id,
                    *by,
                    now,
                )))
            }
            Change::Resume(by) => {
                // Only the party that suspended may lift it: a government suspension is not the
                // user's to end. A suspension stored before the party was recorded counts as
                // the user's.
                let suspended_by = record.suspended_by.unwrap_or(SuspendedBy::User);
                if record.status != AccountStatus::Suspended || suspended_by != *by {
                    return Err(AppError::AccountNotActive(record.status.as_str()));
                }
                record.status = AccountStatus::Active;
                record.suspended_by = None;
                record.status_changed_at = now;
                Ok(Audited::new(
                    "account.resumed",
                    fields([("account_id", account_id), ("by", json!(by.as_str()))]),
                )
                .telling(events::suspension(
                    EventKind::AccountResumed,
                    &record.id,
                    *by,
                    now,
                )))
            }
            Change::SwitchDevice(device) => {
                if record.status == AccountStatus::Deregistered {
                    return Err(AppError::AccountNotActive(record.status.as_str()));
                }
                record.device_public_key = device.clone();
                record.device_generation += 1;
                Ok(Audited::new(
                    "account.device_switched",
                    fields([
                        ("account_id", account_id),
                        ("device_generation", json!(record.device_generation)),
                    ]),
                ))
            }
            Change::Matching(acknowledged) => {
                if !matches!(
                    record.status,
                    AccountStatus::Active | AccountStatus::RectificationPending
                ) {
                    return Err(AppError::AccountNotActive(record.status.as_str()));
                }
                match acknowledged {
                    Some(acknowledged) => {
                        let deadline =
                            acknowledged
                                .checked_add(RECTIFICATION_PERIOD)
                                .ok_or_else(|| {
                                    AppError::InvalidRequest(
                                        "acknowledged_at is out of range".into(),
                                    )
                                })?;
                        record.status = AccountStatus::RectificationPending;
                        record.rectify_by = Some(deadline);
                    }
                    None => {
                        record.status = AccountStatus::Active;
                        record.rectify_by = None;
                    }
                }
                record.status_changed_at = now;
                let result = if acknowledged.is_some() {
                    "mismatch"
                } else {
                    "matched"
                };
                let audited = Audited::new(
                    "account.matching",
                    fields([
                        ("account_id", account_id),
                        ("result", json!(result)),
                        ("rectify_by", json!(record.rectify_by.map(rfc3339))),
                    ]),
                );
                // A match that clears a pending rectification is no event of API.md's list.
                Ok(if acknowledged.is_some() {
                    audited.telling(events::rectification_pending(
                        &record.id,
                        record.rectify_by,
                        now,
                    ))
                } else {
                    audited
                })
            }
        }
    }
}

/// An audit record to write once a change is stored, and the user events stored with it.
struct Audited {
    event: &'static str,
    fields: Map<String, Value>,
    tell: Vec<UserEvent>,
}

impl Audited {
    fn new(event: &'static str, fields: Map<String, Value>) -> Audited {
        Audited {
            event,
            fields,
            tell: Vec::new(),
        }
    }

    /// With a user event, stored in the change's transaction.
    fn telling(mut self, event: UserEvent) -> Audited {
        self.tell.push(event);
        self
    }
}

/// Applies `change` to account `id` as stored now and stores it only if nobody changed it
/// meanwhile; on a lost race, again on the new state. The audit record follows the stored
/// change, before the answer leaves. Gives the account as stored.
pub async fn change<P: Ports>(
    ports: &P,
    actor: &str,
    id: &AccountId,
    change: Change,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    for _ in 0..CHANGE_TRIES {
        let mut record = load(ports, id)?;
        let audited = change.apply(&mut record, now)?;
        // Owned: a closure that crosses to the blocking pool holds no borrowed text.
        let (stored, owner) = (record.clone(), actor.to_owned());
        let (event, fields, tell) = (
            audited.event.to_owned(),
            Value::Object(audited.fields).to_string(),
            audited.tell,
        );
        match ports
            .write(move |store| {
                store.update_account_audited(&stored, &event, &owner, &fields, &tell)
            })
            .await
        {
            Ok(outbox) => {
                // The record is durable with the change; the audit log gets it now, or from the
                // outbox at the next start or sweep if it cannot take it now.
                deliver_audits(ports, Some(outbox)).await;
                record.version += 1;
                return Ok(record);
            }
            Err(AppError::Conflict) => continue,
            Err(error) => return Err(error),
        }
    }
    Err(AppError::Conflict)
}

/// Appends the audit records waiting in the store's outbox to the audit log, oldest first,
/// deleting each once appended: all of them, or only `only`. Stops at the first the log does
/// not take (it stays for the next try). Gives how many were appended.
///
/// A crash between an append and its deletion appends that record again at the next try; the
/// copy carries the same `outbox` id, so an auditor tells it apart.
pub async fn deliver_audits<P: Ports>(ports: &P, only: Option<i64>) -> usize {
    let pending = match ports.write(|store| store.pending_audits()).await {
        Ok(pending) => pending,
        Err(error) => {
            tracing::error!(%error, "cannot read the audit outbox");
            return 0;
        }
    };
    let mut appended = 0;
    for record in pending {
        if only.is_some_and(|id| id != record.id) {
            continue;
        }
        let mut fields = match serde_json::from_str::<Value>(&record.fields) {
            Ok(Value::Object(fields)) => fields,
            _ => {
                tracing::error!(id = record.id, "an audit outbox record does not parse");
                Map::new()
            }
        };
        fields.insert("outbox".into(), json!(record.id));
        let Some(event) = Change::event_named(&record.event) else {
            tracing::error!(
                id = record.id,
                "an audit outbox record names an unknown event"
            );
            break;
        };
        if let Err(error) = ports.append(event, &record.actor, fields).await {
            tracing::error!(%error, id = record.id,
                "the audit log did not take an outbox record; it is kept for the next try");
            break;
        }
        let id = record.id;
        if let Err(error) = ports
            .write(move |store| store.delete_pending_audit(id))
            .await
        {
            tracing::error!(%error, id, "cannot delete a delivered outbox record");
            break;
        }
        appended += 1;
    }
    appended
}

/// The account with this id, or `not_found`.
pub fn load<P: Ports>(ports: &P, id: &AccountId) -> Result<AccountRecord, AppError> {
    ports
        .read(|store| store.get_account(id))?
        .ok_or(AppError::NotFound("account"))
}

/// Refuses unless the account is active.
pub fn require_active(record: &AccountRecord) -> Result<(), AppError> {
    if record.status == AccountStatus::Active {
        Ok(())
    } else {
        Err(AppError::AccountNotActive(record.status.as_str()))
    }
}

/// Invalidates account `id` (the registrar): its certificate revoked (privilege_withdrawn), its
/// key destroyed. Gives the account as stored.
pub async fn invalidate<P: Ports>(
    ports: &P,
    actor: &str,
    id: &AccountId,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    let mut record = load(ports, id)?;
    if !invalidate_if(ports, &mut record, actor, now, invalidable).await? {
        return Err(AppError::AccountNotActive(record.status.as_str()));
    }
    Ok(record)
}

/// Whether an account may still be invalidated: not invalidated or deregistered already.
fn invalidable(record: &AccountRecord) -> bool {
    !matches!(
        record.status,
        AccountStatus::Invalidated | AccountStatus::Deregistered
    )
}

/// Invalidates `record`'s account if `due` holds for it as stored (checked again after a lost
/// race): the rectification-deadline sweep. Whether it did; `record` ends as stored.
pub async fn invalidate_if<P: Ports>(
    ports: &P,
    record: &mut AccountRecord,
    actor: &str,
    now: OffsetDateTime,
    due: impl Fn(&AccountRecord) -> bool,
) -> Result<bool, AppError> {
    let end = End {
        event: "account.invalidated",
        tell: EventKind::AccountInvalidated,
        reason: RevocationReason::PrivilegeWithdrawn,
        due,
        apply: move |record: &mut AccountRecord| {
            record.status = AccountStatus::Invalidated;
            record.status_changed_at = now;
            record.rectify_by = None;
        },
        write: |store: &P::Store, record: &AccountRecord, tell: &[UserEvent]| {
            store.update_account(record, tell)
        },
    };
    end.run(ports, record, actor, now).await
}

/// Deregisters account `id` (the registrar, or the user with consent): revoke, destroy the key,
/// erase the personal data. Gives the account as stored.
pub async fn deregister<P: Ports>(
    ports: &P,
    actor: &str,
    id: &AccountId,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    let mut record = load(ports, id)?;
    if !deregister_if(ports, &mut record, actor, now, deregistrable).await? {
        return Err(AppError::AccountNotActive(record.status.as_str()));
    }
    Ok(record)
}

/// Whether an account may still be deregistered: any that is not already.
pub fn deregistrable(record: &AccountRecord) -> bool {
    record.status != AccountStatus::Deregistered
}

/// Deregisters `record`'s account if `due` holds for it as stored (checked again after a lost
/// race): the seven-year retention sweep. Whether it did; `record` ends as stored.
pub async fn deregister_if<P: Ports>(
    ports: &P,
    record: &mut AccountRecord,
    actor: &str,
    now: OffsetDateTime,
    due: impl Fn(&AccountRecord) -> bool,
) -> Result<bool, AppError> {
    // One transaction: the state and the erasure of every personal datum, so that no crash
    // leaves a deregistered account with its data.
    let end = End {
        event: "account.deregistered",
        tell: EventKind::AccountDeregistered,
        reason: RevocationReason::CessationOfOperation,
        due,
        apply: move |record: &mut AccountRecord| {
            record.status = AccountStatus::Deregistered;
            record.status_changed_at = now;
            record.suspended_by = None;
            record.rectify_by = None;
        },
        write: |store: &P::Store, record: &AccountRecord, tell: &[UserEvent]| {
            store.deregister(record, tell)
        },
    };
    end.run(ports, record, actor, now).await
}

/// A final state (invalidated, deregistered): audited, the current certificate revoked with
/// `reason`, then the state stored with `write` with its user event `tell`, only if `due` holds
/// for the account as stored.
/// On a lost race it reads the account again: if `due` still holds, it revokes the certificate
/// if that changed meanwhile (a renewal that finished) and applies `apply` on top, so the
/// other change is kept too and never undoes this one; if not (a sweep's rule no longer
/// applies), it stops.
struct End<D, A, W> {
    event: &'static str,
    tell: EventKind,
    reason: RevocationReason,
    due: D,
    apply: A,
    write: W,
}

impl<D, A, W> End<D, A, W>
where
    D: Fn(&AccountRecord) -> bool,
    A: Fn(&mut AccountRecord),
{
    async fn run<P: Ports>(
        self,
        ports: &P,
        record: &mut AccountRecord,
        actor: &str,
        now: OffsetDateTime,
    ) -> Result<bool, AppError>
    where
        W: Fn(&P::Store, &AccountRecord, &[UserEvent]) -> Result<(), StoreError>
            + Copy
            + Send
            + 'static,
    {
        let mut audited = false;
        for _ in 0..CHANGE_TRIES {
            if !(self.due)(record) {
                return Ok(false);
            }
            if !audited {
                ports
                    .append(
                        self.event,
                        actor,
                        fields([("account_id", json!(record.id.as_str()))]),
                    )
                    .await?;
                audited = true;
            }
            // Every live certificate, not only the current one. One the CA could not take yet
            // keeps its key and sealed DER until a sweep finishes it.
            if !revoke_all(ports, record, self.reason, actor, now).await? {
                tracing::warn!(
                    account = record.id.as_str(),
                    "a revocation has not reached the CA yet; the next sweep finishes it"
                );
            }
            (self.apply)(record);
            let (copy, write) = (record.clone(), self.write);
            let tell = [events::account_ended(self.tell, &record.id, now)];
            match ports.write(move |store| write(store, &copy, &tell)).await {
                Ok(()) => {
                    *record = load(ports, &record.id)?;
                    return Ok(true);
                }
                Err(AppError::Conflict) => *record = load(ports, &record.id)?,
                Err(error) => return Err(error),
            }
        }
        Err(AppError::Conflict)
    }
}

/// Revokes the account's current certificate: audited, then the local state (which refuses every
/// signature from then on) with its `certificate.revoked` event and the events `also` gives for
/// the certificate, then the CA, then the key. Safe to repeat: a revocation that stopped
/// half-way is finished by the next call or the next sweep ([`finish_revocation`]); the events
/// are stored with the local state, once.
pub async fn revoke_current<P: Ports>(
    ports: &P,
    record: &AccountRecord,
    reason: RevocationReason,
    actor: &str,
    now: OffsetDateTime,
    also: impl Fn(&CertificateRecord) -> Vec<UserEvent>,
) -> Result<(), AppError> {
    let Some(serial) = record.current_certificate.clone() else {
        return Ok(());
    };
    let certificate = ports
        .read(|store| store.get_certificate(&serial))?
        .ok_or(AppError::NoCertificate)?;
    let also = also(&certificate);
    revoke(ports, certificate, reason, actor, now, also)
        .await
        .map(drop)
}

/// No further events with a revocation.
pub fn nothing_more(_: &CertificateRecord) -> Vec<UserEvent> {
    Vec::new()
}

/// Revokes every certificate of the account that is still valid or still has its key: the
/// current one, and one a key change left behind (a renewal that stopped before it retired
/// the old certificate). Whether every revocation reached the CA and every key is gone.
async fn revoke_all<P: Ports>(
    ports: &P,
    record: &AccountRecord,
    reason: RevocationReason,
    actor: &str,
    now: OffsetDateTime,
) -> Result<bool, AppError> {
    let id = record.id.clone();
    let certificates = ports.write(move |store| store.certificates_of(&id)).await?;
    let mut settled = true;
    for certificate in certificates {
        if certificate.status == CertStatus::Revoked && certificate.key_ref.is_none() {
            continue;
        }
        settled &= revoke(ports, certificate, reason, actor, now, Vec::new()).await?;
    }
    Ok(settled)
}

/// Revokes one certificate: audited, the local state (a conditional change: a first
/// revocation's reason and time stand) with the `certificate.revoked` event and `also`, stored
/// only by the change that revokes it, the CA, the key. Whether it is settled (the CA took it
/// and the key is gone).
async fn revoke<P: Ports>(
    ports: &P,
    mut certificate: CertificateRecord,
    reason: RevocationReason,
    actor: &str,
    now: OffsetDateTime,
    also: Vec<UserEvent>,
) -> Result<bool, AppError> {
    if certificate.status != CertStatus::Revoked {
        ports
            .append(
                "certificate.revoked",
                actor,
                fields([
                    ("account_id", json!(certificate.account_id.as_str())),
                    ("serial", json!(certificate.serial.as_str())),
                    ("reason", json!(reason.as_str())),
                ]),
            )
            .await?;
        let serial = certificate.serial.clone();
        let mut tell = vec![events::revoked(&certificate, reason, now)];
        tell.extend(also);
        ports
            .write(move |store| store.mark_revoked(&serial, reason, now, &tell))
            .await?;
        ports.step("revocation-after-local");
        // As stored: a revocation that came first keeps its reason.
        let serial = certificate.serial.clone();
        certificate = ports
            .read(|store| store.get_certificate(&serial))?
            .ok_or(AppError::NoCertificate)?;
    }
    finish_revocation(ports, certificate, actor).await
}

/// For a locally revoked certificate that still has its key: the CA revokes it, then the key is
/// destroyed. While the CA cannot be reached the key stays (unusable: the local state refuses
/// it) and the next sweep tries again. Whether it is settled (no key left).
pub async fn finish_revocation<P: Ports>(
    ports: &P,
    certificate: CertificateRecord,
    actor: &str,
) -> Result<bool, AppError> {
    if certificate.key_ref.is_none() {
        return Ok(true);
    }
    let reason = certificate
        .revocation_reason
        .unwrap_or(RevocationReason::CessationOfOperation);
    if let Err(error) = revoke_at_ca(ports, &certificate, reason).await {
        tracing::error!(%error, serial = certificate.serial.as_str(),
            "the CA did not take the revocation; the next sweep tries again");
        return Ok(false);
    }
    ports.step("revocation-after-ca");
    destroy_key_of(ports, certificate, "revoked", actor).await?;
    Ok(true)
}

/// Asks the CA to revoke `certificate`.
pub async fn revoke_at_ca<P: Ports>(
    ports: &P,
    certificate: &CertificateRecord,
    reason: RevocationReason,
) -> Result<(), AppError> {
    let der = ports
        .unseal(
            "certificate",
            certificate.account_id.as_str(),
            &certificate.sealed_der,
        )
        .await?;
    ports.revoke(&certificate.serial, &der, reason).await
}

/// Destroys a certificate's key (audited first), then forgets the reference (and, for a
/// deregistered account, the sealed DER kept until then). A key the HSM no longer has counts as
/// destroyed, so a destruction cut short is finished by repeating it.
pub async fn destroy_key_of<P: Ports>(
    ports: &P,
    certificate: CertificateRecord,
    why: &'static str,
    actor: &str,
) -> Result<(), AppError> {
    let Some(key_ref) = certificate.key_ref else {
        return Ok(());
    };
    ports
        .append(
            "certificate.key_destroyed",
            actor,
            fields([
                ("account_id", json!(certificate.account_id.as_str())),
                ("serial", json!(certificate.serial.as_str())),
                ("why", json!(why)),
            ]),
        )
        .await?;
    ports.destroy(&key_ref).await?;
    let serial = certificate.serial;
    ports
        .write(move |store| store.forget_key(&serial, &key_ref))
        .await
}

/// Account `id`'s TAID at `service`: base64url(HMAC-SHA-256(TAID key, service || 0x00 ||
/// account id)) cut to 128 bits, stored for the reverse lookup (the one stored first stands).
pub async fn taid<P: Ports>(
    ports: &P,
    id: &AccountId,
    service: &ServiceName,
) -> Result<TaidRecord, AppError> {
    use base64::Engine;
    let record = load(ports, id)?;
    if record.status == AccountStatus::Deregistered {
        return Err(AppError::AccountNotActive(record.status.as_str()));
    }
    let mut input = Vec::with_capacity(service.as_str().len() + 1 + id.as_str().len());
    input.extend_from_slice(service.as_str().as_bytes());
    input.push(0);
    input.extend_from_slice(id.as_str().as_bytes());
    let mac = ports.taid_hash(&input).await?;
    let taid = TaidRecord {
        taid: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&mac[..16]),
        service: service.clone(),
        account_id: record.id,
    };
    ports.write(move |store| store.put_taid(&taid)).await
}

/// Revokes account `id`'s current certificate (the registrar or an officer, e.g. a key
/// compromise). Gives the account as stored.
pub async fn revoke_certificate<P: Ports>(
    ports: &P,
    actor: &str,
    id: &AccountId,
    reason: RevocationReason,
    now: OffsetDateTime,
) -> Result<AccountRecord, AppError> {
    let record = load(ports, id)?;
    if record.tier != Tier::IamSmartPlus {
        return Err(AppError::NotIamSmartPlus);
    }
    let serial = record
        .current_certificate
        .clone()
        .ok_or(AppError::NoCertificate)?;
    let certificate = ports
        .read(|store| store.get_certificate(&serial))?
        .ok_or(AppError::NoCertificate)?;
    if certificate.status == CertStatus::Revoked {
        return Err(AppError::CertificateRevoked);
    }
    revoke_current(ports, &record, reason, actor, now, nothing_more).await?;
    load(ports, id)
}
