//! Errors of the embedded CA and the development TLS PKI.

use std::path::PathBuf;

/// What went wrong issuing, revoking or looking up a certificate, or making the dev PKI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The request or configuration is not acceptable (the text says which field and why; it
    /// never holds the personal data itself).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The CA configuration is not usable.
    #[error("invalid CA configuration: {0}")]
    Config(String),
    /// No certificate with this serial was issued by this CA.
    #[error("unknown certificate serial")]
    UnknownSerial,
    /// Not a CRLReason code this CA accepts (RFC 5280 section 5.3.1: 0-6, 9, 10).
    #[error("unsupported revocation reason code {0}")]
    InvalidReason(u8),
    /// The requested validity ends after the issuing CA's own.
    #[error("the certificate would outlive the issuing CA")]
    OutsideCaValidity,
    /// A certificate on disk does not belong to the key in the HSM (or to its issuer).
    #[error("{file} does not match the CA key in the HSM: {why}")]
    KeyMismatch {
        /// The file name.
        file: &'static str,
        /// What differs.
        why: &'static str,
    },
    /// The HSM failed or refused.
    #[error("HSM: {0}")]
    Hsm(#[from] hsm_adapter::HsmError),
    /// DER encoding or decoding failed.
    #[error("DER: {0}")]
    Der(#[from] der::Error),
    /// The CA's state database failed.
    #[error("CA state database: {0}")]
    Database(#[from] rusqlite::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A CA endpoint (CMP, OCSP, CRL) could not be reached or did not answer in time, or
    /// answered with an HTTP error.
    #[error("{url}: {why}")]
    Transport {
        /// The endpoint.
        url: String,
        /// What happened (no message content).
        why: String,
    },
    /// A CMP, OCSP or CRL message is malformed, unexpected or does not belong to the
    /// transaction (wrong transaction id, nonce, status, or content type).
    #[error("protocol: {0}")]
    Protocol(String),
    /// A message's protection or signature does not verify, or its signer is not trusted.
    #[error("protection: {0}")]
    Protection(String),
    /// The CA answered, and refused (the text is the CA's status and reason).
    #[error("refused by the CA: {0}")]
    Refused(String),
    /// A software key could not be made, read or used (dev PKI only).
    #[error("software key: {0}")]
    Key(String),
    /// No certificate status satisfying the policy could be had (the text says why; no personal
    /// data).
    #[error("certificate status unavailable: {0}")]
    StatusUnavailable(String),
    /// A bug or an impossible state.
    #[error("internal: {0}")]
    Internal(String),
}

impl CaError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CaError {
        let path = path.into();
        move |source| CaError::Io { path, source }
    }
}
