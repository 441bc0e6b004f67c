//! Loading PKCS#11 modules, finding the token, opening logged-in sessions.
//!
//! `C_Initialize` may run once per module per process, and PKCS#11 login state belongs to the
//! process (the "application"), not to a session. So modules are kept in a process-wide registry
//! by canonical path and never finalised: several [`crate::Hsm`]s (tests, benchmarks) share one
//! initialised module and one login.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use pkcs11_arrays::Arrays;
use secrecy::SecretString;

use crate::config::TokenSelector;
use crate::error::{HsmError, Role};

/// An initialised module, and its raw entry points for the array attributes cryptoki lacks.
#[derive(Debug, Clone)]
pub(crate) struct Module {
    pub(crate) pkcs11: Pkcs11,
    pub(crate) arrays: Arc<Arrays>,
}

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();

/// The initialised module at `path`, loading it on first use.
pub(crate) fn load(path: &Path) -> Result<Module, HsmError> {
    let load_error = |reason: String| HsmError::ModuleLoad {
        path: path.to_path_buf(),
        reason,
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| load_error(e.to_string()))?;
    let registry = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
    // The map is only ever inserted into after a module is fully initialised, so a panic
    // elsewhere while the lock was held cannot leave it inconsistent.
    let mut modules = registry.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(module) = modules.get(&canonical) {
        return Ok(module.clone());
    }
    let pkcs11 = Pkcs11::new(&canonical).map_err(|e| load_error(e.to_string()))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Someone else in this process (a test calling cryptoki directly) initialised it.
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(load_error(HsmError::from(e).to_string())),
    }
    let arrays = Arrays::load(&canonical).map_err(|e| load_error(e.to_string()))?;
    let module = Module {
        pkcs11,
        arrays: Arc::new(arrays),
    };
    modules.insert(canonical, module.clone());
    Ok(module)
}

/// The slot holding the one initialised token that `selector` names.
pub(crate) fn find_token(pkcs11: &Pkcs11, selector: &TokenSelector) -> Result<Slot, HsmError> {
    let mut found = None;
    for slot in pkcs11.get_slots_with_initialized_token()? {
        let info = pkcs11.get_token_info(slot)?;
        let matches = match selector {
            TokenSelector::Label(label) => info.label() == label,
            TokenSelector::Serial(serial) => info.serial_number() == serial,
        };
        if matches {
            if found.is_some() {
                return Err(HsmError::AmbiguousToken {
                    selector: selector.to_string(),
                });
            }
            found = Some(slot);
        }
    }
    found.ok_or_else(|| HsmError::TokenNotFound {
        selector: selector.to_string(),
    })
}

/// Opens a read-write session and logs the user in. `CKR_USER_ALREADY_LOGGED_IN` is success:
/// login state is per process, so the second worker finds the user logged in by the first.
pub(crate) fn open_user_session(
    pkcs11: &Pkcs11,
    slot: Slot,
    pin: &SecretString,
) -> Result<Session, HsmError> {
    let session = match pkcs11.open_rw_session(slot) {
        // Someone in this process called C_Finalize: initialise the module again.
        Err(CryptokiError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {
            match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                Err(err) => return Err(err.into()),
            }
            pkcs11.open_rw_session(slot)?
        }
        other => other?,
    };
    login(&session, Role::User, pin)?;
    Ok(session)
}

/// Logs `role` in on `session`.
pub(crate) fn login(session: &Session, role: Role, pin: &SecretString) -> Result<(), HsmError> {
    let user_type = match role {
        Role::User => UserType::User,
        Role::SecurityOfficer => UserType::So,
    };
    match session.login(user_type, Some(pin)) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(HsmError::login(e, role)),
    }
}

/// Serialises writes of token objects (key generation, destruction) within this process.
///
/// SoftHSM keeps each token object in a file and guards the token directory with `fcntl` locks,
/// which do not exclude threads of one process from each other: two sessions creating token
/// objects at once can fail with CKR_GENERAL_ERROR. Token writes are rare (resident key
/// generation and destruction, provisioning), so one lock costs nothing on the signing path.
pub(crate) fn token_write_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}
