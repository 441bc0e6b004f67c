//! The crate's errors, one enum per kind of failure so that the daemon maps each to its API code.

use thiserror::Error;

/// Input that does not parse into one of the crate's checked types.
///
/// Messages never repeat the input: it may be personal data (an HKIC number typed in the wrong
/// field).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseError {
    /// An identifier (account id, service name, request id, certificate serial) of the wrong form.
    #[error("invalid {kind}: {expected}")]
    InvalidId {
        /// What was being parsed, e.g. "account id".
        kind: &'static str,
        /// The form it must have.
        expected: &'static str,
    },
    /// An HKIC number that is malformed or has the wrong check digit.
    #[error("invalid HKIC number: {0}")]
    InvalidHkic(HkicReason),
    /// A string that is not one of an enum's wire names.
    #[error("unknown {kind}")]
    UnknownName {
        /// The enum, e.g. "tier".
        kind: &'static str,
    },
}

/// Why an HKIC number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HkicReason {
    /// Not one or two letters, six digits and a check digit.
    #[error("expected one or two letters, six digits and a check digit")]
    Malformed,
    /// An opening bracket without its closing one, or the other way round.
    #[error("unbalanced brackets around the check digit")]
    Brackets,
    /// The check digit is not 0-9 or A.
    #[error("the check digit must be 0-9 or A")]
    CheckDigitForm,
    /// The check digit does not match the rest of the number.
    #[error("wrong check digit")]
    CheckDigitMismatch,
}

/// A registration refused by the age rules (DOMAIN.md, "The actors"), or a renewal outside its
/// window (DOMAIN.md, "iAM Smart-Cert lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RuleError {
    /// The applicant is younger than 11 on the Hong Kong date (`underage`).
    #[error("applicant is younger than 11")]
    Underage,
    /// The applicant is a minor and no guardian was given (`guardian_required`).
    #[error("a minor needs a parent or guardian")]
    GuardianRequired,
    /// The guardian is younger than 18 (`guardian_underage`).
    #[error("the guardian is younger than 18")]
    GuardianUnderage,
    /// The applicant is an adult and a guardian was given (`invalid_request`).
    #[error("an adult applicant registers without a guardian")]
    GuardianNotAllowed,
    /// Renewal before the renewal window opens (`renewal_not_due`).
    #[error("the renewal window has not opened")]
    RenewalNotDue,
    /// Renewal at or after `not_after`: the user must re-apply (`renewal_too_late`).
    #[error("the certificate has expired; re-apply instead")]
    RenewalTooLate,
}

/// An authorisation that the signing-request state machine refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The request expired before it was authorised (`request_expired`).
    #[error("the signing request has expired")]
    Expired,
    /// The request is signed, rejected, expired, locked or failed (`request_not_pending`).
    #[error("the signing request is not pending")]
    NotPending,
    /// The device signature did not verify (`authorisation_invalid`).
    #[error("the authorisation is not valid")]
    AuthorisationInvalid,
    /// The third bad authorisation locked the request (`too_many_attempts`).
    #[error("too many bad authorisations; the request is locked")]
    TooManyAttempts,
}

/// A store operation that failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record to read or update does not exist.
    #[error("not found")]
    NotFound,
    /// A record with the same key (or unique value) exists already.
    #[error("already exists")]
    AlreadyExists,
    /// The write breaks a relation, e.g. a certificate of an unknown account.
    #[error("conflicts with stored records")]
    Conflict,
    /// A stored value does not parse or contradicts the others (a gap in the audit ledger's
    /// indexes), or the schema is newer than this build knows.
    #[error("store is corrupt or too new: {0}")]
    Corrupt(String),
    /// The database is busy past the store's timeout (another writer holds it), cannot be
    /// opened or reached now (out of file descriptors, the server down or restarting, the
    /// connection lost, no pooled connection free in time): worth retrying later.
    #[error("the store is busy or cannot be reached now")]
    Unavailable(#[source] DatabaseError),
    /// The database failed.
    #[error("database error")]
    Database(#[source] DatabaseError),
    /// The store cannot be set up as configured: a connection URL that does not parse or that
    /// carries a password (which belongs in the password file), a password file that cannot be
    /// read. Never names the password.
    #[error("store configuration: {what}")]
    Config {
        /// What is wrong.
        what: &'static str,
        /// Why, when something else failed.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// What a database reported, by backend, with its own error as the cause.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DatabaseError {
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL (the server, the connection or the client library) failed.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// The PostgreSQL connection pool gave no connection.
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The PostgreSQL store could not start the threads its connections run on.
    #[error("cannot start the PostgreSQL store's threads")]
    Threads(#[source] std::io::Error),
    /// The PostgreSQL server did not answer within the store's wait.
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Database(DatabaseError::Sqlite(e))
    }
}

impl StoreError {
    /// A busy, locked or unopenable database is [`StoreError::Unavailable`]; anything else
    /// stays as it is.
    pub(crate) fn classify(self) -> StoreError {
        use rusqlite::ErrorCode::{CannotOpen, DatabaseBusy, DatabaseLocked};
        match self {
            StoreError::Database(DatabaseError::Sqlite(rusqlite::Error::SqliteFailure(
                failure,
                text,
            ))) if matches!(failure.code, DatabaseBusy | DatabaseLocked | CannotOpen) => {
                StoreError::Unavailable(DatabaseError::Sqlite(rusqlite::Error::SqliteFailure(
                    failure, text,
                )))
            }
            error => error,
        }
    }
}
