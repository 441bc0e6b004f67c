//! Everything that talks to a certification authority: the CMP client (RFC 9483 lightweight
//! profile over HTTP, RFC 6712), OCSP (RFC 6960) and CRL fetching, verification and caching; and
//! the embedded CA, whose keys live in the HSM, serving the same protocols so that the daemon
//! speaks to it in development exactly as it would to the production CA.
//!
//! It does not decide *when* a certificate is issued, renewed or revoked: `cert-lifecycle` does.
//!
//! The CA-bridge issue fills this crate; for now it only marks its place in the workspace.

#![forbid(unsafe_code)]
