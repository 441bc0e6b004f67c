//! Key-encryption keys: making one with its templates, listing those on the token, re-wrapping
//! user keys from one KEK to another inside the HSM, and destroying a KEK (the KEK rotation of
//! `smartsign-ctl keys rotate-kek`).
//!
//! Every KEK is labelled `smartsign-kek` and named by its CKA_ID (a [`KekId`]); a KEK made before
//! KEKs had ids has an empty CKA_ID. The signing path wants exactly one KEK on the token; two
//! exist only while a rotation runs, with the daemon stopped.

use std::collections::HashMap;

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use pkcs11_arrays::{ArrayAttribute, Arrays};

use crate::directory::{read_kek_id, system_key_template};
use crate::error::HsmError;
use crate::keys::{KekId, KeyStorage, SystemKey, UserKeyRef};
use crate::policy::Policy;
use crate::session_pool::Shared;
use crate::templates::{
    CopyUse, kek_unwrap_template, kek_wrap_template, secret_key, unwrap_template, wrap_mechanism,
};
use crate::{module, provision};

/// A KEK found on the token, and whether it passes the key policy (templates included).
#[derive(Debug)]
#[non_exhaustive]
pub struct KekStatus {
    /// Its CKA_ID; `None` for a KEK made before KEKs had ids.
    pub id: Option<KekId>,
    /// Why the policy refuses it, if it does.
    pub refused: Option<HsmError>,
}

/// Mechanism, template and array attributes of a new KEK named `id`.
fn kek_template(id: &KekId) -> Result<(Mechanism<'static>, Vec<Attribute>), HsmError> {
    let (mechanism, mut template) =
        secret_key(SystemKey::Kek).ok_or(HsmError::UnexpectedResponse("KEK template"))?;
    // Before CKA_MODIFIABLE = false, which stays last.
    let last = template.len().saturating_sub(1);
    template.insert(last, Attribute::Id(id.as_bytes().to_vec()));
    Ok((mechanism, template))
}

/// Creates a KEK named `id` with its unwrap and wrap templates. The security officer must be
/// logged in (only the SO may set CKA_TRUSTED).
///
/// It asks first for a private object, which no session without a login can even find; PKCS#11
/// lets the SO create public objects only, and a module that holds to that (SoftHSM does) says
/// CKR_USER_NOT_LOGGED_IN, and the KEK is made public. Either way the unwrap template forces
/// what the KEK unwraps to be private, so a session without a login cannot unwrap with it.
pub(crate) fn create(session: &Session, arrays: &Arrays, id: &KekId) -> Result<(), HsmError> {
    let (mechanism, template) = kek_template(id)?;
    let unwrap = kek_unwrap_template();
    let wrap = kek_wrap_template();
    let generate = |template: &[Attribute]| {
        arrays.generate_key(
            session,
            &mechanism,
            template,
            &[
                (ArrayAttribute::UnwrapTemplate, &unwrap),
                (ArrayAttribute::WrapTemplate, &wrap),
            ],
        )
    };
    let private: Vec<Attribute> = template
        .iter()
        .map(|a| match a {
            Attribute::Private(_) => Attribute::Private(true),
            other => other.clone(),
        })
        .collect();
    match generate(&private) {
        Ok(_) => Ok(()),
        Err(CryptokiError::Pkcs11(RvError::UserNotLoggedIn, _)) => {
            tracing::info!(
                "the module lets the security officer make public objects only: the KEK is public"
            );
            generate(&template).map(drop).map_err(HsmError::from)
        }
        Err(error) => Err(error.into()),
    }
}

/// Every KEK on the token by id (`None`: the one without an id).
fn find_all(session: &Session) -> Result<HashMap<Option<KekId>, ObjectHandle>, HsmError> {
    let mut keks = HashMap::new();
    for handle in session.find_objects(&system_key_template(SystemKey::Kek))? {
        if keks.insert(read_kek_id(session, handle)?, handle).is_some() {
            return Err(HsmError::DuplicateKey {
                label: SystemKey::Kek.label(),
            });
        }
    }
    Ok(keks)
}

/// Lists the KEKs on the token, each checked against the policy.
pub(crate) fn list(shared: &Shared) -> Result<Vec<KekStatus>, HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let mut found: Vec<_> = find_all(&session)?.into_iter().collect();
    found.sort_by_key(|(id, _)| *id);
    Ok(found
        .into_iter()
        .map(|(id, handle)| KekStatus {
            id,
            refused: Policy::System(SystemKey::Kek)
                .check(&session, &shared.arrays, handle)
                .err(),
        })
        .collect())
}

