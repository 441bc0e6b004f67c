//! What a workflow refuses with. The edge (the daemon's HTTP layer) maps each to API.md's code;
//! a failure of a port keeps its cause, for the log, never for the caller.

use cert_lifecycle::StoreError;

/// The cause of a port's failure, as the port gave it.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A refusal or a failure of a workflow.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A field of the input breaks a rule; the text names the field.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A hash whose length does not fit its algorithm.
    #[error("invalid hash: {0}")]
    InvalidHash(String),
    /// No such thing (the text names it), or not the caller's to see.
    #[error("no such {0}")]
    NotFound(&'static str),
    /// The caller may not act on this resource.
    #[error("forbidden")]
    Forbidden,
    /// An account with this id exists already.
    #[error("account exists")]
    AccountExists,
    /// An account that is not deregistered holds this HKIC number: one account per person.
    #[error("HKIC already registered")]
    HkicAlreadyRegistered,
    /// The applicant is under 11.
    #[error("applicant under 11")]
    Underage,
    /// A minor registers only with a guardian.
    #[error("guardian required")]
    GuardianRequired,
    /// The guardian is under 18.
    #[error("guardian under 18")]
    GuardianUnderage,
    /// The account is "iAM Smart+" already.
    #[error("already iAM Smart+")]
    AlreadyIamSmartPlus,
    /// The renewal window has not opened, the certificate is still valid (renew it rather than
    /// re-apply), or a key change of the account is under way.
    #[error("renewal not due")]
    RenewalNotDue,
    /// The certificate has expired: re-apply.
    #[error("renewal too late")]
    RenewalTooLate,
    /// The account's status (named) does not allow this.
    #[error("the account is {0}")]
    AccountNotActive(&'static str),
    /// Only an "iAM Smart+" account can do this.
    #[error("not an iAM Smart+ account")]
    NotIamSmartPlus,
    /// The account has no current certificate.
    #[error("no certificate")]
    NoCertificate,
    /// The certificate is revoked (here or at the CA), or can no longer sign.
    #[error("certificate revoked")]
    CertificateRevoked,
    /// The certificate has expired.
    #[error("certificate expired")]
    CertificateExpired,
    /// The request is in the named state, not pending.
    #[error("the request is {0}")]
    RequestNotPending(&'static str),
    /// The request expired before it was authorised.
    #[error("request expired")]
    RequestExpired,
    /// The device signature does not verify, or is not the bound device's.
    #[error("authorisation invalid")]
    AuthorisationInvalid,
    /// The request is locked after too many bad authorisations, or the account's HKIC-carrying
    /// requests after too many HKIC mismatches.
    #[error("too many attempts")]
    TooManyAttempts,
    /// The account has as many pending requests as it may.
    #[error("too many pending requests")]
    TooManyPending,
    /// Not an HKIC number (the text says which field and why).
    #[error("invalid HKIC number: {0}")]
    InvalidHkic(String),
    /// The HKIC number given is not the account holder's.
    #[error("HKIC number does not match")]
    HkicMismatch,
    /// A concurrent change to the same account or request won each try; nothing was changed.
    #[error("a concurrent change won")]
    Conflict,
    /// The HSM cannot be used now.
    #[error("the HSM is unavailable")]
    HsmUnavailable(#[source] Cause),
    /// The HSM is healthy but its queue is full: the same call may succeed a moment later.
    /// The signing flow waits and tries again ([`crate::signing`]); elsewhere it is
    /// `hsm_unavailable`.
    #[error("the HSM is busy")]
    HsmBusy(#[source] Cause),
    /// The audit log cannot be written: nothing may be done (fail closed).
    #[error("the audit log is unavailable")]
    AuditUnavailable(#[source] Cause),
    /// No usable certificate status from the CA.
    #[error("no usable certificate status")]
    StatusUnavailable(#[source] Cause),
    /// The store is busy past its timeout or cannot be opened now: retry later.
    #[error("the store is unavailable")]
    StoreUnavailable(#[source] StoreError),
    /// The store failed (not a lost race: that is [`AppError::Conflict`]).
    #[error("store operation failed")]
    Store(#[source] StoreError),
    /// A fault of ours or of a part we rely on; the cause is for the log.
    #[error("internal fault")]
    Fault(#[source] Cause),
}

impl AppError {
    /// A fault with this cause.
    pub fn fault(cause: impl Into<Cause>) -> AppError {
        AppError::Fault(cause.into())
    }

    /// API.md's `code` for this error: what an audit record of a refusal keeps.
    pub fn code(&self) -> &'static str {
        use AppError::*;
        match self {
            InvalidRequest(_) => "invalid_request",
            InvalidHash(_) => "invalid_hash",
            NotFound(_) => "not_found",
            Forbidden => "forbidden",
            AccountExists | Store(StoreError::AlreadyExists) => "account_exists",
            HkicAlreadyRegistered => "hkic_already_registered",
            Underage => "underage",
            GuardianRequired => "guardian_required",
            GuardianUnderage => "guardian_underage",
            AlreadyIamSmartPlus => "already_iam_smart_plus",
            RenewalNotDue => "renewal_not_due",
            RenewalTooLate => "renewal_too_late",
            AccountNotActive(_) => "account_not_active",
            NotIamSmartPlus => "not_iam_smart_plus",
            NoCertificate => "no_certificate",
            CertificateRevoked => "certificate_revoked",
            CertificateExpired => "certificate_expired",
            RequestNotPending(_) => "request_not_pending",
            RequestExpired => "request_expired",
            AuthorisationInvalid => "authorisation_invalid",
            TooManyAttempts => "too_many_attempts",
            TooManyPending => "too_many_pending",
            InvalidHkic(_) => "invalid_hkic",
            HkicMismatch => "hkic_mismatch",
            Conflict => "conflict",
            HsmUnavailable(_) | HsmBusy(_) => "hsm_unavailable",
            AuditUnavailable(_) => "audit_unavailable",
            StatusUnavailable(_) => "status_unavailable",
            StoreUnavailable(_) => "store_unavailable",
            Store(_) | Fault(_) => "internal_error",
        }
    }
}

impl From<StoreError> for AppError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict => AppError::Conflict,
            error @ StoreError::Unavailable(_) => AppError::StoreUnavailable(error),
            error => AppError::Store(error),
        }
    }
}
