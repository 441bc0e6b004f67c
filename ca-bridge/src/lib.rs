//! Everything that talks to a certification authority: the CMP client (RFC 9483 lightweight
//! profile over HTTP, RFC 6712), OCSP (RFC 6960) and CRL fetching, verification and caching; and
//! the embedded CA, whose keys live in the HSM, serving the same protocols so that the daemon
//! speaks to it in development exactly as it would to the production CA.
//!
//! It does not decide *when* a certificate is issued, renewed or revoked: `cert-lifecycle` does.
//!
//! - [`cmp`]: the CMP client (ir, kur, rr, certConf; signature or PBM protection; proof of
//!   possession by the user key in the HSM) and the embedded CA's CMP server;
//! - [`ocsp`], [`crl`]: OCSP requests and verified answers, verified CRLs;
//! - [`status`]: the status check before every signature (cache, OCSP, then the CRL, with a
//!   fail-closed policy and an optional grace);
//! - [`EmbeddedCa`]: keys in the HSM, the certificate profiles, its own issued/revoked state, its
//!   OCSP responder and CRL issuer;
//! - [`transport`]: plain HTTP for these protocols, whose messages carry their own protection;
//! - [`enrolment`]: the PKCS#10 request that enrols the daemon's CMP key as an RA;
//! - [`dev_pki`]: the development TLS PKI; [`signed_data`]: detached CMS SignedData around an HSM
//!   signature.

#![forbid(unsafe_code)]

pub mod cmp;
pub mod crl;
pub mod dev_pki;
mod embedded_ca;
pub mod enrolment;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ocsp;
pub mod signed_data;
pub mod status;
pub mod transport;
mod verify;
mod x509;

pub use embedded_ca::{
    CaProfileConfig, CertificateState, DEFAULT_ADULT_POLICY_OID, DEFAULT_MINOR_POLICY_OID,
    EmbeddedCa, IssueRequest, IssuedCertificate, MAX_OCSP_CERT_IDS, OcspStats, PolicyOid, Profile,
    Revocation,
};
pub use error::CaError;
