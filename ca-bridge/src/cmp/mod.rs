//! CMP (RFC 9483 lightweight profile over HTTP, RFC 6712): the client, and the server side of
//! the embedded CA.
//!
//! Both sides use the `cmpv2`/`crmf` message types. Protection is either a signature
//! (ecdsa-with-SHA256 by our own keys; ECDSA P-256/P-384 and RSA PKCS#1 v1.5 SHA-256 verified) or
//! a password-based MAC (PBM, RFC 4210 section 5.1.3.1, SHA-256 and HMAC-SHA-256).
//!
//! Not supported: certificate templates with a validity (crmf 0.2 decodes `OptionalValidity` as
//! a plain X.509 `Validity`, which no peer sends), implicit confirmation, polling, and nested
//! messages.

mod client;
mod message;
mod pbm;
mod server;

pub use client::{ClientProtection, CmpClient, CmpClientConfig};
pub use server::{CmpServer, CmpServerConfig};
