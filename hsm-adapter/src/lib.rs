//! hsm-adapter: the only code in smartsign that calls PKCS#11.
//!
//! It opens a module, picks the token by label or serial, and runs a fixed pool of worker
//! threads that each own one logged-in session; the async [`Hsm`] API queues jobs for them, so
//! that no async runtime thread ever blocks on the HSM. It generates and guards the user signing
//! keys (wrapped under a trusted key-encryption key, or resident on the token), signs digests,
//! provisions and uses the system keys (HMAC for TAIDs and HKIC numbers, AES-GCM for personal
//! data, EC keys for the audit log and the embedded CA), checks every key against the key policy
//! before use, and turns PKCS#11 failures into one error type.
//!
//! It also holds the secret sharing of the user PIN among the officers ([`quorum`]), which the
//! daemon (unseal) and `smartsign-ctl` (the ceremony) share.
//!
//! It does not decide *whether* to sign (that is the daemon's signing flow), store key references
//! (the caller persists [`UserKeyRef::to_bytes`]), or build certificates and CMS structures.
//!
//! Key custody: the KEK carries an unwrap and a wrap template (`templates.rs`, set through
//! `pkcs11-arrays`), so what it unwraps can only be a sensitive, sign-only private session key;
//! `kek.rs` rotates it, `clone.rs` copies the system keys to a second HSM, `ceremony.rs` sets a
//! token up for the officers' ceremony and reads it back for its transcript.
//!
//! SoftHSM note: the KEK is a public object there (only the security officer can set
//! CKA_TRUSTED, and SoftHSM lets the SO create public objects only). SoftHSM stores public
//! objects unencrypted in its token directory, so on SoftHSM the KEK protects nothing against
//! someone who can read that directory: SoftHSM is for development and tests only.
#![forbid(unsafe_code)]

mod affinity;
pub mod ceremony;
pub mod clone;
mod config;
mod directory;
mod error;
mod hsm;
mod kek;
mod keys;
mod module;
mod operations;
mod policy;
mod provision;
mod public_key;
pub mod quorum;
mod session_pool;
mod templates;

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "bench")]
pub mod bench_flow;

pub use affinity::{allowed_cpus, describe as describe_cpus};
pub use config::{HsmConfig, SOFTHSM_MODULE, TokenSelector};
pub use error::{ErrorKind, HsmError, Role};
pub use hsm::Hsm;
pub use kek::KekStatus;
pub use keys::{
    Digest, HashAlgorithm, KekId, KeyAlgorithm, KeyMode, LABEL_PREFIX, RESIDENT_KEY_LABEL,
    SignatureScheme, SystemKey, UserKeyRef,
};
pub use provision::ProvisionReport;
pub use public_key::PublicKeySpki;
pub use session_pool::Lane;
