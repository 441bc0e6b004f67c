//! Accounts, iAM Smart-Certs and signing requests as state machines, and the rules that move
//! them: the age rules (11 to register, a guardian under 18, the certificate of a minor revoked at
//! 18), the registration rule, the signing-request flow, and the store that keeps them.
//!
//! It owns the domain types with their wire names (API.md), HKIC number parsing, and the store
//! (SQLite by default, PostgreSQL for several nodes, behind [`Store`]). It does no network I/O
//! but the PostgreSQL store's connections, and makes no PKCS#11 call, and it
//! never sees personal data in plaintext apart from the HKIC number while it is parsed: names,
//! dates of birth and results arrive sealed by the daemon. Every rule takes `now` as a parameter.

#![forbid(unsafe_code)]

mod account;
mod age;
mod certificate;
mod csc;
mod error;
mod events;
mod hkic;
mod ids;
mod renewal;
mod signing;
mod store;
mod wire;

pub use account::{
    AccountRecord, AccountStatus, RECTIFICATION_PERIOD, SuspendedBy, Tier, check_registration,
};
pub use age::{
    ADULT_AGE, HK_OFFSET, MIN_REGISTRATION_AGE, RETENTION_YEARS, adult_on, age_on, anniversary,
    hk_date, is_minor, minor_certificate_ends, retention_ends, start_of_hk_day,
};
pub use certificate::{CertStatus, CertificateRecord, RevocationReason, profile_for};
pub use csc::CscSad;
pub use error::{DatabaseError, FlowError, HkicReason, ParseError, RuleError, StoreError};
pub use events::{CertificateNotice, EventDetails, EventKind, StoredEvent, UserEvent};
pub use hkic::HkicNumber;
pub use ids::{AccountId, CertSerial, RequestId, ServiceName};
pub use renewal::{
    ConsentChallenge, ConsentPurpose, IssuanceJournal, IssuancePurpose, KeyChangeJournal,
};
pub use signing::{
    AuthOutcome, Decision, MAX_BAD_ATTEMPTS, SigningRequest, SigningStatus, Transition,
    identification_code_from_random,
};
/// The shared vocabulary (`smartsign-types`): hash algorithms and certificate profiles.
pub use smartsign_types::{HashAlgorithm, Profile};
pub use store::{
    KekRotation, KeyRefSlot, Leadership, PendingAudit, PgStore, SqliteStore, Store, StoredKeyRef,
    TaidRecord,
};