/// The trusted objects on the token other than the KEKs, by label and class. Only the security
/// officer can make one, and a trusted wrapping key can take every system key out of the HSM
/// (they are extractable under trusted keys, for cloning): outside a clone, which makes its
/// trusted keys as session objects, there must be none.
pub(crate) fn foreign_trusted(session: &Session) -> Result<Vec<String>, HsmError> {
    let kek_label = SystemKey::Kek.label().as_bytes();
    let mut found = Vec::new();
    for handle in session.find_objects(&[Attribute::Trusted(true)])? {
        let read = session.get_attributes(
            handle,
            &[
                cryptoki::object::AttributeType::Class,
                cryptoki::object::AttributeType::Label,
            ],
        )?;
        let class = read.iter().find_map(|a| match a {
            Attribute::Class(class) => Some(*class),
            _ => None,
        });
        let label = read.iter().find_map(|a| match a {
            Attribute::Label(label) => Some(label.clone()),
            _ => None,
        });
        if class == Some(cryptoki::object::ObjectClass::SECRET_KEY)
            && label.as_deref() == Some(kek_label)
        {
            continue;
        }
        found.push(format!(
            "{} {:?}",
            class.map_or_else(|| "object".to_owned(), |c| c.to_string()),
            String::from_utf8_lossy(label.as_deref().unwrap_or_default())
        ));
    }
    Ok(found)
}

/// Lists the trusted objects other than the KEKs (see [`foreign_trusted`]).
pub(crate) fn list_foreign_trusted(shared: &Shared) -> Result<Vec<String>, HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    foreign_trusted(&session)
}

/// Creates the KEK `id` unless it is on the token already; then the workers find the keys
/// again. Returns whether it was created.
pub(crate) fn ensure(
    shared: &Shared,
    so_pin: &secrecy::SecretString,
    id: &KekId,
) -> Result<bool, HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let _exclusive = shared.exclusive();
    if find_all(&session)?.contains_key(&Some(*id)) {
        return Ok(false);
    }
    let created = provision::as_security_officer(shared, &session, so_pin, |session| {
        let _token_write = module::token_write_lock();
        create(session, &shared.arrays, id)
    });
    provision::reload_after(shared, &session, created).map(|()| true)
}

/// Destroys the KEK `id` (`None`: the one without an id); then the workers find the keys again.
/// Every blob wrapped under it is unusable from then on, backups included.
pub(crate) fn destroy(shared: &Shared, id: Option<&KekId>) -> Result<(), HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let _exclusive = shared.exclusive();
    let keks = find_all(&session)?;
    let handle = keks
        .get(&id.copied())
        .ok_or_else(|| HsmError::KekNotOnToken {
            kek: KekId::describe(id),
        })?;
    {
        let _token_write = module::token_write_lock();
        session.destroy_object(*handle)?;
    }
    provision::reload(shared, &session)
}

/// Re-wraps each key under the KEK `to`, inside the HSM: unwrap under the KEK it names into an
/// extractable-under-trusted session copy, wrap under `to`, destroy the copy, and unwrap the new
/// blob once more to prove it opens before anyone stores it. A key already under `to`, or
/// resident, comes back unchanged. One result per key, in order.
pub(crate) fn rewrap(
    shared: &Shared,
    keys: &[UserKeyRef],
    to: &KekId,
) -> Result<Vec<Result<UserKeyRef, HsmError>>, HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let keks = find_all(&session)?;
    let target = *keks
        .get(&Some(*to))
        .ok_or_else(|| HsmError::KekNotOnToken {
            kek: to.to_string(),
        })?;
    // The new KEK must itself pass, templates included, before anything is wrapped under it.
    Policy::System(SystemKey::Kek).check(&session, &shared.arrays, target)?;
    Ok(keys
        .iter()
        .map(|key| rewrap_one(shared, &session, &keks, key, target, to))
        .collect())
}

fn rewrap_one(
    shared: &Shared,
    session: &Session,
    keks: &HashMap<Option<KekId>, ObjectHandle>,
    key: &UserKeyRef,
    target: ObjectHandle,
    to: &KekId,
) -> Result<UserKeyRef, HsmError> {
    let KeyStorage::Wrapped {
        kek,
        mechanism,
        key_type,
        blob,
    } = &key.storage
    else {
        return Ok(key.clone());
    };
    if kek.as_ref() == Some(to) {
        return Ok(key.clone());
    }
    let from = *keks.get(kek).ok_or_else(|| HsmError::KekNotOnToken {
        kek: KekId::describe(kek.as_ref()),
    })?;
    let algorithm = key.algorithm;
    let copy = session.unwrap_key(
        &wrap_mechanism(),
        from,
        blob,
        &unwrap_template(algorithm, CopyUse::Rewrap),
    )?;
    let wrapped = Policy::Wrapped(algorithm)
        .check(session, &shared.arrays, copy)
        .and_then(|()| Ok(session.wrap_key(&wrap_mechanism(), target, copy)?));
    destroy_quietly(session, copy);
    let new_blob = wrapped?;
    let proof = session.unwrap_key(
        &wrap_mechanism(),
        target,
        &new_blob,
        &unwrap_template(algorithm, CopyUse::Sign),
    )?;
    destroy_quietly(session, proof);
    UserKeyRef::new(
        algorithm,
        KeyStorage::Wrapped {
            kek: Some(*to),
            mechanism: *mechanism,
            key_type: *key_type,
            blob: new_blob,
        },
        key.public_key.clone(),
    )
}

fn destroy_quietly(session: &Session, handle: ObjectHandle) {
    if let Err(err) = session.destroy_object(handle) {
        tracing::warn!(error = %HsmError::from(err), "could not destroy a session object");
    }
}
