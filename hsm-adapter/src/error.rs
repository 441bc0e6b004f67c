//! The crate's one error type and its sorting into kinds.
//!
//! PKCS#11 failures keep the function and the return value (`CKR_*`) that the module gave, like
//! cryptoki's `Error::Pkcs11(RvError, Function)`. [`HsmError::kind`] is the one place that says
//! what a failure means to a caller; the worker threads use [`HsmError::recovery`] to decide
//! whether a session must be re-opened.
//!
//! No variant carries a PIN, key material or plaintext: messages name functions, return values,
//! attributes and labels only.

use std::fmt;
use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, RvError};

use crate::keys::SystemKey;

/// What a failure means to a caller (the daemon maps these to HTTP problems and readiness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The HSM cannot serve now: module or token missing, device error, session lost after the
    /// retry, a system key not provisioned yet, the adapter shut down or overloaded.
    Unavailable,
    /// The HSM refused: wrong or locked PIN, a key that breaks the key policy, an operation the
    /// key's attributes do not allow.
    NotPermitted,
    /// A key (or token) that the caller named does not exist.
    NotFound,
    /// The caller's input is malformed: digest length, key reference, ciphertext that does not
    /// authenticate, a scheme that does not fit the key.
    InvalidInput,
    /// A bug here or in the module: an answer that breaks the PKCS#11 contract.
    Internal,
}

/// Who logs in: the normal user (the daemon) or the security officer (key ceremony).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// `CKU_USER`.
    User,
    /// `CKU_SO`.
    SecurityOfficer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::User => "user",
            Role::SecurityOfficer => "security officer",
        })
    }
}

