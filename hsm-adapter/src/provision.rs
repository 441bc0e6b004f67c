//! Provisioning the system keys: find each by label, create what is missing, check them all.
//!
//! Runs with the pool's gate held exclusively: creating the KEK logs the user out (PKCS#11 allows
//! one role logged in per application), which invalidates every private handle the workers hold.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::Session;
use secrecy::SecretString;

use crate::directory::{Directory, system_key_template};
use crate::error::{HsmError, Role};
use crate::kek;
use crate::keys::{KekId, SystemKey, SystemKeyKind};
use crate::module;
use crate::policy::Policy;
use crate::session_pool::Shared;
use crate::templates::{PairTarget, key_pair, secret_key, system_key_algorithm};

/// What [`crate::Hsm::provision_system_keys`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProvisionReport {
    /// Keys that were missing and have been created.
    pub created: Vec<SystemKey>,
    /// Keys that were on the token already.
    pub found: Vec<SystemKey>,
}

pub(crate) fn run(shared: &Shared, so_pin: &SecretString) -> Result<ProvisionReport, HsmError> {
    let _exclusive = shared.exclusive();
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let result = provision(shared, &session, so_pin);
    let report = reload_after(shared, &session, result)?;
    // Every system key, found or made, must pass the policy before it is reported ready.
    for key in SystemKey::ALL {
        let policy = Policy::System(key);
        let handle = shared.directory().system(key)?.handle;
        policy.check(&session, &shared.arrays, handle)?;
        shared.directory().system(key)?.mark_verified(&policy);
    }
    Ok(report)
}

fn provision(
    shared: &Shared,
    session: &Session,
    so_pin: &SecretString,
) -> Result<ProvisionReport, HsmError> {
    let mut report = ProvisionReport::default();
    for key in SystemKey::ALL {
        match session.find_objects(&system_key_template(key))?.len() {
            0 => {}
            1 => {
                report.found.push(key);
                continue;
            }
            _ => return Err(HsmError::DuplicateKey { label: key.label() }),
        }
        match key.kind() {
            SystemKeyKind::KeyEncryption => {
                let id = KekId::from_bytes(&random(session, KekId::LEN)?)?;
                as_security_officer(shared, session, so_pin, |session| {
                    let _token_write = module::token_write_lock();
                    kek::create(session, &shared.arrays, &id)
                })?;
            }
            SystemKeyKind::Signing(curve) => {
                let _token_write = module::token_write_lock();
                let (mechanism, public, private) = key_pair(
                    system_key_algorithm(curve),
                    PairTarget::System { label: key.label() },
                )?;
                session.generate_key_pair(&mechanism, &public, &private)?;
            }
            SystemKeyKind::Hmac | SystemKeyKind::Aead => {
                let (mechanism, template) =
                    secret_key(key).ok_or(HsmError::UnexpectedResponse("secret key template"))?;
                let _token_write = module::token_write_lock();
                session.generate_key(&mechanism, &template)?;
            }
        }
        tracing::info!(label = key.label(), "system key created");
        report.created.push(key);
    }
    Ok(report)
}

/// Has the workers find the keys again, after handles may have gone stale (a logout) or keys
/// were made or destroyed. Call with [`Shared::exclusive`] held. Only while logged in, though:
/// found while logged out, the keys would lack every private object, and the workers could not
/// tell. If the user cannot log in again, the workers' stale handles make them try themselves.
pub(crate) fn reload(shared: &Shared, session: &Session) -> Result<(), HsmError> {
    module::login(session, Role::User, shared.pin())?;
    let directory = Directory::load(session)?;
    shared.replace_directory(directory);
    Ok(())
}

/// [`reload`] after an operation that may have logged the user out, keeping the operation's own
/// error when both fail (the reload's is logged).
pub(crate) fn reload_after<T>(
    shared: &Shared,
    session: &Session,
    result: Result<T, HsmError>,
) -> Result<T, HsmError> {
    match (reload(shared, session), result) {
        (Ok(()), result) => result,
        (Err(reloading), Err(error)) => {
            tracing::error!(error = %reloading, "finding the keys again failed too");
            Err(error)
        }
        (Err(reloading), Ok(_)) => Err(reloading),
    }
}

/// Runs `work` with the security officer logged in on `session` (for what only the SO may do:
/// set CKA_TRUSTED), then logs the user back in whatever happened. Call with
/// [`Shared::exclusive`] held: the logout invalidates every private handle the workers hold.
pub(crate) fn as_security_officer<T>(
    shared: &Shared,
    session: &Session,
    so_pin: &SecretString,
    work: impl FnOnce(&Session) -> Result<T, HsmError>,
) -> Result<T, HsmError> {
    match session.logout() {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserNotLoggedIn, _)) => {}
        Err(err) => return Err(err.into()),
    }
    let done = module::login(session, Role::SecurityOfficer, so_pin).and_then(|()| {
        let done = work(session);
        if let Err(err) = session.logout() {
            tracing::error!(error = %HsmError::from(err), "security officer logout failed");
        }
        done
    });
    let relogged = module::login(session, Role::User, shared.pin());
    let done = done?;
    relogged.map(|()| done)
}

fn random(session: &Session, len: usize) -> Result<Vec<u8>, HsmError> {
    let mut bytes = vec![0u8; len];
    session.generate_random_slice(&mut bytes)?;
    Ok(bytes)
}
