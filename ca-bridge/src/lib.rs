//! Everything that talks to a certification authority: the CMP client (RFC 9483 lightweight
//! profile over HTTP, RFC 6712), OCSP (RFC 6960) and CRL fetching, verification and caching; and
//! the embedded CA, whose keys live in the HSM, serving the same protocols so that the daemon
//! speaks to it in development exactly as it would to the production CA.
//!
//! It does not decide *when* a certificate is issued, renewed or revoked: `cert-lifecycle` does.
//!
//! Today it holds the embedded CA ([`EmbeddedCa`]: keys in the HSM, certificate profiles, its own
//! issued/revoked state), the development TLS PKI ([`dev_pki`]) and detached CMS SignedData
//! (`signed_data`); the CMP, OCSP and CRL services and clients come with the CA-bridge issue.

#![forbid(unsafe_code)]

pub mod cmp;
pub mod crl;
pub mod dev_pki;
mod embedded_ca;
mod error;
pub mod ocsp;
pub mod signed_data;
pub mod status;
pub mod transport;
mod verify;
mod x509;

pub use embedded_ca::{
    CaProfileConfig, CertificateState, DEFAULT_ADULT_POLICY_OID, DEFAULT_MINOR_POLICY_OID,
    EmbeddedCa, IssueRequest, IssuedCertificate, PolicyOid, Profile, Revocation,
};
pub use error::CaError;