/// Every failure of the adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be found, loaded or initialised.
    #[error("the PKCS#11 module {path} could not be loaded: {reason}")]
    ModuleLoad {
        /// The path as configured.
        path: PathBuf,
        /// What went wrong (no secrets: a loader or `CKR_*` message).
        reason: String,
    },

    /// No token carries the configured label or serial number.
    #[error("no initialised token with {selector} is present in the PKCS#11 module")]
    TokenNotFound {
        /// The selector, e.g. `label "smartsign"`.
        selector: String,
    },

    /// More than one token carries the configured label or serial number.
    #[error("more than one token has {selector}; select the token by serial number")]
    AmbiguousToken {
        /// The selector, e.g. `label "smartsign"`.
        selector: String,
    },

    /// `C_Login` refused the PIN (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, ...).
    #[error(
        "the token refused the PIN for the {role} ({}): check the PIN file; \
         a locked PIN needs the security officer",
        RvName(*.rv)
    )]
    PinRejected {
        /// Whose PIN.
        role: Role,
        /// The module's answer.
        rv: RvError,
    },

    /// A PKCS#11 function failed.
    #[error("C_{function:?} failed: {}", RvName(*.rv))]
    Pkcs11 {
        /// The function that failed.
        function: Function,
        /// The return value (`CKR_*`).
        rv: RvError,
    },

    /// cryptoki failed before or after calling the module (conversion, missing function).
    #[error("PKCS#11 binding error: {0}")]
    Cryptoki(#[source] CryptokiError),

    /// A key's attributes break the key policy (see `policy.rs`); the key is not used.
    #[error("{key} breaks the key policy: {attribute} {requirement}")]
    KeyPolicy {
        /// Which key, e.g. `system key "smartsign-kek"` or `resident user key (id 0a1b...)`.
        key: String,
        /// The attribute, e.g. `CKA_EXTRACTABLE`.
        attribute: &'static str,
        /// What is wrong, e.g. `must be CK_FALSE`.
        requirement: &'static str,
    },

    /// The key-encryption key lacks the templates that keep unwrapped keys inside the HSM
    /// (a KEK made before they existed, or by hand).
    #[error(
        "the key-encryption key's {template} {problem}, so whoever may use the KEK could unwrap \
         a user key as an extractable object and read it; stop the daemon and replace the KEK \
         with `smartsign-ctl keys rotate-kek` (it re-wraps every user key inside the HSM)"
    )]
    KekTemplate {
        /// `CKA_UNWRAP_TEMPLATE` or `CKA_WRAP_TEMPLATE`.
        template: pkcs11_arrays::ArrayAttribute,
        /// What is wrong, e.g. `is missing`.
        problem: String,
    },

    /// Several key-encryption keys are on the token: a rotation started and has not finished.
    #[error(
        "several key-encryption keys are on the token: a KEK rotation has not finished; stop \
         the daemon and run `smartsign-ctl keys rotate-kek` again to finish it"
    )]
    KekRotationUnfinished,

    /// A wrapped key names a KEK that is not on the token.
    #[error(
        "the user key is wrapped under key-encryption key {kek}, which is not on this token \
         (destroyed by a KEK rotation, or another token's)"
    )]
    KekNotOnToken {
        /// The KEK id in hex, or `without id`.
        kek: String,
    },

    /// A system key has not been provisioned (run the key ceremony).
    #[error("system key \"{}\" is not on the token; run the key ceremony", .0.label())]
    SystemKeyMissing(SystemKey),

    /// More than one object carries a system key's label; the adapter will not guess.
    #[error("more than one object on the token is labelled \"{label}\"")]
    DuplicateKey {
        /// The label.
        label: &'static str,
    },

    /// A resident user key's CKA_ID is not on the token (or was destroyed).
    #[error("no resident user key with id {id} is on the token")]
    UserKeyNotFound {
        /// The CKA_ID in hex.
        id: String,
    },

    /// The caller's input is malformed.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A stored key reference does not decode.
    #[error("malformed key reference: {0}")]
    MalformedKeyRef(&'static str),

    /// AES-GCM decryption failed: ciphertext, tag, nonce or associated data is not authentic.
    #[error("the ciphertext does not authenticate under the data key")]
    NotAuthentic,

    /// The module answered something that breaks the PKCS#11 contract.
    #[error("unexpected answer from the PKCS#11 module: {0}")]
    UnexpectedResponse(&'static str),

    /// A worker thread could not be started.
    #[error("could not start an HSM worker thread: {0}")]
    WorkerSpawn(#[source] std::io::Error),

    /// A thread could not be given its CPUs or scheduling policy.
    #[error("could not place a thread on its CPUs or scheduling policy: {0}")]
    Placement(#[source] std::io::Error),

    /// Every HSM worker queue slot is taken; the caller should shed load.
    #[error("the HSM request queue is full")]
    Busy,

    /// The adapter has shut down (or a worker thread died).
    #[error("the HSM adapter is shut down")]
    Closed,
}

impl HsmError {
    /// The one mapping of failures to kinds (parsec's `rv_to_response_status`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            HsmError::ModuleLoad { .. } | HsmError::SystemKeyMissing(_) => ErrorKind::Unavailable,
            HsmError::Busy | HsmError::Closed | HsmError::WorkerSpawn(_) => ErrorKind::Unavailable,
            HsmError::Placement(_) => ErrorKind::Unavailable,
            HsmError::TokenNotFound { .. } => ErrorKind::NotFound,
            HsmError::AmbiguousToken { .. } => ErrorKind::InvalidInput,
            HsmError::PinRejected { .. } | HsmError::KeyPolicy { .. } => ErrorKind::NotPermitted,
            HsmError::KekTemplate { .. } => ErrorKind::NotPermitted,
            HsmError::KekRotationUnfinished => ErrorKind::Unavailable,
            HsmError::KekNotOnToken { .. } => ErrorKind::NotFound,
            HsmError::UserKeyNotFound { .. } => ErrorKind::NotFound,
            HsmError::InvalidInput(_) | HsmError::MalformedKeyRef(_) => ErrorKind::InvalidInput,
            HsmError::NotAuthentic => ErrorKind::InvalidInput,
            HsmError::DuplicateKey { .. } | HsmError::UnexpectedResponse(_) => ErrorKind::Internal,
            HsmError::Cryptoki(CryptokiError::LibraryLoading(_)) => ErrorKind::Unavailable,
            HsmError::Cryptoki(_) => ErrorKind::Internal,
            HsmError::Pkcs11 { rv, .. } => match rv {
                RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionClosed
                | RvError::SessionHandleInvalid
                | RvError::SessionCount
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::HostMemory
                | RvError::FunctionCanceled
                | RvError::FipsSelfTestFailed => ErrorKind::Unavailable,
                RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::UserPinNotInitialized
                | RvError::UserAnotherAlreadyLoggedIn
                | RvError::KeyFunctionNotPermitted
                | RvError::KeyNotWrappable
                | RvError::KeyUnextractable
                | RvError::AttributeSensitive
                | RvError::AttributeReadOnly
                | RvError::ActionProhibited
                | RvError::TokenWriteProtected
                | RvError::SessionReadOnly
                | RvError::SessionReadOnlyExists
                | RvError::FunctionRejected => ErrorKind::NotPermitted,
                RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::WrappingKeyHandleInvalid
                | RvError::UnwrappingKeyHandleInvalid => ErrorKind::NotFound,
                RvError::DataInvalid
                | RvError::DataLenRange
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                | RvError::SignatureInvalid
                | RvError::SignatureLenRange => ErrorKind::InvalidInput,
                _ => ErrorKind::Internal,
            },
        }
    }

    /// The PKCS#11 return value behind this error, if there is one.
    pub fn rv(&self) -> Option<RvError> {
        match self {
            HsmError::Pkcs11 { rv, .. } | HsmError::PinRejected { rv, .. } => Some(*rv),
            HsmError::Cryptoki(CryptokiError::Pkcs11(rv, _)) => Some(*rv),
            _ => None,
        }
    }

    /// What a worker must do before the operation can succeed again.
    pub(crate) fn recovery(&self) -> Option<Recovery> {
        match self.rv()? {
            // The session is gone; its handle number may even belong to a new session by now.
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::CryptokiNotInitialized => Some(Recovery::SessionLost),
            // The session may still exist but cannot be trusted to work.
            RvError::UserNotLoggedIn | RvError::DeviceError => Some(Recovery::Session),
            // The session is fine but object handles went stale: somebody logged the
            // application out and in again, or all its sessions were closed in between.
            RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
            | RvError::WrappingKeyHandleInvalid
            | RvError::UnwrappingKeyHandleInvalid => Some(Recovery::Handles),
            _ => None,
        }
    }

    /// A `C_Login` failure: PIN problems get their own message.
    pub(crate) fn login(err: CryptokiError, role: Role) -> HsmError {
        match err {
            CryptokiError::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::PinInvalid
                | RvError::PinLenRange),
                Function::Login,
            ) => HsmError::PinRejected { role, rv },
            other => HsmError::from(other),
        }
    }
}

