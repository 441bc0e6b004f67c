//! The one place where errors become HTTP problems (RFC 9457 `application/problem+json`).
//!
//! Every refusal the API gives is an [`ApiError`] with API.md's stable `code`. Internal causes
//! (HSM return values, SQLite errors) go to the log with the request's id and never into the
//! response body.

use axum::http::StatusCode;
use serde_json::json;

/// A refusal, by API.md's `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ApiError {
    /// 400 `invalid_request`, `detail` names the field.
    InvalidRequest(String),
    InvalidHash(String),
    ClientCertificateRequired,
    Forbidden,
    NotFound(&'static str),
    /// 404 `not_found` with `Retry-After`: the caller's resource exists but what it asks for is
    /// not there yet (a signing receipt before a checkpoint covers its record).
    NotYet {
        what: &'static str,
        retry_after: u32,
    },
    MethodNotAllowed,
    AccountExists,
    AccountNotActive(&'static str),
    NotIamSmartPlus,
    AlreadyIamSmartPlus,
    CertificateExpired,
    CertificateRevoked,
    NoCertificate,
    RenewalNotDue,
    RenewalTooLate,
    RequestNotPending(&'static str),
    RequestExpired,
    Underage,
    GuardianRequired,
    GuardianUnderage,
    InvalidHkic(String),
    HkicMismatch,
    AuthorisationInvalid,
    TooManyAttempts,
    /// 429 `too_many_pending`: the account has `policy.max_pending_requests` pending requests.
    TooManyPending,
    /// 409 `already_unsealed`: an unseal share given to a daemon that is not sealed.
    AlreadyUnsealed,
    /// 422 `invalid_share`: not a share, or one whose digest is not configured.
    InvalidShare,
    /// 409 `share_already_given`: this officer has given another share of the quorum.
    ShareAlreadyGiven,
    /// 409 `hkic_already_registered`: an account that is not deregistered holds this HKIC
    /// number (one account per person, API.md "Additions").
    HkicAlreadyRegistered,
    /// 409 `conflict`: a concurrent change to the same account or request won; nothing was
    /// changed; retry (API.md, "Additions").
    Conflict,
    /// 503 `sealed`: the route needs the HSM, which a quorum of officers has not unsealed yet.
    Sealed,
    /// 503 `sealed`: the quorum was reached but unsealing failed; `detail` says why.
    UnsealFailed(String),
    HsmUnavailable,
    AuditUnavailable,
    StatusUnavailable,
    /// 503 `store_unavailable`: the store is busy past its timeout or cannot be opened; the
    /// answer carries `Retry-After`.
    StoreUnavailable,
    /// 413 `payload_too_large`: the body is over the route's limit (the number).
    PayloadTooLarge(usize),
    /// 408 `request_timeout`: the body did not arrive within the listener's body timeout.
    RequestTimeout,
    /// 429 `rate_limited`: the client certificate is over its rate or concurrency; retry after
    /// the seconds given (API.md "Additions").
    RateLimited {
        retry_after: u32,
    },
    /// 500: a fault of ours; the cause is logged, not shown.
    Internal,
}

impl ApiError {
    /// Seconds after which a retry may succeed (`Retry-After`), for the errors that have one.
    pub(crate) fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::StoreUnavailable => Some(1),
            ApiError::RateLimited { retry_after } | ApiError::NotYet { retry_after, .. } => {
                Some((*retry_after).max(1))
            }
            _ => None,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidRequest(_) | InvalidHash(_) => StatusCode::BAD_REQUEST,
            ClientCertificateRequired => StatusCode::UNAUTHORIZED,
            Forbidden => StatusCode::FORBIDDEN,
            NotFound(_) | NotYet { .. } => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AccountExists
            | AccountNotActive(_)
            | NotIamSmartPlus
            | AlreadyIamSmartPlus
            | CertificateExpired
            | CertificateRevoked
            | NoCertificate
            | RenewalNotDue
            | RenewalTooLate
            | RequestNotPending(_)
            | AlreadyUnsealed
            | ShareAlreadyGiven
            | Conflict
            | HkicAlreadyRegistered => StatusCode::CONFLICT,
            RequestExpired => StatusCode::GONE,
            Underage | GuardianRequired | GuardianUnderage | InvalidHkic(_) | HkicMismatch
            | AuthorisationInvalid | InvalidShare => StatusCode::UNPROCESSABLE_ENTITY,
            TooManyAttempts | TooManyPending | RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Sealed | UnsealFailed(_) | HsmUnavailable | AuditUnavailable | StatusUnavailable
            | StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidRequest(_) => "invalid_request",
            InvalidHash(_) => "invalid_hash",
            ClientCertificateRequired => "client_certificate_required",
            Forbidden => "forbidden",
            NotFound(_) | NotYet { .. } => "not_found",
            MethodNotAllowed => "method_not_allowed",
            AccountExists => "account_exists",
            AccountNotActive(_) => "account_not_active",
            NotIamSmartPlus => "not_iam_smart_plus",
            AlreadyIamSmartPlus => "already_iam_smart_plus",
            CertificateExpired => "certificate_expired",
            CertificateRevoked => "certificate_revoked",
            NoCertificate => "no_certificate",
            RenewalNotDue => "renewal_not_due",
            RenewalTooLate => "renewal_too_late",
            RequestNotPending(_) => "request_not_pending",
            RequestExpired => "request_expired",
            Underage => "underage",
            GuardianRequired => "guardian_required",
            GuardianUnderage => "guardian_underage",
            InvalidHkic(_) => "invalid_hkic",
            HkicMismatch => "hkic_mismatch",
            AuthorisationInvalid => "authorisation_invalid",
            TooManyAttempts => "too_many_attempts",
            TooManyPending => "too_many_pending",
            RateLimited { .. } => "rate_limited",
            PayloadTooLarge(_) => "payload_too_large",
            RequestTimeout => "request_timeout",
            AlreadyUnsealed => "already_unsealed",
            InvalidShare => "invalid_share",
            ShareAlreadyGiven => "share_already_given",
            Conflict => "conflict",
            HkicAlreadyRegistered => "hkic_already_registered",
            Sealed | UnsealFailed(_) => "sealed",
            HsmUnavailable => "hsm_unavailable",
            AuditUnavailable => "audit_unavailable",
            StatusUnavailable => "status_unavailable",
            StoreUnavailable => "store_unavailable",
            Internal => "internal_error",
        }
    }

    fn title(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidRequest(_) => "Invalid request",
            InvalidHash(_) => "Hash does not fit its algorithm",
            ClientCertificateRequired => "Client certificate required",
            Forbidden => "Forbidden",
            NotFound(_) | NotYet { .. } => "Not found",
            MethodNotAllowed => "Method not allowed",
            AccountExists => "Account exists",
            AccountNotActive(_) => "Account not active",
            NotIamSmartPlus => "Not an iAM Smart+ account",
            AlreadyIamSmartPlus => "Already an iAM Smart+ account",
            CertificateExpired => "Certificate expired",
            CertificateRevoked => "Certificate revoked",
            NoCertificate => "No certificate",
            RenewalNotDue => "Renewal not due",
            RenewalTooLate => "Renewal too late",
            RequestNotPending(_) => "Request not pending",
            RequestExpired => "Request expired",
            Underage => "Applicant under 11",
            GuardianRequired => "Guardian required",
            GuardianUnderage => "Guardian under 18",
            InvalidHkic(_) => "Invalid HKIC number",
            HkicMismatch => "HKIC number does not match",
            AuthorisationInvalid => "Authorisation invalid",
            TooManyAttempts => "Too many attempts",
            TooManyPending => "Too many pending requests",
            AlreadyUnsealed => "Already unsealed",
            InvalidShare => "Invalid share",
            ShareAlreadyGiven => "Share already given",
            Conflict => "Conflict",
            HkicAlreadyRegistered => "HKIC already registered",
            Sealed => "Sealed",
            UnsealFailed(_) => "Unsealing failed",
            HsmUnavailable => "HSM unavailable",
            AuditUnavailable => "Audit log unavailable",
            StatusUnavailable => "Certificate status unavailable",
            StoreUnavailable => "Store unavailable",
            PayloadTooLarge(_) => "Payload too large",
            RequestTimeout => "Request timeout",
            RateLimited { .. } => "Rate limited",
            Internal => "Internal error",
        }
    }

    fn detail(&self) -> String {
        use ApiError::*;
        match self {
            InvalidRequest(detail)
            | InvalidHash(detail)
            | InvalidHkic(detail)
            | UnsealFailed(detail) => detail.clone(),
            NotFound(what) => format!("no such {what}"),
            NotYet { what, .. } => {
                format!("no {what} yet; retry after the number of seconds in Retry-After")
            }
            AccountNotActive(status) => format!("the account is {status}"),
            RequestNotPending(status) => format!("the request is {status}"),
            ClientCertificateRequired => {
                "a client certificate from the configured client CA is required".into()
            }
            Forbidden => "this caller may not use this route or resource".into(),
            TooManyAttempts => "locked after 3 bad authorisations, or, for a request carrying an \
                HKIC number, after 3 HKIC mismatches for the account within 24 hours"
                .into(),
            TooManyPending => "the account has as many pending signing requests as it may; \
                wait until one is authorised, rejected or expired"
                .into(),
            AlreadyUnsealed => "already unsealed: the HSM is open; no share is needed".into(),
            InvalidShare => {
                "not a share of this appliance's quorum: give the whole text of your share file \
                 (smartsign-share-v1....) from the ceremony whose digests are configured"
                    .into()
            }
            HkicAlreadyRegistered => "an account that is not deregistered holds this HKIC \
                                      number: one account per person"
                .into(),
            Conflict => "a concurrent change to the same account or request won; nothing was \
                         changed; retry"
                .into(),
            ShareAlreadyGiven => "this officer has given another share already: each share of \
                 the quorum comes from a different officer"
                .into(),
            Sealed => "the daemon is sealed: a quorum of officers must unseal it with \
                 POST /v1/admin/unseal before the HSM can be used"
                .into(),
            HsmUnavailable => "the HSM cannot be used now; nothing was signed".into(),
            AuditUnavailable => "the audit log cannot be written; nothing was signed".into(),
            StatusUnavailable => {
                "no fresh certificate status could be had from the CA; nothing was signed".into()
            }
            StoreUnavailable => "the store is busy or cannot be reached; retry after the \
                number of seconds in Retry-After"
                .into(),
            RenewalNotDue => {
                "the renewal window has not opened, or the certificate is still valid (renew it \
                 rather than re-apply)"
                    .into()
            }
            RenewalTooLate => "the certificate has expired; re-apply for a new one".into(),
            PayloadTooLarge(limit) => {
                format!("the request body must be at most {limit} bytes on this route")
            }
            RequestTimeout => "the request body did not arrive in time; nothing was done".into(),
            RateLimited { retry_after } => format!(
                "this client certificate is over its request rate or has too many requests in \
                 flight; nothing was done; retry after {retry_after} seconds"
            ),
            Internal => "see the daemon's log".into(),
            _ => self.title().to_lowercase(),
        }
    }

    /// The problem document of the request `request_id`.
    pub(crate) fn body(&self, request_id: &str) -> Vec<u8> {
        json!({
            "type": "about:blank",
            "title": self.title(),
            "status": self.status().as_u16(),
            "code": self.code(),
            "detail": self.detail(),
            "request_id": request_id,
        })
        .to_string()
        .into_bytes()
    }
}

