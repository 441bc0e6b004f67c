//! Provisioning the system keys: find each by label, create what is missing, check them all.
//!
//! Runs with the pool's gate held exclusively: creating the KEK logs the user out (PKCS#11 allows
//! one role logged in per application), which invalidates every private handle the workers hold.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::Session;
use secrecy::SecretString;

use crate::directory::{Directory, system_key_template};
use crate::error::{HsmError, Role};
use crate::keys::{SystemKey, SystemKeyKind};
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
    // Whatever happened, the workers must find the keys again: handles may have gone stale
    // (logout) and new keys may exist. Only while logged in, though: found while logged out,
    // the keys would lack every private object, and the workers could not tell. If the user
    // cannot log in again, the workers' stale handles make them try themselves.
    module::login(&session, Role::User, shared.pin())?;
    let directory = Directory::load(&session)?;
    shared.replace_directory(directory);
    let report = result?;
    // Every system key, found or made, must pass the policy before it is reported ready.
    for key in SystemKey::ALL {
        let policy = Policy::System(key);
        let handle = shared.directory().system(key)?.handle;
        policy.check(&session, handle)?;
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
        let _token_write = module::token_write_lock();
        match key.kind() {
            SystemKeyKind::KeyEncryption => {
                create_as_security_officer(shared, session, key, so_pin)?
            }
            SystemKeyKind::Signing(curve) => {
                let (mechanism, public, private) = key_pair(
                    system_key_algorithm(curve),
                    PairTarget::System { label: key.label() },
                )?;
                session.generate_key_pair(&mechanism, &public, &private)?;
            }
            SystemKeyKind::Hmac | SystemKeyKind::Aead => {
                let (mechanism, template) =
                    secret_key(key).ok_or(HsmError::UnexpectedResponse("secret key template"))?;
                session.generate_key(&mechanism, &template)?;
            }
        }
        tracing::info!(label = key.label(), "system key created");
        report.created.push(key);
    }
    Ok(report)
}

/// Creates a key that only the security officer may create (CKA_TRUSTED), then logs the user
/// back in whatever happened.
fn create_as_security_officer(
    shared: &Shared,
    session: &Session,
    key: SystemKey,
    so_pin: &SecretString,
) -> Result<(), HsmError> {
    let (mechanism, template) =
        secret_key(key).ok_or(HsmError::UnexpectedResponse("secret key template"))?;
    match session.logout() {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserNotLoggedIn, _)) => {}
        Err(err) => return Err(err.into()),
    }
    let created = module::login(session, Role::SecurityOfficer, so_pin).and_then(|()| {
        let created = session
            .generate_key(&mechanism, &template)
            .map(drop)
            .map_err(HsmError::from);
        if let Err(err) = session.logout() {
            tracing::error!(error = %HsmError::from(err), "security officer logout failed");
        }
        created
    });
    let relogged = module::login(session, Role::User, shared.pin());
    created?;
    relogged
}