impl From<CryptokiError> for HsmError {
    fn from(err: CryptokiError) -> Self {
        match err {
            CryptokiError::Pkcs11(rv, function) => HsmError::Pkcs11 { function, rv },
            other => HsmError::Cryptoki(other),
        }
    }
}

/// How a worker recovers from a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// The session no longer exists: open a new one (never close the old handle, whose number
    /// the module may have given to another session since), log in, find the keys again.
    SessionLost,
    /// The session is unusable: open a new one, close the old one, log in, find the keys again.
    Session,
    /// Log in (if logged out) and find the keys' handles again.
    Handles,
}

/// Shows an `RvError` as its PKCS#11 name (`CKR_PIN_INCORRECT`) rather than cryptoki's
/// paragraph-long description.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RvName(pub(crate) RvError);

impl fmt::Display for RvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            RvError::VendorDefined(code) => write!(f, "CKR_VENDOR_DEFINED+{code:#x}"),
            RvError::UnknownErrorCode(code) => write!(f, "unknown CKR {code:#x}"),
            rv => {
                // The variants are the CKR_ names in CamelCase: PinIncorrect -> PIN_INCORRECT.
                let camel = format!("{rv:?}");
                f.write_str("CKR_")?;
                for (i, c) in camel.chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        f.write_str("_")?;
                    }
                    write!(f, "{}", c.to_ascii_uppercase())?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rv_names_are_pkcs11_names() {
        assert_eq!(
            RvName(RvError::PinIncorrect).to_string(),
            "CKR_PIN_INCORRECT"
        );
        assert_eq!(
            RvName(RvError::SessionHandleInvalid).to_string(),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(RvName(RvError::Cancel).to_string(), "CKR_CANCEL");
    }

    #[test]
    fn pkcs11_error_message_names_function_and_rv() {
        let err = HsmError::from(CryptokiError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::Sign,
        ));
        assert_eq!(err.to_string(), "C_Sign failed: CKR_KEY_HANDLE_INVALID");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.recovery(), Some(Recovery::Handles));
    }

    #[test]
    fn wrong_pin_has_its_own_message() {
        let err = HsmError::login(
            CryptokiError::Pkcs11(RvError::PinIncorrect, Function::Login),
            Role::User,
        );
        assert!(
            err.to_string()
                .starts_with("the token refused the PIN for the user")
        );
        assert_eq!(err.kind(), ErrorKind::NotPermitted);
        assert_eq!(err.rv(), Some(RvError::PinIncorrect));
    }

    #[test]
    fn lost_sessions_are_recovered() {
        for rv in [
            RvError::SessionClosed,
            RvError::SessionHandleInvalid,
            RvError::DeviceRemoved,
        ] {
            let err = HsmError::from(CryptokiError::Pkcs11(rv, Function::Sign));
            assert_eq!(err.recovery(), Some(Recovery::SessionLost));
            assert_eq!(err.kind(), ErrorKind::Unavailable);
        }
        for rv in [RvError::UserNotLoggedIn, RvError::DeviceError] {
            let err = HsmError::from(CryptokiError::Pkcs11(rv, Function::Sign));
            assert_eq!(err.recovery(), Some(Recovery::Session));
            assert_eq!(err.kind(), ErrorKind::Unavailable);
        }
        let err = HsmError::from(CryptokiError::Pkcs11(RvError::DataLenRange, Function::Sign));
        assert_eq!(err.recovery(), None);
    }
}