impl From<application::AppError> for ApiError {
    fn from(error: application::AppError) -> Self {
        use application::AppError as App;
        match error {
            App::InvalidRequest(detail) => ApiError::InvalidRequest(detail),
            App::InvalidHash(detail) => ApiError::InvalidHash(detail),
            App::NotFound(what) => ApiError::NotFound(what),
            App::Forbidden => ApiError::Forbidden,
            App::AccountExists => ApiError::AccountExists,
            App::HkicAlreadyRegistered => ApiError::HkicAlreadyRegistered,
            App::Underage => ApiError::Underage,
            App::GuardianRequired => ApiError::GuardianRequired,
            App::GuardianUnderage => ApiError::GuardianUnderage,
            App::AlreadyIamSmartPlus => ApiError::AlreadyIamSmartPlus,
            App::RenewalNotDue => ApiError::RenewalNotDue,
            App::RenewalTooLate => ApiError::RenewalTooLate,
            App::AccountNotActive(status) => ApiError::AccountNotActive(status),
            App::NotIamSmartPlus => ApiError::NotIamSmartPlus,
            App::NoCertificate => ApiError::NoCertificate,
            App::CertificateRevoked => ApiError::CertificateRevoked,
            App::CertificateExpired => ApiError::CertificateExpired,
            App::RequestNotPending(status) => ApiError::RequestNotPending(status),
            App::RequestExpired => ApiError::RequestExpired,
            App::AuthorisationInvalid => ApiError::AuthorisationInvalid,
            App::TooManyAttempts => ApiError::TooManyAttempts,
            App::TooManyPending => ApiError::TooManyPending,
            App::InvalidHkic(detail) => ApiError::InvalidHkic(detail),
            App::HkicMismatch => ApiError::HkicMismatch,
            App::Conflict => ApiError::Conflict,
            App::HsmUnavailable(cause) | App::HsmBusy(cause) => {
                tracing::error!(error = %cause, "HSM unavailable");
                ApiError::HsmUnavailable
            }
            App::AuditUnavailable(cause) => {
                tracing::error!(error = %cause, "audit append failed");
                ApiError::AuditUnavailable
            }
            App::StatusUnavailable(cause) => {
                tracing::error!(error = %cause, "no usable certificate status");
                ApiError::StatusUnavailable
            }
            App::StoreUnavailable(cause) => {
                tracing::error!(error = %cause, "store unavailable");
                ApiError::StoreUnavailable
            }
            App::Store(error) => ApiError::from(error),
            App::Fault(cause) => {
                tracing::error!(error = %cause, "internal fault");
                ApiError::Internal
            }
        }
    }
}

impl From<hsm_adapter::HsmError> for ApiError {
    fn from(error: hsm_adapter::HsmError) -> Self {
        match error.kind() {
            hsm_adapter::ErrorKind::Unavailable => {
                tracing::error!(%error, "HSM unavailable");
                ApiError::HsmUnavailable
            }
            _ => {
                tracing::error!(%error, "HSM operation failed");
                ApiError::Internal
            }
        }
    }
}

impl From<audit_log::AuditError> for ApiError {
    fn from(error: audit_log::AuditError) -> Self {
        tracing::error!(%error, "audit append failed");
        ApiError::AuditUnavailable
    }
}

impl From<cert_lifecycle::StoreError> for ApiError {
    fn from(error: cert_lifecycle::StoreError) -> Self {
        match error {
            // Only account ids are chosen by callers; every other key is random.
            cert_lifecycle::StoreError::AlreadyExists => ApiError::AccountExists,
            // A conditional transition whose precondition a concurrent change broke.
            cert_lifecycle::StoreError::Conflict => ApiError::Conflict,
            error @ cert_lifecycle::StoreError::Unavailable(_) => {
                tracing::error!(%error, "store unavailable");
                ApiError::StoreUnavailable
            }
            error => {
                tracing::error!(%error, "store operation failed");
                ApiError::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant: adding a variant without listing it here fails to compile in
    /// `status()`/`code()`, and listing it here puts its code under the OpenAPI check below.
    fn every_error() -> Vec<ApiError> {
        use ApiError::*;
        vec![
            InvalidRequest("x".into()),
            InvalidHash("x".into()),
            ClientCertificateRequired,
            Forbidden,
            NotFound("x"),
            MethodNotAllowed,
            AccountExists,
            AccountNotActive("suspended"),
            NotIamSmartPlus,
            AlreadyIamSmartPlus,
            CertificateExpired,
            CertificateRevoked,
            NoCertificate,
            RenewalNotDue,
            RenewalTooLate,
            RequestNotPending("signed"),
            RequestExpired,
            Underage,
            GuardianRequired,
            GuardianUnderage,
            InvalidHkic("x".into()),
            HkicMismatch,
            AuthorisationInvalid,
            TooManyAttempts,
            TooManyPending,
            AlreadyUnsealed,
            InvalidShare,
            ShareAlreadyGiven,
            Conflict,
            HkicAlreadyRegistered,
            Sealed,
            UnsealFailed("x".into()),
            HsmUnavailable,
            AuditUnavailable,
            StatusUnavailable,
            StoreUnavailable,
            PayloadTooLarge(16),
            RequestTimeout,
            RateLimited { retry_after: 3 },
            NotYet {
                what: "receipt",
                retry_after: 60,
            },
            Internal,
        ]
    }

    #[test]
    fn every_code_is_in_the_openapi_file_with_its_status() {
        let spec: serde_json::Value =
            serde_json::from_str(include_str!("../openapi.json")).unwrap();
        let codes = spec["components"]["schemas"]["ProblemCode"]["enum"]
            .as_array()
            .unwrap();
        for error in every_error() {
            assert!(
                codes.iter().any(|code| code == error.code()),
                "{} is not in openapi.json",
                error.code()
            );
            let body: serde_json::Value = serde_json::from_slice(&error.body("r-1")).unwrap();
            assert_eq!(body["status"], error.status().as_u16());
            assert_eq!(body["code"], error.code());
            assert_eq!(body["type"], "about:blank");
            assert_eq!(body["request_id"], "r-1");
        }
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let body = String::from_utf8(ApiError::Internal.body("r-1")).unwrap();
        assert!(body.contains("see the daemon's log"), "{body}");
    }
}
